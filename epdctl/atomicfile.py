"""Writing a file so that readers see the old content or the new, never a torn mix."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Union


def write_atomic(path: Union[str, Path], data: bytes, mode: Optional[int] = None) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path` (atomic on POSIX)."""
    folder, name = os.path.split(os.fspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder or ".")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
