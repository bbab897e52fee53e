"""Topology → Plan: golden argv/env per role, platform and connector; precedence; JSON and sh."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from epdctl.config.load import load_topology, parse_topology
from epdctl.plan import build_plan, flags_to_argv, merge_flags

from conftest import TOPOLOGIES

EC = '{"ec_connector":"ECExampleConnector","ec_role":"%s","ec_connector_extra_config":{"shared_storage_path":"/tmp/ec_cache"}}'
MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"


def plan_of(name: str):
    return build_plan(load_topology(TOPOLOGIES / name), python="python")


def by_name(plan):
    return {spec.name: spec for spec in plan.processes}


def test_1e1p1d_gets_exactly_the_seeds_flags():
    procs = by_name(plan_of("1e1p1d.yaml"))
    assert list(procs["encode-0"].argv) == [
        "vllm", "serve", MODEL, "--port", "19534", "--enforce-eager", "--max-num-seqs", "128",
        "--enable-request-id-headers", "--no-enable-prefix-caching", "--max-num-batched-tokens", "114688",
        "--ec-transfer-config", EC % "ec_producer", "--gpu-memory-utilization", "0.01",
    ]
    assert dict(procs["encode-0"].env) == {"CUDA_VISIBLE_DEVICES": "0"}
    assert list(procs["prefill-0"].argv) == [
        "vllm", "serve", MODEL, "--port", "19535", "--enforce-eager", "--max-num-seqs", "128",
        "--enable-request-id-headers", "--ec-transfer-config", EC % "ec_consumer",
        "--kv-transfer-config", '{"kv_connector":"NixlConnector","kv_role":"kv_producer"}',
        "--gpu-memory-utilization", "0.7", "--max-model-len", "32768",
    ]
    assert dict(procs["prefill-0"].env) == {"CUDA_VISIBLE_DEVICES": "1", "VLLM_NIXL_SIDE_CHANNEL_PORT": "5559",
                                           "UCX_NET_DEVICES": "all"}
    assert list(procs["decode-0"].argv) == [
        "vllm", "serve", MODEL, "--port", "19536", "--enforce-eager", "--max-num-seqs", "128",
        "--enable-request-id-headers", "--kv-transfer-config", '{"kv_connector":"NixlConnector","kv_role":"kv_consumer"}',
        "--gpu-memory-utilization", "0.7", "--max-model-len", "32768",
    ]
    assert dict(procs["decode-0"].env) == {"CUDA_VISIBLE_DEVICES": "2", "VLLM_NIXL_SIDE_CHANNEL_PORT": "6000",
                                          "UCX_NET_DEVICES": "all"}
    assert list(procs["proxy"].argv) == [
        "python", "-m", "epdctl.proxy", "--host", "127.0.0.1", "--port", "10001",
        "--encode-servers-urls", "http://127.0.0.1:19534", "--prefill-servers-urls", "http://127.0.0.1:19535",
        "--decode-servers-urls", "http://127.0.0.1:19536", "--policy", "least-loaded",
        "--encode-timeout-s", "300", "--prefill-timeout-s", "600", "--decode-timeout-s", "600",
        "--max-body-mb", "64", "--max-media-items", "64", "--encode-servers-names", "encode-0",
        "--prefill-servers-names", "prefill-0", "--decode-servers-names", "decode-0",
        "--ec-shared-storage-path", "/tmp/ec_cache",
    ]


def test_1e1pd_pd_is_an_ec_consumer_without_kv():
    procs = by_name(plan_of("1e1pd.yaml"))
    pd = list(procs["pd-0"].argv)
    assert pd[pd.index("--ec-transfer-config") + 1] == EC % "ec_consumer"
    assert "--kv-transfer-config" not in pd
    assert "VLLM_NIXL_SIDE_CHANNEL_PORT" not in procs["pd-0"].env
    proxy = list(procs["proxy"].argv)
    assert proxy[proxy.index("--prefill-servers-urls") + 1] == "disable"
    assert proxy[proxy.index("--decode-servers-urls") + 1] == "http://127.0.0.1:19535"


def test_agg_has_no_connectors_at_all():
    procs = by_name(plan_of("agg.yaml"))
    argv = list(procs["pd-0"].argv)
    assert "--ec-transfer-config" not in argv and "--kv-transfer-config" not in argv
    proxy = list(procs["proxy"].argv)
    assert proxy[proxy.index("--encode-servers-urls") + 1] == "disable"
    assert "--ec-shared-storage-path" not in proxy


def test_xpu_pins_with_ze_affinity_mask():
    procs = by_name(plan_of("xpu-1e1pd.yaml"))
    assert dict(procs["encode-0"].env) == {"ZE_AFFINITY_MASK": "0"}
    assert dict(procs["pd-0"].env) == {"ZE_AFFINITY_MASK": "1"}


def test_2e1p1d_two_encoders_share_a_device_and_the_proxy_knows_both():
    procs = by_name(plan_of("2e1p1d.yaml"))
    assert procs["encode-0"].env["CUDA_VISIBLE_DEVICES"] == procs["encode-1"].env["CUDA_VISIBLE_DEVICES"] == "0"
    proxy = list(procs["proxy"].argv)
    assert proxy[proxy.index("--encode-servers-urls") + 1] == "http://127.0.0.1:19534,http://127.0.0.1:19537"
    ports = {procs["prefill-0"].env["VLLM_NIXL_SIDE_CHANNEL_PORT"], procs["decode-0"].env["VLLM_NIXL_SIDE_CHANNEL_PORT"]}
    assert len(ports) == 2


def test_sim_engine_uses_the_sim_prefix_and_no_device_variable():
    plan = plan_of("sim-1e1pd.yaml")
    for spec in plan.instances:
        assert list(spec.argv[:4]) == ["python", "-m", "epdctl.sim", "sim/Qwen2.5-VL-3B-Instruct"]
        assert "CUDA_VISIBLE_DEVICES" not in spec.env and "ZE_AFFINITY_MASK" not in spec.env
        assert "--sim-ttft-ms" in spec.argv


TEMPLATE = """\
model: m
platform: {platform}
defaults:
  args: {{max-num-seqs: 64, enforce-eager: true, max-num-batched-tokens: 200000, gpu-memory-utilization: 0.5}}
  env: {{HF_HUB_OFFLINE: 1, SHARED: base}}
ec_transfer: {{connector: ECExampleConnector, shared_storage_path: /ec, extra_config: {{x: 1}}}}
kv_transfer: {{connector: {kv}, config: {{kv_buffer_device: cpu}}, extra_config: {{backends: [UCX]}}}}
media: {{allowed_local_path: /media}}
encode:
  - {{devices: [0, 1], port: 9001, gpu_memory_utilization: 0.2, args: {{enforce-eager: false, max_num_seqs: 8}}}}
prefill:
  - {{devices: [2], port: 9002, env: {{SHARED: mine}}}}
decode:
  - {{devices: [3], port: 9003, args: {{max-num-seqs: null}}}}
"""


def plan_from_template(platform="cuda", kv="NixlConnector"):
    return by_name(build_plan(parse_topology(TEMPLATE.format(platform=platform, kv=kv), "t.yaml", environ={}),
                              python="python"))


def flag(argv, name):
    argv = list(argv)
    return argv[argv.index(name) + 1] if name in argv else None


def test_precedence_defaults_then_role_then_instance():
    procs = plan_from_template()
    encode = procs["encode-0"].argv
    # The instance's own args win over both the role's flags and the defaults, replacing them in place.
    assert "--no-enforce-eager" in encode and "--enforce-eager" not in encode
    assert flag(encode, "--max-num-seqs") == "8"
    assert list(encode).count("--max-num-seqs") == 1
    # The encoder's batched-token floor never lowers a larger default.
    assert flag(encode, "--max-num-batched-tokens") == "200000"
    assert flag(encode, "--gpu-memory-utilization") == "0.2"
    assert flag(encode, "--tensor-parallel-size") == "2"
    assert procs["encode-0"].env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert json.loads(flag(encode, "--ec-transfer-config")) == {
        "ec_connector": "ECExampleConnector", "ec_role": "ec_producer",
        "ec_connector_extra_config": {"shared_storage_path": "/ec", "x": 1}}
    # `null` removes a lower level's flag.
    assert "--max-num-seqs" not in procs["decode-0"].argv
    assert flag(procs["prefill-0"].argv, "--gpu-memory-utilization") == "0.5"
    # Env: defaults, then epdctl's, then the instance's; numbers become strings.
    assert procs["prefill-0"].env["SHARED"] == "mine" and procs["decode-0"].env["SHARED"] == "base"
    assert procs["prefill-0"].env["HF_HUB_OFFLINE"] == "1"


def test_each_instance_carries_its_ec_connector_and_folder_as_typed_fields():
    """smoke reads the EC folder and connector from the plan, not back out of argv: an instance's own
    --ec-transfer-config (a dict or JSON text in `args:`) is what it was given, so it is what it carries."""
    text = TEMPLATE.format(platform="cuda", kv="NixlConnector").replace(
        "port: 9002, env:", "port: 9002, args: {ec-transfer-config: '{\"ec_connector\": \"Mine\", "
        "\"ec_connector_extra_config\": {\"shared_storage_path\": \"/own\"}}'}, env:")
    procs = by_name(build_plan(parse_topology(text, "t.yaml", environ={}), python="python"))
    for name, (connector, folder) in {"encode-0": ("ECExampleConnector", "/ec"), "prefill-0": ("Mine", "/own"),
                                      "decode-0": (None, None)}.items():
        config = json.loads(flag(procs[name].argv, "--ec-transfer-config") or "{}")
        assert (procs[name].ec_connector, procs[name].ec_storage_path) == (connector, folder)
        assert (config.get("ec_connector"), config.get("ec_connector_extra_config", {}).get("shared_storage_path")) \
            == (connector, folder)
    assert "ec_connector" not in procs["encode-0"].to_json()  # `plan --json` is unchanged


def test_kv_config_fields_and_media_path():
    procs = plan_from_template()
    kv = json.loads(flag(procs["prefill-0"].argv, "--kv-transfer-config"))
    assert kv == {"kv_connector": "NixlConnector", "kv_role": "kv_producer", "kv_buffer_device": "cpu",
                  "kv_connector_extra_config": {"backends": ["UCX"]}}
    assert flag(procs["encode-0"].argv, "--allowed-local-media-path") == "/media"
    assert flag(procs["prefill-0"].argv, "--allowed-local-media-path") == "/media"
    assert "--allowed-local-media-path" not in procs["decode-0"].argv
    assert flag(procs["proxy"].argv, "--allowed-local-media-path") == "/media"


def test_non_nixl_connector_gets_no_side_channel():
    procs = plan_from_template(kv="ExampleConnector")
    assert "VLLM_NIXL_SIDE_CHANNEL_PORT" not in procs["prefill-0"].env
    assert json.loads(flag(procs["decode-0"].argv, "--kv-transfer-config"))["kv_connector"] == "ExampleConnector"


def test_cpu_platform_sets_no_device_variable():
    procs = plan_from_template(platform="cpu")
    assert "CUDA_VISIBLE_DEVICES" not in procs["encode-0"].env


def test_other_entry_point_gets_model_flag():
    text = "model: /models/tiny\nplatform: cpu\nvllm_command: [python, -m, vllm.entrypoints.openai.api_server]\npd: [{port: 9}]\n"
    argv = list(build_plan(parse_topology(text, "t.yaml", environ={})).instances[0].argv)
    assert argv[:5] == ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/tiny"]


def test_flags_to_argv_rules():
    assert flags_to_argv({"a": True, "b": False, "c": 3, "d": {"k": [1]}, "e": None, "f": ["x", "y"]}) == [
        "--a", "--no-b", "--c", "3", "--d", '{"k":[1]}', "--f", "x", "y"]
    assert merge_flags({"max_num_seqs": 1}, {"--max-num-seqs": 2}) == {"max-num-seqs": 2}
    assert merge_flags({"enable-prefix-caching": True}, {"no-enable-prefix-caching": True}) == {"enable-prefix-caching": False}


def test_plan_json_matches_the_contract():
    data = plan_of("1e1p1d.yaml").to_json()
    assert set(data) == {"name", "engine", "platform", "instances", "proxy"}
    for instance in data["instances"]:
        assert set(instance) == {"name", "role", "devices", "argv", "env", "host", "port", "url"}
        assert instance["url"] == f"http://127.0.0.1:{instance['port']}"
    assert set(data["proxy"]) == {"name", "argv", "env", "host", "port", "url"}
    assert data["proxy"]["name"] == "proxy"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("name", ["1e1p1d.yaml", "sim-1e1pd.yaml"])
def test_sh_script_is_valid_bash(name, tmp_path):
    from epdctl.export.sh import render_script

    script = tmp_path / "run.sh"
    script.write_text(render_script(plan_of(name), name))
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    text = script.read_text()
    assert "trap cleanup EXIT" in text and "setsid" in text
    if not name.startswith("sim"):
        assert "env CUDA_VISIBLE_DEVICES=0 setsid vllm" in text
