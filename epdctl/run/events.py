"""`events.jsonl` in the state folder: starts, health changes, exits and restarts, one JSON
object a line, appended by the supervisor and read by `epdctl events`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from epdctl.run.logfiles import display

EVENTS_FILE = "events.jsonl"
# Events have their own bound, apart from `logs.max_mb`: a tiny log cap must not cost the history
# `epdctl events` shows. Past EVENTS_MAX_BYTES the file moves to events.jsonl.1 (the one older copy
# kept, shown first) and starts again; a restart loop adds a few hundred bytes a minute.
EVENTS_MAX_BYTES = 16 * 1024 * 1024
EVENTS_KEEP = 1


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"


def append_event(path: Path, process: str, event: str, **detail: Any) -> Optional[dict[str, Any]]:
    """Append one event; a failure to record is never a failure to supervise."""
    record = {"time": now_iso(), "process": process, "event": event, **{k: v for k, v in detail.items() if v is not None}}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())  # one write: lines never interleave
        finally:
            os.close(fd)
    except OSError:
        return None
    return record


def format_event(line: str) -> Optional[str]:
    """One line of `epdctl events`: time, process, event, then the details; safe to print.

    The filter runs on the decoded text: the JSON may spell an escape sequence as \\u001b."""
    try:
        record = json.loads(line)
        if not isinstance(record, dict):
            return None
    except ValueError:
        return None
    detail = " ".join(f"{k}={v}" for k, v in record.items() if k not in ("time", "process", "event"))
    return display(f"{record.get('time', '?')}  {record.get('process', '?'):<10} {record.get('event', '?'):<10} {detail}".rstrip())
