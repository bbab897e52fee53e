"""The sim's vllm-ascend MooncakeLayerwiseConnector: the decoder-first KV flow (docs/sim.md).

As vllm-ascend's connector does it (mooncake_layerwise_connector.py):
- a **decoder** (kv_consumer) given `do_remote_prefill` and a `metaserver` URL binds its kv_port
  (where a prefill reaches it), POSTs its own `kv_transfer_params` to the metaserver (its vLLM
  request id, block ids, `remote_host`/`remote_port` = its address and kv_port) and waits for the
  prefill's push before it decodes;
- a **prefill** (kv_producer) given `do_remote_decode` with a decoder's `remote_host`/`remote_port`
  prefills, then pushes the KV there under its own vLLM request id, which the decoder must know:
  the proxy gives both the same X-Request-Id, or the push finds no request waiting.

The push is a small HTTP call to the decoder's kv_port (Mooncake writes device memory; the sim
has none), so the port plan, the ids and the order of the flow are real.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Optional

import aiohttp
from aiohttp import web

from epdctl import jsoncodec

log = logging.getLogger("epdctl.sim")

LAYERWISE = "MooncakeLayerwiseConnector"
PUSH_PATH = "/epdctl-sim/kv-push"
DEFAULT_KV_PORT = 14579  # vLLM's KVTransferConfig.kv_port
PUSH_TIMEOUT_S = 300.0  # a decoder waits this long for the prefill's KV (then fails the request)
MAX_PUSH_BODY = 64 * 1024
BLOCK_SIZE = 128


class TransferError(Exception):
    """The KV did not arrive (or could not be sent): the request fails, as vLLM fails it."""


def vllm_request_id(chat: bool, request_id: str) -> str:
    """vLLM's id for a request sent with `X-Request-Id: request_id` (its connector reports this one)."""
    return f"chatcmpl-{request_id}" if chat else f"cmpl-{request_id}-0"


class LayerwiseKV:
    def __init__(self, host: str, kv_port: int, kv_role: Optional[str], engine_id: str) -> None:
        self.host = host
        self.kv_port = kv_port
        self.consumer = kv_role in ("kv_consumer", "kv_both")
        self.engine_id = engine_id
        self.waiting: dict[str, asyncio.Future] = {}
        self._session: Optional[aiohttp.ClientSession] = None
        self._runner: Optional[web.AppRunner] = None
        self._blocks = itertools.count()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """A decoder listens on its kv_port, as vllm-ascend's receiving thread binds it."""
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PUSH_TIMEOUT_S))
        if not self.consumer:
            return
        app = web.Application(client_max_size=MAX_PUSH_BODY)
        app.router.add_post(PUSH_PATH, self._pushed)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.kv_port, reuse_address=True).start()
        except OSError:
            await self.close()
            raise
        log.info("layerwise KV: receiving pushes on %s:%d", self.host, self.kv_port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------ decoder

    async def receive(self, request_id: str, kv_in: dict) -> None:
        """Tell the metaserver where to push, and wait for the KV. Raises TransferError."""
        url = kv_in.get("metaserver")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise TransferError("kv_transfer_params: metaserver must be an http:// URL")
        if not self.consumer or self._runner is None:
            raise TransferError("this instance is no MooncakeLayerwiseConnector kv_consumer")
        if request_id in self.waiting:
            raise TransferError(f"request {request_id} is already waiting for its KV")
        future = asyncio.get_running_loop().create_future()
        self.waiting[request_id] = future
        base = next(self._blocks) * 4
        params = {
            "token_ids": [], "request_id": request_id, "do_remote_prefill": False, "do_remote_decode": True,
            "remote_block_ids": [[base, base + 1, base + 2, base + 3]], "remote_block_size": [BLOCK_SIZE],
            "remote_engine_id": self.engine_id, "remote_host": self.host, "remote_port": self.kv_port,
            "remote_tp_size": 1, "remote_pcp_size": 1, "remote_dcp_size": 1, "remote_cached_tokens": 0,
        }
        call = asyncio.ensure_future(self._call_metaserver(url, params, future))
        try:
            await asyncio.wait_for(asyncio.shield(future), PUSH_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise TransferError(f"no KV pushed for {request_id} within {PUSH_TIMEOUT_S:g}s") from None
        finally:
            self.waiting.pop(request_id, None)
            if not call.done():
                call.cancel()

    async def _call_metaserver(self, url: str, params: dict, future: asyncio.Future) -> None:
        assert self._session is not None
        try:
            async with self._session.post(url, data=jsoncodec.dumps(params),
                                          headers={"Content-Type": "application/json"}) as resp:
                text = (await resp.read())[:300].decode(errors="replace")
                if resp.status != 200 and not future.done():
                    future.set_exception(TransferError(f"the metaserver {url} answered {resp.status}: {text}"))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            if not future.done():
                future.set_exception(TransferError(f"the metaserver {url}: {exc or type(exc).__name__}"))

    async def _pushed(self, request: web.Request) -> web.Response:
        try:
            body = jsoncodec.loads(await request.read())
        except (ValueError, UnicodeDecodeError, RecursionError):
            return web.json_response({"error": "not JSON"}, status=400)
        request_id = body.get("request_id") if isinstance(body, dict) else None
        future = self.waiting.get(request_id) if isinstance(request_id, str) else None
        if future is None or future.done():
            # vllm-ascend pushes under the prefill's own request id: one the decoder does not
            # wait for means the proxy gave them different ids.
            return web.json_response({"error": f"no request {str(request_id)[:100]!r} waits for KV"}, status=404)
        future.set_result(body)
        return web.json_response({"status": "ok"})

    # ------------------------------------------------------------ prefill

    async def push(self, request_id: str, kv_in: dict) -> None:
        """Send the prefill's KV to the decoder the params name. Raises TransferError."""
        host, port = kv_in.get("remote_host"), kv_in.get("remote_port")
        if not isinstance(host, str) or not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise TransferError("kv_transfer_params: remote_host and remote_port must name the decoder")
        assert self._session is not None
        url = f"http://[{host}]:{port}{PUSH_PATH}" if ":" in host else f"http://{host}:{port}{PUSH_PATH}"
        try:
            async with self._session.post(url, data=jsoncodec.dumps({"request_id": request_id,
                                                                     "remote_engine_id": self.engine_id}),
                                          headers={"Content-Type": "application/json"}) as resp:
                if resp.status != 200:
                    text = (await resp.read())[:300].decode(errors="replace")
                    raise TransferError(f"the decoder at {host}:{port} refused the KV of {request_id}: {text}")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise TransferError(f"pushing the KV of {request_id} to {host}:{port}: {exc or type(exc).__name__}") from None
