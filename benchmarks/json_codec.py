"""The proxy's JSON work per request, standard library vs epdctl/jsoncodec.py (orjson), same run.

    python benchmarks/json_codec.py [--image-kb 150] [--repeats 300]

For a chat body with one base64 image of the given size, the proxy parses the body once and
serialises it twice (the encoder's request, the decoder's). Prints microseconds per request for
each and the ratio.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from epdctl import jsoncodec  # noqa: E402


def per_request_us(raw: bytes, loads, dumps, repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        body = loads(raw)
        dumps(body)
        dumps(body)
    return (time.perf_counter() - started) / repeats * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-kb", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    image = base64.b64encode(os.urandom(args.image_kb * 1024)).decode()
    raw = json.dumps({"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}},
        {"type": "text", "text": "What is in this image?"}]}]}).encode()
    standard = per_request_us(raw, json.loads, lambda b: json.dumps(b, separators=(",", ":")).encode(), args.repeats)
    fast = per_request_us(raw, jsoncodec.loads, jsoncodec.dumps, args.repeats)
    print(f"{len(raw) / 1024:.0f} KiB body, one parse + two serialisations per request:")
    print(f"  json (standard library) {standard:8.0f} us")
    print(f"  jsoncodec (orjson)      {fast:8.0f} us   {standard / fast:.1f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
