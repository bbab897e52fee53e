"""The EPD proxy's HTTP server (aiohttp): encode fan-out, prefill, streamed decode.

Per request (docs/design.md, Separate processes: the proxy and the sim):
1. each media item not already in the EC goes to an encoder (text removed, max_tokens 1), in
   parallel, keyed by a content-derived `uuid` that the decoder sees too;
2. with prefill instances, a P computes the KV (max_tokens 1, `do_remote_decode`), and the
   `kv_transfer_params` it returns go into the decode request;
3. a D or PD gets the request and its answer is streamed back.

Unlike the upstream proxy, nothing is sent to the client before the decoder's first byte is
in hand, so an error up to then is a proper status with an OpenAI-style JSON body; after it,
an error becomes an SSE error event followed by `[DONE]`, never a silently cut stream.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from epdctl import jsoncodec
from epdctl.connectors import HANDOFF_KV_CONNECTORS, MOONCAKE_LAYERWISE, PREFILL_KV_PARAMS, ec_exists
from epdctl.media import MediaError, check_media_key, content_hash, iter_media, local_media_path, strip_text
from epdctl.proxy.ec_handles import HANDLE_CONNECTORS, consumer_params, push_params
from epdctl.proxy.errors import (JsonErrorServer, StageError, describe_failure, error_body, error_response, snippet,
                                 too_large)
from epdctl.proxy.metrics import Metrics, Outcome, outcome_of
from epdctl.proxy.pool import Backend, NoBackend, Pool

log = logging.getLogger("epdctl.proxy")
disable_created_metrics()

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
PROBE_TIMEOUT_S = 2.0
# While some backend is not known healthy (start-up, a restart), probe this often, so `/health`
# can answer from known state at once without making `up` wait a whole probe period.
FAST_PROBE_INTERVAL_S = 0.25
# Encoder calls in flight: per request (one request with many images must not take every
# connection) and in all (file descriptors are finite).
ENCODE_CALLS_PER_REQUEST = 16
ENCODE_CALLS_TOTAL = 512
CONNECT_TIMEOUT_S = 10.0
FORWARDED_HEADERS = ("Authorization",)
SKIPPED_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding")
SSE_DONE = b"data: [DONE]\n\n"
# Fields only the proxy sets: dropped from a client's request before any instance sees it.
CLIENT_TRANSFER_FIELDS = ("ec_transfer_params", "kv_transfer_params")


@dataclass
class ProxyConfig:
    encode_urls: list[str]
    prefill_urls: list[str]
    decode_urls: list[str]
    policy: str = "least-loaded"
    encode_timeout_s: float = 300.0
    prefill_timeout_s: float = 600.0
    decode_timeout_s: float = 600.0
    max_body_bytes: int = 64 * 1024 * 1024
    ec_storage_path: Optional[str] = None
    allowed_local_media_path: Optional[str] = None
    probe_interval_s: float = 2.0
    kv_connector: str = "NixlConnector"  # the P->D KV connector (kv_connector of --kv-transfer-config)
    max_media_items: int = 64
    encode_names: Optional[list[str]] = None  # instance names from the plan, for logs and metrics
    prefill_names: Optional[list[str]] = None
    decode_names: Optional[list[str]] = None
    # The EC connector (ec_connector of --ec-transfer-config): ECCPUConnector and ECMooncakeConnector
    # need the proxy to carry encoder answers to the consumer (epdctl/proxy/ec_handles.py).
    ec_connector: str = "ECExampleConnector"
    # ECMooncakeConnector: each consumer's control address, in the order of the consumer pool
    # (the prefill URLs with P instances, else the decode URLs).
    ec_consumer_zmq_addrs: Optional[list[str]] = None
    # One of several workers: /metrics sums every worker's values from this folder
    # (prometheus_client's multiprocess mode; epdctl/proxy/workers.py).
    metrics_dir: Optional[str] = None
    # The pool the supervisor wants, watched while serving (epdctl scale; proxy/membership.py).
    pool_file: Optional[str] = None
    # MooncakeLayerwiseConnector: the metaserver URL decoders call back (proxy/layerwise.py).
    metaserver_url: Optional[str] = None


class Proxy:
    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.exposed = self.metrics.registry
        if config.metrics_dir:
            self.exposed = CollectorRegistry(auto_describe=False)
            MultiProcessCollector(self.exposed, path=config.metrics_dir)
        self.encode = Pool("encode", config.encode_urls, config.policy, config.encode_names)
        self.prefill = Pool("prefill", config.prefill_urls, config.policy, config.prefill_names)
        self.decode = Pool("decode", config.decode_urls, config.policy, config.decode_names)
        self.encode_slots = asyncio.Semaphore(ENCODE_CALLS_TOTAL)
        self.pools = [p for p in (self.encode, self.prefill, self.decode) if p]
        for pool in self.pools:
            for backend in pool.backends:
                backend.gauge = self.metrics.in_flight.labels(pool.role, backend.name, backend.url)
            self.metrics.pool_size.labels(pool.role).set(len(pool.backends))
        self._watcher: Optional[asyncio.Task] = None
        self.timeouts = {
            "encode": aiohttp.ClientTimeout(total=config.encode_timeout_s, sock_connect=CONNECT_TIMEOUT_S),
            "prefill": aiohttp.ClientTimeout(total=config.prefill_timeout_s, sock_connect=CONNECT_TIMEOUT_S),
            # A stream may run for long; what must not last is the silence between bytes.
            "decode": aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=config.decode_timeout_s),
        }
        self.sessions: dict[str, aiohttp.ClientSession] = {}
        self._id_prefix = secrets.token_hex(8) + "-"
        self._id_counter = itertools.count(1)
        self._prober: Optional[asyncio.Task] = None
        self._warned_no_kv = False
        consumers = self.prefill or self.decode
        self.ec_zmq: dict[Backend, str] = dict(zip(consumers.backends, config.ec_consumer_zmq_addrs or []))
        self.layerwise = None
        if config.kv_connector == MOONCAKE_LAYERWISE and self.prefill and config.metaserver_url:
            from epdctl.proxy.layerwise import Layerwise

            self.layerwise = Layerwise(self, config.metaserver_url)

    def _new_request_id(self) -> str:
        # Unique per proxy process without a urandom call per request: a random prefix drawn once.
        return f"{self._id_prefix}{next(self._id_counter):x}"

    # ------------------------------------------------------------ lifecycle

    def server(self) -> web.Server:
        """aiohttp's low-level server with one handler: the proxy has five fixed routes, and an
        Application (router, middlewares, signals) costs several µs per request on the hot path."""
        routes = {
            ("POST", CHAT_PATH): self.chat, ("POST", COMPLETIONS_PATH): self.completions,
            ("GET", "/v1/models"): self.models, ("GET", "/health"): self.health, ("GET", "/metrics"): self.metrics_text,
        }
        if self.layerwise is not None:
            from epdctl.proxy.layerwise import METASERVER_PATH

            routes[("POST", METASERVER_PATH)] = self.layerwise.metaserver
        paths = {path for _, path in routes}
        limit = self.config.max_body_bytes
        loop = asyncio.get_running_loop()  # web.Server needs a running loop too

        async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
            method = "GET" if request.method == "HEAD" else request.method
            handler = routes.get((method, request.path))
            if handler is not None:
                expect = request.headers.get("Expect")
                if expect is not None and request.version >= (1, 1):
                    # What an Application's router does: a client that waits for "100 Continue"
                    # before its body (curl with -H 'Expect: 100-continue', many clients past a
                    # size) would otherwise stall for its own timeout, a second for curl.
                    if expect.lower() != "100-continue":
                        return error_response(f"unsupported Expect: {expect[:100]}", 417)
                    if (request.content_length or 0) > limit:
                        # Refused before the client sends its body: "Connection: close", as whether
                        # that body follows now is the client's choice (aiohttp discards it, if so).
                        response = error_response(too_large(limit), 413)
                        response.force_close()
                        return response
                    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    request.writer.output_size = 0  # the answer's own size starts after it
                return await handler(request)
            if request.path in paths:
                allowed = ", ".join(sorted({m for m, path in routes if path == request.path}))
                return error_response(f"method {request.method} not allowed on {request.path} (use {allowed})", 405,
                                      {"Allow": allowed})
            return error_response(f"no route {request.path}", 404)

        def make_request(message, payload, protocol, writer, task) -> web.BaseRequest:
            # The body limit, which an Application would pass as client_max_size: read() raises 413.
            return web.BaseRequest(message, payload, protocol, writer, task, loop, client_max_size=limit)

        # handler_cancellation: a client that disconnects cancels its handler, and with it the
        # upstream requests, instead of letting them run to completion for nobody.
        return JsonErrorServer(dispatch, request_factory=make_request, handler_cancellation=True, access_log=None)

    async def start(self) -> None:
        # One long-lived session (and connection pool) per role: no per-request handshakes,
        # and a slow role cannot starve another's connections.
        # No cookie jar (backends set none, and a jar would be filtered on every call), no
        # default User-Agent/Accept headers (nobody reads them), no decompression (vLLM sends none).
        for role in ("encode", "prefill", "decode", "probe"):
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
            self.sessions[role] = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=SKIPPED_AUTO_HEADERS)
        self._prober = asyncio.create_task(self._probe_loop())
        if self.config.pool_file:
            from epdctl.proxy.membership import PoolWatcher

            watcher = PoolWatcher(self, self.config.pool_file)
            await watcher.check()  # a restarted proxy serves the scaled pool from its first request
            self._watcher = asyncio.create_task(watcher.run())

    async def close(self) -> None:
        for task in (self._prober, self._watcher):
            if task:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        for session in self.sessions.values():
            await session.close()

    # ------------------------------------------------------------ health

    async def probe(self, backend: Backend) -> bool:
        try:
            async with self.sessions["probe"].get(backend.url + "/health",
                                                  timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)) as resp:
                ok = resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            ok = False
        if ok and backend.healthy is not True:
            if backend.healthy is False and backend.was_healthy:
                log.info("%s (%s) is healthy again", backend.name, backend.url)
            else:
                log.info("%s (%s) is ready", backend.name, backend.url)
            backend.healthy = backend.was_healthy = True
        elif not ok and backend.healthy is not False:
            if backend.was_healthy:
                log.warning("%s (%s) failed its health probe; out of rotation until it recovers", backend.name, backend.url)
            else:  # still starting: not news
                log.info("%s (%s) is not ready yet", backend.name, backend.url)
            self._eject(backend)
        return ok

    async def _probe_loop(self) -> None:
        while True:
            backends = [b for pool in self.pools for b in pool.backends]  # the pool may change (scale)
            await asyncio.gather(*(self.probe(b) for b in backends), return_exceptions=True)
            settled = all(b.healthy for b in backends)
            await asyncio.sleep(self.config.probe_interval_s if settled else min(FAST_PROBE_INTERVAL_S,
                                                                                   self.config.probe_interval_s))

    def _eject(self, backend: Backend) -> None:
        backend.eject()
        self.metrics.ejections.labels(backend.role).inc()

    async def health(self, request: web.BaseRequest) -> web.Response:
        # From known state only: a stopped backend must not make the proxy's own health slow.
        # The probe loop runs fast while anything is not known healthy, so this is fresh.
        roles = {}
        for pool in self.pools:
            roles[pool.role] = [
                {"name": b.name, "url": b.url, "state": b.state(), "in_flight": b.in_flight} for b in pool.backends
            ]
        ok = all(any(b.healthy for b in pool.backends) for pool in self.pools)
        return web.json_response({"status": "ok" if ok else "degraded", "roles": roles}, status=200 if ok else 503)

    async def metrics_text(self, request: web.BaseRequest) -> web.Response:
        for attempt in range(3):
            try:
                body = generate_latest(self.exposed)
                break
            except (struct.error, OSError):
                # Several workers: a worker still starting has a value file not yet filled in.
                if not self.config.metrics_dir or attempt == 2:
                    return error_response("metrics are not readable yet (a proxy worker is starting)", 503)
                await asyncio.sleep(0.05)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.BaseRequest) -> web.Response:
        try:
            backend = self.decode.pick()
        except NoBackend as exc:
            return error_response(str(exc), 503)
        try:
            async with self.sessions["decode"].get(backend.url + "/v1/models", headers=self._forwarded(request),
                                                   timeout=self.timeouts["prefill"]) as resp:
                body = await resp.read()
                return web.Response(status=resp.status, body=body, content_type=resp.content_type)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return error_response(f"{backend.name} ({backend.url}): {describe_failure(exc)}", 502)

    # ------------------------------------------------------------ requests

    async def chat(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self._handle(request, CHAT_PATH, "chat")

    async def completions(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self._handle(request, COMPLETIONS_PATH, "completions")

    async def _handle(self, request: web.BaseRequest, path: str, route: str) -> web.StreamResponse:
        request_id = request.headers.get("X-Request-Id") or self._new_request_id()
        headers = self._forwarded(request)
        outcome = Outcome()
        try:
            try:
                raw = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise StageError(413, too_large(self.config.max_body_bytes)) from None
            try:
                body = jsoncodec.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                raise StageError(400, f"malformed JSON body: {exc}") from None
            except RecursionError:
                raise StageError(400, "malformed JSON body: nested too deeply") from None
            if not isinstance(body, dict):
                raise StageError(400, "the body must be a JSON object")
            stream = body.get("stream") is True
            items = self._media_items(body) if route == "chat" else []
            weight = 1.0 + max(0, len(raw) - sum(len(item.locator) for item in items)) / 4096.0

            # Transfer parameters are the proxy's to give: a client's could send a consumer or a
            # decoder to any host and engine.
            dropped = [body.pop(field) for field in CLIENT_TRANSFER_FIELDS if field in body]
            encode = bool(items) and bool(self.encode)  # without encoders, PD encodes its own media
            consumer = self._ec_consumer() if encode else None
            if encode:
                handles = await self._encode_all(body, items, request_id, headers, consumer)
                if handles:
                    body["ec_transfer_params"] = handles
            if self.layerwise is not None:  # the decoder first; its metaserver call starts the prefill
                return await self.layerwise.serve(request, body, path, stream, request_id, headers, weight, outcome,
                                                  consumer)
            if self.prefill:
                body["kv_transfer_params"] = await self._prefill(body, path, request_id, headers, weight, consumer)
                body.pop("ec_transfer_params", None)  # D is no EC consumer
            # Re-serialise only when something changed: a text request to PD goes out as it came.
            payload = jsoncodec.dumps(body) if (encode or self.prefill or dropped) else raw
            return await self._decode(request, payload, path, stream, request_id, headers, weight, outcome,
                                      only=None if self.prefill else consumer)
        except StageError as exc:
            outcome.value = outcome_of(exc.status)
            return exc.response(request_id)
        finally:
            self.metrics.count(route, outcome.value)

    def _forwarded(self, request: web.BaseRequest) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        for name in FORWARDED_HEADERS:
            value = request.headers.get(name)
            if value:
                headers[name] = value
        return headers

    def _media_items(self, body: dict) -> list:
        try:
            items = list(iter_media(body))
            if len(items) > self.config.max_media_items:
                raise StageError(413, f"{len(items)} media items in one request; at most "
                                      f"{self.config.max_media_items} (the proxy's max_media_items)")
            for item in items:
                local_media_path(item.locator, self.config.allowed_local_media_path)
                if item.uuid is not None:
                    # vLLM's ECExampleConnector makes the key a folder name: only plain names pass.
                    # Sent on as the string vLLM would make of it (`5` is "5"), the key checked here.
                    item.part["uuid"] = check_media_key(item.uuid)
                elif self.encode:
                    # vLLM keys its caches (and the EC file) by a given uuid, so encoder and
                    # decoder agree on the mm_hash without hashing the pixels twice.
                    item.part["uuid"] = content_hash(item.locator)
        except MediaError as exc:
            raise StageError(400, str(exc)) from None
        return items

    async def _bounded_encode(self, payload: bytes, request_id: str, headers: dict, key: str,
                              per_request: asyncio.Semaphore) -> Any:
        async with per_request, self.encode_slots:
            return await self._call(self.encode, CHAT_PATH, payload, request_id, headers, weight=1.0, affinity=key,
                                    parse=self.config.ec_connector in HANDLE_CONNECTORS)

    def _ec_consumer(self) -> Optional[Backend]:
        """A push connector's consumer, picked before the encoders run: they must be told where to push."""
        if not self.ec_zmq:
            return None
        try:
            return (self.prefill or self.decode).pick()
        except NoBackend:
            return None

    async def _encode_all(self, body: dict, items: list, request_id: str, headers: dict,
                          consumer: Optional[Backend] = None) -> dict:
        """Encode each new item; the consumer's `ec_transfer_params` (empty when its connector needs none)."""
        started = time.perf_counter()
        per_request = asyncio.Semaphore(ENCODE_CALLS_PER_REQUEST)
        calls = []
        seen = set()
        zmq = self.ec_zmq.get(consumer) if consumer is not None else None
        transfer_ids: dict[str, str] = {}
        encoded: list[str] = []  # the keys of `calls`, in order
        ec_path = self.config.ec_storage_path
        for index, item in enumerate(items):
            key = item.uuid
            if key in seen:
                continue
            seen.add(key)
            if ec_path and ec_exists(ec_path, key):
                self.metrics.ec_reused.inc()
                continue
            encoder_request = strip_text(body, item)
            if zmq:
                transfer_ids[key] = uuid.uuid4().hex
                encoder_request["ec_transfer_params"] = push_params(zmq, transfer_ids[key])
            payload = jsoncodec.dumps(encoder_request)
            encoded.append(key)
            calls.append(self._bounded_encode(payload, f"{request_id}-encode-{index}", headers, key, per_request))
        if not calls:
            return {}
        if len(calls) == 1:  # the common case: no task and no gathering future for one call
            results = [await calls[0]]
        else:
            results = await asyncio.gather(*calls, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        self.metrics.stage_encode.observe(time.perf_counter() - started)
        if self.config.ec_connector not in HANDLE_CONNECTORS:
            return {}
        return consumer_params([item.uuid for item in items], dict(zip(encoded, results)), transfer_ids)

    async def _prefill(self, body: dict, path: str, request_id: str, headers: dict, weight: float,
                       only: Optional[Backend] = None) -> Optional[dict]:
        started = time.perf_counter()
        request = {k: v for k, v in body.items() if k not in ("stream_options", "max_completion_tokens")}
        request["max_tokens"] = 1
        request["stream"] = False
        request["kv_transfer_params"] = dict(PREFILL_KV_PARAMS)
        answer = await self._call(self.prefill, path, jsoncodec.dumps(request),
                                  f"{request_id}-prefill", headers, weight=weight, parse=True, only=only)
        kv = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
        if not kv and not self._warned_no_kv and self.config.kv_connector in HANDOFF_KV_CONNECTORS:
            self._warned_no_kv = True
            log.warning("prefill answered without kv_transfer_params: decode will recompute the prefill "
                        "(is its --kv-transfer-config kv_role kv_producer?)")
        self.metrics.stage_prefill.observe(time.perf_counter() - started)
        return kv

    async def _call(self, pool: Pool, path: str, payload: bytes, request_id: str, headers: dict, *,
                    weight: float, affinity: Optional[str] = None, parse: bool = False,
                    only: Optional[Backend] = None) -> Any:
        """One non-streamed call to a role, retried once on another instance after a failure
        (never when `only` is given: that instance alone was told to expect the request)."""
        session, timeout = self.sessions[pool.role], self.timeouts[pool.role]
        tried: list[Backend] = _others(pool, only)
        error: Optional[StageError] = None
        for attempt in range(2):
            try:
                backend = pool.pick(exclude=tuple(tried), affinity_key=affinity)
            except NoBackend:
                break
            if attempt:
                self.metrics.retries.labels(pool.role).inc()
            tried.append(backend)
            backend.acquire(weight)
            sent = time.perf_counter()
            try:
                async with session.post(backend.endpoint(path), data=payload,
                                        headers={**headers, "X-Request-Id": request_id}, timeout=timeout) as resp:
                    data = await resp.read()
                    if resp.status >= 500:
                        self._eject(backend)
                        error = StageError(502, f"{pool.role} {backend.name} ({backend.url}) answered {resp.status}: "
                                                f"{snippet(data)}")
                        continue
                    if resp.status != 200:
                        # The client's fault (a bad image, an unknown model): pass the answer on.
                        raise StageError(resp.status, snippet(data), body=data, content_type=resp.content_type)
                    if not parse:
                        return None
                    try:
                        return jsoncodec.loads(data)
                    except ValueError:
                        error = StageError(502, f"{pool.role} {backend.name} answered invalid JSON: {snippet(data)}")
                        continue
            except asyncio.TimeoutError:
                self._eject(backend)
                error = StageError(504, f"{pool.role} {backend.name} ({backend.url}) timed out after "
                                        f"{time.perf_counter() - sent:.1f}s (limit {timeout.total:g}s)")
            except aiohttp.ClientError as exc:
                self._eject(backend)
                error = StageError(502, f"{pool.role} {backend.name} ({backend.url}): {describe_failure(exc)}")
            finally:
                backend.release(weight)
        raise error or StageError(503, f"no healthy {pool.role} instance")

    async def _decode(self, request: web.BaseRequest, payload: bytes, path: str, stream: bool, request_id: str,
                      headers: dict, weight: float, outcome: Outcome, only: Optional[Backend] = None,
                      prepare: Optional[Callable[[Backend], str]] = None,
                      inspect: Optional[Callable[[bytes], Optional[str]]] = None) -> web.StreamResponse:
        """`prepare(backend)`: the request id to send this attempt with (the layerwise flow's own);
        `inspect(bytes)`: an error message when the decoder's answer must not reach the client."""
        session, timeout = self.sessions["decode"], self.timeouts["decode"]
        started = time.perf_counter()
        tried: list[Backend] = _others(self.decode, only)
        error: Optional[StageError] = None
        for attempt in range(2):
            try:
                backend = self.decode.pick(exclude=tuple(tried))
            except NoBackend:
                break
            if attempt:
                self.metrics.retries.labels("decode").inc()
            tried.append(backend)
            backend.acquire(weight)
            sent_id = prepare(backend) if prepare is not None else request_id
            try:
                try:
                    resp = await session.post(backend.endpoint(path), data=payload,
                                              headers={**headers, "X-Request-Id": sent_id}, timeout=timeout)
                except asyncio.TimeoutError:
                    self._eject(backend)
                    error = StageError(504, f"decode {backend.name} ({backend.url}) did not answer in {timeout.sock_read:g}s")
                    continue
                except aiohttp.ClientError as exc:
                    # Nothing reached the client yet, so another decoder can take the request.
                    self._eject(backend)
                    error = StageError(502, f"decode {backend.name} ({backend.url}): {describe_failure(exc)}")
                    continue
                try:
                    return await self._relay(request, resp, backend, stream, request_id, started, outcome, inspect)
                finally:
                    resp.release()
            finally:
                backend.release(weight)
        raise error or StageError(503, "no healthy decode instance")

    async def _relay(self, request: web.BaseRequest, resp: aiohttp.ClientResponse, backend: Backend, stream: bool,
                     request_id: str, started: float, outcome: Outcome,
                     inspect: Optional[Callable[[bytes], Optional[str]]] = None) -> web.StreamResponse:
        where = f"decode {backend.name} ({backend.url})"
        try:
            if resp.status != 200 or not stream:
                data = await resp.read()
                self.metrics.stage_decode.observe(time.perf_counter() - started)
                if resp.status >= 500:
                    raise StageError(502, f"{where} answered {resp.status}: {snippet(data)}")
                if inspect is not None and resp.status == 200 and (problem := inspect(data)):
                    raise StageError(502, f"{where}: {problem}")
                outcome.value = outcome_of(resp.status)
                return web.Response(status=resp.status, body=data, content_type=resp.content_type,
                                    headers={"X-Request-Id": request_id})
            # Hold the 200 until the first byte: an error before it is still a clean error status.
            first = await resp.content.readany()
        except asyncio.TimeoutError:
            raise StageError(504, f"{where} sent nothing for {self.timeouts['decode'].sock_read:g}s") from None
        except aiohttp.ClientError as exc:
            raise StageError(502, f"{where}: {describe_failure(exc)}") from None
        self.metrics.stage_decode.observe(time.perf_counter() - started)
        out = web.StreamResponse(headers={
            "Content-Type": resp.headers.get("Content-Type", "text/event-stream"),
            "Cache-Control": "no-cache", "X-Request-Id": request_id,
        })
        await out.prepare(request)
        try:
            if first:
                if inspect is not None and (problem := inspect(first)):
                    raise _Refused(problem)
                # Once [DONE] is relayed the client has all it asked for, and may hang up (which
                # cancels us) before the backend's end of stream arrives: that is a success.
                await out.write(first)
                if first.endswith(SSE_DONE):
                    outcome.value = "ok"
                async for chunk in resp.content.iter_any():
                    if inspect is not None and (problem := inspect(chunk)):
                        raise _Refused(problem)
                    await out.write(chunk)
                    if chunk.endswith(SSE_DONE):
                        outcome.value = "ok"
            outcome.value = "ok"
        except (aiohttp.ClientError, asyncio.TimeoutError, _Refused) as exc:
            outcome.value = "stream_error"
            message = f"{where}: {exc}" if isinstance(exc, _Refused) else f"{where} failed mid-stream: {describe_failure(exc)}"
            log.warning("request %s: %s", request_id, message)
            event = json.dumps(error_body(message, 502), separators=(",", ":"))
            await out.write(f"data: {event}\n\ndata: [DONE]\n\n".encode())
        await out.write_eof()
        return out


class _Refused(Exception):
    """A decoder's stream that must end here (the layerwise flow's `recomputed`)."""


def _others(pool: Pool, only: Optional[Backend]) -> list[Backend]:
    """The backends a call pinned to `only` must not fall back to (none when it is not pinned)."""
    return [] if only is None else [backend for backend in pool.backends if backend is not only]
