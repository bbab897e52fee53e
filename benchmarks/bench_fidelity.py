"""Does `epdctl bench` measure what the backend really does? Its own overhead must not distort it.

    python benchmarks/bench_fidelity.py [--num-prompts 320] [--concurrency 16]

Brings up a sim E+PD topology (TTFT 50 ms, TPOT 5 ms) with `epdctl up -d`, runs
`epdctl bench` through the proxy with text requests (so the true TTFT is the prefill alone),
and prints the reported p50 TTFT and TPOT against the sim's settings (targets: within 10 ms
and 1.5 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _harness import write_sim_topology

TTFT_MS, TPOT_MS = 50.0, 5.0


def bench_output(tmp: Path, args: argparse.Namespace) -> str:
    """`epdctl bench --json` of a sim topology under `tmp`, which is down again on return."""
    env = {**os.environ, "EPDCTL_STATE_DIR": str(tmp / "state"), "NO_COLOR": "1"}
    topology, _ = write_sim_topology(tmp, "1e1pd", name="fidelity",
                                     timings=f"sim-ttft-ms: {TTFT_MS:g}, sim-tpot-ms: {TPOT_MS:g}, sim-encode-ms: 30")
    epdctl = [sys.executable, "-m", "epdctl"]
    try:
        subprocess.run(epdctl + ["up", "-d", str(topology)], env=env, check=True, stdout=subprocess.DEVNULL)
        return subprocess.run(epdctl + ["bench", "fidelity", "--num-prompts", str(args.num_prompts),
                                        "--concurrency", str(args.concurrency), "--images-per-request", "0",
                                        "--max-tokens", str(args.max_tokens), "--warmup", "16", "--json"],
                              env=env, check=True, capture_output=True, text=True).stdout
    finally:
        subprocess.run(epdctl + ["down", "fidelity"], env=env, stdout=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=320)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="epdctl-fidelity-") as folder:
        out = bench_output(Path(folder), args)
    report = json.loads(out)
    ttft, tpot, itl = report["ttft_ms"]["p50"], report["tpot_ms"]["p50"], report["itl_ms"]["p50"]
    print(f"sim behind the proxy: TTFT {TTFT_MS:g} ms, TPOT {TPOT_MS:g} ms; concurrency {args.concurrency}, "
          f"{report['completed']} requests ({report['failed']} failed), {args.max_tokens} tokens each")
    print(f"reported p50 TTFT {ttft:.2f} ms  (off by {ttft - TTFT_MS:+.2f} ms; target within 10 ms)")
    print(f"reported p50 TPOT {tpot:.3f} ms (off by {tpot - TPOT_MS:+.3f} ms; target within 1.5 ms)")
    print(f"reported p50 ITL  {itl:.3f} ms; p99 TTFT {report['ttft_ms']['p99']:.2f} ms, p99 TPOT {report['tpot_ms']['p99']:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
