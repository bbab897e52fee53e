"""The proxy's pool over a bench run: how many instances each role had, and when it changed.

With `autoscale:` (or an `epdctl scale` during the run) the pool is part of what was measured,
so the report says how it grew and shrank, from the proxy's own gauge
(`epdctl_proxy_pool_instances{role}`, docs/proxy.md). A target without that gauge (vllm-router,
a plain vLLM) has no pool line: nothing is guessed.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any, Optional

import aiohttp

from epdctl.evidence import parse_metrics

GAUGE = "epdctl_proxy_pool_instances"
SAMPLE_EVERY_S = 1.0
MAX_SAMPLES = 1000  # changes kept; a run that changes more often keeps the first ones
MAX_METRICS_BYTES = 16 * 1024 * 1024  # a --url target's /metrics is read no further
_ROLE = re.compile(GAUGE + r'\{role="(encode|prefill|decode)"\}')


async def read_pool(session: aiohttp.ClientSession, url: str) -> Optional[dict[str, int]]:
    """Instances per role taking new requests, or None when the target has no such gauge."""
    try:
        async with session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as resp:
            if resp.status != 200:
                return None
            data = await resp.content.read(MAX_METRICS_BYTES + 1)
        if len(data) > MAX_METRICS_BYTES:
            return None  # no proxy of ours says this much: not a pool to follow
        metrics = parse_metrics(data.decode("utf-8", "replace"))
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, IndexError, KeyError, TypeError):
        return None  # a target whose /metrics is not Prometheus text has no pool to report
    sizes = {m.group(1): int(value) for key, value in metrics.items() if (m := _ROLE.fullmatch(key))}
    return sizes or None


async def watch(session: aiohttp.ClientSession, url: str, samples: list[dict[str, Any]], started: float) -> None:
    """Append {t_s, sizes} to `samples` at the start and whenever the pool changes, until cancelled."""
    last: Optional[dict[str, int]] = None
    while True:
        sizes = await read_pool(session, url)
        if sizes is None and last is None:
            return  # not an epdctl proxy: no pool to follow
        if sizes is not None and sizes != last and len(samples) < MAX_SAMPLES:
            samples.append({"t_s": round(time.perf_counter() - started, 2), "sizes": sizes})
            last = sizes
        await asyncio.sleep(SAMPLE_EVERY_S)


def describe(samples: list[dict[str, Any]]) -> Optional[str]:
    """`pool: encode 1 (0s) -> 2 (6.1s) -> 3 (12s); decode 1`, when the pool changed during the run."""
    if len(samples) < 2:
        return None
    roles = sorted({role for s in samples for role in s["sizes"]}, key=("encode", "prefill", "decode").index)
    parts = []
    for role in roles:
        steps: list[str] = []
        previous = None
        for sample in samples:
            size = sample["sizes"].get(role)
            if size is not None and size != previous:
                steps.append(f"{size} ({sample['t_s']:g}s)")
                previous = size
        parts.append(f"{role} " + (" -> ".join(steps) if len(steps) > 1 else steps[0].split(" ")[0]))
    return "pool over the run: " + "; ".join(parts)
