"""`python -m epdctl.proxy` / `epdctl proxy`: the EPD proxy alone, with the upstream proxy's flags."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import re
import signal
import sys
from typing import Optional

from epdctl.cliparse import CommandParser, number

DISABLED = ("", "disable", "disabled", "none")
MAX_WORKERS = 64
SECONDS = number(float, 0, 7 * 86_400, above=True)  # a topology's proxy timeouts have the same bound


def _urls(value: str, flag: str, parser: argparse.ArgumentParser) -> list[str]:
    if value.strip().lower() in DISABLED:
        return []
    urls = [u.strip().rstrip("/") for u in value.split(",") if u.strip()]
    for url in urls:
        if not url.startswith(("http://", "https://")):
            parser.error(f"{flag}: {url!r} is not an http:// URL")
    return urls


def parse_args(argv: list[str]):
    parser = CommandParser(
        prog="epdctl proxy",
        description="The EPD proxy: encoders (E), then prefill (P), then decode (D or PD), behind one OpenAI API.",
    )
    parser.add_argument("--encode-servers-urls", default="disable",
                        help="Comma-separated encoder URLs, or 'disable' (no encoders).")
    parser.add_argument("--prefill-servers-urls", default="disable",
                        help="Comma-separated prefill URLs, or 'disable'/'none' (E+PD).")
    parser.add_argument("--decode-servers-urls", required=True, help="Comma-separated decode (or PD) URLs.")
    parser.add_argument("--host", default="127.0.0.1", help="Bind address (default 127.0.0.1).")
    # 0 would give each worker a random port of its own; above 65535 wraps around.
    parser.add_argument("--port", type=number(int, 1, 65535), default=8000, help="1-65535.")
    parser.add_argument("--policy", choices=["least-loaded", "round-robin"], default="least-loaded")
    parser.add_argument("--encode-timeout-s", type=SECONDS, default=300.0, help="Whole encoder call.")
    parser.add_argument("--prefill-timeout-s", type=SECONDS, default=600.0, help="Whole prefill call.")
    parser.add_argument("--decode-timeout-s", type=SECONDS, default=600.0,
                        help="Decode: the longest wait for the next byte (a stream may run longer in all).")
    # Below 1 MB the byte limit can round to 0, which aiohttp reads as "no limit at all".
    parser.add_argument("--max-body-mb", type=number(float, 1, 4096), default=64.0, help="Larger request bodies get 413 (at least 1).")
    parser.add_argument("--max-media-items", type=number(int, 1, 4096), default=64,
                        help="Requests with more images/audio/video items get 413 (default 64).")
    for role in ("encode", "prefill", "decode"):
        parser.add_argument(f"--{role}-servers-names", help=f"Comma-separated names of the {role} URLs, for logs "
                                                             f"and metrics (default: {role}-0, {role}-1, ...).")
    parser.add_argument("--ec-shared-storage-path",
                        help="ECExampleConnector's folder, if the proxy can see it: items already cached skip the encoder.")
    parser.add_argument("--allowed-local-media-path", help="file:// media is allowed only under this folder.")
    parser.add_argument("--kv-connector", default="NixlConnector",
                        help="The P->D KV connector (default NixlConnector). With a storage connector such as "
                             "ExampleConnector, P answers without kv_transfer_params by design, so the proxy "
                             "does not warn that decode will recompute.")
    parser.add_argument("--metaserver-host",
                        help="MooncakeLayerwiseConnector: the address decoders call the proxy's /v1/metaserver at "
                             "(default: --host; required when --host is a wildcard such as 0.0.0.0).")
    parser.add_argument("--ec-connector", default="ECExampleConnector",
                        help="The E->P/PD EC connector (default ECExampleConnector). With ECCPUConnector the proxy "
                             "passes each encoder's answer (where its output can be read) on to the consumer.")
    parser.add_argument("--ec-consumer-zmq-addrs",
                        help="ECMooncakeConnector: comma-separated control addresses (tcp://HOST:PORT, TP rank 0) of "
                             "the EC consumers, one per prefill URL (E+P+D) or per decode URL (E+PD), in their order; "
                             "encoders are told to push to the consumer that then gets the request.")
    parser.add_argument("--probe-interval-s", type=number(float, 0, 3600, above=True), default=2.0, help="Background /health probe period.")
    parser.add_argument("--pool-file", help="A JSON file of the instances to route to, watched while serving "
                                             "(written by epdctl's supervisor for `epdctl scale`).")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--workers", type=number(int, 1, MAX_WORKERS), default=1,
                        help="Proxy processes sharing the port (SO_REUSEPORT), for hosts with cores to spare; each "
                             "balances by its own requests (default 1).")
    # Internal: how the parent of several workers starts each of them.
    parser.add_argument("--worker-index", type=number(int, 0, MAX_WORKERS - 1), help=argparse.SUPPRESS)
    parser.add_argument("--worker-parent", type=number(int, 1, 2 ** 31 - 1), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if (args.worker_index is None) != (args.worker_parent is None):
        parser.error("--worker-index and --worker-parent go together")
    args.encode_urls = _urls(args.encode_servers_urls, "--encode-servers-urls", parser)
    args.prefill_urls = _urls(args.prefill_servers_urls, "--prefill-servers-urls", parser)
    args.decode_urls = _urls(args.decode_servers_urls, "--decode-servers-urls", parser)
    if not args.decode_urls:
        parser.error("--decode-servers-urls: at least one decode (or PD) URL is required")
    for role in ("encode", "prefill", "decode"):
        names = getattr(args, f"{role}_servers_names")
        urls = getattr(args, f"{role}_urls")
        if names is not None:
            names = [n.strip() for n in names.split(",") if n.strip()]
            if len(names) != len(urls):
                parser.error(f"--{role}-servers-names: {len(names)} name(s) for {len(urls)} URL(s)")
        setattr(args, f"{role}_names", names)
    args.ec_zmq_addrs = _zmq_addresses(args, parser)
    args.metaserver_url = _metaserver_url(args, parser)
    return args


def _metaserver_url(args, parser: argparse.ArgumentParser) -> str | None:
    """The layerwise flow's call-back URL, built from the proxy's own address (vllm-ascend's proxy
    refuses a wildcard for the same reason: a decoder cannot call 0.0.0.0 back)."""
    from epdctl.connectors import MOONCAKE_LAYERWISE as LAYERWISE_KV_CONNECTOR
    from epdctl.connectors import WILDCARD_HOSTS, metaserver_url

    if args.kv_connector != LAYERWISE_KV_CONNECTOR:
        if args.metaserver_host is not None:
            parser.error(f"--metaserver-host is for --kv-connector {LAYERWISE_KV_CONNECTOR}")
        return None
    if not args.prefill_urls:
        parser.error(f"--kv-connector {LAYERWISE_KV_CONNECTOR} needs --prefill-servers-urls (the decoder-first flow "
                     "runs a prefill for each request)")
    if args.workers > 1:
        parser.error(f"--kv-connector {LAYERWISE_KV_CONNECTOR} runs with --workers 1: a decoder's metaserver call "
                     "must reach the worker that sent it the request")
    host = args.metaserver_host if args.metaserver_host is not None else args.host
    if host.strip() in WILDCARD_HOSTS:
        parser.error(f"--kv-connector {LAYERWISE_KV_CONNECTOR}: decoders call the proxy back at {host!r}, a wildcard "
                     "address: give --host a real address, or --metaserver-host the one decoders reach it at")
    if not re.fullmatch(r"[A-Za-z0-9_.:\[\]-]{1,253}", host):
        parser.error(f"--metaserver-host {host!r}: a host name or an IP address")
    return metaserver_url(host, args.port)


def _zmq_addresses(args, parser: argparse.ArgumentParser) -> list[str] | None:
    from epdctl.proxy.ec_handles import MOONCAKE, check_zmq_address

    flag = "--ec-consumer-zmq-addrs"
    if args.ec_consumer_zmq_addrs is None:
        if args.ec_connector == MOONCAKE and args.encode_urls:
            parser.error(f"--ec-connector {MOONCAKE} needs {flag}: its encoders push to a consumer the proxy names")
        return None
    if args.ec_connector != MOONCAKE:
        parser.error(f"{flag} is for --ec-connector {MOONCAKE}")
    addresses = [a.strip() for a in args.ec_consumer_zmq_addrs.split(",") if a.strip()]
    for address in addresses:
        problem = check_zmq_address(address)
        if problem:
            parser.error(f"{flag}: {problem}")
    consumers = "--prefill-servers-urls" if args.prefill_urls else "--decode-servers-urls"
    if len(addresses) != len(args.prefill_urls or args.decode_urls):
        parser.error(f"{flag}: {len(addresses)} address(es) for {len(args.prefill_urls or args.decode_urls)} "
                     f"{consumers} (one per EC consumer, in the same order)")
    return addresses


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    worker = "" if args.worker_index is None else f"[worker {args.worker_index}]"
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stdout,
                        format=f"%(asctime)s %(levelname)s %(name)s{worker}: %(message)s")
    if args.worker_index is None:
        # prometheus_client switches every metric to value files in PROMETHEUS_MULTIPROC_DIR when
        # it is set at import (vLLM's users often have it set): one process must not write files
        # into someone else's folder, nor fail when it is missing. Workers get a folder of ours.
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if args.workers > 1 and args.worker_index is None:
        from epdctl.proxy import workers

        return workers.run(args.workers, argv, args.host, args.port)
    try:
        import uvloop  # type: ignore

        uvloop.install()
    except ImportError:
        pass
    def orphaned() -> bool:
        return args.worker_index is not None and os.getppid() != args.worker_parent

    if orphaned():
        return 0  # a worker whose parent is gone already: nothing to serve, nothing to create
    try:
        return asyncio.run(_serve(args))
    except OSError:
        if orphaned():
            return 0  # the parent died during start-up and its metrics folder went with it
        raise


async def _serve(args) -> int:
    from aiohttp import web

    from epdctl.proxy.server import Proxy, ProxyConfig

    config = ProxyConfig(
        encode_urls=args.encode_urls, prefill_urls=args.prefill_urls, decode_urls=args.decode_urls,
        policy=args.policy, encode_timeout_s=args.encode_timeout_s, prefill_timeout_s=args.prefill_timeout_s,
        decode_timeout_s=args.decode_timeout_s, max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        ec_storage_path=args.ec_shared_storage_path, allowed_local_media_path=args.allowed_local_media_path,
        probe_interval_s=args.probe_interval_s, max_media_items=args.max_media_items, kv_connector=args.kv_connector,
        encode_names=args.encode_names, prefill_names=args.prefill_names, decode_names=args.decode_names,
        ec_connector=args.ec_connector, ec_consumer_zmq_addrs=args.ec_zmq_addrs, pool_file=args.pool_file,
        metaserver_url=args.metaserver_url,
        # A worker among several: metrics summed over all of them (epdctl/proxy/workers.py).
        metrics_dir=os.environ.get("PROMETHEUS_MULTIPROC_DIR") if args.worker_index is not None else None,
    )
    proxy = Proxy(config)
    runner = web.ServerRunner(proxy.server(), handle_signals=False)
    await runner.setup()
    await proxy.start()
    # SO_REUSEADDR, as uvicorn sets it for vLLM: a restart must not wait out the TIME_WAITs of
    # its last connections. (It never lets two listeners share a port on Linux.)
    # With several workers, each binds the port with SO_REUSEPORT and the kernel spreads the
    # connections; the parent checked first that nobody else listens there.
    worker = args.worker_index is not None
    try:
        await web.TCPSite(runner, args.host, args.port, reuse_address=True, reuse_port=worker or None).start()
    except OSError as exc:
        await runner.cleanup()
        await proxy.close()
        what = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound: {exc.strerror}"
        print(f"epdctl proxy: port {args.port} on {args.host} {what}", file=sys.stderr)
        return 1
    log = logging.getLogger("epdctl.proxy")
    log.info("EPD proxy on http://%s:%d: encode=%s prefill=%s decode=%s policy=%s",
             args.host, args.port, args.encode_urls or "-", args.prefill_urls or "-", args.decode_urls, args.policy)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if worker else ()):
        loop.add_signal_handler(sig, stop.set)
    if worker:
        from epdctl.proxy import workers

        watcher = asyncio.ensure_future(workers.watch_parent(args.worker_parent, stop))
    await stop.wait()
    log.info("shutting down")
    await runner.cleanup()
    await proxy.close()
    if worker:
        watcher.cancel()
        workers.orphan_cleanup(args.worker_parent)
    return 0


if __name__ == "__main__":
    from epdctl.errors import EpdctlError

    try:
        sys.exit(main())
    except EpdctlError as exc:  # a usage error: one line, as from `epdctl proxy`
        print(f"epdctl {exc.message}", file=sys.stderr)
        sys.exit(exc.exit_code)
