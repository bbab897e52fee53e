"""Restart policy and back-off bookkeeping: pure, no processes and no clock of its own.

The rules are docker compose's `restart:` with supervisord's and Kubernetes' crash-loop guard:
- `no`: an exited process stays exited;
- `on-failure`: restart after a non-zero exit or a death by signal, not after exit code 0;
- `always`: restart whatever the exit;
and in every case at most `max_restarts` restarts within any `window_s`; past that the process
is `failed` (Kubernetes' CrashLoopBackOff that gives up). Between restarts the delay doubles
from `backoff_s` up to `backoff_max_s`, counted over the restarts still inside the window, so
a process that ran calmly for a whole window starts again from the short delay.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from epdctl.config.schema import RestartSpec


@dataclass(frozen=True)
class Decision:
    action: str  # "restart" | "exited" | "failed"
    delay_s: float = 0.0
    reason: str = ""


@dataclass
class RestartBook:
    policy: RestartSpec
    restarts: int = 0  # over the whole run, for `status`
    recent: deque = field(default_factory=deque)  # times of the restarts inside the window

    def decide(self, exit_code: Optional[int], now: float) -> Decision:
        """What to do about a process that exited with `exit_code` (None: unknown) at `now`."""
        policy = self.policy
        while self.recent and now - self.recent[0] > policy.window_s:
            self.recent.popleft()
        if policy.policy == "no":
            return Decision("exited", reason="restart policy is no")
        if policy.policy == "on-failure" and exit_code == 0:
            return Decision("exited", reason="it exited cleanly (code 0) and the restart policy is on-failure")
        if len(self.recent) >= policy.max_restarts:
            return Decision("failed", reason=f"it was restarted {len(self.recent)} time(s) within "
                                             f"{policy.window_s:g}s (restart.max_restarts {policy.max_restarts})")
        delay = min(policy.backoff_s * (2 ** len(self.recent)), policy.backoff_max_s)
        return Decision("restart", delay_s=delay,
                        reason=f"restart {len(self.recent) + 1} of at most {policy.max_restarts} "
                               f"within {policy.window_s:g}s")

    def restarted(self, now: float) -> None:
        self.recent.append(now)
        self.restarts += 1
