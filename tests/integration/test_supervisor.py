"""`epdctl up / status / logs / down` against real sim topologies: health-gated, signal-safe, no orphans."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from epdctl.run.teardown import stop_processes

from conftest import assert_no_orphans, epdctl, http_post, signal_and_wait, wait_for, wait_healthy, write_sim_topology

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}


def start_foreground(topology: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "epdctl", "up", str(topology), *extra],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_up_detached_status_requests_down(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1e1p1d", name="life")
    up = epdctl("up", "-d", str(topology), check=0)
    assert "life is up" in up.stdout
    assert oct(os.stat(state_dir / "life").st_mode & 0o777) == "0o700"

    status = json.loads(epdctl("status", "life", "--json", check=0).stdout)
    assert status["name"] == "life" and status["state"] == "running"
    assert [i["name"] for i in status["instances"]] == ["encode-0", "prefill-0", "decode-0"]
    for entry in status["instances"] + [status["proxy"]]:
        assert entry["state"] == "healthy" and entry["exit_code"] is None
        assert psutil.pid_exists(entry["pid"])
        assert entry["url"] == f"http://127.0.0.1:{entry['port']}"
    for name, port in ports.items():
        assert http_post(f"http://127.0.0.1:{port}/v1/completions", {"prompt": "x", "max_tokens": 1})[0] == 200, name
    assert http_post(f"http://127.0.0.1:{ports['proxy']}/v1/chat/completions", CHAT)[0] == 200

    logs = epdctl("logs", "life", "proxy", check=0).stdout
    assert logs.startswith("proxy | ")
    table = epdctl("status", check=0).stdout
    assert "life: running" in table

    down = epdctl("down", "life", check=0)
    assert "stopped by SIGTERM" in down.stdout and "life is down" in down.stdout
    assert_no_orphans(str(state_dir), list(ports.values()))
    assert not (state_dir / "life").exists()
    assert not (tmp_path / "ec").exists(), "epdctl created the EC folder, so down removes it"
    assert epdctl("status", "life").returncode == 3
    assert epdctl("status").returncode == 3


def test_down_keeps_an_ec_folder_it_did_not_create(tmp_path, state_dir):
    ec = tmp_path / "ec"
    ec.mkdir()
    (ec / "keep-me").write_text("user data")
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="keepec")
    epdctl("up", "-d", str(topology), check=0)
    epdctl("down", str(topology), check=0)  # down by file works as well as by name
    assert (ec / "keep-me").read_text() == "user data"
    assert_no_orphans(str(state_dir), list(ports.values()))


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_foreground_signal_tears_down(tmp_path, state_dir, sig, code):
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="fg")
    proc = start_foreground(topology)
    try:
        wait_healthy(f"http://127.0.0.1:{ports['proxy']}", timeout=30, proc=proc)
    except AssertionError:
        proc.kill()
        raise
    time.sleep(0.3)  # past the health gate, into log streaming
    out = signal_and_wait(proc, sig)
    assert proc.returncode == code, out
    assert "pd-0" in out and " | " in out  # prefixed log lines were streamed
    assert_no_orphans(str(state_dir), list(ports.values()))
    assert not (state_dir / "fg").exists()


def test_sigkill_of_up_then_down_cleans_everything(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="killed",
                                         instance_args={"pd-0": {"sim-spawn-child": "session"}})
    proc = start_foreground(topology)
    wait_healthy(f"http://127.0.0.1:{ports['proxy']}", timeout=30, proc=proc)
    proc.kill()
    proc.wait()
    assert wait_healthy(f"http://127.0.0.1:{ports['pd-0']}") is None  # the instances outlived `up`
    status = json.loads(epdctl("status", "killed", "--json").stdout)
    assert status["state"] == "running"
    down = epdctl("down", "killed", "-t", "2", check=0)
    assert "killed is down" in down.stdout
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_sigkill_of_the_detached_supervisor_then_down(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="orphaned")
    epdctl("up", "-d", str(topology), check=0)
    supervisor = json.loads((state_dir / "orphaned" / "state.json").read_text())["supervisor"]["pid"]
    os.kill(supervisor, signal.SIGKILL)
    time.sleep(0.2)
    epdctl("down", "orphaned", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_child_dying_at_startup_fails_fast_and_leaves_nothing(tmp_path, state_dir):
    # A health deadline of an hour: `up` that came back at all did not wait it out.
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="dies", health_timeout=3600,
                                         instance_args={"pd-0": {"sim-startup-ms": 300, "sim-exit-after-s": 0}})
    result = epdctl("up", "-d", str(topology))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "pd-0 exited with code 3 during start-up" in result.stderr
    assert "pd-0 | " in result.stderr  # the last lines of its log
    assert "Traceback" not in result.stderr
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_child_dying_after_it_was_healthy_while_others_start_fails_fast(tmp_path, state_dir):
    # pd-0 is healthy at once and dies at 1 s; encode-0 takes 4 s to listen. The start must fail
    # on pd-0's death, not wait out the deadline of the proxy that waits on it.
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="dies-later", health_timeout=3600,
                                         instance_args={"pd-0": {"sim-exit-after-s": 1},
                                                        "encode-0": {"sim-startup-ms": 4000}},
                                         extra="restart: no")
    result = epdctl("up", "-d", str(topology))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "pd-0 exited with code 3 during start-up" in result.stderr, result.stderr
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_instance_port_taken_after_the_check_fails_fast(tmp_path, state_dir):
    """A child that cannot bind dies during start-up; `up` names it and cleans up."""
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="raced",
                                         instance_args={"encode-0": {"sim-startup-ms": 5000}})
    proc = start_foreground(topology)
    holder = None

    def take_the_port():
        # up's own port check binds it for an instant: a bind that meets it is tried again.
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", ports["encode-0"]))
        except OSError:
            sock.close()
            return None
        sock.listen()
        return sock

    try:
        # Taken while encode-0 sleeps its 5 s start-up (or before up's check): either way it is taken.
        holder = wait_for(take_the_port, 30, "the encoder's port")
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        if holder:
            holder.close()
    # Either the pre-check or the child itself finds the port taken; both name it and fail.
    assert proc.returncode == 1, out
    assert "encode-0" in out and "already in use" in out
    assert_no_orphans(str(state_dir), [ports["pd-0"], ports["proxy"]])


def test_busy_port_is_refused_before_anything_starts(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="busy")
    holder = socket.socket()
    holder.bind(("127.0.0.1", ports["pd-0"]))
    holder.listen()
    try:
        result = epdctl("up", "-d", str(topology))
    finally:
        holder.close()
    assert result.returncode == 1
    assert f"port {ports['pd-0']} (pd-0) is already in use by pid {os.getpid()}" in result.stderr
    assert_no_orphans(str(state_dir), [ports["encode-0"], ports["proxy"]])


def test_health_deadline_fails_and_cleans_up(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="slow", instance_args={"pd-0": {"sim-startup-ms": 60000}})
    result = epdctl("up", "-d", "--wait-timeout", "2", str(topology))
    assert result.returncode == 1
    assert "not healthy after 2s: pd-0" in result.stderr
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_sigterm_ignoring_child_is_killed_within_grace(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="stubborn",
                                         instance_args={"pd-0": {"sim-ignore-sigterm": True, "sim-spawn-child": "group"}})
    epdctl("up", "-d", str(topology), check=0)
    down = epdctl("down", "stubborn", "-t", "1", check=0)
    assert "pd-0" in down.stdout and "killed with SIGKILL after the 1s grace" in down.stdout, down.stdout
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_double_up_is_refused(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="twice")
    epdctl("up", "-d", str(topology), check=0)
    try:
        again = epdctl("up", "-d", str(topology))
        assert again.returncode == 2
        assert "already up" in again.stderr and "epdctl down twice" in again.stderr
        # The first run is untouched.
        assert json.loads(epdctl("status", "twice", "--json").stdout)["state"] == "running"
    finally:
        epdctl("down", "twice", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_instance_exiting_in_foreground_stops_all_with_exit_1(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="crash", extra="restart: no",
                                         instance_args={"encode-0": {"sim-exit-after-s": 2}})
    proc = start_foreground(topology)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert "encode-0 (pid" in out and "exited with code 3; not restarting it: restart policy is no" in out
    assert "no encode instance can serve any more; stopping crash" in out
    assert_no_orphans(str(state_dir), list(ports.values()))
    status = json.loads(epdctl("status", "crash", "--json").stdout)
    entry = next(i for i in status["instances"] if i["name"] == "encode-0")
    assert entry["state"] == "exited" and entry["exit_code"] == 3
    epdctl("down", "crash", check=0)  # clears the kept state
    assert not (state_dir / "crash").exists()


def test_detached_supervisor_records_a_death(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="degrade", extra="restart: no")
    epdctl("up", "-d", str(topology), check=0)
    try:
        state = json.loads((state_dir / "degrade" / "state.json").read_text())
        pd = next(p for p in state["processes"] if p["name"] == "pd-0")
        os.killpg(pd["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status = json.loads(epdctl("status", "degrade", "--json").stdout)
            entry = next(i for i in status["instances"] if i["name"] == "pd-0")
            if entry["exit_code"] is not None:
                break
            time.sleep(0.2)
        assert status["state"] == "degraded"
        assert entry["state"] == "exited" and entry["exit_code"] == -9
    finally:
        epdctl("down", "degrade", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_missing_engine_binary_is_one_line(tmp_path, state_dir):
    topology = tmp_path / "novllm.yaml"
    topology.write_text("model: m\nplatform: cpu\nvllm_command: [no-such-vllm-binary, serve]\npd: [{port: 19999}]\n"
                        "proxy: {port: 19998}\n")
    result = epdctl("up", "-d", str(topology))
    assert result.returncode == 1
    assert "pd-0: cannot start 'no-such-vllm-binary': command not found" in result.stderr
    assert "Traceback" not in result.stderr
    assert_no_orphans(str(state_dir), [19999, 19998])


def test_pid_reuse_is_never_signalled():
    """A recorded pid whose create_time differs belongs to someone else now: leave it alone."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        real = psutil.Process(bystander.pid).create_time()
        record = {"name": "pd-0", "pid": bystander.pid, "pgid": bystander.pid, "create_time": real - 1000}
        report = stop_processes([record], run_token=None, grace=0.5)
        assert bystander.poll() is None, "a process with another create_time was signalled"
        assert [r.how for r in report.results] == ["already-exited"]
    finally:
        bystander.kill()
        bystander.wait()


def test_a_leader_that_exits_between_the_grace_checks_is_reported_as_stopped_by_sigterm(monkeypatch):
    """Seen for real: `down` took 0.1 s but said "pd-0 killed with SIGKILL after the 10s grace",
    because pd-0 exited after the grace loop looked at it and before it saw everyone gone."""
    import epdctl.run.teardown as teardown

    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    real_is_alive = teardown.is_alive
    calls = {"n": 0}

    def is_alive(proc):
        if proc.pid == victim.pid:
            calls["n"] += 1
            if calls["n"] == 1:
                return True  # the leaders' check: still there...
            victim.wait(10)  # ...and gone (by its SIGTERM) before the everyone check
        return real_is_alive(proc)

    monkeypatch.setattr(teardown, "is_alive", is_alive)
    try:
        record = {"name": "pd-0", "pid": victim.pid, "pgid": victim.pid,
                  "create_time": psutil.Process(victim.pid).create_time()}
        report = stop_processes([record], run_token=None, grace=10)
        assert [r.how for r in report.results] == ["sigterm"], report.lines()
        assert victim.returncode == -signal.SIGTERM and report.grace_waited_s < 5
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()


def test_logs_tail_and_unknown_instance(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "agg", name="logs")
    epdctl("up", "-d", str(topology), check=0)
    try:
        out = epdctl("logs", "logs", "pd-0", "--tail", "1", check=0).stdout
        assert len(out.strip().splitlines()) == 1 and out.startswith("pd-0 | ")
        bad = epdctl("logs", "logs", "nope")
        assert bad.returncode == 2 and "has no instance 'nope'" in bad.stderr
    finally:
        epdctl("down", "logs", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_a_proxy_on_an_ipv6_address_comes_up_with_a_bracketed_url(tmp_path, state_dir):
    # Was: "internal error: ValueError: Port could not be cast to integer value as ':1:PORT'" —
    # the health check's URL was http://::1:PORT.
    topology, ports = write_sim_topology(tmp_path, "agg", name="six")
    topology.write_text(topology.read_text().replace("proxy: {host: 127.0.0.1,", 'proxy: {host: "::1",'))
    plan = json.loads(epdctl("plan", str(topology), "--json", check=0).stdout)
    assert plan["proxy"]["url"] == f"http://[::1]:{ports['proxy']}"
    result = epdctl("up", "-d", str(topology), check=0)
    try:
        assert f"proxy at http://[::1]:{ports['proxy']}" in result.stderr + result.stdout
        status, body = http_post(f"http://[::1]:{ports['proxy']}/v1/completions",
                                 {"model": "sim-model", "prompt": "hi", "max_tokens": 2})
        assert status == 200 and json.loads(body)["choices"][0]["text"]
    finally:
        epdctl("down", "six", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_a_bug_during_up_d_names_itself_and_keeps_the_logs(tmp_path, state_dir):
    # Was: an exception of ours in the detached supervisor was torn down like a Ctrl-C, state
    # and log removed, and `up -d` said only "the supervisor exited with code 1".
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import epdctl.run.supervisor as s\n"
        "def boom(self, timeout, progress):\n"
        "    raise ValueError('injected bug')\n"
        "s.Supervisor.wait_healthy = boom\n")
    topology, ports = write_sim_topology(tmp_path, "agg", name="bug")
    pythonpath = os.pathsep.join(filter(None, [str(inject), os.environ.get("PYTHONPATH")]))
    result = epdctl("up", "-d", str(topology), env={"PYTHONPATH": pythonpath})
    try:
        assert result.returncode == 1
        assert "epdctl: internal error: ValueError: injected bug; stopped bug" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        status = epdctl("status", "bug", check=1).stdout  # 1: a failed start (3 is for nothing at all)
        assert "internal error: ValueError: injected bug" in status
        assert (state_dir / "bug" / "pd-0.log").exists()
    finally:
        epdctl("down", "bug", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))
