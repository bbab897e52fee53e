"""Where a running topology is recorded: `$EPDCTL_STATE_DIR/<name>/` (docs/design.md, "State on disk").

The folder is 0700 and holds `state.json` (written atomically), one log per process, and a
lock file. A pid is only trusted together with its psutil `create_time`, so a recycled pid
is never mistaken for one of ours (docs/security.md).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import socket
import stat
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import psutil

from epdctl.atomicfile import write_atomic
from epdctl.errors import EXIT_USAGE, EpdctlError
from epdctl.run.staterecord import UnreadableState, checked

STATE_FILE = "state.json"
LOCK_FILE = "lock"
# `epdctl down` on another host than the supervisor's (launcher slurm, a shared state folder):
# it cannot signal the supervisor, so it leaves this file, which the supervisor obeys.
STOP_FILE = "stop-request"
# `epdctl scale`: the request it leaves, and the pool the supervisor writes for the proxy (run/scaling.py).
SCALE_FILES = ("scale-request", "pool.json")
LEDGER_FILE = "sim-ledger"  # the device ledger of `--sim-contention device` sims (epdctl/sim/ledger.py)
_SCALE_BESIDE = re.compile(r"scale-request\.[0-9a-f]{8}")  # a request `epdctl scale` writes before linking it into place
RUN_ENV = "EPDCTL_RUN"  # every child gets this tag; the sweep finds strays by it
INSTANCE_ENV = "EPDCTL_INSTANCE"  # and its instance's name: a restart sweeps what the dead one left
CREATE_TIME_TOLERANCE_S = 0.05
MAX_STATE_BYTES = 8 * 1024 * 1024


def state_root(environ: Optional[Mapping[str, str]] = None) -> Path:
    """Our state root, or (given its environment) the one a child of another epdctl records to."""
    environ = os.environ if environ is None else environ
    explicit = environ.get("EPDCTL_STATE_DIR")
    if explicit:
        return Path(explicit)
    home = environ.get("HOME") or os.path.expanduser("~")
    base = environ.get("XDG_STATE_HOME") or os.path.join(home, ".local", "state")
    return Path(base) / "epdctl"


# A topology name is a folder name under the state root: the same pattern as the topology's
# `name`, so `epdctl down ../../etc` can never point outside the root.
_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")
_warned_roots: set[str] = set()
_LOG = re.compile(r"[a-z0-9][a-z0-9-]*\.log(\.[0-9]+)?|events\.jsonl(\.[0-9]+)?")
_STEP = re.compile(r"[a-z0-9-]+\.step")  # launcher slurm: what a job step's task recorded (run/steptask.py)


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or len(name) > 200:
        raise EpdctlError(f"{name!r} is not a topology name ([a-z0-9][a-z0-9-]*)", EXIT_USAGE)
    return name


def warn_if_shared_root(root: Path) -> None:
    """Others who can write to the root can plant or swap folders in it: say so, once."""
    key = str(root)
    if key in _warned_roots:
        return
    _warned_roots.add(key)
    try:
        st = os.stat(root)
    except OSError:
        return
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        sticky = " (sticky)" if st.st_mode & stat.S_ISVTX else ""
        print(f"epdctl: warning: the state root {root} is writable by other users{sticky} "
              f"(mode {stat.S_IMODE(st.st_mode):04o}); set EPDCTL_STATE_DIR to a folder only you can write",
              file=sys.stderr)


def _check_owned(st: os.stat_result, path: Path, what: str) -> None:
    """Only our own user's state is trusted (docs/security.md)."""
    if stat.S_ISLNK(st.st_mode):
        raise EpdctlError(f"{path}: the state {what} is a symlink; refusing to use it (remove it if you did not make it)")
    if st.st_uid != os.geteuid():
        raise EpdctlError(f"{path}: the state {what} belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}); "
                          "refusing to trust it")


class StateDir:
    def __init__(self, name: str, root: Optional[Path] = None):
        self.name = check_name(name)
        self.root = root or state_root()
        self.path = self.root / name

    @property
    def state_file(self) -> Path:
        return self.path / STATE_FILE

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_FILE

    def log_file(self, process: str) -> Path:
        return self.path / f"{process}.log"

    def verify(self) -> bool:
        """True when the folder exists and is ours (a real folder, our uid); False when absent.

        A symlink or another user's folder is refused: someone who can write to the state root
        must not be able to make us delete, chmod or trust what they point us at.
        """
        warn_if_shared_root(self.root)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        _check_owned(st, self.path, "folder")
        if not stat.S_ISDIR(st.st_mode):
            raise EpdctlError(f"{self.path}: the state folder is not a folder; refusing to use it")
        return True

    def _open_dir(self) -> int:
        """An fd on our verified folder, opened without following a symlink swapped in since."""
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            _check_owned(os.fstat(fd), self.path, "folder")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def ensure(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        warn_if_shared_root(self.root)
        try:
            self.path.mkdir(mode=0o700)
        except FileExistsError:
            pass
        self.verify()
        fd = self._open_dir()
        try:
            os.fchmod(fd, 0o700)  # through the fd: never chmod what a symlink points to
        finally:
            os.close(fd)

    def exists(self) -> bool:
        return self.verify() and os.path.lexists(self.state_file)

    def read(self) -> Optional[dict[str, Any]]:
        if not self.verify():
            return None
        try:
            fd = os.open(self.state_file, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise EpdctlError(f"{self.state_file}: the state file is a symlink; refusing to trust it") from None
            raise EpdctlError(f"{self.state_file}: unreadable state ({exc.strerror})") from None
        try:
            _check_owned(os.fstat(fd), self.state_file, "file")
            with os.fdopen(fd, "rb", closefd=False) as handle:
                data = handle.read(MAX_STATE_BYTES + 1)
        finally:
            os.close(fd)
        try:
            if len(data) > MAX_STATE_BYTES:
                raise ValueError("larger than any state epdctl writes")
            state = json.loads(data)
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            raise UnreadableState(str(self.state_file), str(exc), self.name) from None
        return checked(state, str(self.state_file), self.name)  # the typed format (run/staterecord.py), or one line

    def write(self, state: dict[str, Any]) -> None:
        """Write the state after checking it against the format: a bad value is a bug, never on disk."""
        write_json_atomic(self.state_file, checked(state, str(self.state_file), self.name))

    def try_lock(self) -> Optional[int]:
        """An fd holding the topology's exclusive lock, or None when someone else holds it."""
        self.ensure()
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        return fd

    def is_locked(self) -> bool:
        if not self.verify() or not os.path.lexists(self.lock_file):
            return False
        fd = self.try_lock()
        if fd is None:
            return True
        os.close(fd)
        return False

    def remove_logs(self) -> None:
        """A new run's logs and events start empty (rotated copies included)."""
        self._remove(lambda entry: bool(_LOG.fullmatch(entry)), rmdir=False)

    def remove(self) -> None:
        """Delete only what we create here: state, lock, logs and events, then the folder if empty."""
        self._remove(lambda entry: entry in (STATE_FILE, LOCK_FILE, STOP_FILE, LEDGER_FILE, *SCALE_FILES)
                     or bool(_LOG.fullmatch(entry) or _STEP.fullmatch(entry) or _SCALE_BESIDE.fullmatch(entry)),
                     rmdir=True)

    def request_stop(self, by: str) -> None:
        write_json_atomic(self.path / STOP_FILE, {"by": by})

    def clear_stop(self) -> None:
        """A new supervisor starts without an earlier run's request (only a file of ours, never a link's target)."""
        try:
            os.unlink(self.path / STOP_FILE)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            pass

    def stop_requested(self) -> bool:
        return os.path.lexists(self.path / STOP_FILE)

    def step_file(self, instance: str) -> Path:
        return self.path / f"{instance}.step"

    def _remove(self, ours, rmdir: bool) -> None:
        try:
            if not self.verify():
                return
            fd = self._open_dir()
        except FileNotFoundError:
            return
        try:
            for entry in os.listdir(fd):
                if ours(entry):
                    try:
                        os.unlink(entry, dir_fd=fd)  # relative to the verified fd: no symlink games
                    except (FileNotFoundError, IsADirectoryError, PermissionError):
                        pass
        finally:
            os.close(fd)
        if rmdir:
            try:
                self.path.rmdir()
            except OSError:
                pass


def this_host() -> str:
    return socket.gethostname()


def elsewhere(record: Mapping[str, Any]) -> Optional[str]:
    """The host a recorded process runs on when it is not this one (its pid means nothing here)."""
    host = record.get("host")
    return host if isinstance(host, str) and host and host != this_host() else None


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode(), mode=0o600)


def list_state_dirs(root: Optional[Path] = None) -> Iterator[StateDir]:
    """Our own topologies' state folders; others' (or symlinks) are skipped with a warning."""
    root = root or state_root()
    if not root.is_dir():
        return
    warn_if_shared_root(root)
    for child in sorted(root.iterdir()):
        if not _NAME.fullmatch(child.name):
            continue
        state_dir = StateDir(child.name, root)
        try:
            if state_dir.exists():
                yield state_dir
        except EpdctlError as exc:
            print(f"epdctl: warning: skipping {exc}", file=sys.stderr)


def readable_states(root: Optional[Path] = None) -> Iterator[tuple[StateDir, dict[str, Any]]]:
    """Each of our topologies with its state; one whose state is unreadable is skipped with a warning
    (listing every topology must not fail because of one hand-edited file)."""
    for state_dir in list_state_dirs(root):
        try:
            state = state_dir.read()
        except UnreadableState as exc:
            print(f"epdctl: warning: skipping {exc}", file=sys.stderr)
            continue
        if state:
            yield state_dir, state


def _ours(proc: psutil.Process) -> bool:
    """A process of our own user: the only kind epdctl ever signals (docs/security.md)."""
    return proc.uids().real == os.getuid()


def verified_process(pid: Optional[int], create_time: Optional[float]) -> Optional[psutil.Process]:
    """The live process with this pid *and* create_time, else None (gone, zombie or pid reused)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or not isinstance(create_time, (int, float)):
        return None
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > CREATE_TIME_TOLERANCE_S:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE or not _ours(proc):
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def is_alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def new_run_token(name: str) -> str:
    return f"{name}-{secrets.token_hex(8)}"


def _tagged(matches, this_root: bool = False) -> list[tuple[psutil.Process, str]]:
    """Live processes of ours whose run tag `matches`, each with its tag; with `this_root`, only
    those started under our state root (another root's topologies are not ours to list)."""
    found = []
    root = os.path.abspath(state_root())
    me, uid = os.getpid(), os.getuid()
    for proc in psutil.process_iter(["uids"]):
        if proc.pid == me:
            continue
        try:
            # Another user's process is never ours to signal, whatever its environment says.
            if proc.info["uids"] is None or proc.info["uids"].real != uid:
                continue
            environ = proc.environ()
            tag = environ.get(RUN_ENV)
            if this_root and tag and os.path.abspath(state_root(environ)) != root:
                continue
            if tag and matches(tag) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append((proc, tag))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def tagged_processes(run_token: str) -> list[psutil.Process]:
    """Every live process of ours carrying this run's tag, wherever it was reparented to."""
    return [proc for proc, _ in _tagged(lambda tag: tag == run_token)]


# A run tag is `<name>-<16 hex>` (new_run_token): the name is everything before the token.
_RUN_TAG = re.compile(r"(" + _NAME.pattern + r")-[0-9a-f]{16}")


def _topology_of_tag(tag: str) -> Optional[str]:
    match = _RUN_TAG.fullmatch(tag)
    return match[1] if match else None


def processes_of_topology(name: str) -> dict[str, list[psutil.Process]]:
    """Live processes of ours tagged with any run of topology `name`, by run token.

    What `down` falls back on when the state folder is gone: the tag is `<name>-<16 hex>`,
    matched whole, so topology `a` never takes `a-b`'s processes; and only under our state root,
    so a `down` with another EPDCTL_STATE_DIR never takes a same-named topology of that root.
    """
    runs: dict[str, list[psutil.Process]] = {}
    for proc, tag in _tagged(lambda tag: _topology_of_tag(tag) == name, this_root=True):
        runs.setdefault(tag, []).append(proc)
    return runs


def tagged_topologies() -> dict[str, int]:
    """Every topology name with live tagged processes of ours under our state root, and how many:
    found with or without its state folder (`status` and `down` name those whose state is gone)."""
    counts: dict[str, int] = {}
    for _, tag in _tagged(_topology_of_tag, this_root=True):
        name = _topology_of_tag(tag)
        counts[name] = counts.get(name, 0) + 1
    return counts


def topology_of(pid: int) -> Optional[str]:
    """The epdctl topology a process of ours belongs to, by its run tag (None: not one of ours)."""
    try:
        proc = psutil.Process(pid)
        return _topology_of_tag(proc.environ().get(RUN_ENV, "")) if _ours(proc) else None
    except (psutil.Error, OSError):
        return None


def is_up(state_dir: StateDir, state: dict[str, Any]) -> bool:
    """Is this topology up: its supervisor holds the lock, or one of its processes still runs?

    A failed start (or a stopped foreground `up`) keeps its state for `status` and `logs`, but
    is not up: `down` with no name does not count it.
    """
    records = state.get("processes", []) + [state.get("supervisor") or {}]
    return state_dir.is_locked() or any(verified_process(r.get("pid"), r.get("create_time")) for r in records)
