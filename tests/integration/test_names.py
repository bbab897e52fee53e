"""NAME or FILE everywhere, the shipped topologies from any folder, and what `down` and `status`
say (and exit with) about names that are not up."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO, TOPOLOGIES, assert_no_orphans, epdctl, wait_for, wait_settled, write_sim_topology

from epdctl.names import shipped_topologies


# ------------------------------------------------------------ the rule


# ------------------------------------------------------------ FILE commands take a NAME


def test_a_shipped_topology_is_named_from_any_folder(tmp_path):
    ok = epdctl("validate", "sim-1e1pd", cwd=tmp_path, check=0)
    assert "topology 'sim-1e1pd'" in ok.stdout
    plan = json.loads(epdctl("plan", "sim-1e1p1d", "--json", cwd=tmp_path, check=0).stdout)
    assert plan["name"] == "sim-1e1p1d"
    assert epdctl("export", "k8s", "sim-1e1pd", "-o", str(tmp_path / "k8s"), cwd=tmp_path, check=0)
    assert (tmp_path / "k8s" / "kustomization.yaml").exists()


def test_a_file_of_that_name_in_the_current_folder_wins(tmp_path):
    mine = (TOPOLOGIES / "sim-1e1pd.yaml").read_text().replace("name: sim-1e1pd", "name: mine")
    (tmp_path / "sim-1e1pd.yaml").write_text(mine)
    assert "topology 'mine'" in epdctl("validate", "sim-1e1pd", cwd=tmp_path, check=0).stdout


@pytest.mark.parametrize("command", [["validate"], ["plan"], ["up", "-d"], ["smoke"], ["sweep", "--splits", "pd"]])
def test_an_unknown_name_lists_the_shipped_ones_and_suggests_the_closest(command, tmp_path, state_dir):
    result = epdctl(*command, "sim-1e1p", cwd=tmp_path, check=2)
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "'sim-1e1p' is not a shipped topology" in line and "did you mean 'sim-1e1pd'?" in line
    assert "see `epdctl topologies`" in line


def test_a_bare_file_name_is_a_name_and_the_error_says_how_to_give_the_file(tmp_path):
    (tmp_path / "mytopo").write_text((TOPOLOGIES / "sim-1e1pd.yaml").read_text())
    result = epdctl("validate", "mytopo", cwd=tmp_path, check=2)
    assert "write ./mytopo" in result.stderr
    epdctl("validate", "./mytopo", cwd=tmp_path, check=0)


# ------------------------------------------------------------ topologies and init


def test_topologies_lists_each_shipped_one_with_its_engine_and_roles(tmp_path):
    lines = epdctl("topologies", cwd=tmp_path, check=0).stdout.splitlines()
    assert len(lines) == len(shipped_topologies())
    by_name = {line.split()[0]: line for line in lines}
    assert by_name["sim-1e1pd"].split()[1:3] == ["sim", "cpu"] and "1 encode, 1 pd" in by_name["sim-1e1pd"]
    assert "1 encode, 1 prefill, 1 decode" in by_name["1e1p1d"] and " vllm " in by_name["1e1p1d"]


def test_init_copies_a_shipped_topology_out_and_never_overwrites(tmp_path):
    result = epdctl("init", "sim-1e1pd", cwd=tmp_path, check=0)
    copy = tmp_path / "sim-1e1pd.yaml"
    assert copy.read_bytes() == (TOPOLOGIES / "sim-1e1pd.yaml").read_bytes()
    assert "epdctl up sim-1e1pd.yaml" in result.stdout
    copy.write_text("# mine\n")
    again = epdctl("init", "sim-1e1pd", cwd=tmp_path, check=1)
    assert "already exists; refusing to overwrite it" in again.stderr
    assert copy.read_text() == "# mine\n"
    epdctl("init", "agg", "-o", str(tmp_path / "edit-me.yaml"), check=0)
    assert "name: agg" in (tmp_path / "edit-me.yaml").read_text()
    bare = epdctl("init", "agg", "-o", "plain", cwd=tmp_path, check=0)
    assert "epdctl up ./plain" in bare.stdout  # as the rule reads it: a FILE


def test_init_never_writes_through_a_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "link.yaml").symlink_to(victim)
    (tmp_path / "dangling.yaml").symlink_to(tmp_path / "created-elsewhere")
    for link in ("link.yaml", "dangling.yaml"):
        result = epdctl("init", "sim-1e1pd", "-o", link, cwd=tmp_path, check=1)
        assert "refusing to overwrite" in result.stderr
    assert victim.read_text() == "keep"
    assert not (tmp_path / "created-elsewhere").exists()


def test_init_of_an_unknown_name_is_a_usage_error(tmp_path):
    result = epdctl("init", "sim-1epd", cwd=tmp_path, check=2)
    assert "did you mean 'sim-1e1pd'?" in result.stderr
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------ health


# ------------------------------------------------------------ NAME commands take a FILE; down; status


def _failed_start(tmp_path, name: str) -> None:
    """A start that fails at once (no such engine binary) and keeps its state, as a real one does."""
    from conftest import free_ports

    pd, proxy = free_ports(2)
    topology = tmp_path / f"{name}.yaml"
    topology.write_text(f"name: {name}\nmodel: m\nplatform: cpu\nvllm_command: [no-such-vllm-binary, serve]\n"
                        f"pd: [{{port: {pd}}}]\nproxy: {{port: {proxy}}}\n")
    assert epdctl("up", "-d", str(topology)).returncode == 1
    assert (state_dir_of(name) / "state.json").exists()


def state_dir_of(name: str) -> Path:
    return Path(os.environ["EPDCTL_STATE_DIR"]) / name


def _status(*args: str, check: int) -> dict:
    return json.loads(epdctl("status", *args, "--json", check=check).stdout)


def test_a_running_topology_is_named_by_its_file_and_failed_starts_are_not_up(tmp_path, state_dir):
    work = tmp_path / "work"
    work.mkdir()
    topology, ports = write_sim_topology(work, "2e1pd", name="named", extra="restart: no")
    try:
        epdctl("up", "-d", "named", cwd=work, check=0)  # a NAME: ./named.yaml here wins
        status = json.loads(epdctl("status", "named.yaml", "--json", cwd=work, check=0).stdout)  # exit 0: healthy
        assert (status["name"], status["state"], status["health"], status["reasons"]) == ("named", "running", "healthy", [])
        assert _status(str(topology), check=0)["name"] == "named"
        assert epdctl("logs", "./named.yaml", "proxy", "-n", "1", cwd=work, check=0).stdout.startswith("proxy | ")
        assert "started" in epdctl("events", str(topology), check=0).stdout
        bench = json.loads(epdctl("bench", str(topology), "--num-prompts", "2", "--concurrency", "1", "--max-tokens", "2",
                                  "--image-size", "32", "--json", check=0).stdout)
        assert bench["completed"] == 2 and bench["config"]["target"] == "named"

        # Another topology on the same ports: one line naming the topology that holds them.
        other = work / "other.yaml"
        other.write_text(topology.read_text().replace("name: named", "name: other"))
        clash = epdctl("up", "-d", str(other), check=1).stderr.strip()
        assert len(clash.splitlines()) == 1, clash
        assert "in use by the epdctl topology 'named': `epdctl down named` stops it" in clash
        assert all(str(port) in clash for port in ports.values()) and "cmdline" not in clash

        # One encoder of two gone: it still serves, degraded; status exits 1.
        encoder = next(i for i in status["instances"] if i["name"] == "encode-1")
        os.killpg(encoder["pid"], signal.SIGKILL)
        degraded = wait_for(lambda: (lambda s: s if s["health"] == "degraded" else None)(_status("named", check=1)),
                            10, "named degraded")
        assert degraded["state"] == "degraded" and degraded["reasons"][0].startswith("encode-1 is exited")

        # A failed start beside it: shown as failed, not counted as up when down picks the default.
        _failed_start(tmp_path, "m7")
        failed = _status("m7", check=1)
        assert failed["state"] == "failed" and failed["health"] == "failed"
        assert "command not found" in failed["reasons"][0]
        table = epdctl("status", check=1).stdout
        assert "m7: failed" in table and "named: degraded" in table
        down = epdctl("down", check=0)  # not 'several topologies are up (m7, named)'
        assert "named is down" in down.stdout
        assert_no_orphans(str(state_dir), list(ports.values()))
        nothing = epdctl("down", check=0).stdout
        assert "nothing to stop" in nothing and "m7 (failed)" in nothing
        epdctl("down", "m7", check=0)
        assert not state_dir_of("m7").exists()
    finally:
        epdctl("down", "named", "--ignore-missing", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


def test_down_of_a_name_that_is_not_up_is_exit_1_naming_those_that_are(tmp_path, state_dir):
    assert "no topology named 'nosuch' is up or has processes left; there is none" in \
        epdctl("down", "nosuch", check=1).stderr
    _failed_start(tmp_path, "alpha")
    typo = epdctl("down", "alpah", check=1)
    assert "no topology named 'alpah'" in typo.stderr, typo.stderr
    assert "existing topologies: alpha; did you mean 'alpha'?" in typo.stderr
    assert "nothing to stop for 'alpah'" in epdctl("down", "alpah", "--ignore-missing", check=0).stdout
    epdctl("down", "alpha", check=0)


def test_status_with_no_name_reports_processes_whose_state_folder_is_gone(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "agg", name="gone")
    epdctl("up", "-d", str(topology), check=0)
    try:
        wait_settled(state_dir, "gone")
        shutil.rmtree(state_dir / "gone")
        status = epdctl("status", check=3)
        assert "processes of an unknown state remain: gone (2 process(es))" in status.stderr
        assert "`epdctl down gone` stops them" in status.stderr
        down = epdctl("down", check=0)  # no name: says what is left rather than nothing at all
        assert "processes whose state folder is gone: gone" in down.stdout
    finally:
        epdctl("down", "gone", "-t", "2", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


# ------------------------------------------------------------ help and README stand alone


@pytest.mark.parametrize("command", ["validate", "plan", "up", "status", "logs", "events", "down", "smoke", "bench",
                                     "sweep", "calibrate", "topologies", "init"])
def test_help_stands_alone(command):
    result = epdctl(command, "--help", check=0)
    assert "DESIGN" not in result.stdout


# ------------------------------------------------------------ pip install .


@pytest.mark.install
def test_up_of_a_shipped_name_from_an_empty_folder_after_pip_install(tmp_path, state_dir):
    """`pip install . && epdctl up sim-1e1pd` as the README says: the topologies are package data.

    Kept cheap: the wheel is built offline from a copy of the source (setuptools and wheel of
    the test venv, no dependencies), installed into a fresh venv that borrows the test venv's
    dependencies through a .pth file (not its editable epdctl: .pth files are read only in
    site folders, so the one there is not)."""
    from epdctl.ports import port_is_free

    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(REPO / "pyproject.toml", source)
    shutil.copy(REPO / "README.md", source)
    shutil.copytree(REPO / "epdctl", source / "epdctl", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index", "--no-build-isolation",
                    str(source), "-w", str(wheels)], check=True, capture_output=True, timeout=300)
    wheel = next(wheels.glob("epdctl-*.whl"))
    import zipfile

    assert "epdctl/topologies/sim-1e1pd.yaml" in zipfile.ZipFile(wheel).namelist()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True, timeout=300)
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "test-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "EPDCTL_EC_PATH": str(tmp_path / "ec")}
    env.pop("PYTHONPATH", None)
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import epdctl; print(epdctl.__file__)"],
                           cwd=empty, env=env, check=True, capture_output=True, text=True).stdout
    assert where.startswith(site), where  # the installed copy, not the checkout
    epdctl_bin = str(venv / "bin" / "epdctl")
    listed = subprocess.run([epdctl_bin, "topologies"], cwd=empty, env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "sim-1e1pd" in listed.stdout, listed.stderr

    ports = [10001, 19534, 19535]  # the shipped file's own (below the tests' free_ports range)
    if not all(port_is_free(port) for port in ports):
        pytest.skip("the shipped sim-1e1pd's ports are taken on this machine")
    try:
        up = subprocess.run([epdctl_bin, "up", "sim-1e1pd", "-d"], cwd=empty, env=env, capture_output=True, text=True,
                            timeout=120, stdin=subprocess.DEVNULL)
        assert up.returncode == 0, up.stdout + up.stderr
        status = subprocess.run([epdctl_bin, "status", "sim-1e1pd", "--json"], cwd=empty, env=env,
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and json.loads(status.stdout)["health"] == "healthy", status.stderr
    finally:
        subprocess.run([epdctl_bin, "down", "sim-1e1pd", "--ignore-missing"], cwd=empty, env=env,
                       capture_output=True, timeout=120)
    assert list(empty.iterdir()) == []
    assert_no_orphans(str(state_dir), ports)
