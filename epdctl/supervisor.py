"""Spawn, health gate, fail fast, watch, tear down (DESIGN §4, §7).

One `Supervisor` runs a plan. In the foreground it lives in the `epdctl up` process; with
`-d` it lives in a detached fork of `epdctl up` (its own session) that owns (and reaps) the
children while the CLI only watches `state.json` until everything is healthy.
Every child is recorded in `state.json` (pid + create_time + pgid) the moment it exists, so
SIGKILL of any epdctl process still leaves everything within reach of `epdctl down`.
"""

from __future__ import annotations

import http.client
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import psutil

from epdctl.errors import EXIT_RUNTIME, EXIT_USAGE, EpdctlError
from epdctl.plan import Plan, ProcessSpec
from epdctl.ports import busy_ports
from epdctl.state import RUN_ENV, StateDir, is_alive, state_root, verified_process, write_json_atomic
from epdctl.teardown import stop_processes

EC_MARKER = ".epdctl-created"
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
    state: str = "pending"  # pending | starting | healthy | unhealthy | exited
    exit_code: Optional[int] = None
    started_at: float = 0.0
    healthy_after_s: Optional[float] = None

    def poll(self) -> Optional[int]:
        """The exit code once the child has exited (reaping it), else None."""
        if self.exit_code is not None:
            return self.exit_code
        if self.popen is not None:
            code = self.popen.poll()
        else:
            code = None if verified_process(self.pid, self.create_time) else -1
        if code is not None:
            self.exit_code = code
            self.state = "exited"
        return code

    def record(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "name": spec.name, "role": spec.role, "devices": list(spec.devices), "host": spec.host,
            "port": spec.port, "url": spec.url, "side_channel_port": spec.side_channel_port,
            "pid": self.pid, "pgid": self.pid, "create_time": self.create_time, "log": str(self.log_path),
            "argv": list(spec.argv), "env": dict(spec.env), "state": self.state, "exit_code": self.exit_code,
            "healthy_after_s": self.healthy_after_s,
        }


def tail_lines(path: Path, count: int = LOG_TAIL_LINES) -> list[str]:
    try:
        with open(path, "rb") as handle:
            return [line.decode(errors="replace").rstrip("\n") for line in deque(handle, maxlen=count)]
    except OSError:
        return []


def describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "exited"
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
        self.fancy = self.stream.isatty() and not os.environ.get("NO_COLOR")
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
        colors = {"healthy": "green", "exited": "red", "starting": "yellow", "unhealthy": "red"}
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
            if child.state == "healthy":
                print(f"{child.spec.name}: healthy after {child.healthy_after_s:.1f}s at {child.spec.url}", file=self.stream, flush=True)
            elif child.state == "starting":
                print(f"{child.spec.name}: started (pid {child.pid}), waiting for {child.spec.url}/health", file=self.stream, flush=True)


# ---------------------------------------------------------------- the supervisor


class Stop(Exception):
    """A signal asked us to stop."""

    def __init__(self, signum: int):
        self.signum = signum


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
        self.run_token = f"{self.plan.name}-{secrets.token_hex(8)}"
        self.children = [Child(spec, self.state_dir.log_file(spec.name)) for spec in self.plan.processes]
        self.phase = "starting"
        self.error: Optional[str] = None
        self.ec_created = False
        self.signals: list[int] = []
        self.handed_over = False  # `epdctl down` took over the teardown

    # ------------------------------------------------------------ state

    def save(self) -> None:
        if self.handed_over:
            return  # `epdctl down` owns the state now and removes it
        me = psutil.Process()
        state = {
            "name": self.plan.name, "source": self.source, "run_token": self.run_token, "phase": self.phase,
            "error": self.error, "state_dir": str(self.state_dir.path),
            "supervisor": {"pid": me.pid, "create_time": me.create_time(), "mode": self.mode},
            "ec_storage": {"path": self.plan.ec_storage_path, "created": self.ec_created},
            "processes": [child.record() for child in self.children],
            "health_timeout_s": self.plan.health_timeout_s,
        }
        write_json_atomic(self.state_dir.state_file, state)

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

    def prepare_ec_storage(self) -> None:
        path = self.plan.ec_storage_path
        if not path:
            return
        marker = Path(path) / EC_MARKER
        if marker.exists():
            self.ec_created = True  # ours from an earlier run that was never brought down
        elif not os.path.exists(path):
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as exc:
                raise EpdctlError(f"ec_transfer.shared_storage_path: cannot create {path}: {exc.strerror}") from None
            marker.write_text(self.run_token + "\n")
            self.ec_created = True

    def spawn_all(self) -> None:
        base_env = {k: v for k, v in os.environ.items() if k != RUN_ENV}
        for child in self.children:
            spec = child.spec
            env = {**base_env, **spec.env, RUN_ENV: self.run_token}
            child.log_path.write_bytes(b"")
            try:
                child.popen = self.runtime.spawn(list(spec.argv), env, child.log_path)
            except FileNotFoundError:
                raise EpdctlError(
                    f"{spec.name}: cannot start {spec.argv[0]!r}: command not found"
                    + (" (is vLLM installed? set vllm_command in the topology)" if spec.role != "proxy" else "")
                ) from None
            except PermissionError:
                raise EpdctlError(f"{spec.name}: cannot start {spec.argv[0]!r}: permission denied") from None
            child.pid = child.popen.pid
            try:
                child.create_time = psutil.Process(child.pid).create_time()
            except psutil.NoSuchProcess:
                child.create_time = None
            child.started_at = self.runtime.now()
            child.state = "starting"
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
            for child in pending:
                if self.runtime.probe(child.spec.url):
                    child.state = "healthy"
                    child.healthy_after_s = self.runtime.now() - child.started_at
                    self.save()
                    continue
                code = child.poll()
                if code is not None:
                    self.save()
                    raise EpdctlError(self._death_message(child, "during start-up"))
            progress.update()
            if all(c.state == "healthy" for c in self.children):
                return
            if self.runtime.now() >= deadline:
                slow = [c for c in self.children if c.state != "healthy"]
                names = ", ".join(c.spec.name for c in slow)
                raise EpdctlError(
                    f"not healthy after {timeout:g}s: {names} (no 200 from {slow[0].spec.url}/health)\n"
                    + self._log_tail(slow[0])
                )
            self.runtime.sleep(interval)

    def _death_message(self, child: Child, when: str) -> str:
        return f"{child.spec.name} {describe_exit(child.exit_code)} {when}\n" + self._log_tail(child)

    def _log_tail(self, child: Child) -> str:
        lines = tail_lines(child.log_path)
        header = f"--- last {len(lines)} lines of {child.log_path} ---"
        return "\n".join([header] + [f"{child.spec.name} | {line}" for line in lines])

    def start(self, timeout: float, progress_stream=None) -> None:
        """Ports, EC folder, spawn, health gate. On any failure: tear down, then raise."""
        problems = busy_ports(
            (port, spec.name if port == spec.port else f"{spec.name}'s NIXL side channel")
            for spec in self.plan.processes for port in spec.ports()
        )
        if problems:
            raise EpdctlError("; ".join(problems))
        self.prepare_ec_storage()
        self.save()
        progress = Progress(self.children, self.runtime, progress_stream or self.out)
        try:
            with progress:
                self.spawn_all()
                progress.update()
                self.wait_healthy(timeout, progress)
        except BaseException as exc:
            if self.handed_over:
                self._await_handover()
                raise Stop(signal.SIGUSR1) from None
            self.phase = "failed"
            failed_start = isinstance(exc, EpdctlError)
            self.error = str(exc).splitlines()[0] if failed_start else f"interrupted ({type(exc).__name__})"
            # A failed start keeps its logs and state for `epdctl logs`/`status`; an interrupt leaves nothing.
            self.teardown(grace=2.0 if failed_start else DEFAULT_GRACE_S, remove_state=not failed_start)
            raise
        self.phase = "running"
        self.save()

    # ------------------------------------------------------------ after start

    def watch(self, stream_logs: bool) -> int:
        """Foreground: stream logs; stop on a signal, a death, or `epdctl down`. Returns the exit code."""
        tailer = LogTailer(self.children, self.out) if stream_logs else None
        while True:
            if tailer:
                tailer.pump()
            if self.handed_over:
                return self._await_handover()
            if self.signals:
                signum = self.signals[0]
                print(f"\nepdctl: {signal.Signals(signum).name} received, stopping {self.plan.name}", file=self.out, flush=True)
                self.teardown(grace=DEFAULT_GRACE_S)
                return SIGNAL_EXIT[signum]
            for child in self.children:
                if child.exit_code is None and child.poll() is not None:
                    if tailer:
                        tailer.pump()
                    self.phase = "failed"
                    self.error = f"{child.spec.name} {describe_exit(child.exit_code)}"
                    self.save()
                    print(f"epdctl: {self.error}; stopping {self.plan.name}", file=sys.stderr, flush=True)
                    self.teardown(grace=DEFAULT_GRACE_S, remove_state=False)
                    return EXIT_RUNTIME
            self.runtime.sleep(0.1)

    def watch_detached(self) -> int:
        """Detached: reap children and record deaths until all are gone or `down` takes over."""
        while True:
            if self.handed_over:
                return self._await_handover()
            if self.signals:
                self.teardown(grace=DEFAULT_GRACE_S)
                return 0
            changed = False
            for child in self.children:
                if child.exit_code is None and child.poll() is not None:
                    changed = True
            if changed:
                self.phase = "degraded" if any(c.exit_code is None for c in self.children) else "stopped"
                self.save()
            if all(c.exit_code is not None for c in self.children):
                return 0
            self.runtime.sleep(0.2)

    def _await_handover(self) -> int:
        """`epdctl down` is stopping our children; reap them so none lingers as a zombie."""
        deadline = self.runtime.now() + 120
        while self.runtime.now() < deadline and any(c.poll() is None for c in self.children):
            self.runtime.sleep(0.05)
        print(f"epdctl: {self.plan.name} stopped by `epdctl down`", file=self.out, flush=True)
        return 0

    def teardown(self, grace: float, remove_state: bool = True) -> None:
        previous = self.phase
        self.phase = "stopping"
        self.save()
        records = [c.record() for c in self.children if c.pid]
        count = len(self.signals)
        report = stop_processes(
            records, self.run_token, grace,
            hurry=lambda: len(self.signals) > count,
            reap=lambda: [c.poll() for c in self.children],
        )
        for line in report.lines():
            print(f"  {line}", file=self.out, flush=True)
        for child in self.children:
            child.poll()
        if not report.clean:
            self.phase = "stopping"
            self.error = "some processes survived SIGKILL; run `epdctl down` again"
            self.save()
            return
        cleanup_ec(self.plan.ec_storage_path, self.ec_created)
        if remove_state:
            self.state_dir.remove()
        else:
            self.phase = "failed" if previous in ("failed", "starting") else "stopped"
            self.save()


def cleanup_ec(path: Optional[str], created: bool) -> None:
    """Remove the EC folder only if epdctl created it (its marker is there), never one it found."""
    if path and created and (Path(path) / EC_MARKER).exists():
        shutil.rmtree(path, ignore_errors=True)


class LogTailer:
    """Compose-style `name | line` streaming of every child's log file."""

    COLORS = ("36", "33", "35", "32", "34", "31")

    def __init__(self, children: list[Child], out):
        self.children = children
        self.out = out
        self.offsets = {c.spec.name: 0 for c in children}
        self.partial = {c.spec.name: b"" for c in children}
        width = max(len(c.spec.name) for c in children)
        color = out.isatty() and not os.environ.get("NO_COLOR")
        self.prefix = {}
        for i, child in enumerate(children):
            label = f"{child.spec.name:<{width}} | "
            self.prefix[child.spec.name] = f"\033[{self.COLORS[i % len(self.COLORS)]}m{label}\033[0m" if color else label

    def pump(self) -> None:
        for child in self.children:
            name = child.spec.name
            try:
                with open(child.log_path, "rb") as handle:
                    handle.seek(self.offsets[name])
                    data = handle.read()
            except OSError:
                continue
            if not data:
                continue
            self.offsets[name] += len(data)
            data = self.partial[name] + data
            *lines, self.partial[name] = data.split(b"\n")
            for line in lines:
                self.out.write(self.prefix[name] + line.decode(errors="replace") + "\n")
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


def up(topology, plan: Plan, *, detach: bool, wait_timeout: Optional[float], source: Path) -> int:
    state_dir = StateDir(plan.name)
    _refuse_if_running(state_dir)
    lock_fd = state_dir.try_lock()
    if lock_fd is None:
        _refuse_if_running(state_dir)
        raise EpdctlError(f"topology {plan.name!r} is being started by another epdctl", EXIT_USAGE)
    for stale in state_dir.path.glob("*.log"):
        stale.unlink(missing_ok=True)
    timeout = wait_timeout if wait_timeout is not None else plan.health_timeout_s
    if detach:
        return _up_detached(plan, state_dir, lock_fd, timeout, str(source))
    return _up_foreground(plan, state_dir, timeout, str(source))


def _up_foreground(plan: Plan, state_dir: StateDir, timeout: float, source: str) -> int:
    sup = Supervisor(plan, state_dir, "foreground", source=source)
    sup.install_signals()
    try:
        sup.start(timeout)
    except Stop as stop:
        return SIGNAL_EXIT.get(stop.signum, 0)
    print(f"epdctl: {plan.name} is up: proxy at {plan.proxy.url} (Ctrl-C stops it; logs follow)", flush=True)
    return sup.watch(stream_logs=True)


def _up_detached(plan: Plan, state_dir: StateDir, lock_fd: int, timeout: float, source: str) -> int:
    state_dir.state_file.unlink(missing_ok=True)
    # The supervisor is a fork of this process, not a new interpreter: it starts with the plan
    # and every module already loaded, which saves a Python start-up on every `up -d`.
    sys.stdout.flush()
    sys.stderr.flush()
    daemon = os.fork()
    if daemon == 0:  # the supervisor: its own session, its log as stdout, the lock held
        code = 1
        try:
            os.setsid()
            _redirect_stdio(state_dir.log_file("supervisor"))
            code = _supervise_detached(plan, state_dir, lock_fd, timeout, source)
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
        _watch_start(daemon, state_dir, shown, runtime, interrupted)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if interrupted:
        return SIGNAL_EXIT[interrupted[0]]
    print(f"epdctl: {plan.name} is up: proxy at {plan.proxy.url} (`epdctl status {plan.name}`, `epdctl down {plan.name}`)")
    return 0


def _watch_start(daemon: int, state_dir: StateDir, shown: list[Child], runtime: Runtime, interrupted: list[int]) -> None:
    """Show the supervisor's progress until everything is healthy, it fails, or we are interrupted."""
    with Progress(shown, runtime) as progress:
        while True:
            if interrupted:
                os.kill(daemon, signal.SIGTERM)  # the supervisor tears down what it started
                os.waitpid(daemon, 0)
                return
            state = state_dir.read() or {}
            by_name = {p["name"]: p for p in state.get("processes", [])}
            for child in shown:
                record = by_name.get(child.spec.name)
                if record:
                    child.state, child.pid = record["state"], record["pid"]
                    child.healthy_after_s = record.get("healthy_after_s")
                    if not child.started_at and child.state == "starting":
                        child.started_at = runtime.now()
            progress.update()
            if state.get("phase") == "running":
                break
            pid, status = os.waitpid(daemon, os.WNOHANG)
            if pid:
                code = os.waitstatus_to_exitcode(status)
                daemon_log = "\n".join(tail_lines(state_dir.log_file("supervisor"), 200))
                raise EpdctlError(daemon_log.strip() or f"the supervisor exited with code {code}")
            runtime.sleep(0.05)


def _redirect_stdio(log_path: Path) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(devnull)
    os.close(log)


def _supervise_detached(plan: Plan, state_dir: StateDir, lock_fd: int, timeout: float, source: str) -> int:
    """The detached supervisor's life: start (or fail and clean up), then reap until the end."""
    sup = Supervisor(plan, state_dir, "detached", source=source)
    sup.install_signals()
    try:
        sup.start(timeout, progress_stream=open(os.devnull, "w"))
    except Stop:
        return 1
    except EpdctlError as exc:
        print(exc.message, flush=True)
        return 1
    code = sup.watch_detached()
    os.close(lock_fd)
    return code


# ---------------------------------------------------------------- `epdctl down`


def resolve_name(target: Optional[str]) -> Optional[str]:
    """A topology name from a name, a topology file, or (None) the only one running."""
    if target and (target.endswith((".yaml", ".yml")) or os.path.sep in target):
        from epdctl.topology import load_topology

        return load_topology(target).name
    if target:
        return target
    root = state_root()
    names = sorted(p.parent.name for p in root.glob("*/state.json")) if root.is_dir() else []
    if len(names) > 1:
        raise EpdctlError(f"several topologies are up ({', '.join(names)}); name one", EXIT_USAGE)
    return names[0] if names else None


def down(target: Optional[str], grace: float = DEFAULT_GRACE_S, out=None) -> int:
    out = out or sys.stdout
    name = resolve_name(target)
    state_dir = StateDir(name) if name else None
    state = state_dir.read() if state_dir else None
    if state is None:
        print(f"epdctl: nothing to stop{f' for {name!r}' if name else ''}", file=out)
        return 0
    started = time.monotonic()
    sup = state.get("supervisor") or {}
    supervisor = verified_process(sup.get("pid"), sup.get("create_time"))
    if supervisor is not None and supervisor.pid != os.getpid():
        try:
            supervisor.send_signal(signal.SIGUSR1)  # "down is taking over": it only reaps from now on
        except psutil.NoSuchProcess:
            supervisor = None
    report = stop_processes(state.get("processes", []), state.get("run_token"), grace)
    print(f"epdctl: stopping {name}", file=out)
    for line in report.lines():
        print(f"  {line}", file=out)
    if supervisor is not None:
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
    if not report.clean:
        raise EpdctlError(f"{name}: some processes survived SIGKILL; state kept in {state_dir.path}")
    ec = state.get("ec_storage") or {}
    cleanup_ec(ec.get("path"), bool(ec.get("created")))
    state_dir.remove()
    print(f"epdctl: {name} is down ({time.monotonic() - started:.2f}s)", file=out)
    return 0

