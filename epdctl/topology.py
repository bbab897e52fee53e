"""Topology file (DESIGN §2): YAML → a validated, frozen model, with line numbers in errors."""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, NamedTuple, Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from epdctl.errors import EXIT_USAGE, EpdctlError
from epdctl.yamlmarks import Marks, dotted, load_marked

ROLES = ("encode", "prefill", "decode", "pd")
NAME_PATTERN = r"^[a-z0-9][a-z0-9-]*$"
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's own default when no budget is given
DEFAULT_SIDE_CHANNEL_PORT_BASE = 5600
NIXL_CONNECTORS = ("NixlConnector",)

ArgValue = Any  # bool | int | float | str | list | dict | None (None drops the flag)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _env_values(value: Any) -> Any:
    """Env values may be written as YAML numbers or bools; the process gets strings."""
    if not isinstance(value, dict):
        return value
    out = {}
    for key, item in value.items():
        if isinstance(item, bool):
            out[key] = "1" if item else "0"
        elif isinstance(item, (int, float)):
            out[key] = str(item)
        else:
            out[key] = item
    return out


class Defaults(_Model):
    args: dict[str, ArgValue] = {}
    env: dict[str, str] = {}

    _coerce_env = field_validator("env", mode="before")(_env_values)


class ECTransfer(_Model):
    connector: str = Field(min_length=1)
    shared_storage_path: Optional[str] = None
    extra_config: dict[str, Any] = {}
    config: dict[str, Any] = {}  # extra top-level ECTransferConfig fields


class KVTransfer(_Model):
    connector: str = Field(min_length=1)
    extra_config: dict[str, Any] = {}
    config: dict[str, Any] = {}  # extra top-level KVTransferConfig fields, e.g. kv_buffer_device
    side_channel_port_base: int = Field(DEFAULT_SIDE_CHANNEL_PORT_BASE, ge=1, le=65535)


RestartPolicy = Literal["no", "on-failure", "always"]


def _restart_shorthand(value: Any) -> Any:
    """`restart: on-failure` for `{policy: on-failure}`; YAML reads a bare `no` as false."""
    if value is False:
        return {"policy": "no"}
    if isinstance(value, str):
        return {"policy": value}
    if isinstance(value, dict) and value.get("policy") is False:
        return {**value, "policy": "no"}
    return value


class RestartSpec(_Model):
    """What happens when a process exits after start-up (docker compose's `restart:`)."""

    policy: RestartPolicy = "on-failure"
    max_restarts: int = Field(5, ge=0, le=10000)
    window_s: float = Field(600, gt=0, le=10 ** 7)
    backoff_s: float = Field(2, ge=0, le=3600)
    backoff_max_s: float = Field(60, ge=0, le=86400)

    _shorthand = field_validator("policy", mode="before")(lambda value: "no" if value is False else value)


class RestartOverride(_Model):
    """Per instance (or proxy): only the keys given replace the top-level `restart`."""

    policy: Optional[RestartPolicy] = None
    max_restarts: Optional[int] = Field(None, ge=0, le=10000)
    window_s: Optional[float] = Field(None, gt=0, le=10 ** 7)
    backoff_s: Optional[float] = Field(None, ge=0, le=3600)
    backoff_max_s: Optional[float] = Field(None, ge=0, le=86400)

    _shorthand = field_validator("policy", mode="before")(lambda value: "no" if value is False else value)

    def over(self, base: RestartSpec) -> RestartSpec:
        return base.model_copy(update=self.model_dump(exclude_none=True))


class LogsSpec(_Model):
    max_mb: float = Field(100, gt=0, le=10 ** 6)  # rotate a process's log beyond this size
    keep: int = Field(3, ge=0, le=100)  # rotated files kept (NAME.log.1 ... NAME.log.KEEP)


class InstanceSpec(_Model):
    devices: tuple[int, ...] = ()
    port: int = Field(ge=1, le=65535)
    gpu_memory_utilization: Optional[float] = Field(None, gt=0, le=1)
    side_channel_port: Optional[int] = Field(None, ge=1, le=65535)
    args: dict[str, ArgValue] = {}
    env: dict[str, str] = {}
    restart: Optional[RestartOverride] = None

    _coerce_env = field_validator("env", mode="before")(_env_values)
    _restart = field_validator("restart", mode="before")(_restart_shorthand)


class ProxySpec(_Model):
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(10001, ge=1, le=65535)
    policy: Literal["least-loaded", "round-robin"] = "least-loaded"
    encode_timeout_s: float = Field(300, gt=0)
    prefill_timeout_s: float = Field(600, gt=0)
    decode_timeout_s: float = Field(600, gt=0)
    # Below 1 MB a float rounds the byte limit towards 0, which aiohttp reads as "no limit".
    max_body_mb: float = Field(64, ge=1, le=4096)
    # Each media item is one encoder call (and one open connection) per request: bound it.
    max_media_items: int = Field(64, ge=1, le=4096)
    restart: Optional[RestartOverride] = None

    _restart = field_validator("restart", mode="before")(_restart_shorthand)


class HealthSpec(_Model):
    timeout_s: float = Field(600, gt=0)
    interval_s: float = Field(0.5, gt=0)


class MediaSpec(_Model):
    allowed_local_path: Optional[str] = None


class InstanceRef(NamedTuple):
    role: str
    index: int
    name: str
    spec: InstanceSpec


class Topology(_Model):
    name: str = Field(pattern=NAME_PATTERN)
    model: str = Field(min_length=1)
    engine: Literal["vllm", "sim"] = "vllm"
    platform: Literal["cuda", "xpu", "cpu"] = "cuda"
    vllm_command: tuple[str, ...] = Field(("vllm", "serve"), min_length=1)
    defaults: Defaults = Defaults()
    ec_transfer: Optional[ECTransfer] = None
    kv_transfer: Optional[KVTransfer] = None
    encode: tuple[InstanceSpec, ...] = ()
    prefill: tuple[InstanceSpec, ...] = ()
    decode: tuple[InstanceSpec, ...] = ()
    pd: tuple[InstanceSpec, ...] = ()
    proxy: ProxySpec = ProxySpec()
    health: HealthSpec = HealthSpec()
    media: MediaSpec = MediaSpec()
    restart: RestartSpec = RestartSpec()
    logs: LogsSpec = LogsSpec()

    _restart = field_validator("restart", mode="before")(_restart_shorthand)

    _source: Optional[Path] = PrivateAttr(None)

    @field_validator("model")
    @classmethod
    def _model_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @property
    def source(self) -> Optional[Path]:
        return self._source

    def instances(self) -> Iterator[InstanceRef]:
        for role in ROLES:
            for index, spec in enumerate(getattr(self, role)):
                yield InstanceRef(role, index, f"{role}-{index}", spec)

    @property
    def uses_nixl(self) -> bool:
        return bool(self.prefill) and self.kv_transfer is not None and self.kv_transfer.connector in NIXL_CONNECTORS

    def side_channel_ports(self) -> dict[str, int]:
        """The NIXL side-channel port of each P and D instance.

        Unless an instance sets its own, ports are handed out from `side_channel_port_base`,
        skipping any port already used elsewhere in the topology.
        """
        if not self.uses_nixl:
            return {}
        assert self.kv_transfer is not None
        taken = {ref.spec.port for ref in self.instances()} | {self.proxy.port}
        taken |= {ref.spec.side_channel_port for ref in self.instances() if ref.spec.side_channel_port}
        ports: dict[str, int] = {}
        candidate = self.kv_transfer.side_channel_port_base
        for ref in self.instances():
            if ref.role not in ("prefill", "decode"):
                continue
            if ref.spec.side_channel_port:
                ports[ref.name] = ref.spec.side_channel_port
                continue
            while candidate in taken:
                candidate += 1
            ports[ref.name] = candidate
            taken.add(candidate)
        return ports


# ---------------------------------------------------------------- loading


def load_topology(
    path: str | os.PathLike,
    *,
    environ: Mapping[str, str] | None = None,
    device_count: int | None = None,
) -> Topology:
    """Read, validate and cross-check a topology file. Raises EpdctlError (exit 2)."""
    path = Path(path)
    filename = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EpdctlError(f"{filename}: no such file", EXIT_USAGE) from None
    except IsADirectoryError:
        raise EpdctlError(f"{filename}: is a directory, not a topology file", EXIT_USAGE) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EpdctlError(f"{filename}: cannot read: {exc}", EXIT_USAGE) from None
    return parse_topology(text, filename, environ=environ, device_count=device_count, source=path)


def parse_topology(
    text: str,
    filename: str,
    *,
    environ: Mapping[str, str] | None = None,
    device_count: int | None = None,
    source: Path | None = None,
) -> Topology:
    if not text.strip():
        raise EpdctlError(f"{filename}:1: the file is empty", EXIT_USAGE)
    data, marks = load_marked(text, filename, environ)
    if data is None:
        raise EpdctlError(f"{filename}:1: the file is empty", EXIT_USAGE)
    if not isinstance(data, dict):
        raise EpdctlError(f"{filename}:1: the topology must be a mapping of keys (name, model, ...)", EXIT_USAGE)
    if "name" not in data:
        data["name"] = _name_from_stem((source or Path(filename)).stem)
    try:
        topology = Topology.model_validate(data)
    except ValidationError as exc:
        raise EpdctlError(_format_validation(exc, filename, marks), EXIT_USAGE) from None
    problems = cross_check(topology, device_count=device_count)
    if problems:
        lines = [
            f"{filename}:{marks.line_for(loc, prefer_key=prefer_key)}: {dotted(loc) or '<top>'}: {message}"
            for loc, message, prefer_key in problems
        ]
        raise EpdctlError("\n".join(lines), EXIT_USAGE)
    topology._source = source
    return topology


def _name_from_stem(stem: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", stem.lower()).strip("-")
    return name or "topology"


def _format_validation(exc: ValidationError, filename: str, marks: Marks) -> str:
    lines = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        kind = error["type"]
        if kind == "extra_forbidden":
            message = "unknown key"
            line = marks.line_for(loc, prefer_key=True)
        elif kind == "missing":
            message = "required but missing"
            line = marks.line_for(loc[:-1])
        else:
            message = error["msg"]
            if message.startswith("Value error, "):
                message = message[len("Value error, "):]
            if "input" in error and not isinstance(error["input"], (dict, list)):
                message += f" (got {error['input']!r})"
            line = marks.line_for(loc)
        lines.append(f"{filename}:{line}: {dotted(loc) or '<top>'}: {message}")
    return "\n".join(dict.fromkeys(lines))


Problem = tuple  # (loc, message, prefer_key_line)


def cross_check(topology: Topology, device_count: int | None = None) -> list[Problem]:
    """The checks that span fields. Each problem is (loc, message, point-at-key-line)."""
    problems: list[Problem] = []
    has = {role: bool(getattr(topology, role)) for role in ROLES}

    if has["pd"] and (has["prefill"] or has["decode"]):
        problems.append((("pd",), "pd cannot be combined with prefill/decode: use E+PD or E+P+D", True))
    elif has["prefill"] and not has["decode"]:
        problems.append((("prefill",), "prefill instances need decode instances (E+P+D or P+D)", True))
    elif has["decode"] and not has["prefill"]:
        problems.append((("decode",), "decode instances need prefill instances; use pd for combined prefill+decode", True))
    elif not (has["pd"] or has["prefill"]):
        loc = ("encode",) if has["encode"] else ()
        problems.append((loc, "no instance serves requests: add pd, or prefill and decode", True))

    if has["encode"] and topology.ec_transfer is None:
        problems.append((("encode",), "encode instances need ec_transfer (the EC connector)", True))
    if has["prefill"] and topology.kv_transfer is None:
        problems.append((("prefill",), "prefill instances need kv_transfer (the KV connector)", True))
    ec = topology.ec_transfer
    if ec is not None and ec.connector == "ECExampleConnector":
        if not ec.shared_storage_path:
            problems.append((("ec_transfer",), "ECExampleConnector needs shared_storage_path", True))
        elif not os.path.isabs(ec.shared_storage_path):
            problems.append((("ec_transfer", "shared_storage_path"), "must be an absolute path", False))
    if topology.media.allowed_local_path and not os.path.isabs(topology.media.allowed_local_path):
        problems.append((("media", "allowed_local_path"), "must be an absolute path", False))

    reserved = {"port": "the instance's port key", "model": "the top-level model key"}
    for loc, args in [(("defaults", "args"), topology.defaults.args)] + [
        ((ref.role, ref.index, "args"), ref.spec.args) for ref in topology.instances()
    ]:
        for key in args:
            flag = key.replace("_", "-").lstrip("-")
            if flag in reserved:
                problems.append((loc + (key,), f"--{flag} is set by epdctl; use {reserved[flag]}", True))

    for index, word in enumerate(topology.vllm_command):
        if not word:
            problems.append((("vllm_command", index), "must not be empty", False))

    # Ports: every instance, the proxy, and every planned side channel must be distinct.
    seen: dict[int, str] = {}

    def claim(port: int, loc: tuple, what: str) -> None:
        if port in seen:
            problems.append((loc, f"port {port} is already used by {seen[port]}", False))
        else:
            seen[port] = what

    for ref in topology.instances():
        claim(ref.spec.port, (ref.role, ref.index, "port"), ref.name)
    claim(topology.proxy.port, ("proxy", "port"), "the proxy")
    if topology.uses_nixl:
        for ref in topology.instances():
            if ref.spec.side_channel_port:
                claim(ref.spec.side_channel_port, (ref.role, ref.index, "side_channel_port"), f"{ref.name}'s side channel")
        explicit = {r.spec.side_channel_port for r in topology.instances() if r.spec.side_channel_port}
        for name, port in topology.side_channel_ports().items():
            if port not in explicit:
                claim(port, ("kv_transfer", "side_channel_port_base"), f"{name}'s side channel")

    # Devices.
    budget: dict[int, list[tuple[str, float]]] = defaultdict(list)
    for ref in topology.instances():
        loc = (ref.role, ref.index, "devices")
        devices = ref.spec.devices
        if topology.platform != "cpu" and not devices:
            problems.append(((ref.role, ref.index), f"devices: required on platform {topology.platform}", True))
        for device in devices:
            if device < 0:
                problems.append((loc, f"device {device} is negative", False))
            elif device_count is not None and device >= device_count:
                problems.append((loc, f"device {device} is outside this machine ({device_count} devices: 0..{device_count - 1})", False))
        duplicated = sorted({d for d in devices if devices.count(d) > 1})
        if duplicated:
            problems.append((loc, f"device {duplicated[0]} is listed twice", False))
        if ref.spec.gpu_memory_utilization is not None and "gpu-memory-utilization" in _normalized_keys(ref.spec.args):
            problems.append(((ref.role, ref.index, "args"), "gpu-memory-utilization is set both here and as gpu_memory_utilization", True))
        for device in set(devices):
            budget[device].append((ref.name, effective_memory_fraction(topology, ref.spec)))
    if topology.platform != "cpu":
        for device, users in sorted(budget.items()):
            total = sum(fraction for _, fraction in users)
            if len(users) > 1 and total > 1.0 + 1e-9:
                detail = ", ".join(f"{name} {fraction:g}" for name, fraction in users)
                last = users[-1][0]
                role, index = last.rsplit("-", 1)
                problems.append(
                    ((role, int(index), "gpu_memory_utilization"),
                     f"device {device} is shared with a memory budget of {total:g} > 1.0 ({detail})", True)
                )
    return problems


def _normalized_keys(args: Mapping[str, Any]) -> set[str]:
    return {key.replace("_", "-").lstrip("-") for key in args}


def effective_memory_fraction(topology: Topology, spec: InstanceSpec) -> float:
    """The GPU memory fraction vLLM will really use for an instance."""
    if spec.gpu_memory_utilization is not None:
        return spec.gpu_memory_utilization
    for args in (spec.args, topology.defaults.args):
        for key, value in args.items():
            if key.replace("_", "-").lstrip("-") == "gpu-memory-utilization" and isinstance(value, (int, float)):
                return float(value)
    return DEFAULT_GPU_MEMORY_UTILIZATION
