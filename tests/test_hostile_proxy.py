"""Issue #12, the proxy: every malformed request gets a 4xx with an OpenAI-style error, never a
5xx or a traceback; nothing outside the EC folder is written; /health answers from known state.

A real proxy process in front of real sim processes, over real HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from conftest import free_ports, http_get, http_post

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
            "procs": procs}


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


@pytest.mark.parametrize("key", ["../x", "/abs/path", "..", ".", "a/b", "x" * 129, "new\nline", "", 7, {"a": 1}])
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
    os.kill(pd_pid, signal.SIGSTOP)
    try:
        time.sleep(0.3)
        for _ in range(5):
            started = time.monotonic()
            try:
                status, _ = http_get(epd["proxy"] + "/health", timeout=5)
            except OSError:
                status = None
            took = time.monotonic() - started
            assert took < 0.5, f"/health took {took:.2f}s"
            assert status in (200, 503)
    finally:
        os.kill(pd_pid, signal.SIGCONT)


def test_no_warning_on_a_normal_start_and_plan_names_in_the_log(epd):
    assert http_post(epd["url"], {"messages": messages(image(5)), "max_tokens": 1})[0] == 200
    log = epd["procs"].log("proxy")
    assert "WARNING" not in log, log
    assert "decode-0" not in log and "pd-0" in log
