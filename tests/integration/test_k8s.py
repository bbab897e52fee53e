"""`epdctl export k8s`: every shipped topology exports to manifests that validate against Kubernetes' schema."""

from __future__ import annotations

import pytest
import yaml

from epdctl.export.k8s import DNS_LABEL, validate

from conftest import TOPOLOGIES, epdctl

kubernetes_validate = pytest.importorskip("kubernetes_validate")


@pytest.mark.parametrize("path", sorted(TOPOLOGIES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_topology_exports_valid_manifests(path, tmp_path):
    out = tmp_path / "k8s"
    result = epdctl("export", "k8s", str(path), "-o", str(out), "--check", "--namespace", "epd", check=0)
    assert "all valid against the Kubernetes" in result.stdout
    files = sorted((out / "manifests").glob("*.yaml"))
    docs = [yaml.safe_load(f.read_text()) for f in files]
    release, problems = validate(docs)
    assert problems == []
    for doc in docs:
        assert doc["metadata"]["namespace"] == "epd"
        assert DNS_LABEL.match(doc["metadata"]["name"])
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "epdctl"
        assert "&id" not in (out / "manifests" / files[docs.index(doc)].name).read_text()
    kustomization = yaml.safe_load((out / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == "epd"
    assert kustomization["resources"] == [f"manifests/{f.name}" for f in files]


