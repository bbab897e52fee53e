"""launcher: slurm on a real two-node Slurm cluster (tests/slurm/cluster.sh: munged, slurmctld and
two slurmd, each node in a network namespace of its own with its own address).

A sim E+P+D spread over both nodes: by `export slurm` + `sbatch`, and by `salloc` + a foreground
`up`; a killed task and one node's cancelled steps come back as new steps; `down`, Ctrl-C and
`scancel` leave no step, no job and no process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import epdctl, free_ports, http_post, run_processes, wait_for

HERE = Path(__file__).resolve().parent
CLUSTER = HERE / "cluster.sh"
IMAGE = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5Erk"
         "Jggg==")


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "the Slurm test cluster needs root (network namespaces, munged and slurmd)"
    missing = [c for c in ("munged", "slurmctld", "slurmd", "srun", "sbatch", "salloc", "nsenter") if not shutil.which(c)]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install -y slurm-wlm munge)"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """SLURM_CONF of the running test cluster, started here when it is not (and then stopped here)."""
    reason = _why_not()
    if reason:
        if os.environ.get("EPDCTL_REQUIRE_SLURM") == "1" and os.geteuid() == 0:
            pytest.fail(reason)  # CI installs Slurm: a missing piece there is a failure, not a skip
        pytest.skip(reason)
    status = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True, text=True)
    started_here = status.returncode != 0
    out = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    exports = dict(line[len("export "):].split("=", 1) for line in out.stdout.splitlines() if line.startswith("export "))
    assert "SLURM_CONF" in exports, out.stdout
    yield exports
    if started_here:
        subprocess.run(["bash", str(CLUSTER), "down"], capture_output=True, timeout=120)


@pytest.fixture
def env(cluster, tmp_path, monkeypatch):
    for key, value in cluster.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("EPDCTL_STATE_DIR", str(tmp_path / "state"))
    return {**cluster, "EPDCTL_STATE_DIR": str(tmp_path / "state")}


def _topology(tmp: Path, name: str) -> Path:
    ports = free_ports(4)
    path = tmp / f"{name}.yaml"
    path.write_text(f"""
name: {name}
model: sim-model
engine: sim
launcher: slurm
defaults:
  args: {{sim-ttft-ms: 5, sim-tpot-ms: 1, sim-encode-ms: 5}}
ec_transfer: {{connector: ECExampleConnector, shared_storage_path: {tmp}/ec}}
kv_transfer: {{connector: NixlConnector}}
encode:
  - {{port: {ports[0]}}}
prefill:
  - {{port: {ports[1]}}}
decode:
  - {{port: {ports[2]}, node: n2}}
proxy: {{port: {ports[3]}}}
health: {{timeout_s: 90, interval_s: 0.1}}
restart: {{policy: on-failure, backoff_s: 0.2}}
""")
    return path


def _status(name: str) -> dict:
    result = epdctl("status", name, "--json")
    return json.loads(result.stdout) if result.stdout.strip() else {}


def _healthy(name: str) -> dict | None:
    report = _status(name)
    return report if report.get("health") == "healthy" else None


def _steps(job: str | None = None) -> list[tuple[str, str, str]]:
    """(step id, name, node) of every step Slurm knows (of one job)."""
    argv = ["squeue", "-h", "--steps", "-o", "%i %j %N"] + ([f"--jobs={job}"] if job else [])
    out = subprocess.run(argv, capture_output=True, text=True).stdout
    return [tuple(line.split()) for line in out.splitlines() if len(line.split()) == 3]


def _jobs_named(name: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-n", f"epdctl-{name}", "-o", "%i"], capture_output=True, text=True).stdout
    return out.split()


def _chat_with_image(url: str) -> dict:
    body = {"model": "sim-model", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is it?"}, {"type": "image_url", "image_url": {"url": IMAGE}}]}]}
    status, answer = http_post(url + "/v1/chat/completions", body)
    assert status == 200, answer
    return json.loads(answer)


def _nothing_left(name: str, job: str) -> None:
    wait_for(lambda: not _steps(job) and not _jobs_named(name), 60, f"job {job} and its steps to end")
    wait_for(lambda: not run_processes(f"{name}-"), 30, f"no process of {name} (EPDCTL_RUN tag)")


def test_sbatch_spreads_epd_over_two_nodes_heals_a_killed_step_and_down_leaves_nothing(env, tmp_path):
    name = "slurm-batch"
    topo = _topology(tmp_path, name)
    job_sh = tmp_path / "job.sh"
    epdctl("export", "slurm", str(topo), "-o", str(job_sh), "--nodes", "2", "--time", "10", check=0)
    script = job_sh.read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --signal=B:TERM@60" in script
    assert f"exec {sys.executable} -m epdctl up {topo}" in script  # the same epdctl, by absolute path
    submitted = subprocess.run(["sbatch", "--parsable", str(job_sh)], capture_output=True, text=True, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    try:
        report = wait_for(lambda: _healthy(name), 120, f"{name} healthy under job {job}")
        nodes = {i["name"]: i["node"] for i in report["instances"]}
        assert nodes["decode-0"] == "n2" and set(nodes.values()) == {"n1", "n2"}, nodes
        steps = {i["name"]: i["step"] for i in report["instances"]}
        live = {step: node for step, _, node in _steps(job)}
        assert all(steps[n] in live and live[steps[n]] == nodes[n] for n in nodes), (steps, live)
        # Every URL is a node's address, never loopback: the proxy reaches the other node.
        assert all(not i["url"].startswith("http://127.") for i in report["instances"] + [report["proxy"]])
        for _ in range(3):
            assert _chat_with_image(report["proxy"]["url"])["usage"]["completion_tokens"] == 4

        decoder = next(i for i in report["instances"] if i["name"] == "decode-0")
        psutil.Process(decoder["pid"]).kill()  # its task on n2 (this machine holds both nodes)
        healed = wait_for(lambda: (lambda r: r if r and next(i for i in r["instances"] if i["name"] == "decode-0")
                                   ["restarts"] == 1 else None)(_healthy(name)), 90, "decode-0 back as a new step")
        again = next(i for i in healed["instances"] if i["name"] == "decode-0")
        assert again["step"] != decoder["step"] and again["node"] == "n2" and again["pid"] != decoder["pid"]
        assert _chat_with_image(healed["proxy"]["url"])["usage"]["completion_tokens"] == 4

        down = epdctl("down", name, check=0)
        assert "is down" in down.stdout, down.stdout
        _nothing_left(name, job)
        assert not (tmp_path / "ec").exists()
    finally:
        subprocess.run(["scancel", job], capture_output=True)


def test_scancel_of_one_nodes_steps_brings_them_back_and_the_rest_keep_serving(env, tmp_path):
    name = "slurm-node"
    topo = _topology(tmp_path, name)
    job_sh = tmp_path / "job.sh"
    epdctl("export", "slurm", str(topo), "-o", str(job_sh), "--nodes", "2", check=0)
    submitted = subprocess.run(["sbatch", "--parsable", str(job_sh)], capture_output=True, text=True, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    try:
        report = wait_for(lambda: _healthy(name), 120, f"{name} healthy")
        before = {i["name"]: i["step"] for i in report["instances"]}
        on_n2 = [step for step, step_name, node in _steps(job) if node == "n2" and step_name.startswith("epdctl.")]
        assert on_n2
        subprocess.run(["scancel", *on_n2], check=True)
        after = wait_for(lambda: (lambda r: r if r and all(i["step"] not in on_n2 for i in r["instances"]) else None)(
            _healthy(name)), 90, "n2's instances back as new steps")
        for inst in after["instances"]:
            if inst["node"] == "n2":
                assert inst["step"] != before[inst["name"]] and inst["restarts"] == 1
            else:
                assert inst["step"] == before[inst["name"]] and inst["restarts"] == 0
        assert _chat_with_image(after["proxy"]["url"])["usage"]["completion_tokens"] == 4
        # scancel of the job: the batch shell is `epdctl up`, which gets SIGTERM and tears down.
        subprocess.run(["scancel", job], check=True)
        _nothing_left(name, job)
        wait_for(lambda: not (Path(env["EPDCTL_STATE_DIR"]) / name / "state.json").exists(), 30, "the state removed")
    finally:
        subprocess.run(["scancel", job], capture_output=True)


def test_salloc_foreground_up_and_ctrl_c(env, tmp_path):
    name = "slurm-fg"
    topo = _topology(tmp_path, name)
    salloc = subprocess.Popen(["salloc", "-N2", "--job-name", f"epdctl-{name}", sys.executable, "-m", "epdctl", "up", str(topo)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True, text=True, cwd=tmp_path)
    try:
        report = wait_for(lambda: _healthy(name), 120, f"{name} healthy under salloc")
        assert {i["node"] for i in report["instances"]} == {"n1", "n2"}
        _chat_with_image(report["proxy"]["url"])
        job = _jobs_named(name)[0]
        up = next(p for p in psutil.Process(salloc.pid).children(recursive=True)
                  if "up" in p.cmdline() and "epdctl" in " ".join(p.cmdline()))
        up.send_signal(signal.SIGINT)  # what Ctrl-C delivers to it
        output, _ = salloc.communicate(timeout=90)
        assert "SIGINT received, stopping" in output and "stopped by SIGTERM" in output, output
        assert salloc.returncode == 130, output
        _nothing_left(name, job)
    finally:
        if salloc.poll() is None:
            os.killpg(salloc.pid, signal.SIGKILL)
            salloc.wait()


def test_up_outside_an_allocation_is_one_line_and_validate_needs_none(env, tmp_path):
    topo = _topology(tmp_path, "slurm-none")
    for key in ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        os.environ.pop(key, None)
    assert epdctl("validate", str(topo)).returncode == 0
    result = epdctl("up", str(topo), "-d")
    assert result.returncode == 2 and "not inside a Slurm allocation" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_node_outside_the_allocation_names_file_line(env, tmp_path):
    topo = _topology(tmp_path, "slurm-bad")
    topo.write_text(topo.read_text().replace("node: n2", "node: n9"))
    assert epdctl("validate", str(topo)).returncode == 0  # outside an allocation its nodes are unknown
    for command in ("validate", "plan", "up"):
        result = subprocess.run(["salloc", "-N2", sys.executable, "-m", "epdctl", command, str(topo)],
                                capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert result.returncode == 2, (command, result.stderr)
        assert f"{topo.name}:" in result.stderr and "decode[0].node: 'n9' is not a node of the allocation" in result.stderr
        assert "Traceback" not in result.stderr


def test_status_and_down_from_another_host(env, tmp_path):
    """`status` and `down` from a host that only shares the state folder (a "login" host: a host
    name and a network of its own, outside the job), while the supervisor is the batch script on
    n1: status reads Slurm's steps, down asks the supervisor through the state folder."""
    name = "slurm-far"
    topo = _topology(tmp_path, name)
    job_sh = tmp_path / "job.sh"
    epdctl("export", "slurm", str(topo), "-o", str(job_sh), "--nodes", "2", check=0)
    submitted = subprocess.run(["sbatch", "--parsable", str(job_sh)], capture_output=True, text=True, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]

    def on_n2(*args: str) -> subprocess.CompletedProcess:
        # Not a step of the job: the job's end would cancel it with the others.
        return subprocess.run(["nsenter", "--net=/run/netns/epdctl-n2", "unshare", "--uts", "sh", "-c",
                               'hostname login && exec "$@"', "sh", sys.executable, "-m", "epdctl", *args],
                              capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    try:
        local = wait_for(lambda: _healthy(name), 120, f"{name} healthy")
        far = on_n2("status", name, "--json")
        assert far.returncode == 0, far.stderr
        report = json.loads(far.stdout)
        assert report["health"] == "healthy" and report["supervisor"]["host"] == "n1", report
        assert {i["name"]: i["step"] for i in report["instances"]} == {i["name"]: i["step"] for i in local["instances"]}
        down = on_n2("down", name)
        assert down.returncode == 0, (down.stdout, down.stderr)
        assert "asked its supervisor on n1" in down.stdout and "is down" in down.stdout, down.stdout
        _nothing_left(name, job)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
