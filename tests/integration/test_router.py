"""proxy.impl: vllm-router — vLLM's Rust router in the proxy's place for topologies without encoders."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (assert_no_orphans, epdctl, free_ports, http_get, http_post, run_processes, wait_healthy,
                      wait_settled)

from epdctl.commands import router_command
from epdctl.config.load import parse_topology
from epdctl.plan import build_plan

# The test extra installs vllm-router: these tests run it for real and are never skipped.
ROUTER = shutil.which("vllm-router") or str(Path(sys.executable).with_name("vllm-router"))


def pd_file(tmp: Path, *, proxy: str = "impl: vllm-router", roles: str = "", extra: str = "") -> tuple[Path, list[int]]:
    ports = free_ports(6)
    roles = roles or f"prefill: [{{port: {ports[0]}}}]\ndecode: [{{port: {ports[1]}}}]"
    text = f"""name: rt
model: sim-model
engine: sim
platform: cpu
defaults: {{args: {{sim-ttft-ms: 5, sim-tpot-ms: 1}}}}
kv_transfer: {{connector: NixlConnector, side_channel_port_base: {ports[2]}}}
{roles}
proxy: {{port: {ports[3]}, metrics_port: {ports[4]}, {proxy}}}
health: {{timeout_s: 60, interval_s: 0.05}}
{extra}"""
    path = tmp / "rt.yaml"
    path.write_text(text)
    return path, ports


# ------------------------------------------------------------ validate and plan (no router needed)


@pytest.mark.parametrize("proxy, roles, extra, expected", [
    ("impl: vllm-router", "encode: [{port: 19001}]\npd: [{port: 19002}]",
     "ec_transfer: {connector: ECExampleConnector, shared_storage_path: /tmp/x-ec}",
     "proxy.impl: vllm-router has no encoder stage"),
    ("impl: vllm-router", "", "", None),
    ("impl: vllm-router, encode_timeout_s: 5", "", "", "proxy.encode_timeout_s: is a setting of epdctl's proxy"),
    ("impl: vllm-router, max_media_items: 3", "", "", "proxy.max_media_items: is a setting of epdctl's proxy"),
    ("impl: vllm-router, workers: 2", "", "", "proxy.workers: is a setting of epdctl's proxy"),
    ("impl: epdctl", "", "", "proxy.metrics_port: is for impl: vllm-router"),
    ("impl: nginx", "", "", "proxy.impl: Input should be 'epdctl' or 'vllm-router'"),
])
def test_validate_names_the_line_of_what_vllm_router_cannot_do(tmp_path, proxy, roles, extra, expected):
    path, _ = pd_file(tmp_path, proxy=proxy, roles=roles, extra=extra)
    result = epdctl("validate", str(path))
    if expected is None:
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr
    assert f"{path}:" in result.stderr  # FILE:LINE


@pytest.mark.parametrize("connector", ["LMCacheConnectorV1", "MooncakeConnector", "MoRIIOConnector"])
def test_a_kv_connector_epdctl_cannot_run_vllm_router_with_is_refused(tmp_path, connector):
    # Mooncake makes the router wait on a bootstrap port (8998) per prefill, MoRI-IO on a discovery
    # address: epdctl plans neither, and the router then never became healthy / never started.
    path, _ = pd_file(tmp_path, extra="")
    path.write_text(path.read_text().replace("connector: NixlConnector", f"connector: {connector}"))
    result = epdctl("validate", str(path))
    assert result.returncode == 2 and (f"epdctl runs vllm-router with NixlConnector only "
                                       f"(kv_transfer.connector is {connector})") in result.stderr


@pytest.mark.parametrize("host, expected", [
    ("localhost", None), ("0.0.0.0", None), ("my-host.example", "vllm-router needs an IPv4 address"),
    ("'[::1]'", "vllm-router needs an IPv4 address"), ("'--foo'", "must be a host name or an IP address"),
])
def test_the_router_host_must_be_an_address_its_metrics_can_bind(tmp_path, host, expected):
    # Given a name, vllm-router served its metrics on every interface while the API stayed on loopback.
    path, ports = pd_file(tmp_path, proxy=f"impl: vllm-router, host: {host}")
    result = epdctl("validate", str(path))
    if expected is None:
        assert result.returncode == 0, result.stderr
        argv = build_plan(parse_topology(path.read_text(), str(path))).proxy.argv
        assert argv[argv.index("--prometheus-host") + 1] == ("127.0.0.1" if host == "localhost" else host)
    else:
        assert result.returncode == 2 and expected in result.stderr and "proxy.host" in result.stderr


def test_the_metrics_port_is_claimed_like_every_other(tmp_path):
    path, ports = pd_file(tmp_path)
    # Unset, it is port + 1: here that is prefill-0's port.
    path.write_text(path.read_text().replace(f"port: {ports[3]}, metrics_port: {ports[4]}", f"port: {ports[0] - 1}"))
    result = epdctl("validate", str(path))
    assert result.returncode == 2 and f"proxy.metrics_port: port {ports[0]} is already used by prefill-0" in result.stderr


def test_plan_runs_vllm_router_with_the_kv_handoff_and_pd_workers(tmp_path):
    path, ports = pd_file(tmp_path, proxy="impl: vllm-router, policy: round-robin, max_body_mb: 2")
    plan = build_plan(parse_topology(path.read_text(), str(path)), router="/opt/r/vllm-router")
    argv = list(plan.proxy.argv)
    assert argv[0] == "/opt/r/vllm-router" and plan.proxy_impl == "vllm-router"
    joined = " ".join(argv)
    assert (f"--vllm-pd-disaggregation --kv-connector nixl --prefill http://127.0.0.1:{ports[0]} "
            f"--decode http://127.0.0.1:{ports[1]}") in joined
    assert "--policy round_robin" in joined and f"--max-payload-size {2 * 1024 * 1024}" in joined
    assert f"--prometheus-port {ports[4]}" in joined and "--worker-startup-timeout-secs 60" in joined
    assert plan.proxy.ports() == (ports[3], ports[4])  # up checks both free before it starts anything
    # Whole seconds that fit the router's integer, whatever the file says (.inf is "never"); a proxy
    # timeout is at most a week (validate refuses more, as the built-in proxy would).
    endless = path.read_text().replace("health: {timeout_s: 60", "health: {timeout_s: .inf").replace(
        "max_body_mb: 2", "max_body_mb: 2, decode_timeout_s: 604799.5")
    argv = list(build_plan(parse_topology(endless, str(path))).proxy.argv)
    assert argv[argv.index("--worker-startup-timeout-secs") + 1] == "1000000000"
    assert argv[argv.index("--request-timeout-secs") + 1] == "604800"
    pd = pd_file(tmp_path, roles=f"pd: [{{port: {ports[0]}}}, {{port: {ports[1]}}}]")[0]
    argv = list(build_plan(parse_topology(pd.read_text(), str(pd))).proxy.argv)
    assert "--vllm-pd-disaggregation" not in argv and argv[argv.index("--worker-urls") + 1].endswith(str(ports[0]))
    assert argv[argv.index("--policy") + 1] == "power_of_two"  # least-loaded's nearest


def test_a_busy_metrics_port_fails_up_before_anything_starts(tmp_path, state_dir):
    import socket

    path, ports = pd_file(tmp_path)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ports[4]))
        holder.listen()
        result = epdctl("up", "-d", str(path), timeout=60)
    assert result.returncode != 0 and f"port {ports[4]} (proxy's metrics) is already in use" in result.stderr
    assert "panicked" not in result.stderr + result.stdout
    assert_no_orphans(str(state_dir), ports[:2])


def test_status_shows_an_install_hint_with_its_brackets(tmp_path):
    import io

    from epdctl.status import _print_table

    out = io.StringIO()
    error = "proxy: cannot start 'vllm-router': command not found (pip install 'epdctl[router]', or proxy.impl: epdctl)"
    _print_table([{"name": "rt", "state": "failed", "health": "failed", "reasons": [], "instances": [], "proxy": None}], [{"error": error}], out)
    assert "pip install 'epdctl[router]'" in out.getvalue()


def test_export_k8s_refuses_it_in_one_line(tmp_path):
    path, _ = pd_file(tmp_path)
    result = epdctl("export", "k8s", str(path), "-o", str(tmp_path / "k8s"))
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("proxy:"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"epdctl: {path}:{line}: proxy.impl: vllm-router: export k8s runs epdctl's proxy "
                                     "only; use impl: epdctl here (or deploy vllm-router with its own chart)")
    assert not (tmp_path / "k8s").exists()


# ------------------------------------------------------------ the real router


def test_router_found_beside_this_interpreter():
    assert router_command() in (ROUTER, str(Path(sys.executable).with_name("vllm-router")))


def test_up_serves_p_and_d_through_vllm_router_and_down_leaves_nothing(tmp_path, state_dir):
    path, ports = pd_file(tmp_path)
    epdctl("up", "-d", str(path), check=0, timeout=90)
    try:
        proxy = f"http://127.0.0.1:{ports[3]}"
        body = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        status, answer = http_post(proxy + "/v1/chat/completions", body)
        assert status == 200 and json.loads(answer)["usage"]["completion_tokens"] == 4
        status, streamed = http_post(proxy + "/v1/chat/completions", {**body, "stream": True})
        assert status == 200 and streamed.rstrip().endswith(b"data: [DONE]")
        # The KV hand-off really happened: D took P's KV instead of prefilling itself.
        status, text = http_get(f"http://127.0.0.1:{ports[1]}/metrics")
        assert b"epdctl_sim_remote_prefills_total 2.0" in text, text.decode()[:2000]
        assert http_get(f"http://127.0.0.1:{ports[4]}/metrics")[0] == 200  # the router's own metrics port
        report = json.loads(epdctl("status", "rt", "--json", check=0).stdout)
        assert report["state"] == "running" and report["proxy"]["state"] == "healthy"
        # vllm-router colours its log even into a file: `logs` shows it plain where there is no terminal.
        log = (state_dir / "rt" / "proxy.log").read_text()
        assert "\x1b[" in log and "Starting router" in log
        shown = epdctl("logs", "rt", "proxy", check=0).stdout
        assert "Starting router" in shown and "\x1b" not in shown
    finally:
        epdctl("down", "rt", timeout=60)
    assert_no_orphans(str(state_dir), ports[:2] + ports[3:5])


def test_smoke_proves_p_and_d_behind_vllm_router(tmp_path, state_dir):
    path, ports = pd_file(tmp_path)
    result = epdctl("smoke", str(path), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "decode used the remote prefill: decode-0 served" in result.stdout
    assert_no_orphans(str(state_dir), ports[:2] + ports[3:5])


def test_ctrl_c_on_a_foreground_up_stops_the_router_too(tmp_path, state_dir):
    path, ports = pd_file(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "epdctl", "up", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{ports[3]}", timeout=60, proc=proc)
        assert any("vllm-router" in " ".join(p.cmdline()) or "vllm::router" in p.name()
                   for p in run_processes(str(state_dir)))
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:  # never SIGKILL the supervisor: that alone would leave orphans
            proc.terminate()
            proc.wait(timeout=60)
    assert_no_orphans(str(state_dir), ports[:2] + ports[3:5])


def test_down_finds_the_router_by_its_tag_when_the_state_is_gone(tmp_path, state_dir):
    # vllm-router renames itself (setproctitle), which by default overwrites its environment and
    # with it the EPDCTL_RUN tag: `down` then missed it and left it running.
    path, ports = pd_file(tmp_path)
    epdctl("up", "-d", str(path), check=0, timeout=90)
    wait_settled(state_dir, "rt")  # else the supervisor's first look writes the state back
    for state in state_dir.glob("rt/state.json"):
        state.unlink()
    result = epdctl("down", "rt", check=0, timeout=60)
    assert "found 3 process(es) by their EPDCTL_RUN tag" in result.stdout + result.stderr
    assert "vllm::router" in result.stdout + result.stderr
    assert_no_orphans(str(state_dir), ports[:2] + ports[3:5])
