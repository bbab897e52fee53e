"""Live evidence in `status`: each instance's own signals, read by the supervisor while serving, say
whether it did its part. A sabotaged topology (an encoder writing its EC where the consumer never
reads, a decoder that ignores the prefill's KV) answers every request and still shows `degraded`,
naming the instance and the missing transfer; the same topology unsabotaged shows `healthy`."""

from __future__ import annotations

import base64
import itertools
import json
import os

from conftest import assert_no_orphans, epdctl, http_post, wait_for, write_sim_topology

COUNTER = itertools.count()


def _ask(proxy: str, image: bool = True) -> None:
    content = [{"type": "text", "text": f"what is it? {next(COUNTER)}"}]
    if image:
        data = base64.b64encode(f"evidence image {next(COUNTER)} {os.getpid()}".encode()).decode()
        content.append({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}})
    status, body = http_post(proxy + "/v1/chat/completions",
                             {"model": "sim-model", "max_tokens": 2, "messages": [{"role": "user", "content": content}]})
    assert status == 200, body  # a sabotaged topology still answers: that is why it needs evidence


def _status(name: str) -> tuple[int, dict]:
    result = epdctl("status", name, "--json")
    return result.returncode, json.loads(result.stdout)


def _evidence(report: dict) -> dict[str, dict]:
    return {e["name"]: e["evidence"] for e in report["instances"]}


def _until(name: str, proxy: str, done, what: str, image: bool = True) -> dict:
    """Send requests until status says `done` (the supervisor looks every 2 s)."""
    seen: dict = {}

    def check():
        _ask(proxy, image)
        seen["report"] = _status(name)[1]
        return done(seen["report"])
    wait_for(check, 60, what)
    return seen["report"]


def _events(state_dir, name: str) -> list[dict]:
    """The topology's events.jsonl, as `epdctl events` reads it."""
    return [json.loads(line) for line in (state_dir / name / "events.jsonl").read_text().splitlines()]


def test_an_unsabotaged_e_pd_is_healthy_and_shows_what_each_role_did(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="ev")
    proxy = f"http://127.0.0.1:{ports['proxy']}"
    epdctl("up", "-d", str(topology), check=0)
    try:
        report = _until("ev", proxy, lambda r: (_evidence(r)["pd-0"].get("counts") or {}).get("ec_loaded", 0) >= 3,
                        "pd-0 to show 3 EC loads")
        evidence = _evidence(report)
        assert report["health"] == "healthy" and report["reasons"] == [], report
        assert evidence["encode-0"]["verdict"] == "ok" and evidence["encode-0"]["counts"]["encoded"] >= 3, evidence
        assert evidence["pd-0"]["verdict"] == "ok", evidence
        assert evidence["pd-0"]["counts"]["encoded_locally"] == 0, evidence
        code, _ = _status("ev")
        assert code == 0
        text = epdctl("status", "ev", check=0).stdout
        line = next(line for line in text.splitlines() if line.startswith("evidence:"))
        assert "encode-0 encoded" in line and "pd-0 loaded" in line and "encoded 0 itself" in line, text
        events = _events(state_dir, "ev")
        assert any(e["process"] == "pd-0" and e["event"] == "healthy" for e in events), events
        assert not [e for e in events if e["process"] == "topology"], "no health change, no event"
    finally:
        epdctl("down", "ev", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_an_encoder_writing_where_the_consumer_never_reads_degrades_the_topology(tmp_path, state_dir):
    elsewhere = tmp_path / "elsewhere"
    sabotage = {"encode-0": {"ec-transfer-config": json.dumps({
        "ec_connector": "ECExampleConnector", "ec_role": "ec_producer",
        "ec_connector_extra_config": {"shared_storage_path": str(elsewhere)}})}}
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="sab", instance_args=sabotage)
    proxy = f"http://127.0.0.1:{ports['proxy']}"
    epdctl("up", "-d", str(topology), check=0)
    try:
        report = _until("sab", proxy, lambda r: r["health"] == "degraded", "the sabotaged topology to show degraded")
        assert report["state"] == "running", report  # every process is healthy: only the evidence says otherwise
        [reason] = report["reasons"]
        assert reason.startswith("pd-0 encoded ") and "itself" in reason and "EC did not reach it" in reason, reason
        evidence = _evidence(report)
        assert evidence["pd-0"]["verdict"] == "degraded" and evidence["pd-0"]["recent"]["encoded_locally"] >= 1
        assert evidence["pd-0"]["counts"]["ec_loaded"] == 0
        assert evidence["encode-0"]["verdict"] == "ok" and evidence["encode-0"]["counts"]["encoded"] >= 1
        result = epdctl("status", "sab")
        assert result.returncode == 1, result.stdout
        assert "why: pd-0 encoded" in result.stdout and "running, degraded" in result.stdout, result.stdout
        changes = [e for e in _events(state_dir, "sab") if e["process"] == "topology"]
        assert changes and changes[0]["event"] == "degraded" and changes[0]["reason"].startswith("pd-0 encoded"), changes
        shown = epdctl("events", "sab", check=0).stdout
        assert "topology   degraded   reason=pd-0 encoded" in shown, shown
    finally:
        epdctl("down", "sab", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_a_decoder_that_ignores_the_prefills_kv_degrades_the_topology(tmp_path, state_dir):
    # decode-0 is told it only produces KV: it takes none and computes each prefill again.
    sabotage = {"decode-0": {"kv-transfer-config": json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_producer"})}}
    topology, ports = write_sim_topology(tmp_path, "1p1d", name="kvsab", instance_args=sabotage)
    proxy = f"http://127.0.0.1:{ports['proxy']}"
    epdctl("up", "-d", str(topology), check=0)
    try:
        report = _until("kvsab", proxy, lambda r: r["health"] == "degraded", "the decoder's recompute to show",
                        image=False)
        [reason] = report["reasons"]
        assert reason.startswith("decode-0 computed ") and "took no KV from the prefill instances" in reason, reason
        evidence = _evidence(report)
        assert evidence["decode-0"]["counts"]["kv_remote"] == 0 and evidence["decode-0"]["recent"]["kv_computed"] >= 1
        assert evidence["prefill-0"]["verdict"] == "ok" and evidence["prefill-0"]["counts"]["prefilled"] >= 1
        assert _status("kvsab")[0] == 1
    finally:
        epdctl("down", "kvsab", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_an_unsabotaged_p_d_is_healthy(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1p1d", name="kvok")
    proxy = f"http://127.0.0.1:{ports['proxy']}"
    epdctl("up", "-d", str(topology), check=0)
    try:
        report = _until("kvok", proxy, lambda r: (_evidence(r)["decode-0"].get("counts") or {}).get("kv_remote", 0) >= 2,
                        "decode-0 to show 2 remote prefills", image=False)
        assert report["health"] == "healthy", report
        assert _evidence(report)["decode-0"]["counts"]["kv_computed"] == 0
    finally:
        epdctl("down", "kvok", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))
