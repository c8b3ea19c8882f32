"""``python -m train_job.prepare``: :func:`train_job.prepare.cli.main`."""

import sys

from .cli import main

sys.exit(main())
