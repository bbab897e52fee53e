"""The topology file: what loads, and every kind of bad file, with FILE:LINE: field errors."""

from __future__ import annotations

import pytest

from epdctl.config.load import load_topology, parse_topology
from epdctl.config.yamlmarks import expand_vars
from epdctl.errors import EXIT_USAGE, EpdctlError
from epdctl.plan import side_channel_ports

from conftest import TOPOLOGIES

GOOD_1E1PD = """\
model: m
engine: sim
platform: cpu
ec_transfer: {connector: ECExampleConnector, shared_storage_path: /tmp/ec}
encode: [{port: 9001}]
pd: [{port: 9002}]
"""


def load(text: str, **kw):
    return parse_topology(text, "t.yaml", environ=kw.pop("environ", {}), **kw)


def error_of(text: str, **kw) -> str:
    with pytest.raises(EpdctlError) as info:
        load(text, **kw)
    assert info.value.exit_code == EXIT_USAGE
    return info.value.message


@pytest.mark.parametrize("path", sorted(TOPOLOGIES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_topologies_load(path):
    topology = load_topology(path)
    assert topology.name == path.stem
    assert list(topology.instances())


def test_defaults_and_name_from_stem(tmp_path):
    path = tmp_path / "My_Setup.yaml"
    path.write_text(GOOD_1E1PD)
    topology = load_topology(path)
    assert topology.name == "my-setup"
    assert topology.engine == "sim" and topology.platform == "cpu"
    assert topology.proxy.host == "127.0.0.1" and topology.proxy.port == 10001
    assert topology.proxy.policy == "least-loaded"
    assert topology.health.timeout_s == 600
    assert [ref.name for ref in topology.instances()] == ["encode-0", "pd-0"]


def test_model_is_frozen():
    topology = load(GOOD_1E1PD)
    with pytest.raises(Exception):
        topology.model = "other"


BAD = [
    # (id, text, the exact error line)
    ("duplicate-key", "model: a\nmodel: b\n", "t.yaml:2: model: duplicate key (first set on line 1)"),
    ("nested-duplicate-key", GOOD_1E1PD.replace("[{port: 9002}]", "[{port: 9002, port: 9003}]"),
     "t.yaml:6: pd[0].port: duplicate key (first set on line 6)"),
    ("unknown-top-key", GOOD_1E1PD + "gpus: 3\n", "t.yaml:7: gpus: unknown key"),
    ("unknown-instance-key", GOOD_1E1PD.replace("{port: 9002}", "{port: 9002, memory: 3}"),
     "t.yaml:6: pd[0].memory: unknown key"),
    ("missing-model", "engine: sim\npd: [{port: 1}]\nplatform: cpu\n", "t.yaml:1: model: required but missing"),
    ("blank-model", GOOD_1E1PD.replace("model: m", "model: '  '"), "t.yaml:1: model: must not be blank"),
    ("port-type", GOOD_1E1PD.replace("port: 9002", "port: eighty"), "t.yaml:6: pd[0].port: Input should be a valid integer"),
    ("port-range", GOOD_1E1PD.replace("port: 9002", "port: 70000"), "t.yaml:6: pd[0].port: Input should be less than or equal to 65535"),
    ("missing-port", GOOD_1E1PD.replace("{port: 9002}", "{args: {}}"), "t.yaml:6: pd[0].port: required but missing"),
    ("bad-engine", GOOD_1E1PD.replace("engine: sim", "engine: tgi"), "t.yaml:2: engine: Input should be 'vllm' or 'sim'"),
    ("bad-platform", GOOD_1E1PD.replace("platform: cpu", "platform: rocm"), "t.yaml:3: platform: Input should be 'cuda', 'xpu', 'npu' or 'cpu'"),
    ("bad-name", "name: Big_Name\n" + GOOD_1E1PD, "t.yaml:1: name: String should match pattern"),
    ("encode-without-ec", GOOD_1E1PD.replace("ec_transfer: {connector: ECExampleConnector, shared_storage_path: /tmp/ec}\n", ""),
     "t.yaml:4: encode: encode instances need ec_transfer (the EC connector)"),
    ("prefill-without-kv", "model: m\nplatform: cpu\nprefill: [{port: 1}]\ndecode: [{port: 2}]\n",
     "t.yaml:3: prefill: prefill instances need kv_transfer (the KV connector)"),
    ("pd-mixed", "model: m\nplatform: cpu\nkv_transfer: {connector: NixlConnector}\nprefill: [{port: 1}]\ndecode: [{port: 2}]\npd: [{port: 3}]\n",
     "t.yaml:6: pd: pd cannot be combined with prefill/decode"),
    ("prefill-alone", "model: m\nplatform: cpu\nkv_transfer: {connector: NixlConnector}\nprefill: [{port: 1}]\n",
     "t.yaml:4: prefill: prefill instances need decode instances"),
    ("decode-alone", "model: m\nplatform: cpu\ndecode: [{port: 2}]\n", "t.yaml:3: decode: decode instances need prefill instances"),
    ("encode-alone", "model: m\nplatform: cpu\nec_transfer: {connector: ECExampleConnector, shared_storage_path: /x}\nencode: [{port: 1}]\n",
     "t.yaml:4: encode: no instance serves requests"),
    ("no-instances", "model: m\n", "t.yaml:1: <top>: no instance serves requests") ,
    ("duplicate-port", GOOD_1E1PD.replace("port: 9002", "port: 9001"), "t.yaml:6: pd[0].port: port 9001 is already used by encode-0"),
    ("proxy-port-clash", GOOD_1E1PD + "proxy: {port: 9002}\n", "t.yaml:7: proxy.port: port 9002 is already used by pd-0"),
    ("side-channel-clash",
     "model: m\nplatform: cpu\nkv_transfer: {connector: NixlConnector}\nprefill: [{port: 1, side_channel_port: 2}]\ndecode: [{port: 2}]\n",
     "t.yaml:4: prefill[0].side_channel_port: port 2 is already used by decode-0"),
    ("device-twice", "model: m\npd: [{port: 1, devices: [0, 0]}]\n", "t.yaml:2: pd[0].devices: device 0 is listed twice"),
    ("negative-device", "model: m\npd: [{port: 1, devices: [-1]}]\n", "t.yaml:2: pd[0].devices: device -1 is negative"),
    ("devices-required-on-cuda", "model: m\npd: [{port: 1}]\n", "t.yaml:2: pd[0]: devices: required on platform cuda"),
    ("memory-zero", "model: m\npd: [{port: 1, devices: [0], gpu_memory_utilization: 0}]\n",
     "t.yaml:2: pd[0].gpu_memory_utilization: Input should be greater than 0"),
    ("memory-above-one", "model: m\npd: [{port: 1, devices: [0], gpu_memory_utilization: 1.5}]\n",
     "t.yaml:2: pd[0].gpu_memory_utilization: Input should be less than or equal to 1"),
    ("shared-device-overbudget",
     "model: m\nec_transfer: {connector: ECExampleConnector, shared_storage_path: /x}\n"
     "encode: [{port: 1, devices: [0], gpu_memory_utilization: 0.5}]\npd:\n  - port: 2\n    devices: [0]\n    gpu_memory_utilization: 0.6\n",
     "t.yaml:7: pd[0].gpu_memory_utilization: device 0 is shared with a memory budget of 1.1 > 1.0 (encode-0 0.5, pd-0 0.6)"),
    ("shared-device-default-budget", "model: m\nec_transfer: {connector: ECExampleConnector, shared_storage_path: /x}\n"
     "encode: [{port: 1, devices: [0]}]\npd: [{port: 2, devices: [0]}]\n",
     "device 0 is shared with a memory budget of 1.8 > 1.0 (encode-0 0.9, pd-0 0.9)"),
    ("empty-connector", GOOD_1E1PD.replace("connector: ECExampleConnector", "connector: ''"),
     "t.yaml:4: ec_transfer.connector: String should have at least 1 character"),
    ("ec-no-path", GOOD_1E1PD.replace(", shared_storage_path: /tmp/ec", ""), "t.yaml:4: ec_transfer: ECExampleConnector needs shared_storage_path"),
    ("ec-relative-path", GOOD_1E1PD.replace("/tmp/ec", "ec"), "t.yaml:4: ec_transfer.shared_storage_path: must be an absolute path"),
    ("zero-timeout", GOOD_1E1PD + "health: {timeout_s: 0}\n", "t.yaml:7: health.timeout_s: Input should be greater than 0"),
    ("negative-interval", GOOD_1E1PD + "health:\n  interval_s: -1\n", "t.yaml:8: health.interval_s: Input should be greater than 0"),
    ("bad-policy", GOOD_1E1PD + "proxy: {policy: random}\n", "t.yaml:7: proxy.policy: Input should be 'least-loaded' or 'round-robin'"),
    ("instances-not-list", GOOD_1E1PD.replace("pd: [{port: 9002}]", "pd: {port: 9002}"), "t.yaml:6: pd: Input should be a valid tuple"),
    ("port-flag-in-args", GOOD_1E1PD.replace("{port: 9002}", "{port: 9002, args: {port: 1}}"),
     "t.yaml:6: pd[0].args.port: --port is set by epdctl; use the instance's port key"),
    ("model-flag-in-defaults", GOOD_1E1PD + "defaults: {args: {model: x}}\n",
     "t.yaml:7: defaults.args.model: --model is set by epdctl; use the top-level model key"),
    ("double-memory", "model: m\npd: [{port: 1, devices: [0], gpu_memory_utilization: 0.5, args: {gpu-memory-utilization: 0.4}}]\n",
     "t.yaml:2: pd[0].args: gpu-memory-utilization is set both here"),
    ("relative-media-root", GOOD_1E1PD + "media: {allowed_local_path: media}\n", "t.yaml:7: media.allowed_local_path: must be an absolute path"),
    ("empty-vllm-command", "model: m\nvllm_command: []\npd: [{port: 1, devices: [0]}]\n", "t.yaml:2: vllm_command: Tuple should have at least 1 item"),
    ("not-a-mapping", "- a\n- b\n", "t.yaml:1: the topology must be a mapping"),
    ("scalar-document", "just words\n", "t.yaml:1: the topology must be a mapping"),
    ("empty", "", "t.yaml:1: the file is empty"),
    ("only-comments", "# nothing\n", "t.yaml:1: the file is empty"),
    ("bad-yaml", "model: m\npd: [{port: 1\n", "t.yaml:3: invalid YAML"),
    ("tab-indent", "model: m\npd:\n\t- {port: 1}\n", "t.yaml:3: invalid YAML"),
    ("unset-variable", GOOD_1E1PD.replace("model: m", "model: ${MODEL_PATH}"),
     "t.yaml:1: model: ${MODEL_PATH} is not set (give a default with ${MODEL_PATH:-value})"),
    ("required-variable", GOOD_1E1PD.replace("model: m", "model: ${MODEL_PATH:?point it at the weights}"),
     "t.yaml:1: model: ${MODEL_PATH} is not set: point it at the weights"),
    ("device-outside-machine", "model: m\npd: [{port: 1, devices: [3]}]\n",
     "t.yaml:2: pd[0].devices: device 3 is outside this machine (2 devices: 0..1)"),
    # Issue #28: what `up` used to find out (or never did), and "did you mean".
    ("misspelt-sim-flag", GOOD_1E1PD + "defaults: {args: {sim-encode-msx: 5}}\n",
     "t.yaml:7: defaults.args.sim-encode-msx: the sim has no flag --sim-encode-msx (did you mean sim-encode-ms?)"),
    ("negative-sim-flag", GOOD_1E1PD.replace("{port: 9002}", "{port: 9002, args: {sim-encode-ms: -5}}"),
     "t.yaml:6: pd[0].args.sim-encode-ms: must be a number of milliseconds, 0 or more (got -5)"),
    ("nan-sim-flag", GOOD_1E1PD + "defaults:\n  args:\n    sim_ttft_ms: .nan\n",
     "t.yaml:9: defaults.args.sim_ttft_ms: must be a number of milliseconds, 0 or more (got nan)"),
    ("infinite-sim-flag", GOOD_1E1PD + "defaults: {args: {--sim-exit-after-s: .inf}}\n",
     "t.yaml:7: defaults.args.--sim-exit-after-s: must be a number of seconds, 0 or more (got inf)"),
    ("sim-flag-of-wrong-type", GOOD_1E1PD + "defaults: {args: {sim-tpot-ms: fast}}\n",
     "t.yaml:7: defaults.args.sim-tpot-ms: must be a number of milliseconds, 0 or more (got 'fast')"),
    ("sim-flag-as-a-switch", GOOD_1E1PD + "defaults: {args: {sim-tpot-ms: true}}\n",
     "t.yaml:7: defaults.args.sim-tpot-ms: must be a number of milliseconds, 0 or more (got True)"),
    ("sim-switch-with-a-number", GOOD_1E1PD.replace("{port: 9001}", "{port: 9001, args: {sim-ignore-sigterm: 1}}"),
     "t.yaml:5: encode[0].args.sim-ignore-sigterm: must be true or false (got 1)"),
    ("sim-choice", GOOD_1E1PD.replace("{port: 9001}", "{port: 9001, args: {sim-spawn-child: thread}}"),
     "t.yaml:5: encode[0].args.sim-spawn-child: must be one of group, session (got 'thread')"),
    ("unknown-key-did-you-mean", GOOD_1E1PD.replace("encode: [", "encoder: ["),
     "t.yaml:5: encoder: unknown key (did you mean encode?)"),
    ("nested-unknown-key-did-you-mean", GOOD_1E1PD.replace("{port: 9002}", "{prot: 9002, port: 9002}"),
     "t.yaml:6: pd[0].prot: unknown key (did you mean port?)"),
    ("restart-key-did-you-mean", GOOD_1E1PD + "restart: {max_restart: 3}\n",
     "t.yaml:7: restart.max_restart: unknown key (did you mean max_restarts?)"),
]


@pytest.mark.parametrize("text,expected", [(t, e) for _, t, e in BAD], ids=[i for i, _, _ in BAD])
def test_bad_topology_is_one_clear_line(text, expected):
    message = error_of(text, device_count=2)
    assert expected in message, message
    for line in message.splitlines():
        assert line.startswith("t.yaml:"), line
        assert "Traceback" not in line


def test_an_unknown_key_like_no_other_gets_no_suggestion():
    assert error_of(GOOD_1E1PD + "gpus: 3\n") == "t.yaml:7: gpus: unknown key"


def test_good_sim_flags_pass_at_every_level():
    text = GOOD_1E1PD.replace("{port: 9001}", "{port: 9001, args: {sim-encode-ms: '30', sim-spawn-child: group}}")
    text += ("defaults: {args: {sim_ttft_ms: 0, --sim-tpot-ms: 2.5, sim-ignore-sigterm: false, "
             "no-sim-ignore-sigterm: true, sim-exit-after-s: null, max-num-seqs: 4, enforce-eager: true}}\n")
    assert load(text).defaults.args["sim_ttft_ms"] == 0


def test_sim_flags_are_the_sims_business_only():
    """A vLLM topology's args go to vLLM, which refuses what it does not know by itself."""
    text = "model: m\nplatform: cpu\npd: [{port: 1, args: {sim-encode-msx: -5}}]\n"
    assert load(text).pd[0].args == {"sim-encode-msx": -5}


def test_a_sim_topology_runs_on_cpu_unless_it_says_otherwise():
    topology = load("model: m\nengine: sim\npd: [{port: 1}]\n")
    assert topology.platform == "cpu"
    assert "devices: required on platform cuda" in error_of("model: m\nengine: sim\nplatform: cuda\npd: [{port: 1}]\n")
    assert load("model: m\npd: [{port: 1, devices: [0]}]\n").platform == "cuda"  # vllm's default stays


def test_all_cross_field_problems_reported_together():
    text = "model: m\npd:\n  - {port: 1, devices: [0, 0]}\n  - {port: 1, devices: [-2]}\n"
    lines = error_of(text).splitlines()
    assert "t.yaml:4: pd[1].port: port 1 is already used by pd-0" in lines
    assert "t.yaml:3: pd[0].devices: device 0 is listed twice" in lines
    assert "t.yaml:4: pd[1].devices: device -2 is negative" in lines


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(EpdctlError, match="no such file") as info:
        load_topology(tmp_path / "nope.yaml")
    assert info.value.exit_code == EXIT_USAGE
    with pytest.raises(EpdctlError, match="is a directory"):
        load_topology(tmp_path)


def test_binary_file_is_a_clear_error(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(EpdctlError, match="cannot read"):
        load_topology(path)


def test_env_expansion_types_plain_scalars():
    # In a flow mapping `{...}` a `${` must be quoted, as in compose; block style needs nothing.
    text = GOOD_1E1PD.replace("pd: [{port: 9002}]", "pd:\n  - port: ${PD_PORT:-9100}").replace("model: m", "model: ${MODEL:-fallback}")
    topology = load(text, environ={"PD_PORT": "9200"})
    assert topology.pd[0].port == 9200
    assert topology.model == "fallback"
    assert load(text, environ={}).pd[0].port == 9100
    quoted = GOOD_1E1PD.replace("port: 9002", "port: '${PD_PORT:-9100}'")
    assert load(quoted, environ={}).pd[0].port == 9100  # pydantic still reads the quoted number as a port


def test_expand_vars_forms():
    env = {"A": "1", "E": ""}
    assert expand_vars("$A-${A}-${B:-x}-${E:-y}-${E-z}-$$", env) == "1-1-x-y--$"
    with pytest.raises(ValueError):
        expand_vars("${B}", env)
    with pytest.raises(ValueError):
        expand_vars("${A", env)


def test_side_channel_ports_skip_used_ports():
    text = ("model: m\nplatform: cpu\nkv_transfer: {connector: NixlConnector, side_channel_port_base: 7000}\n"
            "prefill: [{port: 7000}, {port: 7002}]\ndecode: [{port: 7003, side_channel_port: 7100}]\nproxy: {port: 7001}\n")
    topology = load(text)
    assert side_channel_ports(topology) == {"prefill-0": 7004, "prefill-1": 7005, "decode-0": 7100}


def test_cpu_platform_needs_no_devices_and_no_budget():
    topology = load(GOOD_1E1PD)
    assert topology.pd[0].devices == ()
