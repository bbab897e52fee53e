"""What `epdctl calibrate` measures for the twin's contention model (docs/sim.md#contention).

- platform cpu: how much of each probed instance's time is CPU work. Around every probe sent
  to it alone (one request in flight), the scheduler's own accounts of every thread of its
  process tree (the API server, its EngineCore and workers: /proc/PID/task/TID/schedstat, in
  nanoseconds) are read before and after: the time on a CPU and the time spent runnable but
  waiting for one. busy = CPU seconds / probe seconds, at most 1, is how CPU-bound the
  instance's work is. Before each probe phase, once the instances are quiet (vLLM's engine
  threads spin a while after a request), calibrate itself burns a little CPU pinned to each
  instance's cores (`VLLM_CPU_OMP_THREADS_BIND`) and times it: `core_slowdown` = wall / CPU
  seconds of those burns is how much the rest of the machine slowed a thread there while the
  costs were measured (1.0 on an idle host). The twin burns cpu_share = busy / core_slowdown of
  every cost as CPU time and sleeps sleep_share = 1 - busy of it: on a host as busy as at
  calibration it takes the measured cost, and wherever the cores are more contended (its own
  instances at N in flight, the proxy, the load generator) it takes longer, as the real one
  does. (Burning the measured cost itself would count the calibration's background twice: once
  in the cost, again when the twin's burn waits for a core.) Probes of N requests at once are
  recorded beside it for the reader: a CPU share above 1 there is work the API server and the
  engine core do beside the model.
- other platforms: sims that share a device split its time, one step at a time at full speed
  (device_slots 1: kernels of several processes time-slice on a GPU). That is assumed, not
  measured: set device_slots for MPS or MIG.

The host's usable core count is recorded too, since a CPU profile holds for a host of that size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from epdctl.config.profile import Contention, rounded


@dataclass
class Usage:
    """CPU and wall seconds of the probes of one instance."""

    role: str
    cores: list[int] = field(default_factory=list)  # where its engine is pinned ([]: anywhere)
    cpu_s: float = 0.0
    waiting_s: float = 0.0  # runnable, waiting for a core
    wall_s: float = 0.0
    burn_cpu_s: float = 0.0  # calibrate's own reference burns on those cores
    burn_wall_s: float = 0.0
    batches: list[dict[str, float]] = field(default_factory=list)  # {batch, cpu_s, wall_s}

    @property
    def share(self) -> Optional[float]:
        return self.cpu_s / self.wall_s if self.wall_s > 0 else None

    @property
    def busy(self) -> Optional[float]:
        return min(1.0, self.share) if self.share is not None else None

    @property
    def core_slowdown(self) -> float:
        return max(1.0, self.burn_wall_s / self.burn_cpu_s) if self.burn_cpu_s > 0 else 1.0


REFERENCE_BURN_S = 0.01  # CPU burnt per sample to time the cores
REFERENCE_SAMPLES = 5  # per instance and phase: 50 ms of CPU
QUIET_CPU = 0.05  # CPU seconds per second under which an instance counts as quiet
QUIET_WAIT_S = 5.0  # the longest calibrate waits for it


def reference_burn(cores: list[int], cpu_s: float = REFERENCE_BURN_S) -> tuple[float, float]:
    """(CPU, wall) seconds of burning `cpu_s` of CPU on this thread, pinned to `cores` meanwhile."""
    import time

    from epdctl.sim.contention import burn_here

    previous = None
    if cores:
        try:
            previous = os.sched_getaffinity(0)
            os.sched_setaffinity(0, cores)
        except (AttributeError, OSError):
            previous = None
    try:
        wall, cpu = time.perf_counter(), time.thread_time()
        burn_here(cpu_s)
        return time.thread_time() - cpu, time.perf_counter() - wall
    finally:
        if previous is not None:
            os.sched_setaffinity(0, previous)


def _schedstat(pid: int) -> Optional[tuple[float, float]]:
    """(on-CPU, waiting-for-a-CPU) seconds of all of `pid`'s threads, or None where /proc has no schedstat."""
    cpu = waiting = 0.0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as handle:
                fields = handle.read(200).split()
            cpu += int(fields[0]) / 1e9
            waiting += int(fields[1]) / 1e9
        except (OSError, ValueError, IndexError):
            continue  # a thread gone between the listing and the read
    return cpu, waiting


def cpu_reader(pid: Optional[int], create_time: Optional[float]) -> Optional[Callable[[], tuple[float, float]]]:
    """A function giving the (CPU, waiting for a CPU) seconds of the process tree rooted at `pid` so
    far, or None when that process is not ours and alive (its pid reused, another host's). Without
    schedstat, CPU comes from psutil (in clock ticks) and the waiting is not known (0)."""
    import psutil

    from epdctl.run.state import verified_process

    root = verified_process(pid, create_time)
    if root is None:
        return None

    def read() -> tuple[float, float]:
        cpu = waiting = 0.0
        try:
            processes = [root] + root.children(recursive=True)
        except psutil.Error:
            return 0.0, 0.0
        for process in processes:
            accounts = _schedstat(process.pid)
            if accounts is not None:
                cpu, waiting = cpu + accounts[0], waiting + accounts[1]
                continue
            try:
                times = process.cpu_times()
                cpu += times.user + times.system
            except psutil.Error:
                pass  # a child gone between the listing and the read
        return cpu, waiting

    return read


class Meter:
    """Accumulates CPU and wall time per probed instance (by URL); what has no reader is skipped."""

    def __init__(self, readers: dict[str, tuple[str, Callable[[], tuple[float, float]]]],
                 cores: Optional[dict[str, list[int]]] = None,
                 burn: Callable[[list[int]], tuple[float, float]] = reference_burn) -> None:
        self.readers = readers  # url -> (role, read)
        self.burn = burn
        self.usage: dict[str, Usage] = {url: Usage(role, (cores or {}).get(url, [])) for url, (role, _) in readers.items()}

    def read(self, url: str) -> Optional[tuple[float, float]]:
        reader = self.readers.get(url)
        return reader[1]() if reader else None

    def add(self, url: str, before: Optional[tuple[float, float]], wall_s: float, batch: int = 1) -> None:
        after = self.read(url)
        if before is None or after is None:
            return
        usage = self.usage[url]
        cpu, waiting = max(0.0, after[0] - before[0]), max(0.0, after[1] - before[1])
        if batch == 1:
            usage.cpu_s += cpu
            usage.waiting_s += waiting
            usage.wall_s += wall_s
        else:
            usage.batches.append({"batch": batch, "cpu_s": rounded(cpu), "waiting_s": rounded(waiting),
                                  "wall_s": rounded(wall_s)})


    def time_cores(self) -> None:
        """Time each instance's cores while nothing is asked of it (between probe phases)."""
        import time

        for url, usage in self.usage.items():
            deadline = time.monotonic() + QUIET_WAIT_S
            last = self.read(url)
            while last is not None and time.monotonic() < deadline:
                time.sleep(0.2)  # a window to measure the instance's own CPU in, not a wait for an event
                now = self.read(url)
                if now is None or now[0] - last[0] < QUIET_CPU * 0.2:
                    break
                last = now
            for _ in range(REFERENCE_SAMPLES):
                burn_cpu, burn_wall = self.burn(usage.cores)
                usage.burn_cpu_s += burn_cpu
                usage.burn_wall_s += burn_wall


def host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def contention_block(platform: str, meter: Optional[Meter], names: dict[str, str]) -> Contention:
    """The profile's `contention:` from what was measured. `names` maps a probed URL to its instance."""
    cores = host_cores()
    if platform != "cpu":
        return Contention(mode="device", device_slots=1, host_cores=cores,
                          note="assumed, not measured: one step at a time per device (time-slicing); "
                               "raise device_slots for MPS or MIG")
    shares: dict[str, float] = {}
    sleeps: dict[str, float] = {}
    probes: list[dict[str, Any]] = []
    for url, usage in (meter.usage.items() if meter else ()):
        if usage.share is None or usage.busy is None:
            continue
        shares.setdefault(usage.role, rounded(usage.busy / usage.core_slowdown))
        sleeps.setdefault(usage.role, rounded(1.0 - usage.busy))
        probes.append({"instance": names.get(url, url), "role": usage.role, "in_flight": 1,
                       "cpu_s": rounded(usage.cpu_s), "waiting_s": rounded(usage.waiting_s),
                       "wall_s": rounded(usage.wall_s), "share": rounded(usage.share),
                       "core_slowdown": rounded(usage.core_slowdown)})
        for batch in usage.batches:
            probes.append({"instance": names.get(url, url), "role": usage.role, "in_flight": batch["batch"],
                           "cpu_s": batch["cpu_s"], "waiting_s": batch["waiting_s"], "wall_s": batch["wall_s"],
                           "share": rounded(batch["cpu_s"] / batch["wall_s"]) if batch["wall_s"] else 0.0})
    if not shares:
        return Contention(host_cores=cores, note="no CPU time could be read from the probed instances "
                                                 "(not ours, or on another host): contention not modelled")
    return Contention(mode="cpu", cpu_share=shares, sleep_share=sleeps, host_cores=cores, probes=probes,
                      note="per second of an instance's probes, one request in flight: busy = its processes' CPU "
                           "seconds (at most 1); cpu_share = busy / core_slowdown (how much the rest of the host slowed "
                           "a thread on its cores meanwhile); sleep_share = 1 - busy")
