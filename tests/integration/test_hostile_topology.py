"""Hostile topology files (issues #12 and #19): every one ends in exit 0, or exit 2 with one
`FILE:LINE: field: what is wrong` line per problem; never a hang, a traceback or "internal error".
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epdctl.config.checks import MAX_ARG_BYTES
from epdctl.config.load import load_topology, parse_topology
from epdctl.config.simflags import SIM_FLAGS
from epdctl.devices import detect_device_count
from epdctl.errors import EXIT_USAGE, EpdctlError
from epdctl.export.sh import render_script
from epdctl.plan import build_plan, side_channel_ports

from conftest import TOPOLOGIES, epdctl

GOOD = """\
model: m
engine: sim
platform: cpu
ec_transfer: {connector: ECExampleConnector, shared_storage_path: /tmp/ec}
encode: [{port: 9001}]
pd: [{port: 9002}]
"""
P_D = """\
model: m
platform: cpu
kv_transfer: {connector: NixlConnector, side_channel_port_base: 65535}
prefill: [{port: 9001}]
decode: [{port: 9002}]
"""
LINE = re.compile(r"t\.yaml:[0-9]+: \S")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines + [f"model: *a{levels - 1}", ""])


def outcome(text: str, **kw):
    """The topology, or the error message after checking its shape: exit 2, each line FILE:LINE."""
    try:
        return parse_topology(text, "t.yaml", environ=kw.pop("environ", {"X": "1"}), **kw)
    except EpdctlError as exc:
        assert exc.exit_code == EXIT_USAGE, exc.message
        for line in exc.message.split("\n"):
            assert LINE.match(line) and line.isprintable(), repr(line)
        return exc.message


def error_of(text: str, **kw) -> str:
    result = outcome(text, **kw)
    assert isinstance(result, str), "expected a refusal"
    return result


def assert_runnable(topology) -> None:
    """What `validate` accepts, `up` can exec: argv and env the kernel takes, ports that exist."""
    plan = build_plan(topology, python="python")
    for spec in plan.processes:
        for word in list(spec.argv) + [f"{k}={v}" for k, v in spec.env.items()]:
            assert "\0" not in word and len(os.fsencode(word)) <= MAX_ARG_BYTES
        assert all(ENV_NAME.fullmatch(name) for name in spec.env)
        assert all(1 <= port <= 65535 for port in spec.ports())
    if topology.engine == "sim":
        for spec in plan.instances:
            assert_sim_takes_its_flags(spec.argv[spec.argv.index("epdctl.sim") + 1:])
    render_script(plan, "t.yaml")


def assert_sim_takes_its_flags(argv) -> None:
    """The sim's own parser accepts every `--sim-*` flag validate let through (other flags are vLLM's business)."""
    import contextlib
    import io

    from epdctl.sim.__main__ import parse_args

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parse_args(list(argv))
    except SystemExit:
        assert "--sim-" not in stderr.getvalue(), (argv, stderr.getvalue())


def cli_refusal(*args: str, env: dict | None = None) -> str:
    """Run the real CLI, expect exit 2 with exactly one line on stderr, and return that line."""
    result = epdctl(*args, env=env, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    return lines[0]


# ---------------------------------------------------------------- bounded YAML (#12.11, #12.12)


def test_billion_laughs_is_refused_at_once():
    message = error_of(billion_laughs())  # expanded, it would never end: refused by the budget while composing
    assert message.startswith("t.yaml:") and "once aliases are expanded" in message


def test_billion_laughs_through_the_cli(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(billion_laughs())
    assert len(path.read_bytes()) < 1024
    line = cli_refusal("validate", str(path))
    assert line.startswith(f"epdctl: {path}:") and "aliases" in line


@pytest.mark.parametrize("text", [
    "big: &big '" + "x" * 500_000 + "'\nmodel: [" + ", ".join(["*big"] * 12) + "]\n",  # text, not nodes
    "b: &b " + "[" * 10 + "1" + "]" * 10 + "\nc: " + "[" * 60 + "*b" + "]" * 60 + "\n",  # depth via an alias
    "a: &a [*a]\n",  # a recursive structure
    "a: &a {b: *a}\n",
], ids=["text-bomb", "deep-alias", "recursive-list", "recursive-map"])
def test_alias_tricks_are_refused(text):
    assert "invalid YAML" in error_of(text)


@pytest.mark.parametrize("text", [
    "model: " + "[" * 1000 + "]" * 1000 + "\n",
    "model: " + "{a: " * 1000 + "1" + "}" * 1000 + "\n",
    "model:\n" + "".join("  " * depth + "- \n" for depth in range(1, 1000)),
    "model: " + "[" * 500_000 + "\n",
], ids=["flow-list", "flow-map", "block", "unclosed"])
def test_deep_nesting_is_a_line_not_a_recursion_error(text):
    assert "nested deeper than 64 levels" in error_of(text)


def test_shallow_real_nesting_and_aliases_still_load():
    text = GOOD.replace("pd: [{port: 9002}]", "pd: [{port: 9002, args: &a {x: {y: {z: [[[1]]]}}}}]")
    text += "defaults: {args: *a}\n"
    assert outcome(text).defaults.args == {"x": {"y": {"z": [[[1]]]}}}


@pytest.mark.parametrize("char", ["\0", "\x07", "\x1b", "\ufffe"])
def test_control_characters_give_their_line(char):
    assert error_of(GOOD.replace("pd: [{port: 9002}]", f"pd: [{{port: 9002}}]\n# {char}")).startswith(
        "t.yaml:7: invalid YAML: character U+")


def test_nul_byte_file_through_the_cli(tmp_path):
    path = tmp_path / "nul.yaml"
    path.write_bytes(GOOD.encode() + b"media: {allowed_local_path: /a\0b}\n")
    assert cli_refusal("validate", str(path)).startswith(f"epdctl: {path}:7: invalid YAML")


@pytest.mark.parametrize("merge", ["[1, 2]", "3", "[{port: 1}, x]"])
def test_merge_onto_a_non_mapping_gives_a_line(merge):
    message = error_of(GOOD.replace("pd: [{port: 9002}]", f"pd:\n  - <<: {merge}\n    port: 9002"))
    assert message.startswith("t.yaml:7: pd[0].<<: a merge key takes a mapping")


def test_merged_keys_are_overridden_not_duplicates():
    text = GOOD.replace("encode: [{port: 9001}]", "encode: [&e {port: 9001, args: {a: 1}}]").replace(
        "pd: [{port: 9002}]", "pd: [{<<: *e, port: 9002}]")
    topology = outcome(text)
    assert topology.pd[0].port == 9002 and topology.pd[0].args == {"a": 1}


@pytest.mark.parametrize("value,expected", [
    ("!!int abc", "'abc' is not a valid int"),
    ("!!binary aGk=", "the tag tag:yaml.org,2002:binary is not supported here"),
    ("!!python/object:os.system x", "is not supported here"),
    ("!!set x", "is not supported here"),
    ("1" + ":1" * 2000, "a number of more than 100 characters"),
    ("9" * 5000, "a number of more than 100 characters"),
])
def test_odd_scalars_give_their_line(value, expected):
    message = error_of(GOOD.replace("{port: 9002}", "{port: 9002, args: {a: " + value + "}}"))
    assert message.startswith("t.yaml:6: pd[0].args.a: ") and expected in message


def test_dates_stay_text():
    assert outcome(GOOD.replace("{port: 9002}", "{port: 9002, args: {a: 2024-02-30}}")).pd[0].args == {"a": "2024-02-30"}


def test_unquoted_variable_in_a_flow_mapping_hints_at_quoting():
    message = error_of(GOOD.replace("{port: 9002}", "{port: ${PD_PORT:-9002}}"))
    assert message.startswith("t.yaml:6: invalid YAML") and "quote a variable: '${VAR:-default}'" in message


def test_a_long_bad_value_is_shortened_in_the_message():
    message = error_of("name: " + "X" * 200_000 + "\n" + GOOD)
    assert message.startswith("t.yaml:1: name: String should match pattern") and message.endswith("... (200002 characters))")
    assert len(message) < 300


def test_a_key_with_a_newline_stays_one_line():
    assert error_of(GOOD + '"a\\nb": 1\n') == "t.yaml:7: a\\nb: unknown key"


# ---------------------------------------------------------------- values `up` would reject (#12.13)


@pytest.mark.parametrize("text,expected", [
    (P_D, "t.yaml:3: kv_transfer.side_channel_port_base: decode-0's side channel would get port 65536, past 65535"),
    (GOOD.replace("port: 9002", "port: true"), "t.yaml:6: pd[0].port: Input should be a valid integer, not a boolean"),
    (GOOD.replace("port: 9002", "port: 80.5"), "t.yaml:6: pd[0].port: Input should be a valid integer, not a float"),
    (GOOD.replace("port: 9002", "port: 9002.0"), "t.yaml:6: pd[0].port: Input should be a valid integer, not a float"),
    (P_D.replace("65535", "yes"), "t.yaml:3: kv_transfer.side_channel_port_base: Input should be a valid integer, not a boolean"),
    (P_D.replace("{port: 9001}", "{port: 9001, side_channel_port: 7000.0}"), "t.yaml:4: prefill[0].side_channel_port: Input should be a valid integer"),
    (GOOD.replace("{port: 9001}", "{port: 9001, devices: [true]}"), "t.yaml:5: encode[0].devices[0]: Input should be a valid integer, not a boolean"),
    (GOOD.replace("{port: 9002}", "{port: 9002, args: {big: '" + "x" * (128 * 1024) + "'}}"),
     f"t.yaml:6: pd[0].args.big: is {128 * 1024 + 1} bytes as one argument; Linux takes at most {MAX_ARG_BYTES}"),
    (GOOD.replace("{port: 9002}", "{port: 9002, env: {BIG: '" + "x" * (128 * 1024) + "'}}"), "t.yaml:6: pd[0].env.BIG: is 131077 bytes"),
    (GOOD.replace("{port: 9002}", '{port: 9002, args: {big: {json: "' + "\\x01" * 30000 + '"}}}'),
     "t.yaml:6: pd[0].args.big: is 180012 bytes"),  # JSON escapes each byte to 6
    (GOOD.replace("{port: 9002}", '{port: 9002, env: {A: "x\\0y"}}'), "t.yaml:6: pd[0].env.A: contains a NUL byte"),
    (GOOD.replace("{port: 9002}", '{port: 9002, env: {"A=B": x}}'), "t.yaml:6: pd[0].env.A=B: is not an environment variable name"),
    (GOOD.replace("{port: 9002}", '{port: 9002, env: {"": x}}'), "t.yaml:6: pd[0].env.: is not an environment variable name"),
    (GOOD.replace("{port: 9002}", '{port: 9002, env: {"1X": x}}'), "t.yaml:6: pd[0].env.1X: is not an environment variable name"),
    (GOOD + 'defaults: {env: {"A B": x}}\n', "t.yaml:7: defaults.env.A B: is not an environment variable name"),
    (GOOD + 'defaults: {env: {"A\\0": x}}\n', "t.yaml:7: defaults.env.A\\x00: is not an environment variable name"),
    (GOOD.replace("{port: 9002}", '{port: 9002, args: {x: ["a\\0b"]}}'), "t.yaml:6: pd[0].args.x: contains a NUL byte"),
    (GOOD.replace("{port: 9002}", '{port: 9002, args: {"a\\0b": 1}}'), "t.yaml:6: pd[0].args.a\\x00b: contains a NUL byte"),
    (GOOD + 'defaults: {args: {x: "\\0"}}\n', "t.yaml:7: defaults.args.x: contains a NUL byte"),
    (GOOD.replace("model: m", 'model: "m\\0"'), "t.yaml:1: model: contains a NUL byte"),
    (GOOD + 'vllm_command: [vllm, "se\\0rve"]\n', "t.yaml:7: vllm_command[1]: contains a NUL byte"),
    (GOOD + "vllm_command: [--x, serve]\n", "t.yaml:7: vllm_command[0]: must name a program, not an option"),
    (GOOD + 'proxy: {host: "127.0.0.1\\0"}\n', "t.yaml:7: proxy.host: contains a NUL byte"),
    (GOOD.replace("{port: 9002}", '{port: 9002, args: {x: "\\ud800"}}'), "t.yaml:6: pd[0].args.x: holds '\\ud800', which cannot be passed"),
    (GOOD.replace("{port: 9002}", "{port: 9002, args: {" + ", ".join(f"a{i}: '{'x' * 100_000}'" for i in range(11)) + "}}"),
     "t.yaml:6: pd[0]: its command line and environment would take"),
], ids=["side-channel-overflow", "port-true", "port-float", "port-float-whole", "base-bool", "side-channel-float",
        "device-bool", "arg-128k", "env-128k", "json-escapes-128k", "env-nul", "env-equals", "env-empty", "env-digit",
        "env-space", "env-nul-name", "list-arg-nul", "arg-key-nul", "default-arg-nul", "model-nul", "vllm-command-nul",
        "vllm-command-option", "proxy-host-nul", "lone-surrogate", "argv-env-total"])
def test_values_up_would_reject_are_refused(text, expected):
    message = error_of(text)
    assert expected in message, message


def test_quoted_numbers_still_make_ports():
    assert outcome(GOOD.replace("port: 9002", "port: '${PD_PORT:-9100}'"), environ={}).pd[0].port == 9100


def test_side_channel_ports_up_to_65535_are_fine():
    topology = outcome(P_D.replace("65535", "65534"))
    assert side_channel_ports(topology) == {"prefill-0": 65534, "decode-0": 65535}


# ---------------------------------------------------------------- folders (#12 cross_check, #19.3)


@pytest.mark.parametrize("key,path,normal", [
    ("shared_storage_path", "/data/x/nonexistent/../important", "/data/x/important"),
    ("shared_storage_path", "/tmp/./ec", "/tmp/ec"),
    ("shared_storage_path", "/tmp//ec", "/tmp/ec"),
    ("shared_storage_path", "//tmp/ec", "/tmp/ec"),
    ("shared_storage_path", "/tmp/ec/..", "/tmp"),
    ("allowed_local_path", "/srv/media/../../etc", "/etc"),
])
def test_folders_must_be_normalised(key, path, normal):
    text = GOOD.replace("/tmp/ec", path) if key == "shared_storage_path" else GOOD + f"media: {{allowed_local_path: '{path}'}}\n"
    where = "ec_transfer.shared_storage_path" if key == "shared_storage_path" else "media.allowed_local_path"
    assert f": {where}: is not in normal form (no '.', '..' or '//'): use the normalised path {normal!r}" in error_of(text)


def test_storage_kv_folder_must_be_normalised_too():
    text = P_D.replace("side_channel_port_base: 65535", "extra_config: {shared_storage_path: /kv/../etc}")
    assert "t.yaml:3: kv_transfer.extra_config.shared_storage_path: is not in normal form" in error_of(text)


def test_nul_in_a_folder_is_refused():
    assert "t.yaml:4: ec_transfer.shared_storage_path: contains a NUL byte" in error_of(GOOD.replace("/tmp/ec", '"/tmp/e\\0c"'))


def test_a_trailing_slash_is_fine():
    assert outcome(GOOD.replace("/tmp/ec", "/tmp/ec/"), check_folders=True).ec_transfer.shared_storage_path == "/tmp/ec/"


def test_ec_folder_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    message = error_of(GOOD.replace("/tmp/ec", str(tmp_path / "file")), check_folders=True)
    assert message == f"t.yaml:4: ec_transfer.shared_storage_path: {tmp_path / 'file'} exists and is not a folder"
    message = error_of(GOOD.replace("/tmp/ec", str(tmp_path / "file" / "ec")), check_folders=True)
    assert message == f"t.yaml:4: ec_transfer.shared_storage_path: cannot be created: {tmp_path / 'file'} is not a folder"


def test_ec_folder_that_is_not_writable_is_refused(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root: make access() answer as it would for anyone else
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(locked) else real_access(path, mode))
    assert error_of(GOOD.replace("/tmp/ec", str(locked)), check_folders=True).endswith(f"the folder {locked} is not writable by you")
    assert error_of(GOOD.replace("/tmp/ec", f"{locked}/a/b"), check_folders=True).endswith(
        f"cannot be created: {locked} is not writable by you")


def test_ec_folder_is_only_looked_at_when_asked(tmp_path):
    (tmp_path / "file").write_text("")
    assert outcome(GOOD.replace("/tmp/ec", str(tmp_path / "file"))).ec_transfer is not None
    assert outcome(GOOD.replace("/tmp/ec", str(tmp_path / "new" / "ec")), check_folders=True).encode


def test_ec_folder_that_is_a_file_through_the_cli(tmp_path):
    (tmp_path / "file").write_text("")
    path = tmp_path / "t.yaml"
    path.write_text(GOOD.replace("/tmp/ec", str(tmp_path / "file")))
    assert cli_refusal("validate", str(path)) == f"epdctl: {path}:4: ec_transfer.shared_storage_path: {tmp_path / 'file'} exists and is not a folder"


# ---------------------------------------------------------------- reading the file (#12.16)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "topology.yaml"
    os.mkfifo(fifo)
    done = threading.Event()
    errors = []

    def load():
        try:
            load_topology(fifo)
        except EpdctlError as exc:
            errors.append(exc.message)
        done.set()

    threading.Thread(target=load, daemon=True).start()
    if not done.wait(10):
        with open(fifo, "w"):  # release the reader so the thread can end
            pass
        pytest.fail("reading a FIFO blocked")
    assert errors == [f"{fifo}: is not a regular file (a FIFO, socket or device?)"]


def test_a_fifo_through_the_cli(tmp_path):
    fifo = tmp_path / "topology.yaml"
    os.mkfifo(fifo)
    assert cli_refusal("validate", str(fifo)) == f"epdctl: {fifo}: is not a regular file (a FIFO, socket or device?)"


def test_a_device_is_refused():
    with pytest.raises(EpdctlError, match="is not a regular file"):
        load_topology("/dev/zero")


def test_a_huge_file_is_refused(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text(GOOD + "#" * (1024 * 1024) + "\n")
    with pytest.raises(EpdctlError, match=r"is larger than 1024 KiB") as info:
        load_topology(path)
    assert info.value.exit_code == EXIT_USAGE


def test_bad_utf8_gives_its_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(GOOD.encode() + b"# caf\xe9\n")
    with pytest.raises(EpdctlError) as info:
        load_topology(path)
    assert info.value.message == f"{path}:7: cannot read: not UTF-8 text (byte 0xe9)"


# ---------------------------------------------------------------- the generated script (#12.14)


FAKE_SETSID = """#!/bin/sh
printf '%s\\0' "${EVIL-unset}" > "$RECORD/.env.$$" && mv "$RECORD/.env.$$" "$RECORD/env.$$"
printf '%s\\0' "$@" > "$RECORD/.argv.$$" && mv "$RECORD/.argv.$$" "$RECORD/argv.$$"
"""


@pytest.fixture
def fake_tools(tmp_path) -> dict:
    """An environment where `setsid` only records its argv (and $EVIL), and `curl` says healthy."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "setsid").write_text(FAKE_SETSID)
    (fake / "curl").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("setsid", "curl"):
        (fake / tool).chmod(0o755)
    return {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "RECORD": str(tmp_path / "record"),
            "LOG_DIR": str(tmp_path / "logs")}


def run_script(script: str, env: dict, cwd: Path, starts: int) -> tuple[subprocess.CompletedProcess, list, list]:
    """Run a generated script; return its result and what each of its `starts` received: argv, and $EVIL."""
    record = Path(env["RECORD"])
    record.mkdir(exist_ok=True)
    for leftover in record.iterdir():
        leftover.unlink()
    (cwd / "run.sh").write_text(script)
    result = subprocess.run(["bash", str(cwd / "run.sh")], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)

    deadline = time.monotonic() + 10  # the script does not wait for its (fake) children to finish
    while len(list(record.glob("argv.*"))) < starts and time.monotonic() < deadline:
        time.sleep(0.05)

    def received(kind: str) -> list[list[str]]:
        return sorted(p.read_text().split("\0")[:-1] for p in record.glob(f"{kind}.*"))

    return result, received("argv"), received("env")


def test_sh_script_runs_nothing_that_came_from_the_file(tmp_path, fake_tools):
    ec = tmp_path / "ec $(touch pwned-ec) 'q'"
    path = tmp_path / "evil\ntouch pwned-name\n$(touch pwned-name2).yaml"
    path.write_text(GOOD.replace("/tmp/ec", f'"{ec}"')
                    .replace("model: m", """model: "m'; touch pwned-model; '\\"`touch pwned-bt`" """)
                    .replace("{port: 9002}", """{port: 9002, env: {EVIL: "$$(touch pwned-env)\\n'"}, """
                                             """args: {x: ["$$(touch pwned-arg)", ";", "&&"]}}"""))
    script = epdctl("plan", str(path), "--format", "sh", check=0).stdout
    plan = build_plan(load_topology(path), python=sys.executable)
    # The proxy's host is checked elsewhere (or not): the script must quote it all the same.
    evil_proxy = dataclasses.replace(plan.proxy, host="$(touch pwned-host)")
    for text in (script, render_script(dataclasses.replace(plan, proxy=evil_proxy), str(path))):
        result, argvs, envs = run_script(text, fake_tools, tmp_path, len(plan.processes))
        assert " is up: " in result.stdout, result.stdout + result.stderr
        assert not list(tmp_path.glob("pwned-*")), result.stdout + result.stderr
        assert argvs == sorted(list(spec.argv) for spec in plan.processes)
        assert ["$(touch pwned-env)\n'"] in envs
    assert "$(touch pwned-host)" in result.stdout
    assert ec.is_dir()


# ---------------------------------------------------------------- the command line (#19)


@pytest.mark.parametrize("count", ["abc", "-1", "2.5", "two"])
def test_bad_device_count_variable_is_an_error(count):
    line = cli_refusal("validate", str(TOPOLOGIES / "1e1pd.yaml"), env={"EPDCTL_DEVICE_COUNT": count})
    assert line.startswith("epdctl: EPDCTL_DEVICE_COUNT: must be a whole number of devices") and repr(count) in line
    with pytest.raises(EpdctlError):
        detect_device_count("cpu", {"EPDCTL_DEVICE_COUNT": count})


def test_zero_devices_reads_well():
    message = error_of("model: m\npd: [{port: 1, devices: [0]}]\n", device_count=0)
    assert message == "t.yaml:2: pd[0].devices: device 0 is outside this machine (it has no devices)"


@pytest.mark.parametrize("fmt", ["text", "sh"])
def test_plan_json_conflicts_with_another_format(fmt):
    line = cli_refusal("plan", str(TOPOLOGIES / "agg.yaml"), "--json", "--format", fmt)
    assert line == f"epdctl: --json and --format {fmt} ask for different outputs: give one of them"
    epdctl("plan", str(TOPOLOGIES / "agg.yaml"), "--json", "--format", "json", check=0)


def test_version():
    result = epdctl("--version", check=0)
    assert result.stdout == f"epdctl {version('epdctl')}\n"


@pytest.mark.parametrize("args,expected", [
    (["down", "-t", "-1", "x"], "epdctl: -t/--timeout: must be between 0 and 86400 (got -1)"),
    (["down", "--timeout=nan"], "epdctl: -t/--timeout: must be between 0 and 86400 (got nan)"),
    (["logs", "x", "--tail", "-5"], "epdctl: --tail: must be between 0 and 1000000000 (got -5)"),
])
def test_negative_durations_and_counts_are_refused(args, expected, state_dir):
    assert cli_refusal(*args) == expected


def test_flow_variable_hint_through_the_cli(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(GOOD.replace("{port: 9002}", "{port: ${PD_PORT:-9002}}"))
    assert "quote a variable" in cli_refusal("validate", str(path))


# ---------------------------------------------------------------- checks made at validate, not at up (#28)


def test_a_misspelt_sim_flag_is_refused_before_anything_starts(tmp_path, state_dir):
    """It used to start, the sim noting "ignoring flags" in its log; a negative one died at up with argparse's usage."""
    from conftest import assert_no_orphans, write_sim_topology

    for timings, problem in (("sim-ttft-ms: 5, sim-encode-msx: 5",
                              "defaults.args.sim-encode-msx: the sim has no flag --sim-encode-msx "
                              "(did you mean sim-encode-ms?)"),
                             ("sim-ttft-ms: 5, sim-encode-ms: -5",
                              "defaults.args.sim-encode-ms: must be a number of milliseconds, 0 or more (got -5)")):
        path, ports = write_sim_topology(tmp_path, "1e1pd", name="flags", timings=timings)
        assert cli_refusal("validate", str(path)) == f"epdctl: {path}:5: {problem}"
        assert cli_refusal("up", "-d", str(path)) == f"epdctl: {path}:5: {problem}"
        assert_no_orphans(str(state_dir), list(ports.values()))


def test_every_line_of_a_report_of_several_problems_names_epdctl(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(GOOD.replace("encode: [", "encoder: [").replace("{port: 9002}", "{port: 9002, prot: 1}"))
    result = epdctl("validate", str(path), timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [f"epdctl: {path}:5: encoder: unknown key (did you mean encode?)",
                                          f"epdctl: {path}:6: pd[0].prot: unknown key (did you mean port?)"]
    path.write_text(GOOD.replace("{port: 9002}", "{port: 9001, args: {sim-tpot-ms: -1}}"))
    lines = epdctl("validate", str(path), timeout=60, check=2).stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"epdctl: {path}:6: pd[0].") for line in lines), lines


def test_a_sim_topology_without_a_platform_plans_on_cpu(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(GOOD.replace("platform: cpu\n", ""))
    plan = json.loads(epdctl("plan", str(path), "--json", timeout=60, check=0).stdout)
    assert plan["platform"] == "cpu"


# ---------------------------------------------------------------- fuzzing the loader


FRAGMENTS = [
    "model: m\n", "engine: sim\n", "platform: cpu\n", "pd: [{port: 9002}]\n", "encode: [{port: 9001}]\n",
    "ec_transfer: {connector: ECExampleConnector, shared_storage_path: /tmp/ec}\n", "&a ", "*a", "&b ", "*b", "<<: ",
    "[", "]", "{", "}", ", ", ": ", "- ", "\n", "  ", "'", '"', "\\", "\\0", "${X}", "${Y:-7}", "$", "!!binary ",
    "!!python/object:os.system ", "!!int ", "!!set ", "? ", "|\n", ">\n", "#", "%YAML 1.1\n", "---\n", "...\n", "\t",
    "\0", "\x07", "\ud800", "1:2:3", "2024-02-30", "0x1F", "0b1", ".inf", ".nan", "~", "=", "é", "\u2028", "\r",
    "true", "80.5", "65535", "-1", "port", "args", "env", "devices", "side_channel_port_base", "kv_transfer",
]
yamlish = st.one_of(
    st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join),
    st.text(max_size=200),
    st.tuples(st.sampled_from([GOOD, P_D]), st.integers(0, 200), st.lists(st.sampled_from(FRAGMENTS), max_size=5))
    .map(lambda t: t[0][:t[1]] + "".join(t[2]) + t[0][t[1]:]),
)

hostile_text = st.sampled_from(["", " ", "\0", "a\0b", "$(touch pwned)", "'\"`", "\n", "\u2028", "${X}", "$$", "..",
                                "/a/../b", "//x", "/tmp/ec", "-x", "=", "A=B", "é", "serve", "9002", "true", "\ud800"])
scalars = st.one_of(st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(), st.none(), hostile_text, st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile_text, inner, max_size=3),
                      max_leaves=8)
ports = st.one_of(st.integers(-1, 70000), st.sampled_from([True, 80.5, 80.0, "9003", "x", None]))
BASES = [
    {"model": "m", "engine": "sim", "platform": "cpu",
     "ec_transfer": {"connector": "ECExampleConnector", "shared_storage_path": "/tmp/ec"},
     "encode": [{"port": 9001}], "pd": [{"port": 9002}]},
    {"model": "m", "platform": "cuda", "kv_transfer": {"connector": "NixlConnector"},
     "prefill": [{"port": 9001, "devices": [0]}], "decode": [{"port": 9002, "devices": [1]}]},
]
# Where a hostile value goes: a valid topology with one to three of them reaches every check.
SLOTS = {
    ("model",): hostile_text, ("name",): hostile_text, ("vllm_command",): st.lists(hostile_text, max_size=3),
    ("defaults", "args"): st.dictionaries(hostile_text, values, max_size=3),
    ("defaults", "env"): st.dictionaries(hostile_text, scalars, max_size=3),
    ("ec_transfer", "shared_storage_path"): hostile_text, ("ec_transfer", "extra_config"): st.dictionaries(hostile_text, values),
    ("kv_transfer", "side_channel_port_base"): ports, ("kv_transfer", "extra_config"): st.dictionaries(hostile_text, values),
    ("media", "allowed_local_path"): hostile_text, ("proxy", "host"): hostile_text, ("proxy", "port"): ports,
    ("first", "port"): ports, ("first", "side_channel_port"): ports, ("last", "port"): ports,
    ("first", "devices"): st.lists(st.one_of(st.integers(-1, 3), st.booleans(), st.floats(0, 3)), max_size=3),
    ("last", "args"): st.dictionaries(hostile_text, values, max_size=3),
    ("last", "env"): st.dictionaries(hostile_text, scalars, max_size=3),
    ("last", "gpu_memory_utilization"): st.floats(),
}
sim_flag_names = st.sampled_from(sorted(SIM_FLAGS) + ["sim-encode-msx", "sim_ttft_ms", "--sim-tpot-ms", "no-sim-ignore-sigterm"])


@st.composite
def topologies(draw):
    data = yaml.safe_load(yaml.safe_dump(draw(st.sampled_from(BASES))))  # a fresh copy
    roles = [role for role in ("encode", "prefill", "decode", "pd") if role in data]
    for path in draw(st.lists(st.sampled_from(sorted(SLOTS)), min_size=1, max_size=3)):
        where = data[roles[0]][0] if path[0] == "first" else data[roles[-1]][0] if path[0] == "last" else data
        for key in path[1:-1] if path[0] in ("first", "last") else path[:-1]:
            where = where.setdefault(key, {})
        where[path[-1]] = draw(SLOTS[path])
    return data


FUZZ = settings(max_examples=200, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@FUZZ
@given(yamlish)
def test_fuzz_yamlish_text(text):
    result = outcome(text)
    if not isinstance(result, str):
        assert_runnable(result)


@FUZZ
@given(topologies(), st.booleans())
def test_fuzz_structured_topologies(data, flow):
    try:
        text = yaml.safe_dump(data, default_flow_style=flow, allow_unicode=True)
    except yaml.YAMLError:  # e.g. a lone surrogate PyYAML cannot write
        text = yaml.safe_dump(data, default_flow_style=flow, allow_unicode=False)
    result = outcome(text)
    if not isinstance(result, str):
        assert_runnable(result)


@FUZZ
@given(st.dictionaries(sim_flag_names, values, max_size=4))
def test_fuzz_sim_flags(args):
    """Whatever validate lets through, the sim's own parser takes: a bad `sim-*` value never waits for `up`."""
    result = outcome(yaml.safe_dump({**yaml.safe_load(GOOD), "defaults": {"args": args}}))
    if not isinstance(result, str):
        assert_runnable(result)
