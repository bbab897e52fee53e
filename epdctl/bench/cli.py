"""`epdctl bench (NAME | --url URL) [options]` and `epdctl bench --compare A.json B.json ...`."""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import re
import secrets
import signal
import sys
from typing import TYPE_CHECKING, Optional

from epdctl.bench.dataset import MAX_IMAGE_SIZE
from epdctl.cliparse import CommandParser, number
from epdctl.errors import EXIT_USAGE, EpdctlError
from epdctl.run.supervisor import SIGNAL_EXIT  # the exit codes of signals, as `up` has them

if TYPE_CHECKING:
    from epdctl.bench.dataset import BenchRequest

MAX_MEDIA_ITEMS = 4096  # the most a proxy accepts in one request (its max_media_items)
MAX_SLO_MS = 3_600_000.0
BODY_OVERHEAD = 512  # what the runner adds to each body: model, stream, stream_options


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = CommandParser(prog="epdctl bench", description=(
        "Load-test a topology through its proxy (or any OpenAI-compatible URL) with streamed chat requests, "
        "and report what `vllm bench serve` reports: throughput, TTFT, TPOT, ITL and E2E latency."))
    parser.add_argument("name", nargs="?", help="A running topology's name, or its YAML file (its proxy is the target).")
    parser.add_argument("--url", help="Target base URL instead of a topology, e.g. http://127.0.0.1:10001.")
    parser.add_argument("--compare", nargs="+", metavar="REPORT.json", help="Print saved reports side by side.")
    load = parser.add_argument_group("load")
    load.add_argument("--num-prompts", type=number(int, 1, 1_000_000), default=100)
    load.add_argument("--concurrency", type=number(int, 1, 100_000), help="Requests in flight at once (default 16 unless --request-rate).")
    load.add_argument("--request-rate", type=number(float, 0, 1_000_000, above=True), help="Poisson arrivals per second, instead of --concurrency.")
    load.add_argument("--warmup", type=number(int, 0, 1_000_000), default=0, help="Requests sent first and not counted.")
    load.add_argument("--timeout-s", type=number(float, 0, 86_400, above=True), default=600.0, help="Per-request limit.")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="synthetic", help="'synthetic' or a JSONL file of OpenAI chat requests.")
    data.add_argument("--images-per-request", type=number(int, 0, MAX_MEDIA_ITEMS), default=1)
    data.add_argument("--image-size", type=number(int, 1, MAX_IMAGE_SIZE), default=224,
                      help=f"Synthetic image side in pixels (at most {MAX_IMAGE_SIZE}: vLLM resizes larger ones anyway).")
    data.add_argument("--repeat-ratio", type=number(float, 0, 1), default=0.0,
                      help="Share of images reusing an earlier one of the same run (0..1).")
    data.add_argument("--reuse-images", action="store_true", help=(
        "Send the same synthetic images as earlier runs with this --seed, so the EC may already hold them (a warm "
        "run, on purpose). By default each run's images are new, so identical runs measure the same thing. "
        "A JSONL dataset's media are always sent as they are."))
    data.add_argument("--prompt-len", type=number(int, 0, 100_000), default=32, help="Synthetic prompt length in words.")
    data.add_argument("--max-tokens", type=number(int, 1, 10_000_000), default=64)
    data.add_argument("--seed", type=number(int, 0, 2 ** 32 - 1), default=0)
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="Print the report as JSON.")
    out.add_argument("--save", metavar="DIR", help="Write the report (JSON) and a PNG of the latency CDFs here.")
    out.add_argument("--label", type=_file_label,
                     help="Name of the saved files (default: the topology name or 'bench'); letters, digits, . _ -")
    out.add_argument("--slo-ttft-ms", type=number(float, 0, MAX_SLO_MS, above=True), help="Goodput counts requests with TTFT at most this.")
    out.add_argument("--slo-tpot-ms", type=number(float, 0, MAX_SLO_MS, above=True), help="Goodput counts requests with TPOT at most this.")
    args = parser.parse_args(argv)
    if not args.compare and bool(args.name) == bool(args.url):
        parser.error("give a topology NAME or --url URL (one of them)")
    if args.concurrency is not None and args.request_rate is not None:
        parser.error("--concurrency and --request-rate exclude each other")
    if args.concurrency is None and args.request_rate is None:
        args.concurrency = 16
    return args


def _file_label(text: str) -> str:
    """--label names files inside --save: a `/` or `..` would put them elsewhere."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}", text):
        raise argparse.ArgumentTypeError(f"must be a file name of letters, digits, '.', '_' and '-' (got {text!r})")
    return text


def proxy_url(name: str) -> tuple[str, bool, Optional[int]]:
    """The named topology's proxy URL, whether it has encoders (without, no EC cache is in play), and
    the largest request body its proxy takes (None: not known)."""
    from epdctl.run.state import StateDir

    state = StateDir(name).read()
    if not state:
        raise EpdctlError(f"no topology named {name!r} is up (see `epdctl status`), or pass --url", EXIT_USAGE)
    processes = state.get("processes", [])
    proxy = next((p for p in processes if p.get("role") == "proxy"), None)
    if proxy is None:
        raise EpdctlError(f"topology {name!r} has no proxy")
    return proxy["url"], any(p.get("role") == "encode" for p in processes), body_limit(proxy.get("argv") or [])


def body_limit(argv: list[str]) -> Optional[int]:
    """The proxy's request body limit in bytes, from its command line (epdctl's proxy or vllm-router)."""
    for flag, scale in (("--max-body-mb", 1024 * 1024), ("--max-payload-size", 1)):
        if flag in argv[:-1]:
            try:
                return int(float(argv[argv.index(flag) + 1]) * scale)
            except ValueError:
                return None
    return None


def check_bodies_fit(requests: list[BenchRequest], limit: Optional[int]) -> None:
    """Refuse a run whose requests the proxy would answer with 413, each of them."""
    if limit is None:
        return
    largest = max(len(json.dumps(r.body)) for r in {id(r): r for r in requests}.values()) + BODY_OVERHEAD
    if largest > limit:
        raise EpdctlError(f"bench: a request would be {largest / 2 ** 20:.1f} MB, more than the proxy takes "
                          f"({limit / 2 ** 20:g} MB, its max_body_mb): lower --image-size or --images-per-request",
                          EXIT_USAGE)


def requests_for(args: argparse.Namespace, max_body_bytes: Optional[int] = None) -> list[BenchRequest]:
    """The run's requests, warm-up first. Synthetic images are new on every call unless --reuse-images.

    A request larger than `max_body_bytes` is refused (check_bodies_fit); synthetic ones are judged
    by a first one, before the whole run is generated."""
    from epdctl.bench.dataset import from_jsonl, synthetic

    total = args.num_prompts + args.warmup
    if args.dataset != "synthetic":
        requests = from_jsonl(args.dataset, total, None)
        check_bodies_fit(requests, max_body_bytes)
        return requests
    make = functools.partial(synthetic, images_per_request=args.images_per_request, image_size=args.image_size,
                             repeat_ratio=args.repeat_ratio, prompt_len=args.prompt_len, max_tokens=args.max_tokens,
                             seed=args.seed, nonce=b"" if args.reuse_images else secrets.token_bytes(16))
    if max_body_bytes is not None:
        check_bodies_fit(make(1), max_body_bytes)
    return make(total)


def measure(args: argparse.Namespace, url: str, label: Optional[str] = None, encoders: Optional[bool] = None,
            max_body_bytes: Optional[int] = None, stopped_by: Optional[list[int]] = None) -> dict:
    """One bench run against `url` with the load and data options of `args`: the full report, samples included.

    `epdctl sweep` calls it once per split; `label` names the target in the report. `encoders`:
    whether the target has any (False: the report says the EC cache is not in play; None: not known).
    `max_body_bytes`: the proxy's body limit, when known (requests_for).
    SIGINT, SIGTERM or SIGHUP ends the run early: the report then covers the requests that finished,
    with `interrupted: true`, and the signal is appended to `stopped_by` (nothing is sent when that
    list already holds one).
    """
    from epdctl.bench import report as reporting
    from epdctl.bench.ec_reuse import workload
    from epdctl.bench.runner import Run

    stopped_by = [] if stopped_by is None else stopped_by
    previous = {sig: signal.getsignal(sig) for sig in SIGNAL_EXIT}
    try:
        requests = _requests_unless_stopped(args, max_body_bytes, stopped_by)
        if requests is None:
            requests, result = [], Run(results=[], duration=0.0, model="", interrupted=True)
        else:
            result = _run_until_stopped(args, url, label, requests, stopped_by)
    finally:
        for sig, handler in previous.items():  # the caller's handlers (the sweep's, or none) are back
            signal.signal(sig, handler)
    config = {
        "target": label or args.name or url, "url": url, "num_prompts": args.num_prompts,
        "concurrency": args.concurrency, "request_rate": args.request_rate, "dataset": args.dataset,
        "images_per_request": args.images_per_request, "image_size": args.image_size,
        "repeat_ratio": args.repeat_ratio, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
        "seed": args.seed, "warmup": args.warmup, "reuse_images": args.reuse_images,
    }
    return reporting.summarize(result, config, args.slo_ttft_ms, args.slo_tpot_ms, workload(requests, args.warmup),
                              encoders)


class _Stopped(Exception):
    """A signal while the requests are being built."""


def _requests_unless_stopped(args: argparse.Namespace, max_body_bytes: Optional[int],
                             stopped_by: list[int]) -> Optional[list[BenchRequest]]:
    """The run's requests, or None when a signal comes first: building many images takes a while.

    Raising from the signal handler is safe here (plain computation, no event loop, nothing to
    undo); from then until the event loop takes the signals over, they are only noted.
    """
    def stop(signum, frame):
        stopped_by.append(signum)
        raise _Stopped

    def note(signum, frame):
        stopped_by.append(signum)

    if stopped_by:
        return None
    try:
        try:
            for sig in SIGNAL_EXIT:
                signal.signal(sig, stop)
            return requests_for(args, max_body_bytes)
        finally:
            for sig in SIGNAL_EXIT:
                signal.signal(sig, note)
    except _Stopped:
        return None


def _run_until_stopped(args: argparse.Namespace, url: str, label: Optional[str], requests: list[BenchRequest],
                       stopped_by: list[int]):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from epdctl.bench.runner import run

    try:
        import uvloop  # type: ignore

        uvloop.install()
    except ImportError:
        pass
    progress = Progress(TextColumn(label or "bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        transient=True, disable=args.json or not sys.stderr.isatty())
    with progress:
        task = progress.add_task("requests", total=args.num_prompts)
        return asyncio.run(_until_stopped(
            run(url, requests, concurrency=args.concurrency, request_rate=args.request_rate, warmup=args.warmup,
                seed=args.seed, timeout_s=args.timeout_s, on_done=lambda r: progress.advance(task)),
            stopped_by))


async def _until_stopped(bench, stopped_by: list[int]):
    """Await `bench`, cancelled by the first SIGINT, SIGTERM or SIGHUP (or at once if `stopped_by`
    already holds one). The event loop runs the handler as one of its callbacks: nothing is raised
    from a signal handler (under uvloop, that was a traceback and the run went on)."""
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()

    def stop(signum: int) -> None:
        stopped_by.append(signum)
        if len(stopped_by) == 1:  # a second Ctrl-C must not cut short the wrapping up of the first
            me.cancel()

    for sig in SIGNAL_EXIT:
        loop.add_signal_handler(sig, stop, sig)
    try:
        if stopped_by:
            me.cancel()
        return await bench
    finally:
        for sig in SIGNAL_EXIT:
            loop.remove_signal_handler(sig)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from epdctl.bench import report as reporting

    if args.compare:
        reporting.compare(args.compare, sys.stdout)
        return 0
    if args.name:
        from epdctl.names import topology_name

        args.name = topology_name(args.name)  # a FILE names the topology in it
    if args.save:
        from epdctl.atomicfile import check_output_folder

        check_output_folder(args.save, "--save")  # before the run, not after it
    url, encoders, max_body_bytes = (args.url, None, None) if args.url else proxy_url(args.name)
    stopped_by: list[int] = []
    report = measure(args, url.rstrip("/"), encoders=encoders, max_body_bytes=max_body_bytes, stopped_by=stopped_by)
    # Printed first: a save that fails must not lose the run.
    if args.json:
        print(json.dumps(reporting.public(report), indent=2))
    else:
        reporting.print_table(report, sys.stdout)
    if args.save:
        written = reporting.save(report, args.save, args.label or args.name or "bench")
        print("saved " + ", ".join(map(str, written)), file=sys.stderr)
        if not any(path.suffix == ".png" for path in written):  # save() plots only when matplotlib imports
            print("epdctl bench: no PNG of the latency CDFs: matplotlib is not installed (pip install 'epdctl[plot]')",
                  file=sys.stderr)
    if stopped_by:
        print(f"epdctl bench: interrupted by {signal.Signals(stopped_by[0]).name}: the figures cover the "
              f"{report['completed'] + report['failed']} of {args.num_prompts} request(s) that finished", file=sys.stderr)
        return SIGNAL_EXIT[stopped_by[0]]
    return 0 if report["completed"] else 1
