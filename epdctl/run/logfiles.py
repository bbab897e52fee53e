"""Per-process log files: bounded by rotation, read from the end.

Children write their log through an O_APPEND descriptor they keep for life, so the file can
not be renamed under them. Rotation is therefore copy-then-truncate (logrotate's
`copytruncate`): the current content moves to NAME.log.1 (older ones shift up to .KEEP) and the
file is emptied in place; the child's next write lands at the new, small end. Lines written
between the copy and the truncate are lost, a few bytes in practice.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import tempfile
from collections import deque
from pathlib import Path
from typing import Iterator, Optional, Union

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


def open_log(path: PathLike, truncate: bool = False):
    """A process's log for appending (emptied first with `truncate`), never through a symlink: one
    planted at the name (the folder is ours, 0700, but a tool of the same user could) is replaced
    by a fresh file, so neither the child's output nor our markers reach what it points to."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_TRUNC if truncate else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        os.unlink(path)  # the link itself, never its target
        fd = os.open(path, flags | os.O_EXCL, 0o600)
    return os.fdopen(fd, "ab", buffering=0)


def rotate_if_needed(path: PathLike, max_bytes: int, keep: int) -> bool:
    """Rotate `path` once it is larger than `max_bytes`. Returns whether it rotated.

    The state folder is ours, but a name in it may have been planted (a symlink at NAME.log.1, a
    folder): no copy is ever written through it, and what it points at is never touched. A name
    that cannot be replaced is skipped, and the log is emptied all the same: the size bound holds.
    """
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # gone, or not a file of ours to rotate (a symlink, a FIFO we may not open)
        return False
    with os.fdopen(fd, "r+b") as log:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size <= max_bytes:
            return False
        if keep > 0:
            _shift_copies(path, keep)
            _copy_beside(log, f"{path}.1")
        log.truncate(0)
    return True


def _shift_copies(path: str, keep: int) -> None:
    """NAME.log.N -> NAME.log.N+1, oldest first; a rename moves a symlink itself, never its target."""
    for index in range(keep - 1, 0, -1):
        older = f"{path}.{index}"
        if os.path.lexists(older):
            try:
                os.replace(older, f"{path}.{index + 1}")
            except OSError:  # a folder in the way: leave both where they are
                pass


def _copy_beside(source, target: str) -> None:
    """Copy `source` to `target` through a new file in the same folder renamed over it: whatever
    is at `target` (a planted symlink included) is replaced, never written through."""
    folder, name = os.path.split(target)
    temporary = None
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder or ".")
        with os.fdopen(fd, "wb") as copy:
            source.seek(0)
            shutil.copyfileobj(source, copy)
        os.replace(temporary, target)
    except OSError:  # a folder at `target`, or a full disk: skip the copy, keep the bound
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)


def tail_lines(path: PathLike, count: int, colour: bool = False) -> list[str]:
    """The last `count` lines, safe to print (display())."""
    try:
        with open(path, "rb") as handle:
            return [display(line.decode(errors="replace").rstrip("\n"), colour) for line in deque(handle, maxlen=count)]
    except OSError:
        return []


# Files are read a chunk at a time: a log may be 100 MB, events.jsonl tens of MB. A "line" longer
# than MAX_LINE_BYTES is shown in pieces of that size rather than held whole.
CHUNK_BYTES = 64 * 1024
MAX_LINE_BYTES = 1024 * 1024


class Follower:
    """New complete lines of a growing log, surviving its rotation (the file shrinking); safe to
    print (display()), or as written with `raw` (for a reader that decodes them and shows the result
    through display() itself, as `epdctl events` does)."""

    def __init__(self, path: PathLike, offset: int = 0, colour: bool = False, raw: bool = False):
        self.path = path
        self.offset = offset
        self.partial = b""
        self.colour = colour
        self.raw = raw

    def read_lines(self) -> list[str]:
        return list(self.lines())

    def lines(self, until: Optional[int] = None, final: bool = False) -> Iterator[str]:
        """The lines from where the last call stopped to the end (or to byte `until`), one at a time.
        `final`: the last line counts even without its newline (the file is read once, not followed)."""
        try:
            handle = open(self.path, "rb")
        except OSError:
            return
        with handle:
            if os.fstat(handle.fileno()).st_size < self.offset:  # rotated (copied and truncated): start again
                self.offset, self.partial = 0, b""
            handle.seek(self.offset)
            for chunk in iter(lambda: handle.read(self._next_read(until)), b""):
                self.offset += len(chunk)
                *complete, self.partial = (self.partial + chunk).split(b"\n")
                yield from map(self._shown, complete)
                while len(self.partial) > MAX_LINE_BYTES:
                    yield self._shown(self.partial[:MAX_LINE_BYTES])
                    self.partial = self.partial[MAX_LINE_BYTES:]
        if final and self.partial:
            yield self._shown(self.partial)
            self.partial = b""

    def _next_read(self, until: Optional[int]) -> int:
        return CHUNK_BYTES if until is None else max(0, min(CHUNK_BYTES, until - self.offset))

    def _shown(self, line: bytes) -> str:
        text = line.decode(errors="replace")
        return text if self.raw else display(text, self.colour)


def redirect_stdio(log_path: Path) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(devnull)
    os.close(log)
