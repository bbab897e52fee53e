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

from epdctl.config.schema import ROLES, Topology
from epdctl.connectors import EC_MOONCAKE
from epdctl.plan import Plan, hand_out

SCALE_FILE = "scale-request"  # `epdctl scale` writes it; the supervisor takes it
POOL_FILE = "pool.json"  # the supervisor writes it; the proxy watches it
MAX_INSTANCES = 64  # of one role
DRAIN_TIMEOUT_S = 120.0


def refusal(topology: Topology, role: str, count: int) -> Optional[str]:
    """Why `role` cannot be scaled to `count` in this topology, or None."""
    if role not in ROLES:
        return f"{role!r} is not a role (encode, prefill, decode or pd)"
    if not 1 <= count <= MAX_INSTANCES:
        return f"{role}={count}: between 1 and {MAX_INSTANCES} instances"
    if not getattr(topology, role):
        return f"the topology has no {role} instance to scale (roles are set at up)"
    if topology.proxy.impl != "epdctl":
        return f"proxy.impl {topology.proxy.impl} routes to a fixed list of workers; scale needs impl: epdctl"
    if topology.launcher != "local":
        return f"launcher {topology.launcher}: scaling is for launcher local this round"
    ec = topology.ec_transfer
    consumer = "prefill" if topology.prefill else "pd"
    if ec is not None and ec.connector == EC_MOONCAKE and topology.encode and role == consumer:
        return (f"{EC_MOONCAKE}: the proxy names each {consumer} instance's control address to the encoders at "
                f"start, so the {consumer} pool is fixed (encoders can be scaled)")
    return None


def counts_of(topology: Topology) -> dict[str, int]:
    return {role: len(getattr(topology, role)) for role in ROLES if getattr(topology, role)}


def scaled_topology(topology: Topology, counts: Mapping[str, int], ports: Mapping[str, int]) -> Topology:
    """The topology with `counts` instances per role: the first ones as the file has them, then
    copies of the role's last instance on `ports` (by instance name)."""
    update: dict[str, Any] = {}
    for role, count in counts.items():
        specs = list(getattr(topology, role))
        template = specs[-1]
        while len(specs) < count:
            name = f"{role}-{len(specs)}"
            # Its own ports: a pinned side channel or EC port of the template must not be shared.
            specs.append(template.model_copy(update={"port": ports[name], "side_channel_port": None, "ec_port": None}))
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
