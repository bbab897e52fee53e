"""`epdctl status` and `epdctl logs`: read state.json, probe health live, print."""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from epdctl.errors import EXIT_NOTHING_RUNNING, EXIT_RUNTIME, EXIT_USAGE, EpdctlError
from epdctl.run.logfiles import Follower, display, tail_lines, wants_colour
from epdctl.run.state import StateDir, elsewhere, readable_states, verified_process
from epdctl.run.runtime import Runtime
from epdctl.run.states import ALIVE, ENDED, Health, ProcessState, TopologyPhase


def live_status(state: dict[str, Any], runtime: Optional[Runtime] = None) -> dict[str, Any]:
    """`status --json` for one topology, probing every live process's /health."""
    runtime = runtime or Runtime()
    records = state.get("processes", [])
    phase = state.get("phase")

    sup_record = state.get("supervisor") or {}
    remote = elsewhere(sup_record)  # launcher slurm, read from another host: its pids mean nothing here
    live_steps = _live_steps(state) if remote else {}
    supervised = bool(live_steps) if remote else verified_process(sup_record.get("pid"),
                                                                  sup_record.get("create_time")) is not None

    joining = _joining(state) if supervised else set()  # a scale under way is starting these

    def one(record: dict[str, Any]) -> dict[str, Any]:
        if remote:  # a step is alive while Slurm lists it; the proxy (on the supervisor's host) while it answers
            alive = record.get("step") in live_steps if record.get("node") else runtime.probe(record["url"], timeout=1.0)
        else:
            alive = verified_process(record.get("pid"), record.get("create_time")) is not None
        if not alive:
            # Only a live supervisor is restarting anything; a dead one's "restarting" is a lie.
            recorded = record.get("state")
            current = ProcessState(recorded) if recorded == ProcessState.FAILED or (
                recorded == ProcessState.RESTARTING and supervised) else ProcessState.EXITED
        elif record.get("state") == ProcessState.DRAINING:
            current = ProcessState.DRAINING  # `epdctl scale` removes it: no new requests, finishing its own
        elif runtime.probe(record["url"], timeout=1.0):
            current = ProcessState.HEALTHY
        else:
            current = (ProcessState.STARTING if (phase == TopologyPhase.STARTING or record["name"] in joining)
                       and record.get("state") != ProcessState.HEALTHY else ProcessState.UNHEALTHY)
        entry = {
            "name": record["name"], "role": record["role"], "pid": record.get("pid"), "port": record["port"],
            "url": record["url"], "state": current, "exit_code": record.get("exit_code") if not alive else None,
            "restarts": record.get("restarts", 0), "last_exit": record.get("last_exit"), "since": record.get("since"),
        }
        if record.get("node"):  # launcher slurm: pid is the task's own on its node; srun's is ours
            entry.update(pid=record.get("task_pid") if alive else None, node=record["node"], step=record.get("step"),
                         srun_pid=record.get("pid"))
        if current in ENDED and record.get("error") and record.get("pid") is not None:
            entry["error"] = record["error"]
        if not alive and record.get("pid") is None:
            # Never ran: say why instead of a pid of None and a made-up exit code.
            entry["error"] = record.get("error") or ("not started: up failed before it" if phase == TopologyPhase.FAILED
                                                      else "not started yet")
        return entry

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(records)))) as pool:
        entries = list(pool.map(one, records))
    instances = [e for e in entries if e["role"] != "proxy"]
    proxy = next((e for e in entries if e["role"] == "proxy"), None)
    if proxy:
        proxy = {k: v for k, v in proxy.items() if k != "role"}
    states = [e["state"] for e in entries]
    scaling = (ProcessState.HEALTHY, ProcessState.DRAINING)  # a drain, or a start a scale makes, is not a fault
    if states and all(e["state"] in scaling or (e["name"] in joining and e["state"] == ProcessState.STARTING)
                      for e in entries):
        overall = TopologyPhase.RUNNING
    elif phase == TopologyPhase.STARTING and ProcessState.EXITED not in states:
        overall = TopologyPhase.STARTING  # instances still loading are not a degraded topology
    elif phase == TopologyPhase.FAILED and not any(s in ALIVE for s in states):
        overall = TopologyPhase.FAILED  # a start that did not complete: not up, but shown until `down NAME`
    elif any(s != ProcessState.EXITED for s in states):
        overall = TopologyPhase.DEGRADED
    else:
        overall = TopologyPhase.STOPPED
    sup = state.get("supervisor") or {}
    report = {"name": state["name"], "state": overall, "instances": instances, "proxy": proxy,
              "supervisor": {"pid": sup.get("pid"), "mode": sup.get("mode"), **({"host": remote} if remote else {}),
                             "state": "running" if supervised else "gone"}}
    seen = _evidence(state, instances, supervised)
    report["health"], report["reasons"] = health(report, state.get("error"))
    if seen and report["state"] in (TopologyPhase.RUNNING, TopologyPhase.DEGRADED):
        # What the instances' own signals say (run/witness.py): a missing transfer degrades a running topology.
        report["health"], report["reasons"] = Health.DEGRADED, report["reasons"] + seen
    auto = (state.get("scale") or {}).get("autoscale")
    if isinstance(auto, dict) and isinstance(auto.get("roles"), dict):
        # The pool under `autoscale:`: its bounds, its size now, and its changes over time.
        sizes = {role: sum(1 for e in instances if e["role"] == role) for role in auto["roles"]}
        report["autoscale"] = {role: {**bounds, "size": sizes.get(role, 0),
                                      "history": [h for h in auto.get("history") or [] if h.get("role") == role]}
                               for role, bounds in auto["roles"].items()}
    if not supervised and overall not in (TopologyPhase.STOPPED, TopologyPhase.FAILED) and sup.get("pid"):
        report["warning"] = (f"the supervisor (pid {sup['pid']}) is gone: nothing restarts or records exits; "
                             f"`epdctl up {state.get('source') or 'FILE'}` adopts the running processes")
    return report



def _live_steps(state: dict[str, Any]) -> dict[str, str]:
    launcher = state.get("launcher") or {}
    if launcher.get("kind") != "slurm" or not launcher.get("job") or not state.get("run_token"):
        return {}
    from epdctl.run.slurm import steps_of

    return steps_of(str(launcher["job"]), state["run_token"])


def _joining(state: dict[str, Any]) -> set[str]:
    """The instances the scale under way is adding (run/scaler.py records its job)."""
    job = (state.get("scale") or {}).get("job") if isinstance(state.get("scale"), dict) else None
    if not isinstance(job, dict) or job.get("status") != "working" or not isinstance(job.get("adding"), list):
        return set()
    return {name for name in job["adding"] if isinstance(name, str)}


def _evidence(state: dict[str, Any], instances: list[dict[str, Any]], supervised: bool) -> list[str]:
    """Each instance's `evidence` from the supervisor's last look; the reasons it gives to degrade."""
    record = state.get("evidence") if supervised else None
    record = record if isinstance(record, dict) else {}
    seen = record.get("instances") if isinstance(record.get("instances"), dict) else {}
    for entry in instances:
        mine = seen.get(entry["name"])
        if entry["state"] not in (ProcessState.HEALTHY, ProcessState.DRAINING):
            entry["evidence"] = {"verdict": "unknown", "detail": f"it is {entry['state']}"}
        elif not supervised:
            entry["evidence"] = {"verdict": "unknown", "detail": "the supervisor is gone: nobody reads its signals"}
        elif not isinstance(mine, dict):
            entry["evidence"] = {"verdict": "unknown", "detail": "not looked at yet"}
        else:
            entry["evidence"] = {**mine, "at": record.get("at")}
    reasons = record.get("reasons")
    names = {e["name"] for e in instances if e["evidence"].get("verdict") == "degraded"}
    return [r for r in reasons if isinstance(r, str) and r.split(" ", 1)[0] in names] if isinstance(reasons, list) else []


def health(report: dict[str, Any], error: Optional[str]) -> tuple[str, list[str]]:
    """Whether the topology serves as designed, and why not.

    healthy: every instance and the proxy is healthy. failed: the start failed, nothing runs,
    or (once started) the proxy or a whole role has no healthy process, so no request can be
    served. degraded: anything else not healthy (still starting, or an instance down while its
    role still serves).
    """
    entries = report["instances"] + ([dict(report["proxy"], role="proxy")] if report["proxy"] else [])
    if report["state"] == TopologyPhase.RUNNING:
        return Health.HEALTHY, []
    if report["state"] in (TopologyPhase.FAILED, TopologyPhase.STOPPED):
        return Health.FAILED, [error or ("the start failed" if report["state"] == TopologyPhase.FAILED
                                         else "nothing is running")]
    reasons = [f"{e['name']} is {e['state']}" + (f" ({e['error']})" if e.get("error") else "")
               for e in entries if e["state"] != ProcessState.HEALTHY]
    roles = dict.fromkeys(e["role"] for e in entries)
    unserved = [role for role in roles if not any(e["role"] == role and e["state"] == ProcessState.HEALTHY for e in entries)]
    if report["state"] != TopologyPhase.STARTING and unserved:
        return Health.FAILED, reasons + [f"no healthy {role} process: requests cannot be served" for role in unserved]
    return Health.DEGRADED, reasons


def _exit_code(report: dict[str, Any]) -> int:
    """0 healthy, 1 degraded or failed, 3 nothing running: what `epdctl status NAME && ...` tests."""
    if report["health"] == Health.HEALTHY:
        return 0
    return EXIT_NOTHING_RUNNING if report["state"] == TopologyPhase.STOPPED else EXIT_RUNTIME


def show_status(name: Optional[str], as_json: bool, out=None) -> int:
    out = out or sys.stdout
    if name:
        state = StateDir(name).read()
        states = [state] if state else []
    else:
        states = [state for _, state in readable_states()]
    strays = _unknown_state_note(name, {s.get("name") for s in states})
    if not states:
        if as_json:
            print(json.dumps({"name": name, "state": TopologyPhase.STOPPED, "health": Health.FAILED, "reasons": ["nothing is running"],
                              "instances": [], "proxy": None} if name else []), file=out)
        if not as_json or strays:
            print(f"epdctl: nothing is running{f' under the name {name!r}' if name else ''}{'; ' + strays if strays else ''}",
                  file=sys.stderr)
        return EXIT_NOTHING_RUNNING
    reports = [live_status(state) for state in states]
    if as_json:
        print(json.dumps(reports[0] if name else reports, indent=2), file=out)
    else:
        _print_table(reports, states, out)
    if strays:
        print(f"epdctl: {strays}", file=sys.stderr)
    codes = {_exit_code(r) for r in reports}
    return EXIT_RUNTIME if EXIT_RUNTIME in codes else 0 if 0 in codes else EXIT_NOTHING_RUNNING


def _print_table(reports, states, out) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(file=out, no_color=not out.isatty(), width=140)
    for report, state in zip(reports, states):
        # Errors are shown as they are: `[router]` in an install hint is not a style tag.
        title = f"{report['name']}: {report['state']}"
        if report["state"] not in (report["health"], TopologyPhase.STOPPED):
            title += f", {report['health']}"  # e.g. `running, healthy`, `degraded, failed`
        table = Table(title=escape(title + (f" ({state.get('error')})" if state.get("error") else "")),
                      title_justify="left")
        rows = report["instances"] + ([dict(report["proxy"], role="proxy")] if report["proxy"] else [])
        on_nodes = any(row.get("node") for row in rows)  # launcher slurm: where each step runs
        for column in ("name", "role") + (("node", "step") if on_nodes else ()) + (
                "pid", "port", "url", "state", "restarts", "exit code"):
            table.add_column(column)
        for row in rows:
            code = row.get("error") or ("-" if row["exit_code"] is None else str(row["exit_code"]))
            pid = "-" if row["pid"] is None else str(row["pid"])
            where = (row.get("node") or "(here)", row.get("step") or "-") if on_nodes else ()
            table.add_row(row["name"], row["role"], *where, pid, str(row["port"]), row["url"], row["state"],
                          str(row.get("restarts") or 0), code)
        console.print(table)
        # The evidence is the supervisor's record in state.json: shown safe for a terminal (display:
        # rich's escape() stops markup, not escape sequences), whatever its types.
        said = [f"{e['name']} {e['evidence'].get('detail', '')}" for e in report["instances"]
                if e.get("evidence", {}).get("counts")]
        if report["health"] != Health.HEALTHY and report["reasons"]:
            console.print(escape(display("why: " + "; ".join(map(str, report["reasons"])))))
        elif said:
            console.print(escape(display("evidence: " + " · ".join(said))))
        for role, pool in (report.get("autoscale") or {}).items():
            last = pool["history"][-1] if pool["history"] else None
            console.print(escape(display(f"autoscale {role}: {pool['size']} instance(s) (min {pool['min']}, max {pool['max']}, "
                                 f"target {pool['target_inflight']:g} in flight each)"
                                 + (f"; last {last['from']} -> {last['to']} at {last['at']}: {last['why']}" if last else ""))))
        if report.get("warning"):
            console.print(f"warning: {report['warning']}")
        for row in rows:
            if row["state"] == ProcessState.FAILED:  # a crash loop that gave up: show why, from its own log
                console.print(f"last lines of {row['name']} (epdctl logs {report['name']} {row['name']}):")
                for line in tail_lines(state.get("state_dir", "") + f"/{row['name']}.log", 5):
                    console.print(f"  {row['name']} | {line}", markup=False, highlight=False)


def show_logs(name: str, instance: Optional[str], follow: bool, tail: Optional[int], out=None) -> None:
    out = out or sys.stdout
    if tail is not None and tail < 0:
        raise EpdctlError(f"--tail: must be 0 or more lines (got {tail})", EXIT_USAGE)
    state_dir = StateDir(name)
    state = state_dir.read()
    if state is None:
        raise EpdctlError(f"no topology named {name!r} (see `epdctl status`)", EXIT_USAGE)
    names = [p["name"] for p in state.get("processes", [])]
    if instance and instance not in names + ["supervisor"]:
        raise EpdctlError(f"{name} has no instance {instance!r} (it has {', '.join(names)})", EXIT_USAGE)
    chosen = [instance] if instance else names
    paths = {n: state_dir.log_file(n) for n in chosen}
    width = max(len(n) for n in chosen)
    colour = wants_colour(out)  # the children's own colours
    followers = {}
    for proc_name, path in paths.items():
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if tail is not None:
            lines = tail_lines(path, tail, colour) if tail > 0 else []  # from the end: logs can be 100 MB
        else:
            lines = Follower(path, colour=colour).lines(until=size, final=True)  # a chunk at a time
        for line in lines:
            out.write(f"{proc_name:<{width}} | {line}\n")
        followers[proc_name] = Follower(path, offset=size, colour=colour)
    out.flush()
    if not follow:
        return
    finished = False
    try:
        while True:
            for proc_name, follower in followers.items():
                for line in follower.read_lines():
                    out.write(f"{proc_name:<{width}} | {line}\n")
            out.flush()
            if finished:
                return
            # One more pass after the end, so the last lines written before it are shown.
            finished = not state_dir.exists() or not _anything_alive(state_dir)
            time.sleep(0.2)
    except KeyboardInterrupt:
        return


def _anything_alive(state_dir: StateDir) -> bool:
    """Is any process of the topology, or its supervisor, still running? (`logs -f` ends when not.)"""
    try:
        state = state_dir.read() or {}
    except EpdctlError:
        return False
    records = state.get("processes", []) + [state.get("supervisor") or {}]
    return any(verified_process(r.get("pid"), r.get("create_time")) for r in records)


def _unknown_state_note(name: Optional[str], known: set) -> str:
    """Processes of ours tagged with a topology whose state folder is gone are still ours to report."""
    from epdctl.run.state import RUN_ENV, tagged_topologies

    strays = {n: count for n, count in tagged_topologies().items() if n not in known and name in (None, n)}
    if not strays:
        return ""
    listed = ", ".join(f"{n} ({count} process(es))" for n, count in sorted(strays.items()))
    stop = f"epdctl down {next(iter(strays))}" if len(strays) == 1 else "epdctl down NAME"
    return (f"processes of an unknown state remain: {listed}, found by their {RUN_ENV} tag (the state folder "
            f"is gone); `{stop}` stops them")


def show_events(name: str, follow: bool, out=None) -> None:
    """`epdctl events NAME [-f]`: starts, health changes, exits and restarts, oldest first (the
    rotated copy first), read a chunk at a time."""
    from epdctl.run.events import EVENTS_FILE, format_event
    out = out or sys.stdout
    state_dir = StateDir(name)
    if state_dir.read() is None:
        raise EpdctlError(f"no topology named {name!r} (see `epdctl status`)", EXIT_USAGE)
    path = state_dir.path / EVENTS_FILE

    def write(lines) -> None:
        for line in lines:
            text = format_event(line)
            if text:
                out.write(text + "\n")
        out.flush()

    write(Follower(f"{path}.1", raw=True).lines(final=True))
    follower = Follower(path, raw=True)
    finished = False
    try:
        while True:
            write(follower.lines())
            if not follow or finished:
                return
            finished = not state_dir.exists() or not _anything_alive(state_dir)
            time.sleep(0.2)
    except KeyboardInterrupt:
        return
