"""Where data and checkpoints live: a local path or a URI (``s3://``, ``gs://``, ``file://``, any
pyarrow filesystem). The one rule every part of the project uses to tell them apart, so a
config, a CLI flag and a Serve model entry read the same string the same way.

pyarrow is imported only by ``filesystem``: the model library itself never needs it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow.fs as pafs

FILE_SCHEME = "file://"


def is_uri(location: str) -> bool:
    """True for ``scheme://...`` (``file://`` included), False for a plain path."""
    return "://" in location


def is_remote(location: str) -> bool:
    """A URI that is not ``file://``: reached through a pyarrow filesystem, not the local disk."""
    return is_uri(location) and not location.startswith(FILE_SCHEME)


def absolute(location: str) -> str:
    """A plain path made absolute (``~`` expanded) against the current directory; URIs as given,
    since replicas and workers run elsewhere and must not resolve a path against their own."""
    return location if is_uri(location) else os.path.abspath(os.path.expanduser(location))


def local_path(location: str) -> str:
    """The local path of a plain path or a ``file://`` URI; ValueError for a remote URI."""
    if is_remote(location):
        raise ValueError(f"{location} is a remote URI, not a local path")
    return absolute(location.removeprefix(FILE_SCHEME))


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path in it, no trailing '/'); ValueError naming the location if
    pyarrow cannot open it (unknown scheme, missing credentials library, malformed URI)."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), absolute(location).rstrip("/") or "/"
    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except Exception as exc:  # pyarrow raises several types (ArrowInvalid, ArrowNotImplementedError, OSError)
        raise ValueError(f"cannot open {location}: {exc}") from exc
    return fs, path.rstrip("/") or "/"
