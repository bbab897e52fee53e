"""Bench requests: synthetic (offline PNGs + random text) or a JSONL file of OpenAI chat requests."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from epdctl.errors import EXIT_USAGE, EpdctlError

WORDS = ("image scene object color shape light shadow corner center detail texture pattern person street "
         "sky tree window door table chair animal water mountain road sign text number").split()


# The generator holds each image's pixels and PNG while it makes them: 8192 px is 200 MB of pixels.
# vLLM's processors resize larger images anyway, so nothing is lost by the cap.
MAX_IMAGE_SIZE = 8192


@dataclass
class BenchRequest:
    body: dict  # an OpenAI chat request without model/stream (the runner sets those)
    images: int


def png_data_url(key: int, size: int, nonce: bytes = b"") -> str:
    """A PNG of a gradient keyed by `key`, whose first bytes of pixels are a digest of `key` and `nonce`.

    The digest is in the pixels, not in PNG metadata, because vLLM keys its caches (the EC
    included) by a hash of the decoded pixels: distinct keys or nonces never share a cache
    entry, and equal ones always do.
    """
    import numpy as np
    from PIL import Image

    rng = random.Random(key)
    base = [rng.randrange(256) for _ in range(3)]
    # In uint8 throughout (sums wrap around at 256): no temporary array larger than the pixels.
    ramp = (np.arange(size) % 256).astype(np.uint8)
    x, y = ramp[None, :], ramp[:, None]
    pixels = np.empty((size, size, 3), dtype=np.uint8)
    pixels[..., 0] = x + np.uint8(base[0])
    pixels[..., 1] = y + np.uint8(base[1])
    pixels[..., 2] = x + y + np.uint8(base[2])
    stamp = np.frombuffer(hashlib.sha256(f"{key}|".encode() + nonce).digest(), dtype=np.uint8)
    flat = pixels.reshape(-1)
    flat[:len(stamp)] = stamp[:flat.size]
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def synthetic(num: int, *, images_per_request: int, image_size: int, repeat_ratio: float, prompt_len: int,
              max_tokens: int, seed: int, nonce: bytes = b"") -> list[BenchRequest]:
    """`num` chat requests. A `repeat_ratio` share of the images reuse an earlier one (EC reuse).

    `seed` fixes the workload's shape: prompts, image sizes, which images repeat. `nonce` only
    changes the pixels, so a run with a new nonce sends the same workload with images no cache holds.
    """
    rng = random.Random(seed)
    cache: dict[int, str] = {}
    made: list[int] = []
    requests = []
    next_image = seed * 1_000_003
    for _ in range(num):
        parts: list[dict] = []
        for _ in range(images_per_request):
            if made and rng.random() < repeat_ratio:
                key = rng.choice(made)
            else:
                key = next_image
                next_image += 1
                made.append(key)
            if key not in cache:
                cache[key] = png_data_url(key, image_size, nonce)
            parts.append({"type": "image_url", "image_url": {"url": cache[key]}})
        text = " ".join(rng.choice(WORDS) for _ in range(max(1, prompt_len)))
        parts.append({"type": "text", "text": text})
        content: object = parts if images_per_request else text
        requests.append(BenchRequest({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens},
                                     images_per_request))
    return requests


def from_jsonl(path: str, num: Optional[int], max_tokens: Optional[int]) -> list[BenchRequest]:
    """One OpenAI chat request per line; `max_tokens` overrides the file's when given."""
    from epdctl.media import MediaError, iter_media

    requests = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise EpdctlError(f"--dataset {path}: cannot read: {exc.strerror}", EXIT_USAGE) from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            body = json.loads(line)
        except ValueError as exc:
            raise EpdctlError(f"{path}:{number}: not a JSON object: {exc}", EXIT_USAGE) from None
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise EpdctlError(f"{path}:{number}: a chat request needs a messages list", EXIT_USAGE)
        for key in ("stream", "stream_options", "model"):
            body.pop(key, None)
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        try:
            images = len(list(iter_media(body)))
        except MediaError as exc:
            raise EpdctlError(f"{path}:{number}: {exc}", EXIT_USAGE) from None
        requests.append(BenchRequest(body, images))
    if not requests:
        raise EpdctlError(f"--dataset {path}: no requests in the file", EXIT_USAGE)
    if num is not None:
        requests = [requests[i % len(requests)] for i in range(num)]
    return requests
