"""Output whose reader may leave: `epdctl up | head`, `| tee` ended by Ctrl-C, a closed terminal.

A reader that leaves means "stop printing", never "stop working": writes to a stream whose
reader is gone are dropped, so a supervisor keeps supervising and still tears down on a signal.
"""

from __future__ import annotations

import errno
import os
from typing import Callable, Optional

# EPIPE: the pipe's reader exited; EIO: the terminal was closed (a hang-up).
READER_GONE = (errno.EPIPE, errno.EIO)


def silence(stream) -> None:
    """Point `stream`'s descriptor at /dev/null: its buffered text, later writes and the
    interpreter's flush at exit all succeed (and go nowhere) instead of failing again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, stream.fileno())
    finally:
        os.close(devnull)
    try:
        stream.flush()
    except (OSError, ValueError):
        pass


class ReaderTolerant:
    """A text stream that drops what it cannot deliver once its reader is gone.

    `on_gone` is called once, when that is first noticed. Anything else is the wrapped stream's.
    """

    def __init__(self, stream, on_gone: Optional[Callable[[], None]] = None):
        self.stream = stream
        self.gone = False
        self._on_gone = on_gone

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self.stream.write(text)
            except OSError as exc:
                self._lost(exc)
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self.stream.flush()
            except OSError as exc:
                self._lost(exc)

    def _lost(self, exc: OSError) -> None:
        if exc.errno not in READER_GONE:
            raise exc
        self.gone = True
        try:
            silence(self.stream)
        except OSError:
            pass
        if self._on_gone is not None:
            self._on_gone()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)
