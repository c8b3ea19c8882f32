"""Per-process state of an ingress replica, set in its ``__init__``.

Serve serializes the ingress class (and the FastAPI app with its middleware) by value, so
module globals of ``serve_app.ingress`` are copies in the replica; this module is imported
normally there, so the middleware and the routes see the same object through it.
"""

from __future__ import annotations

from .config import ApiSettings

settings: ApiSettings | None = None
