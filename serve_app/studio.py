"""The paint studio's files: ``serve_app/studio/`` (HTML, one ES module per job, CSS), served
as they are by the ingress at ``GET /`` and ``/studio/...``; no CDN, no build step.

Kept apart from the ingress, which handles request data and touches no file: these paths
are fixed, and Starlette's StaticFiles refuses any that leaves the folder.
"""

from __future__ import annotations

from pathlib import Path

from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STUDIO_DIR = Path(__file__).resolve().parent / "studio"


def static_files() -> StaticFiles:
    return StaticFiles(directory=STUDIO_DIR)


def index_page() -> FileResponse:
    return FileResponse(STUDIO_DIR / "index.html", media_type="text/html")
