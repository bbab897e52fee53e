"""Topology file (DESIGN §2): YAML → a validated, frozen model, with line numbers in errors."""

from __future__ import annotations

import difflib
import json
import os
import re
import stat
import unicodedata
from collections import defaultdict
from pathlib import Path
from typing import (Annotated, Any, Callable, Iterable, Iterator, Literal, Mapping, NamedTuple, Optional, Union,
                    get_args)

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, field_validator,
                      model_validator)

from epdctl.errors import EXIT_USAGE, EpdctlError
from epdctl.simflags import SIM_FLAGS, value_problem
from epdctl.yamlmarks import Marks, dotted, error_line, load_marked, one_line

ROLES = ("encode", "prefill", "decode", "pd")
NAME_PATTERN = r"^[a-z0-9][a-z0-9-]*$"
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's own default when no budget is given
DEFAULT_SIDE_CHANNEL_PORT_BASE = 5600
NIXL_CONNECTORS = ("NixlConnector",)
# EC connectors without a shared folder (vLLM 0.32+): each plans ports of its own.
EC_CPU = "ECCPUConnector"  # producers advertise a ZMQ side channel (VLLM_EC_SIDE_CHANNEL_HOST/PORT)
EC_MOONCAKE = "ECMooncakeConnector"  # consumers bind a control port per TP rank (ec_ip:ec_port + rank)
DEFAULT_EC_PORT_BASE = 5700

ArgValue = Any  # bool | int | float | str | list | dict | None (None drops the flag)

MAX_FILE_BYTES = 1024 * 1024
# Linux refuses to exec an argument or an environment string of 32 pages or more
# (MAX_ARG_STRLEN, counting its NUL), and a whole argv + environment above ARG_MAX (2 MiB with
# the usual 8 MiB stack). What epdctl sets must leave room for the inherited environment.
MAX_ARG_BYTES = 128 * 1024 - 1
MAX_EXEC_BYTES = 1024 * 1024
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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

    def router_metrics_port(self) -> int:
        return self.metrics_port or self.port + 1

    def ports(self) -> set[int]:
        """Every port the proxy process binds."""
        return {self.port, self.router_metrics_port()} if self.impl == "vllm-router" else {self.port}

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        # A bind address or host name only: it reaches argv, scripts and URLs.
        if "\0" not in value and not re.fullmatch(r"[A-Za-z0-9_.:\[\]][A-Za-z0-9_.:\[\]-]*", value):
            raise ValueError("must be a host name or an IP address")
        return value

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
    _sim_costs: dict[str, dict[str, float]] = PrivateAttr(default_factory=dict)  # role -> sim flags

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

    def sim_costs(self, role: str) -> dict[str, float]:
        """The sim flags of `sim_profile` for a role (the lowest level of a sim instance's flags)."""
        return self._sim_costs.get(role, {})

    def instances(self) -> Iterator[InstanceRef]:
        for role in ROLES:
            for index, spec in enumerate(getattr(self, role)):
                yield InstanceRef(role, index, f"{role}-{index}", spec)

    @property
    def uses_nixl(self) -> bool:
        return bool(self.prefill) and self.kv_transfer is not None and self.kv_transfer.connector in NIXL_CONNECTORS

    def ec_port_owners(self) -> list[InstanceRef]:
        """The instances that bind an EC connector port: ECCPU producers, Mooncake consumers."""
        ec = self.ec_transfer
        if ec is None or not self.encode:
            return []
        if ec.connector == EC_CPU:
            return [ref for ref in self.instances() if ref.role == "encode"]
        if ec.connector == EC_MOONCAKE:
            return [ref for ref in self.instances() if ref.role in ("prefill", "pd")]
        return []

    def ec_ports(self) -> dict[str, tuple[int, ...]]:
        """Each owner's EC ports: one side channel per ECCPU producer; one control port per TP
        rank for a Mooncake consumer (vLLM binds ec_port + rank). Handed out from
        `ec_transfer.port_base` past every other port of the topology, unless set per instance."""
        owners = self.ec_port_owners()
        if not owners:
            return {}
        assert self.ec_transfer is not None
        taken = {ref.spec.port for ref in self.instances()} | self.proxy.ports()
        taken |= set(self.side_channel_ports().values())
        for ref in owners:
            if ref.spec.ec_port:
                taken |= set(range(ref.spec.ec_port, ref.spec.ec_port + _ec_port_count(self, ref)))
        ports: dict[str, tuple[int, ...]] = {}
        candidate = self.ec_transfer.port_base
        for ref in owners:
            count = _ec_port_count(self, ref)
            if ref.spec.ec_port:
                ports[ref.name] = tuple(range(ref.spec.ec_port, ref.spec.ec_port + count))
                continue
            while any(p in taken for p in range(candidate, candidate + count)):
                candidate += 1
            ports[ref.name] = tuple(range(candidate, candidate + count))
            taken |= set(ports[ref.name])
        return ports

    def side_channel_ports(self) -> dict[str, int]:
        """The NIXL side-channel port of each P and D instance.

        Unless an instance sets its own, ports are handed out from `side_channel_port_base`,
        skipping any port already used elsewhere in the topology.
        """
        if not self.uses_nixl:
            return {}
        assert self.kv_transfer is not None
        taken = {ref.spec.port for ref in self.instances()} | self.proxy.ports()
        taken |= {ref.spec.side_channel_port for ref in self.instances() if ref.spec.side_channel_port}
        for ref in self.ec_port_owners():  # an EC port the file pins is not handed out again here
            if ref.spec.ec_port:
                taken |= set(range(ref.spec.ec_port, ref.spec.ec_port + _ec_port_count(self, ref)))
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


DeviceCount = Union[int, Callable[[str], Optional[int]], None]


def load_topology(
    path: str | os.PathLike,
    *,
    environ: Mapping[str, str] | None = None,
    device_count: DeviceCount = None,
    check_folders: bool = False,
) -> Topology:
    """Read, validate and cross-check a topology file. Raises EpdctlError (exit 2).

    `device_count` (a number, or a function of the platform) and `check_folders` check the
    topology against this machine; leave them out for one that runs elsewhere.
    """
    path = Path(path)
    text = read_topology_file(path)
    return parse_topology(text, str(path), environ=environ, device_count=device_count, source=path,
                          check_folders=check_folders)


def read_topology_file(path: Path, what: str = "topology file") -> str:
    """The file's text. Only a regular file is read: a FIFO or a device would block or never end."""
    where = one_line(str(path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise EpdctlError(f"{where}: no such file", EXIT_USAGE) from None
    except OSError as exc:
        raise EpdctlError(f"{where}: cannot read: {exc.strerror}", EXIT_USAGE) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise EpdctlError(f"{where}: is a directory, not a {what}", EXIT_USAGE)
        if not stat.S_ISREG(mode):
            raise EpdctlError(f"{where}: is not a regular file (a FIFO, socket or device?)", EXIT_USAGE)
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with handle:
        data = handle.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise EpdctlError(f"{where}: is larger than {MAX_FILE_BYTES // 1024} KiB: not a {what}", EXIT_USAGE)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise EpdctlError(error_line(str(path), line, f"cannot read: not UTF-8 text (byte 0x{data[exc.start]:02x})"), EXIT_USAGE) from None


def parse_topology(
    text: str,
    filename: str,
    *,
    environ: Mapping[str, str] | None = None,
    device_count: DeviceCount = None,
    source: Path | None = None,
    check_folders: bool = False,
) -> Topology:
    if not text.strip():
        raise EpdctlError(error_line(filename, 1, "the file is empty"), EXIT_USAGE)
    data, marks = load_marked(text, filename, environ)
    if not isinstance(data, dict):
        raise EpdctlError(error_line(filename, 1, "the topology must be a mapping of keys (name, model, ...)"), EXIT_USAGE)
    if "name" not in data:
        data["name"] = _name_from_stem((source or Path(filename)).stem)
    try:
        topology = Topology.model_validate(data)
    except ValidationError as exc:
        raise EpdctlError(_format_validation(exc, filename, marks), EXIT_USAGE, one_per_line=True) from None
    topology._where = (filename, marks)  # model_copy (sim_profile below) keeps it
    if callable(device_count):
        device_count = device_count(topology.platform)
    problems = cross_check(topology, device_count=device_count, check_folders=check_folders)
    if problems:
        lines = [topology.error_at(loc, message, prefer_key) for loc, message, prefer_key in problems]
        raise EpdctlError("\n".join(lines), EXIT_USAGE, one_per_line=True)
    if topology.sim_profile:
        topology = _with_sim_profile(topology, filename, marks, source, environ)
    topology._source = source
    return topology


def _with_sim_profile(topology: Topology, filename: str, marks: Marks, source: Path | None,
                      environ: Mapping[str, str] | None) -> Topology:
    """Resolve `sim_profile` against the topology's folder and read it (its errors name both files)."""
    from epdctl.simprofile import load_profile

    line = marks.line_for(("sim_profile",), prefer_key=True)
    raw = topology.sim_profile or ""
    if topology.engine != "sim":
        raise EpdctlError(error_line(filename, line, "sim_profile: only for engine: sim (the twin of a real "
                                     "topology is a copy with engine: sim)"), EXIT_USAGE)
    if "\0" in raw:
        raise EpdctlError(error_line(filename, line, "sim_profile: must not contain a NUL byte"), EXIT_USAGE)
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = (source.parent if source is not None else Path.cwd()) / path
    path = Path(os.path.abspath(path))
    try:
        profile = load_profile(path, environ)
    except EpdctlError as exc:
        first = exc.message.splitlines()[0]
        raise EpdctlError(error_line(filename, line, f"sim_profile: {first}"), EXIT_USAGE) from None
    # Absolute from here on: `sweep` re-reads the topology as data, from no folder.
    resolved = topology.model_copy(update={"sim_profile": str(path)})
    resolved._sim_costs = {role: profile.cost.flags(role) for role in ROLES}
    return resolved


def _name_from_stem(stem: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", stem.lower()).strip("-")
    return name or "topology"


def _format_validation(exc: ValidationError, filename: str, marks: Marks, root: type[BaseModel] = Topology) -> str:
    """One `FILE:LINE: field: message` line per error of `root.model_validate`."""
    lines = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        kind = error["type"]
        if kind == "extra_forbidden":
            message = "unknown key" + did_you_mean(str(loc[-1]), _keys_at(root, loc[:-1]))
            line = marks.line_for(loc, prefer_key=True)
        elif kind == "missing":
            message = "required but missing"
            line = marks.line_for(loc[:-1])
        else:
            message = error["msg"]
            if message.startswith("Value error, "):
                message = message[len("Value error, "):]
            if "input" in error and not isinstance(error["input"], (dict, list)):
                message += f" (got {_shortened(repr(error['input']))})"
            line = marks.line_for(loc)
        lines.append((line, error_line(filename, line, f"{dotted(loc) or '<top>'}: {message}")))
    return "\n".join(dict.fromkeys(text for _, text in sorted(lines, key=lambda entry: entry[0])))


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """` (did you mean X?)` for the choice closest to a misspelt `word`, as compose and cargo say it; else ""."""
    match = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {match[0]}?)" if match else ""


def _keys_at(root: type[BaseModel], path: tuple) -> list[str]:
    """The keys the model allows where `path` (an error's location, less the key) leads."""
    model: Optional[type[BaseModel]] = root
    for part in path:
        if model is None:
            return []
        if isinstance(part, str) and part in model.model_fields:
            model = _model_in(model.model_fields[part].annotation)
        # else a list index or a mapping's key (`fits.encode`): the items are of the same model
    return list(model.model_fields) if model is not None else []


def _model_in(annotation: Any) -> Optional[type[BaseModel]]:
    """The model a field holds, through Optional, tuple[...] and dict[...]; None for plain values."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(_model_in, get_args(annotation))), None)


def _shortened(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


Problem = tuple  # (loc, message, prefer_key_line)


def cross_check(topology: Topology, device_count: int | None = None, check_folders: bool = False) -> list[Problem]:
    """The checks that span fields. Each problem is (loc, message, point-at-key-line).

    Pure, except that `check_folders` looks at the EC folder on this machine.
    """
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
    if ec is not None and ec.connector == "ECExampleConnector" and not ec.shared_storage_path:
        problems.append((("ec_transfer",), "ECExampleConnector needs shared_storage_path", True))
    problems += _path_problems(topology)
    if check_folders and not problems and has["encode"] and ec is not None and ec.shared_storage_path:
        problem = _folder_problem(ec.shared_storage_path)
        if problem:
            problems.append((("ec_transfer", "shared_storage_path"), problem, False))
    problems += _exec_problems(topology)
    problems += _ec_connector_problems(topology)
    problems += _router_problems(topology)

    problems += _sim_flag_problems(topology)

    reserved = {"port": "the instance's port key", "model": "the top-level model key"}
    for loc, args in _args_levels(topology):
        for key in args:
            flag = key.replace("_", "-").lstrip("-")
            if flag in reserved:
                problems.append((loc + (key,), f"--{flag} is set by epdctl; use {reserved[flag]}", True))

    for index, word in enumerate(topology.vllm_command):
        if not word:
            problems.append((("vllm_command", index), "must not be empty", False))
    if topology.vllm_command[0].startswith("-"):  # `setsid -x` in `plan --format sh` would read it as an option
        problems.append((("vllm_command", 0), "must name a program, not an option", False))

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
    if topology.proxy.impl == "vllm-router" and topology.proxy.router_metrics_port() <= 65535:
        # Named even when unset (it is then port + 1): that is the key that resolves a clash.
        claim(topology.proxy.router_metrics_port(), ("proxy", "metrics_port"), "vllm-router's metrics")
    if topology.uses_nixl:
        for ref in topology.instances():
            if ref.spec.side_channel_port:
                claim(ref.spec.side_channel_port, (ref.role, ref.index, "side_channel_port"), f"{ref.name}'s side channel")
        explicit = {r.spec.side_channel_port for r in topology.instances() if r.spec.side_channel_port}
        for name, port in topology.side_channel_ports().items():
            if port > 65535:
                problems.append((("kv_transfer", "side_channel_port_base"),
                                 f"{name}'s side channel would get port {port}, past 65535: lower side_channel_port_base", False))
            elif port not in explicit:
                claim(port, ("kv_transfer", "side_channel_port_base"), f"{name}'s side channel")

    for name, ports in topology.ec_ports().items():
        ref = next(r for r in topology.instances() if r.name == name)
        loc = (ref.role, ref.index, "ec_port") if ref.spec.ec_port else ("ec_transfer", "port_base")
        for port in ports:
            if port <= 65535:
                claim(port, loc, f"{name}'s EC port")

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
                machine = f"{device_count} devices: 0..{device_count - 1}" if device_count else "it has no devices"
                problems.append((loc, f"device {device} is outside this machine ({machine})", False))
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


def _args_levels(topology: Topology) -> list[tuple[tuple, Mapping[str, Any]]]:
    """Each `args:` of the file, with where it is: the defaults', then each instance's."""
    return [(("defaults", "args"), topology.defaults.args)] + [
        ((ref.role, ref.index, "args"), ref.spec.args) for ref in topology.instances()]


def _sim_flag_problems(topology: Topology) -> list[Problem]:
    """The sim's own `sim-*` flags against its table: at `up` the sim would ignore a misspelt one
    (a note in its log) and stop on a bad value with a usage text."""
    if topology.engine != "sim":
        return []
    from epdctl.plan import normalize_flag  # plan imports this module

    problems: list[Problem] = []
    for loc, args in _args_levels(topology):
        for key, value in args.items():
            flag, value = normalize_flag(key, value)
            if not flag.startswith("sim-"):
                continue  # a vLLM flag: the sim accepts it and ignores it, as the README says
            if flag not in SIM_FLAGS:
                problems.append((loc + (key,), f"the sim has no flag --{flag}{did_you_mean(flag, SIM_FLAGS)}", True))
            elif problem := value_problem(SIM_FLAGS[flag], value):
                problems.append((loc + (key,), problem, False))
    return problems


def _path_problems(topology: Topology) -> list[Problem]:
    """Folders must be absolute and normal: `down` deletes the EC folder it created, and
    `/data/x/missing/../important` names `important` once `missing` exists."""
    paths = {("ec_transfer", "shared_storage_path"): topology.ec_transfer and topology.ec_transfer.shared_storage_path,
             ("media", "allowed_local_path"): topology.media.allowed_local_path}
    kv_path = topology.kv_transfer.extra_config.get("shared_storage_path") if topology.kv_transfer else None
    if isinstance(kv_path, str):  # a storage KV connector's folder, which `down` deletes too
        paths[("kv_transfer", "extra_config", "shared_storage_path")] = kv_path
    problems: list[Problem] = []
    for loc, path in paths.items():
        if not path:
            continue
        if "\0" in path:
            problems.append((loc, "contains a NUL byte", False))
        elif not os.path.isabs(path):
            problems.append((loc, "must be an absolute path", False))
        elif "//" in path or os.path.normpath(path) != (path.rstrip("/") or "/"):
            normal = "/" + os.path.normpath(path).lstrip("/")
            problems.append((loc, f"is not in normal form (no '.', '..' or '//'): use the normalised path {normal!r}", False))
    return problems


def _folder_problem(path: str) -> Optional[str]:
    """Why `up` could not use (or create) the EC folder, or None.

    Without this, `up` succeeds and every request with an image then fails with a 502.
    """
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return _creation_problem(path)
    except OSError as exc:
        return f"cannot use {path}: {exc.strerror}"
    if not stat.S_ISDIR(mode):
        return f"{path} exists and is not a folder"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"the folder {path} is not writable by you"
    return None


def _creation_problem(path: str) -> Optional[str]:
    """Why `up` could not create the missing folder `path`, judged by its nearest existing ancestor."""
    ancestor = os.path.dirname(path.rstrip("/"))
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        return f"cannot be created: {ancestor} is not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot be created: {ancestor} is not writable by you"
    return None


def _exec_problems(topology: Topology) -> list[Problem]:
    """What `exec` would refuse: NUL bytes, unencodable text, env names, and sizes past Linux's limits."""
    shared = list(_shared_words(topology))
    problems = [problem for loc, word in shared if (problem := _word_problem(loc, word))]
    for ref in topology.instances():
        own = list(_setting_words((ref.role, ref.index), ref.spec.args, ref.spec.env))
        problems += [problem for loc, word in own if (problem := _word_problem(loc, word))]
        problems += _env_name_problems((ref.role, ref.index, "env"), ref.spec.env)
        total = sum(_exec_size(word) for _, word in shared + own)
        if total > MAX_EXEC_BYTES:
            problems.append(((ref.role, ref.index), f"its command line and environment would take {total} bytes, "
                                                    f"more than the {MAX_EXEC_BYTES // 1024} KiB epdctl allows", True))
    return problems + _env_name_problems(("defaults", "env"), topology.defaults.env)


def _shared_words(topology: Topology) -> Iterator[tuple[tuple, str]]:
    """The words from the file that several processes get, with where they come from."""
    yield ("model",), topology.model
    for index, word in enumerate(topology.vllm_command):
        yield ("vllm_command", index), word
    yield ("proxy", "host"), topology.proxy.host
    for key in ("ec_transfer", "kv_transfer"):
        connector = getattr(topology, key)
        if connector is not None:  # its JSON argument, a little longer once plan adds the role
            yield (key,), json.dumps(connector.model_dump()) + " " * 64
    yield from _setting_words(("defaults",), topology.defaults.args, topology.defaults.env)


def _setting_words(loc: tuple, args: Mapping[str, Any], env: Mapping[str, str]) -> Iterator[tuple[tuple, str]]:
    """The argv words `args` become (as plan.flags_to_argv renders them) and the `NAME=value` strings of `env`."""
    for key, value in args.items():
        yield loc + ("args", key), f"--no-{key}" if value is False else f"--{key}"
        values = value if isinstance(value, (list, tuple)) else [] if isinstance(value, bool) or value is None else [value]
        for item in values:
            yield loc + ("args", key), json.dumps(item, separators=(",", ":")) if isinstance(item, (dict, list)) else str(item)
    for name, value in env.items():
        yield loc + ("env", name), f"{name}={value}"


def _word_problem(loc: tuple, word: str) -> Optional[Problem]:
    if "\0" in word:
        return loc, "contains a NUL byte, which no process argument or environment can hold", False
    control = _control_character(word, names=loc[0] in ("model", "vllm_command"))
    if control:
        return loc, f"contains {control}, a control character: a terminal would act on it where epdctl shows it", False
    try:
        os.fsencode(word)
    except UnicodeEncodeError as exc:
        return loc, f"holds {exc.object[exc.start]!r}, which cannot be passed to a process", False
    size = _exec_size(word)
    if size > MAX_ARG_BYTES:
        return loc, f"is {size} bytes as one argument; Linux takes at most {MAX_ARG_BYTES}", False
    return None


def _control_character(word: str, names: bool) -> Optional[str]:
    """The first character that `plan` or `status` would hand a terminal to act on (ESC, BEL, a carriage
    return hiding what precedes it), as U+XXXX. Tabs and newlines are text in an argument (an inline chat
    template); a name (the model, the command) is one line of printable text."""
    for char in word:
        if not char.isprintable() and (names or unicodedata.category(char) == "Cc" and char not in "\t\n"):
            return f"U+{ord(char):04X}"
    return None


def _exec_size(word: str) -> int:
    """What the kernel copies, NUL included (an upper bound where the text is not encodable)."""
    return len(word.encode("utf-8", "surrogatepass")) + 1


def _env_name_problems(loc: tuple, env: Mapping[str, str]) -> list[Problem]:
    return [(loc + (name,), "is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)", True)
            for name in env if not ENV_NAME.fullmatch(name)]


def _flag_value(topology: Topology, spec: InstanceSpec, flag: str) -> Any:
    """An instance's value of a vLLM flag from its args or the defaults (None when not set)."""
    for args in (spec.args, topology.defaults.args):
        for key, value in args.items():
            if key.replace("_", "-").lstrip("-") == flag:
                return value
    return None


def tensor_parallel_size(topology: Topology, spec: InstanceSpec) -> int:
    """What vLLM will run the instance with: an explicit tensor-parallel-size, else one rank per device."""
    value = _flag_value(topology, spec, "tensor-parallel-size")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return max(1, len(spec.devices))


def _ec_port_count(topology: Topology, ref: InstanceRef) -> int:
    if topology.ec_transfer is not None and topology.ec_transfer.connector == EC_MOONCAKE:
        return min(tensor_parallel_size(topology, ref.spec), MAX_EC_PORTS_PER_INSTANCE)
    return 1


# Bounds on what these connectors read from extra_config (vLLM 0.32 reads them with int()/float()
# and no upper limit): far past any real value, so a bound only ever catches a typo or a hostile file.
MAX_EC_BYTES = 1 << 40  # 1 TiB of CPU region or registered buffer
MAX_EC_SECONDS = 86400.0
MAX_EC_COUNT = 1 << 20
MAX_EC_PORTS_PER_INSTANCE = 64
# extra_config numbers per connector: key -> (what it counts, upper bound).
EC_NUMBERS: dict[str, dict[str, tuple[str, float]]] = {
    EC_CPU: {"ec_cpu_bytes": ("bytes", MAX_EC_BYTES), "consumer_ack_timeout_s": ("seconds", MAX_EC_SECONDS)},
    EC_MOONCAKE: {"control_timeout_s": ("seconds", MAX_EC_SECONDS), "push_wait_timeout_s": ("seconds", MAX_EC_SECONDS),
                  "store_max_pending_items": ("items", MAX_EC_COUNT),
                  "store_max_pending_bytes": ("bytes", MAX_EC_BYTES),
                  "store_read_buffer_bytes": ("bytes", MAX_EC_BYTES)},
}
# The environment epdctl plans for these connectors; a file that sets it would defeat the port plan.
EC_PLANNED_ENV = ("VLLM_EC_SIDE_CHANNEL_HOST", "VLLM_EC_SIDE_CHANNEL_PORT")
MOONCAKE_PROTOCOL = re.compile(r"[a-z][a-z0-9_]{0,31}")
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes"), ("false", "0", "no")


def _whole_amount(value: Any, bound: float) -> bool:
    """vLLM reads sizes and counts with int(): a whole number (or its digits as a string), 1..bound."""
    if isinstance(value, bool):
        return False
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().isdigit() and len(value) <= 20:
        value = int(value)
    return isinstance(value, int) and 0 < value <= bound


def _seconds(value: Any, bound: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= bound


def _flag_word(value: Any) -> bool | None:
    """A boolean as vLLM's ECCPUConnector parses ec_enable_nixl; None when it is neither."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    return None


def _nonzero_int(text: str) -> bool:
    try:
        return int(text) != 0
    except ValueError:
        return False


# vllm-router's --kv-connector names for the KV connectors epdctl can run it with. It knows
# mooncake and moriio too, but Mooncake needs a bootstrap port per prefill instance (it waits on
# 8998 otherwise) and MoRI-IO a service-discovery address, neither of which epdctl plans yet.
ROUTER_KV_CONNECTORS = {"NixlConnector": "nixl"}
# Settings of epdctl's proxy that vllm-router has no counterpart for: refused, not silently dropped.
EPDCTL_PROXY_ONLY = ("encode_timeout_s", "max_media_items", "workers")


def router_metrics_host(host: str) -> Optional[str]:
    """The address vllm-router's metrics can bind for `host` (an IPv4 literal, or localhost), else None."""
    import ipaddress

    if host == "localhost":
        return "127.0.0.1"
    try:
        return host if ipaddress.ip_address(host).version == 4 else None
    except ValueError:
        return None


def _router_problems(topology: Topology) -> list[Problem]:
    proxy = topology.proxy
    if proxy.impl != "vllm-router":
        if proxy.metrics_port is not None:
            return [(("proxy", "metrics_port"), "is for impl: vllm-router (epdctl's proxy serves /metrics on its port)", True)]
        return []
    problems: list[Problem] = []
    if topology.encode:
        problems.append((("proxy", "impl"), "vllm-router has no encoder stage: a topology with encode instances "
                                            "needs impl: epdctl", False))
    kv = topology.kv_transfer
    if topology.prefill and kv is not None and kv.connector not in ROUTER_KV_CONNECTORS:
        problems.append((("proxy", "impl"), f"epdctl runs vllm-router with {', '.join(ROUTER_KV_CONNECTORS)} only "
                                            f"(kv_transfer.connector is {kv.connector}): use impl: epdctl", False))
    for key in EPDCTL_PROXY_ONLY:
        # By value, not by "was it written": sweep writes every field of the base file out again.
        if getattr(proxy, key) != ProxySpec.model_fields[key].default:
            problems.append((("proxy", key), "is a setting of epdctl's proxy; vllm-router has none like it", True))
    if router_metrics_host(proxy.host) is None:
        # It parses --prometheus-host as an IP address and binds every interface when it cannot.
        problems.append((("proxy", "host"), "vllm-router needs an IPv4 address here (or localhost): given a "
                                            "name, it serves its metrics on every interface", False))
    if proxy.metrics_port is None and proxy.port == 65535:
        problems.append((("proxy", "port"), "vllm-router's metrics would get port 65536: set proxy.metrics_port", True))
    return problems


def _ec_connector_problems(topology: Topology) -> list[Problem]:
    """What ECCPUConnector and ECMooncakeConnector refuse at start-up (vLLM 0.32), or would do
    silently wrong at request time, caught by validate."""
    owners = {ref.name for ref in topology.ec_port_owners()}
    problems: list[Problem] = [
        ((ref.role, ref.index, "ec_port"), ("only an ECCPUConnector encoder or an ECMooncakeConnector consumer "
                                            "(pd, prefill) binds an EC port"), True)
        for ref in topology.instances() if ref.spec.ec_port and ref.name not in owners]
    ec = topology.ec_transfer
    if ec is None or ec.connector not in (EC_CPU, EC_MOONCAKE):
        return problems
    extra = ec.extra_config
    for key, (unit, bound) in EC_NUMBERS[ec.connector].items():
        if key not in extra:
            continue
        ok = _seconds(extra[key], bound) if unit == "seconds" else _whole_amount(extra[key], bound)
        if not ok:
            kind = "a number of seconds" if unit == "seconds" else f"a whole number of {unit}"
            problems.append((("ec_transfer", "extra_config", key),
                             f"must be {kind} above 0 and at most {bound:.0f} (got {extra[key]!r})"[:240], False))
    if ec.connector == EC_CPU:
        problems += _ec_cpu_problems(topology, extra)
    else:
        problems += _ec_mooncake_problems(topology, extra)
    for name, ports in topology.ec_ports().items():
        if ports[-1] > 65535:
            ref = next(r for r in topology.instances() if r.name == name)
            loc = (ref.role, ref.index, "ec_port") if ref.spec.ec_port else ("ec_transfer", "port_base")
            problems.append((loc, f"{name}'s EC ports would run to {ports[-1]}, past 65535", False))
    return problems


def _ec_env_problems(topology: Topology, runner_v2_roles: tuple[str, ...], planned: tuple[str, ...] = ()) -> list[Problem]:
    """Env that would override what epdctl plans: the side channel, and the V2 runner the connector needs."""
    problems: list[Problem] = []
    places = [(("defaults", "env"), topology.defaults.env, runner_v2_roles)]
    places += [((ref.role, ref.index, "env"), ref.spec.env, (ref.role,)) for ref in topology.instances()]
    for loc, env, roles in places:
        for name in planned:
            if name in env:
                problems.append((loc + (name,), (f"{name} is planned by epdctl for {topology.ec_transfer.connector} "
                                                 "(set ec_transfer.port_base or an encoder's ec_port instead)"), True))
        runner = env.get("VLLM_USE_V2_MODEL_RUNNER")
        # vLLM reads it as bool(int(value)): "true" would not even parse.
        if runner is not None and set(roles) & set(runner_v2_roles) and not _nonzero_int(runner):
            problems.append((loc + ("VLLM_USE_V2_MODEL_RUNNER",), (f"{topology.ec_transfer.connector} here needs "
                                                                   "vLLM's V2 model runner (VLLM_USE_V2_MODEL_RUNNER=1)"),
                             True))
    return problems


def _ec_cpu_problems(topology: Topology, extra: Mapping[str, Any]) -> list[Problem]:
    problems: list[Problem] = []
    if "ec_cpu_bytes" not in extra:
        problems.append((("ec_transfer", "extra_config") if extra else ("ec_transfer",),
                         "ECCPUConnector needs extra_config.ec_cpu_bytes (the size of its CPU region, bytes)", True))
    nixl = _flag_word(extra.get("ec_enable_nixl", False))
    if nixl is None:
        problems.append((("ec_transfer", "extra_config", "ec_enable_nixl"), "must be true or false", False))
    elif not nixl and topology.encode:
        # Without NIXL each instance's region is its own: a consumer never sees the encoders' outputs
        # and encodes every image itself, answering correctly while nothing is disaggregated.
        problems.append((("ec_transfer", "extra_config"), ("ECCPUConnector moves encoder outputs between instances "
                                                           "only over NIXL: set ec_enable_nixl: true (without it every "
                                                           "consumer silently encodes its images itself)"), True))
    return problems + _ec_env_problems(topology, ("encode", "prefill", "pd"), EC_PLANNED_ENV)


def _ec_mooncake_problems(topology: Topology, extra: Mapping[str, Any]) -> list[Problem]:
    ec = topology.ec_transfer
    assert ec is not None
    problems: list[Problem] = []
    size = ec.config.get("ec_buffer_size")
    if size is not None and not _whole_amount(size, MAX_EC_BYTES):
        problems.append((("ec_transfer", "config", "ec_buffer_size"),
                         f"must be a number of bytes above 0 and at most {MAX_EC_BYTES}", False))
    for key in ("ec_ip", "ec_port"):
        if key in ec.config:
            problems.append((("ec_transfer", "config", key),
                             (f"{key} is planned per consumer by epdctl (ec_transfer.port_base, or an instance's "
                              "ec_port)"), True))
    protocol = extra.get("mooncake_protocol", "rdma")
    if not (isinstance(protocol, str) and MOONCAKE_PROTOCOL.fullmatch(protocol)):
        problems.append((("ec_transfer", "extra_config", "mooncake_protocol"),
                         "must be a Mooncake transfer protocol name such as rdma or tcp", False))
    shared = extra.get("cross_encoder_cache", False)
    if not isinstance(shared, bool):
        problems.append((("ec_transfer", "extra_config", "cross_encoder_cache"), "must be true or false", False))
    for ref in topology.instances():
        loc = (ref.role, ref.index)
        if ref.role in ("prefill", "pd"):
            # One control address per consumer: the proxy names it to the encoders and sends the
            # request to that instance; a data-parallel consumer would need a replica pinned too.
            dp = _flag_value(topology, ref.spec, "data-parallel-size")
            if isinstance(dp, int) and dp > 1:
                problems.append((loc, (f"ECMooncakeConnector consumers run with data-parallel-size 1 under epdctl "
                                       f"(got {dp}): run replicas as separate instances"), True))
            if tensor_parallel_size(topology, ref.spec) > MAX_EC_PORTS_PER_INSTANCE:
                problems.append((loc, ("ECMooncakeConnector binds one control port per tensor-parallel rank: at "
                                       f"most {MAX_EC_PORTS_PER_INSTANCE}"), True))
        if ref.role != "encode":
            continue
        # vLLM: "ECMooncakeConnector producers require tensor_parallel_size=1" (and no PP, no DP).
        if tensor_parallel_size(topology, ref.spec) > 1:
            problems.append((loc, ("ECMooncakeConnector producers need tensor_parallel_size 1: give the "
                                   "encoder one device (or tensor-parallel-size: 1)"), True))
        for flag in ("pipeline-parallel-size", "data-parallel-size"):
            value = _flag_value(topology, ref.spec, flag)
            if isinstance(value, int) and value > 1:
                problems.append((loc, f"ECMooncakeConnector producers do not support {flag} {value}", True))
        if shared is True:
            if _flag_value(topology, ref.spec, "mm-processor-cache-gb") == 0:
                problems.append((loc, "cross_encoder_cache needs mm-processor-cache-gb above 0", True))
            if _flag_value(topology, ref.spec, "enable-lora") is True:
                problems.append((loc, "cross_encoder_cache does not support LoRA (enable-lora)", True))
    if shared is True:
        problems += _ec_env_problems(topology, ("encode",))
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
