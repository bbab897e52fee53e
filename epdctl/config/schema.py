"""The topology file's schema (docs/design.md, Topology file): frozen pydantic models, the schema's
constants, and what an instance's settings mean once defaults apply (its TP size, its memory budget).

Loading a file is config/load.py; the rules that span fields are config/checks.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, NamedTuple, Optional

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, StrictInt, field_validator,
                      model_validator)

from epdctl.config.yamlmarks import Marks, dotted, error_line

ROLES = ("encode", "prefill", "decode", "pd")
MAX_INSTANCES = 64  # of one role, as `epdctl scale` and `autoscale:` may grow it
NAME_PATTERN = r"^[a-z0-9][a-z0-9-]*$"
# A Slurm node name as an allocation lists it (host names, also n[1-4]'s members): no path, no option.
NODE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's own default when no budget is given
DEFAULT_SIDE_CHANNEL_PORT_BASE = 5600
DEFAULT_EC_PORT_BASE = 5700

ArgValue = Any  # bool | int | float | str | list | dict | None (None drops the flag)


def _whole_number(value: Any) -> Any:
    """YAML reads `true` and `80.5` happily, and pydantic would make them port 1 and port 80."""
    if isinstance(value, (bool, float)):
        raise ValueError(f"Input should be a valid integer, not a {'boolean' if isinstance(value, bool) else 'float'}")
    return value


Port = Annotated[int, BeforeValidator(_whole_number), Field(ge=1, le=65535)]
Device = Annotated[int, BeforeValidator(_whole_number)]


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
    # ECCPUConnector's producer side channels and ECMooncakeConnector's consumer control ports
    # are handed out from here (unless an instance sets its own `ec_port`).
    port_base: Port = DEFAULT_EC_PORT_BASE


class KVTransfer(_Model):
    connector: str = Field(min_length=1)
    extra_config: dict[str, Any] = {}
    config: dict[str, Any] = {}  # extra top-level KVTransferConfig fields, e.g. kv_buffer_device
    side_channel_port_base: Port = DEFAULT_SIDE_CHANNEL_PORT_BASE


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
    devices: tuple[Device, ...] = ()
    port: Port
    gpu_memory_utilization: Optional[float] = Field(None, gt=0, le=1)
    side_channel_port: Optional[Port] = None
    ec_port: Optional[Port] = None  # the first of its EC connector ports (ECCPU producer, Mooncake consumer)
    node: Optional[str] = Field(None, pattern=NODE_PATTERN)  # launcher: slurm only; else placed by epdctl
    args: dict[str, ArgValue] = {}
    env: dict[str, str] = {}
    restart: Optional[RestartOverride] = None

    _coerce_env = field_validator("env", mode="before")(_env_values)
    _restart = field_validator("restart", mode="before")(_restart_shorthand)


MAX_PROXY_TIMEOUT_S = 7 * 86_400


class ProxySpec(_Model):
    host: str = Field("127.0.0.1", min_length=1, max_length=253)
    port: Port = 10001
    policy: Literal["least-loaded", "round-robin"] = "least-loaded"
    # The proxy's own command line takes at most a week (epdctl/proxy/__main__.py): more, or .inf, would
    # make it refuse to start.
    encode_timeout_s: float = Field(300, gt=0, le=MAX_PROXY_TIMEOUT_S)
    prefill_timeout_s: float = Field(600, gt=0, le=MAX_PROXY_TIMEOUT_S)
    decode_timeout_s: float = Field(600, gt=0, le=MAX_PROXY_TIMEOUT_S)
    # Below 1 MB a float rounds the byte limit towards 0, which aiohttp reads as "no limit".
    max_body_mb: float = Field(64, ge=1, le=4096)
    # Each media item is one encoder call (and one open connection) per request: bound it.
    max_media_items: int = Field(64, ge=1, le=4096)
    # Proxy processes on the one port (SO_REUSEPORT), for a proxy host with cores to spare.
    workers: int = Field(1, ge=1, le=64)
    restart: Optional[RestartOverride] = None
    # What runs in the proxy's place: epdctl's own proxy (any topology), or vLLM's Rust router
    # (`pip install 'epdctl[router]'`) for topologies without encoders, where its speed is wanted.
    impl: Literal["epdctl", "vllm-router"] = "epdctl"
    # vllm-router's Prometheus port (it serves /metrics there, not on `port`); default port + 1.
    metrics_port: Optional[Port] = None
    # MooncakeLayerwiseConnector: the address decoders call the proxy's /v1/metaserver at, when the
    # proxy binds a wildcard address (default: `host` itself).
    metaserver_host: Optional[str] = Field(None, min_length=1, max_length=253)

    @field_validator("host", "metaserver_host")
    @classmethod
    def _host(cls, value: Optional[str]) -> Optional[str]:
        # A bind address or host name only: it reaches argv, scripts and URLs.
        if value is not None and "\0" not in value and not re.fullmatch(r"[A-Za-z0-9_.:\[\]][A-Za-z0-9_.:\[\]-]*", value):
            raise ValueError("must be a host name or an IP address")
        return value

    _restart = field_validator("restart", mode="before")(_restart_shorthand)


class AutoscaleRole(_Model):
    """One role's pool under `autoscale:` (run/autoscale.py has the rule)."""

    min: StrictInt = Field(1, ge=1, le=MAX_INSTANCES)  # strict: `min: true` is not 1
    max: StrictInt = Field(4, ge=1, le=MAX_INSTANCES)
    # Requests in flight per instance the pool aims at (the proxy's count: encoder calls for encode).
    target_inflight: float = Field(2, gt=0, le=10_000)
    scale_up_after_s: float = Field(5, ge=0, le=3600)  # above the target this long: one more
    scale_down_after_s: float = Field(60, ge=0, le=86_400)  # below half of it this long: one fewer

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscaleRole":
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


class AutoscaleSpec(_Model):
    encode: Optional[AutoscaleRole] = None
    prefill: Optional[AutoscaleRole] = None
    decode: Optional[AutoscaleRole] = None
    pd: Optional[AutoscaleRole] = None

    def roles(self) -> dict[str, AutoscaleRole]:
        return {role: getattr(self, role) for role in ROLES if getattr(self, role) is not None}


class ScaleDevices(_Model):
    """`scale_devices:`: per role, the devices an instance added by `epdctl scale` or `autoscale:`
    may take (run/scaling.py), before it shares its role's last instance's."""

    encode: tuple[Device, ...] = ()
    prefill: tuple[Device, ...] = ()
    decode: tuple[Device, ...] = ()
    pd: tuple[Device, ...] = ()

    def roles(self) -> dict[str, tuple[int, ...]]:
        return {role: getattr(self, role) for role in ROLES if getattr(self, role)}


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
    platform: Literal["cuda", "xpu", "npu", "cpu"] = "cuda"  # npu: Ascend NPUs (vllm-ascend)
    vllm_command: tuple[str, ...] = Field(("vllm", "serve"), min_length=1)
    launcher: Literal["local", "slurm"] = "local"  # slurm: each instance a job step of the allocation
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
    autoscale: AutoscaleSpec = AutoscaleSpec()  # per role: the pool grows and shrinks with its load
    scale_devices: ScaleDevices = ScaleDevices()  # per role: devices for instances a scale adds
    # A cost profile from `epdctl calibrate` (engine: sim only); relative to the topology's folder.
    sim_profile: Optional[str] = Field(None, min_length=1, max_length=4096)

    _restart = field_validator("restart", mode="before")(_restart_shorthand)

    @model_validator(mode="before")
    @classmethod
    def _sim_runs_on_cpu(cls, data: Any) -> Any:
        """The sim needs no device: without a `platform:` it is cpu (an explicit one still wins)."""
        if isinstance(data, dict) and data.get("engine") == "sim" and "platform" not in data:
            return {**data, "platform": "cpu"}
        return data

    _source: Optional[Path] = PrivateAttr(None)
    _where: Optional[tuple[str, Marks]] = PrivateAttr(None)  # (file name, marks): FILE:LINE for later checks
    _sim_costs: dict[str, dict[str, Any]] = PrivateAttr(default_factory=dict)  # role -> sim flags

    @field_validator("model")
    @classmethod
    def _model_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    def error_at(self, path: tuple, message: str, prefer_key: bool = False) -> str:
        """`FILE:LINE: dotted.path: message` for a check of the loaded topology (cross_check, export)."""
        where = f"{dotted(path) or '<top>'}: {message}"
        if self._where is None:
            return where
        filename, marks = self._where
        return error_line(filename, marks.line_for(path, prefer_key=prefer_key), where)

    @property
    def source(self) -> Optional[Path]:
        return self._source

    def sim_costs(self, role: str) -> dict[str, Any]:
        """The sim flags of `sim_profile` for a role (the lowest level of a sim instance's flags)."""
        return self._sim_costs.get(role, {})

    def instances(self) -> Iterator[InstanceRef]:
        for role in ROLES:
            for index, spec in enumerate(getattr(self, role)):
                yield InstanceRef(role, index, f"{role}-{index}", spec)


# ---------------------------------------------------------------- what the settings mean


def flag_value(topology: Topology, spec: InstanceSpec, flag: str) -> Any:
    """An instance's value of a vLLM flag from its args or the defaults (None when not set)."""
    for args in (spec.args, topology.defaults.args):
        for key, value in args.items():
            if key.replace("_", "-").lstrip("-") == flag:
                return value
    return None


def tensor_parallel_size(topology: Topology, spec: InstanceSpec) -> int:
    """What vLLM will run the instance with: an explicit tensor-parallel-size, else one rank per device."""
    value = flag_value(topology, spec, "tensor-parallel-size")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return max(1, len(spec.devices))


def effective_memory_fraction(topology: Topology, spec: InstanceSpec) -> float:
    """The GPU memory fraction vLLM will really use for an instance."""
    if spec.gpu_memory_utilization is not None:
        return spec.gpu_memory_utilization
    for args in (spec.args, topology.defaults.args):
        for key, value in args.items():
            if key.replace("_", "-").lstrip("-") == "gpu-memory-utilization" and isinstance(value, (int, float)):
                return float(value)
    return DEFAULT_GPU_MEMORY_UTILIZATION
