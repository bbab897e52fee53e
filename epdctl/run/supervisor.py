"""Spawn, health gate, fail fast, heal, tear down (docs/design.md, "Style rules", "States").

One `Supervisor` runs a plan. In the foreground it lives in the `epdctl up` process; with
`-d` it lives in a detached fork of `epdctl up` (its own session) that owns (and reaps) the
children while the CLI only watches `state.json` until everything is healthy (`epdctl/up.py`).
After start-up it restarts what exits by each process's restart policy (the decisions are
`restart.py`'s). Every child is recorded in `state.json` (pid + create_time + pgid) the moment
it exists, so SIGKILL of any epdctl process still leaves everything within reach of `epdctl down`.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import psutil

from epdctl.config.simflags import contention_of
from epdctl.errors import EXIT_RUNTIME, EpdctlError
from epdctl.plan import Plan
from epdctl.run import logfiles, storage
from epdctl.run.child import Child, describe_exit
from epdctl.run.events import EVENTS_FILE, EVENTS_KEEP, EVENTS_MAX_BYTES, append_event
from epdctl.run.launch import LocalLauncher, SlurmLauncher
from epdctl.run.logfiles import redirect_stdio
from epdctl.run.preflight import check_ports
from epdctl.run.progress import LogTailer, Progress
from epdctl.run.runtime import Runtime
from epdctl.run.scaler import Scaler
from epdctl.run.state import (
    INSTANCE_ENV, LEDGER_FILE, RUN_ENV, StateDir, new_run_token, tagged_processes, this_host, verified_process,
)
from epdctl.run.states import ALIVE, ENDED, RUNNING_NOW, ProcessState, TopologyPhase
from epdctl.run.teardown import DEFAULT_GRACE_S, stop_processes
from epdctl.run.witness import Witness

LOG_TAIL_LINES = 20
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


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
    topology: Any = None  # the loaded Topology: what `epdctl scale` re-plans from (run/scaler.py)

    def __post_init__(self) -> None:
        self.out = self.out or sys.stdout
        if self.plan.launcher == "slurm" and type(self.runtime.launcher) is LocalLauncher:
            self.runtime = Runtime(launcher=SlurmLauncher(self.plan.slurm_job or "", self.state_dir.step_file,
                                                          sys.executable))
        self.run_token = new_run_token(self.plan.name)
        self.children = [Child(spec, self.state_dir.log_file(spec.name)) for spec in self.plan.processes]
        self.phase = TopologyPhase.STARTING
        self.error: Optional[str] = None
        self.failure: Optional[dict[str, Any]] = None  # cause, teardown lines, detail: for `up -d` to show
        self.claimed: dict[str, bool] = {}  # shared folder -> created by this run
        self.signals: list[int] = []
        self.handed_over = False  # `epdctl down` took over the teardown
        if self.state_dir.verify():
            self.state_dir.clear_stop()
        self.adopted = False
        self.scaler = Scaler(self, self.topology)
        self.witness = Witness(self)  # what each instance's signals say it did (status's evidence)

    # ------------------------------------------------------------ state, events, notes

    def save(self) -> None:
        if self.handed_over:
            return  # `epdctl down` owns the state now and removes it
        me = psutil.Process()
        state = {
            "name": self.plan.name, "source": self.source, "run_token": self.run_token, "phase": self.phase,
            "error": self.error, "failure": self.failure, "state_dir": str(self.state_dir.path),
            "supervisor": {"pid": me.pid, "create_time": me.create_time(), "mode": self.mode, "host": this_host()},
            "storage": [{"path": path, "created": created} for path, created in self.claimed.items()],
            "launcher": {"kind": self.plan.launcher, "job": self.plan.slurm_job},
            "processes": [child.record() for child in self.children],
            "health_timeout_s": self.plan.health_timeout_s,
            "scale": self.scaler.record(),
            "evidence": self.witness.record or None,
        }
        try:
            if not self.state_dir.verify():
                # Someone removed the state folder under a running topology: put it back, so
                # `status` and `down` keep working (`down` also finds us by tag without it).
                self.state_dir.ensure()
                if self.mode == "detached":  # our log went with the folder: start a new one
                    redirect_stdio(self.state_dir.log_file("supervisor"))
                self.note(f"the state folder {self.state_dir.path} was removed; recreated it")
            self.state_dir.write(state)  # checked against run/staterecord.py first
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
        if self.state_dir.stop_requested():  # `epdctl down` on another host
            raise Stop(signal.SIGTERM)

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

    def _check_shared_storage(self) -> None:
        """launcher slurm: the EC folder's files must be seen by every node that writes or reads them."""
        if self.plan.launcher != "slurm" or not self.plan.ec_storage_path:
            return
        from epdctl.run.slurm import check_shared_folder

        nodes = sorted({s.node for s in self.plan.instances if s.node and s.ec_storage_path == self.plan.ec_storage_path})
        if nodes:
            check_shared_folder(self.plan.slurm_job or "", nodes, self.plan.ec_storage_path)

    def spawn(self, child: Child, fresh_log: bool) -> None:
        """Start (or restart) one child: same argv, env, devices and ports every time."""
        spec = child.spec
        env = {**{k: v for k, v in os.environ.items() if k not in (RUN_ENV, INSTANCE_ENV)},
               **spec.env, RUN_ENV: self.run_token, INSTANCE_ENV: spec.name}
        if fresh_log:
            logfiles.open_log(child.log_path, truncate=True).close()
        child.error, child.adopted = None, False
        try:
            argv = list(spec.argv)
            if spec.role == "proxy" and self.plan.proxy_impl == "epdctl":  # the pool `epdctl scale` changes
                argv += ["--pool-file", str(self.scaler.pool_path)]
            elif self.plan.engine == "sim" and contention_of(argv) == "device":  # sims that share a device meet here
                argv += ["--sim-ledger", str(self.state_dir.path / LEDGER_FILE)]
            child.popen = self.runtime.spawn(argv, env, child.log_path, node=spec.node)
        except FileNotFoundError:
            child.error = f"cannot start {spec.argv[0]!r}: command not found"
        except PermissionError:
            child.error = f"cannot start {spec.argv[0]!r}: permission denied"
        except OSError as exc:
            child.error = f"cannot start {spec.argv[0]!r}: {exc.strerror or exc}"
        if child.error:
            child.set_state(ProcessState.EXITED)
            hint = ""
            if "not found" in child.error:
                hint = (" (is vLLM installed? set vllm_command in the topology)" if spec.role != "proxy" else
                        " (pip install 'epdctl[router]', or proxy.impl: epdctl)" if "vllm-router" in spec.argv[0] else "")
            raise StartFailed(f"{spec.name}: {child.error}{hint}")
        child.pid, child.running, child.exit_code = child.popen.pid, True, None
        child.step = child.task_pid = child.task_create_time = None  # a new step tells its own
        try:
            child.create_time = psutil.Process(child.pid).create_time()
        except psutil.NoSuchProcess:
            child.create_time = None
        child.started_at = child.next_probe = self.runtime.now()
        child.healthy_after_s = None
        child.set_state(ProcessState.STARTING)
        self.event(child, "started")
        self.save()  # recorded before anything else can go wrong

    def wait_healthy(self, timeout: float, progress: Progress) -> None:
        """Gate on GET /health of every child; a dead child or the deadline fails at once."""
        deadline = self.runtime.now() + timeout
        interval = self.plan.health_interval_s
        while True:
            self.check_signals()
            pending = [c for c in self.children if c.state != ProcessState.HEALTHY]
            if not pending:
                return
            # One that was healthy and died while others start fails the start too (not the
            # deadline of whoever waits on it, e.g. the proxy for a dead PD).
            dead = [c for c in self.children if c.state == ProcessState.HEALTHY and c.check_exit()]
            for child in dead + pending:
                self._learn_step(child)
                if child.state != ProcessState.HEALTHY and self.runtime.probe(child.spec.url):
                    self._became_healthy(child)
                    continue
                if child in dead or child.check_exit():
                    child.set_state(ProcessState.EXITED)
                    self.event(child, "exited", how=child.last_exit["how"], during="start-up")
                    self.save()
                    raise StartFailed(f"{child.spec.name} {describe_exit(child.exit_code)} during start-up",
                                      self._log_tail(child))
            progress.update()
            if all(c.state == ProcessState.HEALTHY for c in self.children):
                return
            if self.runtime.now() >= deadline:
                slow = [c for c in self.children if c.state != ProcessState.HEALTHY]
                names = ", ".join(f"{c.spec.name} (no 200 from {c.spec.url}/health)" for c in slow)
                raise StartFailed(f"not healthy after {timeout:g}s: {names}", self._log_tail(slow[0]))
            self.runtime.sleep(interval)

    def _became_healthy(self, child: Child) -> None:
        child.set_state(ProcessState.HEALTHY)
        if child.adopted:
            self.event(child, "healthy", adopted=True)
        else:
            child.healthy_after_s = self.runtime.now() - child.started_at
            self.event(child, "healthy", after_s=round(child.healthy_after_s, 3))
        if self.mode == "detached" or self.phase != TopologyPhase.STARTING:
            self.note(f"{child.spec.name} {Progress._line(child)}")
        self.save()

    def _log_tail(self, child: Child) -> str:
        lines = logfiles.tail_lines(child.log_path, LOG_TAIL_LINES)
        header = f"--- last {len(lines)} lines of {child.log_path} ---"
        return "\n".join([header] + [f"{child.spec.name} | {line}" for line in lines])

    def start(self, timeout: float, progress_stream=None) -> None:
        """Ports, shared folders, spawn, health gate. On any failure: tear down, then raise."""
        try:
            check_ports(self.plan)  # again: `up` checked before the lock, but a port can go since
            self.claim_storage()
            self._check_shared_storage()
        except EpdctlError as exc:
            self.release_storage()
            self.phase, self.error = TopologyPhase.FAILED, str(exc).splitlines()[0]
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
            self.phase = TopologyPhase.FAILED
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
        self.phase = TopologyPhase.RUNNING
        self.save()
        if self.mode == "detached":
            self.note(f"{self.plan.name} is up")

    def adopt(self, state: dict[str, Any]) -> None:
        """Take over the processes of a run whose supervisor died (pid and create_time checked)."""
        self.run_token = state["run_token"]
        scale = state.get("scale") or {}
        self.scaler.ports = {k: v for k, v in (scale.get("ports") or {}).items() if isinstance(v, int)}
        self.scaler.version = int(scale.get("pool_version") or 0)
        self.claimed = {f["path"]: bool(f.get("created")) for f in state.get("storage") or [] if f.get("path")}
        self.renew_storage()
        records = {r["name"]: r for r in state.get("processes", [])}
        now = self.runtime.now()
        for child in self.children:
            record = records[child.spec.name]
            child.pid, child.create_time = record.get("pid"), record.get("create_time")
            child.exit_code, child.last_exit = record.get("exit_code"), record.get("last_exit")
            child.error = record.get("error")
            child.step, child.task_pid = record.get("step"), record.get("task_pid")
            child.task_create_time = record.get("task_create_time")
            child.book.restarts = int(record.get("restarts") or 0)
            child.running = verified_process(child.pid, child.create_time) is not None
            # Nothing of the dead supervisor's record is shown as now: a live one is probed again,
            # and one that died while nobody watched goes to its restart policy.
            child.adopted = child.running
            child.started_at = child.next_probe = now
            child.set_state(ProcessState.STARTING if child.running else _recorded_state(record))
            self.event(child, "adopted", alive=child.adopted)
            if not child.running and child.state in ALIVE:
                child.running = True
                child.check_exit()
                self._on_exit(child, now)
        self.adopted = True
        self.phase = TopologyPhase.ADOPTING
        self.save()
        alive = sum(1 for c in self.children if c.adopted)
        self.note(f"adopted {alive} running process(es) of {self.plan.name} (run {self.run_token})")

    def _report_adoption(self) -> None:
        down = [c for c in self.children if c.state != ProcessState.HEALTHY]
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
            if self.state_dir.stop_requested():
                self.note(f"`epdctl down` asked (from another host) to stop {self.plan.name}")
                self.teardown(grace=DEFAULT_GRACE_S)
                return 0
            now = self.runtime.now()
            changed = False
            for child in list(self.children):
                changed |= self._tend(child, now)
            changed |= self.scaler.tend(now)
            changed |= self.witness.tend(now)
            if changed or self.phase == TopologyPhase.ADOPTING:  # adopting: every process was looked at once now
                adopting = self.phase == TopologyPhase.ADOPTING
                serving = (ProcessState.HEALTHY, ProcessState.DRAINING)  # a drain is a scale, not a fault
                joining = self.scaler.joining()  # and so is an instance a scale is starting
                self.phase = (TopologyPhase.RUNNING if all(c.state in serving or (c.spec.name in joining and c.state
                                                                                   == ProcessState.STARTING)
                                                           for c in self.children) else TopologyPhase.DEGRADED)
                self.save()
                if adopting:
                    self._report_adoption()
            self.witness.topology_health(self.phase == TopologyPhase.RUNNING)
            hopeless = self._role_that_cannot_serve()
            if hopeless and self.mode == "foreground":
                if tailer:
                    tailer.pump()
                self.phase, self.error = TopologyPhase.FAILED, f"no {hopeless} instance can serve any more"
                self.save()
                self.note(f"{self.error}; stopping {self.plan.name}", sys.stderr)
                self.teardown(grace=DEFAULT_GRACE_S, remove_state=False)
                return EXIT_RUNTIME
            if all(c.state in ENDED for c in self.children):
                self.phase = TopologyPhase.STOPPED
                self.save()
                self.note(f"every process of {self.plan.name} has exited; the supervisor ends")
                return 0
            if now >= next_rotation:
                self._rotate_logs()
                next_rotation = now + 1.0
            self.runtime.sleep(0.1)

    def _learn_step(self, child: Child) -> None:
        """launcher slurm: the step and the task's pid on its node, once the task recorded them."""
        if child.spec.node is None or child.step is not None or not child.pid:
            return
        launcher = getattr(self.runtime, "launcher", None)
        info = launcher.step_info(child.pid) if isinstance(launcher, SlurmLauncher) else None
        if info:
            child.step, child.task_pid, child.task_create_time = info["step"], info["pid"], info["create_time"]
            self.event(child, "step", step=child.step, node=info["node"], task_pid=child.task_pid)
            self.save()

    def _tend(self, child: Child, now: float) -> bool:
        """One look at one child: an exit, a due restart, or a health probe. Returns if it changed."""
        self._learn_step(child)
        if child.state in RUNNING_NOW and child.check_exit():
            self._on_exit(child, now)
            return True
        if child.state == ProcessState.RESTARTING and child.restart_at is not None and now >= child.restart_at:
            self._restart(child, now)
            return True
        if child.state == ProcessState.STARTING and now >= child.next_probe:
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
            child.set_state(ProcessState.RESTARTING)
            self.event(child, "restarting", in_s=decision.delay_s, reason=decision.reason)
            self.note(f"{child.spec.name} (pid {child.pid}) {how}; restarting it in {decision.delay_s:g}s "
                      f"({decision.reason})", sys.stderr if self.mode == "foreground" else None)
            return
        child.set_state(ProcessState(decision.action))
        child.error = f"{how}; not restarted: {decision.reason}"
        self.event(child, decision.action, reason=decision.reason)
        left = sum(1 for c in self.children if c.state not in ENDED)
        tail = "\n".join(f"  {child.spec.name} | {line}" for line in logfiles.tail_lines(child.log_path, 5))
        self.note(f"{child.spec.name} (pid {child.pid}) {how}; not restarting it: {decision.reason}; "
                  f"{left} of {len(self.children)} processes still running\n{tail}",
                  sys.stderr if self.mode == "foreground" else None)

    def _restart(self, child: Child, now: float) -> None:
        child.book.restarted(now)
        child.restart_at = None
        marker = (f"\n----- epdctl: {_timestamp()} restarting {child.spec.name} "
                  f"(restart {child.book.restarts}; last {describe_exit(child.exit_code)}) -----\n")
        try:
            with logfiles.open_log(child.log_path) as log:
                log.write(marker.encode())
        except OSError:
            pass
        try:
            self.spawn(child, fresh_log=False)
        except StartFailed as exc:
            child.set_state(ProcessState.FAILED)
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
            if all(c.state in ENDED for c in members):
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
        self.phase = TopologyPhase.STOPPING
        self.witness.close()
        self.save()
        records = [c.record() for c in self.children if c.pid]
        count = len(self.signals)
        stopped = stop_processes(
            records, self.run_token, grace,
            hurry=lambda: len(self.signals) > count,
            reap=lambda: [c.check_exit() for c in self.children],
            launcher=getattr(self.runtime, "launcher", None),  # a fake Runtime has none
        )
        lines = stopped.lines()
        for child in self.children:
            child.check_exit()
        if not stopped.clean:
            self.phase = TopologyPhase.STOPPING
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
            self.phase = (TopologyPhase.FAILED if previous in (TopologyPhase.FAILED, TopologyPhase.STARTING)
                          else TopologyPhase.STOPPED)
            self.save()
        return lines


def _recorded_state(record: dict[str, Any]) -> ProcessState:
    """The state a dead supervisor recorded; a word we do not know (a hand-edited file) is exited."""
    try:
        return ProcessState(record.get("state") or ProcessState.EXITED)
    except ValueError:
        return ProcessState.EXITED


def _instance_of(proc: psutil.Process) -> Optional[str]:
    try:
        return proc.environ().get(INSTANCE_ENV)
    except psutil.Error:
        return None
