"""Ctrl-C, SIGTERM, SIGHUP and closed pipes: whatever the user does, everything started is
either still supervised or torn down, and the exit code says which signal ended it."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys

import pytest

from conftest import assert_no_orphans, epdctl, metrics, signal_when, wait_for, wait_healthy, write_sim_topology
from test_restart import FAST, _entry, _status

SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


@pytest.fixture
def leave_nothing(state_dir):
    """Names of the topologies a test starts: whatever the test's outcome, `down` runs on each
    afterwards (it has nothing to stop when the test passed), so a failing test orphans nothing."""
    names: list[str] = []
    yield names
    for name in names:
        epdctl("down", name, "-t", "1")


def _up_into_a_pipe(topology, stderr_path) -> subprocess.Popen:
    """`epdctl up FILE | reader`, with the reader played by the test."""
    with open(stderr_path, "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "epdctl", "up", str(topology)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=err)


def _end(proc: subprocess.Popen, sig: int) -> int:
    try:
        proc.send_signal(sig)
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _read_until(proc: subprocess.Popen, text: bytes) -> None:
    seen = b""
    while text not in seen:
        line = proc.stdout.readline()
        assert line, f"up ended (exit {proc.wait()}) before printing {text!r}; it printed:\n{seen.decode()}"
        seen += line


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_pipe_closed_under_foreground_up_stops_the_printing_not_the_supervising(tmp_path, state_dir, leave_nothing,
                                                                                   sig):
    """`epdctl up FILE | head -9` (or `| tee`), then Ctrl-C or SIGTERM."""
    name = f"piped-{sig}"
    leave_nothing.append(name)
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name=name, extra=FAST)
    proc = _up_into_a_pipe(topology, tmp_path / "stderr")
    try:
        _read_until(proc, b"is up")
        proc.stdout.close()  # the reader leaves
        # Still supervised: a killed instance is restarted, and its new log lines (which no one
        # reads any more) do not stop the supervisor.
        os.kill(_entry(_status(name), "pd-0")["pid"], signal.SIGKILL)
        wait_for(lambda: _entry(_status(name), "pd-0")["restarts"] == 1, 30, "pd-0 restarted")
        wait_healthy(f"http://127.0.0.1:{ports['pd-0']}", timeout=30)
        wait_for(lambda: b"the reader of the output left" in (tmp_path / "stderr").read_bytes(), 30,
                 "the note that the output is no longer printed")
        assert proc.poll() is None, (tmp_path / "stderr").read_text()
        assert _status(name)["state"] == "running"
    finally:
        code = _end(proc, sig)
    err = (tmp_path / "stderr").read_text()
    assert code == SIGNAL_EXIT[sig], err
    # With stdout gone, the teardown is reported on stderr.
    assert f"{signal.Signals(sig).name} received, stopping {name}" in err and "stopped by SIGTERM" in err, err
    assert "Traceback" not in err
    assert_no_orphans(str(state_dir), list(ports.values()))
    assert not (state_dir / name).exists()


def test_a_pipe_closed_during_start_up_lets_the_start_finish(tmp_path, state_dir, leave_nothing):
    """`epdctl up FILE | head -3`: the reader leaves while the instances start."""
    leave_nothing.append("early")
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="early")
    proc = _up_into_a_pipe(topology, tmp_path / "stderr")
    try:
        proc.stdout.close()
        wait_for(lambda: proc.poll() is not None or _status("early").get("state") == "running", 30, "running")
        assert proc.poll() is None, (tmp_path / "stderr").read_text()
        wait_healthy(f"http://127.0.0.1:{ports['proxy']}", timeout=30)
    finally:
        code = _end(proc, signal.SIGINT)
    assert code == 130, (tmp_path / "stderr").read_text()
    assert_no_orphans(str(state_dir), list(ports.values()))
    assert not (state_dir / "early").exists()


def test_a_closed_terminal_then_sighup_tears_down(tmp_path, state_dir, leave_nothing):
    """The terminal window is closed: writes to it fail (EIO), and SIGHUP follows."""
    leave_nothing.append("hangup")
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="hangup")
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "epdctl", "up", str(topology)], stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave)
    os.close(slave)
    seen = bytearray()

    def printed_up() -> bool:
        while select.select([master], [], [], 0.05)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                return False
            if not chunk:
                break
            seen.extend(chunk)
        return b"is up" in seen

    try:
        wait_for(lambda: proc.poll() is not None or printed_up(), 30, "up on the terminal")
        assert proc.poll() is None, seen.decode(errors="replace")
    finally:
        os.close(master)  # the terminal goes away...
        code = _end(proc, signal.SIGHUP)  # ...and the kernel hangs up
    assert code == 129
    assert_no_orphans(str(state_dir), list(ports.values()))
    assert not (state_dir / "hangup").exists()


def _chat_requests_done(proxy: str) -> float:
    try:
        return sum(value for key, value in metrics(proxy).items()
                   if key.startswith("epdctl_proxy_requests_total") and "chat" in key)
    except OSError:
        return 0


@pytest.mark.parametrize("sig,as_json", [(signal.SIGINT, True), (signal.SIGTERM, False)])
def test_a_signal_during_bench_prints_what_was_measured(tmp_path, state_dir, leave_nothing, sig, as_json):
    leave_nothing.append("partial")
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="partial",
                                         timings="sim-ttft-ms: 20, sim-tpot-ms: 1, sim-encode-ms: 5")
    epdctl("up", "-d", str(topology), check=0)
    proxy = f"http://127.0.0.1:{ports['proxy']}"
    bench = subprocess.Popen([sys.executable, "-m", "epdctl", "bench", "partial", "--num-prompts", "20000",
                              "--concurrency", "2", "--max-tokens", "2", "--images-per-request", "0",
                              *(["--json"] if as_json else [])],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # With 2 in flight, a 5th request answered means the client has received 3 whole answers.
    out, err = signal_when(bench, lambda: _chat_requests_done(proxy) >= 5, sig, "5 requests answered")
    name = signal.Signals(sig).name
    assert bench.returncode == SIGNAL_EXIT[sig], err
    assert f"epdctl bench: interrupted by {name}" in err and "Traceback" not in err, err
    if as_json:
        report = json.loads(out)
        assert report["interrupted"] is True
        assert 3 <= report["completed"] < 20000 and report["duration_s"] > 0
        assert report["ttft_ms"]["p50"] > 0
    else:
        assert "(interrupted: partial figures)" in out and "completed / failed" in out, out
    epdctl("down", "partial", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))
