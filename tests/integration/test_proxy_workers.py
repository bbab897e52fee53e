"""proxy.workers: several proxy processes on one port (SO_REUSEPORT) under one parent — real
processes, real sockets, real signals."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import (assert_no_orphans, epdctl, free_ports, http_get, http_post, metrics, wait_for,
                      wait_healthy, write_sim_topology)

CHAT = {"model": "sim-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}


def _workers(parent: int) -> list[psutil.Process]:
    try:
        return psutil.Process(parent).children()
    except psutil.NoSuchProcess:
        return []


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _metrics_dir(worker: psutil.Process) -> Path:
    return Path(worker.environ()["PROMETHEUS_MULTIPROC_DIR"])


@pytest.fixture
def workers_proxy(procs):
    """A PD sim behind `epdctl proxy --workers 3`; yields (proxy URL, parent Popen)."""
    pd_port, port = free_ports(2)
    pd = procs.sim(pd_port, "--sim-ttft-ms", "1", "--sim-tpot-ms", "1")
    proxy = procs.start([sys.executable, "-m", "epdctl.proxy", "--port", str(port), "--decode-servers-urls", pd,
                         "--workers", "3", "--probe-interval-s", "0.2"], "proxy")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc=proxy)
    wait_for(lambda: len(_workers(proxy.pid)) == 3, 10, "three workers")
    # Healthy means one worker answers; the kernel spreads connections only over the sockets
    # already listening, so wait until every worker has bound its own (a busy machine starts
    # them seconds apart, and CI once saw all 40 connections land on the first).
    wait_for(lambda: all(_listening(w, port) for w in _workers(proxy.pid)), 30, "every worker to listen")
    return url, proxy, port


def _listening(worker: psutil.Process, port: int) -> bool:
    try:
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in worker.net_connections("tcp"))
    except psutil.NoSuchProcess:
        return False


def test_workers_share_the_port_and_their_metrics_add_up(workers_proxy):
    url, proxy, port = workers_proxy
    workers = _workers(proxy.pid)
    # Held-open connections, each its own source port: the kernel spreads them over the workers.
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(40)]
    try:
        for conn in conns:
            conn.request("POST", "/v1/chat/completions", body=json.dumps(CHAT),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()
            resp.read()
        serving = set()
        for worker in workers:
            if any(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port for c in worker.net_connections("tcp")):
                serving.add(worker.pid)
        # 40 connections all hashed onto one or two of three sockets: odds about 3 * (2/3)^40, 2e-7.
        assert serving == {w.pid for w in workers}, f"connections served by {serving} of {[w.pid for w in workers]}"
    finally:
        for conn in conns:
            conn.close()
    # /metrics, from whichever worker answers, counts every worker's requests.
    for _ in range(5):
        counted = metrics(url)['epdctl_proxy_requests_total{outcome="ok",route="chat"}']
        assert counted == 40
    # The in-flight gauge is summed over live workers, not listed once per worker.
    status, body = http_get(url + "/metrics")
    lines = [line for line in body.decode().splitlines() if line.startswith("epdctl_proxy_in_flight{")]
    assert len(lines) == 1 and lines[0].endswith(" 0.0"), lines


def test_a_dead_worker_takes_the_proxy_down_with_an_error(workers_proxy, procs):
    url, proxy, port = workers_proxy
    workers = _workers(proxy.pid)
    folder = _metrics_dir(workers[0])
    assert folder.is_dir()
    workers[1].kill()
    # Non-zero, so `up` reports it and the proxy's restart policy brings it back whole.
    assert proxy.wait(timeout=20) == 1
    wait_for(lambda: not any(_alive(w) for w in workers), 15, "the other workers to stop")
    assert not folder.exists()
    assert f"proxy worker 1 (pid {workers[1].pid}) exited with code -9: stopping the proxy" in procs.log("proxy")


def test_workers_stop_with_sigterm_and_outlive_no_sigkilled_parent(workers_proxy, procs):
    url, proxy, port = workers_proxy
    workers = _workers(proxy.pid)
    folder = _metrics_dir(workers[0])
    assert http_post(url + "/v1/chat/completions", CHAT)[0] == 200
    proxy.send_signal(signal.SIGTERM)
    assert proxy.wait(timeout=20) == 0
    assert not any(_alive(w) for w in workers) and not folder.exists()

    # Again, but the parent dies by SIGKILL, which it cannot pass on: the workers notice and go,
    # and the last one out removes the metrics folder (only their own files, then rmdir).
    pd = procs.sim(free_ports(1)[0])
    again = procs.start([sys.executable, "-m", "epdctl.proxy", "--port", str(port), "--decode-servers-urls", pd,
                         "--workers", "2"], "proxy2")
    wait_healthy(url, proc=again)
    workers = wait_for(lambda: (lambda w: w if len(w) == 2 else None)(_workers(again.pid)), 10, "two workers")
    folder = _metrics_dir(workers[0])
    assert http_post(url + "/v1/chat/completions", CHAT)[0] == 200
    stranger = folder / "notes.txt"  # not a worker's value file: must survive
    stranger.write_text("mine")
    again.kill()
    wait_for(lambda: not any(_alive(w) for w in workers), 15, "orphaned workers to stop")
    assert stranger.read_text() == "mine" and [p.name for p in folder.iterdir()] == ["notes.txt"]
    stranger.unlink()
    folder.rmdir()


def test_a_busy_port_is_one_line_before_any_worker_starts(procs, tmp_path):
    port = free_ports(1)[0]
    holder = procs.sim(port)  # something listens there already
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    before = set(tmp.glob("epdctl-proxy-metrics-*"))
    result = subprocess.run([sys.executable, "-m", "epdctl.proxy", "--port", str(port), "--decode-servers-urls",
                             holder, "--workers", "4"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == f"epdctl proxy: port {port} on 127.0.0.1 is already in use"
    assert set(tmp.glob("epdctl-proxy-metrics-*")) == before  # nothing made, nothing left


def test_up_with_workers_heals_a_killed_worker_and_down_leaves_nothing(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1e1p1d", name="wk", extra="restart: {policy: on-failure, "
                                         "backoff_s: 0.2, backoff_max_s: 1}")
    text = topology.read_text().replace(f"port: {ports['proxy']}}}", f"port: {ports['proxy']}, workers: 2}}")
    topology.write_text(text)
    plan = json.loads(epdctl("plan", str(topology), "--json", check=0).stdout)
    argv = plan["proxy"]["argv"]
    assert argv[argv.index("--workers") + 1] == "2"
    epdctl("up", "-d", str(topology), check=0)
    url = f"http://127.0.0.1:{ports['proxy']}"
    try:
        status = json.loads(epdctl("status", "wk", "--json", check=0).stdout)
        parent = status["proxy"]["pid"]
        workers = _workers(parent)
        assert len(workers) == 2
        assert http_post(url + "/v1/chat/completions", CHAT)[0] == 200
        workers[0].kill()
        healed = wait_for(lambda: (lambda p: p if p["state"] == "healthy" and p["restarts"] == 1 else None)(
            json.loads(epdctl("status", "wk", "--json").stdout)["proxy"]), 30, "the proxy to be restarted")
        assert healed["pid"] != parent and len(_workers(healed["pid"])) == 2
        assert not any(_alive(w) for w in workers)
        wait_for(lambda: http_post(url + "/v1/chat/completions", CHAT)[0] == 200, 10, "a 200 again")
    finally:
        epdctl("down", "wk", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


@pytest.mark.parametrize("value, expected", [
    ("0", "proxy.workers: Input should be greater than or equal to 1"),
    ("65", "proxy.workers: Input should be less than or equal to 64"),
    ("two", "proxy.workers: Input should be a valid integer"),
])
def test_workers_out_of_range_is_one_line_with_its_place(tmp_path, value, expected):
    path = tmp_path / "t.yaml"
    path.write_text(f"name: t\nmodel: m\nengine: sim\nplatform: cpu\npd: [{{port: 21001}}]\n"
                    f"proxy: {{port: 21002,\n  workers: {value}}}\n")
    result = epdctl("validate", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{path}:7: {expected}" in result.stderr, result.stderr


def test_export_k8s_runs_the_same_workers_in_the_proxy_pod(tmp_path):
    import yaml

    path = tmp_path / "t.yaml"
    path.write_text("name: t\nmodel: m\nplatform: cpu\npd: [{port: 21001}]\nproxy: {port: 21002, workers: 4}\n")
    out = tmp_path / "k8s"
    epdctl("export", "k8s", str(path), "-o", str(out), check=0)
    commands = [doc["spec"]["template"]["spec"]["containers"][0]["command"]
                for doc in (yaml.safe_load(f.read_text()) for f in (out / "manifests").glob("*.yaml"))
                if doc["kind"] == "Deployment" and "epdctl.proxy" in doc["spec"]["template"]["spec"]["containers"][0]["command"]]
    assert len(commands) == 1 and commands[0][commands[0].index("--workers") + 1] == "4"


def test_a_starting_proxy_sweeps_only_dead_proxies_metrics_folders_of_its_user(tmp_path, monkeypatch):
    # Parent and workers SIGKILLed together (a teardown whose grace ran out) leave their folder.
    from epdctl.proxy import workers

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"epdctl-proxy-metrics-{dead.pid}-abc"
    stale.mkdir()
    (stale / f"counter_{dead.pid}.db").write_bytes(b"x")
    kept_stale = tmp_path / f"epdctl-proxy-metrics-{dead.pid}-def"
    kept_stale.mkdir()
    (kept_stale / "notes.txt").write_text("not a value file")  # rmdir fails: the folder stays
    live = tmp_path / f"epdctl-proxy-metrics-{os.getpid()}-ghi"
    live.mkdir()
    (live / f"counter_{os.getpid()}.db").write_bytes(b"x")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "counter_1.db").write_bytes(b"x")
    (tmp_path / f"epdctl-proxy-metrics-{dead.pid}-lnk").symlink_to(target)
    foreign = tmp_path / f"epdctl-proxy-metrics-{dead.pid}-xyz"
    foreign.mkdir()
    (foreign / f"counter_{dead.pid}.db").write_bytes(b"x")
    if os.getuid() == 0:
        os.chown(foreign, 65534, 65534)  # another user's folder
    workers.sweep_stale_folders()
    assert not stale.exists()
    assert [p.name for p in kept_stale.iterdir()] == ["notes.txt"]
    assert (live / f"counter_{os.getpid()}.db").exists()
    assert (target / "counter_1.db").exists()
    assert (foreign / f"counter_{dead.pid}.db").exists() or os.getuid() != 0


def test_an_orphaned_worker_cleans_only_a_folder_proven_ours(tmp_path, monkeypatch):
    # The folder comes from the environment: a hand-run worker pointed at any folder must not
    # empty it, even of files named like its own value files.
    from epdctl.proxy import workers

    mine = f"counter_{os.getpid()}.db"
    plain = tmp_path / "plain"  # not our name
    plain.mkdir()
    (plain / mine).write_bytes(b"x")
    target = tmp_path / f"epdctl-proxy-metrics-{os.getpid()}-real"
    target.mkdir()
    (target / mine).write_bytes(b"x")
    link = tmp_path / f"epdctl-proxy-metrics-{os.getpid()}-link"
    link.symlink_to(target)
    # The folders are named by this test's pid, standing for the worker's parent (which is gone:
    # the test's own parent is pytest's launcher, not itself).
    parent = os.getpid()
    for folder in (plain, link):
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
        workers.orphan_cleanup(parent=parent)
    assert (plain / mine).exists() and (target / mine).exists()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(target))
    workers.orphan_cleanup(parent=parent + 1)  # another proxy's folder: not this worker's to empty
    assert (target / mine).exists()
    other = f"counter_{os.getpid() + 1}.db"  # another worker's: stays, and so does the folder
    (target / other).write_bytes(b"x")
    workers.orphan_cleanup(parent=parent)
    assert [p.name for p in target.iterdir()] == [other]
    (target / other).unlink()
    workers.orphan_cleanup(parent=parent)  # the last one out removes the empty folder
    assert not target.exists()


def test_sighup_to_the_whole_group_stops_cleanly_and_leaves_no_folder(procs, tmp_path):
    pd = procs.sim(free_ports(1)[0])
    port = free_ports(1)[0]
    env = {"TMPDIR": str(tmp_path)}
    proxy = procs.start([sys.executable, "-m", "epdctl.proxy", "--port", str(port), "--decode-servers-urls", pd,
                         "--workers", "3"], "proxy", env=env)
    wait_healthy(f"http://127.0.0.1:{port}", proc=proxy)
    workers = wait_for(lambda: (lambda w: w if len(w) == 3 else None)(_workers(proxy.pid)), 10, "three workers")
    os.killpg(proxy.pid, signal.SIGHUP)  # the terminal closed
    assert proxy.wait(timeout=20) == 0
    wait_for(lambda: not any(_alive(w) for w in workers), 15, "the workers to stop")
    assert not list(tmp_path.glob("epdctl-proxy-metrics-*"))


@pytest.mark.parametrize("port", ["0", "70000"])
def test_a_port_out_of_range_is_refused(port):
    result = subprocess.run([sys.executable, "-m", "epdctl.proxy", "--port", port, "--decode-servers-urls",
                             "http://127.0.0.1:1", "--workers", "3"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--port: must be between 1 and 65535" in result.stderr
