"""`epdctl bench` and `epdctl smoke` against real sim topologies, including a miswired one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from conftest import assert_no_orphans, epdctl, signal_and_wait, write_sim_topology

LATENCY_KEYS = {"mean", "p50", "p90", "p99"}


@pytest.fixture
def topology_up(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="bench",
                                         timings="sim-ttft-ms: 20, sim-tpot-ms: 2, sim-encode-ms: 5")
    epdctl("up", "-d", str(topology), check=0)
    yield topology, ports
    epdctl("down", "bench", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_bench_json_by_name_has_the_contract_keys(topology_up, tmp_path):
    result = epdctl("bench", "bench", "--num-prompts", "12", "--concurrency", "4", "--max-tokens", "8",
                    "--images-per-request", "2", "--image-size", "32", "--slo-ttft-ms", "10000", "--json", check=0)
    report = json.loads(result.stdout)
    assert report["completed"] == 12 and report["failed"] == 0
    for key in ("duration_s", "request_throughput", "output_token_throughput"):
        assert report[key] > 0
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert LATENCY_KEYS <= set(report[key]), key
    # The sim's model: TTFT >= prefill (20 ms); TPOT >= 2 ms; 8 tokens each.
    assert report["ttft_ms"]["p50"] >= 20 and report["tpot_ms"]["p50"] >= 2
    assert report["total_output_tokens"] == 12 * 8
    assert report["goodput"] == pytest.approx(report["request_throughput"])


def test_bench_url_save_and_compare(topology_up, tmp_path):
    _, ports = topology_up
    url = f"http://127.0.0.1:{ports['proxy']}"
    saved = tmp_path / "results"
    for label, images in (("text", "0"), ("image", "1")):
        epdctl("bench", "--url", url, "--num-prompts", "8", "--concurrency", "2", "--max-tokens", "4",
               "--images-per-request", images, "--image-size", "16", "--warmup", "1", "--repeat-ratio", "0.5",
               "--save", str(saved), "--label", label, check=0)
    files = sorted(p.name for p in saved.iterdir())
    assert len([f for f in files if f.endswith(".json")]) == 2
    assert len([f for f in files if f.endswith(".png")]) == 2
    reports = sorted(saved.glob("*.json"))
    assert json.loads(reports[0].read_text())["completed"] == 8
    table = epdctl("bench", "--compare", *map(str, reports), check=0).stdout
    assert "requests/s +" in table and "x)" in table


def test_bench_with_poisson_rate_and_jsonl_dataset(topology_up, tmp_path):
    _, ports = topology_up
    dataset = tmp_path / "requests.jsonl"
    dataset.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 3})
                                 for i in range(3)) + "\n")
    result = epdctl("bench", "--url", f"http://127.0.0.1:{ports['proxy']}", "--dataset", str(dataset),
                    "--num-prompts", "6", "--request-rate", "50", "--json", check=0)
    report = json.loads(result.stdout)
    assert report["completed"] == 6 and report["total_output_tokens"] == 18


def test_bench_usage_errors():
    assert epdctl("bench").returncode == 2
    assert epdctl("bench", "x", "--concurrency", "2", "--request-rate", "3").returncode == 2
    result = epdctl("bench", "no-such-topology")
    assert result.returncode == 2 and "no topology named 'no-such-topology' is up" in result.stderr
    result = epdctl("bench", "--url", "http://127.0.0.1:1", "--num-prompts", "1")
    assert result.returncode == 1 and "cannot reach http://127.0.0.1:1" in result.stderr


@pytest.mark.parametrize("kind", ["1e1pd", "1e1p1d", "agg"])
def test_smoke_passes_and_leaves_nothing(tmp_path, state_dir, kind):
    topology, ports = write_sim_topology(tmp_path, kind, name=f"smoke-{kind}")
    junit = tmp_path / "junit.xml"
    result = epdctl("smoke", str(topology), "--junit", str(junit), check=0)
    assert "all" in result.stdout and "checks passed" in result.stdout
    assert "wired" not in result.stdout  # a hint belongs on failing lines only
    suite = ET.parse(junit).getroot()
    assert suite.get("failures") == "0" and int(suite.get("tests")) >= 6
    assert_no_orphans(str(state_dir), list(ports.values()))
    assert not (state_dir / f"smoke-{kind}").exists()


def test_smoke_keep_up_then_reuse(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1e1p1d", name="kept")
    epdctl("smoke", str(topology), "--keep-up", check=0)
    assert json.loads(epdctl("status", "kept", "--json").stdout)["state"] == "running"
    again = epdctl("smoke", str(topology), check=0)  # uses the running topology, and leaves it running
    assert "using the running kept" in again.stdout
    epdctl("down", "kept", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_smoke_fails_a_miswired_topology_clearly(tmp_path, state_dir):
    """The encoder writes its EC to another folder than the consumer reads: answers still come, but smoke fails."""
    elsewhere = tmp_path / "elsewhere"
    ec_config = {"ec_connector": "ECExampleConnector", "ec_role": "ec_producer",
                 "ec_connector_extra_config": {"shared_storage_path": str(elsewhere)}}
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="miswired",
                                         instance_args={"encode-0": {"ec-transfer-config": ec_config}})
    junit = tmp_path / "junit.xml"
    result = epdctl("smoke", str(topology), "--junit", str(junit))
    assert result.returncode == 1
    assert "FAIL  consumers loaded the EC: pd-0 loaded 0 EC files and missed 4" in result.stdout
    assert f"encoders wrote 4 to {elsewhere}" in result.stderr
    assert "Traceback" not in result.stderr
    assert ET.parse(junit).getroot().get("failures") == "1"
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_smoke_failure_summary_has_one_line_per_failed_check(tmp_path, state_dir):
    """EC written elsewhere and a decoder that is no KV consumer: two failures, two lines, each with its hint."""
    elsewhere = tmp_path / "elsewhere"
    ec_config = {"ec_connector": "ECExampleConnector", "ec_role": "ec_producer",
                 "ec_connector_extra_config": {"shared_storage_path": str(elsewhere)}}
    kv_config = {"kv_connector": "NixlConnector", "kv_role": "kv_producer"}
    topology, ports = write_sim_topology(tmp_path, "1e1p1d", name="twofail", instance_args={
        "encode-0": {"ec-transfer-config": ec_config}, "decode-0": {"kv-transfer-config": kv_config}})
    result = epdctl("smoke", str(topology))
    assert result.returncode == 1, result.stderr
    lines = result.stderr[result.stderr.index("epdctl smoke: twofail:"):].strip().splitlines()
    assert lines[0].startswith("epdctl smoke: twofail: 2 of ") and lines[0].endswith(" checks failed:"), lines
    assert len(lines) == 3 and all(line.startswith("FAIL  ") for line in lines[1:]), lines
    assert lines[1].startswith("FAIL  consumers loaded the EC: prefill-0 loaded 0 EC files")
    assert lines[2] == ("FAIL  decode used the remote prefill: decode-0 served 0 remote prefills of 4 and "
                        "recomputed 4 (is kv_transfer wired to both?)")
    assert lines[2] in result.stdout.splitlines()
    assert_no_orphans(str(state_dir), list(ports.values()))


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_smoke_brings_down_what_it_started(tmp_path, state_dir, sig, code):
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="stopped",
                                         timings="sim-ttft-ms: 60000, sim-tpot-ms: 1, sim-encode-ms: 5")
    proc = subprocess.Popen([sys.executable, "-m", "epdctl", "smoke", str(topology)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not (state_dir / "stopped" / "state.json").exists() or \
            json.loads((state_dir / "stopped" / "state.json").read_text()).get("phase") != "running":
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError("smoke did not bring the topology up")
        time.sleep(0.1)
    time.sleep(1)  # into the first golden request, which the sim holds for 60 s
    out = signal_and_wait(proc, sig)
    assert proc.returncode == code, out
    assert "stopped is down" in out
    assert_no_orphans(str(state_dir), list(ports.values()))
