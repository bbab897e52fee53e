"""The device ledger: how sims that share a device know how many of them are stepping now.

A GPU cannot be made busy from a sim, so sims that would share one (`--sim-contention device`)
coordinate through one small file in their topology's state folder (docs/sim.md#contention):
SLOTS fixed slots of (pid, device mask, busy-until). Each sim claims one slot at start-up, under
an flock, and from then on writes only its own slot, so steps need no lock; a reader counts the
slots whose devices overlap its own and whose busy-until (CLOCK_MONOTONIC, one clock for every
process on the host) is still ahead. A sim that dies mid-step is counted only until the end it
announced, and its slot is taken over by the next sim once its pid is gone.

The file is trusted as state is (docs/security.md): opened with O_NOFOLLOW, a regular file of
ours of exactly the ledger's size or empty, read and written only through a fixed-size mapping.
Standard library only: the sim imports it at start-up.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
import struct
from typing import Callable, Iterable, Optional

SLOTS = 128
SLOT = struct.Struct("<qQdd")  # pid, device mask, busy until (CLOCK_MONOTONIC seconds), spare
SIZE = SLOTS * SLOT.size
MASK_BITS = 64


class LedgerError(Exception):
    """The ledger file cannot be trusted or used (one line, for the sim's log and exit)."""


def device_mask(devices: Iterable[int]) -> int:
    """Device ids as a bit mask. Ids of 64 and above fold onto the low bits: at worst two sims on
    different devices are counted as sharing (pessimistic), never two sharers as apart."""
    mask = 0
    for device in devices:
        mask |= 1 << (device % MASK_BITS)
    return mask


def devices_from_env(environ) -> Optional[list[int]]:
    """The devices the plan gave this instance: its device variable (docs/topology.md), or None."""
    for variable in ("CUDA_VISIBLE_DEVICES", "ZE_AFFINITY_MASK", "ASCEND_RT_VISIBLE_DEVICES"):
        raw = environ.get(variable)
        if raw is None:
            continue
        try:
            return [int(part.split(".")[0]) for part in raw.split(",") if part.strip()]
        except ValueError:
            return None
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Ledger:
    """One sim's view of the shared file: its own slot to write, the others to count."""

    def __init__(self, path: str, devices: Iterable[int], pid: Optional[int] = None,
                 alive: Callable[[int], bool] = _alive) -> None:
        self.path = path
        self.pid = os.getpid() if pid is None else pid
        self.mask = device_mask(devices)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise LedgerError(f"{path}: cannot open the device ledger: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                raise LedgerError(f"{path}: the device ledger is not a regular file of ours; refusing to use it")
            if info.st_size == 0:
                os.ftruncate(fd, SIZE)
            elif info.st_size != SIZE:
                raise LedgerError(f"{path}: the device ledger has {info.st_size} bytes, not {SIZE}; refusing to use it")
            self.map = mmap.mmap(fd, SIZE)
            self.slot = self._claim(alive)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)  # explicitly: the mapping holds a duplicate of the fd, and so the lock
            os.close(fd)

    def _claim(self, alive: Callable[[int], bool]) -> int:
        free = None
        for index in range(SLOTS):
            pid = SLOT.unpack_from(self.map, index * SLOT.size)[0]
            if pid == self.pid:
                free = index
                break
            if free is None and (pid <= 0 or not alive(pid)):
                free = index
        if free is None:
            self.map.close()
            raise LedgerError(f"{self.path}: all {SLOTS} slots of the device ledger are taken")
        SLOT.pack_into(self.map, free * SLOT.size, self.pid, self.mask, 0.0, 0.0)
        return free

    def announce(self, busy_until: float) -> None:
        """This sim steps until `busy_until` (0: it is idle)."""
        SLOT.pack_into(self.map, self.slot * SLOT.size, self.pid, self.mask, busy_until, 0.0)

    def stepping(self, now: float) -> int:
        """Sims stepping now on a device this one uses, this one included."""
        count = 1
        for index, (pid, mask, until, _) in enumerate(SLOT.iter_unpack(self.map)):
            if index != self.slot and pid > 0 and mask & self.mask and until > now:
                count += 1
        return count

    def close(self) -> None:
        try:
            SLOT.pack_into(self.map, self.slot * SLOT.size, 0, 0, 0.0, 0.0)
            self.map.close()
        except (ValueError, OSError):
            pass
