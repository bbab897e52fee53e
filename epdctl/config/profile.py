"""A sim profile: the simulated engine's cost model, fitted to a real topology by `epdctl calibrate`.

A topology's `sim_profile: FILE` turns the profile's costs into the sim's `--sim-*` flags at
plan time, below every `args:` level: `plan` shows the numbers each instance runs with, a
restart runs with the same ones even if the file changes, and an explicit `args:` still wins.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from epdctl.config.simflags import MAX_DEVICE_SLOTS
from epdctl.config.yamlmarks import error_line, format_validation, load_marked, read_text_file
from epdctl.errors import EXIT_USAGE, EpdctlError

KIND = "epdctl-sim-profile"
VERSION = 1
# Profile field -> the sim's flag (epdctl/sim/__main__.py; the cost model in epdctl/sim/costmodel.py).
COST_FLAGS = {
    "prefill_ms": "sim-ttft-ms",
    "prefill_request_ms": "sim-prefill-request-ms",
    "prefill_token_ms": "sim-prefill-token-ms",
    "encode_base_ms": "sim-encode-base-ms",
    "encode_ms": "sim-encode-ms",
    "ec_load_ms": "sim-ec-load-ms",
    "decode_ms": "sim-tpot-ms",
    "per_seq_ms": "sim-step-per-seq-ms",
}
MAX_PROBES = 10_000

Ms = Annotated[float, Field(ge=0, le=3_600_000, allow_inf_nan=False)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Costs(_Model):
    """Milliseconds. See epdctl/sim/costmodel.py for how a step adds them up."""

    prefill_ms: Ms = 0.0  # per step that prefills anything (a lone short prompt's TTFT)
    prefill_request_ms: Ms = 0.0  # per request prefilled in the step
    prefill_token_ms: Ms = 0.0  # per prompt token prefilled
    encode_base_ms: Ms = 0.0  # per step that encodes anything
    encode_ms: Ms = 0.0  # per media item encoded
    ec_load_ms: Ms = 0.0  # per media item a consumer loads from the EC (its preprocessing and the load)
    decode_ms: Ms = 0.0  # per decode step (TPOT with one request running, less per_seq_ms)
    per_seq_ms: Ms = 0.0  # per request running in a step
    encode_request_ms: Ms = 0.0  # an encoder's API server, per request, one at a time (--sim-request-ms there)

    def flags(self, role: str) -> dict[str, float]:
        """The sim flags of an instance of `role` (encode, prefill, decode, pd)."""
        flags = {flag: getattr(self, key) for key, flag in COST_FLAGS.items()}
        if role == "encode":
            flags["sim-request-ms"] = self.encode_request_ms
        return flags


class Fit(_Model):
    """One role's least-squares fit: which instance was probed, the coefficients, the error, the data."""

    instance: str = Field(max_length=200)
    model: str = Field(max_length=500)  # the equation fitted, in words
    coefficients: dict[str, float] = Field(max_length=16)
    rmse_ms: float = Field(ge=0, allow_inf_nan=False)
    r2: Optional[float] = Field(None, allow_inf_nan=False)
    note: str = Field("", max_length=2000)
    probes: list[dict[str, float]] = Field([], max_length=MAX_PROBES)


Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Role = Literal["encode", "prefill", "decode", "pd"]


class Contention(_Model):
    """How the twin's instances slow each other down (epdctl/sim/contention.py, docs/sim.md#contention).

    The default, mode none, is the sim as it was before contention was modelled: costs are slept
    and instances never compete, so a profile without this block means what it always meant."""

    mode: Literal["none", "cpu", "device"] = "none"
    cpu_share: dict[Role, Fraction] = Field({}, max_length=4)  # cpu: CPU seconds per second of the role's work
    # cpu: the part of the role's work that was neither CPU nor a wait for a core (default 1 - cpu_share)
    sleep_share: dict[Role, Fraction] = Field({}, max_length=4)
    device_slots: int = Field(1, ge=1, le=MAX_DEVICE_SLOTS)  # device: steps a device runs side by side at full speed
    host_cores: Optional[int] = Field(None, ge=1, le=1 << 20)  # the probed host's usable cores (for the reader)
    note: str = Field("", max_length=2000)
    probes: list[dict[str, Union[float, str]]] = Field([], max_length=MAX_PROBES)

    def flags(self, role: str) -> dict[str, Any]:
        """The sim flags of an instance of `role`: none at all for mode none (the plan is unchanged)."""
        if self.mode == "cpu":
            measured = _nearest(self.cpu_share, role)
            share = self.cpu_share[measured] if measured else 1.0
            flags: dict[str, Any] = {"sim-contention": "cpu", "sim-cpu-share": share}
            sleep = self.sleep_share.get(measured) if measured else None  # type: ignore[call-overload]
            if sleep is not None:
                flags["sim-sleep-share"] = min(sleep, 1.0 - share)
            return flags
        if self.mode == "device":
            return {"sim-contention": "device", "sim-device-slots": self.device_slots}
        return {}


def _nearest(by_role: Mapping[str, float], role: str) -> Optional[str]:
    """`role` when it was measured; else (a P or D twin of a PD-measured profile, or the other way
    round) the nearest role measured; None when none was."""
    if role in by_role:
        return role
    return next((r for r in ("pd", "prefill", "decode", "encode") if r in by_role), None)


class SimProfile(_Model):
    kind: Literal["epdctl-sim-profile"] = KIND
    version: Literal[1] = VERSION
    model: str = Field(min_length=1, max_length=4096)
    source: dict[str, str] = Field({}, max_length=32)
    cost: Costs
    contention: Contention = Contention()
    fits: dict[Literal["encode", "prefill", "decode", "consumer"], Fit] = {}

    def flags(self, role: str) -> dict[str, Any]:
        """Every sim flag the profile sets for an instance of `role`."""
        return {**self.cost.flags(role), **self.contention.flags(role)}


def load_profile(path: Path, environ: Optional[Mapping[str, str]] = None) -> SimProfile:
    """Read and check a profile. Errors are one line each, `FILE:LINE: field: message` (exit 2).

    `${VARS}` expand as in the topology that names it (from `environ`, by default this process's)."""
    text = read_text_file(path, "sim profile")  # a bounded read of a regular file (no FIFO, no device)
    if not text.strip():
        raise EpdctlError(error_line(str(path), 1, "the profile is empty"), EXIT_USAGE)
    data, marks = load_marked(text, str(path), environ)
    if not isinstance(data, dict):
        raise EpdctlError(error_line(str(path), 1, "a sim profile is a mapping (kind, model, cost, ...)"), EXIT_USAGE)
    try:
        return SimProfile.model_validate(data)
    except ValidationError as exc:
        raise EpdctlError(format_validation(exc, str(path), marks, SimProfile), EXIT_USAGE, one_per_line=True) from None


def dump_profile(profile: SimProfile) -> str:
    import yaml

    header = ("# epdctl sim profile: the simulated engine's costs (ms), fitted by `epdctl calibrate`.\n"
              "# Use it with `engine: sim` and `sim_profile: THIS_FILE` in a topology.\n")
    return header + yaml.safe_dump(_literal(profile.model_dump(mode="json")), sort_keys=False, width=120)


def _literal(value):
    """`value` with each `$` in a string written `$$`: a profile's values expand ${VARS} when read, so
    what calibrate wrote (a model path, a source file) must read back as it was."""
    if isinstance(value, str):
        return value.replace("$", "$$")
    if isinstance(value, dict):
        return {key: _literal(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_literal(item) for item in value]
    return value


def rounded(value: float, digits: int = 4) -> float:
    """Figures for a file people read: microsecond precision is more than a fit is worth."""
    return 0.0 if not math.isfinite(value) else round(value, digits)
