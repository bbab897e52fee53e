"""The proxy's JSON (epdctl/jsoncodec.py): orjson's speed without changing what a client sent."""

from __future__ import annotations

import json

import pytest

from epdctl import jsoncodec


def test_integers_beyond_64_bits_stay_exact():
    raw = b'{"seed": 123456789012345678901234567890, "n": -99999999999999999999999, "ok": 9223372036854775807}'
    value = jsoncodec.loads(raw)
    assert value == json.loads(raw) and isinstance(value["seed"], int)
    assert jsoncodec.dumps(value) == b'{"seed":123456789012345678901234567890,"n":-99999999999999999999999,' \
                                      b'"ok":9223372036854775807}'
    assert jsoncodec.loads(b'{"x": 1e300}') == {"x": 1e300}  # a float stays a float


@pytest.mark.parametrize("raw", [b'{"a": NaN}', b'{"a": Infinity}', b'{"a": "\\ud800"}', b'{"a": 1', b'"\xff"'])
def test_what_is_not_json_is_refused(raw):
    with pytest.raises(ValueError):
        jsoncodec.loads(raw)


def test_deep_nesting_is_a_recursion_error_as_with_the_standard_library():
    with pytest.raises(RecursionError):
        jsoncodec.loads(b"[" * 5000 + b"]" * 5000)
