"""One supervised process: its plan, its current incarnation, and the record `state.json` keeps of it."""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from epdctl.plan import ProcessSpec
from epdctl.run.events import now_iso
from epdctl.run.restart import RestartBook
from epdctl.run.state import verified_process
from epdctl.run.states import ProcessState, check_transition


@dataclass
class Child:
    spec: ProcessSpec
    log_path: Path
    popen: Optional[subprocess.Popen] = None
    pid: Optional[int] = None
    create_time: Optional[float] = None
    state: ProcessState = ProcessState.PENDING  # changed only through set_state
    running: bool = False  # the current incarnation is alive, as far as we know
    exit_code: Optional[int] = None  # of the last exit; None while running, or when unknowable
    started_at: float = 0.0
    healthy_after_s: Optional[float] = None
    error: Optional[str] = None  # why it never ran, or why it is not restarted
    adopted: bool = False  # taken over alive from a dead supervisor: its start-up time is not ours to tell
    since: str = field(default_factory=now_iso)  # when the current state began
    last_exit: Optional[dict[str, Any]] = None
    restart_at: Optional[float] = None
    next_probe: float = 0.0
    book: Optional[RestartBook] = None
    # launcher slurm: the job step of the current incarnation and its task's pid on the node
    # (`pid` stays the local srun's, which the supervisor reaps and signals)
    step: Optional[str] = None
    task_pid: Optional[int] = None
    task_create_time: Optional[float] = None

    def __post_init__(self) -> None:
        self.book = self.book or RestartBook(self.spec.restart)

    def set_state(self, state: ProcessState) -> None:
        """The one place a supervised process changes state; an illegal change raises (a bug)."""
        if state != self.state:
            check_transition(self.spec.name, self.state, state)
            self.state, self.since = state, now_iso()

    def check_exit(self) -> bool:
        """Has the current incarnation exited? Reaps it, and keeps its exit code when we can know it."""
        if not self.running:
            return self.pid is not None
        if self.popen is not None:
            code = self.popen.poll()
            if code is None:
                return False
        elif verified_process(self.pid, self.create_time) is not None:
            return False
        else:
            code = None  # adopted from an earlier supervisor: not our child, its exit code is lost
        self.running, self.exit_code = False, code
        self.last_exit = {"code": code, "how": describe_exit(code), "at": now_iso()}
        return True

    def record(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "name": spec.name, "role": spec.role, "devices": list(spec.devices), "host": spec.host,
            "port": spec.port, "url": spec.url, "side_channel_port": spec.side_channel_port,
            "pid": self.pid, "pgid": self.pid, "create_time": self.create_time, "log": str(self.log_path),
            "argv": list(spec.argv), "env": dict(spec.env), "state": self.state, "exit_code": self.exit_code,
            "healthy_after_s": self.healthy_after_s, "error": self.error, "restarts": self.book.restarts,
            "last_exit": self.last_exit, "since": self.since, "adopted": self.adopted,
            **({"node": spec.node, "step": self.step, "task_pid": self.task_pid,
                "task_create_time": self.task_create_time} if spec.node else {}),
        }


def describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "exited (exit code unknown: it was adopted, not started, by this supervisor)"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
