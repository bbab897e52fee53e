"""The simulated engine's CPU cost per request at 32 concurrent requests.

    python benchmarks/sim_cpu.py [--seconds 6]

The sim is the backend of every proxy and bench benchmark, so its own cost must stay small.
Prints CPU milliseconds per request (the sim process's user+system time over completed
requests) for text and single-image chat, as a producer, a consumer and with no EC at all.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile

import psutil

from _harness import ec_config, fleet, image_body, load, text_body, use_uvloop


def measure(url: str, proc, make, seconds: float) -> tuple[float, dict]:
    process = psutil.Process(proc.pid)
    before = sum(process.cpu_times()[:2])
    result = asyncio.run(load(url, make, concurrency=32, seconds=seconds))
    used = sum(process.cpu_times()[:2]) - before
    return used * 1000 / max(1, result["ok"]), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    use_uvloop()
    timing = ["--sim-ttft-ms", "20", "--sim-tpot-ms", "2", "--sim-encode-ms", "10"]
    print(f"32 concurrent non-streamed requests, max_tokens {args.max_tokens}, {args.seconds:g}s each\n")
    print(f"{'sim role':<22}{'request':<14}{'req/s':>8}{'CPU ms/req':>12}")
    with tempfile.TemporaryDirectory(prefix="epdctl-sim-cpu-") as ec, fleet("sim_cpu") as f:
        cases = [
            ("no EC", [], ("text", "single image")),
            ("ec_producer", ["--ec-transfer-config", ec_config("ec_producer", ec)], ("single image",)),
            ("ec_consumer", ["--ec-transfer-config", ec_config("ec_consumer", ec)], ("single image",)),
        ]
        for role, extra, kinds in cases:
            url, proc = f.sim(role.replace(" ", "-"), *timing, *extra)
            for kind in kinds:
                base = text_body if kind == "text" else image_body
                # The consumer reads what the producer wrote for the same image indices.
                make = (lambda i, b=base: b(i % 5000, max_tokens=args.max_tokens))
                cpu_ms, result = measure(url, proc, make, args.seconds)
                print(f"{role:<22}{kind:<14}{result['rps']:>8.0f}{cpu_ms:>12.3f}")
            f.stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
