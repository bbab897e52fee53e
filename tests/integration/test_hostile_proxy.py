"""Issue #12, the proxy: every malformed request gets a 4xx with an OpenAI-style error, never a
5xx or a traceback; nothing outside the EC folder is written; /health answers from known state.

A real proxy process in front of real sim processes, over real HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import pytest

from conftest import free_ports, http_get, http_post, metrics, send_and_hang_up_when, sim_running, wait_for

from test_proxy import ec_json, image, messages, start_proxy


@pytest.fixture
def epd(procs, tmp_path):
    """E + PD sims sharing an EC folder, a media folder, and the proxy in front (as `up` wires it)."""
    ec = tmp_path / "ec"
    media = tmp_path / "media"
    media.mkdir()
    (media / "ok.png").write_bytes(b"pixels")
    e_port, pd_port = free_ports(2)
    encode = procs.sim(e_port, "--ec-transfer-config", ec_json("ec_producer", ec), "--allowed-local-media-path",
                       str(media), name="encode")
    pd = procs.sim(pd_port, "--ec-transfer-config", ec_json("ec_consumer", ec), "--allowed-local-media-path",
                   str(media), name="pd")
    proxy = start_proxy(procs, encode=[encode], decode=[pd],
                        extra=["--ec-shared-storage-path", str(ec), "--allowed-local-media-path", str(media),
                               "--encode-servers-names", "encode-0", "--decode-servers-names", "pd-0"])
    return {"proxy": proxy, "url": proxy + "/v1/chat/completions", "ec": ec, "media": media, "tmp": tmp_path,
            "procs": procs, "pd": pd}


def _error(body: bytes) -> str:
    error = json.loads(body)["error"]
    assert set(error) >= {"message", "type", "code"}
    return error["message"]


def _no_traceback(epd) -> None:
    log = epd["procs"].log("proxy")
    assert "Traceback" not in log and " 500 " not in log, log[-2000:]


@pytest.mark.parametrize("url, words", [
    ("file:///media/x%00y", "NUL"),
    ("file://[", "malformed file:// URL"),
    ("FILE:///etc/passwd", "outside the allowed local media path"),
    (" file:///etc/passwd", "outside the allowed local media path"),
    ("\tFiLe:/etc/passwd\n", "outside the allowed local media path"),
    ("file:///ok/../../../etc/passwd", "outside the allowed local media path"),
    ("file://%2e%2e/%2e%2e/etc/passwd", "outside the allowed local media path"),
])
def test_hostile_file_urls_get_400(epd, url, words):
    if "/media/x" in url:
        url = url.replace("/media/x", f"{epd['media']}/x")
    if "/ok/" in url:
        url = url.replace("file:///ok/", f"file://{epd['media']}/")
    status, body = http_post(epd["url"], {"messages": messages(url), "max_tokens": 1})
    assert status == 400, body
    assert words in _error(body)
    _no_traceback(epd)


def test_a_deeply_nested_body_gets_400(epd):
    raw = b'{"messages": ' + b"[" * 3000 + b"]" * 3000 + b"}"
    status, body = http_post(epd["url"], None, raw=raw)
    assert status == 400 and "nested too deeply" in _error(body)
    _no_traceback(epd)


@pytest.mark.parametrize("key", ["../x", "/abs/path", "..", ".", "a/b", "x" * 129, "new\nline", "", {"a": 1}, [1]])
def test_unsafe_media_uuids_are_refused_and_nothing_is_written_outside(epd, key):
    part = {"type": "image_url", "image_url": {"url": image(1)}, "uuid": key}
    status, body = http_post(epd["url"], {"messages": [{"role": "user", "content": [part]}], "max_tokens": 1})
    assert status == 400, body
    assert "uuid" in _error(body)
    outside = [p for p in epd["tmp"].rglob("encoder_cache.safetensors") if epd["ec"] not in p.parents]
    assert outside == [] and not (epd["tmp"] / "x").exists() and not os.path.exists("/abs/path")


def test_a_safe_client_uuid_is_used_as_the_key(epd):
    part = {"type": "image_url", "image_url": {"url": image(2)}, "uuid": "client-key_1.0"}
    status, _ = http_post(epd["url"], {"messages": [{"role": "user", "content": [part]}], "max_tokens": 1})
    assert status == 200
    assert (epd["ec"] / "client-key_1.0" / "encoder_cache.safetensors").exists()


@pytest.mark.parametrize("key, folder", [(7, "7"), (2.5, "2.5")])
def test_a_uuid_that_is_not_a_string_is_keyed_as_vllm_keys_it(epd, key, folder):
    """vLLM lets any JSON value through as `uuid` and keys the item by its str(); encoder and
    decoder must agree on that key (the decoder loads what the encoder wrote)."""
    part = {"type": "image_url", "image_url": {"url": image(3)}, "uuid": key}
    status, body = http_post(epd["url"], {"messages": [{"role": "user", "content": [part]}], "max_tokens": 1})
    assert status == 200, body
    assert [p.name for p in epd["ec"].iterdir()] == [folder]
    assert metrics(epd["pd"])["epdctl_sim_ec_loaded_total"] == 1


def test_too_many_media_items_get_a_fast_413_while_others_are_served(epd):
    many = {"messages": messages(*(image(n) for n in range(5000))), "max_tokens": 1}
    results = {}

    def big():
        started = time.monotonic()
        results["big"] = http_post(epd["url"], many, timeout=60)
        results["big_s"] = time.monotonic() - started

    thread = threading.Thread(target=big)
    thread.start()
    normal = http_post(epd["url"], {"messages": messages(image(99)), "max_tokens": 2})
    thread.join(60)
    assert normal[0] == 200
    status, body = results["big"]
    assert status == 413 and "5000 media items" in _error(body) and "max_media_items" in _error(body)
    assert results["big_s"] < 10
    # Up to the limit is served.
    assert http_post(epd["url"], {"messages": messages(*(image(n) for n in range(64))), "max_tokens": 1},
                     timeout=120)[0] == 200
    _no_traceback(epd)


@pytest.mark.parametrize("value", ["0.000001", "0.5", "0", "-3", "nan"])
def test_the_proxy_refuses_a_body_limit_below_one_mb(value):
    from conftest import epdctl

    result = epdctl("proxy", "--decode-servers-urls", "http://127.0.0.1:1", "--max-body-mb", value)
    assert result.returncode == 2 and "--max-body-mb" in result.stderr


def test_health_answers_at_once_while_a_backend_is_stopped(epd):
    pd_pid = next(p.pid for p in epd["procs"].procs if "--ec-transfer-config" in " ".join(
        open(f"/proc/{p.pid}/cmdline").read().split("\0")) and "ec_consumer" in open(f"/proc/{p.pid}/cmdline").read())
    from epdctl.proxy.server import PROBE_TIMEOUT_S

    os.kill(pd_pid, signal.SIGSTOP)
    try:
        for _ in range(5):
            started = time.monotonic()
            try:
                status, _ = http_get(epd["proxy"] + "/health", timeout=5)
            except OSError:
                status = None
            took = time.monotonic() - started
            # A /health that waited on the stopped backend's probe would take the probe's whole
            # timeout; one answered from known state takes milliseconds, even on a busy machine.
            assert took < PROBE_TIMEOUT_S, f"/health took {took:.2f}s"
            assert status in (200, 503)
    finally:
        os.kill(pd_pid, signal.SIGCONT)


def test_no_warning_on_a_normal_start_and_plan_names_in_the_log(epd):
    assert http_post(epd["url"], {"messages": messages(image(5)), "max_tokens": 1})[0] == 200
    log = epd["procs"].log("proxy")
    assert "WARNING" not in log, log
    assert "decode-0" not in log and "pd-0" in log


# ---------------------------------------------------------------- #27: what a client may steer

FORGED_KV = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "attacker-engine",
             "remote_host": "203.0.113.9", "remote_port": 5600, "remote_block_ids": [0, 1, 2, 3], "tp_size": 1}


@pytest.mark.parametrize("split", ["e+pd", "e+p+d"])
def test_a_clients_transfer_params_reach_no_instance(procs, recorder, split):
    """Transfer parameters are the proxy's to set: a client's could point a decoder at any host."""
    encode, decode = recorder(), recorder()
    prefill = [recorder()] if split == "e+p+d" else []
    proxy = start_proxy(procs, encode=[encode.url], prefill=[p.url for p in prefill], decode=[decode.url])
    for body in ({"messages": messages(image(1)), "max_tokens": 2},  # with an item to encode
                 {"messages": [{"role": "user", "content": "text only"}], "max_tokens": 2}):
        body.update(kv_transfer_params=FORGED_KV, ec_transfer_params={"ec_items": ["attacker-item"]})
        assert http_post(proxy + "/v1/chat/completions", body)[0] == 200
    sent = [(backend, json.loads(raw)) for backend in (encode, decode, *prefill) for raw in backend.bodies]
    assert len(encode.bodies) == 1 and len(decode.bodies) == 2 and all(len(p.bodies) == 2 for p in prefill)
    for backend, body in sent:
        assert "ec_transfer_params" not in body, (backend.url, body)
        kv = body.get("kv_transfer_params")
        if backend in prefill:
            assert kv["do_remote_decode"] is True and kv["remote_host"] is None  # the proxy's own request
        else:
            assert kv is None, (backend.url, body)  # the recording P returned none, so D gets none
    assert not any(b"attacker" in raw or b"203.0.113.9" in raw for backend, _ in sent for raw in backend.bodies)


@pytest.mark.parametrize("stage", ["encode", "prefill"])
def test_a_client_that_leaves_frees_the_encoder_and_the_prefill(procs, tmp_path, stage):
    """The proxy cancels its upstream call when the client leaves, and the instance (here a sim,
    as vLLM does) aborts the request instead of working for nobody. Each stage alone would last
    for days, so the slot coming free can only be the abort."""
    forever = "100000000"  # ms
    if stage == "encode":
        ec = tmp_path / "ec"
        busy = procs.sim(free_ports(1)[0], "--ec-transfer-config", ec_json("ec_producer", ec), "--sim-encode-ms", forever)
        decode = procs.sim(free_ports(1)[0], "--ec-transfer-config", ec_json("ec_consumer", ec))
        proxy = start_proxy(procs, encode=[busy], decode=[decode])
        body = {"messages": messages(image(7)), "max_tokens": 2}
    else:
        kv = '{"kv_connector": "NixlConnector", "kv_role": "%s"}'
        busy = procs.sim(free_ports(1)[0], "--kv-transfer-config", kv % "kv_producer", "--sim-ttft-ms", forever)
        decode = procs.sim(free_ports(1)[0], "--kv-transfer-config", kv % "kv_consumer")
        proxy = start_proxy(procs, prefill=[busy], decode=[decode])
        body = {"messages": [{"role": "user", "content": "a prompt"}], "max_tokens": 2}
    send_and_hang_up_when(int(proxy.rsplit(":", 1)[1]), body, lambda: sim_running(busy) == 1)
    wait_for(lambda: sim_running(busy) == 0, 60, f"the {stage} instance to abort the request of a client that left")
    assert sim_running(decode) == 0 and metrics(decode)["epdctl_sim_requests_total"] == 0


def raw_exchange(port: int, data: bytes) -> tuple[bytes, dict[str, str], bytes]:
    """Send raw bytes; the status line, headers and body of the answer (read by its Content-Length)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536) or pytest.fail(f"closed after {answer!r}")
        head, _, body = answer.partition(b"\r\n\r\n")
        status, *lines = head.split(b"\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.decode().partition(":") for line in lines)}
        while len(body) < int(headers["content-length"]):
            body += sock.recv(65536) or pytest.fail(f"closed after {answer + body!r}")
    return status, headers, body


def test_expect_100_continue_with_a_body_over_the_limit_gets_413_at_once(procs):
    decode = procs.sim(free_ports(1)[0])
    proxy = start_proxy(procs, decode=[decode], extra=["--max-body-mb", "1"])
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % (1024 * 1024 + 1))
    status, headers, body = raw_exchange(int(proxy.rsplit(":", 1)[1]), head)  # and no body ever follows
    assert status.startswith(b"HTTP/1.1 413"), status
    assert headers["content-type"].startswith("application/json") and headers["connection"] == "close"
    assert "max_body_mb" in _error(body) and json.loads(body)["error"]["code"] == 413
    # At the limit, "100 Continue" as before.
    with socket.create_connection(("127.0.0.1", int(proxy.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(head.replace(b"%d" % (1024 * 1024 + 1), b"%d" % (1024 * 1024)))
        assert sock.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")


BODY = b'{"prompt": "x", "max_tokens": 1}'
FRAMING = {
    "two Content-Lengths": b"Content-Length: %d\r\nContent-Length: 5\r\n" % len(BODY),
    "Content-Length and Transfer-Encoding": b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % len(BODY),
    "an obs-fold": b"X-Folded: a\r\n  folded\r\nContent-Length: %d\r\n" % len(BODY),
    "a huge header": b"X-Huge: " + b"a" * 20000 + b"\r\nContent-Length: %d\r\n" % len(BODY),
    "a bad method": None,
}


@pytest.mark.parametrize("case", list(FRAMING))
def test_framing_errors_of_the_http_parser_get_a_json_400(epd, case):
    port = int(epd["proxy"].rsplit(":", 1)[1])
    headers = FRAMING[case]
    data = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n" + BODY if headers
            else b"G\x01T /health HTTP/1.1\r\nHost: x\r\n\r\n")
    status, response_headers, body = raw_exchange(port, data)
    assert b" 400 " in status, (status, body)
    assert response_headers["content-type"].startswith("application/json"), body
    assert _error(body).startswith("malformed HTTP request: ") and "\n" not in _error(body)
    assert len(body) < 1000  # the parser's message is cut short, not a copy of a huge header
    log = epd["procs"].log("proxy")
    assert "malformed HTTP request" in log
    _no_traceback(epd)
