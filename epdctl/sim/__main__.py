"""`python -m epdctl.sim MODEL --port P ...`: accepts `vllm serve`'s argument shapes."""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import signal
import subprocess
import sys
from typing import Optional

HELP = """\
epdctl's SIMULATED engine: a stand-in for `vllm serve` for tests, demos and CI.
It is NOT an inference engine: it returns deterministic filler text after configurable
sleeps, while keeping vLLM's encoder-cache (ECExampleConnector) and KV (NixlConnector)
contracts so a disaggregated topology can run and be proven on a machine with no GPU.
Flags of `vllm serve` that it does not model are accepted and ignored."""

from epdctl.config.simflags import CONTENTION_FLAGS, COST_FLAGS, TESTING_FLAGS, SimFlag, value_problem
from epdctl.sim.costmodel import DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS

_IDLE_CHILD = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: time.sleep(1)\n"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m epdctl.sim", description=HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Model name (or give it positionally, as `vllm serve MODEL`).")
    parser.add_argument("--served-model-name", nargs="+", help="Names the API answers to (default: the model).")
    parser.add_argument("--host", default="127.0.0.1", help="Bind address (default 127.0.0.1).")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--ec-transfer-config", help="vLLM's EC connector JSON (ec_role, shared_storage_path).")
    parser.add_argument("--kv-transfer-config", help="vLLM's KV connector JSON (kv_role).")
    parser.add_argument("--allowed-local-media-path", help="Folder under which file:// media may be read.")
    parser.add_argument("--max-model-len", type=int, default=32768,
                        help="Context length: longer prompts, and max_tokens beyond it, get vLLM's 400.")
    parser.add_argument("--limit-mm-per-prompt", type=_mm_limits, default={}, metavar="JSON",
                        help='Media items per prompt, as vLLM: \'{"image": 4}\' (default 999 per modality).')
    sim = parser.add_argument_group("simulation (epdctl/sim/costmodel.py; docs/sim.md)")
    for flag in COST_FLAGS:
        _add_flag(sim, flag)
    parser.add_argument("--max-num-seqs", type=int, default=DEFAULT_MAX_NUM_SEQS,
                        help=f"Requests running at once, as vLLM's flag; the rest wait, first come first served "
                             f"(default {DEFAULT_MAX_NUM_SEQS}, vLLM's for a GPU server).")
    parser.add_argument("--max-num-batched-tokens", type=int, default=DEFAULT_MAX_NUM_BATCHED_TOKENS,
                        help=f"Tokens per step, as vLLM's flag: longer prompts are prefilled in chunks "
                             f"(default {DEFAULT_MAX_NUM_BATCHED_TOKENS}).")
    contention = parser.add_argument_group("contention (epdctl/sim/contention.py; docs/sim.md#contention)")
    for flag in CONTENTION_FLAGS:
        _add_flag(contention, flag)
    contention.add_argument("--sim-ledger", metavar="FILE",
                            help="With --sim-contention device: the ledger the sims of a topology share (epdctl up "
                                 "passes one in the topology's state folder).")
    testing = parser.add_argument_group("testing the supervisor")
    for flag in TESTING_FLAGS:
        _add_flag(testing, flag)
    model = None
    if argv and not argv[0].startswith("-"):
        model, argv = argv[0], argv[1:]
    args, unknown = parser.parse_known_args(argv)
    args.model = args.model or model
    if not args.model:
        parser.error("a model is required (positional, or --model)")
    for flag in ("max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    for flag in COST_FLAGS + CONTENTION_FLAGS + TESTING_FLAGS:
        value = getattr(args, flag.name.replace("-", "_"))
        problem = value_problem(flag, value)
        if problem:  # nan, inf and negative times: validate refuses the same values (epdctl/config/simflags.py)
            parser.error(f"--{flag.name} {problem}")
    return args, unknown


def _add_flag(group, flag: SimFlag) -> None:
    if flag.kind == "switch":
        group.add_argument(f"--{flag.name}", action="store_true", help=f"{flag.help}.")
    elif flag.kind == "choice":
        group.add_argument(f"--{flag.name}", choices=flag.choices, help=f"{flag.help}.")
    elif flag.kind == "count":
        group.add_argument(f"--{flag.name}", type=int, default=flag.default, help=f"{flag.help} (default {flag.default}).")
    else:
        default = "" if flag.default is None else f" (default {flag.default:g})"
        group.add_argument(f"--{flag.name}", type=float, default=flag.default, help=f"{flag.help}{default}.")


def _mm_limits(raw: str) -> dict[str, int]:
    """vLLM's JSON form: {"image": 4} or {"image": {"count": 4, ...}}."""
    try:
        limits = json.loads(raw)
        return {str(k): int(v["count"] if isinstance(v, dict) else v) for k, v in limits.items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        raise argparse.ArgumentTypeError(f"not a JSON object of counts per modality: {raw!r}") from None


def _role(raw: Optional[str], key: str, flag: str) -> tuple[Optional[str], dict]:
    if not raw:
        return None, {}
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise SystemExit(f"epdctl.sim: {flag} is not valid JSON: {exc}")
    if not isinstance(config, dict):
        raise SystemExit(f"epdctl.sim: {flag} must be a JSON object")
    return config.get(key), config


def _kv_port(kv: dict) -> int:
    """kv_port as vLLM's KVTransferConfig reads it (an int, or its digits as text), else its default."""
    value = kv.get("kv_port", 14579) if kv else 14579
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise SystemExit(f"epdctl.sim: --kv-transfer-config kv_port must be a port number (got {value!r})")
    return value


def main(argv: Optional[list[str]] = None) -> int:
    args, unknown = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    log = logging.getLogger("epdctl.sim")
    if unknown:
        log.info("ignoring flags the sim does not model: %s", " ".join(unknown))

    # Set at prometheus_client's import, PROMETHEUS_MULTIPROC_DIR would send every metric to value
    # files in that folder (someone else's; a traceback when it is missing). The sim is one process.
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    from epdctl.sim.server import SimConfig, configure_from_env

    ec_role, ec = _role(args.ec_transfer_config, "ec_role", "--ec-transfer-config")
    kv_role, kv = _role(args.kv_transfer_config, "kv_role", "--kv-transfer-config")
    ec_path = (ec.get("ec_connector_extra_config") or {}).get("shared_storage_path") if ec else None
    config = SimConfig(
        model=args.model, served_names=tuple(args.served_model_name or [args.model]),
        host=args.host, port=args.port, ttft_ms=args.sim_ttft_ms, tpot_ms=args.sim_tpot_ms,
        encode_ms=args.sim_encode_ms, ec_role=ec_role, ec_path=ec_path, kv_role=kv_role,
        allowed_local_media_path=args.allowed_local_media_path, max_model_len=args.max_model_len,
        limit_mm_per_prompt=args.limit_mm_per_prompt, step_per_seq_ms=args.sim_step_per_seq_ms,
        prefill_token_ms=args.sim_prefill_token_ms, encode_base_ms=args.sim_encode_base_ms,
        prefill_request_ms=args.sim_prefill_request_ms, ec_load_ms=args.sim_ec_load_ms,
        request_ms=args.sim_request_ms, contention=args.sim_contention or "none", cpu_share=args.sim_cpu_share,
        sleep_share=args.sim_sleep_share,
        device_slots=args.sim_device_slots, ledger=args.sim_ledger,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        kv_connector=kv.get("kv_connector") if kv else None, kv_port=_kv_port(kv),
    )
    configure_from_env(config)
    if args.sim_ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.sim_spawn_child:
        subprocess.Popen([sys.executable, "-c", _IDLE_CHILD], stdin=subprocess.DEVNULL,
                         start_new_session=args.sim_spawn_child == "session")
    try:
        import uvloop  # type: ignore

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_serve(config, args, log))


async def _serve(config, args, log) -> int:
    from epdctl.sim.contention import make_pace
    from epdctl.sim.server import SimEngine, build_app

    pace = await make_pace(config.contention, ledger_path=config.ledger, slots=config.device_slots,
                           cpu_share=config.cpu_share, sleep_share=config.sleep_share)
    try:
        return await _listen(config, build_app(SimEngine(config, pace)), args, log)
    finally:
        pace.close()


async def _listen(config, app, args, log) -> int:
    from aiohttp import web

    if args.sim_startup_ms:
        await asyncio.sleep(args.sim_startup_ms / 1000)
    # handler_cancellation: a client that disconnects cancels its handler, which frees its slot in
    # the step loop, as vLLM aborts such a request (aiohttp's default lets it run to the end).
    runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True)
    try:
        await runner.setup()  # a layerwise decoder binds its kv_port here
    except OSError as exc:
        await runner.cleanup()
        what = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound: {exc.strerror}"
        print(f"epdctl.sim: the kv_port on {config.host} {what}", file=sys.stderr)
        return 1
    # SO_REUSEADDR, as uvicorn sets it for vLLM: a restart must not wait out the TIME_WAITs of
    # its last connections. (It never lets two listeners share a port on Linux.)
    try:
        await web.TCPSite(runner, config.host, config.port, reuse_address=True).start()
    except OSError as exc:
        await runner.cleanup()
        if exc.errno == errno.EADDRINUSE:
            print(f"epdctl.sim: port {config.port} on {config.host} is already in use", file=sys.stderr)
        else:
            print(f"epdctl.sim: cannot listen on {config.host}:{config.port}: {exc.strerror}", file=sys.stderr)
        return 1
    log.info("sim engine for %s on http://%s:%d (ec_role=%s ec_path=%s kv_role=%s)",
             config.model, config.host, config.port, config.ec_role, config.ec_path, config.kv_role)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if not args.sim_ignore_sigterm:
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    code = 0
    if args.sim_exit_after_s is not None:
        try:
            await asyncio.wait_for(stop.wait(), args.sim_exit_after_s)
        except asyncio.TimeoutError:
            log.error("exiting on purpose (--sim-exit-after-s)")
            code = 3
    else:
        await stop.wait()
    log.info("shutting down")
    await runner.cleanup()
    return code


if __name__ == "__main__":
    sys.exit(main())
