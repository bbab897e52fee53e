"""Our proxy against vLLM 0.33.0's disagg_epd_proxy.py, on the same zero-latency sim backends, same run.

    python benchmarks/fetch_upstream_proxy.py        # once: the upstream proxy and its venv
    python benchmarks/proxy_vs_upstream.py [--seconds 8] [--concurrency 32] [--rounds 2]

Prints requests/s for text and single-image chat (non-streamed, max_tokens 1) through each proxy
and their ratio, and the p50 latency with one request in flight against going direct to the PD.
Each image is distinct, so neither proxy can skip an encoder through EC reuse. The upstream
proxy runs with --no-rewrite, as it ships. All processes share this machine's cores, the load
generator included, so the ratios are what counts, not the absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile

import psutil

from _harness import RESULTS, ec_config, fleet, free_ports, image_body, load, text_body, use_uvloop, wait_healthy


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="Alternating rounds per proxy; the median counts.")
    parser.add_argument("--upstream-python", default=str(RESULTS / "upstream" / "venv" / "bin" / "python"))
    parser.add_argument("--upstream-proxy", default=str(RESULTS / "upstream" / "disagg_epd_proxy.py"))
    args = parser.parse_args()
    from pathlib import Path

    if not Path(args.upstream_proxy).exists() or not Path(args.upstream_python).exists():
        print("the upstream proxy is missing: run `python benchmarks/fetch_upstream_proxy.py` first", file=sys.stderr)
        return 2
    use_uvloop()
    zero = ["--sim-ttft-ms", "0", "--sim-tpot-ms", "0", "--sim-encode-ms", "0"]
    with tempfile.TemporaryDirectory(prefix="epdctl-bench-ec-") as ec, fleet("proxy_vs_upstream") as f:
        encode, _ = f.sim("encode", *zero, "--ec-transfer-config", ec_config("ec_producer", ec))
        pd, _ = f.sim("pd", *zero, "--ec-transfer-config", ec_config("ec_consumer", ec))
        ours_port, theirs_port = free_ports(2)
        ours_proc = f.start([sys.executable, "-m", "epdctl.proxy", "--port", str(ours_port),
                             "--encode-servers-urls", encode, "--prefill-servers-urls", "disable",
                             "--decode-servers-urls", pd, "--ec-shared-storage-path", ec], "ours")
        theirs_proc = f.start([args.upstream_python, args.upstream_proxy, "--host", "127.0.0.1", "--port", str(theirs_port),
                               "--encode-servers-urls", encode, "--prefill-servers-urls", "disable",
                               "--decode-servers-urls", pd, "--no-rewrite"], "upstream")
        ours, theirs = f"http://127.0.0.1:{ours_port}", f"http://127.0.0.1:{theirs_port}"
        wait_healthy(ours, proc=ours_proc)
        wait_healthy(theirs, proc=theirs_proc)

        print(f"backends: zero-latency sims; load: {args.concurrency} concurrent, {args.seconds:g}s per measurement, "
              f"{args.rounds} alternating rounds (median)\n")
        procs = {"ours": psutil.Process(ours_proc.pid), "theirs": psutil.Process(theirs_proc.pid)}
        print("req/s: through each proxy; CPU: the proxy process's own CPU microseconds per request\n")
        print(f"{'request':<14}{'upstream req/s':>16}{'epdctl req/s':>14}{'ratio':>8}{'fail (u/e)':>12}"
              f"{'CPU us (u)':>12}{'CPU us (e)':>12}{'ratio':>8}")
        index = 0
        for label, make in (("text", text_body), ("single image", image_body)):
            asyncio.run(load(ours, make, concurrency=4, seconds=1, start_index=10**9))  # warm both
            asyncio.run(load(theirs, make, concurrency=4, seconds=1, start_index=2 * 10**9))
            results = {"ours": [], "theirs": []}
            for _ in range(args.rounds):
                for name, url in (("theirs", theirs), ("ours", ours)):
                    index += 1_000_000
                    proc = procs[name]
                    before = cpu_seconds(proc)
                    result = asyncio.run(load(url, make, concurrency=args.concurrency, seconds=args.seconds,
                                              start_index=index))
                    result["cpu_us_per_request"] = (cpu_seconds(proc) - before) * 1e6 / max(1, result["ok"])
                    results[name].append(result)
            up = statistics.median(r["rps"] for r in results["theirs"])
            me = statistics.median(r["rps"] for r in results["ours"])
            up_cpu = statistics.median(r["cpu_us_per_request"] for r in results["theirs"])
            me_cpu = statistics.median(r["cpu_us_per_request"] for r in results["ours"])
            fails = f"{sum(r['failed'] for r in results['theirs'])}/{sum(r['failed'] for r in results['ours'])}"
            print(f"{label:<14}{up:>16.1f}{me:>14.1f}{me / up:>7.2f}x{fails:>12}{up_cpu:>12.0f}{me_cpu:>12.0f}"
                  f"{up_cpu / me_cpu:>7.2f}x")

        print("\none request in flight, text (p50 ms over 4 s):")
        direct = asyncio.run(load(pd, text_body, concurrency=1, seconds=4))
        mine = asyncio.run(load(ours, text_body, concurrency=1, seconds=4))
        upstream = asyncio.run(load(theirs, text_body, concurrency=1, seconds=4))
        print(f"  direct to PD {direct['p50_ms']:.2f}   via epdctl {mine['p50_ms']:.2f} "
              f"(+{mine['p50_ms'] - direct['p50_ms']:.2f})   via upstream {upstream['p50_ms']:.2f} "
              f"(+{upstream['p50_ms'] - direct['p50_ms']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
