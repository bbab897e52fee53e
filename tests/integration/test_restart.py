"""Self-healing (#14): restart policy, crash loops, a supervised proxy, adoption, rotation, events.

Real sim processes under a bounded load; every test ends with `down` and the orphan check.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from conftest import assert_no_orphans, epdctl, http_post, wait_for, wait_healthy, write_sim_topology

from epdctl.config.schema import RestartSpec
from epdctl.run.restart import RestartBook

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
IMAGE_CHAT = {"messages": [{"role": "user", "content": [
    {"type": "text", "text": "what is this?"},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}], "max_tokens": 2}
FAST = "restart: {policy: on-failure, backoff_s: 0.2, backoff_max_s: 1}"


# ------------------------------------------------------------ the policy (pure)


def test_restart_book_follows_the_policy_backs_off_and_gives_up():
    book = RestartBook(RestartSpec(policy="on-failure", max_restarts=3, window_s=100, backoff_s=1, backoff_max_s=3))
    assert book.decide(0, 0).action == "exited"  # a clean exit is not a failure
    delays = []
    for now in (1, 2, 3):
        decision = book.decide(1, now)
        assert decision.action == "restart"
        delays.append(decision.delay_s)
        book.restarted(now)
    assert delays == [1, 2, 3]  # doubling, capped at backoff_max_s
    gave_up = book.decide(-9, 4)
    assert gave_up.action == "failed" and "3 time(s) within 100s" in gave_up.reason
    # A whole calm window later, the count (and the delay) start over.
    again = book.decide(-9, 200)
    assert again.action == "restart" and again.delay_s == 1
    assert RestartBook(RestartSpec(policy="no")).decide(-9, 0).action == "exited"
    assert RestartBook(RestartSpec(policy="always")).decide(0, 0).action == "restart"
    assert book.restarts == 3


def test_restart_keys_validate_with_compose_shorthand(tmp_path):
    from epdctl.config.load import parse_topology
    from epdctl.plan import build_plan

    topology = parse_topology(
        "model: m\nplatform: cpu\nrestart: no\npd: [{port: 21001, restart: {policy: always, max_restarts: 2}}]\n"
        "proxy: {port: 21002, restart: on-failure}\nlogs: {max_mb: 1, keep: 2}\n", "t.yaml")
    plan = build_plan(topology)
    assert plan.instances[0].restart.policy == "always" and plan.instances[0].restart.max_restarts == 2
    assert plan.proxy.restart.policy == "on-failure" and plan.proxy.restart.max_restarts == 5
    assert plan.log_max_bytes == 1024 * 1024 and plan.log_keep == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\nplatform: cpu\npd: [{port: 21001}]\nrestart: {policy: sometimes}\n")
    result = epdctl("validate", str(bad))
    assert result.returncode == 2 and f"{bad}:4: restart.policy" in result.stderr


# ------------------------------------------------------------ healing under load


class Load:
    """A bounded background load through the proxy: counts answers by status."""

    def __init__(self, url: str, body: dict):
        self.url, self.body = url + "/v1/chat/completions", body
        self.codes: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.codes.append(http_post(self.url, self.body, timeout=10)[0])
            except OSError:
                self.codes.append(0)
            time.sleep(0.02)

    def __enter__(self) -> "Load":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(15)


def _status(name: str) -> dict:
    return json.loads(epdctl("status", name, "--json").stdout)


def _entry(status: dict, name: str) -> dict:
    return status["proxy"] if name == "proxy" else next(i for i in status["instances"] if i["name"] == name)


@pytest.mark.parametrize("victim", ["encode-0", "decode-0", "proxy"])
def test_sigkill_of_an_instance_or_the_proxy_heals_within_seconds(victim, tmp_path, state_dir):
    name = f"heal-{victim.split('-')[0]}"
    topology, ports = write_sim_topology(tmp_path, "1e1p1d", name=name, extra=FAST)
    epdctl("up", "-d", str(topology), check=0)
    proxy = f"http://127.0.0.1:{ports['proxy']}"
    try:
        with Load(proxy, IMAGE_CHAT) as load:
            wait_for(lambda: len(load.codes) >= 3, 20, "the load to be answered")
            before = _entry(_status(name), victim)
            os.kill(before["pid"], signal.SIGKILL)
            healed = wait_for(lambda: (lambda e: e if e["state"] == "healthy" and e["restarts"] == 1 else None)(
                _entry(_status(name), victim)), 20, f"{victim} to be restarted and healthy")
            assert healed["pid"] != before["pid"] and healed["last_exit"]["code"] == -signal.SIGKILL
            # Requests succeed again once it is back (the proxy takes a restarted backend back by its probes).
            wait_for(lambda: http_post(proxy + "/v1/chat/completions", IMAGE_CHAT)[0] == 200, 10, "a 200 again")
            count = len(load.codes)
            wait_for(lambda: len(load.codes) >= count + 10, 30, "ten more answers")
            assert load.codes[count:] and all(code == 200 for code in load.codes[count:]), load.codes[count:]
        events = [json.loads(line) for line in (state_dir / name / "events.jsonl").read_text().splitlines()]
        mine = [e["event"] for e in events if e["process"] == victim]
        assert mine[-4:] == ["exited", "restarting", "started", "restarted"] or \
            mine[-5:] == ["exited", "restarting", "started", "restarted", "healthy"], mine
        log = (state_dir / name / f"{victim}.log").read_text()
        assert f"restarting {victim} (restart 1; last was killed by SIGKILL)" in log
        # status probes /health live (1 s each): on a saturated host one probe can miss, so wait.
        wait_for(lambda: _status(name)["state"] == "running", 30, f"{name} running again")
    finally:
        epdctl("down", name, check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_streams_in_flight_when_a_decoder_dies_end_with_an_error_event(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1e1p1d", name="midstream", extra=FAST,
                                         timings="sim-ttft-ms: 5, sim-tpot-ms: 100, sim-encode-ms: 5")
    epdctl("up", "-d", str(topology), check=0)
    try:
        import urllib.request

        body = json.dumps({**CHAT, "max_tokens": 100, "stream": True}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{ports['proxy']}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as stream:
            first = stream.readline()
            assert first.startswith(b"data: ")
            os.kill(_entry(_status("midstream"), "decode-0")["pid"], signal.SIGKILL)
            rest = stream.read().decode()
        assert '"error"' in rest and rest.rstrip().endswith("data: [DONE]")
        wait_for(lambda: _entry(_status("midstream"), "decode-0")["state"] == "healthy", 20, "decode-0 back")
    finally:
        epdctl("down", "midstream", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_a_crash_loop_stops_at_max_restarts_while_the_rest_serve(tmp_path, state_dir):
    topology, ports = write_sim_topology(
        tmp_path, "1e1pd", name="loop", extra="restart: {max_restarts: 2, backoff_s: 0.1, backoff_max_s: 0.2}",
        instance_args={"encode-0": {"sim-exit-after-s": 0.5}})
    epdctl("up", "-d", str(topology), check=0)
    try:
        failed = wait_for(lambda: (lambda e: e if e["state"] == "failed" else None)(
            _entry(_status("loop"), "encode-0")), 30, "encode-0 to be failed")
        assert failed["restarts"] == 2 and failed["last_exit"]["code"] == 3
        assert "restart.max_restarts 2" in failed["error"]
        status = _status("loop")
        assert status["state"] == "degraded"
        assert _entry(status, "pd-0")["state"] == "healthy"
        # The proxy runs; its /health (hence its state here) says 503 once it sees no encoder left.
        assert _entry(status, "proxy")["state"] in ("healthy", "unhealthy") and _entry(status, "proxy")["restarts"] == 0
        # The rest keep serving: text needs no encoder.
        assert http_post(f"http://127.0.0.1:{ports['proxy']}/v1/chat/completions", CHAT)[0] == 200
        table = epdctl("status", "loop").stdout
        assert "failed" in table and "last lines of encode-0" in table and "exiting on purpose" in table
        time.sleep(1.5)
        assert _entry(_status("loop"), "encode-0")["restarts"] == 2  # it gave up for good
    finally:
        epdctl("down", "loop", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_foreground_up_survives_an_instance_death(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="fgheal", extra=FAST)
    proc = subprocess.Popen([sys.executable, "-m", "epdctl", "up", str(topology)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proxy = f"http://127.0.0.1:{ports['proxy']}"
    try:
        wait_healthy(proxy, timeout=30, proc=proc)
        wait_for(lambda: _status("fgheal")["state"] == "running", 20, "running")
        pd = _entry(_status("fgheal"), "pd-0")
        os.kill(pd["pid"], signal.SIGKILL)
        wait_for(lambda: _entry(_status("fgheal"), "pd-0")["restarts"] == 1, 20, "pd-0 restarted")
        wait_for(lambda: http_post(proxy + "/v1/chat/completions", CHAT)[0] == 200, 20, "a 200 again")
        assert proc.poll() is None, "the foreground up stopped after an instance died"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert "pd-0 (pid" in out and "restarting it in 0.2s" in out
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_up_again_adopts_the_processes_of_a_killed_supervisor(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="adopt", extra=FAST)
    epdctl("up", "-d", str(topology), check=0)
    try:
        state = json.loads((state_dir / "adopt" / "state.json").read_text())
        os.kill(state["supervisor"]["pid"], signal.SIGKILL)
        status = wait_for(lambda: (lambda s: s if s["supervisor"]["state"] == "gone" else None)(_status("adopt")), 20,
                          "status to see the supervisor gone")
        assert status["supervisor"]["state"] == "gone" and "adopts the running processes" in status["warning"]
        assert "the supervisor (pid" in epdctl("status", "adopt").stdout
        pids = {p["name"]: p["pid"] for p in state["processes"]}
        again = epdctl("up", "-d", str(topology), check=0)
        assert "adopt is up" in again.stdout
        status = _status("adopt")
        assert status["supervisor"]["state"] == "running"
        assert {e["name"]: e["pid"] for e in status["instances"] + [status["proxy"]]} == pids  # the same processes
        assert all(e["state"] == "healthy" for e in status["instances"])
        # The new supervisor heals them too (exit codes of adopted processes cannot be known).
        os.kill(pids["encode-0"], signal.SIGKILL)
        healed = wait_for(lambda: (lambda e: e if e["state"] == "healthy" and e["restarts"] == 1 else None)(
            _entry(_status("adopt"), "encode-0")), 20, "encode-0 restarted by the adopting supervisor")
        assert healed["pid"] != pids["encode-0"]
        assert http_post(f"http://127.0.0.1:{ports['proxy']}/v1/chat/completions", IMAGE_CHAT)[0] == 200
    finally:
        epdctl("down", "adopt", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_adoption_refuses_a_changed_plan(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "agg", name="changed")
    epdctl("up", "-d", str(topology), check=0)
    try:
        os.kill(json.loads((state_dir / "changed" / "state.json").read_text())["supervisor"]["pid"], signal.SIGKILL)
        topology.write_text(topology.read_text().replace("sim-tpot-ms: 1", "sim-tpot-ms: 2"))
        result = epdctl("up", "-d", str(topology))
        assert result.returncode == 2 and "from a different plan" in result.stderr
    finally:
        epdctl("down", "changed", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


NOISY_ENGINE = """
import argparse, http.server, sys, threading, time
parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int)
args, _ = parser.parse_known_args()

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *a):
        pass

def chatter():
    n = 0
    while True:
        n += 1
        print(f"line {n} " + "x" * 200, flush=True)
        time.sleep(0.002)

threading.Thread(target=chatter, daemon=True).start()
http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Health).serve_forever()
"""


def test_logs_rotate_at_their_cap_and_keep_n_copies(tmp_path, state_dir):
    """An engine as chatty as vLLM at DEBUG: its log stays near the cap, with KEEP rotated copies."""
    from conftest import free_ports

    engine = tmp_path / "noisy.py"
    engine.write_text(NOISY_ENGINE)
    pd, proxy_port = free_ports(2)
    topology = tmp_path / "rotate.yaml"
    topology.write_text(f"model: m\nplatform: cpu\nvllm_command: [{sys.executable}, {engine}]\n"
                        f"pd: [{{port: {pd}}}]\nproxy: {{port: {proxy_port}}}\nlogs: {{max_mb: 0.05, keep: 2}}\n"
                        "health: {timeout_s: 30, interval_s: 0.05}\n")
    epdctl("up", "-d", str(topology), check=0)
    folder = state_dir / "rotate"
    try:
        wait_for(lambda: (folder / "pd-0.log.2").exists(), 20, "a second rotation")
        cap = int(0.05 * 1024 * 1024)
        time.sleep(3)  # another 300 KB of chatter: unrotated, the log would be far over 5 caps

        def size(name: str) -> int:
            """The file's size, looked at between rotations (a rotation renames .1 to .2 before
            it writes the new .1, so for an instant there is no .1)."""
            def look():
                try:
                    return ((folder / name).stat().st_size,)
                except FileNotFoundError:
                    return None
            return wait_for(look, 10, f"{name} in place")[0]

        assert size("pd-0.log.1") > cap // 2
        assert not (folder / "pd-0.log.3").exists()
        assert size("pd-0.log") < 5 * cap
        logs = epdctl("logs", "rotate", "pd-0", "--tail", "3", check=0)
        assert logs.stdout.count("pd-0 |") == 3 and "line " in logs.stdout
    finally:
        epdctl("down", "rotate", check=0)
    assert not folder.exists()
    assert_no_orphans(str(state_dir), [pd, proxy_port])


def test_a_restart_first_kills_what_the_dead_instance_left_behind(tmp_path, state_dir):
    """vLLM's EngineCore outlives a killed API server and holds its device memory: it must go."""
    topology, ports = write_sim_topology(tmp_path, "agg", name="leftover", extra=FAST,
                                         instance_args={"pd-0": {"sim-spawn-child": "session"}})
    epdctl("up", "-d", str(topology), check=0)
    try:
        def pd_processes() -> list[psutil.Process]:
            found = []
            for proc in psutil.process_iter():
                try:
                    env = proc.environ()
                    if env.get("EPDCTL_INSTANCE") == "pd-0" and env.get("EPDCTL_RUN", "").startswith("leftover-") \
                            and proc.status() != psutil.STATUS_ZOMBIE:
                        found.append(proc)
                except psutil.Error:
                    pass
            return found

        wait_for(lambda: len(pd_processes()) == 2, 10, "pd-0 and its child")
        old = {p.pid for p in pd_processes()}
        os.kill(_entry(_status("leftover"), "pd-0")["pid"], signal.SIGKILL)  # its child stays, in its own session
        wait_for(lambda: _entry(_status("leftover"), "pd-0")["state"] == "healthy"
                  and _entry(_status("leftover"), "pd-0")["restarts"] == 1, 20, "pd-0 back")
        now = wait_for(lambda: (lambda ps: ps if len(ps) == 2 else None)(pd_processes()), 10, "two pd-0 processes")
        assert not old & {p.pid for p in now}, "the dead instance's child survived its restart"
    finally:
        epdctl("down", "leftover", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))
