"""The states a process and a topology go through, and which process transitions are allowed
(docs/design.md, "States").

The values are the words `state.json`, `status --json` and the events file have always held:
each member is a `str` equal to its word, so JSON written with them is unchanged and a state
read back from an older file compares equal to the member.
"""

from __future__ import annotations

from enum import Enum


class _Word(str, Enum):
    """A member that is its word everywhere: in JSON, in f-strings, in comparisons and as a key."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class ProcessState(_Word):
    PENDING = "pending"  # planned, not started yet
    STARTING = "starting"  # running, no 200 from /health yet
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"  # running, /health no longer answers 200 (seen by `status`)
    RESTARTING = "restarting"  # exited; its restart policy starts it again after a delay
    DRAINING = "draining"  # stopping on purpose: finishing its requests, taking no new ones
    FAILED = "failed"  # exited and not restarted: it kept failing, or could not be started again
    EXITED = "exited"  # exited and not restarted: its policy says so, or it never started


class TopologyPhase(_Word):
    """The supervisor's `phase` in state.json (and `status`'s overall state)."""

    STARTING = "starting"
    ADOPTING = "adopting"  # taking over the live processes of a supervisor that died
    RUNNING = "running"  # every process healthy
    DEGRADED = "degraded"  # up, some process not healthy
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"  # the start failed, or (foreground) a role can never serve again


class Health(_Word):
    """`status`'s verdict: does the topology serve as designed?"""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    FAILED = "failed"


P = ProcessState
# Why each is allowed; anything else is a bug of ours (IllegalTransition).
TRANSITIONS: dict[ProcessState, frozenset[ProcessState]] = {
    # Spawned, or its command could not be started; adopting takes any state a dead supervisor recorded.
    P.PENDING: frozenset(P),
    # Answered /health, or exited during start-up (a start failure, or its restart policy decides).
    P.STARTING: frozenset({P.HEALTHY, P.EXITED, P.FAILED, P.RESTARTING, P.UNHEALTHY, P.DRAINING}),
    P.HEALTHY: frozenset({P.EXITED, P.FAILED, P.RESTARTING, P.UNHEALTHY, P.DRAINING}),
    P.UNHEALTHY: frozenset({P.HEALTHY, P.EXITED, P.FAILED, P.RESTARTING, P.DRAINING}),
    # Started again, or could not be (exited, then failed for good); its restarts ran out.
    P.RESTARTING: frozenset({P.STARTING, P.EXITED, P.FAILED}),
    P.DRAINING: frozenset({P.EXITED, P.FAILED}),
    # A restart whose command is gone: exited on the spawn, then failed (not restarted again).
    P.EXITED: frozenset({P.FAILED}),
    P.FAILED: frozenset(),
}
del P

# Its current incarnation runs (as far as the supervisor knows): an exit is to be looked for.
RUNNING_NOW = frozenset({ProcessState.STARTING, ProcessState.HEALTHY, ProcessState.UNHEALTHY})
# Runs, or is about to again: its role may still serve.
ALIVE = RUNNING_NOW | {ProcessState.RESTARTING}
# Gone for good: nothing restarts it.
ENDED = frozenset({ProcessState.EXITED, ProcessState.FAILED})


class IllegalTransition(RuntimeError):
    """A process state change that `TRANSITIONS` does not allow: a bug of ours, never the user's."""


def check_transition(name: str, old: ProcessState, new: ProcessState) -> None:
    if new != old and new not in TRANSITIONS[ProcessState(old)]:
        raise IllegalTransition(f"{name}: {old} -> {new} is not an allowed process state change")
