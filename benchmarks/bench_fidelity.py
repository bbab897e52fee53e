"""Does `epdctl bench` measure what the backend really does? Its own overhead must not distort it.

    python benchmarks/bench_fidelity.py [--num-prompts 320] [--concurrency 16] [--max-tokens 64]

Brings up a sim E+PD topology (TTFT 50 ms, TPOT 5 ms, encode 30 ms) with `epdctl up -d` and runs
`epdctl bench` through the proxy, once with text requests and once with one image each. The sim
queues and batches like vLLM (its step loop), so under load a request's TTFT is not the setting:
the truth is what the engines themselves timed, which the sim exports as vLLM does
(`vllm:time_to_first_token_seconds`, `vllm:request_time_per_output_token_seconds`,
`vllm:e2e_request_latency_seconds`). For each run it prints bench's mean TTFT and TPOT against
the engines' (for images: the encoder's whole request + the PD's TTFT). Targets: bench's figure
within 10 ms (TTFT) and 1.5 ms (TPOT) of the engines', which bounds what the proxy, HTTP and the
load generator add together.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from _harness import write_sim_topology

TTFT_MS, TPOT_MS, ENCODE_MS = 50.0, 5.0, 30.0
EPDCTL = [sys.executable, "-m", "epdctl"]


def histogram_totals(url: str) -> dict[str, float]:
    """{metric_sum / metric_count: value} of the vLLM histograms at `url`."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vllm:") and ("_sum{" in line or "_count{" in line):
            name, _, value = line.rpartition(" ")
            out[name.split("{")[0]] = float(value)
    return out


def engine_mean_ms(before: dict, after: dict, metric: str) -> float:
    count = after.get(f"{metric}_count", 0) - before.get(f"{metric}_count", 0)
    total = after.get(f"{metric}_sum", 0) - before.get(f"{metric}_sum", 0)
    return 1000 * total / count if count else float("nan")


def run(env: dict, urls: dict[str, str], args: argparse.Namespace, images: int) -> None:
    before = {role: histogram_totals(url) for role, url in urls.items()}
    report = json.loads(subprocess.run(
        EPDCTL + ["bench", "fidelity", "--num-prompts", str(args.num_prompts), "--concurrency", str(args.concurrency),
                  "--images-per-request", str(images), "--image-size", "64", "--max-tokens", str(args.max_tokens),
                  "--warmup", "0", "--json"], env=env, check=True, capture_output=True, text=True).stdout)
    after = {role: histogram_totals(url) for role, url in urls.items()}
    engine_ttft = engine_mean_ms(before["pd"], after["pd"], "vllm:time_to_first_token_seconds")
    if images:
        engine_ttft += engine_mean_ms(before["encode"], after["encode"], "vllm:e2e_request_latency_seconds")
    engine_tpot = engine_mean_ms(before["pd"], after["pd"], "vllm:request_time_per_output_token_seconds")
    ttft, tpot = report["ttft_ms"]["mean"], report["tpot_ms"]["mean"]
    kind = f"{images} image" if images else "text"
    print(f"{kind}: {report['completed']} requests ({report['failed']} failed), concurrency {args.concurrency}, "
          f"{args.max_tokens} tokens each")
    print(f"  mean TTFT: bench {ttft:8.2f} ms, engines {engine_ttft:8.2f} ms: bench adds {ttft - engine_ttft:+.2f} ms "
          f"(target within 10 ms); p50 {report['ttft_ms']['p50']:.2f}, p99 {report['ttft_ms']['p99']:.2f}")
    print(f"  mean TPOT: bench {tpot:8.3f} ms, engine  {engine_tpot:8.3f} ms: bench adds {tpot - engine_tpot:+.3f} ms "
          f"(target within 1.5 ms); p50 {report['tpot_ms']['p50']:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=320)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="epdctl-fidelity-") as folder:
        tmp = Path(folder)
        env = {**os.environ, "EPDCTL_STATE_DIR": str(tmp / "state"), "NO_COLOR": "1"}
        topology, ports = write_sim_topology(
            tmp, "1e1pd", name="fidelity",
            timings=f"sim-ttft-ms: {TTFT_MS:g}, sim-tpot-ms: {TPOT_MS:g}, sim-encode-ms: {ENCODE_MS:g}")
        urls = {"encode": f"http://127.0.0.1:{ports['encode-0']}", "pd": f"http://127.0.0.1:{ports['pd-0']}"}
        print(f"sim E+PD behind the proxy: TTFT {TTFT_MS:g} ms, TPOT {TPOT_MS:g} ms, encode {ENCODE_MS:g} ms per item")
        try:
            subprocess.run(EPDCTL + ["up", "-d", str(topology)], env=env, check=True, stdout=subprocess.DEVNULL)
            run(env, urls, args, images=0)
            run(env, urls, args, images=1)
        finally:
            subprocess.run(EPDCTL + ["down", "fidelity"], env=env, stdout=subprocess.DEVNULL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
