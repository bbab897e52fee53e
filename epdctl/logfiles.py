"""Per-process log files: bounded by rotation, read from the end.

Children write their log through an O_APPEND descriptor they keep for life, so the file can
not be renamed under them. Rotation is therefore copy-then-truncate (logrotate's
`copytruncate`): the current content moves to NAME.log.1 (older ones shift up to .KEEP) and the
file is emptied in place; the child's next write lands at the new, small end. Lines written
between the copy and the truncate are lost, a few bytes in practice.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import deque
from pathlib import Path
from typing import Union

PathLike = Union[str, Path]

# A child's log is its own text and may quote what clients sent. Printed as it is, an escape
# sequence could move the cursor over other lines, retitle the terminal, reset it (ESC c) or write
# the clipboard (OSC 52). So lines are shown with colours (SGR) kept for a terminal and dropped
# elsewhere (vllm-router colours its log whatever it writes to), every other escape sequence
# dropped, and any other control character shown escaped (`\x07`). A carriage return shows what a
# terminal would: the text after the last one (progress bars).
_SGR = re.compile(r"\x1b\[[0-9;:]*m")
_ESCAPE = re.compile(
    r"\x1b(?:\[[0-?]*[ -/]*[@-~]"              # CSI: cursor, erase, colours
    r"|[\]PX^_][^\x07\x1b]*(?:\x07|\x1b\\)?"   # OSC, DCS, SOS, PM, APC strings (title, clipboard)
    r"|[ -~]?)"                                # ESC and one character (ESC c: reset), or a lone ESC
)


def wants_colour(out) -> bool:
    """Colours for `out`: a terminal, and NO_COLOR (no-color.org) not set."""
    return out.isatty() and not os.environ.get("NO_COLOR")


def display(line: str, colour: bool = False) -> str:
    """`line` safe to print: see above."""
    if line.isprintable():
        return line
    line = line.rstrip("\r")
    if "\r" in line:
        line = line.rsplit("\r", 1)[1]
    if "\x1b" in line:
        line = _ESCAPE.sub(lambda m: m.group(0) if colour and _SGR.fullmatch(m.group(0)) else "", line)
        if "\x1b" in line:
            line += "\x1b[0m"  # a colour left on must not bleed into the next line
    return "".join(ch if ch.isprintable() or ch == "\t" or (colour and ch == "\x1b")
                   else ch.encode("unicode_escape").decode("ascii") for ch in line)


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


def tail_lines(path: PathLike, count: int, colour: bool = False) -> list[str]:
    """The last `count` lines, safe to print (display())."""
    try:
        with open(path, "rb") as handle:
            return [display(line.decode(errors="replace").rstrip("\n"), colour) for line in deque(handle, maxlen=count)]
    except OSError:
        return []


class Follower:
    """New complete lines of a growing log, surviving its rotation (the file shrinking); safe to
    print (display())."""

    def __init__(self, path: PathLike, offset: int = 0, colour: bool = False):
        self.path = path
        self.offset = offset
        self.partial = b""
        self.colour = colour

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
        return [display(line.decode(errors="replace"), self.colour) for line in lines]
