"""A small on-disk cache of per-file indexes (numpy arrays + JSON metadata), keyed by the file's
identity (absolute path, size, modification time) and the options that shaped the index, so a
1M-record file is scanned once and later runs open it in well under a second.

Where: `data.cache_dir`, else $MOEJAX_CACHE, else $XDG_CACHE_HOME/moejax, else ~/.cache/moejax
(an `index/` folder inside). Entries are written atomically (temporary file + rename), so two
processes building the same index at once each leave a complete file.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Sequence

import numpy as np

VERSION = 1  # bump when an index's meaning changes: old entries are then simply not found


def cache_root(configured: str = "") -> str:
    root = configured or os.environ.get("MOEJAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "moejax")
    return os.path.join(root, "index")


def file_identity(path: str) -> dict[str, Any]:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _entry(kind: str, paths: Sequence[str], options: dict, directory: str) -> str:
    key = json.dumps({"v": VERSION, "kind": kind, "files": [file_identity(p) for p in paths],
                      "options": options}, sort_keys=True)
    name = hashlib.sha256(key.encode()).hexdigest()[:32]
    return os.path.join(cache_root(directory), f"{kind}-{name}.npz")


def load(kind: str, paths: Sequence[str], options: dict, directory: str = ""
         ) -> tuple[dict[str, np.ndarray], dict] | None:
    """(arrays, meta) of a cached index of `paths` built with `options`, or None."""
    path = _entry(kind, paths, options, directory)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != "__meta__"}
            meta = json.loads(bytes(z["__meta__"]).decode())
        return arrays, meta
    except (OSError, ValueError, KeyError):  # absent, or unreadable (then rebuilt and overwritten)
        return None


def save(kind: str, paths: Sequence[str], options: dict, arrays: dict[str, np.ndarray], meta: dict,
         directory: str = "") -> str | None:
    """Write the index; returns its path, or None when the cache directory is not writable (the
    index then lives for this run only, which is not an error)."""
    path = _entry(kind, paths, options, directory)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
        os.replace(tmp, path)
        return path
    except OSError:
        return None
