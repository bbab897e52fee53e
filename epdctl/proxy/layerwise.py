"""vllm-ascend's MooncakeLayerwiseConnector flow: the decoder first, the prefill on its call-back.

As vllm-ascend's load_balance_proxy_layerwise_server_example.py (docs/proxy.md, The layerwise flow):
1. (encoders first, as in every flow;)
2. the request goes to a decoder with `kv_transfer_params` {"do_remote_prefill": true,
   "do_remote_decode": false, "metaserver": "<proxy>/v1/metaserver"};
3. the decoder allocates the KV blocks and POSTs its own `kv_transfer_params` (its `request_id`,
   block ids, host and port) to that metaserver;
4. the proxy sends the original request to a prefill (max_tokens 1, not streamed) with those
   params and the same request id; the prefill pushes the KV layer by layer into the decoder,
   whose stream the proxy relays to the client. The metaserver answers once the prefill has.

The metaserver is attack surface: whoever calls it starts a prefill that pushes KV to the host
and port the call names. It accepts only a request id this proxy issued to the decoder it sent
the request to, not yet served, once, from that decoder's address; anything else is a 403 and
starts nothing. Ids are random per decoder attempt (never the client's X-Request-Id), so none can
be guessed or chosen, and each is forgotten when its attempt ends.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional
from urllib.parse import urlsplit

from aiohttp import web

from epdctl import jsoncodec
from epdctl.connectors import METASERVER_PATH, WILDCARD_HOSTS, metaserver_url  # noqa: F401 (re-exported)
from epdctl.proxy.errors import StageError, error_response

if TYPE_CHECKING:
    from epdctl.proxy.pool import Backend
    from epdctl.proxy.metrics import Outcome
    from epdctl.proxy.server import Proxy

log = logging.getLogger("epdctl.proxy")

# A decoder's params: block ids per KV group (a long prompt is some thousands of ints) and a few
# addresses. Anything near this is not a decoder's call.
MAX_METASERVER_BODY = 1024 * 1024
MAX_REQUEST_ID = 256
ADDRESS_CACHE_S = 5.0  # how long a decoder host name's addresses are trusted before resolving again
RECOMPUTED = "recomputed"  # vllm-ascend's recompute scheduler: the decoder gave up on the request's KV


@dataclass
class Ticket:
    """One decoder attempt's promise: the prefill it may start, once."""

    token: str  # the X-Request-Id the decoder and the prefill both get (their vLLM ids then agree)
    path: str
    payload: dict  # the prefill request, less the decoder's kv_transfer_params
    headers: dict
    weight: float
    decoder: "Backend"
    consumer: Optional["Backend"]  # a prefill pinned by a push EC connector (ECMooncake)


def vllm_request_id(path: str, token: str) -> str:
    """The request id vLLM gives a request sent with `X-Request-Id: token`, which its connector
    reports: `chatcmpl-TOKEN` for chat, `cmpl-TOKEN-0` for the one prompt of a completion."""
    return f"chatcmpl-{token}" if path.endswith("/chat/completions") else f"cmpl-{token}-0"


def recomputed(data: bytes) -> Optional[str]:
    """An error message when a decoder's answer (a JSON body or SSE events) ends with vllm-ascend's
    `stop_reason: "recomputed"`: the decoder dropped the request for the proxy to re-send with the
    tokens so far, which this proxy does not do (docs/proxy.md, The layerwise flow)."""
    if RECOMPUTED.encode() not in data:
        return None
    texts = [line[5:].strip() for line in data.split(b"\n") if line.startswith(b"data:")] or [data]
    for text in texts:
        try:
            event = jsoncodec.loads(text)
        except (ValueError, RecursionError):
            continue
        choices = event.get("choices") if isinstance(event, dict) else None
        if isinstance(choices, list) and any(isinstance(c, dict) and c.get("stop_reason") == RECOMPUTED
                                             for c in choices):
            return ("the decoder ended the request with stop_reason 'recomputed' (vllm-ascend's recompute "
                    "scheduler gave up on its KV); epdctl's proxy does not re-send it: turn "
                    "recompute_scheduler_enable off on the decoders")
    return None


def normal_address(text: str) -> Optional[ipaddress._BaseAddress]:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def same_host(source: Optional[str], allowed: set) -> bool:
    """Is `source` one of `allowed` (addresses)? Loopback counts as one host: a decoder on this
    machine may call from any loopback address, and no local process can be told apart from it."""
    address = normal_address(source or "")
    if address is None:
        return False
    if address in allowed:
        return True
    return address.is_loopback and any(a.is_loopback for a in allowed)


class Layerwise:
    def __init__(self, proxy: "Proxy", url: str) -> None:
        self.proxy = proxy
        self.url = url
        self.tickets: dict[str, Ticket] = {}
        self._addresses: dict[str, tuple[float, set]] = {}  # decoder host -> (resolved at, addresses)
        metrics = proxy.metrics
        from prometheus_client import Counter

        self.refused = Counter("epdctl_proxy_metaserver_refused", "Metaserver calls refused (no prefill started).",
                               ["reason"], registry=metrics.registry)
        self.served = Counter("epdctl_proxy_metaserver_served", "Metaserver calls that started a prefill.",
                              registry=metrics.registry)

    # ------------------------------------------------------------ the request

    async def serve(self, request: web.BaseRequest, body: dict, path: str, stream: bool, request_id: str,
                    headers: dict, weight: float, outcome: "Outcome", consumer: Optional["Backend"]) -> web.StreamResponse:

        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if len(prompt) > 1:
                raise StageError(400, "the layerwise flow (MooncakeLayerwiseConnector) takes one prompt per "
                                      "completion request: send each prompt as its own request")
        prefill = {k: v for k, v in body.items() if k not in ("stream_options", "max_completion_tokens")}
        prefill.update(max_tokens=1, min_tokens=1, stream=False)
        body.pop("ec_transfer_params", None)  # D is no EC consumer
        body["kv_transfer_params"] = {"do_remote_prefill": True, "do_remote_decode": False, "metaserver": self.url}
        payload = jsoncodec.dumps(body)
        issued: list[str] = []

        def prepare(decoder: "Backend") -> str:
            token = secrets.token_hex(16)
            key = vllm_request_id(path, token)
            self.tickets[key] = Ticket(token, path, prefill, headers, weight, decoder, consumer)
            issued.append(key)
            return token

        try:
            return await self.proxy._decode(request, payload, path, stream, request_id, headers, weight, outcome,
                                            prepare=prepare, inspect=recomputed)
        finally:
            for key in issued:  # an attempt that ended uncalled leaves no id to call with later
                self.tickets.pop(key, None)

    # ------------------------------------------------------------ the metaserver

    async def metaserver(self, request: web.BaseRequest) -> web.Response:

        if not await self._from_a_decoder(request.remote, None):
            return self._refuse("source", f"{request.remote} is not a decoder of this proxy")
        raw = await _bounded_body(request)
        if raw is None:
            self.refused.labels("size").inc()
            response = error_response(f"metaserver body larger than {MAX_METASERVER_BODY} bytes", 413)
            response.force_close()  # the rest of the body is not read
            return response
        try:
            params = jsoncodec.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            self.refused.labels("body").inc()
            return error_response("metaserver body: not JSON (or nested too deeply)", 400)
        key = params.get("request_id") if isinstance(params, dict) else None
        if not isinstance(key, str) or not 0 < len(key) <= MAX_REQUEST_ID:
            self.refused.labels("body").inc()
            return error_response("metaserver body: a JSON object with a request_id string", 400)
        ticket = self.tickets.get(key)
        if ticket is None:
            return self._refuse("id", "unknown or already served request_id")
        if not await self._from_a_decoder(request.remote, ticket.decoder):
            return self._refuse("source", f"{request.remote} is not the decoder this request was sent to")
        del self.tickets[key]  # once: a replay finds nothing, whatever happens next
        self.served.inc()
        prefill = dict(ticket.payload, kv_transfer_params=params)
        started = time.perf_counter()
        try:
            await self.proxy._call(self.proxy.prefill, ticket.path, jsoncodec.dumps(prefill), ticket.token,
                                   ticket.headers, weight=ticket.weight, only=ticket.consumer)
        except StageError as exc:
            log.warning("layerwise prefill of %s failed: %s", key, exc.message)
            return error_response(exc.message, 502 if exc.status >= 500 else exc.status)
        self.proxy.metrics.stage_prefill.observe(time.perf_counter() - started)
        return web.json_response({"status": "ok"})

    def _refuse(self, reason: str, message: str) -> web.Response:

        self.refused.labels(reason).inc()
        log.warning("metaserver call refused: %s", message)
        return error_response(f"metaserver: {message}", 403)

    async def _from_a_decoder(self, source: Optional[str], decoder: Optional["Backend"]) -> bool:
        """Is `source` the address of `decoder` (of any decoder of the pool when None)?"""
        backends = [decoder] if decoder is not None else list(self.proxy.decode.backends)
        allowed: set = set()
        for backend in backends:
            allowed |= await self._addresses_of(urlsplit(backend.url).hostname or "")
        if same_host(source, allowed):
            return True
        # A decoder that moved (a restarted pod, a new DNS answer): look again, at most once per period.
        for backend in backends:
            allowed |= await self._addresses_of(urlsplit(backend.url).hostname or "", fresh=True)
        return same_host(source, allowed)

    async def _addresses_of(self, host: str, fresh: bool = False) -> set:
        literal = normal_address(host)
        if literal is not None:
            return {literal}
        now = time.monotonic()
        cached = self._addresses.get(host)
        if cached and (not fresh or now - cached[0] < ADDRESS_CACHE_S):
            return cached[1]
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
            found = {a for info in infos if (a := normal_address(str(info[4][0]))) is not None}
        except OSError:
            found = set()
        self._addresses[host] = (now, found)
        return found


async def _bounded_body(request: web.BaseRequest) -> Optional[bytes]:
    """The body, or None past MAX_METASERVER_BODY (read no further than that, chunked or not)."""
    if (request.content_length or 0) > MAX_METASERVER_BODY:
        return None
    parts: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(65536)
        if not chunk:
            return b"".join(parts)
        size += len(chunk)
        if size > MAX_METASERVER_BODY:
            return None
        parts.append(chunk)
