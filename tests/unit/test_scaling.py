"""What a scale means (run/scaling.py) and what the proxy accepts as a pool file (proxy/membership.py):
pure, no process, no port."""

from __future__ import annotations

import json
import re
import os

import pytest

from epdctl.config.load import load_topology
from epdctl.plan import build_plan
from epdctl.proxy.membership import check_pool, read_pool_file
from epdctl.run.scaling import (counts_of, in_flight_from_metrics, new_ports, pool_document, refusal,
                                scaled_topology)


def _topology(tmp_path, extra: str = "", kv: bool = False):
    roles = ("prefill: [{port: 19502}]\ndecode: [{port: 19503}]\nkv_transfer: {connector: NixlConnector}\n" if kv
             else "pd: [{port: 19502}]\n")
    path = tmp_path / "t.yaml"
    path.write_text("name: t\nmodel: m\nengine: sim\n"
                    "ec_transfer: {connector: ECExampleConnector, shared_storage_path: /tmp/x-ec}\n"
                    "encode: [{port: 19501, side_channel_port: null}]\n" + roles + "proxy: {port: 10001}\n" + extra)
    return load_topology(path)


def test_scaled_topology_copies_the_last_instance_on_its_new_ports(tmp_path):
    topology = _topology(tmp_path)
    plan = build_plan(topology)
    ports = new_ports(plan, topology, {"encode": 3}, lambda port: port != 19504)  # 19504 busy here
    assert ports == {"encode-1": 19503, "encode-2": 19505}
    scaled = scaled_topology(topology, {"encode": 3}, ports)
    assert [s.port for s in scaled.encode] == [19501, 19503, 19505]
    assert counts_of(scaled) == {"encode": 3, "pd": 1}
    bigger = build_plan(scaled)
    # The instances that were there keep their plan exactly: nothing of them restarts.
    assert bigger.instances[0] == plan.instances[0] and bigger.instances[-1] == plan.instances[-1]
    assert scaled_topology(scaled, {"encode": 1}, {}).encode == topology.encode


def test_new_ports_never_take_a_side_channel(tmp_path):
    topology = _topology(tmp_path, kv=True)
    plan = build_plan(topology)
    held = {port for spec in plan.processes for port in spec.ports()}
    ports = new_ports(plan, topology, {"decode": 4}, lambda port: True)
    assert not set(ports.values()) & held and len(set(ports.values())) == 3
    bigger = build_plan(scaled_topology(topology, {"decode": 4}, ports))
    assert {s.name: s for s in bigger.instances}["prefill-0"] == {s.name: s for s in plan.instances}["prefill-0"]
    every = [port for spec in bigger.processes for port in spec.ports()]
    assert len(every) == len(set(every))  # the new decoders' side channels clash with nothing


@pytest.mark.parametrize("extra, role, count, needle", [
    ("", "encode", 0, "between 1 and 64"),
    ("", "encode", 65, "between 1 and 64"),
    ("", "prefill", 2, "no prefill instance"),
    ("", "router", 2, "not a role"),
])
def test_refusals_name_the_reason(tmp_path, extra, role, count, needle):
    assert needle in refusal(_topology(tmp_path, extra), role, count)


def test_a_fixed_pool_is_refused_with_its_reason(tmp_path):
    topology = _topology(tmp_path)
    assert "impl: epdctl" in refusal(topology.model_copy(update={"proxy": topology.proxy.model_copy(
        update={"impl": "vllm-router"})}), "encode", 2)
    assert "launcher local" in refusal(topology.model_copy(update={"launcher": "slurm"}), "encode", 2)
    mooncake = topology.model_copy(update={"ec_transfer": topology.ec_transfer.model_copy(
        update={"connector": "ECMooncakeConnector"})})
    assert "control address" in refusal(mooncake, "pd", 2) and refusal(mooncake, "encode", 2) is None
    assert refusal(topology, "encode", 4) is None


def test_pool_document_puts_pd_in_the_decode_pool():
    doc = pool_document(3, {"encode": [("encode-0", "http://h:1")], "pd": [("pd-0", "http://h:2")]}, ["encode-0"])
    assert doc == {"version": 3, "draining": ["encode-0"], "roles": {
        "encode": [{"name": "encode-0", "url": "http://h:1"}], "decode": [{"name": "pd-0", "url": "http://h:2"}]}}
    assert check_pool(json.loads(json.dumps(doc)))["draining"] == {"encode-0"}


def test_in_flight_is_read_from_the_proxys_metrics():
    text = ('# TYPE epdctl_proxy_pool_version gauge\nepdctl_proxy_pool_version 4.0\n'
            '# TYPE epdctl_proxy_in_flight gauge\n'
            'epdctl_proxy_in_flight{instance="encode-1",role="encode",url="http://h:1"} 2.0\n'
            'epdctl_proxy_in_flight{instance="pd-0",role="decode",url="http://h:2"} 0.0\n')
    assert in_flight_from_metrics(text) == (4, {"encode-1": 2.0, "pd-0": 0.0})


@pytest.mark.parametrize("hostile", [
    [], "x", {"version": "1", "roles": {}},
    {"version": 1, "roles": {"proxy": [{"name": "encode-0", "url": "http://h:1"}]}},
    {"version": 1, "roles": {"encode": []}},
    {"version": 1, "roles": {"encode": [{"name": "../../etc", "url": "http://h:1"}]}},
    {"version": 1, "roles": {"encode": [{"name": "encode-0", "url": "file:///etc/passwd"}]}},
    {"version": 1, "roles": {"encode": [{"name": "encode-0", "url": "http://h:1/v1/x?a=b"}]}},
    {"version": 1, "roles": {"encode": [{"name": "encode-0", "url": "http://h:1"}]}, "draining": "encode-0"},
    {"version": 10 ** 400, "roles": {}},  # past a float: the version gauge raised OverflowError after the pool applied
    {"version": -1, "roles": {}}, {"version": True, "roles": {}},
])
def test_the_proxy_refuses_a_pool_that_is_not_one(hostile):
    with pytest.raises(ValueError):
        check_pool(hostile)


def test_the_proxy_reads_no_pool_through_a_symlink_or_past_its_bound(tmp_path):
    good = {"version": 1, "roles": {"encode": [{"name": "encode-0", "url": "http://127.0.0.1:1"}]}}
    real = tmp_path / "real.json"
    real.write_text(json.dumps(good))
    assert read_pool_file(str(real))["version"] == 1
    link = tmp_path / "pool.json"
    os.symlink(real, link)
    assert read_pool_file(str(link)) is None
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps({**good, "pad": "x" * (1 << 21)}))
    assert read_pool_file(str(huge)) is None
    assert read_pool_file(str(tmp_path / "missing.json")) is None
    deep = tmp_path / "deep.json"  # a RecursionError, not a ValueError: a (re)starting proxy died on it
    deep.write_text("[" * 200_000 + "]" * 200_000)
    assert read_pool_file(str(deep)) is None


def test_autoscale_rule_on_a_virtual_clock():
    from epdctl.config.schema import AutoscaleRole
    from epdctl.run.autoscale import Watch

    watch = Watch(AutoscaleRole(min=1, max=3, target_inflight=2, scale_up_after_s=5, scale_down_after_s=60))
    assert watch.decide(0, 1, 3.0) is None  # above the target: the clock starts
    assert watch.decide(4.9, 1, 3.0) is None
    grown = watch.decide(5.0, 1, 3.0)
    assert grown[0] == 2 and "above the target 2" in grown[1]
    assert watch.decide(6, 2, 1.5) is None  # between half and the target: hold
    assert watch.decide(7, 2, 2.5) is None and watch.decide(8, 2, 1.5) is None  # a dip restarts the count
    assert watch.decide(12.9, 2, 2.5) is None and watch.decide(17.9, 2, 2.5) is None
    assert watch.decide(18, 3, 9.0) is None and watch.decide(30, 3, 9.0) is None  # max: never beyond
    assert watch.decide(100, 3, 0.5) is None
    shrunk = watch.decide(160, 3, 0.5)
    assert shrunk[0] == 2 and "below half the target" in shrunk[1]
    watch.hold()
    assert watch.decide(161, 2, 0.0) is None and watch.decide(221, 2, 0.0)[0] == 1
    assert watch.decide(400, 1, 0.0) is None and watch.decide(500, 1, 0.0) is None  # min: never below


def test_autoscale_is_checked_at_validate(tmp_path):
    from epdctl.errors import EpdctlError

    for extra, needle in [("autoscale: {encode: {min: 3, max: 2}}", "min (3) is above max (2)"),
                          ("autoscale: {encode: {min: 2, max: 4}}", "outside min 2"),
                          ("autoscale: {prefill: {max: 2}}", "no prefill instance"),
                          ("autoscale: {encode: {target_inflight: 0}}", "greater than 0"),
                          ("autoscale: {encode: {min: true}}", "autoscale.encode.min"),  # not 1
                          ("autoscale: {encode: {max: 2.5}}", "autoscale.encode.max")]:
        with pytest.raises(EpdctlError, match=re.escape(needle)):
            _topology(tmp_path, extra)
    assert _topology(tmp_path, "autoscale: {encode: {max: 4}}").autoscale.encode.max == 4


def _gpu_topology(tmp_path, extra: str = ""):
    path = tmp_path / "g.yaml"
    path.write_text("name: g\nmodel: m\nengine: sim\nplatform: cuda\n"
                    "ec_transfer: {connector: ECExampleConnector, shared_storage_path: /tmp/x-ec}\n"
                    "encode: [{devices: [0], port: 19501, gpu_memory_utilization: 0.45}]\n"
                    "pd: [{devices: [1], port: 19502}]\nproxy: {port: 10001}\n" + extra)
    return load_topology(path, device_count=4), path


def test_new_instances_take_their_roles_scale_devices_then_share_within_the_budget(tmp_path):
    from epdctl.config.checks import cross_check

    topology, _ = _gpu_topology(tmp_path, "scale_devices: {encode: [1, 2, 3]}\n")
    ports = {f"encode-{i}": 19600 + i for i in range(1, 6)}
    scaled = scaled_topology(topology, {"encode": 4}, ports)
    # Device 1 is pd-0's: skipped. Then 2 and 3; the pool spent, encode-3 shares the file's encode-0's.
    assert [s.devices for s in scaled.encode] == [(0,), (2,), (3,), (0,)]
    assert cross_check(scaled) == []  # 2 x 0.45 on device 0 fits
    assert scaled_topology(topology, {"encode": 4}, ports) == scaled  # the same counts, the same devices
    over = scaled_topology(topology, {"encode": 5}, ports)
    [(loc, message, _)] = cross_check(over)
    assert loc == ("encode", 4, "gpu_memory_utilization") and "device 0 is shared with a memory budget of 1.35" in message
    # Without a pool a copy shares its template's device, within the budget only.
    plain, _ = _gpu_topology(tmp_path)
    assert [s.devices for s in scaled_topology(plain, {"encode": 2}, ports).encode] == [(0,), (0,)]
    assert cross_check(scaled_topology(plain, {"encode": 3}, ports))


@pytest.mark.parametrize("extra,error", [
    ("scale_devices: {encode: [2, 2]}\n", "scale_devices.encode: device 2 is listed twice"),
    ("scale_devices: {encode: [7]}\n", "scale_devices.encode: device 7 is outside this machine (4 devices: 0..3)"),
    ("scale_devices: {encode: [-1]}\n", "scale_devices.encode"),
    ("scale_devices: {prefill: [2]}\n", "scale_devices.prefill: the topology has no prefill instance to scale"),
    ("scale_devices: {encoder: [2]}\n", "unknown key"),
])
def test_scale_devices_is_checked_at_validate(tmp_path, extra, error):
    from epdctl.errors import EpdctlError

    with pytest.raises(EpdctlError) as caught:
        _gpu_topology(tmp_path, extra)
    assert error in str(caught.value) and "g.yaml:" in str(caught.value), str(caught.value)


def test_a_folder_or_a_fifo_at_the_scale_request_name_is_no_request(tmp_path):
    # os.read on a folder raised out of the supervise loop: the detached supervisor ended.
    from epdctl.run.scaler import _read_request

    (tmp_path / "scale-request").mkdir()
    assert _read_request(tmp_path / "scale-request") is None
    os.mkfifo(tmp_path / "fifo")
    assert _read_request(tmp_path / "fifo") is None
    (tmp_path / "file").write_text(json.dumps({"id": "ab12cd34", "counts": {"encode": 2}}))
    assert _read_request(tmp_path / "file") == {"id": "ab12cd34", "counts": {"encode": 2}}
