"""The CLI as a user runs it: exit codes, one-line errors, no tracebacks, lazy imports, plan output."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import TOPOLOGIES, assert_no_orphans, epdctl, http_post, wait_healthy, write_sim_topology


def test_validate_ok_and_bad(tmp_path):
    ok = epdctl("validate", str(TOPOLOGIES / "1e1p1d.yaml"), check=0)
    assert "ok" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\nmodel: n\n")
    result = epdctl("validate", str(bad), check=2)
    assert result.stderr.strip() == f"epdctl: {bad}:2: model: duplicate key (first set on line 1)"
    assert "Traceback" not in result.stderr


def test_missing_file_exits_2_without_traceback(tmp_path):
    result = epdctl("plan", str(tmp_path / "nope.yaml"), check=2)
    assert "no such file" in result.stderr and "Traceback" not in result.stderr


def test_verbose_shows_the_traceback(tmp_path):
    result = epdctl("-v", "validate", str(tmp_path / "nope.yaml"), check=2)
    assert "Traceback" in result.stderr


def test_unknown_command_is_usage_error():
    assert epdctl("frobnicate").returncode == 2


def test_plan_json_and_text():
    result = epdctl("plan", str(TOPOLOGIES / "1e1pd.yaml"), "--json", check=0)
    data = json.loads(result.stdout)
    assert [i["name"] for i in data["instances"]] == ["encode-0", "pd-0"]
    assert data["proxy"]["url"] == "http://127.0.0.1:10001"
    text = epdctl("plan", str(TOPOLOGIES / "1e1pd.yaml"), check=0).stdout
    assert "CUDA_VISIBLE_DEVICES=1 vllm serve Qwen/Qwen2.5-VL-3B-Instruct --port 19535" in text
    assert epdctl("plan", str(TOPOLOGIES / "1e1pd.yaml"), "--format", "yaml").returncode == 2


def test_device_count_is_checked_when_known():
    result = epdctl("validate", str(TOPOLOGIES / "1e1p1d.yaml"), env={"EPDCTL_DEVICE_COUNT": "2"}, check=2)
    assert "decode[0].devices: device 2 is outside this machine (2 devices: 0..1)" in result.stderr


@pytest.mark.parametrize("args", [["--help"], ["plan", str(TOPOLOGIES / "1e1p1d.yaml"), "--json"]])
def test_help_and_plan_never_import_heavy_modules(args):
    code = (
        "import sys; sys.argv = ['epdctl'] + %r\n"
        "from epdctl.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('aiohttp', 'vllm', 'torch', 'epdctl.proxy', 'epdctl.run.supervisor', 'epdctl.up', 'epdctl.down') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n" % (args,)
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in result.stderr, result.stderr


def test_every_command_has_help():
    for command in ("validate", "plan", "up", "status", "logs", "down", "proxy"):
        result = epdctl(command, "--help")
        assert result.returncode == 0, (command, result.stderr)
        assert "Usage" in result.stdout or "usage" in result.stdout


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("setsid") is None, reason="needs curl and setsid")
def test_generated_sh_script_runs_and_cleans_up(tmp_path):
    """`plan --format sh` is a real script: it starts the sim topology, gates on health, and stops all on SIGTERM."""
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="shscript")
    script = tmp_path / "run.sh"
    script.write_text(epdctl("plan", str(topology), "--format", "sh", check=0).stdout)
    marker = str(tmp_path)
    proc = subprocess.Popen(["bash", str(script)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env={**os.environ, "LOG_DIR": str(tmp_path / "logs")})
    try:
        wait_healthy(f"http://127.0.0.1:{ports['proxy']}", timeout=30, proc=proc)
        status, _ = http_post(f"http://127.0.0.1:{ports['proxy']}/v1/chat/completions",
                              {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert status == 200
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 143, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert_no_orphans(marker, list(ports.values()))


@pytest.mark.parametrize("fast,full", [
    (["plan", str(TOPOLOGIES / "1e1pd.yaml"), "--format", "json"], ["plan", str(TOPOLOGIES / "1e1pd.yaml"), "--format=json"]),
    (["plan", str(TOPOLOGIES / "1e1pd.yaml"), "--format", "yaml"], ["plan", "--format=yaml", str(TOPOLOGIES / "1e1pd.yaml")]),
    (["validate", str(TOPOLOGIES / "agg.yaml")], ["validate", "--", str(TOPOLOGIES / "agg.yaml")]),
    (["validate", "nope.yaml"], ["validate", "--", "nope.yaml"]),
])
def test_fast_path_answers_as_typer_does(fast, full):
    """`validate` and `plan` skip typer in their plain forms (start-up time): same output, same exit code."""
    a, b = epdctl(*fast), epdctl(*full)
    assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr)


def test_plan_json_and_format_json_agree():
    assert epdctl("plan", str(TOPOLOGIES / "agg.yaml"), "--json", "--format", "json", check=0).stdout == \
        epdctl("plan", str(TOPOLOGIES / "agg.yaml"), "--json", check=0).stdout
