"""``python -m train_job.synthetic``: :func:`train_job.synthetic.cli.main`."""

import sys

from .cli import main

sys.exit(main())
