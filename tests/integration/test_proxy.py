"""The EPD proxy against real sim processes: both flows, EC reuse, affinity, failover, errors, health, metrics."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request

import pytest

from epdctl.connectors import EC_FILENAME
from epdctl.media import content_hash

from conftest import epdctl, assert_no_orphans, free_ports, http_get, http_post, metrics, wait_healthy, write_sim_topology

openai = pytest.importorskip("openai")


def image(n: int) -> str:
    return "data:image/png;base64," + base64.b64encode(f"image number {n}".encode()).decode()


def messages(*images: str, text: str = "describe") -> list:
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in images),
                                         {"type": "text", "text": text}]}]


def ec_json(role: str, path) -> str:
    return json.dumps({"ec_connector": "ECExampleConnector", "ec_role": role,
                       "ec_connector_extra_config": {"shared_storage_path": str(path)}})


def start_proxy(procs, *, encode=(), prefill=(), decode=(), extra=(), cli: bool = False, healthy: bool = True) -> str:
    port = free_ports(1)[0]
    flags = ["--port", str(port), "--encode-servers-urls", ",".join(encode) or "disable",
             "--prefill-servers-urls", ",".join(prefill) or "none", "--decode-servers-urls", ",".join(decode), *extra]
    argv = [sys.executable, "-m", "epdctl", "proxy", *flags] if cli else [sys.executable, "-m", "epdctl.proxy", *flags]
    proc = procs.start(argv, "proxy")
    url = f"http://127.0.0.1:{port}"
    if healthy:
        wait_healthy(url, proc=proc)
    else:  # its backends are down on purpose: wait until it listens
        deadline = time.monotonic() + 20
        while http_get_or_none(url + "/health") is None:
            assert proc.poll() is None and time.monotonic() < deadline, "the proxy did not start"
            time.sleep(0.05)
    return url


def http_get_or_none(url: str):
    try:
        return http_get(url, timeout=2)
    except OSError:
        return None


@pytest.fixture
def up(tmp_path, state_dir):
    """Bring a sim topology up with the real CLI; always bring it down and check for orphans."""
    started = []

    def bring_up(kind: str, **kw):
        topology, ports = write_sim_topology(tmp_path, kind, name=kind, **kw)
        epdctl("up", "-d", str(topology), check=0)
        started.append((topology.stem, ports))
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        return urls

    yield bring_up
    for name, ports in started:
        epdctl("down", name, check=0)
        assert_no_orphans(str(state_dir), list(ports.values()))


def test_e_pd_text_and_images_streamed_and_not(up, tmp_path):
    urls = up("1e1pd")
    client = openai.OpenAI(base_url=urls["proxy"] + "/v1", api_key="none", max_retries=0)
    text = client.chat.completions.create(model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert text.usage.completion_tokens == 4
    assert metrics(urls["encode-0"])["epdctl_sim_requests_total"] == 0, "text must skip the encoders"

    one = client.chat.completions.create(model="sim-model", messages=messages(image(1)), max_tokens=4)
    two = client.chat.completions.create(model="sim-model", messages=messages(image(2), image(3)), max_tokens=4)
    streamed = client.chat.completions.create(model="sim-model", messages=messages(image(4)), max_tokens=6, stream=True)
    chunks = [c.choices[0].delta.content or "" for c in streamed if c.choices]
    assert one.choices[0].message.content and two.choices[0].message.content and "".join(chunks)

    e, pd = metrics(urls["encode-0"]), metrics(urls["pd-0"])
    assert e["epdctl_sim_encoded_items_total"] == 4
    assert pd["epdctl_sim_ec_loaded_total"] == 4 and pd["epdctl_sim_ec_missed_total"] == 0
    assert pd["epdctl_sim_encoded_items_total"] == 0
    for n in range(1, 5):
        assert (tmp_path / "ec" / content_hash(image(n)) / EC_FILENAME).exists()

    completion = client.completions.create(model="sim-model", prompt="once", max_tokens=3, stream=True)
    assert len([c for c in completion if c.choices and c.choices[0].text]) == 3


def test_e_p_d_prefills_on_p_and_decodes_remotely(up):
    urls = up("1e1p1d")
    client = openai.OpenAI(base_url=urls["proxy"] + "/v1", api_key="none", max_retries=0)
    client.chat.completions.create(model="sim-model", messages=messages(image(1)), max_tokens=3)
    list(client.chat.completions.create(model="sim-model", messages=[{"role": "user", "content": "t"}], max_tokens=3,
                                        stream=True))
    p, d = metrics(urls["prefill-0"]), metrics(urls["decode-0"])
    assert p["epdctl_sim_prefills_total"] == 2 and p["epdctl_sim_ec_loaded_total"] == 1
    assert d["epdctl_sim_remote_prefills_total"] == 2 and d["epdctl_sim_prefills_total"] == 0
    assert metrics(urls["encode-0"])["epdctl_sim_encoded_items_total"] == 1
    # A streamed request is counted just after its last byte, so the client can see [DONE] first.
    ok = 'epdctl_proxy_requests_total{outcome="ok",route="chat"}'
    deadline = time.monotonic() + 5
    while metrics(urls["proxy"]).get(ok) != 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    proxy = metrics(urls["proxy"])
    assert proxy['epdctl_proxy_stage_seconds_count{stage="prefill"}'] == 2
    assert proxy['epdctl_proxy_stage_seconds_count{stage="encode"}'] == 1
    assert proxy[ok] == 2


def test_aggregated_pd_encodes_its_own_images(up):
    urls = up("agg")
    status, _ = http_post(urls["proxy"] + "/v1/chat/completions", {"messages": messages(image(1)), "max_tokens": 2})
    assert status == 200
    pd = metrics(urls["pd-0"])
    assert pd["epdctl_sim_encoded_items_total"] == 1 and pd["epdctl_sim_ec_loaded_total"] == 0


def test_ec_reuse_skips_the_encoder(up):
    urls = up("1e1pd")
    for _ in range(3):
        assert http_post(urls["proxy"] + "/v1/chat/completions", {"messages": messages(image(7)), "max_tokens": 1})[0] == 200
    assert metrics(urls["encode-0"])["epdctl_sim_requests_total"] == 1
    assert metrics(urls["proxy"])["epdctl_proxy_ec_reused_items_total"] == 2
    assert metrics(urls["pd-0"])["epdctl_sim_ec_loaded_total"] == 3


def two_encoders_and_pd(procs, tmp_path) -> tuple[list[str], str]:
    ec = tmp_path / "ec"
    e1, e2, pd = free_ports(3)
    encoders = [procs.sim(e1, "--ec-transfer-config", ec_json("ec_producer", ec)),
                procs.sim(e2, "--ec-transfer-config", ec_json("ec_producer", ec))]
    return encoders, procs.sim(pd, "--ec-transfer-config", ec_json("ec_consumer", ec))


def test_same_image_goes_to_the_same_encoder(procs, tmp_path):
    encoders, decode = two_encoders_and_pd(procs, tmp_path)
    # No --ec-shared-storage-path: the proxy cannot see the EC, so every item goes to an encoder.
    proxy = start_proxy(procs, encode=encoders, decode=[decode])
    for _ in range(4):
        assert http_post(proxy + "/v1/chat/completions", {"messages": messages(image(1)), "max_tokens": 1})[0] == 200
    counts = sorted(metrics(u)["epdctl_sim_requests_total"] for u in encoders)
    assert counts == [0, 4]
    for n in range(2, 8):  # different images spread over both
        assert http_post(proxy + "/v1/chat/completions", {"messages": messages(image(n)), "max_tokens": 1})[0] == 200
    assert min(metrics(u)["epdctl_sim_requests_total"] for u in encoders) >= 2


def test_failover_when_an_encoder_is_killed(procs, tmp_path):
    encoders, decode = two_encoders_and_pd(procs, tmp_path)
    proxy = start_proxy(procs, encode=encoders, decode=[decode], extra=["--probe-interval-s", "60"])
    victim = procs.procs[0]
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    for n in range(6):
        status, body = http_post(proxy + "/v1/chat/completions", {"messages": messages(image(100 + n)), "max_tokens": 1})
        assert status == 200, body
    m = metrics(proxy)
    assert m['epdctl_proxy_retries_total{role="encode"}'] >= 1
    assert metrics(encoders[1])["epdctl_sim_requests_total"] == 6
    assert metrics(decode)["epdctl_sim_ec_loaded_total"] == 6
    status, body = http_get(proxy + "/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok"  # one encoder is enough
    assert [b["state"] for b in health["roles"]["encode"]] == ["unhealthy", "healthy"]


def test_dead_decoder_gives_a_fast_clean_error(procs):
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    proxy = start_proxy(procs, decode=[dead], healthy=False)
    status, body = http_post(proxy + "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True})
    assert status == 502
    assert "decode" in json.loads(body)["error"]["message"]
    status, body = http_get(proxy + "/health")
    assert status == 503 and json.loads(body)["roles"]["decode"][0]["state"] == "unhealthy"


def test_decoder_dying_mid_stream_ends_with_an_error_event(procs):
    port = free_ports(1)[0]
    decode = procs.sim(port, "--sim-tpot-ms", "100")
    proxy = start_proxy(procs, decode=[decode])
    body = json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 200, "stream": True}).encode()
    req = urllib.request.Request(proxy + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
        first = resp.readline()
        assert first.startswith(b"data: ")
        os.killpg(procs.procs[0].pid, signal.SIGKILL)
        rest = resp.read().decode()
    events = [line[6:] for line in rest.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 502 and "mid-stream" in error["message"]


def test_client_disconnect_cancels_upstream(procs):
    decode = procs.sim(free_ports(1)[0], "--sim-tpot-ms", "100")
    proxy = start_proxy(procs, decode=[decode])
    sock = socket.create_connection(("127.0.0.1", int(proxy.rsplit(":", 1)[1])))
    body = json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 300, "stream": True}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert sock.recv(100).startswith(b"HTTP/1.1 200")
    in_flight = 'epdctl_proxy_in_flight{instance="decode-0",role="decode",url="%s"}' % decode
    assert metrics(proxy)[in_flight] == 1
    sock.close()
    deadline = time.monotonic() + 5  # the stream itself would last 30 s
    while metrics(proxy)[in_flight] != 0:
        assert time.monotonic() < deadline, "the upstream request outlived its client"
        time.sleep(0.1)
    assert metrics(proxy)['epdctl_proxy_requests_total{outcome="cancelled",route="chat"}'] == 1


def test_bad_input_gets_400_and_413(procs, tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    (media / "ok.png").write_bytes(b"pixels")
    decode = procs.sim(free_ports(1)[0], "--allowed-local-media-path", str(media))
    proxy = start_proxy(procs, decode=[decode], extra=["--max-body-mb", "1", "--allowed-local-media-path", str(media)],
                        cli=True)
    url = proxy + "/v1/chat/completions"
    assert http_post(url, None, raw=b"{oops")[0] == 400
    assert http_post(url, None, raw=b"[]")[0] == 400
    status, body = http_post(url, {"messages": messages("file:///etc/passwd")})
    assert status == 400 and "outside the allowed local media path" in json.loads(body)["error"]["message"]
    assert http_post(url, {"messages": messages(f"file://{media}/ok.png"), "max_tokens": 1})[0] == 200
    status, body = http_post(url, {"messages": [{"role": "user", "content": "x" * (1024 * 1024 + 1)}]})
    assert status == 413 and json.loads(body)["error"]["code"] == 413
    # The backend's own 4xx is passed on as it is.
    status, body = http_post(url, {"messages": [{"role": "user", "content": "x"}], "max_tokens": -1})
    assert status == 400 and "max_tokens" in json.loads(body)["error"]["message"]
    assert metrics(proxy)['epdctl_proxy_requests_total{outcome="client_error",route="chat"}'] == 5


def test_request_id_models_and_metrics(procs):
    decode = procs.sim(free_ports(1)[0])
    proxy = start_proxy(procs, decode=[decode])
    req = urllib.request.Request(proxy + "/v1/completions", data=json.dumps({"prompt": "x", "max_tokens": 1}).encode(),
                                 headers={"Content-Type": "application/json", "X-Request-Id": "rid-42"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["X-Request-Id"] == "rid-42"
        assert json.loads(resp.read())["id"] == "cmpl-rid-42"  # the decoder saw the same id
    # Without one, the proxy makes an id per request (drawn from a counter, not urandom): each
    # distinct, and the one the decoder saw.
    seen = set()
    for _ in range(3):
        req = urllib.request.Request(proxy + "/v1/completions", data=json.dumps({"prompt": "x", "max_tokens": 1}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            rid = resp.headers["X-Request-Id"]
            assert rid and json.loads(resp.read())["id"] == f"cmpl-{rid}"
        seen.add(rid)
    assert len(seen) == 3
    status, body = http_get(proxy + "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == "sim-model"
    m = metrics(proxy)
    assert m['epdctl_proxy_requests_total{outcome="ok",route="completions"}'] == 4
    assert m['epdctl_proxy_stage_seconds_count{stage="decode_ttft"}'] == 4


def test_unknown_routes_and_methods_get_openai_style_404_and_405(procs):
    decode = procs.sim(free_ports(1)[0])
    proxy = start_proxy(procs, decode=[decode])

    def call(method: str, path: str):
        req = urllib.request.Request(proxy + path, method=method, data=b"{}" if method == "POST" else None)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read()

    status, _, body = call("GET", "/v1/nothing")
    assert status == 404 and json.loads(body)["error"] == {
        "message": "no route /v1/nothing", "type": "NotFoundError", "param": None, "code": 404}
    status, headers, body = call("GET", "/v1/chat/completions")
    assert status == 405 and headers["Allow"] == "POST" and "use POST" in json.loads(body)["error"]["message"]
    status, headers, _ = call("POST", "/health")
    assert status == 405 and headers["Allow"] == "GET"
    status, _, body = call("HEAD", "/health")  # as a GET, without the body
    assert status == 200 and body == b""
    # None of these reached a backend or counted as a request.
    assert not any(key.startswith("epdctl_proxy_requests_total") for key in metrics(proxy))


def test_expect_100_continue_is_answered_before_the_body(procs):
    """curl -H 'Expect: 100-continue' (and other clients past a body size) send the body only
    after "100 Continue", or after their own timeout: the proxy must say it at once."""
    decode = procs.sim(free_ports(1)[0])
    proxy = start_proxy(procs, decode=[decode])
    port = int(proxy.rsplit(":", 1)[1])
    body = json.dumps({"model": "sim-model", "prompt": "x" * 3000, "max_tokens": 1}).encode()

    def head(expect: str) -> bytes:
        return (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nExpect: {expect}\r\n\r\n").encode()

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head("100-continue"))
        assert sock.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")  # before any body byte
        sock.sendall(body)
        answer = b""
        while b'"usage"' not in answer:
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 OK")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head("teapot"))
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 417") and b"unsupported Expect: teapot" in answer


@pytest.mark.parametrize("folder", ["missing", "someone-elses"])
def test_prometheus_multiproc_dir_in_the_environment_is_ignored(procs, tmp_path, folder):
    """prometheus_client writes every metric to files in PROMETHEUS_MULTIPROC_DIR when it is set:
    the sim and a one-process proxy must neither fail on a missing folder nor write into one."""
    target = tmp_path / folder
    if folder != "missing":
        target.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(target)}
    sim_port, proxy_port = free_ports(2)
    sim = procs.start([sys.executable, "-m", "epdctl.sim", "sim-model", "--port", str(sim_port)], "sim", env=env)
    wait_healthy(f"http://127.0.0.1:{sim_port}", proc=sim)
    proxy = procs.start([sys.executable, "-m", "epdctl.proxy", "--port", str(proxy_port),
                         "--decode-servers-urls", f"http://127.0.0.1:{sim_port}"], "proxy", env=env)
    url = f"http://127.0.0.1:{proxy_port}"
    wait_healthy(url, proc=proxy)
    assert http_post(url + "/v1/completions", {"prompt": "x", "max_tokens": 1})[0] == 200
    assert metrics(url)['epdctl_proxy_requests_total{outcome="ok",route="completions"}'] == 1
    assert http_get(f"http://127.0.0.1:{sim_port}/metrics")[0] == 200
    assert not target.exists() if folder == "missing" else list(target.iterdir()) == []


def test_proxy_busy_port_is_one_line(procs):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        result = epdctl("proxy", "--port", str(port), "--decode-servers-urls", "http://127.0.0.1:1")
    finally:
        holder.close()
    assert result.returncode == 1 and f"port {port}" in result.stderr and "Traceback" not in result.stderr
