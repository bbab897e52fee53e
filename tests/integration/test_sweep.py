"""`epdctl sweep`: split parsing and layout (pure), then real sweeps over sim topologies."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PORT_RANGE, assert_no_orphans, epdctl, metrics, signal_when

from epdctl.config.load import parse_topology
from epdctl.errors import EpdctlError
from epdctl.sweep import NoFit, derive, layout, parse_split


def _block(count: int) -> int:
    """The first of `count` consecutive free ports (sweeps lay splits out on consecutive ports)."""
    from epdctl.ports import port_is_free

    while True:
        start = random.randrange(PORT_RANGE[0], PORT_RANGE[1] - count)
        if all(port_is_free(p) for p in range(start, start + count)):
            return start


def base_file(tmp: Path, *, encode_ms: int = 60, budget: float = 0.45, extra: str = "",
              ttft_ms: int = 5, contention: str = "") -> tuple[Path, int]:
    start = _block(12)
    text = f"""name: base
model: sim-model
engine: sim
platform: cuda
defaults: {{args: {{sim-ttft-ms: {ttft_ms}, sim-tpot-ms: 1, sim-encode-ms: {encode_ms}{contention}}}}}
ec_transfer: {{connector: ECExampleConnector, shared_storage_path: {tmp / 'ec'}}}
kv_transfer: {{connector: NixlConnector, side_channel_port_base: {start + 20}}}
encode: [{{devices: [0], port: {start}, gpu_memory_utilization: {budget}}}]
pd: [{{devices: [1], port: {start + 1}}}]
proxy: {{port: {start + 10}}}
health: {{timeout_s: 30, interval_s: 0.05}}
{extra}"""
    path = tmp / "base.yaml"
    path.write_text(text)
    return path, start


# ------------------------------------------------------------ pure


def test_parse_split_accepts_the_notations_and_refuses_the_rest():
    assert parse_split("2e1p1d") == {"encode": 2, "prefill": 1, "decode": 1}
    assert parse_split("1e2pd") == {"encode": 1, "pd": 2}
    assert parse_split("1p1d") == {"prefill": 1, "decode": 1}
    assert parse_split("pd") == {"pd": 1}
    for bad in ("", "2e", "0e1pd", "1e0pd", "1e1p0d", "e1pd", "1x1pd", "1e1pd;rm"):
        with pytest.raises(EpdctlError):
            parse_split(bad)


def test_layout_gives_each_instance_its_devices_and_shares_encoders_only_within_budget(tmp_path):
    path, start = base_file(tmp_path, budget=0.45)
    base = parse_topology(path.read_text(), str(path))
    two = layout(base, parse_split("2e1pd"), [0, 1, 2, 3])
    assert [i["devices"] for i in two["pd"]] == [[0]]
    assert [i["devices"] for i in two["encode"]] == [[1], [2]]  # spread while devices are free
    # 4 encoders + P + D on 4 devices: two devices left, two encoders of 0.45 on each.
    packed = layout(base, parse_split("4e1p1d"), [0, 1, 2, 3])
    assert [i["devices"] for i in packed["encode"]] == [[2], [2], [3], [3]]
    ports = [i["port"] for role in packed.values() for i in role]
    assert len(set(ports)) == len(ports) and start + 10 not in ports  # never the proxy's
    with pytest.raises(NoFit, match="do not fit"):
        layout(base, parse_split("5e1p1d"), [0, 1, 2, 3])
    with pytest.raises(NoFit, match="needs more than"):
        layout(base, parse_split("1e2p3d"), [0, 1, 2, 3])
    data = derive(base, "2e1pd", [0, 1, 2, 3])
    assert data["name"] == "base-2e1pd" and data["engine"] == "sim" and data["ec_transfer"]
    # Each derived split is a valid topology of its own.
    import yaml

    parse_topology(yaml.safe_dump(data), "derived.yaml")


def test_a_port_pinned_on_the_template_instance_is_not_copied_into_every_split_instance(tmp_path):
    # ECMooncakeConnector consumers may pin their control port (ec_port); a sweep that copied it
    # into each of 2 PDs gave them one port (a clash that validate caught only as an error).
    path = tmp_path / "moon.yaml"
    path.write_text("""name: moon
model: sim-model
engine: sim
platform: cuda
ec_transfer: {connector: ECMooncakeConnector}
encode: [{devices: [0], port: 19534}]
pd: [{devices: [1], port: 19535, ec_port: 5600}]
proxy: {port: 19540}
""")
    import yaml

    from epdctl.plan import build_plan

    base = parse_topology(path.read_text(), str(path))
    data = derive(base, "1e2pd", [0, 1, 2])
    assert all("ec_port" not in instance for instance in data["pd"])
    plan = build_plan(parse_topology(yaml.safe_dump(data), "derived.yaml"))
    ports = [port for spec in plan.processes for port in spec.ports()]
    assert len(ports) == len(set(ports)) and sum(1 for s in plan.instances if s.ec_ports) == 2


# ------------------------------------------------------------ real sweeps


def test_sweep_ranks_more_encoders_first_when_encoding_is_the_bottleneck(tmp_path, state_dir):
    path, start = base_file(tmp_path, encode_ms=60)
    result = epdctl("sweep", str(path), "--splits", "1e1pd,2e1pd,pd", "--devices", "0,1,2,3",
                    "--num-prompts", "24", "--concurrency", "8", "--images-per-request", "2", "--max-tokens", "4",
                    "--json", timeout=240)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    order = [s["split"] for s in summary["splits"]]
    assert all(s["status"] == "ok" for s in summary["splits"]), summary
    assert order.index("2e1pd") < order.index("1e1pd"), order
    assert summary["best"] in ("2e1pd", "pd")
    goodput = {s["split"]: s["goodput"] for s in summary["splits"]}
    assert goodput["2e1pd"] > 1.3 * goodput["1e1pd"], goodput
    for entry in summary["splits"]:
        assert entry["report"]["completed"] == 24 and entry["report"]["ttft_ms"]["p50"] > 0
    assert_no_orphans(str(state_dir), list(range(start, start + 12)))


def test_told_they_contend_two_encoders_sharing_a_device_rank_below_two_on_devices_of_their_own(tmp_path, state_dir):
    # On devices 0-2, 2e2pd gives the PDs 0 and 1, so its two encoders (0.45 each) share device 2;
    # 2e1pd gives them 1 and 2. Encoding is the bottleneck; with device contention the shared
    # device encodes half as fast, so the split that shares ranks below (issue #26).
    path, start = base_file(tmp_path, encode_ms=60, contention=", sim-contention: device")
    result = epdctl("sweep", str(path), "--splits", "2e2pd,2e1pd", "--devices", "0,1,2",
                    "--num-prompts", "24", "--concurrency", "8", "--images-per-request", "2", "--max-tokens", "4",
                    "--json", timeout=240)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert all(s["status"] == "ok" for s in summary["splits"]), summary
    assert [s["split"] for s in summary["splits"]] == ["2e1pd", "2e2pd"], summary["splits"]
    assert summary["best"] == "2e1pd"
    assert_no_orphans(str(state_dir), list(range(start, start + 12)))


def test_sweep_skips_what_does_not_fit_saves_and_writes_a_ready_best_yaml(tmp_path, state_dir):
    path, start = base_file(tmp_path, encode_ms=5, budget=0.9)
    out = tmp_path / "results"
    result = epdctl("sweep", str(path), "--splits", "1e1pd,3e1p1d", "--devices", "0,1,2,3", "--num-prompts", "6",
                    "--concurrency", "2", "--max-tokens", "3", "--slo-ttft-ms", "5000", "--save", str(out),
                    timeout=180)
    assert result.returncode == 0, result.stderr
    assert "3e1p1d" in result.stdout and "skipped" in result.stdout and "do not fit" in result.stdout
    assert "best: 1e1pd" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    skipped = next(s for s in summary["splits"] if s["split"] == "3e1p1d")
    assert skipped["status"] == "skipped" and "memory budget of 0.9" in skipped["reason"]
    assert summary["best"] == "1e1pd" and summary["splits"][0]["report"]["slo"]["ttft_ms"] == 5000
    assert list(out.glob("1e1pd-*.json"))
    assert (out / "sweep.png").stat().st_size > 0
    best = out / "best.yaml"
    assert epdctl("validate", str(best)).returncode == 0
    assert_no_orphans(str(state_dir), list(range(start, start + 12)))


def test_a_failed_split_is_recorded_and_the_sweep_goes_on(tmp_path, state_dir):
    path, start = base_file(tmp_path, encode_ms=5,
                            extra="restart: no\n")
    text = path.read_text().replace("pd: [{devices: [1]", "pd: [{devices: [1], args: {sim-exit-after-s: 0}")
    path.write_text(text)
    result = epdctl("sweep", str(path), "--splits", "1e1pd,1p1d", "--devices", "0,1,2,3", "--num-prompts", "4",
                    "--max-tokens", "2", "--json", timeout=180)
    summary = json.loads(result.stdout)
    assert result.returncode == 1  # no split could be measured
    assert [s["status"] for s in summary["splits"]] == ["failed", "failed"]
    assert "during start-up" in summary["splits"][0]["reason"] or "exited" in summary["splits"][0]["reason"]
    assert summary["best"] is None
    assert_no_orphans(str(state_dir), list(range(start, start + 12)))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_splits_bench_stops_it_and_prints_the_partial_table(tmp_path, state_dir, sig):
    # Answers that never come in time: whenever the signal lands, the bench is in progress.
    path, start = base_file(tmp_path, encode_ms=5, ttft_ms=600_000)
    proc = subprocess.Popen([sys.executable, "-m", "epdctl", "sweep", str(path), "--splits", "1e1pd,2e1pd",
                             "--devices", "0,1,2,3", "--num-prompts", "50", "--concurrency", "2", "--max-tokens", "2",
                             "--images-per-request", "0"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proxy = f"http://127.0.0.1:{start + 10}"
    try:
        out, err = signal_when(proc, lambda: _in_flight(proxy), sig, "the bench's first request at the proxy")
    finally:
        epdctl("down", "base-1e1pd", "-t", "1")  # nothing to stop when the sweep went down itself
    name = signal.Signals(sig).name
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], err
    assert f"sweep interrupted by {name}; 0 of 2 split(s) measured" in err
    assert "Traceback" not in err and "Exception" not in err, err
    # The partial table: the split that was stopped, and none after it.
    assert "1e1pd" in out and f"interrupted by {name}" in out and "2e1pd" not in out, out
    assert not (state_dir / "base-1e1pd").exists()
    assert_no_orphans(str(state_dir), list(range(start, start + 12)))


def _in_flight(proxy: str) -> bool:
    try:
        return any(value > 0 for key, value in metrics(proxy).items() if key.startswith("epdctl_proxy_in_flight"))
    except OSError:
        return False


def test_a_base_files_autoscale_holds_for_the_splits_roles_and_bounds_their_counts(tmp_path):
    path, _ = base_file(tmp_path, extra="autoscale: {encode: {min: 1, max: 2, target_inflight: 1}}")
    base = parse_topology(path.read_text(), str(path))
    one = derive(base, "1e1pd", [0, 1, 2, 3])
    assert one["autoscale"]["encode"]["max"] == 2  # the split starts at 1 encoder and may grow to 2
    assert "autoscale" not in derive(base, "pd", [0, 1, 2, 3])  # no encoders: nothing to autoscale
    with pytest.raises(NoFit, match="encode=3 is outside the base file's autoscale bounds 1..2"):
        derive(base, "3e1pd", [0, 1, 2, 3])
    import yaml

    parse_topology(yaml.safe_dump(one), "derived.yaml")  # still a valid topology


def test_sweep_of_an_autoscaled_base_reports_each_splits_pool_over_the_run(tmp_path, state_dir):
    path, start = base_file(tmp_path, encode_ms=150, budget=0.3, extra=(
        "autoscale: {encode: {min: 1, max: 2, target_inflight: 1, scale_up_after_s: 1, scale_down_after_s: 600}}"))
    result = epdctl("sweep", str(path), "--splits", "1e1pd,pd", "--devices", "0,1,2,3", "--num-prompts", "80",
                    "--concurrency", "6", "--images-per-request", "1", "--max-tokens", "2", "--json", timeout=600)
    assert result.returncode == 0, result.stderr
    splits = {s["split"]: s for s in json.loads(result.stdout)["splits"]}
    assert splits["1e1pd"]["status"] == "ok" and splits["pd"]["status"] == "ok", splits
    pool = splits["1e1pd"]["report"]["pool"]
    assert pool[0]["sizes"]["encode"] == 1 and pool[-1]["sizes"]["encode"] == 2, pool  # the twin autoscaled
    assert len(splits["pd"]["report"].get("pool", [])) <= 1  # a fixed pool: nothing changed
    assert_no_orphans(str(state_dir), list(range(start, start + 12)))
