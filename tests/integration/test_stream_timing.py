"""bench and calibrate time a stream as `vllm bench serve` does: every chunk that carries a choice
is a token, its text empty or not. vLLM streams a chunk per token, and a token that decodes to no
text yet (a partial UTF-8 sequence, a special token: common with the tiny model's random
weights) has empty content. Counting only chunks with text made TTFT the wait for the first
visible text, and TPOT near 0 for a stream whose text came at its end."""

from __future__ import annotations

import argparse
import asyncio
import json

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from epdctl.bench.dataset import BenchRequest
from epdctl.bench.runner import send
from epdctl.calibrate import Prober

TOKENS = 6
GAP_S = 0.03  # between tokens: a floor (a sleep never ends early), never a ceiling


def chunk(content: str, finish=None) -> bytes:
    event = {"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


async def vllm_like(request: web.Request) -> web.StreamResponse:
    """vLLM's chat stream for a token sequence whose text appears only with the last token."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(chunk(""))  # the role chunk, as vLLM sends with its first output
    for i in range(TOKENS):
        last = i == TOKENS - 1
        await response.write(chunk("é" if last else "", "length" if last else None))
        if not last:
            await asyncio.sleep(GAP_S)
    usage = {"prompt_tokens": 5, "completion_tokens": TOKENS, "total_tokens": TOKENS + 5}
    await response.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    return response


async def _serve_and(check):
    app = web.Application()
    app.router.add_post("/v1/chat/completions", vllm_like)
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as session:
        return await check(session, str(server.make_url("")).rstrip("/"))


def test_bench_counts_a_token_whose_text_is_empty():
    async def check(session, url):
        return await send(session, url, BenchRequest(body={"messages": [{"role": "user", "content": "hi"}]}, images=0),
                          "m")

    result = asyncio.run(_serve_and(check))
    assert result.ok, result.error
    assert result.output_tokens == TOKENS
    assert len(result.itl) == TOKENS  # the role chunk and TOKENS token chunks: TOKENS gaps
    # TTFT is the first chunk, before any gap; the tokens after it took at least their gaps.
    tpot = (result.e2e - result.ttft) / (result.output_tokens - 1)
    assert tpot >= GAP_S * 0.99  # waiting for text made TTFT the E2E: a TPOT near 0


def test_calibrate_times_decode_from_the_first_token_not_the_first_text():
    args = argparse.Namespace(timeout_s=30, image_size=32)

    async def check(session, url):
        return await Prober(session, "m", args, tick=lambda: None).ask(url, "hi", TOKENS, stream=True)

    answer = asyncio.run(_serve_and(check))
    # Waiting for text put `first` at the last token: a TPOT near 0 instead of at least the gap.
    assert answer.tpot_ms is not None and answer.tpot_ms >= GAP_S * 1000 * 0.99
