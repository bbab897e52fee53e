"""The supervisor's look at what each instance does, for `status`'s `evidence` and `health`.

Every EVERY_S seconds it reads each serving instance's /metrics (and, for a vLLM consumer, the
new lines of its log), keeps WINDOW_S seconds of readings per process, and judges each by
epdctl/evidence.py's rules: what it did since it started, and what it did in the window. The
result is kept in state.json under "evidence"; a change of the topology's health is an event.
The reads run on a small thread pool, so a slow /metrics never holds up the supervise loop.
"""

from __future__ import annotations

import os
import stat
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from epdctl.config.schema import ROLES
from epdctl.evidence import LOG_MARKERS, WINDOW_S, Part, counts, parse_metrics, parts, recent, verdict
from epdctl.run.events import EVENTS_FILE, append_event, now_iso
from epdctl.run.states import ProcessState

if TYPE_CHECKING:
    from epdctl.run.child import Child
    from epdctl.run.supervisor import Supervisor

EVERY_S = 2.0
FETCH_TIMEOUT_S = 2.0
MAX_LOG_READ = 4 * 1024 * 1024  # new log bytes read per look; beyond it the oldest are skipped
MAX_LINE = 64 * 1024  # an unfinished line kept for the next look, at most


@dataclass
class LogCount:
    """Markers counted in one log, read on from where the last look stopped."""

    path: Path
    offset: int = 0
    partial: bytes = b""
    found: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LOG_MARKERS, 0))

    def read_on(self) -> Optional[dict[str, int]]:
        try:
            # O_NONBLOCK: a FIFO found at the name must not hold the look (and the supervisor's exit) forever.
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return None  # a folder or a FIFO where the log was: nothing to count, and nothing to crash on
            size = info.st_size
            if size < self.offset:  # rotated (docs/commands.md, logs): the new file from its start
                self.offset, self.partial = 0, b""
            start = max(self.offset, size - MAX_LOG_READ)
            data = os.pread(fd, size - start, start) if size > start else b""
        except OSError:
            return None
        finally:
            os.close(fd)
        self.offset = start + len(data)
        text = self.partial + data
        lines, _, self.partial = text.rpartition(b"\n")
        self.partial = self.partial[-MAX_LINE:]
        decoded = lines.decode("utf-8", "replace")
        for marker in LOG_MARKERS:
            self.found[marker] += decoded.count(marker)
        return dict(self.found)


@dataclass
class Reading:
    at: float
    counts: dict[str, Optional[float]]


class Witness:
    def __init__(self, sup: "Supervisor"):
        self.sup = sup
        self.readings: dict[tuple[str, Optional[int]], deque[Reading]] = {}  # by (instance, pid)
        self.logs: dict[str, LogCount] = {}
        self.batch: Optional[list[tuple["Child", Part, Optional[int], Future]]] = None
        self.next_at = 0.0
        self.record: dict[str, Any] = {}  # state.json's "evidence"
        self.health: Optional[str] = None  # the topology's, as last judged here
        self.executor: Optional[ThreadPoolExecutor] = None

    def tend(self, now: float) -> bool:
        """Start a look when one is due; fold in a finished one. True when the record changed."""
        if self.batch is not None:
            if not all(future.done() for *_, future in self.batch):
                return False
            batch, self.batch = self.batch, None
            return self._judge(now, batch)
        if now < self.next_at:
            return False
        self.next_at = now + EVERY_S
        instances = [c for c in self.sup.children if c.spec.role in ROLES]
        serving = [c for c in instances if c.state in (ProcessState.HEALTHY, ProcessState.DRAINING)]
        if not serving:
            return False
        if self.executor is None:
            self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="epdctl-witness")
        by_name = {p.name: p for p in parts(((c.spec.name, c.spec.role) for c in instances), self.sup.plan.engine)}
        self.batch = []
        for child in serving:
            part = by_name[child.spec.name]
            log = self.logs.setdefault(child.spec.name, LogCount(child.log_path)) if part.watches_log else None
            self.batch.append((child, part, child.pid, self.executor.submit(self._look, child.spec.url, log)))
        return False

    def _look(self, url: str, log: Optional[LogCount]) -> tuple[Optional[dict[str, float]], Optional[dict[str, int]]]:
        text = self.sup.runtime.fetch(url + "/metrics", timeout=FETCH_TIMEOUT_S)
        try:
            metrics = parse_metrics(text) if text is not None else None
        except (ValueError, IndexError, KeyError, TypeError):
            metrics = None  # not Prometheus text: nothing it says can be trusted as evidence
        return metrics, (log.read_on() if log is not None else None)

    def _judge(self, now: float, batch) -> bool:
        instances: dict[str, dict[str, Any]] = {}
        reasons: list[str] = []
        for child, part, pid, future in batch:
            metrics, log = future.result()
            total = counts(part, metrics, log)
            history = self.readings.setdefault((part.name, pid), deque())
            if not history and not child.adopted and now - child.started_at <= WINDOW_S:
                # Started within the window: all it did since is recent (its counters began at 0).
                history.append(Reading(child.started_at, {k: 0.0 for k in total}))
            history.append(Reading(now, total))
            while len(history) > 2 and history[1].at <= now - WINDOW_S:
                history.popleft()  # keep one reading at or before the window's start as its baseline
            last = recent(total, history[0].counts)
            said, text, reason = verdict(part, total, last)
            instances[part.name] = {"verdict": said, "detail": text, "counts": total, "recent": last,
                                    "window_s": WINDOW_S}
            if reason:
                reasons.append(reason)
        alive = {(c.spec.name, c.pid) for c in self.sup.children}
        for key in [k for k in self.readings if k not in alive]:
            del self.readings[key]
        record = {"instances": instances, "reasons": reasons}
        changed = record != {k: self.record.get(k) for k in record}
        self.record = {**record, "at": now_iso()}
        return changed

    def topology_health(self, phase_serves: bool) -> None:
        """An event when the topology's health changes (the processes' states, then the evidence)."""
        health = "healthy" if phase_serves and not self.record.get("reasons") else "degraded"
        if health != self.health:
            if self.health is not None or health != "healthy":
                why = "; ".join(self.record.get("reasons") or []) or (None if phase_serves else "a process is not healthy")
                append_event(self.sup.state_dir.path / EVENTS_FILE, "topology", health, reason=why)
            self.health = health

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None
