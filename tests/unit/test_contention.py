"""The twin's contention model with synthetic numbers: the sharing arithmetic on a virtual clock,
the device ledger's file, the profile's `contention:` block (old profiles included), and what
calibrate makes of measured CPU times. No process, no port, no timing."""

from __future__ import annotations

import asyncio
import os
import struct

import pytest

from epdctl.config.load import parse_topology
from epdctl.config.profile import Contention, load_profile
from epdctl.config.simflags import SIM_FLAGS, contention_of, value_problem
from epdctl.contention_probe import Meter, contention_block
from epdctl.errors import EpdctlError
from epdctl.plan import build_plan
from epdctl.sim.contention import TICK_S, Pace, SharedWork, bind_cores, share_rate
from epdctl.sim.costmodel import CostModel, Scheduler, Seq
from epdctl.sim.ledger import SIZE, SLOTS, Ledger, LedgerError, device_mask, devices_from_env

MS = 0.001


# ------------------------------------------------------------ the arithmetic, on a virtual clock


def test_a_shared_device_runs_each_of_its_steps_at_its_share():
    assert share_rate(1, 1) == 1.0
    assert share_rate(2, 1) == 0.5
    assert share_rate(3, 1) == pytest.approx(1 / 3)
    assert share_rate(2, 2) == 1.0  # two slots: two steps side by side at full speed
    assert share_rate(4, 2) == 0.5


def run_virtual(steps: list[tuple[float, float]], slots: int) -> list[float]:
    """Steps (start, work) on one device, each re-reading how many are stepping as SharedWork asks:
    returns when each ends. The clock moves from one wake-up to the next: no sleeping, no timing."""
    works: dict[int, SharedWork] = {}
    wake = {i: start for i, (start, _) in enumerate(steps)}
    ends: dict[int, float] = {}
    while wake:
        i, now = min(wake.items(), key=lambda item: item[1])
        for j, (start, work) in enumerate(steps):  # every step under way has announced itself
            if start <= now and j not in works:
                works[j] = SharedWork(work, slots, start)
        stepping = sum(1 for j in works if j not in ends)
        wait = works[i].advance(now, stepping)
        if wait is None:
            ends[i] = now
            del wake[i]
        else:
            wake[i] = now + wait
    return [ends[i] for i in range(len(steps))]


def test_two_steps_at_once_on_one_device_take_twice_as_long_and_work_is_conserved():
    ends = run_virtual([(0.0, 10 * MS), (0.0, 10 * MS)], slots=1)
    assert ends == [pytest.approx(20 * MS, abs=0.1 * MS)] * 2
    # With two slots (MPS, say) they run side by side at full speed.
    assert run_virtual([(0.0, 10 * MS), (0.0, 10 * MS)], slots=2) == [pytest.approx(10 * MS, abs=0.1 * MS)] * 2
    # One alone is not slowed.
    assert run_virtual([(0.0, 10 * MS)], slots=1) == [pytest.approx(10 * MS, abs=0.1 * MS)]


def test_a_step_joined_half_way_slows_from_then_on_processor_sharing():
    # A alone for 5 ms (5 done), both at half speed until A's last 5 are done (at 15 ms), B alone
    # after. A sees B at its next tick (TICK_S), so A may run up to a tick late at full speed.
    first, second = run_virtual([(0.0, 10 * MS), (5 * MS, 10 * MS)], slots=1)
    assert 15 * MS - TICK_S / 2 <= first <= 15 * MS + TICK_S / 2
    assert second == pytest.approx(20 * MS, abs=0.01 * MS)  # the device did 20 ms of work in 20 ms


def test_shared_work_counts_the_time_lost_to_sharing():
    work = SharedWork(10 * MS, 1, now=0.0)
    assert work.advance(0.0, 2) == pytest.approx(2 * MS)  # never longer than a tick: the sharing may change
    work.advance(4 * MS, 1)  # 4 ms at half speed: 2 ms of work done, 2 ms lost
    assert work.left == pytest.approx(8 * MS) and work.lost == pytest.approx(2 * MS)
    assert work.eta() == pytest.approx(12 * MS)  # alone from now on


# ------------------------------------------------------------ the ledger


def test_sims_on_one_device_count_each_other_and_sims_elsewhere_do_not(tmp_path):
    path = str(tmp_path / "sim-ledger")
    alive = lambda pid: True  # noqa: E731 (fake pids: nothing real is looked up)
    a, b, c = Ledger(path, [0], pid=10 ** 8, alive=alive), Ledger(path, [0], pid=10 ** 8 + 1, alive=alive), \
        Ledger(path, [1], pid=10 ** 8 + 2, alive=alive)
    assert len({a.slot, b.slot, c.slot}) == 3 and os.path.getsize(path) == SIZE
    assert a.stepping(100.0) == 1  # nobody else stepping
    b.announce(101.0)
    c.announce(101.0)
    assert a.stepping(100.0) == 2  # b shares device 0; c is on device 1
    assert a.stepping(101.5) == 1  # b's announced end has passed: a sim that died mid-step stops counting
    assert c.stepping(100.0) == 1
    b.announce(0.0)
    assert a.stepping(100.0) == 1
    # Devices overlap through any one of them: a TP-2 instance on 0,1 shares with both.
    wide = Ledger(path, [0, 1], pid=10 ** 8 + 3, alive=alive)
    c.announce(101.0)
    assert wide.stepping(100.0) == 2
    for ledger in (a, b, c, wide):
        ledger.close()


def test_a_restarted_sim_takes_its_slot_back_and_a_dead_ones_slot_is_reused(tmp_path):
    path = str(tmp_path / "sim-ledger")
    first = Ledger(path, [0], pid=10 ** 8, alive=lambda pid: True)
    again = Ledger(path, [0], pid=10 ** 8, alive=lambda pid: True)
    assert again.slot == first.slot
    other = Ledger(path, [0], pid=10 ** 8 + 1, alive=lambda pid: pid != 10 ** 8)  # the first is gone
    assert other.slot == first.slot


def test_a_full_ledger_is_one_clear_error(tmp_path):
    path = str(tmp_path / "sim-ledger")
    for pid in range(SLOTS):
        Ledger(path, [0], pid=10 ** 8 + pid, alive=lambda pid: True)
    with pytest.raises(LedgerError, match="slots of the device ledger are taken"):
        Ledger(path, [0], pid=10 ** 9, alive=lambda pid: True)


def test_a_ledger_that_is_a_symlink_or_of_the_wrong_size_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(LedgerError, match="cannot open"):
        Ledger(str(tmp_path / "link"), [0], pid=10 ** 8)
    assert target.read_bytes() == b""  # nothing written through the link
    odd = tmp_path / "odd"
    odd.write_bytes(b"x" * 100)
    with pytest.raises(LedgerError, match="100 bytes"):
        Ledger(str(odd), [0], pid=10 ** 8)
    (tmp_path / "folder").mkdir()
    with pytest.raises(LedgerError):
        Ledger(str(tmp_path / "folder"), [0], pid=10 ** 8)


def test_a_slot_holds_pid_devices_and_the_announced_end(tmp_path):
    path = tmp_path / "sim-ledger"
    ledger = Ledger(str(path), [2, 3], pid=10 ** 8, alive=lambda pid: True)
    ledger.announce(42.5)
    pid, mask, until, _ = struct.unpack_from("<qQdd", path.read_bytes(), ledger.slot * 32)
    assert (pid, mask, until) == (10 ** 8, 0b1100, 42.5)
    ledger.close()
    assert struct.unpack_from("<q", path.read_bytes(), ledger.slot * 32)[0] == 0  # freed on exit


def test_device_ids_come_from_the_plans_device_variable():
    assert devices_from_env({"CUDA_VISIBLE_DEVICES": "0,2"}) == [0, 2]
    assert devices_from_env({"ZE_AFFINITY_MASK": "1"}) == [1]
    assert devices_from_env({"ASCEND_RT_VISIBLE_DEVICES": "3"}) == [3]
    assert devices_from_env({}) is None
    assert devices_from_env({"CUDA_VISIBLE_DEVICES": "GPU-uuid"}) is None
    assert device_mask([0, 64]) == 1  # ids fold onto 64 bits: at worst pessimistic


def test_the_cpu_burner_is_pinned_where_vllm_pins_its_engine():
    assert bind_cores("0") == [0]
    assert bind_cores("0-2,5") == [0, 1, 2, 5]
    assert bind_cores("0,1|2,3") == [0, 1]  # the first rank's
    assert bind_cores("auto") == [] and bind_cores(None) == [] and bind_cores("x") == []


# ------------------------------------------------------------ the step loop spends each step through the pace


class RecordingPace(Pace):
    def __init__(self) -> None:
        self.spent: list[float] = []

    async def spend(self, cost_s: float) -> None:
        self.spent.append(cost_s)  # no sleep: the test is about what is spent, not how long it takes


def test_with_contention_every_step_is_spent_through_the_pace_one_at_a_time():
    pace = RecordingPace()

    async def main() -> None:
        scheduler = Scheduler(CostModel(prefill_ms=20, decode_ms=2, encode_ms=0), pace=pace)
        await scheduler.run(Seq(output=5, prefill_tokens=8))

    asyncio.run(main())
    # The prefill step, then one decode step per further token: never merged, since the sharing
    # can change between steps.
    assert pace.spent == [pytest.approx(0.020), pytest.approx(0.002), pytest.approx(0.002), pytest.approx(0.002),
                          pytest.approx(0.002)]


# ------------------------------------------------------------ flags, profiles and calibrate's measurements


def test_the_contention_flags_are_checked_as_validate_checks_them():
    assert value_problem(SIM_FLAGS["sim-contention"], "device") is None
    assert "must be one of" in value_problem(SIM_FLAGS["sim-contention"], "gpu")
    assert value_problem(SIM_FLAGS["sim-cpu-share"], 0.5) is None
    for bad in (1.5, -0.1, "x", float("nan")):
        assert "fraction from 0 to 1" in value_problem(SIM_FLAGS["sim-cpu-share"], bad)
    assert value_problem(SIM_FLAGS["sim-device-slots"], 2) is None
    for bad in (0, 1.5, "two", True, 10 ** 6):
        assert "whole number" in value_problem(SIM_FLAGS["sim-device-slots"], bad)
    assert contention_of(["python", "-m", "epdctl.sim", "--sim-contention", "device"]) == "device"
    assert contention_of(["--sim-contention=cpu", "--sim-contention", "none"]) == "none"
    assert contention_of(["--port", "1"]) == "none"


OLD_PROFILE = """kind: epdctl-sim-profile
version: 1
model: m
source: {topology: cpu-1e1pd, engine: vllm}
cost: {prefill_ms: 11.6, decode_ms: 2.36, encode_ms: 1.23, encode_base_ms: 6.8, encode_request_ms: 8.0}
fits: {}
"""


def _sim_topology(tmp_path, profile_text: str, platform: str = "cpu") -> str:
    (tmp_path / "p.yaml").write_text(profile_text)
    devices = "" if platform == "cpu" else "devices: [0], "
    return f"""name: t
model: m
engine: sim
platform: {platform}
sim_profile: p.yaml
ec_transfer: {{connector: ECExampleConnector, shared_storage_path: {tmp_path / 'ec'}}}
encode: [{{{devices}port: 18001}}]
pd: [{{{devices.replace('0', '1')}port: 18002}}]
proxy: {{port: 18003}}
"""


def _argv(tmp_path, topology_text: str, role: str) -> list[str]:
    source = tmp_path / "t.yaml"
    source.write_text(topology_text)
    plan = build_plan(parse_topology(topology_text, str(source), source=source, device_count=4))
    return next(list(p.argv) for p in plan.instances if p.role == role)


def test_a_profile_from_before_contention_loads_and_means_no_contention(tmp_path):
    (tmp_path / "old.yaml").write_text(OLD_PROFILE)
    profile = load_profile(tmp_path / "old.yaml")
    assert profile.contention == Contention() and profile.contention.mode == "none"
    assert profile.flags("pd") == profile.cost.flags("pd")  # nothing added: its plans are unchanged
    argv = _argv(tmp_path, _sim_topology(tmp_path, OLD_PROFILE), "pd")
    assert not any(word.startswith("--sim-contention") or word.startswith("--sim-cpu") for word in argv)


def test_a_cpu_profile_gives_each_role_its_measured_share_and_a_device_profile_its_slots(tmp_path):
    cpu = OLD_PROFILE + "contention: {mode: cpu, cpu_share: {encode: 0.9, pd: 0.6}, sleep_share: {pd: 0.3}}\n"
    encode = _argv(tmp_path, _sim_topology(tmp_path, cpu), "encode")
    assert encode[encode.index("--sim-contention") + 1] == "cpu"
    assert encode[encode.index("--sim-cpu-share") + 1] == "0.9"
    pd = _argv(tmp_path, _sim_topology(tmp_path, cpu), "pd")
    assert pd[pd.index("--sim-cpu-share") + 1] == "0.6" and pd[pd.index("--sim-sleep-share") + 1] == "0.3"
    assert "--sim-sleep-share" not in encode  # not measured: the sim sleeps what the CPU share leaves
    device = OLD_PROFILE + "contention: {mode: device, device_slots: 2}\n"
    argv = _argv(tmp_path, _sim_topology(tmp_path, device, platform="cuda"), "encode")
    assert argv[argv.index("--sim-contention") + 1] == "device"
    assert argv[argv.index("--sim-device-slots") + 1] == "2"
    # A P (or D) twin of a PD-measured profile takes the PD's share rather than none.
    assert Contention(mode="cpu", cpu_share={"pd": 0.7}).flags("decode")["sim-cpu-share"] == 0.7


@pytest.mark.parametrize("block, message", [
    ("contention: {mode: gpu}", "contention.mode"),
    ("contention: {mode: cpu, cpu_share: {pd: 1.5}}", "contention.cpu_share.pd"),
    ("contention: {mode: device, device_slots: 0}", "contention.device_slots"),
    ("contention: {mode: cpu, typo: 1}", "contention.typo"),
])
def test_a_bad_contention_block_is_one_line_with_its_line_number(tmp_path, block, message):
    (tmp_path / "bad.yaml").write_text(OLD_PROFILE + block + "\n")
    with pytest.raises(EpdctlError) as caught:
        load_profile(tmp_path / "bad.yaml")
    assert f"bad.yaml:7: {message}" in caught.value.message


def test_calibrate_turns_measured_cpu_times_into_shares():
    clock = {"e": [0.0, 0.0], "pd": [0.0, 0.0]}  # (on a CPU, waiting for one) seconds, as schedstat counts them
    # calibrate's reference burns on the encoder's core took twice their CPU time: a busy host.
    burns = {"e": (0.01, 0.02), "pd": (0.01, 0.01)}
    meter = Meter({"http://e": ("encode", lambda: tuple(clock["e"])), "http://pd": ("pd", lambda: tuple(clock["pd"]))},
                  cores={"http://e": [0], "http://pd": [1]}, burn=lambda cores: burns["e" if cores == [0] else "pd"])
    for cpu, waiting, wall in ((0.006, 0.001, 0.010), (0.012, 0.002, 0.020)):  # the encoder: 60% CPU, 10% waiting
        before = meter.read("http://e")
        clock["e"][0] += cpu
        clock["e"][1] += waiting
        meter.add("http://e", before, wall)
    before = meter.read("http://pd")
    clock["pd"][0] += 0.050  # a PD whose API server works beside its engine: more CPU than wall, capped at 1
    meter.add("http://pd", before, 0.040)
    before = meter.read("http://e")
    clock["e"][0] += 0.030
    meter.add("http://e", before, 0.020, batch=4)  # 4 in flight: recorded for the reader, not in the share
    meter.time_cores()  # between the probe phases, as calibrate does (the fake readers are quiet at once)
    block = contention_block("cpu", meter, {"http://e": "encode-0", "http://pd": "pd-0"})
    # The encoder's work is 60% CPU, measured on cores that ran at half speed: its twin burns 30%
    # of each cost (on a host as busy, that takes the 60%) and sleeps the 40% that was no CPU work.
    assert block.mode == "cpu" and block.cpu_share == {"encode": 0.3, "pd": 1.0}
    assert block.sleep_share == {"encode": pytest.approx(0.4), "pd": 0.0}
    assert {p["instance"]: p["core_slowdown"] for p in block.probes if p["in_flight"] == 1} == {"encode-0": 2.0,
                                                                                                 "pd-0": 1.0}
    assert {p["instance"]: p["share"] for p in block.probes if p["in_flight"] == 1} == {"encode-0": 0.6, "pd-0": 1.25}
    assert [p["share"] for p in block.probes if p["in_flight"] == 4] == [1.5]
    assert block.host_cores and block.host_cores >= 1
    # Nothing readable: no contention rather than a made-up share.
    assert contention_block("cpu", Meter({}), {}).mode == "none"
    # Devices: one step at a time each, said to be assumed.
    device = contention_block("cuda", None, {})
    assert device.mode == "device" and device.device_slots == 1 and "assumed" in device.note
