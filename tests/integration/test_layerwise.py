"""vllm-ascend's decoder-first flow (MooncakeLayerwiseConnector) with real sim processes and the
real proxy: images served through it, smoke's proof, and the metaserver under attack (forged and
replayed ids, the wrong source, hostile bodies) starting no prefill."""

from __future__ import annotations

import base64
import json
import sys
import textwrap
import urllib.request

import pytest

from conftest import (assert_no_orphans, epdctl, free_ports, http_get, http_post, metrics, wait_for, wait_healthy)

LAYERWISE = "MooncakeLayerwiseConnector"
PREFILLS = "epdctl_sim_prefills_total"
PUSHES = "epdctl_sim_kv_pushes_total"
REMOTE = "epdctl_sim_remote_prefills_total"


def image(n: int) -> str:
    return "data:image/png;base64," + base64.b64encode(f"layerwise image {n}".encode()).decode()


def chat(*images: str, stream: bool = False, max_tokens: int = 5) -> dict:
    content = [*({"type": "image_url", "image_url": {"url": u}} for u in images), {"type": "text", "text": "describe"}]
    return {"model": "sim-model", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "stream": stream}


def kv_json(role: str, port: int) -> str:
    return json.dumps({"kv_connector": LAYERWISE, "kv_role": role, "kv_port": port})


def ec_json(role: str, path) -> str:
    return json.dumps({"ec_connector": "ECExampleConnector", "ec_role": role,
                       "ec_connector_extra_config": {"shared_storage_path": str(path)}})


@pytest.fixture
def flow(procs, tmp_path):
    """A sim E, P and D speaking the layerwise flow, and the proxy in front: {role: url}."""
    e_port, p_port, d_port, kv_port, proxy_port = free_ports(5)
    ec = tmp_path / "ec"
    urls = {
        "encode": procs.sim(e_port, "--ec-transfer-config", ec_json("ec_producer", ec), "--sim-ttft-ms", "1"),
        "prefill": procs.sim(p_port, "--ec-transfer-config", ec_json("ec_consumer", ec),
                             "--kv-transfer-config", kv_json("kv_producer", kv_port), "--sim-ttft-ms", "1"),
        "decode": procs.sim(d_port, "--kv-transfer-config", kv_json("kv_consumer", kv_port), "--sim-ttft-ms", "1"),
    }
    proc = procs.start([sys.executable, "-m", "epdctl.proxy", "--port", str(proxy_port),
                        "--encode-servers-urls", urls["encode"], "--prefill-servers-urls", urls["prefill"],
                        "--decode-servers-urls", urls["decode"], "--kv-connector", LAYERWISE,
                        "--ec-shared-storage-path", str(ec)], "proxy")
    urls["proxy"] = f"http://127.0.0.1:{proxy_port}"
    wait_healthy(urls["proxy"], proc=proc)
    return urls


def counts(urls) -> tuple[float, float, float]:
    return (metrics(urls["prefill"]).get(PREFILLS, 0), metrics(urls["prefill"]).get(PUSHES, 0),
            metrics(urls["decode"]).get(REMOTE, 0))


def test_images_are_served_decoder_first(flow):
    status, body = http_post(flow["proxy"] + "/v1/chat/completions", chat(image(1), image(2)))
    assert status == 200, body
    answer = json.loads(body)
    assert answer["choices"][0]["message"]["content"].strip()
    assert "kv_transfer_params" not in answer or answer["kv_transfer_params"] is None
    # Streamed too: the decoder waited for P's push, then streamed.
    req = urllib.request.Request(flow["proxy"] + "/v1/chat/completions", data=json.dumps(chat(image(3), stream=True)).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        text = resp.read().decode()
    assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text
    # A completion (one prompt) takes the same flow.
    status, body = http_post(flow["proxy"] + "/v1/completions", {"model": "sim-model", "prompt": "hi", "max_tokens": 3})
    assert status == 200, body
    prefilled, pushed, remote = counts(flow)
    assert (prefilled, pushed, remote) == (3, 3, 3)  # P prefilled each request once and pushed it to D
    assert metrics(flow["decode"]).get(PREFILLS, 0) == 0  # D computed no prefill itself
    assert metrics(flow["encode"]).get("epdctl_sim_encoded_items_total") == 3  # encoders first, as ever
    assert metrics(flow["proxy"]).get("epdctl_proxy_metaserver_served_total") == 3
    status, body = http_post(flow["proxy"] + "/v1/completions", {"model": "sim-model", "prompt": ["a", "b"]})
    assert status == 400 and b"one prompt per completion request" in body


def test_forged_and_replayed_metaserver_calls_are_refused_and_start_no_prefill(flow):
    status, body = http_post(flow["proxy"] + "/v1/chat/completions", chat(image(7)))
    assert status == 200
    served_id = json.loads(body)["id"]  # the sim names its answer after the id it told the metaserver
    assert served_id.startswith("chatcmpl-")
    before = counts(flow)
    metaserver = flow["proxy"] + "/v1/metaserver"
    decoder_params = {"do_remote_decode": True, "remote_host": "127.0.0.1", "remote_port": 1,
                      "remote_block_ids": [[0]]}
    for request_id in (served_id,  # replayed: served once already
                       "chatcmpl-" + "0" * 32,  # forged
                       served_id.replace("chatcmpl-", "cmpl-") + "-0",  # the right token, another form
                       "chatcmpl-"):
        status, body = http_post(metaserver, {**decoder_params, "request_id": request_id})
        assert status == 403, (request_id, body)
        assert json.loads(body)["error"]["code"] == 403
    for raw, code in ((b"not json", 400), (b"[1, 2]", 400), (b'{"request_id": 5}', 400),
                      (b"[" * 100_000 + b"]" * 100_000, 400), (b"x" * (2 * 1024 * 1024), 413),
                      (json.dumps({"request_id": "x" * 300}).encode(), 400)):
        try:
            status, body = http_post(metaserver, None, raw=raw)
        except (ConnectionError, OSError):  # a 413 may close before the client has sent everything
            status = 413
        assert status == code, (raw[:40], body[:200])
    assert http_get(metaserver)[0] == 405
    assert counts(flow) == before  # nothing of it started a prefill or a push
    refused = metrics(flow["proxy"])
    assert refused.get('epdctl_proxy_metaserver_refused_total{reason="id"}') == 4


def test_metaserver_refuses_a_caller_that_is_no_decoder(procs):
    """Decoders at an address that is not this host's: a call from loopback is no decoder's."""
    p_port, proxy_port = free_ports(2)
    prefill = procs.sim(p_port, "--kv-transfer-config", kv_json("kv_producer", 1))
    procs.start([sys.executable, "-m", "epdctl.proxy", "--port", str(proxy_port), "--prefill-servers-urls", prefill,
                 "--decode-servers-urls", "http://192.0.2.1:9", "--kv-connector", LAYERWISE], "proxy")
    url = f"http://127.0.0.1:{proxy_port}"
    wait_for(lambda: _listening(url), 20, "the proxy to listen")
    status, body = http_post(url + "/v1/metaserver", {"request_id": "chatcmpl-x", "remote_host": "127.0.0.1"})
    assert status == 403 and b"is not a decoder of this proxy" in body
    assert metrics(prefill).get(PREFILLS, 0) == 0


def _listening(url: str) -> bool:
    try:
        http_get(url + "/health", timeout=2)
        return True
    except OSError:
        return False


def test_without_the_layerwise_connector_there_is_no_metaserver(procs):
    pd_port, proxy_port = free_ports(2)
    pd = procs.sim(pd_port)
    procs.start([sys.executable, "-m", "epdctl.proxy", "--port", str(proxy_port), "--decode-servers-urls", pd], "proxy")
    url = f"http://127.0.0.1:{proxy_port}"
    wait_healthy(url)
    assert http_post(url + "/v1/metaserver", {"request_id": "chatcmpl-x"})[0] == 404


def test_proxy_refuses_a_wildcard_without_a_callback_address():
    result = epdctl("proxy", "--kv-connector", LAYERWISE, "--host", "0.0.0.0", "--prefill-servers-urls",
                    "http://127.0.0.1:1", "--decode-servers-urls", "http://127.0.0.1:2")
    assert result.returncode == 2
    assert "0.0.0.0', a wildcard address" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = epdctl("proxy", "--kv-connector", LAYERWISE, "--workers", "2", "--prefill-servers-urls",
                    "http://127.0.0.1:1", "--decode-servers-urls", "http://127.0.0.1:2")
    assert result.returncode == 2 and "--workers 1" in result.stderr


FAKE_DECODER = textwrap.dedent("""\
    import json, sys
    from aiohttp import web

    async def chat(request):
        body = await request.json()
        choice = {"index": 0, "stop_reason": "recomputed", "finish_reason": "stop"}
        if body.get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            first = {"choices": [{"index": 0, "delta": {"content": "partial"}, "stop_reason": None}]}
            await response.write(b"data: " + json.dumps(first).encode() + b"\\n\\n")
            await response.write(b"data: " + json.dumps({"choices": [dict(choice, delta={})]}).encode() + b"\\n\\n")
            await response.write(b"data: [DONE]\\n\\n")
            return response
        return web.json_response({"choices": [dict(choice, message={"content": "partial"})]})

    async def health(request):
        return web.Response()

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
    """)


def test_a_recomputed_answer_is_an_error_not_a_short_answer(procs, tmp_path):
    d_port, p_port, proxy_port = free_ports(3)
    script = tmp_path / "fake_decoder.py"
    script.write_text(FAKE_DECODER)
    procs.start([sys.executable, str(script), str(d_port)], "fake-decoder")
    prefill = procs.sim(p_port, "--kv-transfer-config", kv_json("kv_producer", 1))
    procs.start([sys.executable, "-m", "epdctl.proxy", "--port", str(proxy_port), "--prefill-servers-urls", prefill,
                 "--decode-servers-urls", f"http://127.0.0.1:{d_port}", "--kv-connector", LAYERWISE], "proxy")
    url = f"http://127.0.0.1:{proxy_port}"
    wait_healthy(url)
    status, body = http_post(url + "/v1/chat/completions", chat())
    assert status == 502 and b"stop_reason 'recomputed'" in body and b"does not re-send" in body
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(chat(stream=True)).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        text = resp.read().decode()
    assert "stop_reason 'recomputed'" in text and text.rstrip().endswith("data: [DONE]")
    assert '"stop_reason": "recomputed"' not in text  # the decoder's own ending is not relayed as a finish


def test_smoke_proves_the_layerwise_topology(tmp_path, state_dir):
    ports = free_ports(5)
    topology = tmp_path / "lw.yaml"
    topology.write_text(textwrap.dedent(f"""\
        name: lw
        model: sim-model
        engine: sim
        platform: npu
        defaults: {{args: {{sim-ttft-ms: 5, sim-tpot-ms: 1, sim-encode-ms: 5}}}}
        ec_transfer: {{connector: ECExampleConnector, shared_storage_path: {tmp_path / 'ec'}}}
        kv_transfer: {{connector: {LAYERWISE}, side_channel_port_base: {ports[4]}}}
        encode: [{{port: {ports[0]}, devices: [0]}}]
        prefill: [{{port: {ports[1]}, devices: [1]}}]
        decode: [{{port: {ports[2]}, devices: [2]}}]
        proxy: {{port: {ports[3]}}}
        health: {{timeout_s: 30, interval_s: 0.1}}
        """))
    result = epdctl("smoke", str(topology), env={"EPDCTL_DEVICE_COUNT": "3"}, check=0)
    assert "PASS  prefill pushed the KV once per request (layerwise): prefill-0 prefilled 4 and pushed 4" in result.stdout
    assert "PASS  decode used the remote prefill: decode-0 served 4 remote prefills of 4 and recomputed 0" in result.stdout
    assert_no_orphans(str(state_dir), ports)


def test_misspelt_transfer_field_is_exit_2_with_file_and_line(tmp_path):
    topology = tmp_path / "typo.yaml"
    topology.write_text(textwrap.dedent("""\
        model: m
        platform: npu
        ec_transfer: {connector: ECExampleConnector, shared_storage_path: /tmp/ec}
        kv_transfer:
          connector: MooncakeConnectorV1
          config: {kv_connnector_module_path: vllm_ascend.distributed.mooncake_connector}
        encode: [{devices: [0], port: 19534}]
        prefill: [{devices: [1], port: 19535}]
        decode: [{devices: [2], port: 19536}]
        """))
    result = epdctl("validate", str(topology), env={"EPDCTL_DEVICE_COUNT": "3"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"epdctl: {topology}:6: kv_transfer.config.kv_connnector_module_path: "
                                     "'kv_connnector_module_path' is not a field of vLLM's KVTransferConfig "
                                     "(did you mean kv_connector_module_path?)")
