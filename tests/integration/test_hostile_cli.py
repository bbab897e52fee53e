"""Numbers and text from the command line and the topology file, as an attacker or a typo gives them:
every number has a range (a bad one is one line and exit 2 before anything starts), and nothing
shown to a terminal carries escape sequences."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import epdctl

from epdctl.errors import EpdctlError



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




# ---------------------------------------------------------------- text an HTTP answer carries

HOSTILE_ANSWER = "\x1b]0;pwned\x07 [/oops] [bold]loud \x1b[2J\x1bc\nsecond line \x9b31m\x07".encode()


class _HostileBackend(BaseHTTPRequestHandler):
    """Lists a model, then answers every chat request 500 with escape sequences, rich markup and a newline."""

    def do_GET(self):
        self._answer(200, b'{"object":"list","data":[{"id":"m"}]}')

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self._answer(500, HOSTILE_ANSWER)

    def _answer(self, status: int, body: bytes):
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def hostile_backend():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HostileBackend)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _inert(text: str) -> bool:
    return not any(ch in text for ch in "\x1b\x07\x9b\r")


def test_bench_shows_a_hostile_error_answer_inert(hostile_backend):
    """An error body from the target (any --url) goes through the display filter, and is not read as
    rich markup: '[/oops]' was a MarkupError (internal error, exit 1) after the whole run."""
    result = epdctl("bench", "--url", hostile_backend, "--num-prompts", "2", "--warmup", "0")
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert _inert(result.stdout) and _inert(result.stderr), (result.stdout, result.stderr)
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stdout
    assert "HTTP 500:" in errors[0] and "[/oops] [bold]loud" in errors[0] and "second line" in errors[0], errors
    report = json.loads(epdctl("bench", "--url", hostile_backend, "--num-prompts", "1", "--warmup", "0",
                               "--json").stdout)
    assert all(_inert(error) for error in report["errors"]), report["errors"]


def test_smoke_and_calibrate_show_a_hostile_error_answer_inert(hostile_backend):
    """Their error lines quote the answer's body: shown through the display filter, one line."""
    import asyncio
    import types

    from epdctl import smoke
    from epdctl.calibrate import Prober

    golden = smoke.Golden("text-only", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    with pytest.raises(EpdctlError) as refused:
        smoke.send(hostile_backend, golden)
    assert _inert(refused.value.message) and "\n" not in refused.value.message, repr(refused.value.message)
    assert "HTTP 500:" in refused.value.message and "[/oops]" in refused.value.message

    async def probe():
        import aiohttp

        async with aiohttp.ClientSession() as session:
            prober = Prober(session, "m", types.SimpleNamespace(timeout_s=10.0), lambda: None)
            await prober.ask(hostile_backend, "hi", 1)
    with pytest.raises(EpdctlError) as refused:
        asyncio.run(probe())
    assert _inert(refused.value.message) and "answered 500" in refused.value.message, repr(refused.value.message)
