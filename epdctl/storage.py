"""Who owns a shared storage folder, and when it may be deleted (DESIGN §8).

The folders are ECExampleConnector's (encoder cache) and a storage KV connector's
(ExampleConnector's KV files). `up` creates one when it is missing and marks it; `down` deletes it only if that
marker is there (epdctl made it, so it holds nothing of the user's) and no other running
topology still uses it. Every topology using the folder holds a lease file in it, naming the
process that took it; a lease whose process is gone is stale (a crashed run) and ignored.
Lease changes happen under an flock in the folder, so an `up` and a `down` of two topologies
sharing the folder cannot interleave into deleting it under the one that just started.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
from contextlib import contextmanager
from typing import Iterator, Optional

import psutil

from epdctl.errors import EXIT_USAGE, EpdctlError

MARKER = ".epdctl-created"
LOCK = ".epdctl-lock"
LEASE_PREFIX = ".epdctl-lease."
CREATE_TIME_TOLERANCE_S = 0.05


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
def _locked(folder: str, create: bool) -> Iterator[None]:
    """Hold the folder's lock; retry if the folder (and its lock) was deleted meanwhile."""
    for _ in range(20):
        if create:
            os.makedirs(folder, exist_ok=True)
        try:
            fd = os.open(os.path.join(folder, LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except FileNotFoundError:
            if not create:
                raise
            continue  # the last user's `down` removed the folder between our mkdir and open
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink == 0:
                continue  # we waited on a lock that a `down` deleted with its folder: start over
            yield
            return
        finally:
            os.close(fd)
    raise EpdctlError(f"{folder}: could not take the shared folder's lock")


def _lease_holder_alive(entry: str, folder: str) -> bool:
    try:
        with open(os.path.join(folder, entry), "rb") as handle:
            lease = json.loads(handle.read(4096))
        proc = psutil.Process(int(lease["pid"]))
        return abs(proc.create_time() - float(lease["create_time"])) <= CREATE_TIME_TOLERANCE_S \
            and proc.status() != psutil.STATUS_ZOMBIE
    except (OSError, ValueError, KeyError, TypeError, psutil.Error):
        return False


def _is_our_marker(folder: str) -> bool:
    try:
        st = os.lstat(os.path.join(folder, MARKER))
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()


def claim(path: str, run_token: str) -> bool:
    """Take a lease on the folder, creating (and marking) it when missing.

    Returns whether epdctl created it. A folder that existed before is used, never marked.
    """
    folder = normal(path)
    created = False
    try:
        if not os.path.lexists(folder):
            os.makedirs(folder)
            with open(os.path.join(folder, MARKER), "w") as handle:
                handle.write(run_token + "\n")
            created = True
        elif not os.path.isdir(folder):
            raise EpdctlError(f"shared_storage_path: {folder} exists and is not a folder")
        with _locked(folder, create=True):
            me = psutil.Process()
            lease = json.dumps({"token": run_token, "pid": me.pid, "create_time": me.create_time()})
            with open(os.path.join(folder, LEASE_PREFIX + run_token), "w") as handle:
                handle.write(lease)
    except OSError as exc:
        if exc.errno == errno.EEXIST:  # another `up` created it at the same moment: just use it
            return claim(path, run_token)
        raise EpdctlError(f"shared_storage_path: cannot use {folder}: {exc.strerror}") from None
    return created


def release(path: Optional[str], run_token: Optional[str]) -> Optional[str]:
    """Drop our lease; delete the folder if epdctl created it and nobody else still uses it.

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
        with _locked(folder, create=False):
            try:
                os.unlink(os.path.join(folder, LEASE_PREFIX + run_token))
            except FileNotFoundError:
                pass
            users = [e[len(LEASE_PREFIX):] for e in os.listdir(folder)
                     if e.startswith(LEASE_PREFIX) and _lease_holder_alive(e, folder)]
            if not _is_our_marker(folder):
                if not any(e.startswith(LEASE_PREFIX) for e in os.listdir(folder)):
                    # The user's own folder: take our lock file away with us. A claim waiting on
                    # it sees it unlinked (st_nlink 0) and starts over.
                    os.unlink(os.path.join(folder, LOCK))
                return None
            if users:
                return f"kept the shared folder {folder}: still used by {', '.join(sorted(users))}"
            shutil.rmtree(folder, ignore_errors=True)  # refuses a symlink; never follows one inside
            if os.path.lexists(folder):
                return f"could not remove all of the shared folder {folder}"
            return f"removed the shared folder {folder} (created by epdctl)"
    except (OSError, EpdctlError):
        return None
