"""The supervisor's decisions with a fake Runtime: no process started, no port bound.

A fake spawn hands out fake popens (their exit is set by the test), a fake clock moves only when
the supervisor sleeps, and a fake probe answers /health as the test says. So the health gate,
fail-fast, the deadline and each restart decision are checked exactly, in no time.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional

import pytest

from epdctl.config.schema import RestartSpec
from epdctl.errors import EXIT_RUNTIME
from epdctl.plan import Plan, ProcessSpec
from epdctl.run import supervisor as supervisor_mod
from epdctl.run import teardown as teardown_mod
from epdctl.run.child import Child
from epdctl.run.progress import Progress
from epdctl.run.state import StateDir
from epdctl.run.states import (
    TRANSITIONS, Health, IllegalTransition, ProcessState, TopologyPhase, check_transition,
)
from epdctl.run.supervisor import StartFailed, Supervisor

FAKE_PID_BASE = 10 ** 8  # above any pid_max: psutil finds no such process, nothing real is signalled


class FakePopen:
    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        return self.returncode


class FakeRuntime:
    """spawn, clock and probe as the test sets them; `at(t, action)` runs an action once the clock reaches t."""

    def __init__(self):
        self.clock = 1000.0
        self.healthy: set[str] = set()  # urls whose /health answers 200
        self.spawned: list[tuple[list[str], dict[str, str], FakePopen]] = []
        self.scheduled: list[tuple[float, object]] = []

    def spawn(self, argv, env, log_path: Path, node=None) -> FakePopen:
        popen = FakePopen(FAKE_PID_BASE + len(self.spawned))
        self.spawned.append((list(argv), dict(env), popen))
        return popen

    def now(self) -> float:
        return self.clock

    def sleep(self, seconds: float) -> None:
        self.clock += seconds
        due = [item for item in self.scheduled if item[0] <= self.clock]
        self.scheduled = [item for item in self.scheduled if item[0] > self.clock]
        for _, action in due:
            action()

    def probe(self, url: str, timeout: float = 1.0) -> bool:
        return url in self.healthy

    def fetch(self, url: str, timeout: float = 1.0):
        return None  # no /metrics: the witness's evidence stays unknown

    def at(self, when: float, action) -> None:
        self.scheduled.append((self.clock + when, action))

    def popen_of(self, name: str, incarnation: int = -1) -> FakePopen:
        mine = [popen for argv, env, popen in self.spawned if env["EPDCTL_INSTANCE"] == name]
        return mine[incarnation]


def spec(name: str, role: str, port: int, restart: RestartSpec = RestartSpec()) -> ProcessSpec:
    # Ports are never bound here: the fake probe only compares urls.
    return ProcessSpec(name=name, argv=("sim", name), env={}, host="127.0.0.1", port=port, role=role, restart=restart)


def make_plan(restart: RestartSpec = RestartSpec()) -> Plan:
    return Plan(name="unit", engine="sim", platform="cpu", instances=(spec("pd-0", "pd", 1, restart),),
                proxy=spec("proxy", "proxy", 2, restart), health_timeout_s=5, health_interval_s=0.1)


@pytest.fixture
def sup(tmp_path, monkeypatch):
    # No scan of the machine's processes for tagged leftovers: a fake run has none.
    monkeypatch.setattr(supervisor_mod, "tagged_processes", lambda token: [])
    monkeypatch.setattr(teardown_mod, "tagged_processes", lambda token: [])

    def make(restart: RestartSpec = RestartSpec()) -> Supervisor:
        state_dir = StateDir("unit", root=tmp_path / "state")
        state_dir.ensure()
        return Supervisor(make_plan(restart), state_dir, "foreground", runtime=FakeRuntime(), out=io.StringIO())

    return make


def spawn_all(sup: Supervisor) -> None:
    for child in sup.children:
        sup.spawn(child, fresh_log=True)


def gate(sup: Supervisor, timeout: float = 5.0) -> None:
    sup.wait_healthy(timeout, Progress(sup.children, sup.runtime, io.StringIO()))


def child(sup: Supervisor, name: str) -> Child:
    return next(c for c in sup.children if c.spec.name == name)


def events(sup: Supervisor) -> list[tuple[str, str]]:
    lines = (sup.state_dir.path / "events.jsonl").read_text().splitlines()
    return [(e["process"], e["event"]) for e in map(json.loads, lines)]


# ---------------------------------------------------------------- the states themselves


def test_states_are_the_words_state_json_has_always_held():
    assert json.dumps([ProcessState.HEALTHY, TopologyPhase.DEGRADED, Health.FAILED]) == '["healthy", "degraded", "failed"]'
    assert f"{ProcessState.RESTARTING}" == str(ProcessState.RESTARTING) == "restarting"
    assert ProcessState("exited") is ProcessState.EXITED and "starting" == ProcessState.STARTING
    assert {"healthy": "green"}.get(ProcessState.HEALTHY) == "green"
    assert [p.value for p in TopologyPhase] == ["starting", "adopting", "running", "degraded", "stopping", "stopped",
                                                 "failed"]


def test_every_process_state_has_its_transitions():
    assert set(TRANSITIONS) == set(ProcessState)
    assert TRANSITIONS[ProcessState.FAILED] == frozenset()  # failed is final


@pytest.mark.parametrize("old, new", [
    (ProcessState.FAILED, ProcessState.STARTING), (ProcessState.EXITED, ProcessState.HEALTHY),
    (ProcessState.HEALTHY, ProcessState.STARTING), (ProcessState.RESTARTING, ProcessState.HEALTHY),
    (ProcessState.DRAINING, ProcessState.HEALTHY),
])
def test_an_illegal_transition_is_a_bug_that_raises(old, new):
    with pytest.raises(IllegalTransition, match=f"pd-0: {old} -> {new}"):
        check_transition("pd-0", old, new)
    record = Child(spec("pd-0", "pd", 1), Path("/nonexistent"), state=old)
    with pytest.raises(IllegalTransition):
        record.set_state(new)
    assert record.state == old


def test_set_state_to_the_same_state_changes_nothing():
    record = Child(spec("pd-0", "pd", 1), Path("/nonexistent"), state=ProcessState.FAILED)
    since = record.since
    record.set_state(ProcessState.FAILED)
    assert record.state == ProcessState.FAILED and record.since == since


# ---------------------------------------------------------------- the health gate


def test_the_gate_waits_for_every_health_200_on_the_fake_clock(sup):
    s = sup()
    spawn_all(s)
    assert [c.state for c in s.children] == [ProcessState.STARTING, ProcessState.STARTING]
    s.runtime.at(0.3, lambda: s.runtime.healthy.add("http://127.0.0.1:1"))
    s.runtime.at(1.0, lambda: s.runtime.healthy.add("http://127.0.0.1:2"))
    gate(s)
    assert [c.state for c in s.children] == [ProcessState.HEALTHY, ProcessState.HEALTHY]
    assert child(s, "pd-0").healthy_after_s == pytest.approx(0.3)
    assert child(s, "proxy").healthy_after_s == pytest.approx(1.0)
    env = s.runtime.spawned[0][1]
    assert env["EPDCTL_RUN"] == s.run_token and env["EPDCTL_INSTANCE"] == "pd-0"
    assert ("pd-0", "healthy") in events(s)


def test_a_death_during_start_up_fails_the_start_at_once_naming_it(sup):
    s = sup()
    spawn_all(s)
    s.runtime.at(0.5, lambda: setattr(s.runtime.popen_of("pd-0"), "returncode", 3))
    started = s.runtime.now()
    with pytest.raises(StartFailed, match="pd-0 exited with code 3 during start-up"):
        gate(s, timeout=60)
    assert s.runtime.now() - started < 1  # at once, not at the deadline
    assert child(s, "pd-0").state == ProcessState.EXITED


def test_one_that_was_healthy_and_dies_while_others_start_fails_the_start(sup):
    s = sup()
    spawn_all(s)
    s.runtime.healthy.add("http://127.0.0.1:1")
    s.runtime.at(0.5, lambda: setattr(s.runtime.popen_of("pd-0"), "returncode", -9))
    with pytest.raises(StartFailed, match="pd-0 was killed by SIGKILL during start-up"):
        gate(s, timeout=60)


def test_the_deadline_names_whoever_is_not_healthy(sup):
    s = sup()
    spawn_all(s)
    s.runtime.healthy.add("http://127.0.0.1:1")
    with pytest.raises(StartFailed, match=r"not healthy after 5s: proxy \(no 200 from http://127.0.0.1:2/health\)"):
        gate(s, timeout=5)
    assert s.runtime.now() == pytest.approx(1005, abs=0.2)


def test_a_command_that_cannot_start_fails_the_start(sup):
    s = sup()

    def missing(argv, env, log_path, node=None):
        raise FileNotFoundError(argv[0])

    s.runtime.spawn = missing
    with pytest.raises(StartFailed, match="pd-0: cannot start 'sim': command not found"):
        s.spawn(child(s, "pd-0"), fresh_log=True)
    assert child(s, "pd-0").state == ProcessState.EXITED


# ---------------------------------------------------------------- after start: restart decisions


def healthy_run(sup, restart: RestartSpec) -> Supervisor:
    s = sup(restart)
    spawn_all(s)
    s.runtime.healthy.update({"http://127.0.0.1:1", "http://127.0.0.1:2"})
    gate(s)
    s.phase = TopologyPhase.RUNNING
    return s


def test_an_exit_is_restarted_after_the_backoff_then_gated_again(sup):
    s = healthy_run(sup, RestartSpec(policy="on-failure", backoff_s=2))
    pd = child(s, "pd-0")
    s.runtime.popen_of("pd-0").returncode = 1
    now = s.runtime.now()
    assert s._tend(pd, now)
    assert pd.state == ProcessState.RESTARTING and pd.restart_at == now + 2
    assert not s._tend(pd, now + 1.9)  # not before the backoff
    s.runtime.healthy.discard("http://127.0.0.1:1")
    assert s._tend(pd, now + 2)
    assert pd.state == ProcessState.STARTING and len(s.runtime.spawned) == 3 and pd.book.restarts == 1
    s.runtime.healthy.add("http://127.0.0.1:1")
    assert s._tend(pd, now + 2)
    assert pd.state == ProcessState.HEALTHY
    assert [e for p, e in events(s) if p == "pd-0"] == [
        "started", "healthy", "exited", "restarting", "started", "restarted", "healthy"]


def test_a_clean_exit_under_on_failure_is_not_restarted(sup):
    s = healthy_run(sup, RestartSpec(policy="on-failure"))
    pd = child(s, "pd-0")
    s.runtime.popen_of("pd-0").returncode = 0
    s._tend(pd, s.runtime.now())
    assert pd.state == ProcessState.EXITED and "not restarted: it exited cleanly" in pd.error
    assert len(s.runtime.spawned) == 2


def test_a_crash_loop_fails_after_max_restarts_within_the_window(sup):
    s = healthy_run(sup, RestartSpec(policy="always", max_restarts=2, backoff_s=1, window_s=100))
    pd = child(s, "pd-0")
    for _ in range(2):
        s.runtime.popen_of("pd-0").returncode = 1
        s._tend(pd, s.runtime.now())
        assert pd.state == ProcessState.RESTARTING
        s.runtime.clock = pd.restart_at
        s._tend(pd, s.runtime.now())
        assert pd.state == ProcessState.STARTING
    s.runtime.popen_of("pd-0").returncode = 1
    s._tend(pd, s.runtime.now())
    assert pd.state == ProcessState.FAILED and "restarted 2 time(s) within 100s" in pd.error


def test_foreground_ends_when_a_role_can_never_serve_again(sup):
    s = healthy_run(sup, RestartSpec(policy="no"))
    s.runtime.at(0.5, lambda: setattr(s.runtime.popen_of("pd-0"), "returncode", 1))
    assert s.run(stream_logs=False) == EXIT_RUNTIME
    assert s.phase == TopologyPhase.FAILED and s.error == "no pd instance can serve any more"
    state = json.loads(s.state_dir.state_file.read_text())
    assert state["phase"] == "failed"
    assert [p["state"] for p in state["processes"]] == ["exited", "healthy"]
