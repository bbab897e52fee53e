"""Spawn, health gate, fail fast, heal, tear down (DESIGN §4, §7).

One `Supervisor` runs a plan. In the foreground it lives in the `epdctl up` process; with
`-d` it lives in a detached fork of `epdctl up` (its own session) that owns (and reaps) the
children while the CLI only watches `state.json` until everything is healthy. After start-up
it restarts what exits by each process's restart policy (the decisions are `restart.py`'s).
Every child is recorded in `state.json` (pid + create_time + pgid) the moment it exists, so
SIGKILL of any epdctl process still leaves everything within reach of `epdctl down`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import psutil

from epdctl.run import logfiles, storage
from epdctl.run.events import EVENTS_FILE, EVENTS_KEEP, EVENTS_MAX_BYTES, append_event, now_iso
from epdctl.errors import EXIT_RUNTIME, EXIT_USAGE, EpdctlError
from epdctl.plan import Plan, ProcessSpec
from epdctl.ports import busy_ports
from epdctl.run.restart import RestartBook
from epdctl.run.state import (
    INSTANCE_ENV, RUN_ENV, StateDir, is_alive, is_up, list_state_dirs, new_run_token, processes_of_topology,
    tagged_processes, tagged_topologies, verified_process, write_json_atomic,
)
from epdctl.run.teardown import stop_processes

LOG_TAIL_LINES = 20
DEFAULT_GRACE_S = 10.0
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


# ---------------------------------------------------------------- the seam (DESIGN §7.8)


class Runtime:
    """Subprocess, clock and HTTP in one place, so unit tests can fake them."""

    def spawn(self, argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
        with open(log_path, "ab", buffering=0) as log:
            return subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True,
            )

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def probe(self, url: str, timeout: float = 1.0) -> bool:
        """GET url/health → 200?"""
        parsed = urlparse(url)
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()


# ---------------------------------------------------------------- children


@dataclass
class Child:
    spec: ProcessSpec
    log_path: Path
    popen: Optional[subprocess.Popen] = None
    pid: Optional[int] = None
    create_time: Optional[float] = None
    # pending | starting | healthy | unhealthy | restarting | failed | exited
    state: str = "pending"
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

    def __post_init__(self) -> None:
        self.book = self.book or RestartBook(self.spec.restart)

    def set_state(self, state: str) -> None:
        if state != self.state:
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
        }


def tail_lines(path: Path, count: int = LOG_TAIL_LINES) -> list[str]:
    return logfiles.tail_lines(path, count)


def describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "exited (exit code unknown: it was adopted, not started, by this supervisor)"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


# ---------------------------------------------------------------- progress output


class Progress:
    """A live table on a TTY; plain lines otherwise (or with NO_COLOR)."""

    def __init__(self, children: list[Child], runtime: Runtime, stream=None):
        self.children = children
        self.runtime = runtime
        self.stream = stream or sys.stdout
        self.fancy = logfiles.wants_colour(self.stream)
        self.live = None
        self._said: dict[str, str] = {}

    def __enter__(self) -> "Progress":
        if self.fancy:
            from rich.console import Console
            from rich.live import Live

            self.live = Live(self._table(), console=Console(file=self.stream), refresh_per_second=8, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.update(self._table())
            self.live.__exit__(*exc)

    def _table(self):
        from rich.table import Table

        table = Table(title="epdctl up", title_justify="left")
        for column in ("instance", "role", "devices", "port", "state", "waited"):
            table.add_column(column)
        now = self.runtime.now()
        colors = {"healthy": "green", "exited": "red", "starting": "yellow", "unhealthy": "red", "failed": "red",
                  "restarting": "yellow"}
        for child in self.children:
            waited = child.healthy_after_s if child.healthy_after_s is not None else (now - child.started_at if child.started_at else 0)
            table.add_row(
                child.spec.name, child.spec.role, ",".join(map(str, child.spec.devices)) or "-", str(child.spec.port),
                f"[{colors.get(child.state, 'white')}]{child.state}[/]", f"{waited:.1f}s",
            )
        return table

    def update(self) -> None:
        if self.live is not None:
            self.live.update(self._table())
            return
        for child in self.children:
            if self._said.get(child.spec.name) == child.state:
                continue
            self._said[child.spec.name] = child.state
            line = self._line(child)
            if line:
                print(f"{child.spec.name}: {line}", file=self.stream, flush=True)

    @staticmethod
    def _line(child: Child) -> Optional[str]:
        if child.state == "healthy":
            if child.adopted or child.healthy_after_s is None:
                return f"healthy (adopted, pid {child.pid}) at {child.spec.url}"
            return f"healthy after {child.healthy_after_s:.1f}s at {child.spec.url}"
        if child.state == "starting":
            verb = "adopted" if child.adopted else "started"
            return f"{verb} (pid {child.pid}), waiting for {child.spec.url}/health"
        if child.state == "restarting":
            return f"{(child.last_exit or {}).get('how', 'exited')}; restarting it"
        if child.state in ("exited", "failed") and child.error:
            return child.error
        return None


# ---------------------------------------------------------------- the supervisor


class Stop(Exception):
    """A signal asked us to stop."""

    def __init__(self, signum: int):
        self.signum = signum


class StartFailed(EpdctlError):
    """Start-up failed: `cause` first, then (once torn down) what the teardown did, then `detail`."""

    def __init__(self, cause: str, detail: str = ""):
        super().__init__(cause + (f"\n{detail}" if detail else ""))
        self.cause = cause
        self.detail = detail


def _timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


@dataclass
class Supervisor:
    plan: Plan
    state_dir: StateDir
    mode: str  # foreground | detached
    source: str = ""
    runtime: Runtime = field(default_factory=Runtime)
    out: Any = None

    def __post_init__(self) -> None:
        self.out = self.out or sys.stdout
        self.run_token = new_run_token(self.plan.name)
        self.children = [Child(spec, self.state_dir.log_file(spec.name)) for spec in self.plan.processes]
        self.phase = "starting"
        self.error: Optional[str] = None
        self.failure: Optional[dict[str, Any]] = None  # cause, teardown lines, detail: for `up -d` to show
        self.claimed: dict[str, bool] = {}  # shared folder -> created by this run
        self.signals: list[int] = []
        self.handed_over = False  # `epdctl down` took over the teardown
        self.adopted = False

    # ------------------------------------------------------------ state, events, notes

    def save(self) -> None:
        if self.handed_over:
            return  # `epdctl down` owns the state now and removes it
        me = psutil.Process()
        state = {
            "name": self.plan.name, "source": self.source, "run_token": self.run_token, "phase": self.phase,
            "error": self.error, "failure": self.failure, "state_dir": str(self.state_dir.path),
            "supervisor": {"pid": me.pid, "create_time": me.create_time(), "mode": self.mode},
            "storage": [{"path": path, "created": created} for path, created in self.claimed.items()],
            "processes": [child.record() for child in self.children],
            "health_timeout_s": self.plan.health_timeout_s,
        }
        try:
            if not self.state_dir.verify():
                # Someone removed the state folder under a running topology: put it back, so
                # `status` and `down` keep working (`down` also finds us by tag without it).
                self.state_dir.ensure()
                if self.mode == "detached":  # our log went with the folder: start a new one
                    _redirect_stdio(self.state_dir.log_file("supervisor"))
                self.note(f"the state folder {self.state_dir.path} was removed; recreated it")
            write_json_atomic(self.state_dir.state_file, state)
        except (OSError, EpdctlError) as exc:
            # Supervising matters more than recording: a state write that fails must not
            # orphan every child by killing the supervisor.
            self.note(f"cannot write {self.state_dir.state_file}: {exc}")

    def note(self, message: str, stream=None) -> None:
        """A decision or event, in the supervisor's log (detached) or on the terminal."""
        stamp = f"{_timestamp()} " if self.mode == "detached" else ""
        if self.mode == "detached" and stream is None and not os.path.isdir(self.state_dir.path):
            self.save()  # recreates the folder, and our log in it, before we write to it
        print(f"{stamp}epdctl: {message}", file=self._report_stream(stream), flush=True)

    def _report_stream(self, stream=None):
        """`stream`, or our output; stderr once our output's reader has left (`up | head`): what
        the supervisor decides and how the teardown went still reach the terminal."""
        out = stream or self.out
        return sys.stderr if getattr(out, "gone", False) else out

    def event(self, child: Child, event: str, **detail: Any) -> None:
        append_event(self.state_dir.path / EVENTS_FILE, child.spec.name, event, pid=child.pid, **detail)

    # ------------------------------------------------------------ signals

    def install_signals(self) -> None:
        def on_signal(signum, frame):
            self.signals.append(signum)

        def on_handover(signum, frame):
            self.handed_over = True

        for sig in SIGNAL_EXIT:
            signal.signal(sig, on_signal)
        signal.signal(signal.SIGUSR1, on_handover)

    def check_signals(self) -> None:
        if self.handed_over:
            raise Stop(signal.SIGUSR1)
        if self.signals:
            raise Stop(self.signals[0])

    # ------------------------------------------------------------ start

    def claim_storage(self) -> None:
        for path in self.plan.storage_paths:
            self.claimed[path] = storage.claim(path, self.run_token)

    def renew_storage(self) -> None:
        """Adopting: the dead supervisor's leases become ours, or another topology's `down` takes
        them for stale and deletes a folder our instances still use."""
        for path, created in self.claimed.items():
            try:
                self.claimed[path] = storage.claim(path, self.run_token) or created
            except EpdctlError as exc:
                self.note(f"cannot renew the lease on {path}: {exc}")

    def spawn(self, child: Child, fresh_log: bool) -> None:
        """Start (or restart) one child: same argv, env, devices and ports every time."""
        spec = child.spec
        env = {**{k: v for k, v in os.environ.items() if k not in (RUN_ENV, INSTANCE_ENV)},
               **spec.env, RUN_ENV: self.run_token, INSTANCE_ENV: spec.name}
        if fresh_log:
            child.log_path.write_bytes(b"")
        child.error, child.adopted = None, False
        try:
            child.popen = self.runtime.spawn(list(spec.argv), env, child.log_path)
        except FileNotFoundError:
            child.error = f"cannot start {spec.argv[0]!r}: command not found"
        except PermissionError:
            child.error = f"cannot start {spec.argv[0]!r}: permission denied"
        except OSError as exc:
            child.error = f"cannot start {spec.argv[0]!r}: {exc.strerror or exc}"
        if child.error:
            child.set_state("exited")
            hint = ""
            if "not found" in child.error:
                hint = (" (is vLLM installed? set vllm_command in the topology)" if spec.role != "proxy" else
                        " (pip install 'epdctl[router]', or proxy.impl: epdctl)" if "vllm-router" in spec.argv[0] else "")
            raise StartFailed(f"{spec.name}: {child.error}{hint}")
        child.pid, child.running, child.exit_code = child.popen.pid, True, None
        try:
            child.create_time = psutil.Process(child.pid).create_time()
        except psutil.NoSuchProcess:
            child.create_time = None
        child.started_at = child.next_probe = self.runtime.now()
        child.healthy_after_s = None
        child.set_state("starting")
        self.event(child, "started")
        self.save()  # recorded before anything else can go wrong

    def wait_healthy(self, timeout: float, progress: Progress) -> None:
        """Gate on GET /health of every child; a dead child or the deadline fails at once."""
        deadline = self.runtime.now() + timeout
        interval = self.plan.health_interval_s
        while True:
            self.check_signals()
            pending = [c for c in self.children if c.state != "healthy"]
            if not pending:
                return
            # One that was healthy and died while others start fails the start too (not the
            # deadline of whoever waits on it, e.g. the proxy for a dead PD).
            dead = [c for c in self.children if c.state == "healthy" and c.check_exit()]
            for child in dead + pending:
                if child.state != "healthy" and self.runtime.probe(child.spec.url):
                    self._became_healthy(child)
                    continue
                if child in dead or child.check_exit():
                    child.set_state("exited")
                    self.event(child, "exited", how=child.last_exit["how"], during="start-up")
                    self.save()
                    raise StartFailed(f"{child.spec.name} {describe_exit(child.exit_code)} during start-up",
                                      self._log_tail(child))
            progress.update()
            if all(c.state == "healthy" for c in self.children):
                return
            if self.runtime.now() >= deadline:
                slow = [c for c in self.children if c.state != "healthy"]
                names = ", ".join(f"{c.spec.name} (no 200 from {c.spec.url}/health)" for c in slow)
                raise StartFailed(f"not healthy after {timeout:g}s: {names}", self._log_tail(slow[0]))
            self.runtime.sleep(interval)

    def _became_healthy(self, child: Child) -> None:
        child.set_state("healthy")
        if child.adopted:
            self.event(child, "healthy", adopted=True)
        else:
            child.healthy_after_s = self.runtime.now() - child.started_at
            self.event(child, "healthy", after_s=round(child.healthy_after_s, 3))
        if self.mode == "detached" or self.phase != "starting":
            self.note(f"{child.spec.name} {Progress._line(child)}")
        self.save()

    def _log_tail(self, child: Child) -> str:
        lines = tail_lines(child.log_path)
        header = f"--- last {len(lines)} lines of {child.log_path} ---"
        return "\n".join([header] + [f"{child.spec.name} | {line}" for line in lines])

    def start(self, timeout: float, progress_stream=None) -> None:
        """Ports, shared folders, spawn, health gate. On any failure: tear down, then raise."""
        try:
            check_ports(self.plan)  # again: `up` checked before the lock, but a port can go since
            self.claim_storage()
        except EpdctlError as exc:
            self.release_storage()
            self.phase, self.error = "failed", str(exc).splitlines()[0]
            self.failure = {"cause": str(exc), "teardown": [], "detail": ""}
            self.save()  # nothing was started; `down` removes this state (and the lock file)
            raise
        self.save()
        progress = Progress(self.children, self.runtime, progress_stream or self.out)
        try:
            with progress:
                for child in self.children:
                    self.spawn(child, fresh_log=True)
                progress.update()
                self.wait_healthy(timeout, progress)
        except BaseException as exc:
            if self.handed_over:
                self._await_handover()
                raise Stop(signal.SIGUSR1) from None
            self.phase = "failed"
            # Anything but a signal is a failed start, a bug of ours included: its cause, state
            # and logs are kept (an "interrupted" teardown removed them, and `up -d` then said
            # only "the supervisor exited with code 1").
            failed_start = not isinstance(exc, (Stop, KeyboardInterrupt, SystemExit))
            # One header line with the cause, then the teardown report, then the log tail.
            # In the foreground a failure goes to stderr; in the detached supervisor, to its log.
            report = self.out if self.mode == "detached" or not failed_start else sys.stderr
            if failed_start:
                cause = (exc.cause if isinstance(exc, StartFailed) else str(exc) if isinstance(exc, EpdctlError)
                         else f"internal error: {type(exc).__name__}: {exc}")
                self.error = cause.splitlines()[0]
                self.note(f"{cause}; stopping {self.plan.name}", report)
            else:
                name = signal.Signals(exc.signum).name if isinstance(exc, Stop) else type(exc).__name__
                self.error = f"interrupted ({name})"
                self.note(f"{name} received, stopping {self.plan.name}", report)
            # A failed start keeps its logs and state for `epdctl logs`/`status`; an interrupt leaves nothing.
            lines = self.teardown(grace=2.0 if failed_start else DEFAULT_GRACE_S, remove_state=not failed_start,
                                  report=report)
            if failed_start:
                detail = exc.detail if isinstance(exc, StartFailed) else ""
                if detail:
                    print(detail, file=report, flush=True)
                self.failure = {"cause": self.error, "teardown": lines, "detail": detail}
                self.save()
            raise
        self.phase = "running"
        self.save()
        if self.mode == "detached":
            self.note(f"{self.plan.name} is up")

    def adopt(self, state: dict[str, Any]) -> None:
        """Take over the processes of a run whose supervisor died (pid and create_time checked)."""
        self.run_token = state["run_token"]
        self.claimed = {f["path"]: bool(f.get("created")) for f in state.get("storage") or [] if f.get("path")}
        self.renew_storage()
        records = {r["name"]: r for r in state.get("processes", [])}
        now = self.runtime.now()
        for child in self.children:
            record = records[child.spec.name]
            child.pid, child.create_time = record.get("pid"), record.get("create_time")
            child.exit_code, child.last_exit = record.get("exit_code"), record.get("last_exit")
            child.error = record.get("error")
            child.book.restarts = int(record.get("restarts") or 0)
            child.running = verified_process(child.pid, child.create_time) is not None
            # Nothing of the dead supervisor's record is shown as now: a live one is probed again,
            # and one that died while nobody watched goes to its restart policy.
            child.adopted = child.running
            child.started_at = child.next_probe = now
            child.set_state("starting" if child.running else record.get("state") or "exited")
            self.event(child, "adopted", alive=child.adopted)
            if not child.running and child.state in ("starting", "healthy", "unhealthy", "restarting"):
                child.running = True
                child.check_exit()
                self._on_exit(child, now)
        self.adopted = True
        self.phase = "adopting"
        self.save()
        alive = sum(1 for c in self.children if c.adopted)
        self.note(f"adopted {alive} running process(es) of {self.plan.name} (run {self.run_token})")

    def _report_adoption(self) -> None:
        down = [c for c in self.children if c.state != "healthy"]
        self.note(f"{self.plan.name} is up" if not down else f"{self.plan.name} is up, degraded: "
                  + "; ".join(f"{c.spec.name} {Progress._line(c) or c.state}" for c in down))

    # ------------------------------------------------------------ after start: heal

    def run(self, stream_logs: bool) -> int:
        """Supervise until a signal, `down`, or (foreground) a role that can never serve again.

        Deaths are handled by each process's restart policy; a restarted process is health-gated
        again here, without blocking the others. Returns the exit code.
        """
        tailer = LogTailer(self.children, self.out) if stream_logs else None
        next_rotation = 0.0
        while True:
            if tailer:
                tailer.pump()
            if self.handed_over:
                return self._await_handover()
            if self.signals:
                signum = self.signals[0]
                self.note(f"{signal.Signals(signum).name} received, stopping {self.plan.name}")
                self.teardown(grace=DEFAULT_GRACE_S)
                return SIGNAL_EXIT[signum] if self.mode == "foreground" else 0
            now = self.runtime.now()
            changed = False
            for child in self.children:
                changed |= self._tend(child, now)
            if changed or self.phase == "adopting":  # adopting: every process was looked at once now
                adopting = self.phase == "adopting"
                self.phase = "running" if all(c.state == "healthy" for c in self.children) else "degraded"
                self.save()
                if adopting:
                    self._report_adoption()
            hopeless = self._role_that_cannot_serve()
            if hopeless and self.mode == "foreground":
                if tailer:
                    tailer.pump()
                self.phase, self.error = "failed", f"no {hopeless} instance can serve any more"
                self.save()
                self.note(f"{self.error}; stopping {self.plan.name}", sys.stderr)
                self.teardown(grace=DEFAULT_GRACE_S, remove_state=False)
                return EXIT_RUNTIME
            if all(c.state in ("exited", "failed") for c in self.children):
                self.phase = "stopped"
                self.save()
                self.note(f"every process of {self.plan.name} has exited; the supervisor ends")
                return 0
            if now >= next_rotation:
                self._rotate_logs()
                next_rotation = now + 1.0
            self.runtime.sleep(0.1)

    def _tend(self, child: Child, now: float) -> bool:
        """One look at one child: an exit, a due restart, or a health probe. Returns if it changed."""
        if child.state in ("starting", "healthy", "unhealthy") and child.check_exit():
            self._on_exit(child, now)
            return True
        if child.state == "restarting" and child.restart_at is not None and now >= child.restart_at:
            self._restart(child, now)
            return True
        if child.state == "starting" and now >= child.next_probe:
            child.next_probe = now + self.plan.health_interval_s
            if self.runtime.probe(child.spec.url, timeout=0.5):
                self._became_healthy(child)
                return True
        return False

    def _on_exit(self, child: Child, now: float) -> None:
        how = describe_exit(child.exit_code)
        self._kill_leftovers(child)
        decision = child.book.decide(child.exit_code, now)
        self.event(child, "exited", how=how, code=child.exit_code)
        if decision.action == "restart":
            child.restart_at = now + decision.delay_s
            child.set_state("restarting")
            self.event(child, "restarting", in_s=decision.delay_s, reason=decision.reason)
            self.note(f"{child.spec.name} (pid {child.pid}) {how}; restarting it in {decision.delay_s:g}s "
                      f"({decision.reason})", sys.stderr if self.mode == "foreground" else None)
            return
        child.set_state(decision.action)
        child.error = f"{how}; not restarted: {decision.reason}"
        self.event(child, decision.action, reason=decision.reason)
        left = sum(1 for c in self.children if c.state not in ("exited", "failed"))
        tail = "\n".join(f"  {child.spec.name} | {line}" for line in tail_lines(child.log_path, 5))
        self.note(f"{child.spec.name} (pid {child.pid}) {how}; not restarting it: {decision.reason}; "
                  f"{left} of {len(self.children)} processes still running\n{tail}",
                  sys.stderr if self.mode == "foreground" else None)

    def _restart(self, child: Child, now: float) -> None:
        child.book.restarted(now)
        child.restart_at = None
        marker = (f"\n----- epdctl: {_timestamp()} restarting {child.spec.name} "
                  f"(restart {child.book.restarts}; last {describe_exit(child.exit_code)}) -----\n")
        try:
            with open(child.log_path, "ab") as log:
                log.write(marker.encode())
        except OSError:
            pass
        try:
            self.spawn(child, fresh_log=False)
        except StartFailed as exc:
            child.set_state("failed")
            self.event(child, "failed", reason=str(exc))
            self.note(f"{exc}; not restarting it again")
            return
        self.event(child, "restarted", restarts=child.book.restarts)
        self.note(f"{child.spec.name} restarted (pid {child.pid}, restart {child.book.restarts})")

    def _kill_leftovers(self, child: Child) -> None:
        """A dead instance's own children (vLLM's EngineCore, workers) must not outlive it: they
        hold its device memory and the restarted instance would fail for lack of it."""
        # Found by their tags (ours: this run, this instance, our uid), not by the dead leader's
        # process group, whose id could already belong to someone else.
        leftovers = [p for p in tagged_processes(self.run_token) if _instance_of(p) == child.spec.name]
        for proc in leftovers:
            try:
                proc.kill()
            except psutil.Error:
                pass

    def _role_that_cannot_serve(self) -> Optional[str]:
        """A role (or the proxy) whose every instance has exited or failed for good."""
        roles: dict[str, list[Child]] = {}
        for child in self.children:
            roles.setdefault(child.spec.role, []).append(child)
        for role, members in roles.items():
            if all(c.state in ("exited", "failed") for c in members):
                return role
        return None

    def _rotate_logs(self) -> None:
        bounds = [(path, self.plan.log_max_bytes, self.plan.log_keep)
                  for path in [c.log_path for c in self.children] + [self.state_dir.log_file("supervisor")]]
        for path, max_bytes, keep in bounds + [(self.state_dir.path / EVENTS_FILE, EVENTS_MAX_BYTES, EVENTS_KEEP)]:
            try:
                logfiles.rotate_if_needed(path, max_bytes, keep)
            except OSError as exc:
                self.note(f"cannot rotate {path}: {exc.strerror or exc}")

    def _await_handover(self) -> int:
        """`epdctl down` is stopping our children; reap them so none lingers as a zombie."""
        deadline = self.runtime.now() + 120
        while self.runtime.now() < deadline and any(c.running and not c.check_exit() for c in self.children):
            self.runtime.sleep(0.05)
        self.note(f"{self.plan.name} stopped by `epdctl down`")
        return 0

    def release_storage(self) -> list[str]:
        lines = [storage.release(path, self.run_token) for path in self.claimed]
        self.claimed = {}
        return [line for line in lines if line]

    def teardown(self, grace: float, remove_state: bool = True, report=None) -> list[str]:
        """Stop everything; print (to `report`, default our output) and return the report lines."""
        previous = self.phase
        self.phase = "stopping"
        self.save()
        records = [c.record() for c in self.children if c.pid]
        count = len(self.signals)
        stopped = stop_processes(
            records, self.run_token, grace,
            hurry=lambda: len(self.signals) > count,
            reap=lambda: [c.check_exit() for c in self.children],
        )
        lines = stopped.lines()
        for child in self.children:
            child.check_exit()
        if not stopped.clean:
            self.phase = "stopping"
            self.error = "some processes survived SIGKILL; run `epdctl down` again"
            self.save()
        else:
            lines += self.release_storage()
        for line in lines:
            print(f"  {line}", file=self._report_stream(report), flush=True)
        if not stopped.clean:
            return lines
        if remove_state:
            self.state_dir.remove()
        else:
            self.phase = "failed" if previous in ("failed", "starting") else "stopped"
            self.save()
        return lines


def _instance_of(proc: psutil.Process) -> Optional[str]:
    try:
        return proc.environ().get(INSTANCE_ENV)
    except psutil.Error:
        return None


def check_ports(plan: Plan) -> None:
    def what(spec: ProcessSpec, port: int) -> str:
        if port == spec.port:
            return spec.name
        if port == spec.metrics_port:
            return f"{spec.name}'s metrics"
        return f"{spec.name}'s NIXL side channel" if port == spec.side_channel_port else f"{spec.name}'s EC port"

    problems = busy_ports((port, what(spec, port)) for spec in plan.processes for port in spec.ports())
    if len(problems) == 1:
        raise EpdctlError(problems[0])
    if problems:
        raise EpdctlError("\n".join([f"epdctl: {plan.name}: planned ports are in use:"] + [f"  {p}" for p in problems]))


class LogTailer:
    """Compose-style `name | line` streaming of every child's log file (rotation included)."""

    COLORS = ("36", "33", "35", "32", "34", "31")

    def __init__(self, children: list[Child], out):
        self.children = children
        self.out = out
        width = max(len(c.spec.name) for c in children)
        color = logfiles.wants_colour(out)
        self.followers = {c.spec.name: logfiles.Follower(c.log_path, colour=color) for c in children}
        self.prefix = {}
        for i, child in enumerate(children):
            label = f"{child.spec.name:<{width}} | "
            self.prefix[child.spec.name] = f"\033[{self.COLORS[i % len(self.COLORS)]}m{label}\033[0m" if color else label

    def pump(self) -> None:
        for name, follower in self.followers.items():
            for line in follower.read_lines():
                self.out.write(self.prefix[name] + line + "\n")
        self.out.flush()


# ---------------------------------------------------------------- `epdctl up`


def _refuse_if_running(state_dir: StateDir) -> None:
    state = state_dir.read()
    if state_dir.is_locked():
        sup = (state or {}).get("supervisor", {})
        raise EpdctlError(
            f"topology {state_dir.name!r} is already up (supervisor pid {sup.get('pid', '?')}); "
            f"`epdctl down {state_dir.name}` first", EXIT_USAGE,
        )
    if state:
        alive = [p["name"] for p in state.get("processes", []) if verified_process(p.get("pid"), p.get("create_time"))]
        if alive:
            raise EpdctlError(
                f"topology {state_dir.name!r} still has running processes ({', '.join(alive)}) from an earlier up; "
                f"`epdctl down {state_dir.name}` first", EXIT_USAGE,
            )
    strays = processes_of_topology(state_dir.name)
    if strays:
        count = sum(len(p) for p in strays.values())
        raise EpdctlError(
            f"topology {state_dir.name!r} has {count} running process(es) of an earlier up whose state is gone; "
            f"`epdctl down {state_dir.name}` finds them by their {RUN_ENV} tag", EXIT_USAGE,
        )


def _refuse_nested_storage(plan: Plan) -> None:
    """A shared folder inside (or around) one of another running topology's is refused: the `down`
    of the outer one would otherwise find the inner one in use and have to keep its folder. The
    very same folder is shared through leases. (Topologies of another state root or user are not
    seen here; `storage.release` still never deletes a folder with one in use beneath it.)"""
    mine = [storage.normal(path) for path in plan.storage_paths]
    for other in list_state_dirs():
        try:
            state = other.read() if other.name != plan.name else None
        except EpdctlError:
            continue
        if not state or not (other.is_locked() or any(
                verified_process(p.get("pid"), p.get("create_time")) for p in state.get("processes", []))):
            continue
        for theirs in (f.get("path") for f in state.get("storage") or []):
            for path in mine if isinstance(theirs, str) else ():
                relation = _nesting(path, theirs)
                if relation:
                    raise EpdctlError(f"shared_storage_path: {path} is {relation} {theirs}, the shared folder of "
                                      f"running topology {other.name!r}; use that very folder, or one outside it")


def _nesting(path: str, other: str) -> Optional[str]:
    """'inside' or 'around' when one folder contains the other (links resolved), else None."""
    a, b = os.path.realpath(path), os.path.realpath(other)
    if a == b:
        return None
    if os.path.commonpath([a, b]) == b:
        return "inside"
    return "around" if os.path.commonpath([a, b]) == a else None


def _adoptable(state_dir: StateDir, plan: Plan) -> Optional[dict[str, Any]]:
    """The state of a run of this same plan whose supervisor is gone but whose processes live.

    `up` then takes them over instead of refusing (or starting a second copy on busy ports).
    """
    if state_dir.is_locked():
        return None  # its supervisor is alive: `_refuse_if_running` says so
    state = state_dir.read()
    if not state or not state.get("run_token"):
        return None
    records = {r.get("name"): r for r in state.get("processes", [])}
    if not any(verified_process(r.get("pid"), r.get("create_time")) for r in records.values()):
        return None
    same = set(records) == {s.name for s in plan.processes} and all(
        records[s.name].get("argv") == list(s.argv) and records[s.name].get("env") == dict(s.env)
        for s in plan.processes
    )
    if not same:
        raise EpdctlError(
            f"topology {plan.name!r} is running without its supervisor, from a different plan than this file's; "
            f"`epdctl down {plan.name}` first", EXIT_USAGE,
        )
    return state


def up(topology, plan: Plan, *, detach: bool, wait_timeout: Optional[float], source: Path) -> int:
    state_dir = StateDir(plan.name)
    adopt = _adoptable(state_dir, plan)
    if adopt is None:
        _refuse_if_running(state_dir)
        check_ports(plan)  # before the lock: a busy port leaves nothing behind
        _refuse_nested_storage(plan)
    lock_fd = state_dir.try_lock()
    if lock_fd is None:
        _refuse_if_running(state_dir)
        raise EpdctlError(f"topology {plan.name!r} is being started by another epdctl", EXIT_USAGE)
    if adopt is None:
        state_dir.remove_logs()
    timeout = wait_timeout if wait_timeout is not None else plan.health_timeout_s
    source_path = os.path.abspath(source)  # read later from other folders (`calibrate --twin`)
    if detach:
        return _up_detached(plan, state_dir, lock_fd, timeout, source_path, adopt)
    return _up_foreground(plan, state_dir, timeout, source_path, adopt)


def _up_foreground(plan: Plan, state_dir: StateDir, timeout: float, source: str,
                   adopt: Optional[dict[str, Any]] = None) -> int:
    with _output_that_may_close(plan.name, state_dir):
        return _supervise_foreground(plan, state_dir, timeout, source, adopt)


@contextlib.contextmanager
def _output_that_may_close(name: str, state_dir: StateDir):
    """Stdout and stderr whose reader may leave (`up | head`, `up | tee` ended by Ctrl-C, a closed
    terminal): then printing stops, and supervising goes on until a signal or `epdctl down`."""
    from epdctl.pipes import ReaderTolerant

    def stdout_closed() -> None:
        append_event(state_dir.path / EVENTS_FILE, "supervisor", "output-closed", pid=os.getpid())
        print(f"epdctl: the reader of the output left; {name} is still supervised and its logs are no longer "
              f"printed (Ctrl-C or `epdctl down {name}` stops it)", file=sys.stderr, flush=True)

    real = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = ReaderTolerant(real[0], stdout_closed), ReaderTolerant(real[1])
    try:
        yield
    finally:
        sys.stdout, sys.stderr = real


def _supervise_foreground(plan: Plan, state_dir: StateDir, timeout: float, source: str,
                          adopt: Optional[dict[str, Any]]) -> int:
    sup = Supervisor(plan, state_dir, "foreground", source=source)
    sup.install_signals()
    if adopt:
        sup.adopt(adopt)
    else:
        try:
            sup.start(timeout)
        except Stop as stop:
            return SIGNAL_EXIT.get(stop.signum, 0)
        except EpdctlError as exc:
            if not sup.failure or not sup.failure.get("teardown"):
                raise  # nothing was started: the CLI prints the one-line cause
            return exc.exit_code  # cause, teardown and log tail are already on stderr
    print(f"epdctl: {plan.name} {'is being adopted' if adopt else 'is up'}: proxy at {plan.proxy.url} "
          "(Ctrl-C stops it; logs follow)", flush=True)
    return sup.run(stream_logs=True)


# The detached supervisor's exit codes, read by the `up -d` that forked it.
DAEMON_OK, DAEMON_FAILED, DAEMON_HANDED_OVER = 0, 1, 3


def _up_detached(plan: Plan, state_dir: StateDir, lock_fd: int, timeout: float, source: str,
                 adopt: Optional[dict[str, Any]] = None) -> int:
    if adopt is None:
        state_dir.state_file.unlink(missing_ok=True)
    # The supervisor is a fork of this process, not a new interpreter: it starts with the plan
    # and every module already loaded, which saves a Python start-up on every `up -d`.
    sys.stdout.flush()
    sys.stderr.flush()
    daemon = os.fork()
    if daemon == 0:  # the supervisor: its own session, its log as stdout, the lock held
        code = DAEMON_FAILED
        try:
            os.setsid()
            _redirect_stdio(state_dir.log_file("supervisor"))
            code = _supervise_detached(plan, state_dir, lock_fd, timeout, source, adopt)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(lock_fd)  # the supervisor holds the lock now

    runtime = Runtime()
    shown: list[Child] = [Child(spec, state_dir.log_file(spec.name)) for spec in plan.processes]
    interrupted: list[int] = []

    def on_signal(signum, frame):
        interrupted.append(signum)

    # Only while we wait: `smoke` goes on in this process, and must get its Ctrl-C back.
    previous = {sig: signal.signal(sig, on_signal) for sig in SIGNAL_EXIT}
    try:
        phase = _watch_start(daemon, state_dir, shown, runtime, interrupted)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if interrupted:
        return SIGNAL_EXIT[interrupted[0]]
    down = ", ".join(c.spec.name for c in shown if c.state != "healthy")
    what = f"is up, degraded ({down} not healthy)" if phase == "degraded" else "is up"
    print(f"epdctl: {plan.name} {what}: proxy at {plan.proxy.url} (`epdctl status {plan.name}`, `epdctl down {plan.name}`)")
    return 0


def _watch_start(daemon: int, state_dir: StateDir, shown: list[Child], runtime: Runtime,
                 interrupted: list[int]) -> Optional[str]:
    """Show the supervisor's progress until everything is healthy (or, adopting, every process was
    looked at), it fails, or we are interrupted. Returns the phase it reached."""
    with Progress(shown, runtime) as progress:
        while True:
            if interrupted:
                name = signal.Signals(interrupted[0]).name
                print(f"epdctl: {name} received, stopping {state_dir.name}", flush=True)
                os.kill(daemon, signal.SIGTERM)  # the supervisor tears down what it started
                os.waitpid(daemon, 0)
                for line in _teardown_lines(state_dir):
                    print(f"  {line}", flush=True)
                return None
            state = state_dir.read() or {}
            if (state.get("supervisor") or {}).get("pid") != daemon:
                state = {}  # a dead supervisor's state, until the one adopting its processes writes its own
            by_name = {p["name"]: p for p in state.get("processes", [])}
            for child in shown:
                record = by_name.get(child.spec.name)
                if record:
                    child.state, child.pid = record["state"], record["pid"]
                    child.healthy_after_s, child.adopted = record.get("healthy_after_s"), bool(record.get("adopted"))
                    child.error, child.last_exit = record.get("error"), record.get("last_exit")
                    if not child.started_at and child.state == "starting":
                        child.started_at = runtime.now()
            progress.update()
            if state.get("phase") in ("running", "degraded"):
                return state["phase"]
            pid, status = os.waitpid(daemon, os.WNOHANG)
            if pid:
                progress.update()
                raise _daemon_failure(state_dir, os.waitstatus_to_exitcode(status))
            runtime.sleep(0.05)


def _teardown_lines(state_dir: StateDir) -> list[str]:
    """What the supervisor's last teardown reported, from its log (the state is gone by then)."""
    return [line.strip() for line in tail_lines(state_dir.log_file("supervisor"), 200) if line.startswith("  ")]


def _daemon_failure(state_dir: StateDir, code: int) -> EpdctlError:
    """The detached supervisor ended before `running`: the cause first, then its teardown report."""
    if code == DAEMON_HANDED_OVER:
        return EpdctlError(f"up of {state_dir.name} was cut short by `epdctl down`")
    failure = (state_dir.read() or {}).get("failure")
    if failure:
        if not failure.get("teardown") and not failure.get("detail"):
            return EpdctlError(failure["cause"])  # one line: the CLI prefixes it
        lines = [f"epdctl: {failure['cause']}; stopped {state_dir.name}"]
        lines += [f"  {line}" for line in failure.get("teardown", [])]
        if failure.get("detail"):
            lines.append(failure["detail"])
        return EpdctlError("\n".join(lines))
    daemon_log = "\n".join(tail_lines(state_dir.log_file("supervisor"), 200)).strip()
    return EpdctlError(f"the supervisor exited with code {code}" + (f"; its log:\n{daemon_log}" if daemon_log else ""))


def _redirect_stdio(log_path: Path) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(devnull)
    os.close(log)


def _supervise_detached(plan: Plan, state_dir: StateDir, lock_fd: int, timeout: float, source: str,
                        adopt: Optional[dict[str, Any]] = None) -> int:
    """The detached supervisor's life: start (or fail and clean up), then heal until the end."""
    sup = Supervisor(plan, state_dir, "detached", source=source)
    sup.install_signals()
    if adopt:
        sup.adopt(adopt)
    else:
        sup.note(f"supervising {plan.name} (pid {os.getpid()}, run {sup.run_token})")
        try:
            sup.start(timeout, progress_stream=open(os.devnull, "w"))
        except Stop as stop:
            return DAEMON_HANDED_OVER if stop.signum == signal.SIGUSR1 else DAEMON_FAILED
        except EpdctlError:
            return DAEMON_FAILED  # the cause and the teardown report are in the state and our log
    code = sup.run(stream_logs=False)
    os.close(lock_fd)
    return code


# ---------------------------------------------------------------- `epdctl down`


def resolve_name(target: Optional[str]) -> Optional[str]:
    """A topology name from a NAME, a FILE (its `name:`), or (None) the only one that is up.

    A failed start keeps its state for `status` and `logs` but is not up: it is never the default.
    """
    from epdctl.names import topology_name

    if target:
        return topology_name(target)
    up = [d.name for d, state in _states() if is_up(d, state)]
    if len(up) > 1:
        raise EpdctlError(f"several topologies are up ({', '.join(up)}); name one", EXIT_USAGE)
    return up[0] if up else None


def _states() -> list[tuple[StateDir, dict[str, Any]]]:
    return [(d, state) for d in list_state_dirs() if (state := d.read())]


def _nothing_up_lines() -> list[str]:
    """`down` with no NAME and nothing up: what is left that `down NAME` would clear."""
    lines = ["epdctl: nothing to stop"]
    states = _states()
    left = [f"{d.name} ({state.get('phase') or 'stopped'})" for d, state in states]
    if left:
        lines.append(f"  not up, state kept: {', '.join(left)} (`epdctl status` shows why; `epdctl down NAME` clears one)")
    strays = set(tagged_topologies()) - {d.name for d, _ in states}
    if strays:
        lines.append(f"  processes whose state folder is gone: {', '.join(sorted(strays))} (`epdctl down NAME` stops them)")
    return lines


def _missing(name: str) -> EpdctlError:
    """`down NAME` of a name with no state and no processes: a typo is not success."""
    from epdctl.names import did_you_mean

    known = sorted({d.name for d, _ in _states()} | set(tagged_topologies()))
    where = f"; existing topologies: {', '.join(known)}{did_you_mean(name, known)}" if known else "; there is none"
    return EpdctlError(f"no topology named {name!r} is up or has processes left{where} "
                       f"(--ignore-missing: exit 0 for this)", EXIT_RUNTIME)


def down(target: Optional[str], grace: float = DEFAULT_GRACE_S, out=None, ignore_missing: bool = False) -> int:
    out = out or sys.stdout
    if not grace >= 0:  # also refuses NaN
        raise EpdctlError(f"--timeout: the grace period must be 0 or more seconds (got {grace:g})", EXIT_USAGE)
    name = resolve_name(target)
    if name is None:
        print("\n".join(_nothing_up_lines()), file=out)
        return 0
    state_dir = StateDir(name)
    state = state_dir.read()
    if state is None:
        return _down_without_state(state_dir, grace, out, ignore_missing)
    started = time.monotonic()
    supervisor = _hand_over(state.get("supervisor") or {})
    report = stop_processes(state.get("processes", []), state.get("run_token"), grace)
    print(f"epdctl: stopping {name}", file=out)
    for line in report.lines():
        print(f"  {line}", file=out)
    _wait_supervisor(supervisor)
    if not report.clean:
        raise EpdctlError(f"{name}: some processes survived SIGKILL; state kept in {state_dir.path}")
    for folder in state.get("storage") or []:
        line = storage.release(folder.get("path"), state.get("run_token"))
        if line:
            print(f"  {line}", file=out)
    state_dir.remove()
    print(f"epdctl: {name} is down ({time.monotonic() - started:.2f}s)", file=out)
    return 0


def _hand_over(record: dict[str, Any]) -> Optional[psutil.Process]:
    """Tell a live supervisor that `down` is taking over: from then on it only reaps."""
    supervisor = verified_process(record.get("pid"), record.get("create_time"))
    if supervisor is not None and supervisor.pid != os.getpid():
        try:
            supervisor.send_signal(signal.SIGUSR1)
            return supervisor
        except psutil.NoSuchProcess:
            pass
    return None


def _wait_supervisor(supervisor: Optional[psutil.Process]) -> None:
    if supervisor is None:
        return
    # Not `psutil.wait()`: the supervisor is rarely our child, and once it exits it is a zombie
    # until init reaps it, which some containers' init does late. Exited is what matters.
    deadline = time.monotonic() + 3
    while is_alive(supervisor) and time.monotonic() < deadline:
        time.sleep(0.02)
    if is_alive(supervisor):
        try:
            supervisor.kill()
        except psutil.NoSuchProcess:
            pass
    try:  # `smoke` forked it itself: reap it, or it stays a zombie until smoke exits
        os.waitpid(supervisor.pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _down_without_state(state_dir: StateDir, grace: float, out, ignore_missing: bool) -> int:
    """The state is gone (deleted by hand, or a start that failed before writing it).

    Every child carries `EPDCTL_RUN=<name>-<token>`: stop the processes of ours that carry
    one of this topology's tags, and the supervisor that started them (their parent).
    """
    name = state_dir.name
    runs = processes_of_topology(name)
    leftover = state_dir.verify() and not state_dir.is_locked()
    if not runs:
        if leftover:
            state_dir.remove()
            print(f"epdctl: nothing to stop for {name!r}; removed its leftover state folder {state_dir.path}", file=out)
        elif ignore_missing:
            print(f"epdctl: nothing to stop for {name!r}", file=out)
        else:
            raise _missing(name)
        return 0
    started = time.monotonic()
    print(f"epdctl: stopping {name}: its state is gone; found {sum(map(len, runs.values()))} process(es) "
          f"by their {RUN_ENV} tag", file=out)
    clean = True
    for token, procs in runs.items():
        supervisors = _supervisors_of(procs)
        for supervisor in supervisors:
            try:
                supervisor.send_signal(signal.SIGUSR1)
            except psutil.NoSuchProcess:
                pass
        records = [_record_of(proc) for proc in procs]
        folders = _storage_paths_of(procs)  # while they still run: their command lines name them
        report = stop_processes([r for r in records if r], token, grace)
        for line in report.lines():
            print(f"  {line}", file=out)
        clean = clean and report.clean
        for supervisor in supervisors:
            _wait_supervisor(supervisor)
        if report.clean:
            for line in filter(None, (storage.release(path, token) for path in folders)):
                print(f"  {line}", file=out)
    if not clean:
        raise EpdctlError(f"{name}: some processes survived SIGKILL")
    state_dir.remove()
    print(f"epdctl: {name} is down ({time.monotonic() - started:.2f}s)", file=out)
    return 0


def _record_of(proc: psutil.Process) -> Optional[dict[str, Any]]:
    """What `stop_processes` needs of a process found by tag (its group only if it leads one)."""
    try:
        # A process that renamed itself (vllm-router's setproctitle) leaves empty words behind.
        argv = [word for word in proc.cmdline() if word]
        port = next((value for flag, value in zip(argv, argv[1:]) if flag == "--port"), None)
        # Unique per process: stop_processes keys its results by name.
        what = " ".join(argv[1:3] or argv[:1])[:60] or proc.name()
        return {"name": f"{what} on port {port}" if port else f"{what} [{proc.pid}]", "pid": proc.pid,
                "pgid": proc.pid, "create_time": proc.create_time()}
    except psutil.Error:
        return None


def _storage_paths_of(procs: list[psutil.Process]) -> list[str]:
    """The shared folders of a run whose state is gone, from its instances' connector configs."""
    found: dict[str, None] = {}
    for proc in procs:
        try:
            argv = proc.cmdline()
        except psutil.Error:
            continue
        for flag, value in zip(argv, argv[1:]):
            extra_key = {"--ec-transfer-config": "ec_connector_extra_config",
                         "--kv-transfer-config": "kv_connector_extra_config"}.get(flag)
            if not extra_key:
                continue
            try:
                path = json.loads(value)[extra_key]["shared_storage_path"]
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(path, str):
                found[path] = None
    return list(found)


def _supervisors_of(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The epdctl processes that started these children: their live, untagged parents of our user."""
    tagged = {p.pid for p in procs}
    found: dict[int, psutil.Process] = {}
    for proc in procs:
        try:
            parent = proc.parent()
            if parent is None or parent.pid in tagged or parent.pid in (1, os.getpid()):
                continue
            if parent.uids().real == os.getuid() and "epdctl" in " ".join(parent.cmdline()):
                found[parent.pid] = parent
        except psutil.Error:
            continue
    return list(found.values())
