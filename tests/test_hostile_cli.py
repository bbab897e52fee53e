"""Numbers and text from the command line and the topology file, as an attacker or a typo gives them:
every number has a range (a bad one is one line and exit 2 before anything starts), and nothing
shown to a terminal carries escape sequences."""

from __future__ import annotations

import argparse
import io
import json
import sys
from contextlib import redirect_stdout
from types import SimpleNamespace

import pytest

from conftest import epdctl

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
    assert option.split()[1] in err, err  # it names the option, not some later failure
    assert not state_dir.exists()  # nothing was started


@pytest.mark.parametrize("value", [".inf", "1e9"])
def test_a_proxy_timeout_the_proxy_would_refuse_is_refused_by_validate(tmp_path, value):
    """Plan passes the topology's proxy timeouts to the proxy's command line, whose range they must fit."""
    path = tmp_path / "t.yaml"
    path.write_text(f"model: m\nengine: sim\nplatform: cpu\npd: [{{port: 18101}}]\n"
                    f"proxy: {{port: 18102, decode_timeout_s: {value}}}\n")
    result = epdctl("validate", str(path))
    assert result.returncode == 2 and f"{path}:5: proxy.decode_timeout_s" in result.stderr, result.stderr


def test_bench_refuses_a_request_larger_than_the_proxy_takes(tmp_path, state_dir):
    """`bench NAME` reads the proxy's max_body_mb from the topology's state: every request would get 413."""
    from epdctl.run.state import StateDir

    state = StateDir("small")
    state.ensure()
    state.write({"name": "small", "processes": [{
        "name": "proxy", "role": "proxy", "url": "http://127.0.0.1:9", "port": 9,
        "argv": [sys.executable, "-m", "epdctl.proxy", "--port", "9", "--max-body-mb", "1"]}]})
    dataset = tmp_path / "big.jsonl"
    dataset.write_text(json.dumps({"messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]}) + "\n")
    result = epdctl("bench", "small", "--dataset", str(dataset), "--num-prompts", "1")
    assert result.returncode == 2, result.stderr
    assert "more than the proxy takes (1 MB, its max_body_mb)" in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.timeout(60)  # judged by all of them, it would take hours
def test_bench_judges_synthetic_requests_by_a_first_one():
    from epdctl.bench.cli import parse_args, requests_for

    args = parse_args(["--url", "http://127.0.0.1:9", "--image-size", "512", "--num-prompts", "1000000"])
    with pytest.raises(EpdctlError, match="more than the proxy takes"):
        requests_for(args, max_body_bytes=1024)  # refused before a million requests are made


# ---------------------------------------------------------------- text a terminal would act on

HOSTILE_TEXT = {
    "model": ("model: \"evil\\e]0;title\\a\"", "model: contains U+001B"),
    "vllm_command": ("vllm_command: [vllm, \"serve\\a\"]", "vllm_command[1]: contains U+0007"),
    "model (carriage return)": ("model: \"rm -rf /\\rsafe-model\"", "model: contains U+000D"),
    "model (bidi override)": ("model: \"abc\\u202edef\"", "model: contains U+202E"),
    "an argument": ("defaults: {args: {served-model-name: \"x\\e[2J\"}}", "defaults.args.served-model-name: contains U+001B"),
    "an environment value": ("defaults: {env: {A: \"\\e]52;c;eA==\\a\"}}", "defaults.env.A: contains U+001B"),
}
GOOD = "engine: sim\nplatform: cpu\npd: [{port: 18101}]\nproxy: {port: 18102}\n"


@pytest.mark.parametrize("case", HOSTILE_TEXT)
def test_validate_refuses_control_characters_that_plan_would_print(tmp_path, case):
    line, message = HOSTILE_TEXT[case]
    path = tmp_path / "t.yaml"
    path.write_text(("" if line.startswith("model") else "model: m\n") + line + "\n" + GOOD)
    for command in ("validate", "plan"):
        result = epdctl(command, str(path))
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and f"{path}:" in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and not any(c in result.stderr for c in "\x1b\x07\r\u202e")


def test_a_newline_in_an_argument_is_text_and_plan_shows_it_escaped(tmp_path):
    """An inline chat template spans lines: it is allowed, and plan still prints one line per process."""
    path = tmp_path / "t.yaml"
    path.write_text("model: m\ndefaults: {args: {chat-template: \"{{ a }}\\n{{ b }}\\tc\"}}\n" + GOOD)
    shown = epdctl("plan", str(path), check=0).stdout
    assert "'{{ a }}\\n{{ b }}\tc'" in shown


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
