"""`epdctl sweep FILE --splits 1e1pd,2e1pd,...`: which E/P/D split serves this workload best.

Each split is derived from a base topology (its model, engine, platform, defaults, connectors
and proxy; its first instance of each role is that role's template), laid out over the
devices, brought up, warmed up, benched with one workload, and brought down. Splits are
ranked by goodput (requests/s meeting the SLOs; throughput when none is given).
Built on the same pieces as the CLI: plan, supervisor and bench are called as functions.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from epdctl.cliparse import CommandParser
from epdctl.config.schema import ROLES, Topology, effective_memory_fraction
from epdctl.errors import EXIT_USAGE, EpdctlError
from epdctl.plan import hand_out, proxy_ports

_SPLIT = re.compile(r"(?:(?P<e>\d+)e)?(?:(?P<p>\d+)p(?P<d>\d+)d|(?P<pd>\d*)pd)")
ROLE_LETTERS = {"encode": "e", "prefill": "p", "decode": "d", "pd": "pd"}
DEFAULT_WARMUP = 8
MAX_DEVICE_ID = 4095  # a device index on one host (CUDA_VISIBLE_DEVICES and the like)
MAX_SPLIT_INSTANCES = 256  # of one role in a split


# ---------------------------------------------------------------- splits and layout


def parse_split(text: str) -> dict[str, int]:
    """`2e1p1d` → {encode: 2, prefill: 1, decode: 1}; `1e2pd` → {encode: 1, pd: 2}; `pd` → {pd: 1}."""
    match = _SPLIT.fullmatch(text.strip().lower())
    if not match:
        raise EpdctlError(f"--splits: {text!r} is not a split (XeYpZd, XeYpd, YpZd or pd)", EXIT_USAGE)
    counts = {"encode": int(match["e"] or 0)}
    if match["p"] is not None:
        counts.update(prefill=int(match["p"]), decode=int(match["d"]))
    else:
        counts["pd"] = int(match["pd"] or 1)
    if any(counts[role] == 0 for role in counts if role != "encode") or (match["e"] is not None and not counts["encode"]):
        raise EpdctlError(f"--splits: {text!r} has a role with 0 instances", EXIT_USAGE)
    if max(counts.values()) > MAX_SPLIT_INSTANCES:
        raise EpdctlError(f"--splits: {text!r}: at most {MAX_SPLIT_INSTANCES} instances of a role", EXIT_USAGE)
    return {role: n for role, n in counts.items() if n}


def split_name(counts: dict[str, int]) -> str:
    return "".join(f"{counts[role]}{ROLE_LETTERS[role]}" for role in ROLES if counts.get(role))


def _template(base: Topology, role: str) -> dict[str, Any]:
    """The base file's first instance of `role` (or of a related role), minus what the layout sets."""
    related = {"encode": ("encode",), "prefill": ("prefill", "pd", "decode"), "decode": ("decode", "pd", "prefill"),
               "pd": ("pd", "decode", "prefill")}[role]
    for candidate in related:
        instances = getattr(base, candidate)
        if instances:
            data = instances[0].model_dump(mode="json", exclude_none=True)
            # Ports are laid out per split: one the file pins on its first instance would be given
            # to every copy of it (two instances on one port).
            for key in ("port", "side_channel_port", "ec_port"):
                data.pop(key, None)
            return data
    return {}


class NoFit(Exception):
    """The split cannot be laid out on the devices (it is skipped, with this reason)."""


def layout(base: Topology, counts: dict[str, int], devices: list[int]) -> dict[str, list[dict[str, Any]]]:
    """Instances per role with devices and ports. Raises NoFit with the reason when it cannot fit.

    Prefill, decode and PD instances get devices of their own (as many as their template has);
    encoders take the devices left, and share one when their memory budgets add up to at most 1.0.
    """
    if counts.get("encode") and base.ec_transfer is None:
        raise NoFit("the base file has no ec_transfer for encoders")
    if counts.get("prefill") and base.kv_transfer is None:
        raise NoFit("the base file has no kv_transfer for prefill/decode")
    on_devices = base.platform != "cpu"
    free = list(devices)
    planned: dict[str, list[dict[str, Any]]] = {}
    for role in ("prefill", "decode", "pd"):
        for _ in range(counts.get(role, 0)):
            instance = _template(base, role)
            if on_devices:
                need = max(1, len(instance.get("devices") or ()))
                if len(free) < need:
                    raise NoFit(f"{split_name(counts)} needs more than the {len(devices)} device(s) "
                                f"{','.join(map(str, devices))}")
                instance["devices"], free = free[:need], free[need:]
            else:
                instance.pop("devices", None)
            planned.setdefault(role, []).append(instance)
    encoders = counts.get("encode", 0)
    if encoders:
        template = _template(base, "encode")
        budget = effective_memory_fraction(base, base.encode[0]) if base.encode else 0.9
        per_device = max(1, int((1.0 + 1e-9) // budget)) if on_devices else encoders
        if on_devices and len(free) * per_device < encoders:
            raise NoFit(f"{encoders} encoder(s) at a memory budget of {budget:g} do not fit on the "
                        f"{len(free)} device(s) left after prefill/decode")
        for index in range(encoders):
            # A deep copy: encoders sharing one args/env dict came out of best.yaml as &id001 anchors.
            instance = copy.deepcopy(template)
            if on_devices:
                # Spread first, share only when encoders outnumber the free devices.
                instance["devices"] = [free[index % len(free)]] if encoders <= len(free) else [free[index // per_device]]
            else:
                instance.pop("devices", None)
            planned.setdefault("encode", []).append(instance)
    _assign_ports(base, planned)
    return {role: planned[role] for role in ROLES if role in planned}


def _assign_ports(base: Topology, planned: dict[str, list[dict[str, Any]]]) -> None:
    """Ports from the base file's lowest instance port upwards, around the proxy's."""
    port = min(ref.spec.port for ref in base.instances())
    taken = proxy_ports(base.proxy)
    for role in ROLES:
        for instance in planned.get(role, []):
            (port,) = hand_out(port, taken)
            instance["port"] = port
            taken.add(port)


def derive(base: Topology, split: str, devices: list[int]) -> dict[str, Any]:
    """The topology (as data) for one split; NoFit when it cannot be laid out."""
    counts = parse_split(split)
    data = base.model_dump(mode="json", exclude_none=True)
    for role in ROLES:
        data.pop(role, None)
    data.update(layout(base, counts, devices))
    if data.get("autoscale"):
        # The base's `autoscale:` holds for the roles the split has (its count is the starting size);
        # the twin autoscales as a real run would, and the report shows the pool over the run.
        kept = {role: bounds for role, bounds in data["autoscale"].items() if role in data}
        for role, bounds in kept.items():
            if not bounds["min"] <= len(data[role]) <= bounds["max"]:
                raise NoFit(f"{role}={len(data[role])} is outside the base file's autoscale bounds "
                            f"{bounds['min']}..{bounds['max']}")
        data["autoscale"] = kept
        if not kept:
            del data["autoscale"]
    data["name"] = f"{base.name}-{split_name(counts)}"[:200]
    return data


# ---------------------------------------------------------------- running one split


@dataclass
class Outcome:
    split: str
    status: str  # ok | skipped | failed
    reason: str = ""
    goodput: Optional[float] = None
    devices: int = 0
    report: dict[str, Any] = field(default_factory=dict)
    topology: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        from epdctl.bench.report import public

        return {"split": self.split, "status": self.status, "reason": self.reason, "goodput": self.goodput,
                "devices": self.devices, "report": public(self.report) if self.report else {}}


def _used_devices(data: dict[str, Any], platform: str) -> int:
    if platform == "cpu":
        return sum(len(data.get(role, [])) for role in ROLES)
    return len({d for role in ROLES for instance in data.get(role, []) for d in instance.get("devices", [])})


def _load(data: dict[str, Any], split: str, device_count: Optional[int]):
    import yaml

    from epdctl.config.load import parse_topology
    from epdctl.plan import build_plan

    from epdctl.commands import python_command, router_command

    topology = parse_topology(yaml.safe_dump(data, sort_keys=False), f"<split {split}>", device_count=device_count)
    return topology, build_plan(topology, python=python_command(), router=router_command())


def run_split(split: str, data: dict[str, Any], bench_args: argparse.Namespace, platform: str,
              device_count: Optional[int], log, stopped_by: list[int]) -> Outcome:
    """Up, warm-up + bench, down. Every failure becomes the split's reason.

    A signal (appended to `stopped_by` by the sweep's handler, by `up`'s, or by the bench's) skips
    what is left of the split but its `down`: the split is then failed, "interrupted by SIG...".
    """
    from epdctl.bench.cli import measure
    from epdctl.down import down
    from epdctl.run.supervisor import SIGNAL_EXIT
    from epdctl.up import up

    outcome = Outcome(split, "failed", devices=_used_devices(data, platform), topology=data)
    try:
        topology, plan = _load(data, split, device_count)
    except EpdctlError as exc:
        outcome.reason = f"invalid split topology: {exc.message.splitlines()[0]}"
        return outcome
    started = False
    try:
        if not stopped_by:
            with contextlib.redirect_stdout(log):
                code = up(topology, plan, detach=True, wait_timeout=None, source=Path(f"<sweep {split}>"))
            started = True
            if code in SIGNAL_EXIT.values():  # caught by `up` itself, while it watched the start
                stopped_by.append({v: k for k, v in SIGNAL_EXIT.items()}[code])
        if not stopped_by:
            outcome.report = measure(bench_args, plan.proxy.url, label=split, stopped_by=stopped_by,
                                     encoders=any(spec.role == "encode" for spec in plan.instances))
        if stopped_by:
            outcome.reason = f"interrupted by {signal.Signals(stopped_by[0]).name}"
            return outcome
        if not outcome.report["completed"]:
            outcome.reason = "no request completed: " + "; ".join(outcome.report.get("errors", []))[:300]
            return outcome
        outcome.status = "ok"
        outcome.goodput = outcome.report.get("goodput", outcome.report["request_throughput"])
        if outcome.report["failed"]:
            outcome.reason = f"{outcome.report['failed']} request(s) failed"
    except EpdctlError as exc:
        # A failed start leaves its state for `down` to clear; a refused one (exit 2: say, that
        # name is already up) started nothing, and what runs under that name is not ours to stop.
        started = exc.exit_code != EXIT_USAGE
        outcome.reason = exc.message.splitlines()[0].removeprefix("epdctl: ")
    finally:
        if started:
            with contextlib.redirect_stdout(log):
                try:
                    down(plan.name, grace=5.0, ignore_missing=True)
                except EpdctlError as exc:
                    print(f"epdctl: sweep: down of {split}: {exc.message}", file=sys.stderr)
    return outcome


# ---------------------------------------------------------------- the sweep


def rank(outcomes: list[Outcome]) -> list[Outcome]:
    order = {"ok": 0, "failed": 1, "skipped": 2}
    return sorted(outcomes, key=lambda o: (order[o.status], -(o.goodput or 0.0)))


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, argparse.Namespace]:
    from epdctl.bench.cli import parse_args as parse_bench

    parser = CommandParser(prog="epdctl sweep", add_help=True, description=(
        "Bring each split of a base topology up, bench it with one workload, bring it down, and rank the "
        "splits by goodput. Every `epdctl bench` load/data option is accepted (--num-prompts, --concurrency, "
        "--request-rate, --images-per-request, --max-tokens, --dataset, --slo-ttft-ms, --slo-tpot-ms, ...)."))
    parser.add_argument("file", help="The base topology file, or the name of a shipped one (see `epdctl topologies`).")
    parser.add_argument("--splits", required=True, help="Comma-separated splits, e.g. 1e1pd,2e1pd,1e1p1d,pd.")
    parser.add_argument("--devices", help="Comma-separated device ids to lay splits out on (default: the base file's).")
    parser.add_argument("--save", metavar="DIR", help="Write each split's bench report, summary.json, a PNG and best.yaml.")
    parser.add_argument("--json", action="store_true", help="Print the sweep as JSON.")
    parser.add_argument("--keep-best", action="store_true", help="Leave the best split running afterwards.")
    args, rest = parser.parse_known_args(argv)
    for forbidden in ("--url", "--save", "--json", "--label", "--compare"):
        if forbidden in rest:
            raise EpdctlError(f"sweep: {forbidden} is not a sweep option", EXIT_USAGE)
    bench_args = parse_bench(rest + ["--url", "http://sweep.invalid"])
    if "--warmup" not in rest:
        bench_args.warmup = min(DEFAULT_WARMUP, bench_args.num_prompts)
    args.split_list = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not args.split_list:
        raise EpdctlError("sweep: --splits is empty", EXIT_USAGE)
    for split in args.split_list:
        parse_split(split)
    if args.devices is not None:
        try:
            args.device_list = [int(d) for d in args.devices.split(",") if d.strip()]
        except ValueError:
            raise EpdctlError(f"sweep: --devices {args.devices!r}: comma-separated integers expected", EXIT_USAGE) from None
        if len(set(args.device_list)) != len(args.device_list) or any(not 0 <= d <= MAX_DEVICE_ID for d in args.device_list):
            raise EpdctlError(f"sweep: --devices {args.devices!r}: distinct device ids between 0 and {MAX_DEVICE_ID} "
                              "expected", EXIT_USAGE)
    else:
        args.device_list = None
    return args, bench_args


def sweep(base: Topology, splits: list[str], devices: list[int], bench_args: argparse.Namespace,
          device_count: Optional[int], log, on_result=None) -> tuple[list[Outcome], Optional[int]]:
    """Every split in turn. Returns the outcomes and, when interrupted, the signal that did it."""
    from epdctl.run.supervisor import SIGNAL_EXIT

    outcomes: list[Outcome] = []
    stopped_by: list[int] = []

    def on_signal(signum, frame):
        # Only noted: the split in progress checks it between its phases and still goes down.
        # Raised from here, it cut `down` short, or (inside the bench's event loop) was a
        # traceback after which the sweep went on.
        stopped_by.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in SIGNAL_EXIT}
    try:
        for split in splits:
            if stopped_by:
                break
            try:
                data = derive(base, split, devices)
            except NoFit as reason:
                outcome = Outcome(split, "skipped", str(reason))
            else:
                outcome = run_split(split, data, bench_args, base.platform, device_count, log, stopped_by)
            outcomes.append(outcome)
            if on_result:
                on_result(outcome)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return outcomes, stopped_by[0] if stopped_by else None


def main(argv: list[str]) -> int:
    from epdctl.config.load import load_topology
    from epdctl.devices import detect_device_count
    from epdctl.names import topology_file

    args, bench_args = parse_args(argv)
    base = load_topology(topology_file(args.file))
    device_count = detect_device_count(base.platform)
    devices = args.device_list if args.device_list is not None else sorted(
        {d for ref in base.instances() for d in ref.spec.devices})
    if base.platform != "cpu" and not devices:
        raise EpdctlError("sweep: no devices: give --devices or devices in the base file", EXIT_USAGE)
    if args.save:
        _check_save(Path(args.save))
    # `up`/`down` narrate every process; the sweep reports one line per split instead (their
    # failures still arrive as errors, with their causes, in the split's reason).
    log = open(os.devnull, "w")

    def progress(outcome: Outcome) -> None:
        detail = f"goodput {outcome.goodput:.2f} req/s" if outcome.status == "ok" else outcome.reason
        print(f"epdctl: sweep: {outcome.split}: {outcome.status}: {detail}", file=sys.stderr, flush=True)

    outcomes, stopped = sweep(base, args.split_list, devices, bench_args, device_count, log, progress)
    ranked = rank(outcomes)
    best = next((o for o in ranked if o.status == "ok"), None)
    summary = {"splits": [o.to_json() for o in ranked], "best": best.split if best else None}
    if stopped:
        summary["interrupted"] = signal.Signals(stopped).name
    # Printed before saving: a save that fails must not lose what was measured.
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_table(ranked, best, bench_args, sys.stdout)
    saved = not args.save or _saved(Path(args.save), ranked, summary, best)
    if stopped:
        from epdctl.run.supervisor import SIGNAL_EXIT

        measured = sum(1 for o in outcomes if o.status == "ok")
        print(f"epdctl: sweep interrupted by {signal.Signals(stopped).name}; "
              f"{measured} of {len(args.split_list)} split(s) measured", file=sys.stderr)
        return SIGNAL_EXIT[stopped]
    if args.keep_best and best:
        topology, plan = _load(best.topology, best.split, device_count)
        from epdctl.up import up

        with contextlib.redirect_stdout(sys.stderr):
            up(topology, plan, detach=True, wait_timeout=None, source=Path(f"<sweep {best.split}>"))
        print(f"epdctl: sweep: kept {best.split} running as {plan.name!r} (proxy {plan.proxy.url}; "
              f"`epdctl down {plan.name}`)", file=sys.stderr)
    return 0 if best and saved else 1


# ---------------------------------------------------------------- output


def print_table(ranked: list[Outcome], best: Optional[Outcome], bench_args, out) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    slo = bench_args.slo_ttft_ms is not None or bench_args.slo_tpot_ms is not None
    table = Table(title="epdctl sweep: " + ("goodput (req/s within the SLOs)" if slo else "throughput (req/s)"),
                  title_justify="left")
    for column in ("rank", "split", "status", "goodput", "per device", "TTFT p50/p99 ms", "TPOT p50/p99 ms", "note"):
        table.add_column(column, justify="right" if column not in ("split", "status", "note") else "left")
    for index, o in enumerate(ranked, 1):
        if o.status == "ok":
            r = o.report
            table.add_row(str(index), o.split, o.status, f"{o.goodput:.2f}", f"{o.goodput / max(1, o.devices):.2f}",
                          f"{r['ttft_ms']['p50']:.1f} / {r['ttft_ms']['p99']:.1f}",
                          f"{r['tpot_ms']['p50']:.2f} / {r['tpot_ms']['p99']:.2f}", escape(o.reason))
        else:
            table.add_row("-", o.split, o.status, "-", "-", "-", "-", escape(o.reason))
    console = Console(file=out, width=160)
    console.print(table)
    if best:
        console.print(f"best: {best.split}")


SAVED_NAMES = ("summary.json", "best.yaml", "sweep.png")


def _check_save(folder: Path) -> None:
    """--save DIR, before the first split: a folder we can make or write, no bad file at a fixed name."""
    from epdctl.atomicfile import check_output, check_output_folder

    check_output_folder(folder, "sweep: --save")
    for name in SAVED_NAMES:
        check_output(folder / name, "sweep: --save")


def _saved(folder: Path, ranked: list[Outcome], summary: dict[str, Any], best: Optional[Outcome]) -> bool:
    """Write the outputs; a failure (a symlink planted meanwhile, a full disk) is one line, and False."""
    try:
        _save(folder, ranked, summary, best)
    except EpdctlError as exc:
        print(f"epdctl: sweep: results not saved: {exc.message}", file=sys.stderr)
        return False
    return True


def _save(folder: Path, ranked: list[Outcome], summary: dict[str, Any], best: Optional[Outcome]) -> None:
    import yaml

    from epdctl.atomicfile import make_output_folder, write_output
    from epdctl.bench import report as reporting

    make_output_folder(folder, "--save")
    written = []
    for outcome in ranked:
        if outcome.report:
            written += reporting.save(outcome.report, str(folder), outcome.split)
    written.append(write_output(folder / "summary.json", json.dumps(summary, indent=2) + "\n", "--save"))
    if best:
        written.append(write_output(folder / "best.yaml", f"# epdctl sweep: best split {best.split} "
                                    f"({best.goodput:.2f} req/s)\n" + yaml.safe_dump(best.topology, sort_keys=False),
                                    "--save"))
    png = _plot(folder / "sweep.png", ranked)
    if png:
        written.append(png)
    print("epdctl: sweep: saved " + ", ".join(map(str, written)), file=sys.stderr)


def _plot(path: Path, ranked: list[Outcome]) -> Optional[Path]:
    """Goodput per split, and the TTFT/TPOT CDFs of every measured split."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("epdctl: sweep: matplotlib is not installed, so no PNG was written "
              "(pip install 'epdctl[plot]')", file=sys.stderr)
        return None
    import numpy as np

    from epdctl.atomicfile import figure_bytes, write_output

    measured = [o for o in ranked if o.status == "ok"]
    if not measured:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].bar([o.split for o in measured], [o.goodput for o in measured])
    axes[0].set_title("goodput (req/s)")
    for ax, key, title in ((axes[1], "ttft", "TTFT (ms)"), (axes[2], "tpot", "TPOT (ms)")):
        for o in measured:
            values = np.sort(np.asarray(o.report.get("samples_ms", {}).get(key, []), dtype=float))
            if len(values):
                ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=o.split)
        ax.set_title(f"{title} CDF")
        ax.legend()
    fig.tight_layout()
    png = figure_bytes(fig)
    plt.close(fig)
    return write_output(path, png, "--save")
