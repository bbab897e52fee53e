"""How much of a bench run the encoder cache (EC) served, read from the proxy's own counter.

A run whose images were already encoded measures the cache, not the encoders. The report
says so, from what the proxy counted, and says "unknown" where there is no such counter
(a `--url` to a plain vLLM): it never guesses. A topology without encoders has no EC cache to speak of.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional

import aiohttp

from epdctl.bench.dataset import BenchRequest
from epdctl.media import content_hash, iter_media

REUSED = "epdctl_proxy_ec_reused_items_total"
# The report's `source` for a topology without encoders: its P/PD instances encode their own media
# (vLLM's own caches then, which the proxy does not see), so no EC file is made or reused.
NO_ENCODERS = "no encoders"


async def read_reused(session: aiohttp.ClientSession, url: str) -> Optional[float]:
    """The proxy's count of media items it found in the EC, or None when the target has no such counter."""
    try:
        async with session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            if resp.status != 200:
                return None
            text = await resp.text(errors="replace")
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == REUSED:
            try:
                return float(value)
            except ValueError:
                return None
    return None


def _keys(request: BenchRequest) -> set[str]:
    """The request's distinct cache keys, as the proxy derives them (a given uuid, else a content hash)."""
    return {item.uuid or content_hash(item.locator) for item in iter_media(request.body)}


def workload(requests: list[BenchRequest], warmup: int) -> tuple[int, int]:
    """(media items the proxy looks up in the measured requests, how many of them an earlier request of
    this run already sent): reuse up to the second figure is the run's own, beyond it the cache was warm."""
    seen: set[str] = set()
    items = repeats = 0
    for index, request in enumerate(requests):
        keys = _keys(request)
        if index >= warmup:
            items += len(keys)
            repeats += len(keys & seen)
        seen |= keys
    return items, repeats


def summarize(reused: Optional[float], items: int, repeats: int, encoders: Optional[bool] = None) -> dict[str, Any]:
    """The report's `ec` object. `encoded_items` are the items the proxy did not find, so sent to an encoder.
    `encoders` False: the topology has none (vllm-router's has no such counter, epdctl's proxy counts 0)."""
    if encoders is False:
        return {"reused_items": None, "encoded_items": None, "media_items": items, "repeats_in_run": repeats,
                "warm": None, "source": NO_ENCODERS}
    if reused is None:
        return {"reused_items": None, "encoded_items": None, "media_items": items, "repeats_in_run": repeats,
                "warm": None, "source": "unknown"}
    reused_items = int(reused)
    return {"reused_items": reused_items, "encoded_items": max(0, items - reused_items), "media_items": items,
            "repeats_in_run": repeats, "warm": reused_items > repeats, "source": "proxy /metrics"}


def describe(ec: dict[str, Any], reuse_images: bool) -> Optional[str]:
    """One line for the text report; None when the run sent no media."""
    items = ec.get("media_items") or 0
    if not items:
        return None
    if ec.get("source") == NO_ENCODERS:
        return "EC cache: not in play (no encoders: the P/PD instances encode their own media)"
    if ec.get("reused_items") is None:
        return f"EC cache: unknown (the target has no {REUSED}; not an epdctl proxy)"
    line = f"EC cache: {ec['reused_items']} of {items} items reused"
    if ec.get("warm"):
        why = "as --reuse-images asked" if reuse_images else "the cache held images from before it"
        return f"{line} (warm run: {why})"
    repeats = ec.get("repeats_in_run") or 0
    return f"{line} (cold run; {repeats} repeats within it)" if repeats else f"{line} (cold run)"
