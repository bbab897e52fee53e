"""platform npu and vllm-ascend's Mooncake KV connectors: the plan against vllm-ascend's EPD guide,
the transfer-config field check, the rules validate keeps and the exports (the layerwise proxy's
pure pieces are in tests/unit/test_layerwise_rules.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from epdctl.config.load import load_topology, parse_topology
from epdctl.devices import count_npu_chips, detect_device_count
from epdctl.errors import EXIT_USAGE, EpdctlError
from epdctl.export.k8s import manifests
from epdctl.export.slurm import render_job
from epdctl.plan import build_plan

from conftest import TOPOLOGIES

# vllm-ascend's EPD guide (examples/epd_disaggregated/epd_disaggregated_guide.md, "run 1e1p1d case"),
# the P and D --kv-transfer-config as it writes them; the 1e1p1d example script adds the module
# path (there misspelt kv_connnector_module_path, which vLLM's config does not know).
GUIDE_KV = {
    "kv_producer": {"kv_connector": "MooncakeLayerwiseConnector", "kv_role": "kv_producer", "kv_port": "50001",
                    "kv_connector_extra_config": {"use_ascend_direct": True, "prefill": {"dp_size": 1, "tp_size": 1},
                                                  "decode": {"dp_size": 1, "tp_size": 1}}},
    "kv_consumer": {"kv_connector": "MooncakeLayerwiseConnector", "kv_role": "kv_consumer", "kv_port": "50001",
                    "kv_connector_extra_config": {"use_ascend_direct": True, "prefill": {"dp_size": 1, "tp_size": 1},
                                                  "decode": {"dp_size": 1, "tp_size": 1}}},
}
GUIDE_MODULE = "vllm_ascend.distributed.kv_transfer.kv_p2p.mooncake_layerwise_connector"
GUIDE_EC = {"ec_connector": "ECExampleConnector", "ec_connector_extra_config": {"shared_storage_path": "/tmp/ec_cache"}}
# The guide's E flags (its run_e.sh), less the model, port and served name.
GUIDE_ENCODER_FLAGS = ["--gpu-memory-utilization", "0.01", "--enforce-eager", "--enable-request-id-headers",
                       "--no-enable-prefix-caching", "--max-num-batched-tokens", "114688", "--max-num-seqs", "128",
                       "--max-model-len", "32768"]

BASE = """\
model: m
engine: vllm
platform: npu
kv_transfer:
  connector: {connector}
prefill:
  - {{devices: [0], port: 9001}}
decode:
  - {{devices: [1], port: 9002}}
"""


def load(text: str, **kw):
    return parse_topology(text, "t.yaml", environ={}, **kw)


def error_of(text: str) -> str:
    with pytest.raises(EpdctlError) as info:
        load(text)
    assert info.value.exit_code == EXIT_USAGE
    return info.value.message


def json_flag(argv, flag: str) -> dict:
    return json.loads(argv[argv.index(flag) + 1])


def specs(topology):
    return {spec.name: spec for spec in build_plan(topology, python="python").instances}


# ---------------------------------------------------------------- the guide


def test_npu_plan_is_the_guides_env_and_transfer_json():
    topology = load_topology(TOPOLOGIES / "npu-1e1p1d.yaml", environ={}, device_count=8)
    plan = build_plan(topology, python="python")
    by_name = {spec.name: spec for spec in plan.instances}
    # Each instance's devices in ASCEND_RT_VISIBLE_DEVICES, and nothing else (nothing of CUDA's).
    assert {name: dict(spec.env) for name, spec in by_name.items()} == {
        "encode-0": {"ASCEND_RT_VISIBLE_DEVICES": "0"}, "prefill-0": {"ASCEND_RT_VISIBLE_DEVICES": "1"},
        "decode-0": {"ASCEND_RT_VISIBLE_DEVICES": "2"}}
    ports = []
    for name, role in (("prefill-0", "kv_producer"), ("decode-0", "kv_consumer")):
        planned = json_flag(by_name[name].argv, "--kv-transfer-config")
        guide = dict(GUIDE_KV[role])
        # kv_port is an int field of KVTransferConfig (the guide's JSON quotes it), planned per instance.
        assert isinstance(planned["kv_port"], int)
        ports.append(planned.pop("kv_port"))
        guide.pop("kv_port")
        assert planned == {**guide, "kv_connector_module_path": GUIDE_MODULE}
    assert ports[0] == 50001 and ports[1] != ports[0]  # one kv_port each: two on one host must not collide
    for name, role in (("encode-0", "ec_producer"), ("prefill-0", "ec_consumer")):
        assert json_flag(by_name[name].argv, "--ec-transfer-config") == {**GUIDE_EC, "ec_role": role}
    assert "--ec-transfer-config" not in by_name["decode-0"].argv
    encoder = list(by_name["encode-0"].argv)
    for at in range(0, len(GUIDE_ENCODER_FLAGS)):
        flag = GUIDE_ENCODER_FLAGS[at]
        if flag.startswith("--") and at + 1 < len(GUIDE_ENCODER_FLAGS) and not GUIDE_ENCODER_FLAGS[at + 1].startswith("--"):
            assert encoder[encoder.index(flag) + 1] == GUIDE_ENCODER_FLAGS[at + 1], flag
        elif flag.startswith("--"):
            assert flag in encoder
    assert json_flag(by_name["prefill-0"].argv, "--ec-transfer-config")["ec_role"] == "ec_consumer"
    for name in ("prefill-0", "decode-0"):
        argv = by_name[name].argv
        assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.7"
    proxy = list(plan.proxy.argv)
    assert proxy[proxy.index("--kv-connector") + 1] == "MooncakeLayerwiseConnector"
    assert "--metaserver-host" not in proxy  # it binds 127.0.0.1: the URL is built from that


def test_mooncake_v1_gets_its_module_and_the_topologys_sizes():
    topology = load(BASE.format(connector="MooncakeConnectorV1").replace("devices: [0]", "devices: [0, 1]")
                    .replace("devices: [1]", "devices: [2]"))
    by_name = specs(topology)
    config = json_flag(by_name["prefill-0"].argv, "--kv-transfer-config")
    assert config["kv_connector_module_path"] == "vllm_ascend.distributed.kv_transfer.kv_p2p.mooncake_connector"
    assert config["kv_connector_extra_config"] == {"prefill": {"dp_size": 1, "tp_size": 2},
                                                   "decode": {"dp_size": 1, "tp_size": 1}}
    assert by_name["prefill-0"].kv_ports == (5600, 5601)  # one port per rank from kv_port
    assert by_name["decode-0"].kv_ports == (5602,)
    assert by_name["prefill-0"].side_channel_port is None and "VLLM_NIXL_SIDE_CHANNEL_PORT" not in by_name["prefill-0"].env
    # The module path is overridable; an instance's own side_channel_port pins its kv_port.
    text = BASE.format(connector="MooncakeConnectorV1").replace(
        "connector: MooncakeConnectorV1", "connector: MooncakeConnectorV1\n  config: {kv_connector_module_path: my.mod}")
    text = text.replace("port: 9002}", "port: 9002, side_channel_port: 7000}")
    by_name = specs(load(text))
    assert json_flag(by_name["prefill-0"].argv, "--kv-transfer-config")["kv_connector_module_path"] == "my.mod"
    assert json_flag(by_name["decode-0"].argv, "--kv-transfer-config")["kv_port"] == 7000


def test_sim_accepts_the_ascend_connectors_on_any_platform():
    text = BASE.format(connector="MooncakeLayerwiseConnector").replace("engine: vllm", "engine: sim")
    for platform in ("cpu", "cuda", "npu"):
        load(text.replace("platform: npu", f"platform: {platform}"))


# ---------------------------------------------------------------- what validate refuses


@pytest.mark.parametrize("change, expected", [
    (lambda t: t.replace("connector: MooncakeLayerwiseConnector",
                         "connector: MooncakeLayerwiseConnector\n  config: {kv_connnector_module_path: x.y}"),
     "t.yaml:6: kv_transfer.config.kv_connnector_module_path: 'kv_connnector_module_path' is not a field of vLLM's "
     "KVTransferConfig (did you mean kv_connector_module_path?)"),
    (lambda t: t.replace("port: 9002}", "port: 9002, args: {kv-transfer-config: '{\"kv_connector\": \"X\", "
                                        "\"kv_role\": \"kv_consumer\", \"kv_connnector_module_path\": \"m\"}'}}"),
     "t.yaml:9: decode[0].args.kv-transfer-config: 'kv_connnector_module_path' is not a field of vLLM's "
     "KVTransferConfig"),
    (lambda t: t.replace("platform: npu", "platform: cuda"),
     "t.yaml:5: kv_transfer.connector: MooncakeLayerwiseConnector is vllm-ascend's (Ascend NPUs): it needs platform: npu"),
    (lambda t: t + "  - {devices: [2], port: 9003, args: {tensor-parallel-size: 2}}\n",
     "decode: MooncakeLayerwiseConnector takes one dp_size/tp_size for all decode instances"),
    (lambda t: t.replace("connector: MooncakeLayerwiseConnector", "connector: MooncakeConnectorV1")
     .replace("port: 9002}", "port: 9002, args: {tensor-parallel-size: 2}}"),
     "decode: MooncakeConnectorV1 needs the prefill tp_size (1) at least the decode tp_size (2)"),
    (lambda t: t.replace("connector: MooncakeLayerwiseConnector",
                         "connector: MooncakeLayerwiseConnector\n  extra_config: {prefill: {dp_size: 2, tp_size: 1}}"),
     "kv_transfer.extra_config.prefill: prefill's dp_size/tp_size are planned from the topology's prefill instances"),
    (lambda t: t.replace("connector: MooncakeLayerwiseConnector",
                         "connector: MooncakeLayerwiseConnector\n  config: {kv_port: 50001}"),
     "kv_transfer.config.kv_port: kv_port is planned per instance"),
    (lambda t: t.replace("connector: MooncakeLayerwiseConnector",
                         "connector: MooncakeLayerwiseConnector\n  config: {kv_role: kv_both}"),
     "kv_transfer.config.kv_role: kv_role is planned by epdctl"),
    (lambda t: t + "proxy: {host: 0.0.0.0}\n",
     "proxy.host: MooncakeLayerwiseConnector: decoders call the proxy back at its own address, and 0.0.0.0 is none"),
    (lambda t: t + "proxy: {workers: 2}\n", "proxy.workers: MooncakeLayerwiseConnector: a decoder's metaserver call"),
    (lambda t: t.replace("MooncakeLayerwiseConnector", "MooncakeConnectorV1") + "proxy: {metaserver_host: 10.0.0.1}\n",
     "proxy.metaserver_host: is for kv_transfer.connector MooncakeLayerwiseConnector"),
    (lambda t: t.replace("port: 9002}", "port: 9002, args: {additional-config: {recompute_scheduler_enable: true}}}"),
     "decode[0].args: recompute_scheduler_enable makes a decoder end a request with stop_reason 'recomputed'"),
    (lambda t: t.replace("port: 9001}", "port: 9001, side_channel_port: 9002}"),
     "prefill[0].side_channel_port: port 9002 is already used by decode-0"),
])
def test_validate_refuses(change, expected):
    assert expected in error_of(change(BASE.format(connector="MooncakeLayerwiseConnector")))


def test_ec_transfer_config_fields_are_checked_too():
    text = """\
model: m
engine: sim
ec_transfer: {connector: ECExampleConnector, shared_storage_path: /tmp/ec, config: {ec_buffer_sise: 5}}
encode: [{port: 9001}]
pd: [{port: 9002}]
"""
    assert ("t.yaml:3: ec_transfer.config.ec_buffer_sise: 'ec_buffer_sise' is not a field of vLLM's ECTransferConfig "
            "(did you mean ec_buffer_size?)") in error_of(text)


def test_wildcard_proxy_is_accepted_with_a_metaserver_host():
    topology = load(BASE.format(connector="MooncakeLayerwiseConnector")
                    + "proxy: {host: 0.0.0.0, metaserver_host: 10.1.2.3}\n")
    argv = list(build_plan(topology, python="python").proxy.argv)
    assert argv[argv.index("--metaserver-host") + 1] == "10.1.2.3"


# ---------------------------------------------------------------- devices


NPU_SMI_INFO_M = """\
        NPU ID                         Chip ID                        Chip Logic ID                  Chip Name
        0                              0                              0                              Ascend 910B3
        0                              1                              -                              Mcu
        1                              0                              1                              Ascend 910B3
        1                              1                              -                              Mcu
        2                              0                              2                              Ascend 910B3
"""


def test_npu_chip_count_from_npu_smi():
    assert count_npu_chips(NPU_SMI_INFO_M) == 3
    assert count_npu_chips("npu-smi: command failed\n") is None
    assert detect_device_count("npu", {"EPDCTL_DEVICE_COUNT": "4"}) == 4


def test_npu_devices_are_checked_against_the_machine():
    text = BASE.format(connector="MooncakeLayerwiseConnector").replace("devices: [1]", "devices: [5]")
    with pytest.raises(EpdctlError) as info:
        load(text, device_count=4)
    assert "device 5 is outside this machine (4 devices: 0..3)" in info.value.message
    shared = BASE.format(connector="MooncakeLayerwiseConnector").replace(
        "devices: [1], port: 9002}", "devices: [0], port: 9002, gpu_memory_utilization: 0.6}").replace(
        "devices: [0], port: 9001}", "devices: [0], port: 9001, gpu_memory_utilization: 0.6}")
    assert "device 0 is shared with a memory budget of 1.2 > 1.0" in error_of(shared)


# ---------------------------------------------------------------- exports


def test_k8s_requests_the_ascend_resource_and_names_the_proxy_to_decoders():
    path = TOPOLOGIES / "npu-1e1p1d.yaml"
    topology = load_topology(path, environ={})
    docs = manifests(topology, path.read_text())
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    vllm = deployments["npu-1e1p1d-decode-0"]["spec"]["template"]["spec"]["containers"][0]
    assert vllm["resources"] == {"limits": {"huawei.com/Ascend910": 1}}
    assert "ASCEND_RT_VISIBLE_DEVICES" not in json.dumps(vllm.get("env", []))  # the device plugin assigns them
    proxy = deployments["npu-1e1p1d-proxy"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert proxy[proxy.index("--metaserver-host") + 1] == "npu-1e1p1d-proxy"
    assert services["npu-1e1p1d-decode-0"]["spec"]["clusterIP"] == "None"  # resolves to the pods' own IPs
    assert "clusterIP" not in services["npu-1e1p1d-prefill-0"]["spec"]
    other = manifests(topology, path.read_text(), device_resource="huawei.com/Ascend310P")
    vllm = [d for d in other if d["metadata"]["name"] == "npu-1e1p1d-encode-0" and d["kind"] == "Deployment"][0]
    assert vllm["spec"]["template"]["spec"]["containers"][0]["resources"] == {"limits": {"huawei.com/Ascend310P": 1}}
    with pytest.raises(EpdctlError) as info:
        manifests(topology, path.read_text(), device_resource="bad resource/")
    assert info.value.exit_code == EXIT_USAGE


def test_slurm_asks_for_npus_as_a_gres():
    topology = load_topology(TOPOLOGIES / "npu-1e1p1d.yaml", environ={})
    script = render_job(topology, Path("/x/npu-1e1p1d.yaml"), epdctl=["epdctl"])
    assert "#SBATCH --gres=npu:3" in script and "--gpus-per-node" not in script
    assert "#SBATCH --gres=ascend:3" in render_job(topology, Path("/x/t.yaml"), epdctl=["epdctl"], gres="ascend")
