"""Where the served weights come from: a checkpoint directory, a training run, or a URI.

The checkpoint directory is the contract with training (config.json + safetensors, or an
NVlabs directory); of a training run directory (``spade_core.runs``) serving takes the
newest ``checkpoint_*`` or, selected, ``best/``. URIs (s3://, gs://, file://, any pyarrow
filesystem) are copied to a local cache first: of a run, only the selected checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import spade_core
from spade_core.checkpoint import MANIFEST_FILE, manifest_gaps
from spade_core.locations import filesystem, is_remote, local_path
from spade_core.runs import BEST_DIR, BEST_FILE, CHECKPOINT_MARKERS, CHECKPOINT_PREFIX, Select, checkpoint_in

CACHE_DIR = Path(os.environ.get("SPADE_SERVE_CACHE", Path(tempfile.gettempdir()) / "spade_serve_cache"))


def resolve_checkpoint(location: str, select: Select = "latest") -> Path:
    """A local checkpoint directory for ``location`` (``select`` of a run); ValueError saying what is wrong."""
    if is_remote(location):
        return checkpoint_in(_download(location, select))
    return checkpoint_in(local_path(location), select)


def load_model(location: str, device: str = "cpu", select: Select = "latest") -> tuple[spade_core.SpadeModel, str]:
    """The model in eval mode and the checkpoint's identity (path + a digest of its config and weights' sizes)."""
    path = resolve_checkpoint(location, select)
    model = spade_core.load_checkpoint(path, device=device)
    return model, f"{path}#{fingerprint(path)}"


def fingerprint(path: Path) -> str:
    """A short digest of the files' names, sizes and mtimes: changes when the checkpoint does."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and "training" not in p.relative_to(path).parts):
        st = f.stat()
        h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def _download(uri: str, select: Select) -> Path:
    """A local copy of the checkpoint ``uri`` names (of a run: only the selected one, not every one)."""
    import pyarrow.fs as pafs

    fs, root = filesystem(uri)
    cache = CACHE_DIR / _digest(uri)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        raise ValueError(f"checkpoint {uri} does not exist")
    entries = fs.get_file_info(pafs.FileSelector(root))
    names = {i.base_name for i in entries}
    if names & CHECKPOINT_MARKERS:
        if select == "best":
            raise ValueError(f"{uri} is a checkpoint, not a training run: 'best' chooses among a run's checkpoints")
        return _copy_once(fs, root, cache)
    if select == "best":
        if BEST_FILE not in names:
            raise ValueError(f"{uri} has no {BEST_FILE}: a run keeps a best checkpoint only when trained with checkpoint.best_by")
        with fs.open_input_stream(f"{root}/{BEST_FILE}") as f:
            record = f.read()
        # The best copy is replaced in place as training improves: cache it under its record.
        name = json.loads(record)["checkpoint"]
        return _copy_once(fs, f"{root}/{name}", cache / f"{BEST_DIR}-{_digest(record)}")
    checkpoints = sorted(i.base_name for i in entries if i.type == pafs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX))
    if not checkpoints:
        raise ValueError(f"{uri} is neither a checkpoint directory nor a training run with {CHECKPOINT_PREFIX}* folders")
    gaps = []
    for name in reversed(checkpoints):  # the newest whole one: an upload cut off by a kill leaves a partial folder
        gap = _remote_gap(fs, f"{root}/{name}")
        if gap is None:
            return _copy_once(fs, f"{root}/{name}", cache / name)
        gaps.append(f"{name} ({gap})")
    raise ValueError(f"{uri} has no complete {CHECKPOINT_PREFIX}* folder: {'; '.join(gaps[:3])}")


def _remote_gap(fs: Any, folder: str) -> str | None:
    """spade_core's completeness rule (its manifest against the files' sizes) on a remote folder."""
    import pyarrow.fs as pafs

    files = [i for i in fs.get_file_info(pafs.FileSelector(folder, recursive=True)) if i.type == pafs.FileType.File]
    sizes = {i.path[len(folder) + 1:]: i.size for i in files}
    manifest = None
    if MANIFEST_FILE in sizes:
        with fs.open_input_stream(f"{folder}/{MANIFEST_FILE}") as f:
            manifest = f.read()
    return manifest_gaps(manifest, sizes)


def _digest(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:16]


def _copy_once(fs: Any, source: str, target: Path) -> Path:
    """``source`` copied to ``target`` unless already there; atomic, so concurrent replicas share one copy."""
    import pyarrow.fs as pafs

    if target.is_dir():
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=CACHE_DIR))
    try:
        pafs.copy_files(source, str(partial), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(partial, target)  # a concurrent replica sees all files or none
        except OSError:
            if not target.is_dir():  # else another replica finished the same copy first
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target
