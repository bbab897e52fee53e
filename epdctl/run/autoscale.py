"""`autoscale:`: when a role's pool grows or shrinks (docs/commands.md, "Autoscale"). Pure: the
supervisor's Scaler feeds it the proxy's in-flight counts and carries its decisions out.

The rule, per role: the load is the requests in flight per instance of the pool (the proxy's own
count, `epdctl_proxy_in_flight`: encoder calls for encode), sampled every half second. Above
`target_inflight` at every sample for `scale_up_after_s` (5 s): one instance more. Below half of
it at every sample for `scale_down_after_s` (60 s): one fewer. Never beyond `min`/`max`, one
change at a time (the next waits until the last is done), each an event with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from epdctl.config.schema import AutoscaleRole

SAMPLE_EVERY_S = 0.5


@dataclass
class Watch:
    spec: AutoscaleRole
    above_since: Optional[float] = None
    below_since: Optional[float] = None

    def decide(self, now: float, size: int, load: float) -> Optional[tuple[int, str]]:
        """(the new size, why) when the rule says so, else None."""
        spec = self.spec
        if load > spec.target_inflight:
            self.below_since = None
            self.above_since = now if self.above_since is None else self.above_since
            if now - self.above_since >= spec.scale_up_after_s and size < spec.max:
                self.above_since = None
                return size + 1, (f"{load:.2g} in flight per instance, above the target {spec.target_inflight:g} "
                                  f"for {spec.scale_up_after_s:g}s")
        elif load < spec.target_inflight / 2:
            self.above_since = None
            self.below_since = now if self.below_since is None else self.below_since
            if now - self.below_since >= spec.scale_down_after_s and size > spec.min:
                self.below_since = None
                return size - 1, (f"{load:.2g} in flight per instance, below half the target "
                                  f"{spec.target_inflight:g} for {spec.scale_down_after_s:g}s")
        else:
            self.above_since = self.below_since = None
        if size < spec.min:
            return spec.min, f"below min {spec.min}"
        if size > spec.max:
            return spec.max, f"above max {spec.max}"
        return None

    def hold(self) -> None:
        """A change is under way: the next one is judged on the load after it."""
        self.above_since = self.below_since = None
