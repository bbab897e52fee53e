"""Issue #17's table from one run: our proxy against vllm-router (Rust) and vLLM's disagg_epd_proxy.py.

    python benchmarks/proxy_vs_router.py [--seconds 5] [--concurrency 32] [--rounds 3] [--pin] [--workers N]

Needs wrk (`apt install wrk`) as the load generator; without it the script falls back to an aiohttp
client in this process, which costs the proxies under test far more of the machine.

Fetches what it compares with, once, under bench-results/ (nothing of it is committed):
vllm-router from PyPI into a venv of its own (bench-results/router/), and the upstream proxy with
benchmarks/fetch_upstream_proxy.py (bench-results/upstream/).

Backends are zero-latency sims (no TTFT, TPOT or encode time). They still cost CPU of their own
(a single-image request costs the two sims several times what it costs a proxy: an EC file
written and read), which on a small machine is shared with the proxies. Cases:
- P+D, text, non-streamed (max_tokens 1) and streamed (--stream-tokens events): epdctl, vllm-router
  (`--vllm-pd-disaggregation --kv-connector nixl --policy round_robin`, its cheapest policy) and
  the upstream proxy (given the encoder too, which it requires; text never reaches it);
- E+PD, text and single-image requests (each image distinct, so no proxy skips an encoder
  through EC reuse), non-streamed: epdctl and the upstream proxy (vllm-router has no encoders);
- the p50 latency of one request in flight (E+PD, text) against going direct to the PD.

How the load generator and the sims are kept from starving the proxy on a small machine:
- the sims are zero-latency and the load generator is wrk (C, one thread: a few microseconds of
  CPU per request, against ~140 for an aiohttp client);
- the EC folder is in memory (/dev/shm) where there is one: on a disk file system the encoder
  sim's folder, file and rename per image cost more than either proxy;
- only the proxy under test has work at a time; each case alternates the proxies round by round
  (--rounds, default 3) and reports medians, so a burst of other load on the machine lands on
  one round of one proxy, not on one proxy's whole figure;
- each proxy's CPU per request (its process's user+system time over the requests it served) is
  reported beside req/s: it does not depend on what else shares the cores;
- `--pin` gives the proxy under test a core of its own (os.sched_setaffinity: proxies on the
  last CPU, sims and load generator on the others). Then req/s says whether a proxy keeps up
  with backends and load generator together; without it (the default) every process shares
  every core, as in the issue, so a proxy's CPU cost shows in req/s.

Each P+D case also measures a bare aiohttp relay (benchmarks/aiohttp_floor_proxy.py: the two calls
and nothing else, no checks, metrics or retries): the floor under any proxy built on aiohttp, which
tells how much of the gap to vllm-router is aiohttp's and how much is epdctl's own bookkeeping.

`--workers N` adds a P+D row for epdctl's proxy with N worker processes (proxy.workers) beside the
one-process row, measured in the same rounds; its CPU is the parent's and every worker's together.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
from _harness import RESULTS, ec_config, fleet, free_ports, have_wrk, image_body, load, text_body, use_uvloop, wait_healthy, wrk_load

ROUTER_VERSION = "0.1.17"
# The cheapest P+D relay aiohttp allows (benchmarks/aiohttp_floor_proxy.py): no aiohttp proxy does better.
FLOOR = "bare aiohttp relay P+D"
UPSTREAM_PYTHON = RESULTS / "upstream" / "venv" / "bin" / "python"
UPSTREAM_PROXY = RESULTS / "upstream" / "disagg_epd_proxy.py"
ZERO = ["--sim-ttft-ms", "0", "--sim-tpot-ms", "0", "--sim-encode-ms", "0"]
KV_PRODUCER = '{"kv_connector":"NixlConnector","kv_role":"kv_producer"}'
KV_CONSUMER = '{"kv_connector":"NixlConnector","kv_role":"kv_consumer"}'


def ensure_router(version: str) -> Path:
    """vllm-router `version` in a venv of its own; returns its launcher."""
    venv = RESULTS / "router" / f"venv-{version}"
    launcher = venv / "bin" / "vllm-router"
    if not (venv / ".complete").exists():
        print(f"installing vllm-router=={version} into {venv} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", f"vllm-router=={version}"],
                       check=True)
        (venv / ".complete").write_text(version)
    return launcher


def ensure_upstream() -> None:
    if not (UPSTREAM_PROXY.exists() and UPSTREAM_PYTHON.exists()):
        subprocess.run([sys.executable, str(Path(__file__).with_name("fetch_upstream_proxy.py"))], check=True)


def cpu_seconds(proc: psutil.Process, children: bool = False) -> float:
    """The process's CPU time, with its children's if asked (a proxy with --workers is a parent
    and N workers)."""
    total = 0.0
    for one in [proc, *(proc.children(recursive=True) if children else [])]:
        try:
            times = one.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def run_load(url: str, kind: str, *, concurrency: int, seconds: float, start_index: int = 0, tokens: int = 1,
             stream: bool = False) -> dict:
    if have_wrk():
        return wrk_load(url, kind, concurrency=concurrency, seconds=seconds, start_index=start_index, tokens=tokens,
                        stream=stream)
    make = text_body if kind == "text" else image_body
    return asyncio.run(load(url, lambda i: make(i, max_tokens=tokens, stream=stream), concurrency=concurrency,
                            seconds=seconds, start_index=start_index))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="Per measurement (default 5).")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="Alternating rounds per case; the median counts.")
    parser.add_argument("--stream-tokens", type=int, default=16, help="max_tokens of the streamed P+D requests.")
    parser.add_argument("--router-version", default=ROUTER_VERSION)
    parser.add_argument("--epdctl-src", help="Run our proxy from this source tree instead (a folder holding "
                                              "epdctl/, e.g. `git archive OLD epdctl | tar -x -C DIR`): before/after.")
    parser.add_argument("--pin", action="store_true", help="The proxy under test on a core of its own (see above).")
    parser.add_argument("--workers", type=int, default=1, help="epdctl's proxy with this many workers (proxy.workers).")
    parser.add_argument("--only", choices=["pd", "epd", "latency"], action="append",
                        help="Run only these parts (repeatable; default all).")
    args = parser.parse_args()
    parts = set(args.only or ["pd", "epd", "latency"])
    router = ensure_router(args.router_version)
    ensure_upstream()
    use_uvloop()

    cpus = sorted(os.sched_getaffinity(0))
    proxy_cpus = {cpus[-1]} if args.pin and len(cpus) > 1 else set(cpus)
    other_cpus = set(cpus[:-1]) if args.pin and len(cpus) > 1 else set(cpus)
    os.sched_setaffinity(0, other_cpus)  # the load generator, and (inherited) the sims

    # The EC folder in memory where there is one: on a disk file system the sims' EC files (a
    # folder, a file and a rename per image) cost more than either proxy, and cap both.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="epdctl-bench-ec-", dir=shm) as ec, fleet("proxy_vs_router") as f:
        encode, e_proc = f.sim("encode", *ZERO, "--ec-transfer-config", ec_config("ec_producer", ec))
        pd, pd_proc = f.sim("pd", *ZERO, "--ec-transfer-config", ec_config("ec_consumer", ec))
        prefill, p_proc = f.sim("prefill", *ZERO, "--kv-transfer-config", KV_PRODUCER)
        decode, d_proc = f.sim("decode", *ZERO, "--kv-transfer-config", KV_CONSUMER)
        # Everything but the proxy under test: the sims, and this process (the load generator).
        others = [psutil.Process(p.pid) for p in (e_proc, pd_proc, p_proc, d_proc)] + [psutil.Process()]
        ports = iter(free_ports(8))
        procs: dict[str, tuple[str, psutil.Process]] = {}

        def start(name: str, argv: list[str]) -> None:
            port = next(ports)
            env = {"PYTHONPATH": args.epdctl_src} if args.epdctl_src and name.startswith("epdctl") else None
            os.sched_setaffinity(0, proxy_cpus)  # inherited from birth: the router sizes its thread pool by it
            try:
                proc = f.start([*argv, "--port", str(port)], name, env=env)
            finally:
                os.sched_setaffinity(0, other_cpus)
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, proc=proc, timeout=60)
            procs[name] = (url, psutil.Process(proc.pid))

        # -P: not the working directory's epdctl first, when --epdctl-src names another tree.
        ours = [sys.executable, *(["-P"] if args.epdctl_src else []), "-m", "epdctl.proxy", "--host", "127.0.0.1"]
        # With --workers, a row of its own beside the one-process proxy, measured in the same run.
        scaled = f"epdctl P+D, {args.workers} workers"
        upstream = [str(UPSTREAM_PYTHON), str(UPSTREAM_PROXY), "--host", "127.0.0.1", "--no-rewrite"]
        if "pd" in parts:
            start("epdctl P+D", [*ours, "--prefill-servers-urls", prefill, "--decode-servers-urls", decode])
            if args.workers > 1:
                start(scaled, [*ours, "--prefill-servers-urls", prefill, "--decode-servers-urls", decode,
                               "--workers", str(args.workers)])
            start("vllm-router P+D", [str(router), "--host", "127.0.0.1", "--vllm-pd-disaggregation",
                                      "--prefill", prefill, "--decode", decode, "--kv-connector", "nixl",
                                      "--policy", "round_robin", "--prometheus-port", str(next(ports)),
                                      "--log-level", "warning"])
            start("upstream P+D", [*upstream, "--encode-servers-urls", encode, "--prefill-servers-urls", prefill,
                                   "--decode-servers-urls", decode])
            start(FLOOR, [sys.executable, str(Path(__file__).with_name("aiohttp_floor_proxy.py")), "--prefill", prefill,
                          "--decode", decode])
        if parts & {"epd", "latency"}:
            start("epdctl E+PD", [*ours, "--encode-servers-urls", encode, "--prefill-servers-urls", "disable",
                                  "--decode-servers-urls", pd, "--ec-shared-storage-path", ec])
            start("upstream E+PD", [*upstream, "--encode-servers-urls", encode, "--prefill-servers-urls", "disable",
                                    "--decode-servers-urls", pd])

        placement = (f"proxy under test on CPU {sorted(proxy_cpus)}, sims and load generator on CPU {sorted(other_cpus)}"
                     if args.pin else f"every process on every CPU ({len(cpus)})")
        loader = "wrk" if have_wrk() else "aiohttp (install wrk: the proxies get more of the machine)"
        print(f"zero-latency sims; load generator {loader}; {args.concurrency} requests in flight; {args.seconds:g} s per measurement; "
              f"{args.rounds} alternating rounds, median; {placement}; vllm-router {args.router_version}; "
              f"load {os.getloadavg()[0]:.2f} at start\n")
        index = 0

        def measure(names: list[str], kind: str, **shape) -> dict[str, dict]:
            nonlocal index
            for name in names:  # warm each proxy's connections
                run_load(procs[name][0], kind, concurrency=4, seconds=1, start_index=10**9 + index, **shape)
            rounds: dict[str, list[dict]] = {name: [] for name in names}
            for _ in range(args.rounds):
                for name in names:
                    index += 1_000_000
                    url, proc = procs[name]
                    before = cpu_seconds(proc, children=True)
                    before_others = sum(cpu_seconds(p) for p in others)
                    result = run_load(url, kind, concurrency=args.concurrency, seconds=args.seconds,
                                      start_index=index, **shape)
                    served = max(1, result["ok"])
                    result["cpu_us"] = (cpu_seconds(proc, children=True) - before) * 1e6 / served
                    result["others_us"] = (sum(cpu_seconds(p) for p in others) - before_others) * 1e6 / served
                    rounds[name].append(result)
            return {name: {key: statistics.median(r[key] for r in runs) for key in ("rps", "cpu_us", "others_us")}
                    | {"failed": sum(r["failed"] for r in runs)} for name, runs in rounds.items()}

        def table(title: str, results: dict[str, dict]) -> None:
            print(f"| {title} | req/s | proxy CPU per request | sims + load generator CPU per request | failed |\n"
                  "|---|---|---|---|---|")
            for name, r in results.items():
                print(f"| {name} | {r['rps']:.0f} | {r['cpu_us']:.0f} µs | {r['others_us']:.0f} µs | {r['failed']} |")
            print()

        ratios: list[str] = []
        if "pd" in parts:
            names = ["epdctl P+D", "vllm-router P+D", "upstream P+D", FLOOR] + ([scaled] if args.workers > 1 else [])
            for label, shape in (("non-streamed", {}), ("streamed", {"tokens": args.stream_tokens, "stream": True})):
                results = measure(names, "text", **shape)
                table(f"P+D, text, {label}", results)
                me, rust, up, floor = (results[n] for n in names[:4])
                if args.workers > 1:
                    many = results[scaled]
                    ratios.append(f"P+D text {label}, {args.workers} workers: {many['rps'] / me['rps']:.2f}x one "
                                  f"process, {many['rps'] / rust['rps']:.2f}x vllm-router, "
                                  f"{many['rps'] / up['rps']:.2f}x upstream")
                ratios.append(f"P+D text {label}: {me['rps'] / rust['rps']:.2f}x vllm-router (goal >= 1.0), "
                              f"{me['rps'] / up['rps']:.2f}x upstream (goal >= 2.5); CPU per request "
                              f"{rust['cpu_us'] / me['cpu_us']:.2f}x / {up['cpu_us'] / me['cpu_us']:.2f}x less")
                ratios.append(f"P+D text {label}, the bare aiohttp relay: {floor['rps'] / rust['rps']:.2f}x vllm-router, "
                              f"{floor['rps'] / up['rps']:.2f}x upstream; epdctl's proxy costs "
                              f"{me['cpu_us'] - floor['cpu_us']:+.0f} µs of CPU per request over it")
        if "epd" in parts:
            names = ["epdctl E+PD", "upstream E+PD"]
            for label, kind in (("text", "text"), ("single image", "image")):
                results = measure(names, kind)
                table(f"E+PD, {label}, non-streamed", results)
                me, up = (results[n] for n in names)
                ratios.append(f"E+PD {label}: {me['rps'] / up['rps']:.2f}x upstream (goal >= 2.5); CPU per request "
                              f"{up['cpu_us'] / me['cpu_us']:.2f}x less")
        if "latency" in parts:
            seconds = max(2.0, args.seconds)
            direct = run_load(pd, "text", concurrency=1, seconds=seconds)
            via = {name: run_load(procs[name][0], "text", concurrency=1, seconds=seconds)
                   for name in ("epdctl E+PD", "upstream E+PD")}
            print(f"one request in flight, E+PD text, p50: direct to the PD {direct['p50_ms']:.2f} ms; "
                  + "; ".join(f"via {name.split()[0]} {r['p50_ms']:.2f} ms (+{r['p50_ms'] - direct['p50_ms']:.2f})"
                              for name, r in via.items()) + "\n")
            added = via["epdctl E+PD"]["p50_ms"] - direct["p50_ms"]
            ratios.append(f"added p50 latency at one in flight: {added:.2f} ms (goal <= 0.5 ms)")
        print("\n".join(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
