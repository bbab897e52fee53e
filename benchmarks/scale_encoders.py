"""Throughput of an image-heavy load before and after `epdctl scale encode=N` (issue: the elastic pool).

A sim E+PD whose encoder costs `--encode-ms` per image, behind epdctl's proxy, under `epdctl bench`
at a fixed concurrency: once with one encoder, then after `epdctl scale NAME encode=N` on the
same running topology (nothing restarted). Prints both and their ratio; asserts nothing.

    python benchmarks/scale_encoders.py [--encoders 3] [--encode-ms 100] [--num-prompts 60] [--concurrency 6]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import write_sim_topology  # noqa: E402


def epdctl(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epdctl", *args], capture_output=True, text=True, env=env, check=True)


def bench(name: str, args, env: dict) -> dict:
    out = epdctl("bench", name, "--num-prompts", str(args.num_prompts), "--concurrency", str(args.concurrency),
                 "--images-per-request", "1", "--max-tokens", "8", "--json", env=env)
    return json.loads(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", type=int, default=3)
    parser.add_argument("--encode-ms", type=float, default=100)
    parser.add_argument("--num-prompts", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "EPDCTL_STATE_DIR": os.path.join(tmp, "state")}
        topology, _ = write_sim_topology(Path(tmp), "1e1pd", name="scalebench",
                                         timings=f"sim-ttft-ms: 5, sim-tpot-ms: 2, sim-encode-ms: {args.encode_ms:g}")
        epdctl("up", "-d", str(topology), env=env)
        try:
            before = bench("scalebench", args, env)
            epdctl("scale", "scalebench", f"encode={args.encoders}", env=env)
            after = bench("scalebench", args, env)
        finally:
            epdctl("down", "scalebench", env=env)
    print(f"{'':24}{'1 encoder':>12}{f'{args.encoders} encoders':>14}")
    for key, label in (("request_throughput", "requests/s"), ("failed", "failed")):
        print(f"{label:24}{before[key]:>12.3g}{after[key]:>14.3g}")
    print(f"{'TTFT p50 (ms)':24}{before['ttft_ms']['p50']:>12.4g}{after['ttft_ms']['p50']:>14.4g}")
    print(f"throughput ratio after/before: {after['request_throughput'] / before['request_throughput']:.2f}x "
          f"(encoder {args.encode_ms:g} ms per image, concurrency {args.concurrency})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
