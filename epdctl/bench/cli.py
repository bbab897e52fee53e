"""`epdctl bench (NAME | --url URL) [options]` and `epdctl bench --compare A.json B.json ...`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Optional

from epdctl.errors import EXIT_USAGE, EpdctlError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, as every epdctl usage error
        raise EpdctlError(f"bench: {message}", EXIT_USAGE)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = _Parser(prog="epdctl bench", description=(
        "Load-test a topology through its proxy (or any OpenAI-compatible URL) with streamed chat requests, "
        "and report what `vllm bench serve` reports: throughput, TTFT, TPOT, ITL and E2E latency."))
    parser.add_argument("name", nargs="?", help="A running topology's name (its proxy is the target).")
    parser.add_argument("--url", help="Target base URL instead of a topology, e.g. http://127.0.0.1:10001.")
    parser.add_argument("--compare", nargs="+", metavar="REPORT.json", help="Print saved reports side by side.")
    load = parser.add_argument_group("load")
    load.add_argument("--num-prompts", type=int, default=100)
    load.add_argument("--concurrency", type=int, help="Requests in flight at once (default 16 unless --request-rate).")
    load.add_argument("--request-rate", type=float, help="Poisson arrivals per second, instead of --concurrency.")
    load.add_argument("--warmup", type=int, default=0, help="Requests sent first and not counted.")
    load.add_argument("--timeout-s", type=float, default=600.0, help="Per-request limit.")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="synthetic", help="'synthetic' or a JSONL file of OpenAI chat requests.")
    data.add_argument("--images-per-request", type=int, default=1)
    data.add_argument("--image-size", type=int, default=224, help="Synthetic image side in pixels.")
    data.add_argument("--repeat-ratio", type=float, default=0.0, help="Share of images reusing an earlier one (0..1).")
    data.add_argument("--prompt-len", type=int, default=32, help="Synthetic prompt length in words.")
    data.add_argument("--max-tokens", type=int, default=64)
    data.add_argument("--seed", type=int, default=0)
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="Print the report as JSON.")
    out.add_argument("--save", metavar="DIR", help="Write the report (JSON) and a PNG of the latency CDFs here.")
    out.add_argument("--label", help="Name of the saved files (default: the topology name or 'bench').")
    out.add_argument("--slo-ttft-ms", type=float, help="Goodput counts requests with TTFT at most this.")
    out.add_argument("--slo-tpot-ms", type=float, help="Goodput counts requests with TPOT at most this.")
    args = parser.parse_args(argv)
    if not args.compare and bool(args.name) == bool(args.url):
        parser.error("give a topology NAME or --url URL (one of them)")
    if args.concurrency is not None and args.request_rate is not None:
        parser.error("--concurrency and --request-rate exclude each other")
    for flag in ("num_prompts", "images_per_request", "image_size", "prompt_len", "max_tokens", "warmup"):
        minimum = 1 if flag in ("num_prompts", "image_size", "max_tokens") else 0
        if getattr(args, flag) < minimum:
            parser.error(f"--{flag.replace('_', '-')} must be at least {minimum}")
    if not 0 <= args.repeat_ratio <= 1:
        parser.error("--repeat-ratio must be between 0 and 1")
    if args.concurrency is None and args.request_rate is None:
        args.concurrency = 16
    if (args.concurrency is not None and args.concurrency < 1) or (args.request_rate is not None and args.request_rate <= 0):
        parser.error("--concurrency and --request-rate must be positive")
    return args


def proxy_url(name: str) -> str:
    from epdctl.state import StateDir

    state = StateDir(name).read()
    if not state:
        raise EpdctlError(f"no topology named {name!r} is up (see `epdctl status`), or pass --url", EXIT_USAGE)
    proxy = next((p for p in state.get("processes", []) if p.get("role") == "proxy"), None)
    if proxy is None:
        raise EpdctlError(f"topology {name!r} has no proxy")
    return proxy["url"]


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from epdctl.bench import report as reporting

    if args.compare:
        reporting.compare(args.compare, sys.stdout)
        return 0
    from epdctl.bench.dataset import from_jsonl, synthetic
    from epdctl.bench.runner import run

    url = (args.url or proxy_url(args.name)).rstrip("/")
    total = args.num_prompts + args.warmup
    if args.dataset == "synthetic":
        requests = synthetic(total, images_per_request=args.images_per_request, image_size=args.image_size,
                             repeat_ratio=args.repeat_ratio, prompt_len=args.prompt_len, max_tokens=args.max_tokens,
                             seed=args.seed)
    else:
        requests = from_jsonl(args.dataset, total, None)
    try:
        import uvloop  # type: ignore

        uvloop.install()
    except ImportError:
        pass

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        transient=True, disable=args.json or not sys.stderr.isatty())
    with progress:
        task = progress.add_task("requests", total=args.num_prompts)
        result = asyncio.run(run(url, requests, concurrency=args.concurrency, request_rate=args.request_rate,
                                 warmup=args.warmup, seed=args.seed, timeout_s=args.timeout_s,
                                 on_done=lambda r: progress.advance(task)))
    config = {
        "target": args.name or url, "url": url, "num_prompts": args.num_prompts, "concurrency": args.concurrency,
        "request_rate": args.request_rate, "dataset": args.dataset, "images_per_request": args.images_per_request,
        "image_size": args.image_size, "repeat_ratio": args.repeat_ratio, "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens, "seed": args.seed, "warmup": args.warmup,
    }
    report = reporting.summarize(result, config, args.slo_ttft_ms, args.slo_tpot_ms)
    if args.save:
        written = reporting.save(report, args.save, args.label or args.name or "bench")
        print("saved " + ", ".join(map(str, written)), file=sys.stderr)
    if args.json:
        print(json.dumps(reporting.public(report), indent=2))
    else:
        reporting.print_table(report, sys.stdout)
    return 0 if report["completed"] else 1

