"""Logs and events under attack: names planted in the state folder, a tiny log cap, a huge
events file, escape sequences inside events."""

from __future__ import annotations

import io
import json
import os
import tracemalloc

import psutil
import pytest

from conftest import assert_no_orphans, epdctl, wait_for, write_sim_topology

from epdctl.run.events import EVENTS_FILE, EVENTS_MAX_BYTES
from epdctl.run.logfiles import rotate_if_needed
from epdctl.run.state import StateDir
from epdctl.status import show_events

# ---------------------------------------------------------------- rotation and planted names


@pytest.mark.parametrize("keep", [1, 3])
def test_rotation_replaces_a_symlink_planted_at_the_rotated_name(tmp_path, keep):
    """A symlink at NAME.log.1 is replaced, never written through: what it points at stays as it was."""
    log = tmp_path / "pd-0.log"
    log.write_bytes(b"old line\n" * 100)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for index in range(1, keep + 1):
        (tmp_path / f"pd-0.log.{index}").symlink_to(victim)
    assert rotate_if_needed(log, 10, keep)
    assert victim.read_text() == "precious"
    copy = tmp_path / "pd-0.log.1"
    assert not copy.is_symlink() and copy.read_bytes() == b"old line\n" * 100
    assert log.stat().st_size == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_rotation_skips_a_folder_at_the_rotated_name_and_keeps_the_bound(tmp_path):
    log = tmp_path / "pd-0.log"
    log.write_bytes(b"x" * 1000)
    planted = tmp_path / "pd-0.log.1"
    planted.mkdir()
    (planted / "inside").write_text("kept")
    assert rotate_if_needed(log, 10, 1)
    assert log.stat().st_size == 0
    assert (planted / "inside").read_text() == "kept"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_rotation_leaves_a_symlink_at_the_log_itself_alone(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"y" * 1000)
    (tmp_path / "pd-0.log").symlink_to(victim)
    assert not rotate_if_needed(tmp_path / "pd-0.log", 10, 1)
    assert victim.read_bytes() == b"y" * 1000 and not (tmp_path / "pd-0.log.1").exists()


def test_a_tiny_log_cap_neither_sticks_on_a_planted_symlink_nor_costs_the_events(tmp_path, state_dir):
    """`logs.max_mb` tiny and a symlink at pd-0.log.1: rotation replaces it every time and the log
    stays bounded; events.jsonl has its own bound, so `epdctl events` still shows every start."""
    topology, ports = write_sim_topology(tmp_path, "agg", name="tiny", extra="logs: {max_mb: 0.0002, keep: 1}")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = state_dir / "tiny"
    try:
        epdctl("up", "-d", str(topology), check=0)
        log = folder / "pd-0.log"
        for round_ in range(2):  # the second time, the name is planted again over a rotated copy
            (folder / "pd-0.log.1").unlink(missing_ok=True)
            (folder / "pd-0.log.1").symlink_to(victim)
            marker = f"marker {round_} ".encode() + b"z" * 2000 + b"\n"
            with open(log, "ab") as handle:
                handle.write(marker)
            copy = folder / "pd-0.log.1"
            wait_for(lambda: not copy.is_symlink() and marker in copy.read_bytes(), 20, "the log to rotate")
            assert victim.read_text() == "precious"
            assert marker not in log.read_bytes()  # emptied: the bound holds
        supervisor_log = (folder / "supervisor.log").read_text()
        assert "cannot rotate" not in supervisor_log, supervisor_log
        events = epdctl("events", "tiny", check=0).stdout.splitlines()
        started = [line for line in events if " started " in line]
        assert {line.split()[1] for line in started} >= {"pd-0", "proxy"}, events
        assert not (folder / f"{EVENTS_FILE}.1").exists()
    finally:
        epdctl("down", "tiny", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


# ---------------------------------------------------------------- events: streamed, bounded, shown safely


def _fake_topology(name: str) -> StateDir:
    """A state folder as `up` leaves it, with nothing running (events are read from it only)."""
    state = StateDir(name)
    state.ensure()
    state.write({"name": name, "phase": "running", "processes": [], "supervisor": {}})
    return state


class _Sink:
    """An output that keeps nothing: the test measures what `events` holds, not what it printed."""

    def __init__(self):
        self.lines = 0

    def write(self, text: str) -> None:
        self.lines += text.count("\n")

    def flush(self) -> None:
        pass


def _peak_memory_of_events(name: str) -> tuple[int, int]:
    """(lines printed, peak bytes allocated) of `epdctl events NAME`, in-process."""
    sink = _Sink()
    tracemalloc.start()
    try:
        show_events(name, follow=False, out=sink)
        return sink.lines, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_events_are_read_a_chunk_at_a_time(state_dir):
    """An events file of many MB is streamed: what `events` holds grows far less than the file.
    (Measured against an empty file: reading state.json takes a fixed buffer of its own.)"""
    _fake_topology("empty")
    state = _fake_topology("big")
    record = {"time": "2026-01-01T00:00:00.000Z", "process": "pd-0", "event": "exited", "how": "x" * 60}
    lines = (json.dumps(record) + "\n").encode() * 1024
    blocks = 8 * 1024 * 1024 // len(lines)
    with open(state.path / EVENTS_FILE, "wb") as handle:
        for _ in range(blocks):
            handle.write(lines)
    size = (state.path / EVENTS_FILE).stat().st_size
    _, baseline = _peak_memory_of_events("empty")
    printed, peak = _peak_memory_of_events("big")
    assert printed == blocks * 1024
    assert peak - baseline < size // 8, f"{peak - baseline} more bytes at the peak for a {size}-byte file"


def test_events_show_the_rotated_copy_first(state_dir):
    state = _fake_topology("two")

    def event(process: str, what: str) -> str:
        return json.dumps({"time": "t", "process": process, "event": what}) + "\n"

    (state.path / f"{EVENTS_FILE}.1").write_text(event("pd-0", "started") + event("pd-0", "healthy"))
    (state.path / EVENTS_FILE).write_text(event("pd-0", "exited"))
    out = io.StringIO()
    show_events("two", follow=False, out=out)
    assert [line.split()[2] for line in out.getvalue().splitlines()] == ["started", "healthy", "exited"]


def test_events_have_their_own_bound_apart_from_the_logs():
    assert EVENTS_MAX_BYTES >= 1024 * 1024  # a tiny logs.max_mb does not apply to them


HOSTILE_EVENT = {"time": "2026\u001b]0;title\u0007", "process": "pd-0\u001b[2J", "event": "exited",
                 "how": "killed \u001b]52;c;ZWNobyBoYWNrZWQ=\u0007 by \u009b31m", "note": "two\nlines"}


def test_events_never_print_escape_sequences_from_the_file(state_dir):
    """The JSON spells ESC as \\u001b: the filter must run on the decoded text, not on the line."""
    state = _fake_topology("esc")
    (state.path / EVENTS_FILE).write_text(json.dumps(HOSTILE_EVENT) + "\n")
    out = io.StringIO()
    show_events("esc", follow=False, out=out)
    shown = out.getvalue()
    assert shown.count("\n") == 1
    assert not any(ch in shown for ch in "\x1b\x07\x9b"), repr(shown)
    assert "killed" in shown and "by" in shown and "two\\nlines" in shown
    result = epdctl("events", "esc", check=0)  # and through the CLI, as a user runs it
    assert result.stdout == shown


def test_a_symlink_planted_at_a_childs_log_is_never_written_through(tmp_path, state_dir):
    """A link planted at pd-0.log while it runs: the restart marker and the restarted child's
    output go to a fresh log of ours, never to what the link points at."""
    topology, ports = write_sim_topology(tmp_path, "agg", name="loglink",
                                         extra="restart: {policy: on-failure, backoff_s: 0.1}")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = state_dir / "loglink"
    try:
        epdctl("up", "-d", str(topology), check=0)
        state = json.loads((folder / "state.json").read_text())
        pd = next(p for p in state["processes"] if p["name"] == "pd-0")
        log = folder / "pd-0.log"
        log.unlink()
        log.symlink_to(victim)
        psutil.Process(pd["pid"]).kill()
        wait_for(lambda: _restarted(folder) and "restarting pd-0" in _text(log), 30, "pd-0 restarted into a fresh log")
        assert victim.read_text() == "precious"
        assert not log.is_symlink() and "restarting pd-0" in log.read_text()
    finally:
        epdctl("down", "loglink", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


def _text(path) -> str:
    try:
        return path.read_text() if not path.is_symlink() else ""
    except OSError:
        return ""


def _restarted(folder) -> bool:
    state = json.loads((folder / "state.json").read_text())
    return any(p["name"] == "pd-0" and p["restarts"] == 1 for p in state["processes"])
