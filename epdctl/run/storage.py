"""Who owns a shared storage folder, and when it may be deleted (docs/security.md).

The folders are ECExampleConnector's (encoder cache) and a storage KV connector's
(ExampleConnector's KV files). `up` creates one when it is missing and marks it (and marks each
missing parent it creates on the way); `down` deletes it only if that marker is there (epdctl
made it, so it holds nothing of the user's) and no running topology still uses it or any folder
beneath it. Every topology using the folder holds a lease file in it, naming the process that
took it (the supervisor; an adopting supervisor takes it over). A lease is stale (a crashed run,
ignored) only once that process is gone and no process carrying the run's tag is left either.
Lease changes happen under an flock in the folder, and a claim also holds the locks of the
epdctl-created shared folders around it, so an `up` and a `down` of two topologies sharing (or
nesting) folders cannot interleave into deleting one under the topology that just started.
Parents `up` created go with the last folder beneath them, each only once it is empty.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
from contextlib import ExitStack, contextmanager
from typing import Iterator, Optional

import psutil

from epdctl.atomicfile import write_atomic
from epdctl.errors import EXIT_USAGE, EpdctlError
from epdctl.run.state import tagged_processes

MARKER = ".epdctl-created"  # a shared folder epdctl created
PARENT_MARKER = ".epdctl-created-parent"  # a folder epdctl created on the way to one
LOCK = ".epdctl-lock"
LEASE_PREFIX = ".epdctl-lease."
CREATE_TIME_TOLERANCE_S = 0.05
CLAIM_TRIES = 20


def normal(path: str, field: str = "shared_storage_path") -> str:
    """The path as the kernel would walk it only if it has no `..`: refuse anything else.

    `/data/x/missing/../important` resolves to `important` when `missing` exists and fails when
    it does not, so neither "does it exist" nor "did we create it" can be trusted on it.
    """
    trimmed = path.rstrip("/") or "/"
    if "\0" in path or not os.path.isabs(path) or os.path.normpath(trimmed) != trimmed:
        raise EpdctlError(f"{field}: {path!r} is not a normalised absolute path "
                          f"(use {os.path.normpath(path)!r})", EXIT_USAGE)
    return trimmed


@contextmanager
def _locked(folder: str) -> Iterator[None]:
    """Hold the folder's lock. FileNotFoundError if the folder is gone (or goes while we wait)."""
    while True:
        fd = os.open(os.path.join(folder, LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink == 0:
                continue  # we waited on a lock that a `down` deleted with its folder: look again
            yield
            return
        finally:
            os.close(fd)


def _lease_alive(entry: str, folder: str) -> bool:
    """Is the run behind this lease still running: its lease holder, or else any of its processes?"""
    try:
        with open(os.path.join(folder, entry), "rb") as handle:
            lease = json.loads(handle.read(4096))
        proc = psutil.Process(int(lease["pid"]))
        if abs(proc.create_time() - float(lease["create_time"])) <= CREATE_TIME_TOLERANCE_S \
                and proc.status() != psutil.STATUS_ZOMBIE:
            return True
    except (OSError, ValueError, KeyError, TypeError, psutil.Error):
        pass
    # Its supervisor was killed, but the instances it started still use the folder.
    return bool(tagged_processes(entry[len(LEASE_PREFIX):]))


def _leases(folder: str, entries: Optional[list[str]] = None) -> list[str]:
    return [entry for entry in (os.listdir(folder) if entries is None else entries) if entry.startswith(LEASE_PREFIX)]


def _live_users(folder: str, entries: Optional[list[str]] = None) -> list[str]:
    return sorted(entry[len(LEASE_PREFIX):] for entry in _leases(folder, entries) if _lease_alive(entry, folder))


def _users_beneath(folder: str) -> list[tuple[str, str]]:
    """(folder, run) for every live lease in a folder below this one (links are not followed)."""
    found = []
    for below, _, files in os.walk(folder):
        if below != folder:
            found += [(below, run) for run in _live_users(below, files)]
    return found


def _is_ours(folder: str, marker: str = MARKER) -> bool:
    try:
        st = os.lstat(os.path.join(folder, marker))
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()


def _mark(folder: str, marker: str, run_token: str) -> None:
    fd = os.open(os.path.join(folder, marker), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as handle:
        handle.write(run_token + "\n")


def _missing(folder: str) -> list[str]:
    """The folders to create for `folder` to exist, outermost first."""
    missing = []
    while not os.path.lexists(folder):
        missing.insert(0, folder)
        folder = os.path.dirname(folder)
    return missing


def _shared_folders_around(folder: str) -> list[str]:
    """The epdctl-created shared folders this one lies inside, outermost first."""
    around, parent = [], os.path.dirname(folder)
    while parent != os.path.dirname(parent):
        if _is_ours(parent):
            around.insert(0, parent)
        parent = os.path.dirname(parent)
    return around


def claim(path: str, run_token: str) -> bool:
    """Take a lease on the folder (or renew ours), creating and marking it when missing.

    Returns whether epdctl created it. A folder that existed before is used, never marked.
    """
    folder = normal(path)
    for _ in range(CLAIM_TRIES):
        try:
            return _claim_once(folder, run_token)
        except FileNotFoundError:
            continue  # a `down` removed the folder (or a parent of ours) on our way: start over
        except OSError as exc:
            if exc.errno == errno.EEXIST:  # another `up` created it at the same moment: just use it
                continue
            raise EpdctlError(f"shared_storage_path: cannot use {folder}: {exc.strerror}") from None
    raise EpdctlError(f"shared_storage_path: could not take the lock of {folder}: it kept being removed")


def _claim_once(folder: str, run_token: str) -> bool:
    with ExitStack() as locks:
        # A `down` deleting a shared folder around this one checks first that nothing beneath it
        # is in use: hold its lock, so that it cannot check between our mkdir and our lease.
        for outer in _shared_folders_around(folder):
            locks.enter_context(_locked(outer))
        missing = _missing(folder)
        for parent in missing[:-1]:
            os.mkdir(parent)
            _mark(parent, PARENT_MARKER, run_token)
        if missing:
            os.mkdir(folder)
            _mark(folder, MARKER, run_token)
        elif not os.path.isdir(folder):
            raise EpdctlError(f"shared_storage_path: {folder} exists and is not a folder")
        with _locked(folder):
            me = psutil.Process()
            lease = {"token": run_token, "pid": me.pid, "create_time": me.create_time()}
            write_atomic(os.path.join(folder, LEASE_PREFIX + run_token), json.dumps(lease).encode(), mode=0o644)
    return bool(missing)


def release(path: Optional[str], run_token: Optional[str]) -> Optional[str]:
    """Drop our lease; delete the folder if epdctl created it and nobody uses it or a folder in it.

    Then the folders around it that epdctl created and nobody uses any more go too.
    Returns a line saying what happened to the folder (for `down`'s report), or None.
    """
    if not path or not run_token:
        return None
    try:
        folder = normal(path)
    except EpdctlError:
        return None  # written by an older epdctl without this check: never delete on it
    try:
        st = os.lstat(folder)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None  # replaced by a symlink or a file since: not ours to touch
    try:
        with _locked(folder):
            try:
                os.unlink(os.path.join(folder, LEASE_PREFIX + run_token))
            except FileNotFoundError:
                pass
            line = _remove_if_unused(folder)
    except (OSError, EpdctlError):
        return None
    if line is not None and not line.startswith("removed"):
        return line  # still in use: so is every folder around it
    tidied = _tidy_around(folder)
    if tidied:
        line = f"{line}; " if line else ""
        line += f"removed {', '.join(tidied)} (created by epdctl, no longer used)"
    return line


def _remove_if_unused(folder: str) -> Optional[str]:
    """With the folder's lock held: delete it if it is ours and nothing uses it or a folder in it."""
    if not _is_ours(folder):
        if not _leases(folder):
            # The user's own folder: take our lock file away with us. A claim waiting on it
            # sees it unlinked (st_nlink 0) and starts over.
            os.unlink(os.path.join(folder, LOCK))
        return None
    users = _live_users(folder)
    if users:
        return f"kept the shared folder {folder}: still used by {', '.join(users)}"
    beneath = _users_beneath(folder)
    if beneath:
        where = "; ".join(f"{below} by {run}" for below, run in beneath)
        return f"kept the shared folder {folder}: a folder in it is still used ({where})"
    shutil.rmtree(folder, ignore_errors=True)  # refuses a symlink; never follows one inside
    if os.path.lexists(folder):
        return f"could not remove all of the shared folder {folder}"
    return f"removed the shared folder {folder} (created by epdctl)"


def _tidy_around(folder: str) -> list[str]:
    """Remove what epdctl created around a folder and nobody uses any more, from the inside out.

    A parent created on the way goes only once it is empty (anything the user put in it since
    keeps it); a shared folder kept because this one was in use inside it goes as its own `down` would.
    """
    removed = []
    while folder != os.path.dirname(folder):
        if os.path.lexists(folder):
            if _is_ours(folder, PARENT_MARKER):
                if not _remove_empty_parent(folder):
                    break
            elif _is_ours(folder):
                try:
                    with _locked(folder):
                        if not (_remove_if_unused(folder) or "").startswith("removed"):
                            break
                except OSError:
                    break
            else:
                break
            removed.append(folder)
        folder = os.path.dirname(folder)
    return removed


def _remove_empty_parent(folder: str) -> bool:
    try:
        if os.listdir(folder) != [PARENT_MARKER]:
            return False
        os.unlink(os.path.join(folder, PARENT_MARKER))
    except OSError:
        return False
    try:
        os.rmdir(folder)
        return True
    except OSError:
        # A claim made a folder in it between our look and now: it stays, and stays ours.
        try:
            _mark(folder, PARENT_MARKER, "restored")
        except OSError:
            pass
        return False
