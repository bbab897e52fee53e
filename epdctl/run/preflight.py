"""What `up` checks before it starts anything, and the supervisor again before it spawns: every
planned port free on this machine (docs/commands.md, up, step 1)."""

from __future__ import annotations

from epdctl.errors import EpdctlError
from epdctl.plan import Plan, ProcessSpec
from epdctl.ports import busy_ports


def check_ports(plan: Plan) -> None:
    def what(spec: ProcessSpec, port: int) -> str:
        if port == spec.port:
            return spec.name
        if port == spec.metrics_port:
            return f"{spec.name}'s metrics"
        return f"{spec.name}'s NIXL side channel" if port == spec.side_channel_port else f"{spec.name}'s EC port"

    # An instance on a Slurm node binds its ports there, not here: its own node is the judge.
    problems = busy_ports((port, what(spec, port)) for spec in plan.processes if spec.node is None
                          for port in spec.ports())
    if len(problems) == 1:
        raise EpdctlError(problems[0])
    if problems:
        raise EpdctlError("\n".join([f"epdctl: {plan.name}: planned ports are in use:"] + [f"  {p}" for p in problems]))
