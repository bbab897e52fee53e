"""The simulated engine's own `--sim-*` flags, in one table.

`python -m epdctl.sim` builds its parser from it, and `validate` checks a sim topology's `args`
against it, so a misspelt or negative flag is a FILE:LINE error before `up` instead of a flag the
sim ignores or an argparse usage text in a log tail. Standard library only: `plan` and
`validate` import it, and must not import the sim (asyncio, aiohttp).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional


class SimFlag(NamedTuple):
    name: str  # without the leading dashes
    kind: str  # "ms" or "seconds" (a number, 0 or more), "fraction" (0 to 1), "count" (a whole number, 1 or
    # more), "switch" (true/false), "choice"
    default: Any
    help: str
    choices: tuple[str, ...] = ()


# The cost model's flags (ms): what each step costs (epdctl/sim/costmodel.py).
COST_FLAGS = (
    SimFlag("sim-ttft-ms", "ms", 20.0, "Time of a step that prefills: a request alone gets its first token after "
                                       "it; prompts prefilled together share it"),
    SimFlag("sim-prefill-request-ms", "ms", 0.0, "Added to a prefill step per request it prefills"),
    SimFlag("sim-prefill-token-ms", "ms", 0.0, "Added to a step per prompt token it prefills"),
    SimFlag("sim-encode-ms", "ms", 10.0, "Encode time per media item not loaded from the EC; items in one step add up"),
    SimFlag("sim-encode-base-ms", "ms", 0.0, "Added once to a step that encodes anything"),
    SimFlag("sim-ec-load-ms", "ms", 0.0, "Added to a step per media item a consumer loads from the EC"),
    SimFlag("sim-tpot-ms", "ms", 2.0, "Time of a step that decodes: time per output token after the first"),
    SimFlag("sim-step-per-seq-ms", "ms", 0.0, "Added to each step per running request: what batching costs"),
    SimFlag("sim-request-ms", "ms", 0.0, "The API server's work per request, one request at a time, before the "
                                         "step loop"),
)
# Instances that share a device or the host's cores slow each other down (epdctl/sim/contention.py).
CONTENTION_FLAGS = (
    SimFlag("sim-contention", "choice", None, "Model contention with the instances that share a resource: device "
                                              "(sims on one device split its time, through a ledger in the state "
                                              "folder), cpu (burn the CPU share of each cost, so the host's cores are "
                                              "shared by the kernel), none (default: sleep the costs)",
            ("none", "device", "cpu")),
    SimFlag("sim-cpu-share", "fraction", 1.0, "With --sim-contention cpu: the part of each cost burnt as CPU time "
                                              "(the rest is slept)"),
    SimFlag("sim-sleep-share", "fraction", None, "With --sim-contention cpu: the part of each cost slept (default: "
                                                 "what --sim-cpu-share leaves)"),
    SimFlag("sim-device-slots", "count", 1, "With --sim-contention device: steps a device runs side by side at "
                                            "full speed"),
)
# For testing supervisors.
TESTING_FLAGS = (
    SimFlag("sim-startup-ms", "ms", 0.0, "Wait before listening (a slow start)"),
    SimFlag("sim-exit-after-s", "seconds", None, "Exit with code 3 after this many seconds (a crash)"),
    SimFlag("sim-ignore-sigterm", "switch", False, "Ignore SIGTERM (needs SIGKILL)"),
    SimFlag("sim-spawn-child", "choice", None, "Start a child that ignores SIGTERM, in our process group or its own "
                                               "session (like vLLM's EngineCore)", ("group", "session")),
)
SIM_FLAGS = {flag.name: flag for flag in COST_FLAGS + CONTENTION_FLAGS + TESTING_FLAGS}
MAX_DEVICE_SLOTS = 1024


def number_problem(value: Any, unit: str) -> Optional[str]:
    """Why `value` is not a time the sim can sleep, or None."""
    number = None
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)  # a string too: argparse reads the flag's word with float()
        except ValueError:
            pass
    if number is None or not math.isfinite(number) or number < 0:
        return f"must be a number of {unit}, 0 or more (got {value!r})"
    return None


def value_problem(flag: SimFlag, value: Any) -> Optional[str]:
    """Why the topology value `value` (as `args:` holds it) does not fit `flag`, or None.

    None drops a flag (`args:` precedence), so it fits every one.
    """
    if value is None:
        return None
    if flag.kind == "switch":
        return None if isinstance(value, bool) else f"must be true or false (got {value!r})"
    if flag.kind == "choice":
        return None if value in flag.choices else f"must be one of {', '.join(flag.choices)} (got {value!r})"
    if flag.kind == "fraction":
        bad = number_problem(value, "seconds") or float(value) > 1
        return f"must be a fraction from 0 to 1 (got {value!r})" if bad else None
    if flag.kind == "count":
        whole = isinstance(value, int) and not isinstance(value, bool) or (isinstance(value, str) and value.isdigit())
        if not whole or not 1 <= int(value) <= MAX_DEVICE_SLOTS:
            return f"must be a whole number from 1 to {MAX_DEVICE_SLOTS} (got {value!r})"
        return None
    return number_problem(value, "milliseconds" if flag.kind == "ms" else "seconds")


def contention_of(argv) -> str:
    """The `--sim-contention` mode an argv asks for (the last one wins, as argparse reads it); "none" without."""
    mode = "none"
    for i, word in enumerate(argv):
        if word == "--sim-contention" and i + 1 < len(argv):
            mode = argv[i + 1]
        elif word.startswith("--sim-contention="):
            mode = word.split("=", 1)[1]
    return mode
