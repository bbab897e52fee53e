"""Per-process log files: bounded by rotation, read from the end.

Children write their log through an O_APPEND descriptor they keep for life, so the file can
not be renamed under them. Rotation is therefore copy-then-truncate (logrotate's
`copytruncate`): the current content moves to NAME.log.1 (older ones shift up to .KEEP) and the
file is emptied in place; the child's next write lands at the new, small end. Lines written
between the copy and the truncate are lost, a few bytes in practice.
"""

from __future__ import annotations

import os
import shutil
from collections import deque
from pathlib import Path
from typing import Union

PathLike = Union[str, Path]


def rotate_if_needed(path: PathLike, max_bytes: int, keep: int) -> bool:
    """Rotate `path` once it is larger than `max_bytes`. Returns whether it rotated."""
    path = os.fspath(path)
    try:
        if os.lstat(path).st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    for index in range(keep - 1, 0, -1):
        older = f"{path}.{index}"
        if os.path.lexists(older):
            os.replace(older, f"{path}.{index + 1}")
    if keep > 0:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        with open(path, "rb") as source, os.fdopen(os.open(f"{path}.1", flags, 0o600), "wb") as copy:
            shutil.copyfileobj(source, copy)
    os.truncate(path, 0)
    return True


def tail_lines(path: PathLike, count: int) -> list[str]:
    try:
        with open(path, "rb") as handle:
            return [line.decode(errors="replace").rstrip("\n") for line in deque(handle, maxlen=count)]
    except OSError:
        return []


class Follower:
    """New complete lines of a growing log, surviving its rotation (the file shrinking)."""

    def __init__(self, path: PathLike, offset: int = 0):
        self.path = path
        self.offset = offset
        self.partial = b""

    def read_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size < self.offset:  # rotated (copied and truncated): start again at the top
                    self.offset, self.partial = 0, b""
                handle.seek(self.offset)
                data = handle.read()
        except OSError:
            return []
        if not data:
            return []
        self.offset += len(data)
        data = self.partial + data
        *lines, self.partial = data.split(b"\n")
        return [line.decode(errors="replace") for line in lines]
