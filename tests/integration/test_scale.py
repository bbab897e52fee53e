"""`epdctl scale`: a running topology's encoders grown and drained under load, with real sims,
a real proxy and real signals: every new encoder serves, not one request fails, nothing else
restarts, and `down` after it leaves nothing."""

from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import threading

import psutil
import pytest

from conftest import assert_no_orphans, epdctl, http_post, metrics, wait_for, write_sim_topology

COUNTER = itertools.count()


def _image_request() -> dict:
    """A request with an image never seen before: its encoder call is real work for some encoder."""
    data = base64.b64encode(f"scale test image {next(COUNTER)} {os.getpid()}".encode()).decode()
    return {"model": "sim-model", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is it?"}, {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}]}]}


class Load:
    """Clients sending image requests back to back until stopped; every answer's status is kept."""

    def __init__(self, url: str, clients: int = 3):
        self.url = url
        self.statuses: list[tuple[int, bytes]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        while not self.stop.is_set():
            status, body = http_post(self.url + "/v1/chat/completions", _image_request(), timeout=60)
            self.statuses.append((status, body[:200]))

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        wait_for(lambda: len(self.statuses) >= 3, 60, "the load to get going")
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=90)

    def failed(self) -> list[tuple[int, bytes]]:
        return [s for s in self.statuses if s[0] != 200]


def _state(state_dir, name) -> dict:
    return json.loads((state_dir / name / "state.json").read_text())


def _processes(state_dir, name) -> dict[str, dict]:
    return {p["name"]: p for p in _state(state_dir, name)["processes"]}


def _encoded(url: str) -> float:
    return metrics(url).get("epdctl_sim_encoded_items_total", 0.0)


@pytest.fixture
def scalable(tmp_path, state_dir):
    """An E+PD sim whose encoders take a while (so a drain has requests to wait for), up -d."""
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="sc",
                                         timings="sim-ttft-ms: 5, sim-tpot-ms: 1, sim-encode-ms: 150")
    epdctl("up", "-d", str(topology), check=0)
    yield topology, ports, f"http://127.0.0.1:{ports['proxy']}"
    epdctl("down", "sc", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_scale_up_under_load_every_new_encoder_serves_and_no_request_fails(scalable, state_dir):
    topology, ports, url = scalable
    pd_before = _processes(state_dir, "sc")["pd-0"]
    with Load(url) as load:
        result = epdctl("scale", "sc", "encode=3", timeout=300, check=0)
        assert "encode-1: healthy, taking traffic" in result.stdout and "sc scaled to encode=3" in result.stdout
        procs = _processes(state_dir, "sc")
        new = [procs["encode-1"], procs["encode-2"]]
        # Every new encoder serves requests of the same load (the proxy balances by load).
        wait_for(lambda: all(_encoded(p["url"]) > 0 for p in new), 120, "both new encoders to encode items")
    assert len(load.statuses) > 10 and not load.failed(), load.failed()[:3]
    pd_after = _processes(state_dir, "sc")["pd-0"]
    assert (pd_after["pid"], pd_after["restarts"]) == (pd_before["pid"], 0)  # nothing else restarted
    status = json.loads(epdctl("status", "sc", "--json", check=0).stdout)
    assert [i["name"] for i in status["instances"] if i["role"] == "encode"] == ["encode-0", "encode-1", "encode-2"]
    assert status["health"] == "healthy"
    events = epdctl("events", "sc", check=0).stdout
    assert "encode-2" in events and "started" in events
    # Starting the new encoders is a scale, not a fault: the topology's health never changed.
    changes = [json.loads(line) for line in (state_dir / "sc" / "events.jsonl").read_text().splitlines()]
    assert not [e for e in changes if e["process"] == "topology"], changes


def test_scale_down_drains_with_zero_failed_requests(scalable, state_dir):
    topology, ports, url = scalable
    epdctl("scale", "sc", "encode=3", timeout=300, check=0)
    procs = _processes(state_dir, "sc")
    leaving = [psutil.Process(procs[n]["pid"]) for n in ("encode-1", "encode-2")]
    with Load(url, clients=4) as load:
        wait_for(lambda: all(_encoded(procs[n]["url"]) > 0 for n in ("encode-1", "encode-2")), 120,
                 "the encoders that will leave to be busy")
        result = epdctl("scale", "sc", "encode=1", timeout=300, check=0)
        assert "encode-1: drained and stopped" in result.stdout and "encode-2: drained and stopped" in result.stdout
        served = len(load.statuses)
        wait_for(lambda: len(load.statuses) >= served + 6, 60, "requests after the drain")
    assert not load.failed(), load.failed()[:3]
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in leaving)
    assert set(_processes(state_dir, "sc")) == {"encode-0", "pd-0", "proxy"}
    assert _processes(state_dir, "sc")["pd-0"]["restarts"] == 0
    # The proxy's /metrics shows the pool as it is now, and the drains it did.
    seen = metrics(url)
    assert seen['epdctl_proxy_pool_instances{role="encode"}'] == 1
    assert seen['epdctl_proxy_drains_total{role="encode"}'] == 2


def test_an_adopting_up_keeps_the_scaled_pool(scalable, state_dir):
    topology, ports, url = scalable
    epdctl("scale", "sc", "encode=2", timeout=300, check=0)
    supervisor = _state(state_dir, "sc")["supervisor"]["pid"]
    os.kill(supervisor, signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(supervisor) or psutil.Process(supervisor).status() == psutil.STATUS_ZOMBIE,
             30, "the supervisor to die")
    again = epdctl("up", "-d", str(topology), check=0)
    assert "adopted" in again.stdout, again.stdout
    status = json.loads(epdctl("status", "sc", "--json", check=0).stdout)
    assert [i["name"] for i in status["instances"] if i["role"] == "encode"] == ["encode-0", "encode-1"]
    assert status["health"] == "healthy"
    # And it scales on from there.
    assert "sc scaled to encode=1" in epdctl("scale", "sc", "encode=1", timeout=300, check=0).stdout


def test_scale_with_proxy_workers_every_worker_learns_the_pool(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="scw",
                                         timings="sim-ttft-ms: 5, sim-tpot-ms: 1, sim-encode-ms: 20")
    line = f"proxy: {{host: 127.0.0.1, port: {ports['proxy']}}}"
    topology.write_text(topology.read_text().replace(line, line[:-1] + ", workers: 2}"))
    url = f"http://127.0.0.1:{ports['proxy']}"
    try:
        epdctl("up", "-d", str(topology), check=0)
        assert "scw scaled to encode=2" in epdctl("scale", "scw", "encode=2", timeout=300, check=0).stdout
        new = _processes(state_dir, "scw")["encode-1"]["url"]
        # `done` waited for the lowest pool version over the live workers: each one routes there now.
        for _ in range(20):
            assert http_post(url + "/v1/chat/completions", _image_request())[0] == 200
        assert _encoded(new) > 0
    finally:
        epdctl("down", "scw", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_scale_refuses_what_cannot_be_scaled(scalable, state_dir):
    topology, ports, url = scalable
    for words, needle, code in [
        (["sc", "pd=0"], "pd=0", 2), (["sc", "encoder=2"], "ROLE=N expected", 2), (["sc"], "ROLE=N", 2),
        (["sc", "prefill=2"], "no prefill instance to scale", 2), (["nosuch", "encode=2"], "no topology named", 1),
    ]:
        result = epdctl("scale", *words, timeout=120)
        assert result.returncode == code and needle in result.stderr, (words, result.stderr)
        assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert set(_processes(state_dir, "sc")) == {"encode-0", "pd-0", "proxy"}


def test_a_restarted_proxy_serves_the_scaled_pool(scalable, state_dir):
    topology, ports, url = scalable
    epdctl("scale", "sc", "encode=2", timeout=300, check=0)
    epdctl("scale", "sc", "encode=1", timeout=300, check=0)
    epdctl("scale", "sc", "encode=2", timeout=300, check=0)  # encode-1 again, as a new process
    procs = _processes(state_dir, "sc")
    os.kill(procs["proxy"]["pid"], signal.SIGKILL)  # its restart starts from the argv of `up`: encode-0 only
    wait_for(lambda: _processes(state_dir, "sc")["proxy"]["restarts"] == 1
             and _processes(state_dir, "sc")["proxy"]["state"] == "healthy", 60, "the proxy restarted")
    before = _encoded(procs["encode-1"]["url"])
    for _ in range(12):
        assert http_post(url + "/v1/chat/completions", _image_request())[0] == 200
    assert _encoded(procs["encode-1"]["url"]) > before  # it read the pool file before its first request


def _encoders(state_dir, name) -> int:
    return sum(1 for n in _processes(state_dir, name) if n.startswith("encode-"))


def test_autoscale_grows_the_encoders_under_load_and_shrinks_them_after(tmp_path, state_dir):
    topology, ports = write_sim_topology(
        tmp_path, "1e1pd", name="auto", timings="sim-ttft-ms: 5, sim-tpot-ms: 1, sim-encode-ms: 200",
        extra="autoscale: {encode: {min: 1, max: 3, target_inflight: 1, scale_up_after_s: 1, scale_down_after_s: 2}}")
    url = f"http://127.0.0.1:{ports['proxy']}"
    try:
        epdctl("up", "-d", str(topology), check=0)
        with Load(url, clients=6) as load:
            wait_for(lambda: _encoders(state_dir, "auto") == 3 and _state(state_dir, "auto")["phase"] == "running",
                     120, "the pool to grow to its max under load")
            served = len(load.statuses)
            wait_for(lambda: len(load.statuses) >= served + 6, 60, "requests on the grown pool")
        assert not load.failed(), load.failed()[:3]
        wait_for(lambda: _encoders(state_dir, "auto") == 1, 120, "the pool to shrink to its min once idle")
        status = json.loads(epdctl("status", "auto", "--json", check=0).stdout)
        pool = status["autoscale"]["encode"]
        assert pool["size"] == 1 and (pool["min"], pool["max"]) == (1, 3)
        steps = [(h["from"], h["to"]) for h in pool["history"]]
        assert steps[:2] == [(1, 2), (2, 3)] and steps[-2:] == [(3, 2), (2, 1)], steps
        assert "autoscale encode: 1 instance(s)" in epdctl("status", "auto", check=0).stdout
        events = epdctl("events", "auto", check=0).stdout
        assert "autoscale" in events and "above the target" in events and "below half the target" in events
    finally:
        epdctl("down", "auto", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_bench_on_an_autoscaled_topology_reports_the_pool_over_the_run(tmp_path, state_dir):
    topology, ports = write_sim_topology(
        tmp_path, "1e1pd", name="autob", timings="sim-ttft-ms: 5, sim-tpot-ms: 1, sim-encode-ms: 200",
        extra="autoscale: {encode: {min: 1, max: 2, target_inflight: 1, scale_up_after_s: 1, scale_down_after_s: 600}}")
    try:
        epdctl("up", "-d", str(topology), check=0)
        # Enough single-image requests at 6 in flight that one encoder stays above the target for a while.
        result = epdctl("bench", "autob", "--num-prompts", "120", "--concurrency", "6", "--images-per-request", "1",
                        "--max-tokens", "2", "--json", timeout=600, check=0)
        report = json.loads(result.stdout)
        assert report["failed"] == 0
        pool = report["pool"]
        assert pool[0]["sizes"] == {"encode": 1, "decode": 1} and pool[0]["t_s"] < pool[-1]["t_s"], pool
        assert pool[-1]["sizes"]["encode"] == 2, pool  # the autoscaler grew it during the run, and bench saw it
    finally:
        epdctl("down", "autob", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_a_scaled_instance_takes_a_device_of_its_roles_pool_and_one_that_cannot_fit_is_refused(tmp_path, state_dir):
    from conftest import free_ports

    ports = free_ports(3)
    topology = tmp_path / "gpu.yaml"
    topology.write_text(
        "name: gpu\nmodel: sim-model\nengine: sim\nplatform: cuda\n"
        "defaults: {args: {sim-ttft-ms: 5, sim-tpot-ms: 1, sim-encode-ms: 5}}\n"
        f"ec_transfer: {{connector: ECExampleConnector, shared_storage_path: {tmp_path / 'ec'}}}\n"
        f"encode: [{{devices: [0], port: {ports[0]}, gpu_memory_utilization: 0.6}}]\n"
        f"pd: [{{devices: [1], port: {ports[1]}}}]\nproxy: {{host: 127.0.0.1, port: {ports[2]}}}\n"
        "scale_devices: {encode: [2]}\nhealth: {timeout_s: 30, interval_s: 0.05}\n")
    env = {"EPDCTL_DEVICE_COUNT": "4"}
    try:
        epdctl("up", "-d", str(topology), env=env, check=0)
        epdctl("scale", "gpu", "encode=2", env=env, check=0)
        added = _processes(state_dir, "gpu")["encode-1"]
        assert added["devices"] == [2] and added["env"]["CUDA_VISIBLE_DEVICES"] == "2", added
        assert psutil.Process(added["pid"]).environ()["CUDA_VISIBLE_DEVICES"] == "2"
        # The pool is spent: a third encoder would share device 0 at 1.2 of its memory.
        refused = epdctl("scale", "gpu", "encode=3", env=env)
        assert refused.returncode != 0 and "device 0 is shared with a memory budget of 1.2" in refused.stderr, refused
        assert "scale_devices" in refused.stderr and "Traceback" not in refused.stderr
        assert [p for p in _processes(state_dir, "gpu") if p.startswith("encode")] == ["encode-0", "encode-1"]
    finally:
        epdctl("down", "gpu", env=env, check=0)
    assert_no_orphans(str(state_dir), ports)
def test_two_scales_at_once_each_gets_its_answer(scalable, state_dir):
    # Both requests land together: one is carried out, the other is refused while it works (or,
    # taken after, finds the pool already that size). Neither may wait out its timeout unanswered.
    results = {}

    def ask(key: str) -> None:
        results[key] = epdctl("scale", "sc", "encode=3", "--wait-timeout", "60", timeout=120)

    threads = [threading.Thread(target=ask, args=(key,)) for key in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    codes = sorted(r.returncode for r in results.values())
    assert codes in ([0, 0], [0, 2]), {k: (r.returncode, r.stdout, r.stderr) for k, r in results.items()}
    refused = [r for r in results.values() if r.returncode == 2]
    assert all("still in progress" in r.stderr for r in refused), refused[0].stderr
    assert sum(1 for n in _processes(state_dir, "sc") if n.startswith("encode-")) == 3
