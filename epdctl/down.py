"""`epdctl down`: stop a topology by its state (handing the teardown over from a live
supervisor), or, when the state is gone, by the `EPDCTL_RUN` tag its processes carry."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any, Optional

import psutil

from epdctl.errors import EXIT_RUNTIME, EXIT_USAGE, EpdctlError
from epdctl.run import storage
from epdctl.run.launch import LocalLauncher, SlurmLauncher
from epdctl.run.state import (
    RUN_ENV, StateDir, elsewhere, is_alive, is_up, processes_of_topology, readable_states, tagged_topologies, this_host,
    verified_process,
)
from epdctl.run.staterecord import UnreadableState
from epdctl.run.teardown import DEFAULT_GRACE_S, stop_processes


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
    return list(readable_states())


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
    try:
        state = state_dir.read()
    except UnreadableState as exc:
        # Ours, but not the format (hand-edited, truncated): its pids cannot be trusted, its tags can.
        print(f"epdctl: {exc.message.split(';')[0]}; looking for its processes by their {RUN_ENV} tag", file=sys.stderr)
        state = None
    if state is None:
        return _down_without_state(state_dir, grace, out, ignore_missing)
    started = time.monotonic()
    host = elsewhere(state.get("supervisor") or {})
    if host:
        return _down_elsewhere(state_dir, state, host, grace, out, started)
    supervisor = _hand_over(state.get("supervisor") or {})
    report = stop_processes(state.get("processes", []), state.get("run_token"), grace,
                            launcher=launcher_of(state, state_dir))
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


def _down_elsewhere(state_dir: StateDir, state: dict[str, Any], host: str, grace: float, out, started: float) -> int:
    """The supervisor runs on another host (launcher slurm, a shared state folder): its pids mean
    nothing here, so ask it to stop through the state folder and wait for it to finish."""
    name = state_dir.name
    state_dir.request_stop(by=this_host())
    print(f"epdctl: stopping {name}: asked its supervisor on {host} (through {state_dir.path})", file=out)
    deadline = time.monotonic() + grace + 60  # its teardown takes up to the grace, then the sweep
    while state_dir.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    launcher = launcher_of(state, state_dir)
    left = launcher.end_run(state["run_token"]) if state.get("run_token") else []
    if state_dir.exists():
        raise EpdctlError(f"{name}: its supervisor on {host} did not stop it in {grace + 60:g}s"
                          + ("; ended its job steps through Slurm" if not left else f"; steps left: {', '.join(left)}")
                          + f"; its proxy may still run on {host}: run `epdctl down {name}` there")
    if left:
        raise EpdctlError(f"{name}: job steps still there after scancel: {', '.join(left)}")
    print(f"epdctl: {name} is down ({time.monotonic() - started:.2f}s)", file=out)
    return 0


def launcher_of(state: dict[str, Any], state_dir: StateDir) -> LocalLauncher:
    """The launcher that started the run: under slurm, its steps are signalled and ended through Slurm."""
    launcher = state.get("launcher") or {}
    if launcher.get("kind") != "slurm" or not launcher.get("job"):
        return LocalLauncher()
    steps = {r["pid"]: r["step"] for r in state.get("processes", [])
             if isinstance(r.get("pid"), int) and isinstance(r.get("step"), str)}
    return SlurmLauncher(str(launcher["job"]), state_dir.step_file, sys.executable, steps)


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
