"""The layerwise proxy's pure rules: who may call the metaserver, and the `recomputed` refusal."""

from __future__ import annotations

import ipaddress


def test_metaserver_source_rule():
    from epdctl.proxy.layerwise import same_host

    loopback = {ipaddress.ip_address("127.0.0.1")}
    remote = {ipaddress.ip_address("10.0.0.9")}
    assert same_host("127.0.0.1", loopback) and same_host("127.0.0.2", loopback)  # one host, any loopback
    assert same_host("::ffff:10.0.0.9", remote)
    assert not same_host("10.0.0.5", remote) and not same_host("127.0.0.1", remote)
    assert not same_host("10.0.0.5", loopback) and not same_host(None, loopback) and not same_host("x", loopback)


def test_recomputed_is_refused_streamed_or_not():
    from epdctl.proxy.layerwise import recomputed, vllm_request_id

    event = b'data: {"choices": [{"index": 0, "delta": {}, "stop_reason": "recomputed"}]}\n\n'
    assert "does not re-send" in recomputed(event)
    assert "does not re-send" in recomputed(b'{"choices": [{"stop_reason": "recomputed", "message": {}}]}')
    assert recomputed(b'data: {"choices": [{"delta": {"content": "recomputed"}, "stop_reason": null}]}\n\n') is None
    assert recomputed(b'data: [DONE]\n\n') is None
    assert vllm_request_id("/v1/chat/completions", "t") == "chatcmpl-t"
    assert vllm_request_id("/v1/completions", "t") == "cmpl-t-0"
