"""Stopping processes for good (docs/design.md, "Style rules"): SIGTERM each group, grace, SIGKILL once, sweep.

"Down" means no descendant is left. vLLM's EngineCore and workers are children that can
outlive their parent, or sit in another session, so besides each recorded process group we
also take every descendant seen before signalling and every process carrying the run's
environment tag (which survives reparenting to init).
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import psutil

from epdctl.run.launch import LocalLauncher
from epdctl.run.state import is_alive, tagged_processes, verified_process

SWEEP_WAIT_S = 2.0
DEFAULT_GRACE_S = 10.0


@dataclass
class StopResult:
    name: str
    pid: Optional[int]
    how: str  # "sigterm" | "sigkill" | "already-exited" | "survived"
    seconds: float = 0.0

    def describe(self) -> str:
        pid = f" (pid {self.pid})" if self.pid else ""
        return {
            "sigterm": f"{self.name}{pid}: stopped by SIGTERM in {self.seconds:.2f}s",
            "sigkill": f"{self.name}{pid}: killed with SIGKILL after the {self.seconds:.0f}s grace",
            "already-exited": f"{self.name}{pid}: had already exited",
            "survived": f"{self.name}{pid}: STILL RUNNING after SIGKILL",
        }[self.how]


@dataclass
class StopReport:
    results: list[StopResult] = field(default_factory=list)
    swept: int = 0
    survivors: list[psutil.Process] = field(default_factory=list)
    # Descendants still alive when the grace ran out ("pid N (command)"), and the grace waited:
    # where the time went when every instance itself stopped at once.
    killed_descendants: list[str] = field(default_factory=list)
    grace_waited_s: float = 0.0
    steps_left: list[str] = field(default_factory=list)  # launcher slurm: steps Slurm would not end

    @property
    def clean(self) -> bool:
        return not self.survivors and not self.steps_left and all(r.how != "survived" for r in self.results)

    def lines(self) -> list[str]:
        out = [r.describe() for r in self.results]
        if self.killed_descendants:
            shown = ", ".join(self.killed_descendants[:5]) + (", ..." if len(self.killed_descendants) > 5 else "")
            out.append(f"{len(self.killed_descendants)} descendant process(es) ignored SIGTERM ({shown}): "
                       f"waited {self.grace_waited_s:.1f}s (the grace), then SIGKILL")
        if self.swept:
            out.append(f"swept {self.swept} stray descendant process(es)")
        for proc in self.survivors:
            out.append(f"pid {proc.pid} survived SIGKILL")
        for step in self.steps_left:
            out.append(f"{step}: still a job step after scancel")
        return out


def _descendants(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def stop_processes(
    records: Iterable[dict],
    run_token: Optional[str],
    grace: float,
    *,
    hurry: Callable[[], bool] = lambda: False,
    reap: Callable[[], None] = lambda: None,
    launcher: Optional[LocalLauncher] = None,
) -> StopReport:
    """Stop every recorded process with its group and descendants.

    `records` carry name, pid, pgid and create_time. `hurry()` returning True (a second
    Ctrl-C) ends the grace early. `reap()` lets a parent collect exit codes while we wait,
    so its children don't linger as zombies. `launcher` signals (the one that started them).
    """
    launcher = launcher or LocalLauncher()
    records = list(records)
    report = StopReport()
    leaders: dict[str, Optional[psutil.Process]] = {}
    everyone: dict[int, psutil.Process] = {}
    for record in records:
        leader = verified_process(record.get("pid"), record.get("create_time"))
        leaders[record["name"]] = leader
        if leader is not None:
            everyone[leader.pid] = leader
            for child in _descendants(leader):
                everyone[child.pid] = child
    if run_token:
        for proc in tagged_processes(run_token):
            everyone.setdefault(proc.pid, proc)

    groups = []
    for record in records:
        leader = leaders[record["name"]]
        if leader is None:
            continue
        pgid = record.get("pgid") or leader.pid
        group = launcher.group_of(leader.pid)
        if group is None:
            continue
        if group == pgid:
            groups.append(pgid)
            launcher.signal_group(pgid, signal.SIGTERM)
            continue
        launcher.signal(leader, signal.SIGTERM)
    for proc in everyone.values():
        group = launcher.group_of(proc.pid)
        if group is not None and group not in groups:
            launcher.signal(proc, signal.SIGTERM)

    started = time.monotonic()
    deadline = started + grace
    exited_at: dict[str, float] = {}

    def note_exits() -> None:
        for name, leader in leaders.items():
            if leader is not None and name not in exited_at and not is_alive(leader):
                exited_at[name] = time.monotonic() - started

    while True:
        reap()
        note_exits()
        if not any(is_alive(p) for p in everyone.values()):
            break
        if time.monotonic() >= deadline or hurry():
            break
        time.sleep(0.05)
    # A leader that exited between the two checks above stopped on SIGTERM too: without this it
    # was reported "killed with SIGKILL after the grace" by a down that took 0.1 s.
    note_exits()

    report.grace_waited_s = time.monotonic() - started
    leader_pids = {p.pid for p in leaders.values() if p is not None}
    report.killed_descendants = [_describe(p) for p in everyone.values() if p.pid not in leader_pids and is_alive(p)]
    killed = False
    for pgid in groups:
        if any(is_alive(p) for p in everyone.values() if launcher.group_of(p.pid) == pgid):
            launcher.signal_group(pgid, signal.SIGKILL)
            killed = True
    for proc in everyone.values():
        if is_alive(proc):
            launcher.signal(proc, signal.SIGKILL)
            killed = True
    if killed:
        _wait_gone(everyone.values(), SWEEP_WAIT_S, reap)

    # The sweep: anything tagged that appeared meanwhile (a child forked during the grace).
    if run_token:
        strays = [p for p in tagged_processes(run_token) if p.pid not in everyone]
        for proc in strays:
            launcher.signal(proc, signal.SIGKILL)
            everyone[proc.pid] = proc
        report.swept = len(strays)
        _wait_gone(strays, SWEEP_WAIT_S, reap)
    reap()

    for record in records:
        name, leader = record["name"], leaders[record["name"]]
        if leader is None:
            report.results.append(StopResult(name, record.get("pid"), "already-exited"))
        elif is_alive(leader):
            report.results.append(StopResult(name, leader.pid, "survived"))
        elif name in exited_at:
            report.results.append(StopResult(name, leader.pid, "sigterm", exited_at[name]))
        else:
            report.results.append(StopResult(name, leader.pid, "sigkill", grace))
    report.survivors = [p for p in everyone.values() if p.pid not in leader_pids and is_alive(p)]
    if run_token:
        report.steps_left = launcher.end_run(run_token)
    return report


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid} ({' '.join(proc.cmdline())[:50]})"
    except psutil.Error:
        return f"pid {proc.pid}"


def _wait_gone(procs: Iterable[psutil.Process], timeout: float, reap: Callable[[], None]) -> None:
    procs = list(procs)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reap()
        if not any(is_alive(p) for p in procs):
            return
        time.sleep(0.02)
