"""Every command in README.md and docs/*.md runs as written (issue 28 item 17).

The ```bash blocks of each page run in order, each command as a user would type it (bash, in a
folder of its own, `epdctl` from this environment), against a private state folder. A block that
needs a GPU, real vLLM, a cluster, an installation or a second shell is excused on the line
above it: `<!-- not run: REASON -->`. The shipped sim topologies have fixed ports (10001,
19534...): when one is busy the page is skipped, naming it.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_no_orphans, epdctl
from docsblocks import DOCS, REPO, bash_blocks

SHIPPED_SIMS = ["sim-1e1pd", "sim-1e1p1d"]
# What a run block may call: epdctl itself, and curl to talk to what it started.
RUNNABLE = {"epdctl", "curl"}
BLOCKS = [block for path in DOCS for block in bash_blocks(path)]
PAGES_THAT_RUN = [path for path in DOCS if any(b.excuse is None for b in bash_blocks(path))]


def test_every_bash_block_is_run_or_excused_with_a_reason():
    wrong = []
    for block in BLOCKS:
        if block.excuse is not None:
            continue
        commands = block.commands()
        if not commands:
            wrong.append(f"{block.where}: no command to run")
        for command in commands:
            if shlex.split(command, comments=True)[0] not in RUNNABLE:
                wrong.append(f"{block.where}: {command.splitlines()[0]!r} is not run by the test: "
                             "excuse the block with <!-- not run: REASON -->")
    assert not wrong, "\n".join(wrong)
    assert any(b.excuse is None for b in BLOCKS) and any(b.excuse for b in BLOCKS)


def test_the_readme_tour_runs_and_the_logs_example_names_an_instance_of_its_topology():
    tour = [c for b in bash_blocks(REPO / "README.md") if b.excuse is None for c in b.commands()]
    assert tour[0].startswith("epdctl up sim-1e1pd -d") and tour[-1] == "epdctl down sim-1e1pd"
    every = "\n".join(c for b in BLOCKS if b.excuse is None for c in b.commands())
    assert "epdctl logs sim-1e1p1d pd-0" not in every  # sim-1e1p1d has no pd-0


def _planned_ports(env: dict) -> list[int]:
    ports = set()
    for name in SHIPPED_SIMS:
        plan = json.loads(epdctl("plan", name, "--json", env=env, check=0).stdout)
        for process in [*plan["instances"], plan["proxy"]]:
            ports.add(process["port"])
            ports.update(int(v) for k, v in process["env"].items() if k.endswith("_PORT"))
    return sorted(ports)


def _down_everything(state: Path, env: dict) -> None:
    for folder in sorted(state.iterdir()) if state.is_dir() else []:
        epdctl("down", folder.name, "--ignore-missing", env=env, timeout=120)


@pytest.mark.parametrize("page", PAGES_THAT_RUN, ids=lambda p: str(p.relative_to(REPO)))
def test_the_commands_of_a_page_run_as_written(page, tmp_path):
    from epdctl.ports import port_is_free

    env = {
        **os.environ,
        "EPDCTL_STATE_DIR": str(tmp_path / "state"),
        "EPDCTL_EC_PATH": str(tmp_path / "ec"),  # the shipped sims' EC folder, private to this run
        "EPDCTL_DEVICE_COUNT": "8",              # plan of a GPU topology on a machine with fewer
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "NO_COLOR": "1",
    }
    ports = _planned_ports(env)
    busy = [port for port in ports if not port_is_free(port)]
    if busy:
        pytest.skip(f"the shipped sim topologies' ports {busy} are in use on this machine")
    work = tmp_path / "work"
    work.mkdir()
    try:
        for block in bash_blocks(page):
            if block.excuse is not None:
                continue
            for command in block.commands():
                result = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True,
                                        text=True, timeout=300, stdin=subprocess.DEVNULL)
                assert result.returncode == 0, (
                    f"{block.where}: `{command}` exited {result.returncode}\n"
                    f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}")
    finally:
        _down_everything(tmp_path / "state", env)
    assert_no_orphans(str(tmp_path), ports)
