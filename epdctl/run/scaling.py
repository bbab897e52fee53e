"""A running topology's pool, grown and drained while it serves (docs/design.md, "Seams";
docs/commands.md, `epdctl scale`).

What a scale means is decided here, purely: the topology with N instances of a role (new ones
copy the role's last instance, on new ports), planned by the very rules `up` uses. The supervisor
(run/supervisor.py) carries it out: it starts the new instances, gates them on health, then
writes the pool file the proxy watches (proxy/membership.py); an instance to remove is first
marked draining there, and stopped once the proxy serves that version of the file and has no
request of it in flight (or its drain timeout passed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from epdctl.config.checks import scale_refusal as refusal  # noqa: F401  (the supervisor asks it here)
from epdctl.config.schema import ROLES, Topology
from epdctl.plan import Plan, hand_out

SCALE_FILE = "scale-request"  # `epdctl scale` writes it; the supervisor takes it
POOL_FILE = "pool.json"  # the supervisor writes it; the proxy watches it
DRAIN_TIMEOUT_S = 120.0


def counts_of(topology: Topology) -> dict[str, int]:
    return {role: len(getattr(topology, role)) for role in ROLES if getattr(topology, role)}


def scaled_topology(topology: Topology, counts: Mapping[str, int], ports: Mapping[str, int]) -> Topology:
    """The topology with `counts` instances per role: the first ones as the file has them, then
    copies of the role's last instance on `ports` (by instance name).

    A copy takes its devices (as many as the last instance has) from the role's `scale_devices`
    pool, those no instance uses yet, in the pool's order; when the pool has none left it shares
    the devices of the role's last instance in the file, and the memory budget check (config/checks.py) decides whether that fits.
    The same counts always give the same devices: a scaled instance's plan never changes.
    """
    update: dict[str, Any] = {}
    used = {device for ref in topology.instances() for device in ref.spec.devices}
    for role in ROLES:
        count = counts.get(role)
        if count is None:
            continue
        specs = list(getattr(topology, role))
        template = specs[-1]
        pool = [d for d in getattr(topology.scale_devices, role) if d not in used]
        need = len(template.devices)
        while len(specs) < count:
            name = f"{role}-{len(specs)}"
            devices = template.devices
            if need and len(pool) >= need:
                devices, pool = tuple(pool[:need]), pool[need:]
            # Its own ports: a pinned side channel or EC port of the template must not be shared.
            specs.append(template.model_copy(update={"port": ports[name], "side_channel_port": None, "ec_port": None,
                                                     "devices": devices}))
        update[role] = tuple(specs[:count])
    return topology.model_copy(update=update)


def new_ports(plan: Plan, topology: Topology, counts: Mapping[str, int], is_free) -> dict[str, int]:
    """Ports for the instances `counts` adds: past every instance port, clear of every port the
    plan holds (side channels, EC ports, the proxy's), and free on this machine now."""
    taken = {port for spec in plan.processes for port in spec.ports()}
    candidate = max(spec.port for spec in plan.instances) + 1
    ports: dict[str, int] = {}
    for role, count in counts.items():
        for index in range(len(getattr(topology, role)), count):
            while True:
                (port,) = hand_out(candidate, taken)
                taken.add(port)
                candidate = port + 1
                if is_free(port):
                    break
            ports[f"{role}-{index}"] = port
    return ports


@dataclass
class ScaleJob:
    """One `epdctl scale` request as the supervisor carries it out, recorded in state.json."""

    id: str
    counts: dict[str, int]
    adding: list[str] = field(default_factory=list)
    draining: list[str] = field(default_factory=list)
    status: str = "working"  # working | done | refused | failed
    reason: str = ""
    done: list[str] = field(default_factory=list)  # what happened, a line each

    def record(self) -> dict[str, Any]:
        return {"id": self.id, "counts": self.counts, "status": self.status, "reason": self.reason,
                "adding": self.adding, "draining": self.draining, "done": self.done}


def pool_document(version: int, members: Mapping[str, list[tuple[str, str]]], draining: list[str]) -> dict[str, Any]:
    """The proxy's pool file: its pools are encode, prefill and decode (pd instances are its decode pool)."""
    roles: dict[str, list[dict[str, str]]] = {}
    for role, entries in members.items():
        pool = "decode" if role == "pd" else role
        roles.setdefault(pool, []).extend({"name": name, "url": url} for name, url in entries)
    return {"version": version, "roles": roles, "draining": sorted(draining)}


def in_flight_from_metrics(text: str) -> tuple[Optional[int], dict[str, float]]:
    """(the pool version every proxy worker serves, requests in flight per instance) from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    version: Optional[int] = None
    flying: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "epdctl_proxy_pool_version":
                version = int(sample.value)
            elif sample.name == "epdctl_proxy_in_flight":
                name = sample.labels.get("instance", "")
                flying[name] = flying.get(name, 0.0) + sample.value
    return version, flying
