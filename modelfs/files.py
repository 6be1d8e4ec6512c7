"""Local files written whole or not at all (a `modelfs pull` copy's
metadata, a manifest): a temporary file beside the target, fsync, rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, data: bytes, *, prefix: str, mode: int | None = None) -> None:
    """`data` into `path`, so a reader sees the old file or the whole new
    one. The temporary file is named `prefix`, a random part and ``.tmp``;
    `mode` sets its permissions (default: mkstemp's 0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if mode is not None:
            os.fchmod(fd, mode)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
