"""How a sim step spends its cost when instances share a resource (docs/sim.md#contention).

Without contention (`--sim-contention none`, the default) a step sleeps its cost: sims never
compete, however many share a machine. With it, one of two mechanisms, one per resource:

- `device` (GPUs, XPUs, NPUs): sims that share a device split its time, as kernels of several
  processes time-slice on a GPU. A step is `cost` of work done at the rate
  min(1, slots / stepping), where `stepping` counts the sims stepping on an overlapping device
  now (the ledger, epdctl/sim/ledger.py) and `slots` (`--sim-device-slots`, default 1) is how
  many run side by side at full speed. The rate is re-read as the step goes, so a step that
  starts alone and is joined half-way slows from then on (processor sharing).
- `cpu` (`platform: cpu`): a real CPU instance computes, so its twin does: `--sim-cpu-share`
  (what calibrate measured: CPU seconds per second of the instance's work) of every step cost
  is burnt as CPU time by a burner process pinned where the real engine's threads are
  (`VLLM_CPU_OMP_THREADS_BIND`), and that share of the API server's (`--sim-request-ms`) on the
  sim's own thread, like vLLM's. The kernel then shares the cores among everything that runs:
  the other instances, the proxy, the load generator, as it does for the real topology.
  `--sim-sleep-share` of the cost (what the real instance spent neither on a CPU nor waiting
  for one; default: all that the CPU share leaves) is slept.

`SharedWork` (the rate arithmetic) is pure, for the unit tests; the async wrappers do the sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import sys
import time
from typing import Callable, Optional

from epdctl.sim.ledger import Ledger

log = logging.getLogger("epdctl.sim")

TICK_S = 0.002  # how often a shared step re-reads the ledger: the rate's resolution
MODES = ("none", "device", "cpu")


def share_rate(stepping: int, slots: int) -> float:
    """The fraction of full speed a step runs at when `stepping` sims share `slots`."""
    return min(1.0, max(1, slots) / max(1, stepping))


class SharedWork:
    """One step's work on a shared device: `work_s` of full-speed time, done at the ledger's rate.

    `advance(now, stepping)` accounts for the time since the last call at the rate then in force,
    takes the new rate, and returns how long to wait before the next call (never more than
    TICK_S), or None once the work is done."""

    def __init__(self, work_s: float, slots: int, now: float) -> None:
        self.left = work_s
        self.slots = slots
        self.rate = 1.0
        self.last = now
        self.started = now
        self.stepping = 1
        self.lost = 0.0  # wall time lost to sharing so far: what the step takes beyond its work

    def advance(self, now: float, stepping: int) -> Optional[float]:
        elapsed = max(0.0, now - self.last)
        self.left -= elapsed * self.rate
        self.lost += elapsed * (1.0 - self.rate)
        self.last = now
        if self.left <= 1e-9:
            return None
        self.stepping = stepping
        self.rate = share_rate(stepping, self.slots)
        return min(self.left / self.rate, TICK_S)

    def eta(self) -> float:
        """When the work ends if the rate holds: what the ledger announces to the others."""
        return self.last + self.left / self.rate


class Pace:
    """A step's cost spent as sleep (no contention): the Scheduler's default."""

    stretched_s = 0.0  # wall time beyond the costs, because the resource was shared
    peak_sharers = 1

    async def spend(self, cost_s: float) -> None:
        await asyncio.sleep(cost_s)

    async def api_server(self, cost_s: float) -> None:
        await asyncio.sleep(cost_s)

    def close(self) -> None:
        pass


class DevicePace(Pace):
    def __init__(self, ledger: Ledger, slots: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ledger = ledger
        self.slots = max(1, slots)
        self.clock = clock

    async def spend(self, cost_s: float) -> None:
        now = self.clock()
        work = SharedWork(cost_s, self.slots, now)
        # Announced before the others are counted: of two steps that start together, at least one
        # sees the other at once, and the other does a tick later.
        self.ledger.announce(now + cost_s)
        try:
            while True:
                now = self.clock()
                wait = work.advance(now, self.ledger.stepping(now))
                if wait is None:
                    break
                self.peak_sharers = max(self.peak_sharers, work.stepping)
                self.ledger.announce(work.eta())
                await asyncio.sleep(wait)
        finally:
            self.ledger.announce(0.0)
        self.stretched_s += work.lost

    def close(self) -> None:
        self.ledger.close()


# The burner: a process of its own, as vLLM's EngineCore is, so the sim's event loop (its API
# server) runs beside it. It reads a CPU time (8 bytes, seconds), burns it, answers one byte.
BURNER = r"""
import os, struct, sys, time
cores = [int(c) for c in sys.argv[1:]]
if cores:
    try:
        os.sched_setaffinity(0, cores)
    except OSError:
        pass
read, write, clock = sys.stdin.buffer.read, sys.stdout.buffer, time.thread_time
while True:
    data = read(8)
    if len(data) < 8:
        break
    end = clock() + struct.unpack("<d", data)[0]
    while clock() < end:
        for _ in range(200):
            pass
    write.write(b"\x01")
    write.flush()
"""


def bind_cores(raw: Optional[str]) -> list[int]:
    """`VLLM_CPU_OMP_THREADS_BIND`'s cores ("0", "0-3", "0,2|1,3": the first rank's), or [] (any)."""
    if not raw or raw.strip() in ("all", "auto", "nobind"):
        return []
    cores: list[int] = []
    try:
        for part in raw.split("|")[0].split(","):
            low, _, high = part.strip().partition("-")
            cores.extend(range(int(low), int(high or low) + 1))
    except ValueError:
        return []
    return cores


def burn_here(cpu_s: float) -> None:
    """Burn `cpu_s` of this thread's CPU time (the API server's share, blocking its loop as vLLM's)."""
    end = time.thread_time() + cpu_s
    while time.thread_time() < end:
        for _ in range(200):
            pass


class CpuPace(Pace):
    def __init__(self, share: float, cores: list[int], sleep_share: Optional[float] = None) -> None:
        self.share = min(1.0, max(0.0, share))
        self.sleep = 1.0 - self.share if sleep_share is None else min(1.0 - self.share, max(0.0, sleep_share))
        self.cores = cores
        self.burner: Optional[asyncio.subprocess.Process] = None

    async def start(self) -> None:
        self.burner = await asyncio.create_subprocess_exec(
            sys.executable, "-c", BURNER, *map(str, self.cores), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)

    async def spend(self, cost_s: float) -> None:
        started = time.monotonic()
        cpu = cost_s * self.share
        if cpu > 0 and self.burner is not None and self.burner.stdin is not None and self.burner.stdout is not None:
            self.burner.stdin.write(struct.pack("<d", cpu))
            await self.burner.stdout.readexactly(1)
        idle = cost_s * self.sleep
        if idle > 0:
            await asyncio.sleep(idle)
        self.stretched_s += max(0.0, time.monotonic() - started - cost_s)

    async def api_server(self, cost_s: float) -> None:
        started = time.monotonic()
        burn_here(cost_s * self.share)
        idle = cost_s * self.sleep
        if idle > 0:
            await asyncio.sleep(idle)
        self.stretched_s += max(0.0, time.monotonic() - started - cost_s)

    def close(self) -> None:
        if self.burner is not None and self.burner.returncode is None:
            try:
                self.burner.kill()
            except ProcessLookupError:
                pass


async def make_pace(mode: str, *, ledger_path: Optional[str], slots: int, cpu_share: float,
                    sleep_share: Optional[float] = None, environ=os.environ) -> Pace:
    """The pace of `--sim-contention MODE`; none (a plain sleep) when the mode cannot be honoured."""
    if mode == "device":
        from epdctl.sim.ledger import LedgerError, devices_from_env

        devices = devices_from_env(environ)
        if not ledger_path or not devices:
            log.warning("--sim-contention device: %s; contention is not modelled",
                        "no --sim-ledger (epdctl up passes one)" if not ledger_path else "no device variable set")
            return Pace()
        try:
            ledger = Ledger(ledger_path, devices)
        except LedgerError as exc:
            raise SystemExit(f"epdctl.sim: {exc}") from None
        log.info("contention: device %s shared through %s (slot %d, %d step(s) at full speed)",
                 ",".join(map(str, devices)), ledger_path, ledger.slot, slots)
        return DevicePace(ledger, slots)
    if mode == "cpu":
        cores = bind_cores(environ.get("VLLM_CPU_OMP_THREADS_BIND"))
        pace = CpuPace(cpu_share, cores, sleep_share)
        await pace.start()
        log.info("contention: cpu, %.0f%% of each cost burnt as CPU time on %s, %.0f%% slept", pace.share * 100,
                 "core(s) " + ",".join(map(str, cores)) if cores else "any core", pace.sleep * 100)
        return pace
    return Pace()
