"""Where the served weights come from: a checkpoint directory, a training run, or a URI.

The checkpoint directory is the contract with training (config.json + safetensors, or an
NVlabs directory); a training run directory holds Ray Train's ``checkpoint_<time>``
folders and serving picks the newest. URIs (s3://, gs://, file://, any pyarrow filesystem)
are copied to a local cache first.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import spade_core
from spade_core.checkpoint import CONFIG_FILE
from spade_core.nvlabs import is_nvlabs_dir

CACHE_DIR = Path(os.environ.get("SPADE_SERVE_CACHE", Path(tempfile.gettempdir()) / "spade_serve_cache"))


def is_checkpoint_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() or is_nvlabs_dir(path)


def latest_in_run(run: Path) -> Path | None:
    """The newest ``checkpoint_*`` folder of a Ray Train run (their names sort by time)."""
    candidates = sorted(p for p in run.glob("checkpoint_*") if p.is_dir() and is_checkpoint_dir(p))
    return candidates[-1] if candidates else None


def resolve_checkpoint(location: str) -> Path:
    """A local checkpoint directory for ``location``; ValueError saying what is wrong otherwise."""
    if "://" in location and not location.startswith("file://"):
        return resolve_checkpoint(str(_download(location)))
    path = Path(location.removeprefix("file://")).expanduser()
    if not path.is_dir():
        raise ValueError(f"checkpoint {location} {'is not a directory' if path.exists() else 'does not exist'}")
    if is_checkpoint_dir(path):
        return path
    latest = latest_in_run(path)
    if latest is None:
        raise ValueError(
            f"{location} is neither a checkpoint directory (config.json + generator.safetensors, or NVlabs' "
            "latest_net_G.pth + opt.txt) nor a training run with checkpoint_* folders"
        )
    return latest


def load_model(location: str, device: str = "cpu") -> tuple[spade_core.SpadeModel, str]:
    """The model in eval mode and the checkpoint's identity (path + a digest of its config and weights' sizes)."""
    path = resolve_checkpoint(location)
    model = spade_core.load_checkpoint(path, device=device)
    return model, f"{path}#{fingerprint(path)}"


def fingerprint(path: Path) -> str:
    """A short digest of the files' names, sizes and mtimes: changes when the checkpoint does."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and "training" not in p.relative_to(path).parts):
        st = f.stat()
        h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def _download(uri: str) -> Path:
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # pyarrow raises several types for bad or unsupported URIs
        raise ValueError(f"cannot open {uri}: {exc}") from exc
    target = CACHE_DIR / hashlib.sha256(uri.encode()).hexdigest()[:16]
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise ValueError(f"checkpoint {uri} does not exist")
    # A run directory: fetch only its newest checkpoint, not every one.
    entries = fs.get_file_info(pafs.FileSelector(root))
    checkpoints = sorted(i.base_name for i in entries if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))
    if checkpoints and not any(i.base_name == CONFIG_FILE for i in entries):
        root = f"{root.rstrip('/')}/{checkpoints[-1]}"
        target = target / checkpoints[-1]
    if not target.is_dir():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=CACHE_DIR))
        try:
            pafs.copy_files(root, str(partial), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(partial, target)  # atomic: a concurrent replica sees all files or none
            except OSError:
                if not target.is_dir():  # else another replica finished the same copy first
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return target
