"""How fast `epdctl --help`, `plan`, `validate` and `--version` start (target: under 0.25 s wall), and what they import.

    python benchmarks/cli_startup.py [--runs 10]

Prints the median wall time of each command over several runs, a `python -X importtime` summary
(the slowest imports), and whether anything heavy (aiohttp, vllm, torch, the proxy) was imported.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from _harness import REPO

COMMANDS = {
    "epdctl --help": ["--help"],
    "epdctl plan 1e1p1d.yaml --json": ["plan", str(REPO / "epdctl" / "topologies" / "1e1p1d.yaml"), "--json"],
    "epdctl validate sim-1e1pd.yaml": ["validate", str(REPO / "epdctl" / "topologies" / "sim-1e1pd.yaml")],
    "epdctl --version": ["--version"],
}
HEAVY = ("aiohttp", "vllm", "torch", "epdctl.proxy", "epdctl.sim", "numpy", "prometheus_client")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    launcher = [sys.executable, "-c", "from epdctl.cli import main; main()"]
    baseline = []
    for _ in range(args.runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        baseline.append(time.perf_counter() - started)
    print(f"bare interpreter start-up: {statistics.median(baseline) * 1000:.0f} ms (median of {args.runs})")
    for label, argv in COMMANDS.items():
        walls = []
        for _ in range(args.runs):
            started = time.perf_counter()
            subprocess.run(launcher + argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            walls.append(time.perf_counter() - started)
        trace = subprocess.run([sys.executable, "-X", "importtime", *launcher[1:], *argv],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True).stderr
        rows = []
        for line in trace.splitlines():
            if not line.startswith("import time:") or "|" not in line[12:]:
                continue
            self_us, cumulative_us, name = line[12:].split("|")
            if self_us.strip().isdigit():
                rows.append((int(cumulative_us), name[1:]))  # keep the indent: it marks nesting
        imported = {name.strip() for _, name in rows}
        heavy = [m for m in HEAVY if m in imported]
        total_ms = sum(us for us, name in rows if not name.startswith(" ")) / 1000
        median = statistics.median(walls)
        verdict = "ok" if median < 0.25 else "OVER the 0.25 s target"
        print(f"\n{label}: {median * 1000:.0f} ms wall (median of {args.runs}; {verdict}); "
              f"imports {total_ms:.0f} ms; heavy modules imported: {heavy or 'none'}")
        for us, name in sorted(rows, reverse=True)[:5]:
            print(f"    {us / 1000:7.1f} ms cumulative  {name.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
