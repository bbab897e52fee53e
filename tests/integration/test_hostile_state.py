"""Issue #12 (data loss and trust) and the supervisor's parts of #19: real CLI, real processes.

Each test reproduces an attack or a careless act as it was reported, and checks that nothing
of the user's was lost and that nothing epdctl did not start was signalled.
"""

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

from conftest import (assert_no_orphans, epdctl, free_ports, http_post, wait_for, wait_healthy, wait_settled,
                      write_sim_topology)

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files to another uid")
OTHER_UID = 54321  # no such user is needed: root can chown to any uid
IMAGE_CHAT = {"messages": [{"role": "user", "content": [
    {"type": "text", "text": "what is this?"},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}], "max_tokens": 2}


def _sleeper(uid: int | None = None) -> subprocess.Popen:
    """A process epdctl did not start (optionally of another user): it must never be signalled."""
    def drop():
        if uid is not None:
            os.setgid(uid)
            os.setuid(uid)
    return subprocess.Popen(["sleep", "60"], preexec_fn=drop, start_new_session=True)


def _state(state_dir: Path, name: str) -> dict:
    return json.loads((state_dir / name / "state.json").read_text())


# ------------------------------------------------------------ the EC folder


def test_ec_path_with_dotdot_is_refused_and_the_folder_survives(tmp_path, state_dir):
    important = tmp_path / "important"
    important.mkdir()
    (important / "thesis.tex").write_text("years of work")
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="dots",
                                         ec_path=f"{tmp_path}/nonexistent/../important")
    result = epdctl("up", "-d", str(topology))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{topology}:" in result.stderr and "shared_storage_path" in result.stderr
    assert "Traceback" not in result.stderr
    epdctl("down", "dots", "--ignore-missing", check=0)  # nothing started: still a clean no-op
    assert (important / "thesis.tex").read_text() == "years of work"
    assert not (tmp_path / "nonexistent").exists()
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_ec_storage_library_refuses_a_non_normal_path(tmp_path):
    """The second line of defence, for a plan that did not come through `validate`."""
    from epdctl.run import storage
    from epdctl.errors import EpdctlError

    important = tmp_path / "important"
    important.mkdir()
    (important / "keep").write_text("x")
    for hostile in (f"{tmp_path}/missing/../important", f"{tmp_path}/./important", "relative/ec", f"{tmp_path}/a\0b"):
        with pytest.raises(EpdctlError, match="normalised absolute path"):
            storage.claim(hostile, "t-0123456789abcdef")
        assert storage.release(hostile, "t-0123456789abcdef") is None
    assert (important / "keep").exists() and not (tmp_path / "missing").exists()


def test_a_folder_that_existed_before_up_is_never_removed(tmp_path, state_dir):
    ec = tmp_path / "mine"
    ec.mkdir()
    (ec / "notes.txt").write_text("mine")
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="existing", ec_path=str(ec))
    epdctl("up", "-d", str(topology), check=0)
    try:
        assert http_post(f"http://127.0.0.1:{ports['proxy']}/v1/chat/completions", IMAGE_CHAT)[0] == 200
    finally:
        epdctl("down", "existing", check=0)
    assert (ec / "notes.txt").read_text() == "mine"
    assert not [p.name for p in ec.iterdir() if p.name.startswith(".epdctl")]  # no lock, lease or marker left
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_two_topologies_on_one_ec_path_the_folder_goes_with_its_last_user(tmp_path, state_dir):
    shared = tmp_path / "shared-ec"
    a, a_ports = write_sim_topology(tmp_path, "1e1pd", name="first", ec_path=str(shared))
    b, b_ports = write_sim_topology(tmp_path, "1e1pd", name="second", ec_path=str(shared))
    epdctl("up", "-d", str(a), check=0)
    try:
        epdctl("up", "-d", str(b), check=0)
        assert http_post(f"http://127.0.0.1:{a_ports['proxy']}/v1/chat/completions", IMAGE_CHAT)[0] == 200
        files = sorted(p for p in shared.rglob("encoder_cache.safetensors"))
        assert files
        down_b = epdctl("down", "second", check=0)
        assert "kept the shared folder" in down_b.stdout and "first-" in down_b.stdout
        # A still runs, on its EC folder and files.
        assert all(f.exists() for f in files)
        assert http_post(f"http://127.0.0.1:{a_ports['proxy']}/v1/chat/completions", IMAGE_CHAT)[0] == 200
    finally:
        epdctl("down", "second")
        down_a = epdctl("down", "first", check=0)
    assert "removed the shared folder" in down_a.stdout
    assert not shared.exists()  # the last user created it (through A): now it goes
    assert_no_orphans(str(state_dir), list(a_ports.values()) + list(b_ports.values()))


def test_a_crashed_users_stale_lease_does_not_keep_the_folder_forever(tmp_path):
    from epdctl.run import storage

    folder = tmp_path / "ec"
    assert storage.claim(str(folder), "gone-0123456789abcdef") is True
    # That run's process dies without `down`: forge its lease with a dead pid.
    lease = folder / (storage.LEASE_PREFIX + "gone-0123456789abcdef")
    lease.write_text(json.dumps({"token": "gone-0123456789abcdef", "pid": 2 ** 22 + 7, "create_time": 1.0}))
    assert storage.claim(str(folder), "next-0123456789abcdef") is False
    assert "removed" in storage.release(str(folder), "next-0123456789abcdef")
    assert not folder.exists()


# ------------------------------------------------------------ the state folder


def test_planted_symlink_in_a_world_writable_root_is_refused(tmp_path, monkeypatch):
    root = tmp_path / "shared-root"
    root.mkdir()
    os.chmod(root, 0o777)
    monkeypatch.setenv("EPDCTL_STATE_DIR", str(root))
    target = tmp_path / "victim"
    target.mkdir()
    os.chmod(target, 0o755)
    (target / "precious.log").write_text("do not delete")
    (root / "planted").symlink_to(target)
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="planted")
    for command in (["up", "-d", str(topology)], ["down", "planted"], ["status", "planted"], ["logs", "planted"]):
        result = epdctl(*command)
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        assert f"{root / 'planted'}: the state folder is a symlink" in result.stderr
        assert "Traceback" not in result.stderr
    up = epdctl("up", "-d", str(topology))
    assert "writable by other users" in up.stderr
    assert (target / "precious.log").read_text() == "do not delete"
    assert oct(os.stat(target).st_mode & 0o777) == "0o755"
    assert_no_orphans(str(root), list(ports.values()))


@ROOT_ONLY
def test_state_planted_by_another_user_is_not_trusted(tmp_path, state_dir):
    victim = _sleeper()  # a process of ours that epdctl did not start
    try:
        evil = state_dir / "evil"
        evil.mkdir(parents=True)
        record = {"name": "x", "role": "pd", "pid": victim.pid, "pgid": victim.pid, "url": "http://127.0.0.1:1",
                  "port": 1, "create_time": psutil.Process(victim.pid).create_time()}
        (evil / "state.json").write_text(json.dumps({
            "name": "evil", "run_token": "evil-0123456789abcdef", "processes": [record],
            "supervisor": {"pid": victim.pid, "create_time": record["create_time"]}}))
        os.chown(evil / "state.json", OTHER_UID, OTHER_UID)
        result = epdctl("down", "evil")
        assert result.returncode == 1
        assert "belongs to uid 54321" in result.stderr and "refusing to trust it" in result.stderr
        os.chown(evil, OTHER_UID, OTHER_UID)
        assert "belongs to uid 54321" in epdctl("down", "evil").stderr
        listing = epdctl("status")
        assert listing.returncode == 3 and "skipping" in listing.stderr
        time.sleep(0.2)
        assert victim.poll() is None, "epdctl signalled a process it did not start"
    finally:
        victim.kill()
        victim.wait()


@ROOT_ONLY
def test_our_own_state_never_signals_another_users_process(tmp_path, state_dir):
    """Even a state file of ours (say, edited by hand) cannot make epdctl signal another user."""
    other = _sleeper(uid=OTHER_UID)  # Popen returns once it has exec'd: its uid and start time are set
    try:
        created = psutil.Process(other.pid).create_time()
        folder = state_dir / "mine"
        folder.mkdir(parents=True, mode=0o700)
        record = {"name": "pd-0", "role": "pd", "pid": other.pid, "pgid": other.pid, "port": 1,
                  "url": "http://127.0.0.1:1", "create_time": created}
        (folder / "state.json").write_text(json.dumps({"name": "mine", "processes": [record], "run_token": None}))
        epdctl("down", "mine", check=0)
        time.sleep(0.2)
        assert other.poll() is None, "epdctl signalled another user's process"
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("name", ["../../etc", "..", "a/b", "Evil", "x\n"])
def test_names_from_the_command_line_cannot_leave_the_state_root(name, state_dir):
    for command in (["down", name], ["status", name], ["logs", name]):
        result = epdctl(*command)
        assert result.returncode == 2, (command, result.stderr)
        assert "Traceback" not in result.stderr
        # An argument with a slash is a topology FILE (every command reads its `name:`).
        if "/" not in name:
            assert "is not a topology name" in result.stderr


# ------------------------------------------------------------ lost state


def test_down_finds_the_processes_of_a_topology_whose_state_was_deleted(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="lost",
                                         instance_args={"pd-0": {"sim-spawn-child": "session"}})
    epdctl("up", "-d", str(topology), check=0)
    supervisor = _state(state_dir, "lost")["supervisor"]["pid"]
    bystander = _sleeper()  # ours, untagged: must survive
    try:
        import shutil

        wait_settled(state_dir, "lost")
        shutil.rmtree(state_dir / "lost")
        status = epdctl("status", "lost")
        assert status.returncode == 3 and "processes of an unknown state remain: lost (4 process(es))" in status.stderr
        again = epdctl("up", "-d", str(topology))
        assert again.returncode == 2 and "whose state is gone" in again.stderr
        down = epdctl("down", "lost", "-t", "2", check=0)
        assert "found 4 process(es) by their EPDCTL_RUN tag" in down.stdout, down.stdout
        assert "removed the shared folder" in down.stdout
        assert bystander.poll() is None
        assert not psutil.pid_exists(supervisor) or psutil.Process(supervisor).status() == psutil.STATUS_ZOMBIE
        assert not (state_dir / "lost").exists()
    finally:
        bystander.kill()
        bystander.wait()
        epdctl("down", "lost")
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_a_topology_named_a_does_not_take_a_b_processes(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "agg", name="a-b")
    epdctl("up", "-d", str(topology), check=0)
    try:
        result = epdctl("down", "a", check=1)  # a name with nothing of its own is not success
        assert "no topology named 'a' is up" in result.stderr and "a-b" in result.stderr
        assert "nothing to stop for 'a'" in epdctl("down", "a", "--ignore-missing", check=0).stdout
        assert json.loads(epdctl("status", "a-b", "--json").stdout)["state"] == "running"
    finally:
        epdctl("down", "a-b", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_detached_supervisor_survives_its_state_folder_being_deleted(tmp_path, state_dir):
    # restart: no, so that pd-0 stays dead and the state to wait for holds still (restarted, it is running again).
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="resilient", extra="restart: no")
    epdctl("up", "-d", str(topology), check=0)
    state = _state(state_dir, "resilient")
    supervisor = psutil.Process(state["supervisor"]["pid"])
    pd = next(p for p in state["processes"] if p["name"] == "pd-0")
    import shutil

    shutil.rmtree(state_dir / "resilient")
    try:
        os.kill(pd["pid"], signal.SIGKILL)  # a change the supervisor must record: it writes state

        def degraded():
            if not (state_dir / "resilient" / "state.json").exists():
                return None
            status = json.loads(epdctl("status", "resilient", "--json").stdout)
            return status if status["state"] == "degraded" else None

        status = wait_for(degraded, 30, "the supervisor to record pd-0's death in a new state folder")
        assert supervisor.is_running() and supervisor.status() != psutil.STATUS_ZOMBIE
        assert next(i for i in status["instances"] if i["name"] == "pd-0")["exit_code"] == -signal.SIGKILL
        log = (state_dir / "resilient" / "supervisor.log").read_text()
        assert "recreated it" in log and "pd-0 (pid" in log and "was killed by SIGKILL" in log
    finally:
        epdctl("down", "resilient", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


# ------------------------------------------------------------ failures that say why (#19)


def test_up_detached_failure_puts_the_cause_first_with_the_right_url(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="late",
                                         instance_args={"encode-0": {"sim-startup-ms": 60000}})
    # Long enough for pd-0 to be healthy on a busy machine: only encode-0 is to be named.
    result = epdctl("up", "-d", "--wait-timeout", "15", str(topology))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith("epdctl: not healthy after 15s: "), result.stderr
    assert f"encode-0 (no 200 from http://127.0.0.1:{ports['encode-0']}/health)" in lines[0]
    assert "pd-0 (no 200" not in lines[0]  # pd-0 was healthy
    assert lines[0].endswith("stopped late")
    assert lines[1].startswith("  encode-0 (pid") and "SIGTERM" in lines[1]
    assert any(line.startswith("--- last") for line in lines[2:])
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_up_detached_cut_short_by_down_says_so(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="short",
                                         instance_args={"pd-0": {"sim-startup-ms": 60000}})
    up = subprocess.Popen([sys.executable, "-m", "epdctl", "up", "-d", str(topology)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if (state_dir / "short" / "state.json").exists() and \
                    all(p["pid"] for p in _state(state_dir, "short")["processes"]):
                break
            time.sleep(0.05)
        epdctl("down", "short", check=0)
        _, err = up.communicate(timeout=30)
    finally:
        if up.poll() is None:
            up.kill()
    assert up.returncode == 1
    assert "up of short was cut short by `epdctl down`" in err
    assert "supervisor exited with code" not in err
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_busy_port_leaves_no_lock_and_down_clears_a_leftover_one(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="porty")
    holder = socket.socket()
    holder.bind(("127.0.0.1", ports["proxy"]))
    holder.listen()
    try:
        result = epdctl("up", "-d", str(topology))
    finally:
        holder.close()
    assert result.returncode == 1 and f"port {ports['proxy']} (proxy) is already in use" in result.stderr
    assert not (state_dir / "porty").exists()
    # A folder left by an older epdctl with only its lock: `down` clears it.
    (state_dir / "porty").mkdir(mode=0o700, parents=True)
    (state_dir / "porty" / "lock").write_text("")
    down = epdctl("down", "porty", check=0)
    assert "removed its leftover state folder" in down.stdout
    assert not (state_dir / "porty").exists()


@pytest.mark.parametrize("grace", ["-1", "nan"])
def test_down_rejects_a_negative_grace(grace, state_dir):
    result = epdctl("down", "anything", "-t", grace)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_down_says_where_the_time_went_when_a_descendant_ignores_sigterm(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="lingering",
                                         instance_args={"pd-0": {"sim-spawn-child": "session"}})
    epdctl("up", "-d", str(topology), check=0)
    down = epdctl("down", "lingering", "-t", "1", check=0)
    assert "pd-0 (pid" in down.stdout and "stopped by SIGTERM" in down.stdout
    assert "1 descendant process(es) ignored SIGTERM" in down.stdout, down.stdout
    assert "then SIGKILL" in down.stdout
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_ctrl_c_during_start_up_says_it_is_stopping(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="impatient",
                                         instance_args={"pd-0": {"sim-startup-ms": 60000}})
    proc = subprocess.Popen([sys.executable, "-m", "epdctl", "up", str(topology)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{ports['encode-0']}", timeout=20)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "epdctl: SIGINT received, stopping impatient" in out
    assert out.index("SIGINT received") < out.index("encode-0 (pid")
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_status_after_command_not_found_names_the_reason(tmp_path, state_dir):
    topology = tmp_path / "nobin.yaml"
    # Free ports, not ports made from our pid: another run's instance on one made `up` fail on the
    # busy port before it tried the command, and left status no instance to show (an IndexError).
    port, proxy = free_ports(2)
    topology.write_text(f"model: m\nplatform: cpu\nvllm_command: [no-such-vllm-binary, serve]\npd: [{{port: {port}}}]\n"
                        f"proxy: {{port: {proxy}}}\n")
    up = epdctl("up", "-d", str(topology))
    assert up.returncode == 1 and "cannot start 'no-such-vllm-binary': command not found" in up.stderr, up.stderr
    status = json.loads(epdctl("status", "nobin", "--json").stdout)
    pd = status["instances"][0]
    assert pd["pid"] is None and pd["exit_code"] is None
    assert pd["error"] == "cannot start 'no-such-vllm-binary': command not found"
    assert status["proxy"]["error"].startswith("not started")
    table = epdctl("status", "nobin").stdout
    assert "None" not in table and "-1" not in table
    assert "command not found" in table
    epdctl("down", "nobin", check=0)


def test_status_says_starting_while_instances_load(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="loading",
                                         instance_args={"pd-0": {"sim-startup-ms": 60000}})
    up = subprocess.Popen([sys.executable, "-m", "epdctl", "up", "-d", str(topology)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{ports['encode-0']}", timeout=20)
        status = json.loads(epdctl("status", "loading", "--json").stdout)
        assert status["state"] == "starting"
        assert {i["name"]: i["state"] for i in status["instances"]}["pd-0"] == "starting"
    finally:
        epdctl("down", "loading", check=0)
        up.wait(timeout=30)
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_logs_follow_ends_on_a_failed_topology(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "agg", name="ends", extra="restart: no",
                                         instance_args={"pd-0": {"sim-exit-after-s": 1}})
    up = subprocess.run([sys.executable, "-m", "epdctl", "up", str(topology)], capture_output=True, text=True,
                        timeout=60, stdin=subprocess.DEVNULL)
    assert up.returncode == 1  # pd-0 died: the foreground up stopped everything, keeping state and logs
    assert _state(state_dir, "ends")["phase"] == "failed"
    follow = epdctl("logs", "ends", "-f", timeout=20)
    assert follow.returncode == 0 and "exiting on purpose" in follow.stdout
    assert epdctl("logs", "ends", "--tail", "-1").returncode == 2
    epdctl("down", "ends", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_the_detached_supervisor_logs_deaths_and_decisions(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="journal", extra="restart: no",
                                         instance_args={"encode-0": {"sim-exit-after-s": 1}})
    epdctl("up", "-d", str(topology), check=0)
    try:
        log = state_dir / "journal" / "supervisor.log"
        deadline = time.monotonic() + 15
        while "encode-0 (pid" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        text = log.read_text()
        assert "supervising journal" in text and "journal is up" in text
        assert "encode-0 (pid" in text and "exited with code 3" in text and "not restarting it" in text
    finally:
        epdctl("down", "journal", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_a_hand_edited_state_is_one_line_and_down_still_stops_everything_by_tag(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="edited")
    epdctl("up", "-d", str(topology), check=0)
    try:
        # The supervisor's first look at the instances is saved; with no traffic nothing is saved after it.
        wait_for(lambda: _state(state_dir, "edited").get("evidence"), 30, "the supervisor's first look")
        state = _state(state_dir, "edited")
        supervisor = state["supervisor"]["pid"]
        state["processes"][0]["pid"] = True  # `true` must not be read as pid 1
        (state_dir / "edited" / "state.json").write_text(json.dumps(state))
        status = epdctl("status", "edited")
        assert status.returncode == 1 and status.stdout == "", status
        [line] = status.stderr.splitlines()
        assert "unreadable state (processes.0.pid: Input should be a valid integer)" in line and "epdctl down edited" in line
        listing = epdctl("status")  # every topology: the unreadable one is skipped, not fatal
        assert "warning: skipping" in listing.stderr and "Traceback" not in listing.stderr
        down = epdctl("down", "edited", "-t", "2", check=0)
        assert "looking for its processes by their EPDCTL_RUN tag" in down.stderr
        assert "found 3 process(es) by their EPDCTL_RUN tag" in down.stdout, down.stdout
        assert not psutil.pid_exists(supervisor) or psutil.Process(supervisor).status() == psutil.STATUS_ZOMBIE
        assert not (state_dir / "edited").exists()
    finally:
        epdctl("down", "edited")
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_down_by_tag_never_takes_a_same_named_topology_of_another_state_root(tmp_path, state_dir):
    """Two state roots (two EPDCTL_STATE_DIRs, say two test suites or two projects) may each run a
    topology of one name: a `down NAME` that finds no state under its root must not stop the other's."""
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="twin-name")
    epdctl("up", "-d", str(topology), check=0)
    try:
        other_root = {"EPDCTL_STATE_DIR": str(tmp_path / "another-root")}
        result = epdctl("down", "twin-name", env=other_root)
        assert result.returncode == 1 and "no topology named 'twin-name'" in result.stderr, result
        assert epdctl("up", "-d", str(topology), env=other_root).returncode != 0  # its ports are taken, nothing else
        status = json.loads(epdctl("status", "twin-name", "--json", check=0).stdout)
        assert status["state"] == "running" and all(i["state"] == "healthy" for i in status["instances"]), status
    finally:
        epdctl("down", "twin-name", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))
