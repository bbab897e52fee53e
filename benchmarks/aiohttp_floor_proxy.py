"""The cheapest P+D proxy aiohttp allows: the floor under any aiohttp proxy, for proxy_vs_router.py.

    python benchmarks/aiohttp_floor_proxy.py --prefill URL --decode URL --port N [--host H]

Per request: read the body, one prefill call (max_tokens 1, stream false, kv_transfer_params),
one decode call with the prefill's kv_transfer_params spliced in, and the decode's answer relayed
(a stream chunk by chunk). aiohttp's low-level server, one client session, orjson, uvloop. No
checks, metrics, retries, health probes, timeouts, request ids or error handling: what epdctl's
proxy costs above this row is what its checks and bookkeeping cost; what this row costs above
vllm-router is what aiohttp costs. Not a product: a measuring stick.
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
import orjson
import uvloop
from aiohttp import web

HEADERS = {"Content-Type": "application/json"}


async def serve(args) -> None:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
                                    cookie_jar=aiohttp.DummyCookieJar(),
                                    skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"))

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/health":
            return web.Response(text="ok")
        path = request.path
        body = orjson.loads(await request.read())
        prefill = dict(body, max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True})
        prefill.pop("stream_options", None)
        async with session.post(args.prefill + path, data=orjson.dumps(prefill), headers=HEADERS) as resp:
            answer = orjson.loads(await resp.read())
        body["kv_transfer_params"] = answer.get("kv_transfer_params")
        async with session.post(args.decode + path, data=orjson.dumps(body), headers=HEADERS) as resp:
            if not body.get("stream"):
                return web.Response(status=resp.status, body=await resp.read(), content_type=resp.content_type)
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    runner = web.ServerRunner(web.Server(handle, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill", required=True)
    parser.add_argument("--decode", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    uvloop.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
