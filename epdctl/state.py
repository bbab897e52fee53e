"""Where a running topology is recorded: `$EPDCTL_STATE_DIR/<name>/` (DESIGN §4).

The folder is 0700 and holds `state.json` (written atomically), one log per process, and a
lock file. A pid is only trusted together with its psutil `create_time`, so a recycled pid
is never mistaken for one of ours (DESIGN §7.5).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional

import psutil

from epdctl.atomicfile import write_atomic
from epdctl.errors import EpdctlError

STATE_FILE = "state.json"
LOCK_FILE = "lock"
RUN_ENV = "EPDCTL_RUN"  # every child gets this tag; the sweep finds strays by it
CREATE_TIME_TOLERANCE_S = 0.05


def state_root() -> Path:
    explicit = os.environ.get("EPDCTL_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "epdctl"


class StateDir:
    def __init__(self, name: str, root: Optional[Path] = None):
        self.name = name
        self.path = (root or state_root()) / name

    @property
    def state_file(self) -> Path:
        return self.path / STATE_FILE

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_FILE

    def log_file(self, process: str) -> Path:
        return self.path / f"{process}.log"

    def ensure(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.path, 0o700)

    def exists(self) -> bool:
        return self.state_file.exists()

    def read(self) -> Optional[dict[str, Any]]:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise EpdctlError(f"{self.state_file}: unreadable state ({exc}); remove it after checking no process is left")

    def write(self, state: dict[str, Any]) -> None:
        write_json_atomic(self.state_file, state)

    def try_lock(self) -> Optional[int]:
        """An fd holding the topology's exclusive lock, or None when someone else holds it."""
        self.ensure()
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        return fd

    def is_locked(self) -> bool:
        if not self.lock_file.exists():
            return False
        fd = self.try_lock()
        if fd is None:
            return True
        os.close(fd)
        return False

    def remove(self) -> None:
        """Delete only what we create here: state, lock and logs."""
        for entry in list(self.path.iterdir()) if self.path.exists() else []:
            if entry.name in (STATE_FILE, LOCK_FILE) or entry.suffix == ".log":
                entry.unlink(missing_ok=True)
        try:
            self.path.rmdir()
        except OSError:
            pass


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode(), mode=0o600)


def list_state_dirs(root: Optional[Path] = None) -> Iterator[StateDir]:
    root = root or state_root()
    if not root.is_dir():
        return
    for child in sorted(root.iterdir()):
        if (child / STATE_FILE).exists():
            yield StateDir(child.name, root)


def verified_process(pid: Optional[int], create_time: Optional[float]) -> Optional[psutil.Process]:
    """The live process with this pid *and* create_time, else None (gone, zombie or pid reused)."""
    if not pid or create_time is None:
        return None
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > CREATE_TIME_TOLERANCE_S:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def is_alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def tagged_processes(run_token: str) -> list[psutil.Process]:
    """Every live process carrying our run tag, wherever it was reparented to."""
    found = []
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.environ().get(RUN_ENV) == run_token and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found
