"""state.json's typed format (run/staterecord.py): what an older epdctl wrote still reads, a newer
one's keys are kept, and a hand-edited or hostile value is one line naming the field, on read and
on write. No process, no port: StateDir on a folder of tmp_path."""

from __future__ import annotations

import json
import os

import pytest

from epdctl.errors import EpdctlError
from epdctl.run.state import StateDir

# A state.json as an epdctl of three releases ago wrote it (docs/design.md, "State on disk"):
# no launcher, scale or evidence keys, no host in the supervisor.
OLD = {"name": "sim-1e1pd", "source": "/abs/sim-1e1pd.yaml", "run_token": "sim-1e1pd-0123456789abcdef",
       "phase": "running", "error": None, "failure": None, "state_dir": "/x", "health_timeout_s": 60,
       "supervisor": {"pid": 4240, "create_time": 1796533079.7, "mode": "detached"},
       "storage": [{"path": "/tmp/epdctl-ec-sim-1e1pd", "created": True}],
       "processes": [{"name": "encode-0", "role": "encode", "devices": [], "host": "127.0.0.1", "port": 19534,
                      "url": "http://127.0.0.1:19534", "side_channel_port": None, "pid": 4242, "pgid": 4242,
                      "create_time": 1796533079.7, "log": "/x/encode-0.log", "argv": ["python", "-m", "epdctl.sim"],
                      "env": {"EPDCTL_RUN": "sim-1e1pd-0123456789abcdef"}, "state": "healthy", "exit_code": None,
                      "healthy_after_s": 1.6, "error": None, "restarts": 0, "last_exit": None,
                      "since": "2026-11-24T20:31:22.417Z", "adopted": False}]}


def _folder(tmp_path, state) -> StateDir:
    state_dir = StateDir("sim-1e1pd", root=tmp_path / "state")
    state_dir.ensure()
    state_dir.state_file.write_text(json.dumps(state))
    os.chmod(state_dir.state_file, 0o600)
    return state_dir


def test_an_older_epdctls_state_reads_as_it_was_written(tmp_path):
    assert _folder(tmp_path, OLD).read() == OLD


def test_a_scale_record_reads_as_the_scaler_wrote_it(tmp_path):
    scaled = {**OLD, "scale": {"counts": {"encode": 2, "pd": 1}, "ports": {"encode-1": 19536}, "pool_version": 3,
                               "job": None, "autoscale": {"roles": {"encode": {"min": 1, "max": 3, "target_inflight": 2.0}},
                                                          "history": [{"at": "t", "role": "encode", "from": 1, "to": 2,
                                                                       "why": "w", "job": "auto-1", "status": "done"}]}}}
    assert _folder(tmp_path, scaled).read() == scaled


def test_a_newer_epdctls_keys_are_kept(tmp_path):
    newer = {**OLD, "gpu_topology": {"nvlink": True}, "processes": [{**OLD["processes"][0], "numa": 1}]}
    assert _folder(tmp_path, newer).read() == newer


def test_a_minimal_hand_written_state_reads(tmp_path):
    minimal = {"name": "mine", "processes": [{"name": "pd-0", "role": "pd", "port": 1, "url": "http://127.0.0.1:1"}]}
    assert _folder(tmp_path, minimal).read() == minimal


@pytest.mark.parametrize("change,field", [
    (lambda s: s["processes"][0].update(pid=True), "processes.0.pid"),  # true is not pid 1
    (lambda s: s["processes"][0].update(pid="4242"), "processes.0.pid"),
    (lambda s: s["processes"][0].update(pid=-1), "processes.0.pid"),
    (lambda s: s["processes"][0].update(port=70000), "processes.0.port"),
    (lambda s: s["processes"][0].update(argv="rm -rf /"), "processes.0.argv"),
    (lambda s: s["processes"][0].update(env={"A": 1}), "processes.0.env.A"),
    (lambda s: s["processes"][0].pop("name"), "processes.0.name"),
    (lambda s: s["supervisor"].update(pid=[1]), "supervisor.pid"),
    (lambda s: s.update(processes={"encode-0": {}}), "processes"),
    (lambda s: s.update(storage=[{"path": ["/"]}]), "storage.0.path"),
    (lambda s: s.update(name=""), "name"),
    (lambda s: s["processes"][0].update(error="x" * 100_000), "processes.0.error"),
    # the scale record status prints from: formatted with :g and **, so typed too
    (lambda s: s.update(scale={"autoscale": {"roles": {"encode": "x"}}}), "scale.autoscale.roles.encode"),
    (lambda s: s.update(scale={"autoscale": {"roles": {"encode": {"min": 1, "max": 2, "target_inflight": "2"}}}}),
     "scale.autoscale.roles.encode.target_inflight"),
    (lambda s: s.update(scale={"ports": {"encode-1": True}}), "scale.ports.encode-1"),
])
def test_a_hostile_value_is_one_line_naming_the_field(tmp_path, change, field):
    state = json.loads(json.dumps(OLD))
    change(state)
    with pytest.raises(EpdctlError) as caught:
        _folder(tmp_path, state).read()
    message = str(caught.value)
    assert f"unreadable state ({field}:" in message and "\n" not in message, message


def test_the_writer_refuses_what_the_format_does_not_allow(tmp_path):
    state_dir = _folder(tmp_path, OLD)
    with pytest.raises(EpdctlError, match=r"processes\.0\.port"):
        state_dir.write({**OLD, "processes": [{**OLD["processes"][0], "port": "19534"}]})
    assert state_dir.read() == OLD  # nothing bad reached the disk
    state_dir.write({**OLD, "phase": "degraded"})
    assert state_dir.read()["phase"] == "degraded"
