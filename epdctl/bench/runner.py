"""The load generator: streamed chat requests at a fixed concurrency or a Poisson rate.

Timing follows `vllm bench serve`: TTFT is the wait for the first chunk that carries a choice
(its text may be empty: vLLM streams a chunk per token, and a token that decodes to no text yet,
a partial UTF-8 sequence or a special token, has empty content), ITL the gaps between such
chunks, E2E the time to the last of them, and TPOT (E2E - TTFT) / (tokens - 1), tokens as the
usage says. (Counting only chunks with text, as epdctl did before, moved TTFT late and TPOT
low wherever tokens decode to no text, as with the random weights of the tiny test model.)
The client's own work per chunk is a `perf_counter()` and one small JSON parse, so it does not
distort what it measures (benchmarks/bench_fidelity.py shows by how little).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import aiohttp

from epdctl import jsoncodec
from epdctl.bench.dataset import BenchRequest
from epdctl.bench.ec_reuse import read_reused
from epdctl.bench.pool import watch as watch_pool
from epdctl.errors import EpdctlError
from epdctl.run.logfiles import display


@dataclass
class Result:
    ok: bool
    start: float = 0.0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""


@dataclass
class Run:
    results: list[Result]
    duration: float
    model: str
    ec_reused: Optional[float] = None  # EC items the proxy reused during the measured requests; None: unknown
    interrupted: bool = False  # cancelled (Ctrl-C): `results` are the requests that finished before
    pool: list = field(default_factory=list)  # the proxy's pool at the start and at each change (bench/pool.py)


async def discover_model(session: aiohttp.ClientSession, url: str) -> str:
    try:
        async with session.get(url + "/v1/models", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            if resp.status != 200:
                raise EpdctlError(f"{url}/v1/models answered {resp.status}; is it an OpenAI-compatible server?")
            data = await resp.json(content_type=None)
            return data["data"][0]["id"]
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise EpdctlError(f"cannot reach {url}: {exc or type(exc).__name__}") from None
    except (KeyError, IndexError, TypeError, ValueError):
        raise EpdctlError(f"{url}/v1/models lists no model") from None


async def send(session: aiohttp.ClientSession, url: str, request: BenchRequest, model: str) -> Result:
    payload = {**request.body, "model": model, "stream": True, "stream_options": {"include_usage": True}}
    result = Result(ok=False, start=time.perf_counter())
    start = last = result.start
    chunks = 0
    try:
        async with session.post(url + "/v1/chat/completions", json=payload) as resp:
            if resp.status != 200:
                body = (await resp.read()).decode(errors="replace")[:200]
                result.error = f"HTTP {resp.status}: {display(body)}"  # the target's text: shown on a terminal
                return result
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                now = time.perf_counter()
                event = jsoncodec.loads(data)
                if "error" in event:
                    result.error = display(str(event["error"].get("message", event["error"]))[:200])
                    return result
                choices = event.get("choices")
                if choices:
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
                usage = event.get("usage")
                if usage:
                    result.output_tokens = usage.get("completion_tokens") or 0
                    result.prompt_tokens = usage.get("prompt_tokens") or 0
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {display(str(exc))}"[:200]
        return result
    if chunks == 0:
        result.error = "the stream held no token"
        return result
    result.e2e = last - start  # the last token's chunk: the usage chunk after it carries none
    result.output_tokens = result.output_tokens or chunks
    result.ok = True
    return result


async def run(url: str, requests: list[BenchRequest], *, concurrency: Optional[int], request_rate: Optional[float],
              warmup: int, seed: int, timeout_s: float, on_done: Callable[[Result], None] = lambda r: None) -> Run:
    """Warm-up, then the measured requests. Cancelled, it returns what finished before, marked interrupted."""
    measured = Run(results=[], duration=0.0, model="")
    try:
        await _run(measured, url, requests, concurrency=concurrency, request_rate=request_rate, warmup=warmup,
                   seed=seed, timeout_s=timeout_s, on_done=on_done)
    except asyncio.CancelledError:
        measured.interrupted = True
    return measured


async def _run(measured: Run, url: str, requests: list[BenchRequest], *, concurrency: Optional[int],
               request_rate: Optional[float], warmup: int, seed: int, timeout_s: float,
               on_done: Callable[[Result], None]) -> None:
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        measured.model = await discover_model(session, url)
        # Warm-up requests go first, one at a time, through the same session, and are not counted.
        for request in requests[:warmup]:
            await send(session, url, request, measured.model)
        requests = requests[warmup:]
        limit = asyncio.Semaphore(concurrency) if concurrency else None
        rng = random.Random(seed)

        async def one(request: BenchRequest) -> None:
            if limit is None:
                result = await send(session, url, request, measured.model)
            else:
                async with limit:
                    result = await send(session, url, request, measured.model)
            measured.results.append(result)
            on_done(result)

        reused_before = await read_reused(session, url)
        started = time.perf_counter()
        tasks = []
        pool_watch = asyncio.create_task(watch_pool(session, url, measured.pool, started))
        try:
            for request in requests:
                tasks.append(asyncio.create_task(one(request)))
                if request_rate:
                    await asyncio.sleep(rng.expovariate(request_rate))  # Poisson arrivals
            await asyncio.gather(*tasks)
        finally:  # also when cancelled: the figures then cover what finished until then
            measured.duration = time.perf_counter() - started
            pool_watch.cancel()
            for task in tasks:  # the requests still in flight end with the run, not after it
                task.cancel()
            await asyncio.gather(*tasks, pool_watch, return_exceptions=True)
        reused_after = await read_reused(session, url)
        if reused_before is not None and reused_after is not None and reused_after >= reused_before:
            measured.ec_reused = reused_after - reused_before  # a counter that went down means the proxy restarted: unknown
