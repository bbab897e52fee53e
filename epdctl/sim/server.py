"""The simulated engine's HTTP server: OpenAI chat/completions with vLLM's EC and KV contracts.

Time passes in one asyncio step loop per instance (costmodel.Scheduler: vLLM's scheduler in
miniature), so one sim serves many concurrent requests on little CPU: it is the backend of the
proxy and bench benchmarks, so per-request work is kept small.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from epdctl import jsoncodec
from epdctl.connectors import ec_exists, load_ec, save_ec
from epdctl.media import MediaError, MediaItem, check_media_key, content_hash, iter_media, local_media_path
from epdctl.sim.contention import Pace
from epdctl.sim.costmodel import DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS, CostModel, Scheduler, Seq
from epdctl.sim.layerwise import LAYERWISE, LayerwiseKV, TransferError, vllm_request_id

log = logging.getLogger("epdctl.sim")
disable_created_metrics()  # `_created` gauges only clutter what smoke and people read

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven bright encoders hum and "
    "prefill waits for decode to stream tokens across the disaggregated cluster"
).split()
# vLLM's histogram buckets (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
TOKENS_PER_MEDIA_ITEM = 64  # the sim's "encoder output length" per item
HIDDEN_SIZE = 128
DEFAULT_MAX_TOKENS = 16
# vLLM's `--limit-mm-per-prompt` keys, and its default limit per modality.
MODALITY = {"image_url": "image", "video_url": "video", "audio_url": "audio", "input_audio": "audio"}
DEFAULT_MM_LIMIT = 999


@dataclass
class SimConfig:
    model: str
    served_names: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    ttft_ms: float = 20.0
    tpot_ms: float = 2.0
    encode_ms: float = 10.0
    step_per_seq_ms: float = 0.0  # added to every step per running request (batching's cost)
    prefill_token_ms: float = 0.0  # added per prompt token prefilled
    encode_base_ms: float = 0.0  # added once to a step that encodes anything
    prefill_request_ms: float = 0.0  # added to a prefill step per request it prefills
    ec_load_ms: float = 0.0  # added per media item a consumer loads from the EC
    request_ms: float = 0.0  # the API server's work per request, one request at a time (before the loop)
    contention: str = "none"  # none | device | cpu (epdctl/sim/contention.py)
    cpu_share: float = 1.0  # cpu: the part of each cost burnt as CPU time
    sleep_share: Optional[float] = None  # cpu: the part slept (default: what cpu_share leaves)
    device_slots: int = 1  # device: steps the device runs side by side at full speed
    ledger: Optional[str] = None  # device: the ledger file the topology's sims share
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    ec_role: Optional[str] = None  # ec_producer | ec_consumer | ec_both
    ec_path: Optional[str] = None
    kv_role: Optional[str] = None  # kv_producer | kv_consumer | kv_both
    allowed_local_media_path: Optional[str] = None
    max_model_len: int = 32768
    limit_mm_per_prompt: dict[str, int] = field(default_factory=dict)  # modality → items; DEFAULT_MM_LIMIT otherwise
    side_channel_port: int = 5600
    engine_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    kv_connector: Optional[str] = None  # MooncakeLayerwiseConnector: the decoder-first flow (sim/layerwise.py)
    kv_port: int = 14579


@dataclass
class Ask:
    """A request that passed every check, with what the sim derived from it."""

    body: dict
    model: Optional[str]
    max_tokens: int
    stream: bool
    text: str
    keys: list[str]  # the media items' mm_hashes
    prompt_tokens: int
    kv_in: Optional[dict]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, kind: str = "BadRequestError"):
        super().__init__(message)
        self.status = status
        self.kind = kind


def error_response(message: str, status: int = 400, kind: str = "BadRequestError") -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, registry=self.registry)

        self.requests = counter("epdctl_sim_requests", "Requests served (chat and completions).")
        self.encoded = counter("epdctl_sim_encoded_items", "Media items encoded here (as producer, or a consumer's miss).")
        self.ec_loaded = counter("epdctl_sim_ec_loaded", "Encoder-cache files a consumer loaded.")
        self.ec_missed = counter("epdctl_sim_ec_missed", "Media items a consumer found no encoder-cache file for.")
        self.prefills = counter("epdctl_sim_prefills", "Prefills computed here.")
        self.remote_prefills = counter("epdctl_sim_remote_prefills", "Decodes that used KV from a prefill instance.")
        self.kv_pushes = counter("epdctl_sim_kv_pushes", "Prefills whose KV this instance pushed to a decoder (layerwise).")
        # vLLM's own names and buckets, timed on the step loop's clock: what the engine saw, without
        # HTTP or proxy, so a client's figures can be checked against the server's.
        label = ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", label,
                              registry=self.registry, buckets=TTFT_BUCKETS)
        self.tpot = Histogram("vllm:request_time_per_output_token_seconds", "Time per output token, per request.",
                              label, registry=self.registry, buckets=TPOT_BUCKETS)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Queued to last token.", label,
                             registry=self.registry, buckets=TTFT_BUCKETS)
        self.contention = Gauge("epdctl_sim_contention_seconds", "Time steps took beyond their cost because "
                                "the device or the cores were shared (--sim-contention).", registry=self.registry)
        self.sharers = Gauge("epdctl_sim_contention_peak_sharers", "Most sims seen stepping at once on this "
                             "one's device (--sim-contention device).", registry=self.registry)
        self.running = Gauge("vllm:num_requests_running", "Requests in the step loop.", label, registry=self.registry)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for a slot.", label, registry=self.registry)


class SimEngine:
    def __init__(self, config: SimConfig, pace: Optional[Pace] = None) -> None:
        self.config = config
        self.pace = pace or Pace()
        self.metrics = Metrics()
        self._block_ids = itertools.count()
        self._ids = itertools.count()
        # One step loop per instance (vLLM's scheduler in miniature): at most max_num_seqs run,
        # the rest wait, and encode time adds up within a step (one encoder, items one after another).
        self._api_server = asyncio.Lock()
        self.scheduler = Scheduler(CostModel(prefill_ms=config.ttft_ms, decode_ms=config.tpot_ms,
                                             encode_ms=config.encode_ms, per_seq_ms=config.step_per_seq_ms,
                                             prefill_token_ms=config.prefill_token_ms,
                                             encode_base_ms=config.encode_base_ms,
                                             prefill_request_ms=config.prefill_request_ms,
                                             ec_load_ms=config.ec_load_ms),
                                   config.max_num_seqs, config.max_num_batched_tokens, on_finish=self._timed,
                                   pace=None if type(self.pace) is Pace else self.pace)
        name = config.served_names[0]
        self._ttft, self._tpot, self._e2e = (h.labels(model_name=name) for h in
                                             (self.metrics.ttft, self.metrics.tpot, self.metrics.e2e))
        self.layerwise = None
        if config.kv_connector == LAYERWISE and config.kv_role:
            self.layerwise = LayerwiseKV(config.host, config.kv_port, config.kv_role, config.engine_id)
        self.metrics.running.labels(model_name=name).set_function(lambda: self.scheduler.running)
        self.metrics.waiting.labels(model_name=name).set_function(lambda: len(self.scheduler.waiting))
        self.metrics.contention.set_function(lambda: self.pace.stretched_s)
        self.metrics.sharers.set_function(lambda: self.pace.peak_sharers)

    def _timed(self, seq: Seq) -> None:
        self._e2e.observe(seq.done_at - seq.arrived)
        if not seq.decode:
            return  # an encoder-only request has no tokens to time
        self._ttft.observe(seq.first_at - seq.arrived)
        if seq.output > 1:
            self._tpot.observe((seq.done_at - seq.first_at) / (seq.output - 1))

    # ------------------------------------------------------------ request model

    def _media_items(self, body: dict) -> list[MediaItem]:
        """The request's media items, refused above `--limit-mm-per-prompt` as vLLM refuses them."""
        items: list[MediaItem] = []
        counts: collections.Counter = collections.Counter()
        try:
            for item in iter_media(body):  # counted as they come: a refused request builds no long list
                modality = MODALITY[item.kind]
                counts[modality] += 1
                limit = self.config.limit_mm_per_prompt.get(modality, DEFAULT_MM_LIMIT)
                if counts[modality] > limit:
                    raise BadRequest(f"At most {limit} {modality}(s) may be provided in one prompt.")
                items.append(item)
        except MediaError as exc:
            raise BadRequest(str(exc)) from None
        return items

    def _media_keys(self, items: list[MediaItem]) -> list[str]:
        """The mm_hash of each media item: its uuid when given (as vLLM), else a content hash.

        A uuid becomes a folder name under the EC path, so one that is not a plain file name is refused.
        """
        keys = []
        try:
            for item in items:
                if item.uuid is not None:
                    keys.append(check_media_key(item.uuid))
                    continue
                path = local_media_path(item.locator, self.config.allowed_local_media_path)
                if path is not None:
                    try:
                        with open(path, "rb") as handle:
                            keys.append(hashlib.sha256(handle.read()).hexdigest())
                    except OSError as exc:
                        raise MediaError(f"cannot read {item.locator}: {exc.strerror}") from None
                else:
                    keys.append(content_hash(item.locator))
        except MediaError as exc:
            raise BadRequest(str(exc)) from None
        return keys

    def _encode_items(self, keys: list[str], remote_prefill: bool) -> tuple[int, int]:
        """Apply the EC contract; return how many items this instance must encode itself, and how many it loaded."""
        cfg = self.config
        if remote_prefill:
            return 0, 0  # encoder outputs only feed the prefill, which ran elsewhere
        to_encode = loaded = 0
        for key in keys:
            if cfg.ec_role in ("ec_producer", "ec_both") and cfg.ec_path:
                if ec_exists(cfg.ec_path, key):
                    continue  # as vLLM's scheduler: an item already in the cache is not recomputed
                save_ec(cfg.ec_path, key, TOKENS_PER_MEDIA_ITEM, HIDDEN_SIZE)
                to_encode += 1
            elif cfg.ec_role == "ec_consumer" and cfg.ec_path:
                if load_ec(cfg.ec_path, key) is not None:
                    self.metrics.ec_loaded.inc()
                    loaded += 1
                    continue
                self.metrics.ec_missed.inc()
                log.info("EC miss for mm_hash %s: encoding locally", key)
                to_encode += 1
            else:
                to_encode += 1
        if to_encode:
            self.metrics.encoded.inc(to_encode)
        return to_encode, loaded

    def _answer_tokens(self, seed_text: str, count: int) -> Iterator[str]:
        """One token at a time: a stream never holds its whole answer in memory."""
        start = int.from_bytes(hashlib.blake2b(seed_text.encode(), digest_size=4).digest(), "little")
        return (" " + WORDS[(start + i) % len(WORDS)] for i in range(count))

    def _kv_params_out(self) -> dict[str, Any]:
        """What NixlConnector's producer returns, so the proxy can hand it to a decoder."""
        base = next(self._block_ids) * 4
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": [base, base + 1, base + 2, base + 3],
            "remote_engine_id": self.config.engine_id,
            "remote_host": "127.0.0.1",
            "remote_port": self.config.side_channel_port,
            "tp_size": 1,
        }

    # ------------------------------------------------------------ handlers

    def _read(self, raw: bytes, chat: bool) -> Ask:
        """The request, checked as vLLM checks it, before the sim allocates anything for it."""
        try:
            body = jsoncodec.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise BadRequest(f"malformed JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        model = body.get("model")
        if model is not None and model not in self.config.served_names:
            raise BadRequest(f"The model `{model}` does not exist.", 404, "NotFoundError")
        # As vLLM: max_completion_tokens unless null, else max_tokens; null or absent sets no limit.
        max_tokens = body.get("max_completion_tokens") if chat else None
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
            raise BadRequest("max_tokens must be a positive integer")
        n = body.get("n", 1)
        if n is not None and n != 1:
            # Each choice would cost a full answer; the sim models one, so it refuses rather than lie.
            raise BadRequest(f"n must be 1: the simulated engine answers one choice per request (got {repr(n)[:40]})")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("stream must be a boolean")
        kv_in = body.get("kv_transfer_params")
        if kv_in is not None and not isinstance(kv_in, dict):
            raise BadRequest("kv_transfer_params must be an object")
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise BadRequest("messages must be a non-empty list")
            text = json.dumps(messages, sort_keys=True)
            items = self._media_items(body)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, (str, list)) or not prompt:
                raise BadRequest("prompt must be a non-empty string or list")
            text = json.dumps(prompt)
            items = []
        # Media payloads are not prompt text: an image costs TOKENS_PER_MEDIA_ITEM, whatever its bytes.
        text_chars = len(text) - sum(len(item.locator) for item in items)
        prompt_tokens = max(1, text_chars // 4) + TOKENS_PER_MEDIA_ITEM * len(items)
        max_tokens = self._answer_length(prompt_tokens, max_tokens)
        return Ask(body, model, max_tokens, stream, text, self._media_keys(items), prompt_tokens, kv_in)

    def _answer_length(self, prompt_tokens: int, max_tokens: Optional[int]) -> int:
        """The tokens to answer, refused as vLLM refuses (and worded): a prompt or an answer beyond
        the context is never started. With no limit given vLLM answers up to the context left, and a
        real model stops at its end of sequence long before; the sim, which has none, stops at
        DEFAULT_MAX_TOKENS (within the context left, as vLLM bounds its own default)."""
        limit = self.config.max_model_len
        if prompt_tokens >= limit:
            raise BadRequest(f"This model's maximum context length is {limit} tokens. However, your request has "
                             f"{prompt_tokens} input tokens. Please reduce the length of the input messages.")
        if max_tokens is None:
            return min(DEFAULT_MAX_TOKENS, limit - prompt_tokens)
        if prompt_tokens + max_tokens > limit:
            raise BadRequest(f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
                             f"maximum context length is {limit} tokens and your request has {prompt_tokens} input "
                             f"tokens ({max_tokens} > {limit} - {prompt_tokens}).")
        return max_tokens

    async def handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        arrived = asyncio.get_running_loop().time()  # vLLM times a request from its arrival, EC I/O included
        request_id = request.headers.get("X-Request-Id") or f"sim-{next(self._ids)}"
        headers = {"X-Request-Id": request_id}
        try:
            ask = self._read(await request.read(), chat)
        except BadRequest as exc:
            return error_response(str(exc), exc.status, exc.kind)
        body, model, max_tokens, keys, kv_in = ask.body, ask.model, ask.max_tokens, ask.keys, ask.kv_in
        cfg = self.config
        self.metrics.requests.inc()
        remote_prefill = bool(
            kv_in and kv_in.get("do_remote_prefill") and cfg.kv_role in ("kv_consumer", "kv_both")
        )
        push = bool(self.layerwise and kv_in and kv_in.get("do_remote_decode") and kv_in.get("remote_host")
                    and cfg.kv_role in ("kv_producer", "kv_both"))
        if remote_prefill and self.layerwise is not None:
            # Decoder first: the prefill starts on our metaserver call; its KV arrives before we decode.
            try:
                await self.layerwise.receive(vllm_request_id(chat, request_id), kv_in)
            except TransferError as exc:
                return error_response(f"KV transfer failed: {exc}", 500, "InternalServerError")
        encoded_here, loaded_here = self._encode_items(keys, remote_prefill)
        if remote_prefill:
            self.metrics.remote_prefills.inc()
        else:
            self.metrics.prefills.inc()
        kv_out = None
        if kv_in and kv_in.get("do_remote_decode") and cfg.kv_role in ("kv_producer", "kv_both") and not push:
            kv_out = self._kv_params_out()  # a layerwise producer returns none: it pushed the KV itself

        # An ec_producer runs the encoder only (vLLM resolves it to mm_encoder_only): it costs its
        # items' encode time, no prefill and no decode, and finishes once the prompt is consumed.
        encoder_only = cfg.ec_role == "ec_producer"
        if cfg.request_ms > 0:
            # vLLM's API server is one process: its per-request work (templating, tokenising, image
            # preprocessing) is done one request at a time, before the engine sees the request.
            async with self._api_server:
                await self.pace.api_server(cfg.request_ms / 1000)
        seq = Seq(output=max_tokens, prefill=not (remote_prefill or encoder_only), prefill_tokens=ask.prompt_tokens,
                  items=encoded_here, loaded=loaded_here, decode=not encoder_only, stream=ask.stream,
                  arrived=arrived)
        # The answer depends on the prompt and the media keys only, so EPD and aggregated agree.
        tokens = self._answer_tokens(ask.text + "|".join(keys), max_tokens)
        prompt_tokens = ask.prompt_tokens
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": max_tokens,
            "total_tokens": prompt_tokens + max_tokens,
        }
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        created = int(time.time())
        if not ask.stream:
            await self.scheduler.run(seq)
            if push:
                try:
                    await self.layerwise.push(vllm_request_id(chat, request_id), kv_in)
                except TransferError as exc:
                    return error_response(f"KV transfer failed: {exc}", 500, "InternalServerError")
                self.metrics.kv_pushes.inc()
            content = "".join(tokens)
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": content},
                          "logprobs": None, "finish_reason": "length", "stop_reason": None}
            else:
                choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": "length", "stop_reason": None}
            payload = {
                "id": ident, "object": "chat.completion" if chat else "text_completion",
                "created": created, "model": model or cfg.served_names[0],
                "choices": [choice], "usage": usage, "kv_transfer_params": kv_out,
            }
            # orjson: the standard library's encoder was a tenth of the sim's CPU per request.
            return web.Response(body=jsoncodec.dumps(payload), content_type="application/json", headers=headers)

        response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        base = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": model or cfg.served_names[0]}
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if isinstance(body.get("stream_options"), dict) else False

        def event(choices: list, **extra: Any) -> bytes:
            return b"data: " + jsoncodec.dumps({**base, "choices": choices, **extra}) + b"\n\n"

        self.scheduler.submit(seq)
        try:
            while not seq.produced:
                seq.event.clear()
                await seq.event.wait()
            if chat:
                await response.write(event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]))
            await self._stream_tokens(response, seq, tokens, kv_out, chat, event)
        finally:
            self.scheduler.abort(seq)  # a client gone mid-answer frees its slot; a finished one is a no-op
        if include_usage:
            await response.write(event([], usage=usage))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _stream_tokens(self, response, seq: Seq, tokens: Iterator[str], kv_out, chat: bool, event) -> None:
        max_tokens = seq.output
        for i, token in enumerate(tokens):
            while seq.produced <= i:
                seq.event.clear()
                await seq.event.wait()
            last = i == max_tokens - 1
            finish = "length" if last else None
            if chat:
                choice = {"index": 0, "delta": {"content": token}, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": token, "logprobs": None, "finish_reason": finish}
            extra = {"kv_transfer_params": kv_out} if last and kv_out else {}
            await response.write(event([choice], **extra))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self.handle(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.handle(request, chat=False)

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "epdctl-sim", "root": self.config.model,
             "parent": None, "max_model_len": self.config.max_model_len}
            for name in self.config.served_names
        ]
        return web.json_response({"object": "list", "data": data})

    async def metrics_text(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(engine: SimEngine, max_body_bytes: int = 256 * 1024 * 1024) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes)
    app.router.add_post("/v1/chat/completions", engine.chat)
    app.router.add_post("/v1/completions", engine.completions)
    app.router.add_get("/health", engine.health)
    app.router.add_get("/v1/models", engine.models)
    app.router.add_get("/metrics", engine.metrics_text)
    if engine.layerwise is not None:
        layerwise = engine.layerwise

        async def start(app: web.Application) -> None:
            await layerwise.start()

        async def close(app: web.Application) -> None:
            await layerwise.close()

        app.on_startup.append(start)
        app.on_cleanup.append(close)
    return app


def configure_from_env(config: SimConfig) -> None:
    port = os.environ.get("VLLM_NIXL_SIDE_CHANNEL_PORT")
    if port and port.isdigit():
        config.side_channel_port = int(port)
