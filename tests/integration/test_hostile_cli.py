"""Numbers and text from the command line and the topology file, as an attacker or a typo gives them:
every number has a range (a bad one is one line and exit 2 before anything starts), and nothing
shown to a terminal carries escape sequences."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import epdctl



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


