"""What `epdctl up -d` adds on top of its instances' own start-up, and how long `down` takes.

    python benchmarks/supervisor_timing.py [--runs 5] [--kind 1e1p1d]

For each run: `up -d` wall time minus the slowest instance's own time to healthy (as recorded
by the supervisor; target <= 0.5 s), and `down` wall time for cooperative processes (target
<= 1.5 s). Both are whole CLI invocations, interpreter start-up included.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import write_sim_topology


def epdctl(*args: str, env: dict) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "epdctl", *args], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def one_run(tmp: Path, kind: str) -> tuple[float, list[float], float]:
    """`up -d` wall time, each process's time to healthy, and `down` wall time. The topology is down on return,
    whatever failed, so the caller can remove `tmp` (its state and EC folders) with nothing still using it."""
    env = {**os.environ, "EPDCTL_STATE_DIR": str(tmp / "state"), "NO_COLOR": "1"}
    topology, _ = write_sim_topology(tmp, kind, name="supbench")
    try:
        up = epdctl("up", "-d", str(topology), env=env)
        state = json.loads((tmp / "state" / "supbench" / "state.json").read_text())
        instance_times = [p["healthy_after_s"] for p in state["processes"]]
    except BaseException:
        subprocess.run([sys.executable, "-m", "epdctl", "down", "supbench"], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        raise
    return up, instance_times, epdctl("down", "supbench", env=env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--kind", default="1e1p1d", choices=["1e1pd", "1e1p1d", "agg"])
    args = parser.parse_args()
    overheads, downs = [], []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="epdctl-sup-bench-") as folder:
            up, instance_times, down = one_run(Path(folder), args.kind)
        overheads.append(up - max(instance_times))
        downs.append(down)
        print(f"run {run + 1}: up -d {up:.3f}s, slowest process healthy after {max(instance_times):.3f}s, "
              f"overhead {up - max(instance_times):.3f}s; down {down:.3f}s")
    print(f"\nmedian over {args.runs} runs of {args.kind}: up -d overhead {statistics.median(overheads):.3f}s "
          f"(target <= 0.5 s), down {statistics.median(downs):.3f}s (target <= 1.5 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
