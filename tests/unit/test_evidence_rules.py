"""The evidence rules (epdctl/evidence.py) and the log counter (run/witness.py) on synthetic numbers:
what each role must show, what degrades a topology, and what stays unknown instead of a guess."""

from __future__ import annotations

import os

import pytest

from epdctl.evidence import (SIM, VLLM_DEBUG, VLLM_EC_LOADED, VLLM_ENCODER_RAN, VLLM_ITERATIONS, VLLM_LOCAL_KV_TOKENS,
                             VLLM_REMOTE_KV_TOKENS, VLLM_REQUESTS, counts, parse_metrics, parts, recent, verdict)
from epdctl.run.witness import MAX_LINE, LogCount


def _part(kind: str, name: str, engine: str = "sim"):
    roles = {"1e1pd": [("encode-0", "encode"), ("pd-0", "pd")],
             "1e1p1d": [("encode-0", "encode"), ("prefill-0", "prefill"), ("decode-0", "decode")],
             "agg": [("pd-0", "pd")]}[kind]
    return {p.name: p for p in parts(roles, engine)}[name]


def test_what_each_role_must_prove_follows_the_topology():
    e_pd = {p.name: p for p in parts([("encode-0", "encode"), ("pd-0", "pd")], "sim")}
    assert e_pd["pd-0"].consumer and not e_pd["pd-0"].kv_consumer
    assert not e_pd["encode-0"].consumer
    epd = {p.name: p for p in parts([("encode-0", "encode"), ("prefill-0", "prefill"), ("decode-0", "decode")], "vllm")}
    assert epd["prefill-0"].consumer and not epd["decode-0"].consumer and epd["decode-0"].kv_consumer
    assert epd["prefill-0"].watches_log and not epd["decode-0"].watches_log
    alone = parts([("pd-0", "pd")], "sim")[0]
    assert not alone.consumer and not alone.kv_consumer
    assert verdict(alone, counts(alone, {}, None), {}) == ("ok", "nothing to prove for its role", None)


def test_a_consumer_that_encodes_itself_beside_encoders_is_degraded():
    part = _part("1e1pd", "pd-0")
    then = counts(part, {SIM["loaded"]: 4, SIM["encoded"]: 0}, None)
    now = counts(part, {SIM["loaded"]: 4, SIM["encoded"]: 3}, None)
    said, text, reason = verdict(part, now, recent(now, then))
    assert said == "degraded"
    assert reason.startswith("pd-0 encoded 3 media item(s) itself in the last 30s")
    assert text == "loaded 4 EC item(s), encoded 3 itself"
    # The same counters with the local encodes older than the window: ok again.
    assert verdict(part, now, recent(now, now))[0] == "ok"


def test_a_decoder_that_computes_prefills_beside_prefill_instances_is_degraded():
    sim = _part("1e1p1d", "decode-0")
    now = counts(sim, {SIM["remote_prefills"]: 5, SIM["prefills"]: 1}, None)
    then = counts(sim, {SIM["remote_prefills"]: 2, SIM["prefills"]: 0}, None)
    said, _, reason = verdict(sim, now, recent(now, then))
    assert said == "degraded" and reason.startswith("decode-0 computed 1 prefill(s) itself")
    # vLLM computes the last partial block itself even with the KV taken: only KV taken never is a fault.
    real = _part("1e1p1d", "decode-0", engine="vllm")
    took = counts(real, {VLLM_REMOTE_KV_TOKENS: 480, VLLM_LOCAL_KV_TOKENS: 12}, None)
    assert verdict(real, took, recent(took, counts(real, {}, None)))[0] == "ok"
    never = counts(real, {VLLM_REMOTE_KV_TOKENS: 0, VLLM_LOCAL_KV_TOKENS: 500}, None)
    said, _, reason = verdict(real, never, recent(never, counts(real, {}, None)))
    assert said == "degraded" and "500 prompt token(s)" in reason


def test_what_the_signals_cannot_say_is_unknown_not_a_guess():
    encoder = _part("1e1pd", "encode-0")
    said, text, reason = verdict(encoder, counts(encoder, None, None), {})
    assert said == "unknown" and "did not answer /metrics" in text and reason is None
    # A vLLM consumer without DEBUG logs or iteration details: what it loaded cannot be known.
    consumer = _part("1e1p1d", "prefill-0", engine="vllm")
    quiet = counts(consumer, {VLLM_REQUESTS: 3}, {VLLM_EC_LOADED: 0, VLLM_ENCODER_RAN: 0, VLLM_DEBUG: 0, VLLM_ITERATIONS: 0})
    assert quiet["ec_loaded"] is None and quiet["encoded_locally"] is None and quiet["prefilled"] == 3
    said, text, _ = verdict(consumer, quiet, recent(quiet, quiet))
    assert said == "unknown" and "VLLM_LOGGING_LEVEL=DEBUG" in text
    loud = counts(consumer, {VLLM_REQUESTS: 3}, {VLLM_EC_LOADED: 2, VLLM_ENCODER_RAN: 1, VLLM_DEBUG: 9, VLLM_ITERATIONS: 4})
    assert loud["ec_loaded"] == 2 and loud["encoded_locally"] == 1
    assert verdict(consumer, loud, recent(loud, {**loud, "encoded_locally": 0.0}))[0] == "degraded"


def test_recent_is_what_grew_and_never_negative():
    assert recent({"a": 5.0, "b": None, "c": 2.0}, {"a": 3.0, "b": 1.0, "c": 4.0}) == {"a": 2.0, "b": None, "c": 0.0}
    assert recent({"a": 1.0}, {}) == {"a": None}


def test_parse_metrics_sums_and_keys_by_label():
    text = ('# TYPE vllm:prompt_tokens_by_source_total counter\n'
            'vllm:prompt_tokens_by_source_total{model_name="m",source="local_compute"} 7\n'
            'vllm:prompt_tokens_by_source_total{model_name="m",source="external_kv_transfer"} 40\n')
    got = parse_metrics(text)
    assert got[VLLM_LOCAL_KV_TOKENS] == 7 and got[VLLM_REMOTE_KV_TOKENS] == 40
    assert got["vllm:prompt_tokens_by_source_total"] == 47
    assert not any("model_name" in key for key in got)


def test_the_log_counter_reads_on_counts_whole_lines_and_survives_a_rotation(tmp_path):
    log = tmp_path / "prefill-0.log"
    log.write_bytes(b"x DEBUG " + VLLM_EC_LOADED.encode() + b" abc\nhalf a line: " + VLLM_EC_LOADED.encode()[:10])
    count = LogCount(log)
    assert count.read_on()[VLLM_EC_LOADED] == 1
    with open(log, "ab") as handle:  # the rest of the half line arrives
        handle.write(VLLM_EC_LOADED.encode()[10:] + b"\n")
    assert count.read_on()[VLLM_EC_LOADED] == 2
    assert count.read_on()[VLLM_EC_LOADED] == 2  # nothing new: nothing counted twice
    log.write_bytes(VLLM_EC_LOADED.encode() + b"\n")  # rotated: a new, shorter file
    assert count.read_on()[VLLM_EC_LOADED] == 3
    assert count.read_on()[VLLM_DEBUG] == 1


def test_the_log_counter_keeps_a_bounded_line_and_follows_no_symlink(tmp_path):
    log = tmp_path / "pd-0.log"
    log.write_bytes(b"y" * (MAX_LINE * 3))  # one line that never ends
    count = LogCount(log)
    count.read_on()
    assert len(count.partial) == MAX_LINE
    target = tmp_path / "secret"
    target.write_text(VLLM_EC_LOADED + "\n")
    link = tmp_path / "link.log"
    os.symlink(target, link)
    assert LogCount(link).read_on() is None
    assert LogCount(tmp_path / "absent.log").read_on() is None


@pytest.mark.parametrize("kind,name,keys", [
    ("1e1pd", "encode-0", {"encoded"}),
    ("1e1pd", "pd-0", {"ec_loaded", "encoded_locally"}),
    ("1e1p1d", "prefill-0", {"ec_loaded", "encoded_locally", "prefilled"}),
    ("1e1p1d", "decode-0", {"kv_remote", "kv_computed"}),
])
def test_each_role_reports_its_counters(kind, name, keys):
    assert set(counts(_part(kind, name), {}, None)) == keys


class _Pages:
    """The Runtime seam's fetch, answering /metrics from a dict the test sets."""

    def __init__(self):
        self.pages: dict[str, str] = {}

    def fetch(self, url: str, timeout: float = 1.0):
        return self.pages.get(url)


def test_the_witness_judges_a_window_and_writes_an_event_when_health_changes(tmp_path):
    import json
    from types import SimpleNamespace

    from epdctl.plan import ProcessSpec
    from epdctl.run.child import Child
    from epdctl.run.states import ProcessState
    from epdctl.run.witness import Witness

    def child(name, role, port):
        spec = ProcessSpec(name=name, argv=("sim",), env={}, host="127.0.0.1", port=port, role=role)
        made = Child(spec, tmp_path / f"{name}.log")
        made.state, made.pid, made.started_at = ProcessState.HEALTHY, 4000 + port, 0.0
        return made

    runtime = _Pages()
    sup = SimpleNamespace(children=[child("encode-0", "encode", 1), child("pd-0", "pd", 2), child("proxy", "proxy", 3)],
                          plan=SimpleNamespace(engine="sim"), runtime=runtime,
                          state_dir=SimpleNamespace(path=tmp_path))
    witness = Witness(sup)

    def look(now: float, encoded_by_pd: int) -> bool:
        runtime.pages = {"http://127.0.0.1:1/metrics": f"{SIM['encoded']} 3\n",
                         "http://127.0.0.1:2/metrics": f"{SIM['loaded']} 3\n{SIM['encoded']} {encoded_by_pd}\n"}
        assert witness.tend(now) is False  # the look starts: its reads run on the pool
        for *_, future in witness.batch:
            future.result()
        changed = witness.tend(now)
        witness.topology_health(phase_serves=True)
        return changed

    def events():
        path = tmp_path / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    try:
        assert look(1.0, 0)
        assert set(witness.record["instances"]) == {"encode-0", "pd-0"}  # the proxy has nothing to prove
        assert witness.record["reasons"] == [] and events() == []  # healthy from the start: no event
        assert look(3.0, 2)
        [reason] = witness.record["reasons"]
        assert reason.startswith("pd-0 encoded 2 media item(s) itself")
        assert [(e["process"], e["event"]) for e in events()] == [("topology", "degraded")]
        look(5.0, 2)
        assert witness.record["reasons"]  # still within the window: still degraded
        look(40.0, 2)  # the window has passed without a local encode
        assert witness.record["reasons"] == []
        assert [(e["process"], e["event"]) for e in events()] == [("topology", "degraded"), ("topology", "healthy")]
        sup.children[1].pid = 9999  # a restarted pd: its counters start again, its readings too
        look(42.0, 0)
        assert witness.record["instances"]["pd-0"]["recent"]["encoded_locally"] == 0
    finally:
        witness.close()


def test_the_bench_pool_line_shows_each_change_and_only_when_there_was_one():
    from epdctl.bench.pool import describe

    assert describe([]) is None
    assert describe([{"t_s": 0.0, "sizes": {"encode": 1, "decode": 1}}]) is None  # a fixed pool: no line
    samples = [{"t_s": 0.0, "sizes": {"encode": 1, "decode": 1}}, {"t_s": 6.1, "sizes": {"encode": 2, "decode": 1}},
               {"t_s": 12.0, "sizes": {"encode": 3, "decode": 1}}]
    assert describe(samples) == "pool over the run: encode 1 (0s) -> 2 (6.1s) -> 3 (12s); decode 1"


class _Answer:
    def __init__(self, body: bytes, status: int = 200):
        self.status = status
        self.content = self
        self._body = body

    async def read(self, limit: int) -> bytes:
        return self._body[:limit]

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False


class _Session:
    """aiohttp.ClientSession's get, answering what a (possibly hostile) --url target would."""

    def __init__(self, body: bytes, status: int = 200):
        self.answer = _Answer(body, status)

    def get(self, url, timeout=None):
        return self.answer


@pytest.mark.parametrize("body", [
    b"x" * (17 * 1024 * 1024),  # larger than any proxy of ours writes: not read on
    b'{"object": "list"}',  # not Prometheus text
    b'epdctl_proxy_pool_instances{role="encode" 1\n',  # malformed
    b"\xff\xfe\x00garbage\n",
    b"# TYPE other gauge\nother 1\n",  # Prometheus, but no pool gauge
])
def test_a_targets_metrics_that_are_no_pool_give_no_pool(body):
    import asyncio

    from epdctl.bench.pool import read_pool

    assert asyncio.run(read_pool(_Session(body), "http://target")) is None


def test_the_proxys_pool_gauge_is_read_per_role():
    import asyncio

    from epdctl.bench.pool import read_pool

    text = (b'# TYPE epdctl_proxy_pool_instances gauge\nepdctl_proxy_pool_instances{role="encode"} 3.0\n'
            b'epdctl_proxy_pool_instances{role="decode"} 1.0\n')
    assert asyncio.run(read_pool(_Session(text), "http://proxy")) == {"encode": 3, "decode": 1}
    assert asyncio.run(read_pool(_Session(text, status=404), "http://proxy")) is None


def test_the_log_counter_takes_a_folder_or_a_fifo_at_the_log_name_as_no_log(tmp_path):
    # A folder there made the look raise (and the supervisor end); a FIFO held it, and the
    # supervisor's exit, until some writer opened it.
    import threading

    folder = tmp_path / "pd-0.log"
    folder.mkdir()
    assert LogCount(folder).read_on() is None
    fifo = tmp_path / "prefill-0.log"
    os.mkfifo(fifo)
    seen = {}
    reader = threading.Thread(target=lambda: seen.update(got=LogCount(fifo).read_on()), daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # release it before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert not reader.is_alive() and seen == {"got": None}


def test_status_shows_a_hostile_evidence_record_safe_for_a_terminal():
    # state.json's "evidence" printed as it was: rich's escape() stops markup, not escape
    # sequences (a screen clear, a clipboard write); a record without "detail" was a KeyError.
    import io

    import psutil

    from epdctl.status import _print_table, live_status

    class Up:
        def probe(self, url, timeout=1.0):
            return True

    me = {"pid": os.getpid(), "create_time": psutil.Process().create_time()}

    def state(evidence):
        return {"name": "ev", "phase": "running", "supervisor": {**me, "mode": "detached"}, "evidence": evidence,
                "processes": [{"name": "pd-0", "role": "pd", "port": 1, "url": "http://127.0.0.1:1", **me},
                              {"name": "proxy", "role": "proxy", "port": 2, "url": "http://127.0.0.1:2", **me}]}

    for evidence, shown in [
        ({"instances": {"pd-0": {"verdict": "degraded", "detail": "x", "counts": {}}},
          "reasons": ["pd-0 \x1b[2J\x1b]52;c;ZXZpbA==\x07 bad", 3, None]}, "why: pd-0"),
        ({"instances": {"pd-0": {"verdict": "ok", "detail": "d\x1b]0;pwned\x07", "counts": {"a": 1}}}}, "evidence: pd-0 d"),
        ({"instances": {"pd-0": {"verdict": "ok", "counts": {"a": 1}}}, "reasons": []}, "evidence: pd-0"),
        ({"instances": {"pd-0": {"verdict": ["degraded"], "detail": 7, "counts": [1]}}, "reasons": [["pd-0"]]},
         "evidence: pd-0 7"),
    ]:
        report = live_status(state(evidence), Up())
        out = io.StringIO()
        _print_table([report], [state(evidence)], out)
        text = out.getvalue()
        assert shown in text and "\x1b" not in text and "\x07" not in text, repr(text)


def test_a_counter_that_is_nan_or_infinite_says_nothing():
    part = _part("1e1pd", "pd-0")
    got = counts(part, {SIM["loaded"]: float("nan"), SIM["encoded"]: float("inf")}, None)
    assert got == {"ec_loaded": None, "encoded_locally": None}  # never NaN into state.json (invalid JSON)
    assert verdict(part, got, recent(got, got))[0] == "unknown"
