"""The supervisor's side of `epdctl scale`: take a request, start and gate new instances, tell the
proxy, drain and stop removed ones (what a scale means is run/scaling.py's; docs/commands.md)."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from typing import TYPE_CHECKING, Any, Optional

from epdctl.errors import EpdctlError
from epdctl.ports import port_is_free
from epdctl.run.child import Child
from epdctl.run.scaling import (DRAIN_TIMEOUT_S, POOL_FILE, SCALE_FILE, ScaleJob, in_flight_from_metrics,
                                new_ports, pool_document, refusal, scaled_topology)
from epdctl.run.autoscale import SAMPLE_EVERY_S, Watch
from epdctl.run.events import EVENTS_FILE, append_event, now_iso
from epdctl.run.state import write_json_atomic
from epdctl.run.states import ENDED, ProcessState, TopologyPhase
from epdctl.run.teardown import stop_processes

if TYPE_CHECKING:
    from epdctl.config.schema import Topology
    from epdctl.run.supervisor import Supervisor

MAX_REQUEST_BYTES = 64 * 1024
HISTORY = 50  # autoscale changes kept in the state
METRICS_EVERY_S = 0.2


class Scaler:
    def __init__(self, sup: "Supervisor", topology: Optional["Topology"], ports: Optional[dict[str, int]] = None,
                 version: int = 0):
        self.sup = sup
        self.topology = topology
        self.ports = dict(ports or {})  # the ports of instances a scale added, by name (kept for adoption)
        self.version = version  # of the pool file; 0: never written (the proxy routes by its argv)
        self.job: Optional[ScaleJob] = None
        self.refused: Optional[ScaleJob] = None  # the last request refused while a job worked (its client waits on it)
        self.joined = {spec.name for spec in sup.plan.instances}  # in the proxy's pool
        self.drain_version: dict[str, int] = {}
        self.drain_since: dict[str, float] = {}
        self.next_metrics = 0.0
        self.view: tuple[Optional[int], dict[str, float]] = (None, {})
        self.written: Optional[tuple] = None
        roles = topology.autoscale.roles() if topology is not None else {}
        self.watches = {role: Watch(spec) for role, spec in roles.items()}
        self.next_sample = 0.0
        self.auto_count = 0
        self.history: list[dict[str, Any]] = []  # the autoscaler's changes, newest last (status shows them)

    @property
    def pool_path(self):
        return self.sup.state_dir.path / POOL_FILE

    def record(self) -> dict[str, Any]:
        record = {"counts": self.counts(), "ports": self.ports, "pool_version": self.version,
                  "job": self.job.record() if self.job else None,
                  "refused": self.refused.record() if self.refused else None}
        if self.watches:
            record["autoscale"] = {"roles": {role: {"min": w.spec.min, "max": w.spec.max,
                                                    "target_inflight": w.spec.target_inflight}
                                             for role, w in self.watches.items()},
                                   "history": self.history[-HISTORY:]}
        return record

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for child in self.sup.children:
            if child.spec.role != "proxy":
                counts[child.spec.role] = counts.get(child.spec.role, 0) + 1
        return counts

    # ------------------------------------------------------------ each turn of the supervise loop

    def tend(self, now: float) -> bool:
        """Returns whether anything changed (the supervisor then saves its state)."""
        changed = self._take_request(now)
        changed |= self._autoscale(now)
        changed |= self._sync_pool()
        changed |= self._finish_drains(now)
        changed |= self._finish_job(now)
        return changed

    def _take_request(self, now: float) -> bool:
        path = self.sup.state_dir.path / SCALE_FILE
        if not os.path.lexists(path):
            return False
        request = _read_request(path)
        try:
            os.unlink(path)
        except OSError:
            pass
        if request is None:
            return False
        job = ScaleJob(id=request["id"], counts=request["counts"])
        if self.job is not None and self.job.status == "working":
            job.status, job.reason = "refused", f"scale {self.job.id} is still in progress"
            self.refused = job  # not self.job: the one in progress keeps its record, its client waits on it
            return True
        self.job = job
        try:
            self._plan_and_start(job, now)
        except EpdctlError as exc:
            job.status, job.reason = ("refused" if not job.adding else "failed"), str(exc).splitlines()[0]
        if job.status != "working":
            self.sup.note(f"scale {job.id}: {job.status}: {job.reason}")
        return True

    def _autoscale(self, now: float) -> bool:
        """The autoscale rule (run/autoscale.py) on the proxy's in-flight counts, every half second."""
        if not self.watches or now < self.next_sample:
            return False
        self.next_sample = now + SAMPLE_EVERY_S
        busy = self.job is not None and self.job.status == "working"
        if busy or self.sup.phase not in (TopologyPhase.RUNNING, TopologyPhase.DEGRADED):
            for watch in self.watches.values():
                watch.hold()
            return False
        _, flying = self._proxy_view(now, fresh=True)
        if not flying:
            return False  # the proxy does not answer: nothing to judge by
        for role, watch in self.watches.items():
            members = [c for c in self.sup.children if c.spec.role == role and c.state == ProcessState.HEALTHY]
            if not members:
                continue
            load = sum(flying.get(c.spec.name, 0.0) for c in members) / len(members)
            size = sum(1 for c in self.sup.children if c.spec.role == role)
            decision = watch.decide(now, size, load)
            if decision is None:
                continue
            target, why = decision
            self.auto_count += 1
            job = ScaleJob(id=f"auto-{self.auto_count}", counts={role: target})
            self.job = job
            try:
                self._plan_and_start(job, now)
            except EpdctlError as exc:
                job.status, job.reason = "failed", str(exc).splitlines()[0]
            self.history.append({"at": now_iso(), "role": role, "from": size, "to": target, "why": why,
                                 "job": job.id, "status": job.status if job.status != "working" else "started"})
            del self.history[:-HISTORY]
            append_event(self.sup.state_dir.path / EVENTS_FILE, f"autoscale-{role}", "autoscale",
                         size=f"{size}->{target}", reason=why)
            self.sup.note(f"autoscale: {role} {size} -> {target} ({why})")
            for other in self.watches.values():
                other.hold()
            return True
        return False

    def _plan_and_start(self, job: ScaleJob, now: float) -> None:
        from epdctl.commands import python_command, router_command
        from epdctl.config.checks import cross_check
        from epdctl.plan import build_plan

        sup = self.sup
        if self.topology is None:
            raise EpdctlError("this supervisor was started without its topology; run `epdctl up` again to scale")
        for role, count in job.counts.items():
            reason = refusal(self.topology, role, count)
            if reason:
                raise EpdctlError(reason)
        counts = {**self.counts(), **job.counts}
        current = scaled_topology(self.topology, self.counts(), self.ports)
        ports = {name: port for name, port in self.ports.items()}
        ports.update(new_ports(sup.plan, current, counts, port_is_free))
        target = scaled_topology(self.topology, counts, ports)
        problems = cross_check(target)
        if problems:
            loc, message, _ = problems[0]
            hint = " (give the role devices of its own under scale_devices:)" if "memory budget" in message else ""
            raise EpdctlError(f"{'.'.join(str(p) for p in loc)}: {message}{hint}")
        plan = build_plan(target, python=python_command(), router=router_command())
        children = {c.spec.name: c for c in sup.children}
        for spec in plan.instances:
            if spec.name in children and children[spec.name].spec != spec:
                raise EpdctlError(f"scaling would change {spec.name}'s plan (ports or flags): not done")
        wanted = {spec.name for spec in plan.instances}
        adding = [spec for spec in plan.instances if spec.name not in children]
        removing = [c for c in sup.children if c.spec.role != "proxy" and c.spec.name not in wanted]
        if not adding and not removing:
            job.status, job.reason = "done", "already that size"
            return
        self.ports = {name: port for name, port in ports.items() if name in wanted}
        proxy_at = next(i for i, c in enumerate(sup.children) if c.spec.role == "proxy")
        for spec in adding:
            child = Child(spec, sup.state_dir.log_file(spec.name))
            sup.children.insert(proxy_at, child)
            proxy_at += 1
            job.adding.append(spec.name)
            sup.spawn(child, fresh_log=True)
            sup.note(f"scale {job.id}: started {spec.name} (pid {child.pid}) on port {spec.port}")
        for child in removing:
            child.set_state(ProcessState.DRAINING)
            sup.event(child, "draining", scale=job.id)
            self.drain_since[child.spec.name] = now
            job.draining.append(child.spec.name)
            sup.note(f"scale {job.id}: draining {child.spec.name}")
        sup.plan = dataclasses.replace(plan, proxy=sup.plan.proxy)  # the proxy keeps its own spec (and argv)

    def _sync_pool(self) -> bool:
        """The pool file says what the proxy should route to: every instance it has been told of or
        that was healthy once (a restarting one is the proxy's to eject), draining ones marked."""
        members: dict[str, list[tuple[str, str]]] = {}
        draining = []
        for child in self.sup.children:
            spec = child.spec
            if spec.role == "proxy":
                continue
            if child.state == ProcessState.HEALTHY:
                self.joined.add(spec.name)
            if spec.name not in self.joined:
                continue
            members.setdefault(spec.role, []).append((spec.name, spec.url))
            if child.state == ProcessState.DRAINING:
                draining.append(spec.name)
        wanted = (tuple((role, tuple(entries)) for role, entries in sorted(members.items())), tuple(sorted(draining)))
        if self.written is None and self.version == 0 and self.job is None:
            self.written = wanted  # never scaled: the proxy's argv is its pool
            return False
        if wanted == self.written:
            return False
        self.version += 1
        write_json_atomic(self.pool_path, pool_document(self.version, members, draining))
        self.written = wanted
        for name in draining:
            self.drain_version.setdefault(name, self.version)
        return True

    def _proxy_view(self, now: float, fresh: bool = False) -> tuple[Optional[int], dict[str, float]]:
        """(the pool version every proxy worker serves, in flight per instance), at most every 0.2 s."""
        if fresh or now >= self.next_metrics:
            self.next_metrics = now + METRICS_EVERY_S
            text = self.sup.runtime.fetch(self.sup.plan.proxy.url + "/metrics")
            self.view = in_flight_from_metrics(text) if text else (None, {})
        return self.view

    def _finish_drains(self, now: float) -> bool:
        draining = [c for c in self.sup.children if c.state == ProcessState.DRAINING]
        if not draining:
            return False
        version, flying = self._proxy_view(now)
        changed = False
        for child in draining:
            name = child.spec.name
            served = version is not None and version >= self.drain_version.get(name, self.version + 1)
            idle = served and flying.get(name, 0.0) <= 0
            late = now - self.drain_since.get(name, now) >= DRAIN_TIMEOUT_S
            if not (idle or late or not child.running):
                continue
            if late and not idle:
                self.sup.note(f"{name}: still {flying.get(name, 0):g} request(s) in flight after the "
                              f"{DRAIN_TIMEOUT_S:g}s drain timeout; stopping it anyway")
            self._stop(child)
            changed = True
        return changed

    def _stop(self, child: Child) -> None:
        sup = self.sup
        report = stop_processes([child.record()], None, 10.0, reap=lambda: child.check_exit(),
                                launcher=getattr(sup.runtime, "launcher", None))
        sup._kill_leftovers(child)  # its own children in other sessions (vLLM's EngineCore), by tag
        child.check_exit()
        child.set_state(ProcessState.EXITED)
        sup.event(child, "drained", how=report.lines()[0] if report.lines() else "")
        sup.children.remove(child)
        self.joined.discard(child.spec.name)
        self.ports.pop(child.spec.name, None)
        sup.plan = dataclasses.replace(sup.plan, instances=tuple(s for s in sup.plan.instances if s.name != child.spec.name))
        if self.job is not None:
            self.job.done.append(f"{child.spec.name}: drained and stopped")
        sup.note(f"{child.spec.name} drained and stopped")

    def joining(self) -> set[str]:
        """Instances the scale under way is adding: their start-up is a scale, not a fault."""
        job = self.job
        return set(job.adding) if job is not None and job.status == "working" else set()

    def _finish_job(self, now: float) -> bool:
        changed = self._finish_working_job(now)
        job = self.job
        if changed and job is not None and job.status != "working":
            for entry in self.history:  # the autoscale change that started it: its outcome, once known
                if entry.get("job") == job.id:
                    entry["status"] = job.status
        return changed

    def _finish_working_job(self, now: float) -> bool:
        job = self.job
        if job is None or job.status != "working":
            return False
        children = {c.spec.name: c for c in self.sup.children}
        for name in job.adding:
            child = children.get(name)
            if child is None or child.state in ENDED:
                job.status, job.reason = "failed", f"{name} did not come up: {child.error if child else 'gone'}"
                self.sup.note(f"scale {job.id}: {job.reason}")
                return True
        if any(children[name].state != ProcessState.HEALTHY or name not in self.joined for name in job.adding):
            return False
        if any(name in children for name in job.draining):
            return False
        if job.adding:  # taking traffic once the proxy serves the pool file that names them
            version, _ = self._proxy_view(now)
            if version is None or version < self.version:
                return False
        job.done += [f"{name}: healthy, taking traffic" for name in job.adding]
        job.status = "done"
        self.sup.note(f"scale {job.id}: done ({', '.join(f'{r}={n}' for r, n in sorted(self.counts().items()))})")
        return True


def _read_request(path) -> Optional[dict[str, Any]]:
    """`epdctl scale`'s request, from our own state folder (never through a link, bounded)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        # Only a file: read() on a folder found at the name raises, and would end the supervisor.
        data = os.read(fd, MAX_REQUEST_BYTES + 1) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        request = json.loads(data) if len(data) <= MAX_REQUEST_BYTES else None
    except ValueError:
        return None
    if not isinstance(request, dict) or not isinstance(request.get("id"), str) or not isinstance(request.get("counts"), dict):
        return None
    counts = request["counts"]
    if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in counts.items()):
        return None
    return {"id": request["id"][:64], "counts": counts}
