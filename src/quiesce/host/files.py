"""Files quiesce writes: atomically and privately.

A temporary file with a name nobody can guess (mkstemp: O_EXCL, 0600) in the same
directory, fsync'd, renamed over the target: a reader sees the old file or the new one,
never half of it, and a link planted at a predictable name is never written through.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes, *, mode: int = 0o600) -> Path:
    """Replace ``path`` with ``data`` (mode ``mode`` whatever the umask; 0600 by default)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            if mode != 0o600:
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


__all__ = ["write_atomic"]
