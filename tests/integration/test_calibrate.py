"""`epdctl calibrate` and `sim_profile:` (issue #15): the fit recovers known costs, the twin runs on them."""

from __future__ import annotations

import json
import os
import random

import pytest
import yaml
from conftest import assert_no_orphans, epdctl, write_sim_topology

from epdctl.calibrate import Target, fit_profile
from epdctl.config.load import load_topology
from epdctl.costfit import fit_nonnegative
from epdctl.errors import EpdctlError

TRUE = {"encode_request_ms": 4.0, "ec_load_ms": 2.5, "prefill_ms": 40.0, "prefill_token_ms": 0.03, "encode_base_ms": 6.0, "encode_ms": 22.0,
        "decode_ms": 3.0, "per_seq_ms": 0.4}


def synthetic_probes(rng: random.Random, noise_ms: float):
    """Probe data as a real run would give it, from TRUE plus noise."""
    def jitter() -> float:
        return rng.gauss(0, noise_ms)

    encode = [{"items": k, "requests": r,
               "ms": TRUE["encode_base_ms"] + TRUE["encode_ms"] * k + TRUE["encode_request_ms"] * r + jitter()}
              for k, r in ((1, 1), (2, 1), (4, 1), (2, 2), (4, 4), (8, 8)) for _ in range(3)]
    prefill = [{"prompt_tokens": t, "ms": TRUE["prefill_ms"] + TRUE["per_seq_ms"] + TRUE["prefill_token_ms"] * t + jitter()}
               for t in (20, 140, 530, 1040) for _ in range(3)]
    decode = [{"batch": b, "tpot_ms": TRUE["decode_ms"] + TRUE["per_seq_ms"] * b + jitter() / 10}
              for b in (1, 2, 4, 8) for _ in range(3)]
    consumer = [{"items": k, "prompt_tokens": 70 * k, "ms": TRUE["prefill_ms"] + TRUE["per_seq_ms"]
                 + TRUE["prefill_token_ms"] * 70 * k + TRUE["ec_load_ms"] * k + jitter() / 5}
                for k in (1, 2, 4) for _ in range(3)]
    return encode, prefill, decode, consumer


TARGETS = {"encode": Target("encode-0", "encode", "http://e", ()),
           "prefill": Target("pd-0", "pd", "http://pd", ()), "decode": Target("pd-0", "pd", "http://pd", ())}


def test_the_fit_recovers_known_coefficients_from_synthetic_probes():
    encode, prefill, decode, consumer = synthetic_probes(random.Random(7), noise_ms=0.5)
    profile = fit_profile("m", TARGETS, encode, prefill, decode, {}, consumer)
    cost = profile.cost.model_dump()
    for key, truth in TRUE.items():
        assert cost[key] == pytest.approx(truth, rel=0.15, abs=0.6), (key, cost[key], truth)
    assert profile.fits["prefill"].r2 > 0.99 and profile.fits["decode"].rmse_ms < 0.2
    assert len(profile.fits["encode"].probes) == len(encode)  # the data stays with the fit


def test_exact_data_is_fitted_exactly_and_a_pd_without_encoder_has_its_prefill_subtracted():
    encode, prefill, decode, _ = synthetic_probes(random.Random(1), noise_ms=0.0)
    # No encoder: the PD's image requests cost its prefill too; the fit removes it.
    pd_encode = [{"items": k, "requests": 1, "prompt_tokens": 300,
                  "ms": TRUE["encode_base_ms"] + TRUE["encode_ms"] * k
                  + TRUE["prefill_ms"] + TRUE["per_seq_ms"] + TRUE["prefill_token_ms"] * 300} for k in (1, 2, 4)]
    targets = {**TARGETS, "encode": TARGETS["prefill"]}
    profile = fit_profile("m", targets, pd_encode, prefill, decode, {})
    for key, truth in TRUE.items():
        # No encoder: no items loaded from the EC, and the PD's request cost is in its prefill.
        expected = 0.0 if key in ("ec_load_ms", "encode_request_ms") else truth
        assert profile.cost.model_dump()[key] == pytest.approx(expected, abs=1e-3), key
    assert "no encoder" in profile.fits["encode"].note


def test_nonnegative_least_squares_never_returns_a_negative_cost():
    # Falling times (noise on a flat cost): the slope is clamped to 0 and the intercept is the mean.
    fit = fit_nonnegative([[1, 1], [1, 2], [1, 4]], [10.2, 10.0, 9.7])
    assert fit.coefficients[1] == 0 and fit.coefficients[0] == pytest.approx(9.9667, abs=1e-3)
    with pytest.raises(ValueError):
        fit_nonnegative([[1, float("nan")]], [1.0])


def test_calibrate_a_running_topology_writes_a_profile_and_a_twin_that_runs_on_it(tmp_path, state_dir):
    timings = ("sim-ttft-ms: 40, sim-tpot-ms: 4, sim-encode-ms: 30, sim-encode-base-ms: 5, sim-ec-load-ms: 6, "
               "sim-step-per-seq-ms: 0.5, sim-prefill-token-ms: 0.02, max-num-seqs: 16")
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="cal", timings=timings)
    profile_path, twin_path = tmp_path / "out" / "profile.yaml", tmp_path / "out" / "twin.yaml"
    profile_path.parent.mkdir()
    try:
        epdctl("up", "-d", str(topology), check=0)
        result = epdctl("calibrate", "cal", "-o", str(profile_path), "--twin", str(twin_path), "--repeats", "2",
                        timeout=300, check=0, cwd=tmp_path / "out")
        assert "encode" in result.stdout and "wrote" in result.stdout, result.stdout
        assert "calibrate: decode: pd-0" in result.stderr, result.stderr
        as_json = json.loads(epdctl("calibrate", "cal", "--json", "--repeats", "1", timeout=300, check=0).stdout)
        assert as_json["kind"] == "epdctl-sim-profile" and as_json["source"]["engine"] == "sim"
    finally:
        epdctl("down", "cal", check=0)
        assert_no_orphans(str(state_dir), list(ports.values()))

    profile = yaml.safe_load(profile_path.read_text())
    cost = profile["cost"]
    # The sim's own costs, measured over HTTP: a sleep is never shorter than asked, so each fit is at
    # least (about) the cost the sim was given; a busy machine only adds to it. The upper bounds only
    # catch a fit of the wrong thing (another order of magnitude), not a slow machine.
    def measured(key: str, given: float) -> None:
        assert 0.8 * given <= cost[key] <= 4 * given + 2, (key, cost)

    measured("prefill_ms", 40)
    measured("encode_ms", 30)
    measured("decode_ms", 4)
    assert 0 <= cost["prefill_token_ms"] <= 0.2, cost
    assert cost["per_seq_ms"] < 4, cost
    assert 2 <= cost["ec_load_ms"] <= 40, cost
    assert {p["batch"] for p in profile["fits"]["decode"]["probes"]} == {1, 2, 4, 8}
    assert profile["fits"]["prefill"]["instance"] == "pd-0" and profile["fits"]["encode"]["instance"] == "encode-0"

    # The twin: the same layout on the profile's costs, with the probed sim's own flags gone.
    twin = load_topology(twin_path)
    assert twin.engine == "sim" and twin.name == "cal-twin" and twin.sim_profile == str(profile_path)
    plan = json.loads(epdctl("plan", str(twin_path), "--json", check=0).stdout)
    pd = next(p for p in plan["instances"] if p["name"] == "pd-0")
    argv = pd["argv"]
    assert argv[argv.index("--sim-ttft-ms") + 1] == str(cost["prefill_ms"])
    assert argv.count("--sim-ttft-ms") == 1 and "16" == argv[argv.index("--max-num-seqs") + 1]
    try:
        epdctl("up", "-d", str(twin_path), check=0)
        report = json.loads(epdctl("bench", "cal-twin", "--num-prompts", "6", "--concurrency", "1", "--max-tokens", "4",
                                   "--image-size", "32", "--json", check=0).stdout)
        assert report["completed"] == 6
        # Image TTFT on the twin: at least encode (5 + 30) + prefill (40 + 64 image tokens) as measured.
        assert report["ttft_ms"]["p50"] >= 0.8 * (cost["encode_ms"] + cost["prefill_ms"]), report["ttft_ms"]
    finally:
        epdctl("down", "cal-twin", check=0)
        assert_no_orphans(str(state_dir), list(ports.values()))


def test_calibrate_refuses_what_it_cannot_do(tmp_path, state_dir):
    result = epdctl("calibrate", "nothing-up")
    assert result.returncode == 2 and "no topology named 'nothing-up' is up" in result.stderr
    assert "Traceback" not in result.stderr
    result = epdctl("calibrate", "x", "--twin", "t.yaml")
    assert result.returncode == 2 and "--twin needs -o" in result.stderr
    result = epdctl("calibrate", "x", "--repeats", "0")
    assert result.returncode == 2 and "--repeats: must be between 1 and 50 (got 0)" in result.stderr
    result = epdctl("calibrate", "../etc")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr


# ---------------------------------------------------------------- sim_profile: in a topology

PROFILE = """kind: epdctl-sim-profile
version: 1
model: m
cost: {prefill_ms: 12.5, prefill_token_ms: 0.01, encode_base_ms: 3, encode_ms: 7, decode_ms: 1.5, per_seq_ms: 0.1}
"""


def _topology(tmp_path, line: str, engine: str = "sim", args: str = "") -> str:
    path = tmp_path / "t.yaml"
    path.write_text(f"name: t\nmodel: m\nengine: {engine}\nplatform: cpu\n"
                    f"defaults: {{args: {{{args}}}}}\npd: [{{port: 18001}}]\nproxy: {{port: 18002}}\n{line}\n")
    return str(path)


def _pd_argv(path: str) -> list[str]:
    plan = json.loads(epdctl("plan", path, "--json", check=0).stdout)
    return plan["instances"][0]["argv"]


def test_a_profile_relative_to_the_topology_becomes_flags_and_args_still_win(tmp_path):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "p.yaml").write_text(PROFILE)
    argv = _pd_argv(_topology(tmp_path, "sim_profile: profiles/p.yaml"))  # run from another folder below
    flags = dict(zip(argv, argv[1:]))  # each flag to the word after it
    assert flags["--sim-ttft-ms"] == "12.5" and flags["--sim-encode-base-ms"] == "3.0" and flags["--sim-tpot-ms"] == "1.5"
    argv = _pd_argv(_topology(tmp_path, "sim_profile: profiles/p.yaml", args="sim-ttft-ms: 99"))
    assert argv[argv.index("--sim-ttft-ms") + 1] == "99" and argv.count("--sim-ttft-ms") == 1


@pytest.mark.parametrize("content, message", [
    (PROFILE.replace("prefill_ms: 12.5", "prefill_ms: -1"), "p.yaml:4: cost.prefill_ms: Input should be greater than or equal to 0"),
    (PROFILE.replace("prefill_ms: 12.5", "prefill_ms: .nan"), "p.yaml:4: cost.prefill_ms"),
    (PROFILE.replace("prefill_ms: 12.5", "prefill_ms: 1e300"), "p.yaml:4: cost.prefill_ms: Input should be less than or equal to"),
    (PROFILE.replace("decode_ms", "decode_msx"), "p.yaml:4: cost.decode_msx: unknown key"),
    (PROFILE.replace("kind: epdctl-sim-profile", "kind: something-else"), "p.yaml:1: kind"),
    ("- a list\n", "p.yaml:1: a sim profile is a mapping"),
    ("", "p.yaml:1: the profile is empty"),
    ("a: &x [*x]\n", "p.yaml:1"),
])
def test_a_bad_profile_is_one_line_naming_both_files(tmp_path, content, message):
    (tmp_path / "p.yaml").write_text(content)
    result = epdctl("validate", _topology(tmp_path, "sim_profile: p.yaml"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"epdctl: {tmp_path}/t.yaml:8: sim_profile: "), result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_a_profile_expands_variables_as_a_topology_does(tmp_path):
    (tmp_path / "p.yaml").write_text(PROFILE.replace("model: m", 'model: "${HOME}"'))
    epdctl("validate", _topology(tmp_path, "sim_profile: p.yaml"), env={"HOME": str(tmp_path)}, check=0)
    (tmp_path / "p.yaml").write_text(PROFILE.replace("model: m", 'model: "${EPDCTL_UNSET_HERE}"'))
    result = epdctl("validate", _topology(tmp_path, "sim_profile: p.yaml"))
    assert result.returncode == 2 and "p.yaml:3: model: ${EPDCTL_UNSET_HERE} is not set" in result.stderr, result.stderr


def test_a_written_profile_reads_back_as_written_dollars_included(tmp_path):
    from epdctl.config.profile import Costs, SimProfile, dump_profile, load_profile

    profile = SimProfile(model="/models/$weird", source={"topology": "/tmp/${x}/t.yaml"}, cost=Costs(decode_ms=1.5))
    (tmp_path / "p.yaml").write_text(dump_profile(profile))
    assert load_profile(tmp_path / "p.yaml", environ={}) == profile


def test_a_profile_that_is_no_regular_file_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "p.yaml")  # a reader that opened it plainly would wait forever
    result = epdctl("validate", _topology(tmp_path, "sim_profile: p.yaml"), timeout=20)
    assert result.returncode == 2 and "is not a regular file" in result.stderr
    result = epdctl("validate", _topology(tmp_path, "sim_profile: missing.yaml"))
    assert result.returncode == 2 and "t.yaml:8: sim_profile:" in result.stderr and "no such file" in result.stderr
    (tmp_path / "big.yaml").write_bytes(b"#" * (2 * 1024 * 1024))
    result = epdctl("validate", _topology(tmp_path, "sim_profile: big.yaml"))
    assert result.returncode == 2 and "not a sim profile" in result.stderr


def test_a_profile_is_for_the_sim_only(tmp_path):
    (tmp_path / "p.yaml").write_text(PROFILE)
    result = epdctl("validate", _topology(tmp_path, "sim_profile: p.yaml", engine="vllm"))
    assert result.returncode == 2 and "t.yaml:8: sim_profile: only for engine: sim" in result.stderr


def test_the_profile_loader_resolves_against_the_topology_folder_not_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "p.yaml").write_text(PROFILE)
    path = _topology(tmp_path, "sim_profile: p.yaml")
    monkeypatch.chdir("/")
    topology = load_topology(path)
    assert topology.sim_profile == str(tmp_path / "p.yaml")
    assert topology.sim_costs("pd")["sim-step-per-seq-ms"] == 0.1
    with pytest.raises(EpdctlError):
        load_topology(_topology(tmp_path, "sim_profile: \"a\\0b\""))


def test_every_profile_cost_is_a_flag_the_sim_models():
    """The sim ignores flags it does not know: a profile cost without a sim flag would silently do nothing."""
    from epdctl.config.profile import Costs
    from epdctl.config.simflags import COST_FLAGS

    sim_flags = {flag.name for flag in COST_FLAGS}
    for role in ("encode", "prefill", "decode", "pd"):
        flags = Costs().flags(role)
        assert set(flags) <= sim_flags, role
    assert len(Costs().flags("encode")) == len(Costs.model_fields)  # every cost reaches some instance
