"""`epdctl export k8s`: every shipped topology exports to manifests that validate against Kubernetes' schema."""

from __future__ import annotations

from epdctl.config.load import load_topology
from epdctl.export.k8s import manifests, validate

from conftest import TOPOLOGIES


def by_kind_name(docs):
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def container(doc):
    return doc["spec"]["template"]["spec"]["containers"][0]


def test_1e1p1d_shape():
    topology = load_topology(TOPOLOGIES / "1e1p1d.yaml")
    docs = by_kind_name(manifests(topology, (TOPOLOGIES / "1e1p1d.yaml").read_text()))
    assert set(docs) == {
        ("ConfigMap", "epd-1e1p1d-topology"), ("PersistentVolumeClaim", "epd-1e1p1d-ec-cache"),
        ("Deployment", "epd-1e1p1d-encode-0"), ("Service", "epd-1e1p1d-encode-0"),
        ("Deployment", "epd-1e1p1d-prefill-0"), ("Service", "epd-1e1p1d-prefill-0"),
        ("Deployment", "epd-1e1p1d-decode-0"), ("Service", "epd-1e1p1d-decode-0"),
        ("Deployment", "epd-1e1p1d-proxy"), ("Service", "epd-1e1p1d-proxy"),
    }
    assert "model: Qwen/Qwen2.5-VL-3B-Instruct" in docs[("ConfigMap", "epd-1e1p1d-topology")]["data"]["topology.yaml"]
    assert docs[("PersistentVolumeClaim", "epd-1e1p1d-ec-cache")]["spec"]["accessModes"] == ["ReadWriteMany"]

    encode = container(docs[("Deployment", "epd-1e1p1d-encode-0")])
    assert encode["image"] == "vllm/vllm-openai:v0.33.0"
    assert encode["command"][:4] == ["vllm", "serve", "Qwen/Qwen2.5-VL-3B-Instruct", "--port"]
    assert encode["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    assert "env" not in encode  # CUDA_VISIBLE_DEVICES is the device plugin's job now
    assert {"name": "ec-cache", "mountPath": "/tmp/ec_cache"} in encode["volumeMounts"]
    assert encode["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert encode["startupProbe"]["failureThreshold"] * encode["startupProbe"]["periodSeconds"] >= 600

    prefill = container(docs[("Deployment", "epd-1e1p1d-prefill-0")])
    env = {e["name"]: e for e in prefill["env"]}
    assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"]["value"] == "5559"
    assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert {"name": "nixl", "containerPort": 5559} in prefill["ports"]
    decode = container(docs[("Deployment", "epd-1e1p1d-decode-0")])
    assert not any(m["name"] == "ec-cache" for m in decode["volumeMounts"])  # D reads no EC

    proxy = container(docs[("Deployment", "epd-1e1p1d-proxy")])
    command = proxy["command"]
    assert command[command.index("--encode-servers-urls") + 1] == "http://epd-1e1p1d-encode-0:19534"
    assert command[command.index("--decode-servers-urls") + 1] == "http://epd-1e1p1d-decode-0:19536"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    service = docs[("Service", "epd-1e1p1d-proxy")]
    assert service["spec"]["selector"]["epdctl.io/role"] == "proxy"


def test_alike_instances_become_replicas_and_xpu_uses_intel_resource():
    docs = by_kind_name(manifests(load_topology(TOPOLOGIES / "2e1p1d.yaml"), ""))
    assert docs[("Deployment", "epd-2e1p1d-encode")]["spec"]["replicas"] == 2
    proxy = container(docs[("Deployment", "epd-2e1p1d-proxy")])["command"]
    assert proxy[proxy.index("--encode-servers-urls") + 1] == "http://epd-2e1p1d-encode:19534"
    xpu = by_kind_name(manifests(load_topology(TOPOLOGIES / "xpu-1e1pd.yaml"), ""))
    pd = container(xpu[("Deployment", "xpu-1e1pd-pd-0")])
    assert pd["resources"] == {"limits": {"gpu.intel.com/i915": 1}}
    assert "env" not in pd


def test_sim_topology_binds_all_interfaces_and_uses_the_epdctl_image(tmp_path):
    docs = by_kind_name(manifests(load_topology(TOPOLOGIES / "sim-1e1pd.yaml"), "", proxy_image="me/epdctl:dev",
                                  storage_class="nfs"))
    pd = container(docs[("Deployment", "sim-1e1pd-pd-0")])
    assert pd["image"] == "me/epdctl:dev" and pd["command"][:3] == ["python", "-m", "epdctl.sim"]
    assert pd["command"][-2:] == ["--host", "0.0.0.0"] and "resources" not in pd
    assert docs[("PersistentVolumeClaim", "sim-1e1pd-ec-cache")]["spec"]["storageClassName"] == "nfs"


def test_an_invalid_manifest_is_reported():
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"ports": [{"port": "eighty"}]}}
    release, problems = validate([bad])
    assert problems and problems[0].startswith("Service x: spec/ports/0/port:")
