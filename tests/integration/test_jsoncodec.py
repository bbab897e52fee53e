"""The proxy's JSON (epdctl/jsoncodec.py): orjson's speed without changing what a client sent."""

from __future__ import annotations

import json

from conftest import http_post
from test_proxy import image, messages, start_proxy



def test_the_proxy_passes_a_huge_seed_on_exactly_to_encoder_and_decoder(procs, recorder):
    backend = recorder()
    url = start_proxy(procs, encode=[backend.url], decode=[backend.url])
    body = {"messages": messages(image(1)), "max_tokens": 2, "seed": 123456789012345678901234567890}
    status, _ = http_post(url + "/v1/chat/completions", body)
    assert status == 200
    seeds = [json.loads(raw).get("seed") for raw in backend.bodies]
    assert seeds == [123456789012345678901234567890] * 2, seeds  # the encoder's call, then the decoder's
    assert b"123456789012345678901234567890" in backend.bodies[-1]
