"""Sims that share a device or the host's cores slow each other down (issue #26), with real sim
processes: the ledger `up` hands the sims of a shared device, what they report about sharing,
the CPU a `cpu` twin burns and where, and a ledger that is not ours. Behaviour, not speed: the
checks are the sims' own counters and the CPU time the kernel charged them."""

from __future__ import annotations

import json
import os
import stat
import sys
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from conftest import assert_no_orphans, epdctl, free_ports, http_post, metrics, wait_for

from epdctl.run.state import LEDGER_FILE


def _shared_device_topology(tmp_path) -> tuple:
    ports = free_ports(4)
    text = f"""name: shared
model: sim-model
engine: sim
platform: cuda
defaults: {{args: {{sim-ttft-ms: 5, sim-tpot-ms: 1, sim-encode-ms: 40, sim-contention: device}}}}
ec_transfer: {{connector: ECExampleConnector, shared_storage_path: {tmp_path / 'ec'}}}
encode:
  - {{devices: [0], port: {ports[0]}, gpu_memory_utilization: 0.4}}
  - {{devices: [0], port: {ports[1]}, gpu_memory_utilization: 0.4}}
pd: [{{devices: [1], port: {ports[2]}}}]
proxy: {{port: {ports[3]}}}
health: {{timeout_s: 30, interval_s: 0.05}}
"""
    path = tmp_path / "shared.yaml"
    path.write_text(text)
    return path, ports


def _image_request(i: int) -> dict:
    import base64

    data = base64.b64encode(f"shared device image {i}".encode()).decode()
    return {"model": "sim-model", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
        {"type": "text", "text": "what is it"}]}]}


def test_encoders_on_one_device_share_it_through_the_ledger_and_the_pd_on_its_own_does_not(tmp_path, state_dir):
    path, ports = _shared_device_topology(tmp_path)
    env = {"EPDCTL_DEVICE_COUNT": "2"}
    epdctl("up", "-d", str(path), env=env, check=0, timeout=60)
    try:
        status = json.loads(epdctl("status", "shared", "--json", check=0).stdout)
        ledger = state_dir / "shared" / LEDGER_FILE
        for instance in status["instances"]:
            cmdline = psutil.Process(instance["pid"]).cmdline()
            assert cmdline[cmdline.index("--sim-ledger") + 1] == str(ledger), cmdline
        info = os.lstat(ledger)
        assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        proxy = f"http://127.0.0.1:{ports[3]}"
        # Waves of requests at once until both encoders have stepped together (the proxy spreads
        # them): each then saw two sims stepping on device 0.
        encoders = [f"http://127.0.0.1:{p}" for p in ports[:2]]

        def both_shared() -> bool:
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda i: http_post(proxy + "/v1/chat/completions", _image_request(i))[0],
                                        range(both_shared.wave * 8, both_shared.wave * 8 + 8)))
            both_shared.wave += 1
            assert answers == [200] * 8
            return all(metrics(url).get("epdctl_sim_contention_peak_sharers") == 2 for url in encoders)

        both_shared.wave = 0
        wait_for(both_shared, 60, "both encoders stepping on device 0 together")
        for url in encoders:
            assert metrics(url)["epdctl_sim_contention_seconds"] > 0  # their steps took longer for it
        pd = metrics(f"http://127.0.0.1:{ports[2]}")
        assert pd["epdctl_sim_contention_peak_sharers"] == 1 and pd["epdctl_sim_contention_seconds"] == 0
    finally:
        epdctl("down", "shared", check=0)
    assert not (state_dir / "shared").exists()  # the ledger went with the rest of the state
    assert_no_orphans(str(state_dir), ports)


def _cpu_seconds(pid: int) -> float:
    root = psutil.Process(pid)
    return sum(sum(p.cpu_times()[:2]) for p in [root] + root.children(recursive=True))


def test_a_cpu_twin_burns_its_share_of_each_cost_on_the_engines_core_and_sleeps_the_rest(procs, tmp_path):
    port_cpu, port_none = free_ports(2)
    costs = ["--sim-ttft-ms", "30", "--sim-tpot-ms", "10", "--sim-request-ms", "10"]
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0"}
    burning = procs.start([sys.executable, "-m", "epdctl.sim", "sim-model", "--port", str(port_cpu), *costs,
                           "--sim-contention", "cpu", "--sim-cpu-share", "1"], "cpu", env)
    sleeping = procs.start([sys.executable, "-m", "epdctl.sim", "sim-model", "--port", str(port_none), *costs],
                           "none", env)
    from conftest import wait_healthy

    for port, proc in ((port_cpu, burning), (port_none, sleeping)):
        wait_healthy(f"http://127.0.0.1:{port}", proc=proc)
    burner = wait_for(lambda: psutil.Process(burning.pid).children(), 10, "the burner process")[0]
    if hasattr(burner, "cpu_affinity") and 0 in os.sched_getaffinity(0):
        assert burner.cpu_affinity() == [0]  # where VLLM_CPU_OMP_THREADS_BIND put the real engine
    body = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    used = {}
    for port, proc in ((port_cpu, burning), (port_none, sleeping)):
        before = _cpu_seconds(proc.pid)
        for _ in range(5):
            assert http_post(f"http://127.0.0.1:{port}/v1/chat/completions", body)[0] == 200
        used[port] = _cpu_seconds(proc.pid) - before
    # Each request charged 10 (API server) + 30 (prefill) + 2 x 10 (decode) = 60 ms: 0.3 s for five,
    # burnt as CPU time however busy the machine (the kernel counts it in ticks of 10 ms).
    assert used[port_cpu] >= 0.25, used
    assert used[port_none] < used[port_cpu] / 3, used


def test_a_ledger_that_is_a_symlink_stops_the_sim_with_one_line(procs, tmp_path):
    (tmp_path / "target").write_bytes(b"")
    (tmp_path / "ledger").symlink_to(tmp_path / "target")
    port = free_ports(1)[0]
    proc = procs.start([sys.executable, "-m", "epdctl.sim", "sim-model", "--port", str(port), "--sim-contention",
                        "device", "--sim-ledger", str(tmp_path / "ledger")], "sim", {"CUDA_VISIBLE_DEVICES": "0"})
    assert proc.wait(timeout=30) != 0
    log = procs.log("sim")
    assert "cannot open the device ledger" in log and "Traceback" not in log
    assert (tmp_path / "target").read_bytes() == b""


@pytest.mark.parametrize("flag, value, message", [
    ("sim-contention", "gpu", "must be one of"),
    ("sim-cpu-share", "1.5", "fraction from 0 to 1"),
    ("sim-device-slots", "0", "whole number"),
])
def test_validate_refuses_a_bad_contention_flag_with_its_line(tmp_path, flag, value, message):
    path, _ = _shared_device_topology(tmp_path)
    path.write_text(path.read_text().replace("sim-contention: device", f"{flag}: {value}"))
    result = epdctl("validate", str(path), env={"EPDCTL_DEVICE_COUNT": "2"})
    assert result.returncode == 2 and message in result.stderr and "shared.yaml:5:" in result.stderr, result.stderr
