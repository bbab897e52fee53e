"""Numbers and text from the command line and the topology file, as an attacker or a typo gives them:
every number has a range (a bad one is one line and exit 2 before anything starts), and nothing
shown to a terminal carries escape sequences."""

from __future__ import annotations

import argparse
import io
import sys
from contextlib import redirect_stdout
from types import SimpleNamespace

import pytest


from epdctl.errors import EpdctlError


BAD = ["nan", "inf", "-1", "1" + "0" * 30]


# Every number option of every command, with the words that come before it. A FILE or NAME that
# does not exist is fine: the number is checked first, so the error must name the option.
PROXY = ["proxy", "--decode-servers-urls", "http://127.0.0.1:9"]


BENCH = ["bench", "--url", "http://127.0.0.1:9"]


NUMBER_OPTIONS = {
    "logs --tail": ["logs", "x", "--tail"],
    "up --wait-timeout": ["up", "missing.yaml", "--wait-timeout"],
    "smoke --wait-timeout": ["smoke", "missing.yaml", "--wait-timeout"],
    "down -t": ["down", "x", "-t"],
    "scale --wait-timeout": ["scale", "x", "encode=2", "--wait-timeout"],
    "export slurm --nodes": ["export", "slurm", "missing.yaml", "--nodes"],
    "export slurm --grace": ["export", "slurm", "missing.yaml", "--grace"],
    **{f"bench {flag}": BENCH + [flag] for flag in (
        "--num-prompts", "--concurrency", "--request-rate", "--warmup", "--timeout-s", "--images-per-request",
        "--image-size", "--repeat-ratio", "--prompt-len", "--max-tokens", "--seed", "--slo-ttft-ms", "--slo-tpot-ms")},
    "sweep --num-prompts": ["sweep", "missing.yaml", "--splits", "pd", "--num-prompts"],
    "sweep --devices": ["sweep", "missing.yaml", "--splits", "pd", "--devices"],
    **{f"calibrate {flag}": ["calibrate", "x", flag] for flag in (
        "--repeats", "--image-size", "--max-batch", "--decode-tokens", "--timeout-s")},
    **{f"proxy {flag}": PROXY + [flag] for flag in (
        "--port", "--encode-timeout-s", "--prefill-timeout-s", "--decode-timeout-s", "--max-body-mb",
        "--max-media-items", "--probe-interval-s", "--workers")},
}


def _run(argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """The CLI in this process (a subprocess each would take minutes for ~130 cases): exit code, stderr."""
    from epdctl.cli import main

    monkeypatch.setattr(sys, "argv", ["epdctl", *argv])
    with pytest.raises(SystemExit) as stop:
        main()
    return stop.value.code, capsys.readouterr().err


@pytest.mark.timeout(60)  # a value let through would start a proxy or a bench run
@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("option", NUMBER_OPTIONS)
def test_a_bad_number_is_one_line_and_exit_2_before_anything_starts(option, value, capsys, monkeypatch, state_dir):
    words = NUMBER_OPTIONS[option]
    code, err = _run(words + [value], capsys, monkeypatch)
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert option.rsplit(" ", 1)[1] in err, err  # it names the option, not some later failure
    assert not state_dir.exists()  # nothing was started


@pytest.mark.timeout(60)  # judged by all of them, it would take hours
def test_bench_judges_synthetic_requests_by_a_first_one():
    from epdctl.bench.cli import parse_args, requests_for

    args = parse_args(["--url", "http://127.0.0.1:9", "--image-size", "512", "--num-prompts", "1000000"])
    with pytest.raises(EpdctlError, match="more than the proxy takes"):
        requests_for(args, max_body_bytes=1024)  # refused before a million requests are made


def test_plan_text_goes_through_the_display_filter():
    """What validate lets through still reaches the terminal inert (a second line of defence)."""
    from epdctl.cli import _print_plan_text

    spec = SimpleNamespace(name="pd-0", role="pd", devices=(), url="http://x", env={"A": "\x1b]0;t\x07"},
                           argv=["vllm", "serve", "m\x1b[2J\x07"])
    plan = SimpleNamespace(name="t", engine="vllm", platform="cpu", processes=[spec])
    out = io.StringIO()
    with redirect_stdout(out):
        _print_plan_text(plan)
    assert "\x1b" not in out.getvalue() and "\x07" not in out.getvalue()
    assert "m\\x07" in out.getvalue()


def test_number_ranges_name_the_bounds():
    from epdctl.cliparse import number

    parse = number(float, 0, 10, above=True)
    assert parse("2.5") == 2.5
    for text, reason in (("0", "more than 0 and at most 10 (got 0)"), ("nan", "(got nan)"), ("x", "a number expected")):
        with pytest.raises(argparse.ArgumentTypeError, match=reason.replace("(", r"\(").replace(")", r"\)")):
            parse(text)


# The very values issue 27 named, beside the generic BAD ones above.
ISSUE_VALUES = [
    (["logs", "x", "--tail", "99999999999999999999"], "--tail"),  # was an OverflowError
    (["up", "missing.yaml", "--wait-timeout", "0"], "--wait-timeout"),  # accepted, failed later
    (["smoke", "missing.yaml", "--wait-timeout", "0"], "--wait-timeout"),
    (BENCH + ["--request-rate", "0"], "--request-rate"),
    (BENCH + ["--image-size", "100000"], "--image-size"),  # was a MemoryError after tens of seconds
    (BENCH + ["--image-size", "8193"], "--image-size"),
    (["sweep", "missing.yaml", "--splits", "pd", "--image-size", "100000"], "--image-size"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv, option", ISSUE_VALUES, ids=[" ".join(argv[-2:]) for argv, _ in ISSUE_VALUES])
def test_the_values_the_issue_named_are_usage_errors(argv, option, capsys, monkeypatch, state_dir):
    code, err = _run(argv, capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and option in err and "Traceback" not in err, err
    assert not state_dir.exists()


def test_the_image_size_cap_is_8192_pixels():
    from epdctl.bench.cli import parse_args

    assert parse_args(["--url", "http://127.0.0.1:9", "--image-size", "8192"]).image_size == 8192
