"""NAME or FILE: the one rule, the shipped topologies, and the health `status` derives (no process)."""

from __future__ import annotations

import pytest

from conftest import REPO

from epdctl.names import is_file_argument, shipped_topologies
from epdctl.status import health


def _report(state, *entries, proxy="healthy"):
    instances = [{"name": f"{role}-{i}", "role": role, "state": s} for i, (role, s) in enumerate(entries)]
    return {"state": state, "instances": instances, "proxy": {"name": "proxy", "state": proxy}}


@pytest.mark.parametrize("argument, is_file", [
    ("sim-1e1pd", False), ("my-topo", False), ("foo.txt", False), ("UPPER", False),
    ("sim-1e1pd.yaml", True), ("x.yml", True), ("./sim-1e1pd", True), ("dir/x", True), ("/abs/path", True),
])
def test_one_rule_tells_a_file_from_a_name(argument, is_file):
    assert is_file_argument(argument) is is_file


def test_every_shipped_topology_is_named_as_its_file():
    shipped = shipped_topologies()
    assert {"sim-1e1pd", "sim-1e1p1d", "1e1p1d"} <= set(shipped)
    for name, path in shipped.items():
        assert f"\nname: {name}\n" in "\n" + path.read_text(), path


@pytest.mark.parametrize("report, expected", [
    (_report("running", ("encode", "healthy"), ("pd", "healthy")), ("healthy", [])),
    (_report("degraded", ("encode", "exited"), ("encode", "healthy"), ("pd", "healthy")),
     ("degraded", ["encode-0 is exited"])),
    (_report("degraded", ("encode", "healthy"), ("pd", "failed")),
     ("failed", ["pd-1 is failed", "no healthy pd process: requests cannot be served"])),
    (_report("degraded", ("encode", "healthy"), ("pd", "healthy"), proxy="unhealthy"),
     ("failed", ["proxy is unhealthy", "no healthy proxy process: requests cannot be served"])),
    (_report("starting", ("encode", "healthy"), ("pd", "starting")), ("degraded", ["pd-1 is starting"])),
])
def test_health_is_healthy_degraded_or_failed_with_reasons(report, expected):
    assert health(report, None) == expected


def test_a_failed_start_has_failed_health_and_the_reason(tmp_path, state_dir):
    assert health(_report("failed"), "pd-0: cannot start 'x'") == ("failed", ["pd-0: cannot start 'x'"])


def test_readme_stands_alone_and_starts_from_a_shipped_name():
    readme = (REPO / "README.md").read_text()
    assert "DESIGN" not in readme
    assert "pip install . && epdctl up sim-1e1pd\n" in readme
