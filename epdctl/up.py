"""`epdctl up`: refuse a topology that is already up, adopt one whose supervisor died, take the
lock, then supervise in the foreground or in a detached fork whose start this process watches."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
from pathlib import Path
from typing import Any, Optional

from epdctl.errors import EXIT_USAGE, EpdctlError
from epdctl.plan import Plan
from epdctl.run import storage
from epdctl.run.child import Child
from epdctl.run.events import EVENTS_FILE, append_event
from epdctl.run.logfiles import redirect_stdio, tail_lines
from epdctl.run.preflight import check_ports
from epdctl.run.progress import Progress
from epdctl.run.runtime import Runtime
from epdctl.run.state import RUN_ENV, StateDir, list_state_dirs, processes_of_topology, verified_process
from epdctl.run.states import ProcessState, TopologyPhase
from epdctl.run.supervisor import SIGNAL_EXIT, Stop, Supervisor


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


def _as_scaled(topology, plan: Plan, state_dir: StateDir) -> Plan:
    """A run whose supervisor died after `epdctl scale` is adopted at its scaled size: the plan of
    the file with the recorded instance counts and ports (run/scaling.py)."""
    if topology is None or state_dir.is_locked():
        return plan
    try:
        state = state_dir.read() or {}
    except EpdctlError:
        return plan
    scale = state.get("scale") or {}
    counts, ports = scale.get("counts"), scale.get("ports") or {}
    if not isinstance(counts, dict) or not ports or not any(
            verified_process(p.get("pid"), p.get("create_time")) for p in state.get("processes", [])):
        return plan
    from epdctl.commands import python_command, router_command
    from epdctl.plan import build_plan
    from epdctl.run.scaling import counts_of, scaled_topology

    try:
        wanted = {r: int(n) for r, n in counts.items() if r in counts_of(topology)}
        scaled = build_plan(scaled_topology(topology, wanted, ports), python=python_command(), router=router_command())
        # The proxy keeps the spec it was started with: it learns the pool from the pool file.
        return dataclasses.replace(scaled, proxy=plan.proxy)
    except (KeyError, ValueError, TypeError):
        return plan  # not a record this version wrote: _adoptable says the plans differ


def up(topology, plan: Plan, *, detach: bool, wait_timeout: Optional[float], source: Path) -> int:
    state_dir = StateDir(plan.name)
    plan = _as_scaled(topology, plan, state_dir)
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
        return _up_detached(plan, state_dir, lock_fd, timeout, source_path, adopt, topology)
    return _up_foreground(plan, state_dir, timeout, source_path, adopt, topology)


def _up_foreground(plan: Plan, state_dir: StateDir, timeout: float, source: str,
                   adopt: Optional[dict[str, Any]] = None, topology=None) -> int:
    with _output_that_may_close(plan.name, state_dir):
        return _supervise_foreground(plan, state_dir, timeout, source, adopt, topology)


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
                          adopt: Optional[dict[str, Any]], topology=None) -> int:
    sup = Supervisor(plan, state_dir, "foreground", source=source, topology=topology)
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
                 adopt: Optional[dict[str, Any]] = None, topology=None) -> int:
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
            redirect_stdio(state_dir.log_file("supervisor"))
            code = _supervise_detached(plan, state_dir, lock_fd, timeout, source, adopt, topology)
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
    down = ", ".join(c.spec.name for c in shown if c.state != ProcessState.HEALTHY)
    what = f"is up, degraded ({down} not healthy)" if phase == TopologyPhase.DEGRADED else "is up"
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
                    if not child.started_at and child.state == ProcessState.STARTING:
                        child.started_at = runtime.now()
            progress.update()
            if state.get("phase") in (TopologyPhase.RUNNING, TopologyPhase.DEGRADED):
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


def _supervise_detached(plan: Plan, state_dir: StateDir, lock_fd: int, timeout: float, source: str,
                        adopt: Optional[dict[str, Any]] = None, topology=None) -> int:
    """The detached supervisor's life: start (or fail and clean up), then heal until the end."""
    sup = Supervisor(plan, state_dir, "detached", source=source, topology=topology)
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
