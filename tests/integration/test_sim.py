"""The simulated engine (docs/sim.md), driven as real processes over real HTTP."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import urllib.request

import pytest
from safetensors.numpy import load_file

from epdctl.connectors import EC_FILENAME
from epdctl.media import content_hash

from conftest import free_ports, http_post, metrics

IMAGE = "data:image/png;base64," + base64.b64encode(b"\x89PNG fake image bytes").decode()


def ec_json(role: str, path) -> str:
    return json.dumps({"ec_connector": "ECExampleConnector", "ec_role": role,
                       "ec_connector_extra_config": {"shared_storage_path": str(path)}})


def kv_json(role: str) -> str:
    return json.dumps({"kv_connector": "NixlConnector", "kv_role": role})


def chat(url: str, image: str = IMAGE, uuid: str = None, max_tokens: int = 3, **extra):
    part = {"type": "image_url", "image_url": {"url": image}}
    if uuid:
        part["uuid"] = uuid
    body = {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "what is it?"}]}],
            "max_tokens": max_tokens, **extra}
    return http_post(url + "/v1/chat/completions", body)


def test_producer_writes_a_real_safetensors_file_and_skips_existing(procs, tmp_path):
    ec = tmp_path / "ec"
    url = procs.sim(free_ports(1)[0], "--ec-transfer-config", ec_json("ec_producer", ec))
    status, body = chat(url)
    assert status == 200, body
    key = content_hash(IMAGE)
    tensors = load_file(str(ec / key / EC_FILENAME))
    assert list(tensors) == ["ec_cache"]
    tokens, hidden = tensors["ec_cache"].shape
    assert tokens > 0 and hidden > 0
    assert not [p for p in (ec / key).iterdir() if p.name != EC_FILENAME], "temporary files left behind"
    assert metrics(url)["epdctl_sim_encoded_items_total"] == 1
    assert chat(url)[0] == 200
    assert metrics(url)["epdctl_sim_encoded_items_total"] == 1  # the file existed: not encoded again


def test_uuid_is_the_cache_key(procs, tmp_path):
    ec = tmp_path / "ec"
    url = procs.sim(free_ports(1)[0], "--ec-transfer-config", ec_json("ec_producer", ec))
    assert chat(url, uuid="my-item-1")[0] == 200
    assert (ec / "my-item-1" / EC_FILENAME).exists()


def test_consumer_loads_what_the_producer_wrote_and_misses_otherwise(procs, tmp_path):
    ec = tmp_path / "ec"
    producer, consumer = free_ports(2)
    e = procs.sim(producer, "--ec-transfer-config", ec_json("ec_producer", ec))
    pd = procs.sim(consumer, "--ec-transfer-config", ec_json("ec_consumer", ec))
    assert chat(e, max_tokens=1)[0] == 200
    assert chat(pd)[0] == 200
    m = metrics(pd)
    assert m["epdctl_sim_ec_loaded_total"] == 1 and m["epdctl_sim_ec_missed_total"] == 0
    assert m["epdctl_sim_encoded_items_total"] == 0
    other = "data:image/png;base64," + base64.b64encode(b"never encoded").decode()
    assert chat(pd, image=other)[0] == 200
    m = metrics(pd)
    assert m["epdctl_sim_ec_missed_total"] == 1 and m["epdctl_sim_encoded_items_total"] == 1


def test_prefill_decode_pair_shows_a_remote_prefill(procs):
    p_port, d_port = free_ports(2)
    p = procs.sim(p_port, "--kv-transfer-config", kv_json("kv_producer"), "--sim-ttft-ms", "1500")
    d = procs.sim(d_port, "--kv-transfer-config", kv_json("kv_consumer"), "--sim-ttft-ms", "3600000")  # an hour
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 1,
            "kv_transfer_params": {"do_remote_decode": True}}
    status, raw = http_post(p + "/v1/chat/completions", body)
    assert status == 200
    kv = json.loads(raw)["kv_transfer_params"]
    assert kv["do_remote_prefill"] is True
    assert {"remote_engine_id", "remote_block_ids", "remote_host", "remote_port"} <= set(kv)
    # Answered at all, the decoder did not do its hour of prefill: the KV came from P.
    status, raw = http_post(d + "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, "kv_transfer_params": kv})
    assert status == 200
    m = metrics(d)
    assert m["epdctl_sim_remote_prefills_total"] == 1 and m["epdctl_sim_prefills_total"] == 0
    assert metrics(p)["epdctl_sim_prefills_total"] == 1


def test_openai_client_streaming_and_not(procs):
    openai = pytest.importorskip("openai")
    url = procs.sim(free_ports(1)[0], "--sim-tpot-ms", "1")
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    answer = client.chat.completions.create(model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert answer.usage.completion_tokens == 5 and answer.choices[0].message.content
    chunks = list(client.chat.completions.create(model="sim-model", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content  # deterministic
    assert chunks[-1].usage.completion_tokens == 5
    completion = client.completions.create(model="sim-model", prompt="once upon", max_tokens=4, stream=True)
    assert len([c for c in completion if c.choices and c.choices[0].text]) == 4
    assert [m.id for m in client.models.list()] == ["sim-model"]


def test_request_id_is_echoed(procs):
    url = procs.sim(free_ports(1)[0])
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps({"prompt": "x", "max_tokens": 1}).encode(),
                                 headers={"Content-Type": "application/json", "X-Request-Id": "abc-123"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["X-Request-Id"] == "abc-123"


@pytest.mark.parametrize("raw,fragment", [
    (b"{not json", "malformed JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (json.dumps({"messages": []}).encode(), "messages must be a non-empty list"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}).encode(),
     "file://"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}).encode(), "without a url"),
])
def test_bad_requests_get_400_with_openai_error(procs, raw, fragment):
    url = procs.sim(free_ports(1)[0])
    status, body = http_post(url + "/v1/chat/completions", None, raw=raw)
    assert status == 400
    error = json.loads(body)["error"]
    assert fragment in error["message"] and error["code"] == 400


def test_file_media_under_allowed_path_is_read(procs, tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    (media / "cat.png").write_bytes(b"cat pixels")
    url = procs.sim(free_ports(1)[0], "--allowed-local-media-path", str(media))
    assert chat(url, image=f"file://{media}/cat.png")[0] == 200
    assert chat(url, image=f"file://{media}/../outside.png")[0] == 400


def test_busy_port_fails_fast_naming_the_port():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        result = subprocess.run([sys.executable, "-m", "epdctl.sim", "m", "--port", str(port)],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode != 0
        assert f"port {port}" in result.stderr and "already in use" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    finally:
        holder.close()


def test_help_says_it_is_a_simulator_and_unknown_flags_are_ignored(procs):
    result = subprocess.run([sys.executable, "-m", "epdctl.sim", "--help"], capture_output=True, text=True, timeout=30)
    assert "SIMULATED" in result.stdout and "NOT an inference engine" in result.stdout
    port = free_ports(1)[0]
    procs.sim(port, "--tensor-parallel-size", "2", "--enforce-eager", name="flags")
    log = procs.log("flags")
    assert log.count("ignoring flags the sim does not model") == 1 and "--tensor-parallel-size" in log
