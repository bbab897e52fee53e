"""JSON on the request path (proxy, sim, bench): orjson, with the standard library where they differ.

orjson parses several times faster, which is most of the proxy's work for a request with a
base64 image. Where it would change a request rather than refuse it, the standard library
decides: integers beyond 64 bits, which orjson reads as floats (a 30-digit `seed` must reach vLLM
as the client wrote it); such a body is read again, exactly. What orjson refuses and the standard
library accepts (NaN, Infinity, lone surrogates) is not JSON (RFC 8259): a refusal is a clean 400.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

_INT64 = 2.0 ** 63


def loads(data: bytes | str) -> Any:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):
            raise RecursionError("nested too deeply") from None  # as the standard library says it
        raise
    if _may_have_lost_an_integer(value):
        return json.loads(data)  # exact, and rare: a whole number beyond 64 bits was read as a float
    return value


def _may_have_lost_an_integer(value: Any) -> bool:
    """Is there a whole float of 2**63 or more? orjson reads longer integers as floats. Strings,
    however large (a base64 image), are not looked into: only the structure is walked."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, float) and abs(item) >= _INT64 and item.is_integer():
            return True
    return False


def dumps(value: Any) -> bytes:
    """Compact JSON bytes."""
    try:
        return orjson.dumps(value)
    except TypeError:  # an integer beyond 64 bits (read by the standard library): keep it exact
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
