"""Issue #27, the shared EC/KV folder ledger: nothing in use is ever removed, and what epdctl
created and nobody uses any more goes.

Real CLI and sim processes; topologies share and nest folders under tmp_path, with supervisors
SIGKILLed and adopted in between. Every test ends with `down` and the orphan check.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psutil
import pytest

from conftest import assert_no_orphans, epdctl, http_post, wait_for, write_sim_topology

from epdctl.run import storage

IMAGE_CHAT = {"messages": [{"role": "user", "content": [
    {"type": "text", "text": "what is this?"},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}], "max_tokens": 2}


def _state(state_dir: Path, name: str) -> dict:
    return json.loads((state_dir / name / "state.json").read_text())


def _kill_supervisor(state_dir: Path, name: str) -> None:
    """SIGKILL a detached supervisor; its instances live on without it."""
    pid = _state(state_dir, name)["supervisor"]["pid"]
    os.kill(pid, signal.SIGKILL)

    def gone():
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    wait_for(gone, 10, f"supervisor {pid} to die")


def _cached(ports: dict) -> None:
    """One image through the proxy: the encoder writes it into the EC folder."""
    status, body = http_post(f"http://127.0.0.1:{ports['proxy']}/v1/chat/completions", IMAGE_CHAT)
    assert status == 200, body


def _cache_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("encoder_cache.safetensors"))


def _down_all(*names: str) -> None:
    for name in names:
        epdctl("down", name)


# ------------------------------------------------------------ item 1: leases after supervisor death


@pytest.mark.parametrize("adopt", [True, False], ids=["adopted", "not-adopted"])
def test_a_topology_whose_supervisor_died_keeps_its_shared_folder(tmp_path, state_dir, adopt):
    """A's supervisor is SIGKILLed (and A adopted, or not); B shares A's folder: B's down keeps it."""
    shared = tmp_path / "shared-ec"
    a, a_ports = write_sim_topology(tmp_path, "1e1pd", name="first", ec_path=str(shared))
    b, b_ports = write_sim_topology(tmp_path, "1e1pd", name="second", ec_path=str(shared))
    epdctl("up", "-d", str(a), check=0)
    try:
        _kill_supervisor(state_dir, "first")
        if adopt:
            assert "first is up" in epdctl("up", "-d", str(a), check=0).stdout
            # The lease names the adopting supervisor now, not the dead one.
            state = _state(state_dir, "first")
            lease = json.loads((shared / (storage.LEASE_PREFIX + state["run_token"])).read_text())
            assert lease["pid"] == state["supervisor"]["pid"]
        epdctl("up", "-d", str(b), check=0)
        _cached(a_ports)
        files = _cache_files(shared)
        assert files
        down_b = epdctl("down", "second", check=0)
        assert "kept the shared folder" in down_b.stdout and "first-" in down_b.stdout, down_b.stdout
        assert all(f.exists() for f in files)
        _cached(a_ports)
    finally:
        _down_all("second", "first")
    assert not shared.exists()  # A created it and was its last user
    assert_no_orphans(str(state_dir), list(a_ports.values()) + list(b_ports.values()))


# ------------------------------------------------------------ item 2: nested folders


def test_up_refuses_a_folder_inside_or_around_a_running_topologys(tmp_path, state_dir):
    nest = tmp_path / "nest"
    a, a_ports = write_sim_topology(tmp_path, "1e1pd", name="outer", ec_path=str(nest))
    inside, in_ports = write_sim_topology(tmp_path, "1e1pd", name="inside", ec_path=str(nest / "inner"))
    around, around_ports = write_sim_topology(tmp_path, "1e1pd", name="around", ec_path=str(tmp_path))
    same, same_ports = write_sim_topology(tmp_path, "1e1pd", name="same", ec_path=str(nest))
    epdctl("up", "-d", str(a), check=0)
    try:
        refused = epdctl("up", "-d", str(inside))
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert refused.stderr.strip() == (f"epdctl: shared_storage_path: {nest / 'inner'} is inside {nest}, the shared "
                                          f"folder of running topology 'outer'; use that very folder, or one outside it")
        refused = epdctl("up", "-d", str(around))
        assert refused.returncode == 1 and f"{tmp_path} is around {nest}" in refused.stderr, refused.stderr
        assert not (nest / "inner").exists()
        epdctl("up", "-d", str(same), check=0)  # the very same folder is shared, as before
        _cached(same_ports)
    finally:
        _down_all("same", "inside", "around", "outer")
    assert not nest.exists() and tmp_path.is_dir()
    assert_no_orphans(str(state_dir), [*a_ports.values(), *in_ports.values(), *around_ports.values(),
                                       *same_ports.values()])


def test_a_folder_in_use_beneath_is_never_removed_and_goes_once_unused(tmp_path):
    """The ledger itself, for topologies `up` cannot see (another state root, another user)."""
    nest = tmp_path / "nest"
    assert storage.claim(str(nest), "outer-0123456789abcdef") is True
    assert storage.claim(str(nest / "inner"), "inner-0123456789abcdef") is True
    (nest / "inner" / "cached").write_text("in use")
    line = storage.release(str(nest), "outer-0123456789abcdef")
    assert line == (f"kept the shared folder {nest}: a folder in it is still used "
                    f"({nest / 'inner'} by inner-0123456789abcdef)")
    assert (nest / "inner" / "cached").read_text() == "in use"
    # The last user of the inner folder goes: its folder, and the outer one nobody uses any more.
    line = storage.release(str(nest / "inner"), "inner-0123456789abcdef")
    assert line == f"removed the shared folder {nest / 'inner'} (created by epdctl); removed {nest} (created by epdctl, no longer used)"
    assert not nest.exists() and tmp_path.is_dir()


def test_an_outer_folder_around_one_in_use_is_kept(tmp_path):
    nest = tmp_path / "nest"
    assert storage.claim(str(nest / "inner"), "inner-0123456789abcdef") is True
    assert storage.claim(str(nest), "outer-0123456789abcdef") is False  # made on the way: not the outer's
    assert storage.release(str(nest), "outer-0123456789abcdef") is None
    assert (nest / "inner").is_dir()
    assert "removed" in storage.release(str(nest / "inner"), "inner-0123456789abcdef")
    assert not nest.exists()


def test_nested_topologies_of_two_state_roots_keep_each_others_folders(tmp_path, state_dir):
    nest = tmp_path / "nest"
    other_root = {"EPDCTL_STATE_DIR": str(tmp_path / "other-state")}
    a, a_ports = write_sim_topology(tmp_path, "1e1pd", name="outer", ec_path=str(nest))
    b, b_ports = write_sim_topology(tmp_path, "1e1pd", name="inner", ec_path=str(nest / "inner"))
    epdctl("up", "-d", str(a), check=0)
    try:
        epdctl("up", "-d", str(b), env=other_root, check=0)  # this `up` cannot see `outer`
        _cached(b_ports)
        files = _cache_files(nest / "inner")
        down_a = epdctl("down", "outer", check=0)
        assert f"kept the shared folder {nest}: a folder in it is still used ({nest / 'inner'} by inner-" in down_a.stdout
        assert files and all(f.exists() for f in files)
        _cached(b_ports)
        down_b = epdctl("down", "inner", env=other_root, check=0)
        assert f"removed {nest} (created by epdctl, no longer used)" in down_b.stdout, down_b.stdout
    finally:
        epdctl("down", "inner", env=other_root)
        epdctl("down", "outer")
    assert not nest.exists()
    assert_no_orphans(str(tmp_path), [*a_ports.values(), *b_ports.values()])


# ------------------------------------------------------------ item 3: parents up created


def test_down_removes_the_parents_up_created_and_nothing_else(tmp_path, state_dir):
    top = tmp_path / "x"
    a, a_ports = write_sim_topology(tmp_path, "1e1pd", name="first", ec_path=str(top / "a" / "b"))
    b, b_ports = write_sim_topology(tmp_path, "1e1pd", name="second", ec_path=str(top / "a" / "c"))
    epdctl("up", "-d", str(a), check=0)
    try:
        epdctl("up", "-d", str(b), check=0)  # /x/a exists now: it creates only c
        _cached(a_ports)
        down_a = epdctl("down", "first", check=0)
        assert f"removed the shared folder {top / 'a' / 'b'}" in down_a.stdout
        assert (top / "a" / "c").is_dir()  # /x/a holds B's folder: kept, and /x with it
        down_b = epdctl("down", "second", check=0)
        assert f"removed {top / 'a'}, {top} (created by epdctl, no longer used)" in down_b.stdout, down_b.stdout
    finally:
        _down_all("second", "first")
    assert not top.exists()
    assert_no_orphans(str(state_dir), [*a_ports.values(), *b_ports.values()])


def test_a_parent_up_created_stays_once_it_holds_something_of_the_users(tmp_path):
    top = tmp_path / "x"
    assert storage.claim(str(top / "a" / "b"), "t-0123456789abcdef") is True
    (top / "notes.txt").write_text("mine")
    assert storage.release(str(top / "a" / "b"), "t-0123456789abcdef") == (
        f"removed the shared folder {top / 'a' / 'b'} (created by epdctl); removed {top / 'a'} (created by epdctl, no longer used)")
    assert (top / "notes.txt").read_text() == "mine"
    assert not (top / "a").exists()


def test_a_claim_racing_a_down_that_removed_its_parent_starts_over(tmp_path, monkeypatch):
    """`down` of the last user removes /x/a between this claim's look and its mkdir: it makes /x/a again."""
    top = tmp_path / "x"
    assert storage.claim(str(top / "a" / "b"), "first-0123456789abcdef")
    real_missing = storage._missing
    raced = []

    def missing_then_down(folder):
        found = real_missing(folder)
        if not raced:
            raced.append(storage.release(str(top / "a" / "b"), "first-0123456789abcdef"))
        return found
    monkeypatch.setattr(storage, "_missing", missing_then_down)
    assert storage.claim(str(top / "a" / "c"), "second-0123456789abcdef") is True
    assert raced[0].startswith("removed") and (top / "a" / "c").is_dir()
    monkeypatch.undo()
    assert "removed" in storage.release(str(top / "a" / "c"), "second-0123456789abcdef")
    assert not top.exists()


# ------------------------------------------------------------ item 15: what an adopting `up` prints


def test_an_adopting_up_prints_what_is_true_now(tmp_path, state_dir):
    """pd-0 died while no supervisor watched: `up` must not print its old 'healthy after 0.9s'."""
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="adopt", extra="restart: no")
    epdctl("up", "-d", str(topology), check=0)
    try:
        state = _state(state_dir, "adopt")
        _kill_supervisor(state_dir, "adopt")
        pd = next(p for p in state["processes"] if p["name"] == "pd-0")
        os.killpg(pd["pid"], signal.SIGKILL)
        wait_for(lambda: not psutil.pid_exists(pd["pid"]) or psutil.Process(pd["pid"]).status() == psutil.STATUS_ZOMBIE,
                 10, "pd-0 to die")
        again = epdctl("up", "-d", str(topology), check=0)
        lines = again.stdout.splitlines()
        assert not any(line.startswith("pd-0: healthy") for line in lines), again.stdout
        assert "pd-0: exited (exit code unknown: it was adopted, not started, by this supervisor); " \
               "not restarted: restart policy is no" in lines, again.stdout
        assert f"encode-0: healthy (adopted, pid {state['processes'][0]['pid']}) at http://127.0.0.1:{ports['encode-0']}" in lines
        # (The proxy may have seen pd-0 go and be unhealthy too.)
        assert lines[-1].startswith("epdctl: adopt is up, degraded (pd-0") and "not healthy): proxy at" in lines[-1], again.stdout
    finally:
        epdctl("down", "adopt", check=0)
    assert_no_orphans(str(state_dir), list(ports.values()))


# ------------------------------------------------------------ the ledger, whole


def test_the_ledger_three_topologies_sharing_and_nesting_through_supervisor_deaths(tmp_path, state_dir):
    """first and second share top/deep/ec (top and deep missing: up creates them); third, of another
    state root, nests top/deep/ec/inner. Supervisors die and are adopted in between. After every
    step, every running topology still has its folder and every file it cached; at the end,
    everything epdctl created is gone and nothing else is."""
    top = tmp_path / "top"
    shared, inner = top / "deep" / "ec", top / "deep" / "ec" / "inner"
    other_root = {"EPDCTL_STATE_DIR": str(tmp_path / "other-state")}
    env = {"first": None, "second": None, "third": other_root}
    files, ports_of = {}, {}
    for name, folder in (("first", shared), ("second", shared), ("third", inner)):
        path, ports_of[name] = write_sim_topology(tmp_path, "1e1pd", name=name, ec_path=str(folder))
        files[name] = path
    (tmp_path / "keep.txt").write_text("the user's")
    running: set[str] = set()
    cached: dict[str, list[Path]] = {}

    def check():
        for name in running:
            _cached(ports_of[name])
            cached[name] = _cache_files(inner if name == "third" else shared)
        for name in running:
            assert cached[name] and all(f.exists() for f in cached[name]), f"{name} lost its EC files"

    try:
        for name in ("first", "second", "third"):
            epdctl("up", "-d", str(files[name]), env=env[name], check=0)
            running.add(name)
            check()
        _kill_supervisor(state_dir, "first")
        check()
        epdctl("up", "-d", str(files["first"]), check=0)  # adopts
        _kill_supervisor(state_dir, "second")  # left without a supervisor
        check()
        for name in ("first", "second"):  # both shared-folder users go: third's folder inside stays
            down = epdctl("down", name, env=env[name], check=0)
            running.discard(name)
            check()
            assert shared.is_dir(), down.stdout
        down = epdctl("down", "third", env=other_root, check=0)
        running.discard("third")
        assert f"removed {shared}, {top / 'deep'}, {top} (created by epdctl, no longer used)" in down.stdout, down.stdout
    finally:
        for name in ("third", "second", "first"):
            epdctl("down", name, env=env[name])
    assert not top.exists()
    assert (tmp_path / "keep.txt").read_text() == "the user's"
    assert_no_orphans(str(tmp_path), [port for ports in ports_of.values() for port in ports.values()])
