"""Topology → Plan: every process's argv, env and ports (docs/design.md, Data flow). Pure: no I/O.

Every port epdctl hands out is decided here (side channels, EC ports, vllm-router's metrics port,
sweep's instance ports); what the connectors need comes from connectors.py."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional

from epdctl.config.schema import (InstanceRef, ProxySpec, RestartSpec, Topology, effective_memory_fraction,
                                  tensor_parallel_size)
from epdctl.connectors import (LOOPBACK, ROUTER_KV_CONNECTORS, ec_config, ec_connector_env, ec_consumer_zmq_addrs,
                               ec_port_count, ec_port_owners, ec_storage_path, is_layerwise, kv_config, kv_port_count,
                               kv_storage_path, proxy_ec_connector, proxy_ec_storage_path, proxy_kv_connector,
                               proxy_metaserver_host, uses_mooncake_kv, uses_nixl)
from epdctl.errors import EXIT_USAGE, EpdctlError

if TYPE_CHECKING:  # the allocation is gathered by run/slurm.py before planning; the plan only reads it
    from epdctl.run.slurm import Allocation

ENCODER_MIN_BATCHED_TOKENS = 114688  # the seeds' value: a whole multi-image prompt in one step
# Ascend NPUs: vllm-ascend (torch_npu) reads ASCEND_RT_VISIBLE_DEVICES, nothing of CUDA's.
DEVICE_VARIABLE = {"cuda": "CUDA_VISIBLE_DEVICES", "xpu": "ZE_AFFINITY_MASK", "npu": "ASCEND_RT_VISIBLE_DEVICES"}


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    host: str
    port: int
    role: str = "proxy"
    devices: tuple[int, ...] = ()
    side_channel_port: Optional[int] = None
    ec_ports: tuple[int, ...] = ()  # its EC connector's ports (ECCPU side channel, Mooncake control)
    metrics_port: Optional[int] = None  # a separate metrics listener (vllm-router's)
    restart: RestartSpec = RestartSpec()
    # Its --ec-transfer-config as finally planned (an instance's `args:` may replace the role's):
    # readers take them from here, not back out of argv. Not in to_json: `plan --json` is unchanged.
    ec_connector: Optional[str] = None
    ec_storage_path: Optional[str] = None
    node: Optional[str] = None  # launcher slurm: the node its job step runs on (None: where `up` runs)
    kv_ports: tuple[int, ...] = ()  # vllm-ascend Mooncake: kv_port and one more per rank (in the JSON, not env)
    kv_connector: Optional[str] = None  # its --kv-transfer-config's kv_connector as planned (smoke reads it)

    @property
    def url(self) -> str:
        # An IPv6 address goes in brackets in a URL (RFC 3986): http://[::1]:10001.
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"http://{host}:{self.port}"

    def ports(self) -> tuple[int, ...]:
        return ((self.port,) + ((self.side_channel_port,) if self.side_channel_port else ()) + self.ec_ports
                + self.kv_ports + ((self.metrics_port,) if self.metrics_port else ()))

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name}
        if self.role != "proxy":
            data["role"] = self.role
            data["devices"] = list(self.devices)
        data.update(argv=list(self.argv), env=dict(self.env), host=self.host, port=self.port, url=self.url)
        if self.ec_ports:
            data["ec_ports"] = list(self.ec_ports)
        if self.metrics_port:
            data["metrics_port"] = self.metrics_port
        if self.node:
            data["node"] = self.node
        return data


@dataclass(frozen=True)
class Plan:
    name: str
    engine: str
    platform: str
    instances: tuple[ProcessSpec, ...]
    proxy: ProcessSpec
    health_timeout_s: float
    health_interval_s: float
    ec_storage_path: Optional[str] = None
    kv_storage_path: Optional[str] = None  # a storage KV connector's folder (ExampleConnector)
    log_max_bytes: int = 100 * 1024 * 1024
    log_keep: int = 3
    proxy_impl: str = "epdctl"  # or "vllm-router" (proxy.impl)
    launcher: str = "local"  # or "slurm": instances are job steps of `slurm_job`
    slurm_job: Optional[str] = None

    @property
    def storage_paths(self) -> tuple[str, ...]:
        """Folders `up` creates when missing and `down` removes again (only those it created)."""
        return tuple(p for p in (self.ec_storage_path, self.kv_storage_path) if p)

    @property
    def processes(self) -> tuple[ProcessSpec, ...]:
        return self.instances + (self.proxy,)

    def to_json(self) -> dict[str, Any]:
        data = {
            "name": self.name,
            "engine": self.engine,
            "platform": self.platform,
            "instances": [spec.to_json() for spec in self.instances],
            "proxy": self.proxy.to_json(),
        }
        if self.launcher != "local":
            data["launcher"] = {"kind": self.launcher, "job": self.slurm_job}
        return data


# ---------------------------------------------------------------- flags


def normalize_flag(key: str, value: Any) -> tuple[str, Any]:
    """`max_num_seqs` and `--max-num-seqs` are one flag; `no-x: true` is `x: false`."""
    key = key.lstrip("-").replace("_", "-")
    if key.startswith("no-") and isinstance(value, bool):
        return key[3:], not value
    return key, value


def merge_flags(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Later layers replace earlier ones flag by flag (docs/design.md, Topology file: precedence)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            key, value = normalize_flag(key, value)
            merged[key] = value
    return merged


def flags_to_argv(flags: Mapping[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in flags.items():
        if value is None:  # `key: null` at a higher level removes a lower level's flag
            continue
        if value is True:
            argv.append(f"--{key}")
        elif value is False:
            argv.append(f"--no-{key}")
        elif isinstance(value, dict):
            argv += [f"--{key}", compact_json(value)]
        elif isinstance(value, (list, tuple)):
            argv += [f"--{key}", *(compact_json(v) if isinstance(v, (dict, list)) else str(v) for v in value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


# ---------------------------------------------------------------- the plan


def engine_prefix(topology: Topology, python: str) -> tuple[list[str], bool]:
    """The argv prefix and whether the model is positional (`vllm serve MODEL`)."""
    if topology.engine == "sim":
        return [python, "-m", "epdctl.sim"], True
    command = list(topology.vllm_command)
    # `python -m vllm.entrypoints.openai.api_server` ignores a positional model, so only a
    # `... serve` command gets one; every other entry point gets `--model`.
    return command, command[-1] == "serve"


def role_flags(topology: Topology, role: str, devices: tuple[int, ...], ec_ports: tuple[int, ...] = (),
               host: str = LOOPBACK, kv_ports: tuple[int, ...] = ()) -> dict[str, Any]:
    """The flags a role needs to work (precedence level 2)."""
    flags: dict[str, Any] = {"enable-request-id-headers": True}
    if len(devices) > 1:
        flags["tensor-parallel-size"] = len(devices)
    if topology.media.allowed_local_path and role in ("encode", "prefill", "pd"):
        flags["allowed-local-media-path"] = topology.media.allowed_local_path
    has_encoders = bool(topology.encode)
    if role == "encode":
        defaults = merge_flags(topology.defaults.args)
        batched = defaults.get("max-num-batched-tokens")
        flags["enforce-eager"] = True
        flags["enable-prefix-caching"] = False
        flags["max-num-batched-tokens"] = max(ENCODER_MIN_BATCHED_TOKENS, batched if isinstance(batched, int) else 0)
        flags["ec-transfer-config"] = ec_config(topology, "ec_producer")
    elif role in ("pd", "prefill") and has_encoders:
        flags["ec-transfer-config"] = ec_config(topology, "ec_consumer", ec_ports, host)
    if role == "prefill":
        flags["kv-transfer-config"] = kv_config(topology, "kv_producer", kv_ports)
    elif role == "decode":
        flags["kv-transfer-config"] = kv_config(topology, "kv_consumer", kv_ports)
    return flags


def _json_flag(flags: Mapping[str, Any], flag: str) -> dict[str, Any]:
    """A JSON flag's value as a mapping: the role's dict, or what an `args:` level gave (a dict, or
    JSON text); {} when it is neither."""
    value = flags.get(flag)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> Optional[str]:
    return value if isinstance(value, str) else None


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def place(topology: Topology, allocation: "Allocation") -> dict[str, str]:
    """Each instance's node: its own `node:`, else the allocation's node with the fewest instances
    so far (in the file's order, encoders first, so they spread before the rest). A placement
    that shares a device of one node beyond its memory budget is refused."""
    placed: dict[str, str] = {}
    load = {node: 0 for node in allocation.nodes}
    for ref in topology.instances():
        if ref.spec.node:
            if ref.spec.node not in load:
                raise EpdctlError(topology.error_at((ref.role, ref.index, "node"),
                                                    f"{ref.spec.node!r} is not a node of the allocation "
                                                    f"{allocation.job_id} ({', '.join(allocation.nodes)})"), EXIT_USAGE)
            placed[ref.name] = ref.spec.node
            load[ref.spec.node] += 1
    for ref in topology.instances():
        if ref.name not in placed:
            node = min(allocation.nodes, key=lambda n: load[n])
            placed[ref.name] = node
            load[node] += 1
    if topology.platform != "cpu":
        _check_placed_budget(topology, placed)
    return placed


def _check_placed_budget(topology: Topology, placed: Mapping[str, str]) -> None:
    budget: dict[tuple[str, int], list[tuple[Any, float]]] = {}
    for ref in topology.instances():
        for device in set(ref.spec.devices):
            budget.setdefault((placed[ref.name], device), []).append((ref, effective_memory_fraction(topology, ref.spec)))
    for (node, device), users in sorted(budget.items(), key=lambda item: item[0]):
        total = sum(fraction for _, fraction in users)
        if len(users) > 1 and total > 1.0 + 1e-9:
            ref = users[-1][0]
            detail = ", ".join(f"{r.name} {fraction:g}" for r, fraction in users)
            raise EpdctlError(topology.error_at((ref.role, ref.index, "devices"),
                                                f"placed on node {node}, device {device} is shared with a memory "
                                                f"budget of {total:g} > 1.0 ({detail}): give it a node: of its own"),
                              EXIT_USAGE)


def build_plan(topology: Topology, python: str = "python", router: str = "vllm-router",
               allocation: Optional["Allocation"] = None) -> Plan:
    """The processes `up` will run, in start order: instances, then the proxy.

    `python` runs epdctl's own proxy; `router` is the vllm-router command (proxy.impl vllm-router).
    Under `launcher: slurm`, `allocation` (run/slurm.py's discover) places each instance on a node;
    its URLs, side channels and EC addresses are then that node's address, never loopback."""
    slurm = topology.launcher == "slurm"
    if slurm and allocation is None:
        raise EpdctlError("launcher slurm: the plan needs the allocation's nodes: run it inside sbatch or salloc",
                          EXIT_USAGE)
    nodes = place(topology, allocation) if slurm and allocation is not None else {}
    prefix, positional_model = engine_prefix(topology, python)
    side_channels = side_channel_ports(topology)
    all_ec_ports = ec_ports(topology)
    all_kv_ports = kv_ports(topology)
    device_variable = DEVICE_VARIABLE.get(topology.platform)
    instances = []
    for ref in topology.instances():
        spec = ref.spec
        node = nodes.get(ref.name)
        host = allocation.address(node) if node and allocation is not None else LOOPBACK
        instance_flags: dict[str, Any] = {}
        if node:
            instance_flags["host"] = host  # reachable from the proxy and the other nodes
        if spec.gpu_memory_utilization is not None:
            instance_flags["gpu-memory-utilization"] = spec.gpu_memory_utilization
        instance_flags.update(spec.args)
        # A sim profile's costs are the lowest level: any `args:` still overrides them.
        instance_ec_ports = all_ec_ports.get(ref.name, ())
        instance_kv_ports = all_kv_ports.get(ref.name, ())
        flags = merge_flags(topology.sim_costs(ref.role), topology.defaults.args,
                            role_flags(topology, ref.role, spec.devices, instance_ec_ports, host, instance_kv_ports),
                            instance_flags)
        model_argv = [topology.model] if positional_model else ["--model", topology.model]
        argv = prefix + model_argv + ["--port", str(spec.port)] + flags_to_argv(flags)
        ec = _json_flag(flags, "ec-transfer-config")
        kv = _json_flag(flags, "kv-transfer-config")
        ec_extra = ec.get("ec_connector_extra_config")

        role_env: dict[str, str] = {}
        if device_variable and spec.devices:
            role_env[device_variable] = ",".join(str(d) for d in spec.devices)
        side_channel = side_channels.get(ref.name)
        if side_channel:
            role_env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(side_channel)
            role_env["UCX_NET_DEVICES"] = "all"
            if node:  # vLLM's default is localhost: a decoder on another node could not reach it
                role_env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = host
        role_env.update(ec_connector_env(topology, ref.role, instance_ec_ports, host))
        env = {**topology.defaults.env, **role_env, **spec.env}
        instances.append(
            ProcessSpec(
                name=ref.name, role=ref.role, devices=spec.devices, argv=tuple(argv), env=env,
                host=host, port=spec.port, side_channel_port=side_channel, ec_ports=instance_ec_ports, node=node,
                restart=spec.restart.over(topology.restart) if spec.restart else topology.restart,
                ec_connector=_text(ec.get("ec_connector")),
                ec_storage_path=_text(ec_extra.get("shared_storage_path")) if isinstance(ec_extra, dict) else None,
                kv_ports=instance_kv_ports, kv_connector=_text(kv.get("kv_connector")),
            )
        )
    instances_t = tuple(instances)
    # Under slurm the proxy runs where `up` runs; a loopback host there would serve no other node,
    # so it listens on every address and is known by the one the nodes reach this host on.
    proxy_host = topology.proxy.host
    proxy_bind = proxy_host
    if slurm and allocation is not None and proxy_host in LOCAL_HOSTS:
        proxy_host, proxy_bind = allocation.here, "0.0.0.0"
    return Plan(
        name=topology.name,
        engine=topology.engine,
        platform=topology.platform,
        instances=instances_t,
        proxy=ProcessSpec(
            # vllm-router renames itself with setproctitle, which by default writes over its
            # environment: SPT_NOENV keeps EPDCTL_RUN readable, so `down` finds it with its state gone.
            name="proxy", env={"SPT_NOENV": "1"} if topology.proxy.impl == "vllm-router" else {},
            argv=tuple(router_argv(topology, instances_t, router) if topology.proxy.impl == "vllm-router"
                       else proxy_argv(topology, instances_t, python, proxy_bind,
                                       proxy_host if proxy_bind != proxy_host else None)),
            host=proxy_host, port=topology.proxy.port,
            metrics_port=router_metrics_port(topology.proxy) if topology.proxy.impl == "vllm-router" else None,
            restart=topology.proxy.restart.over(topology.restart) if topology.proxy.restart else topology.restart,
        ),
        health_timeout_s=topology.health.timeout_s,
        health_interval_s=topology.health.interval_s,
        ec_storage_path=ec_storage_path(topology),
        kv_storage_path=kv_storage_path(topology),
        log_max_bytes=int(topology.logs.max_mb * 1024 * 1024),
        log_keep=topology.logs.keep,
        proxy_impl=topology.proxy.impl,
        launcher=topology.launcher,
        slurm_job=allocation.job_id if slurm and allocation is not None else None,
    )


ROUTER_POLICY = {"round-robin": "round_robin", "least-loaded": "power_of_two"}
# vllm-router takes whole seconds as a 64-bit integer; longer than this is "never" anyway.
ROUTER_MAX_SECONDS = 10**9


def _whole_seconds(value: float) -> str:
    return str(math.ceil(min(value, ROUTER_MAX_SECONDS)))  # inf included


def router_argv(topology: Topology, instances: tuple[ProcessSpec, ...], router: str) -> list[str]:
    """vllm-router (0.1.x) in the proxy's place: P+D with its KV hand-off, or PD instances as workers."""
    proxy = topology.proxy
    argv = [router, "--host", proxy.host, "--port", str(proxy.port)]
    if topology.prefill:
        kv = topology.kv_transfer
        assert kv is not None  # validated: P+D has a KV connector vllm-router knows
        argv += ["--vllm-pd-disaggregation", "--kv-connector", ROUTER_KV_CONNECTORS[kv.connector]]
        for spec in instances:
            if spec.role == "prefill":
                argv += ["--prefill", spec.url]
        for spec in instances:
            if spec.role == "decode":
                argv += ["--decode", spec.url]
    else:
        argv += ["--worker-urls", *(spec.url for spec in instances if spec.role == "pd")]
    argv += [
        # Its nearest to least-loaded: the less loaded of two picked at random.
        "--policy", ROUTER_POLICY[proxy.policy],
        "--max-payload-size", str(int(proxy.max_body_mb * 1024 * 1024)),
        # One limit for a whole request (epdctl's proxy has one per stage).
        "--request-timeout-secs", _whole_seconds(max(proxy.prefill_timeout_s, proxy.decode_timeout_s)),
        # It does not listen until every worker answers /health: as long as `up` waits.
        "--worker-startup-timeout-secs", _whole_seconds(topology.health.timeout_s),
        "--prometheus-host", router_metrics_host(proxy.host) or proxy.host,
        "--prometheus-port", str(router_metrics_port(proxy)),
        "--log-level", "info",
    ]
    return argv


def proxy_argv(topology: Topology, instances: tuple[ProcessSpec, ...], python: str,
               bind: Optional[str] = None, callback_host: Optional[str] = None) -> list[str]:
    """epdctl's proxy. `callback_host`: the address the nodes reach a proxy bound to a wildcard at
    (launcher slurm), which the layerwise flow names to decoders for its metaserver."""
    def urls(*roles: str) -> str:
        return ",".join(spec.url for spec in instances if spec.role in roles) or "disable"

    proxy = topology.proxy
    argv = [
        python, "-m", "epdctl.proxy",
        "--host", bind or proxy.host, "--port", str(proxy.port),
        "--encode-servers-urls", urls("encode"),
        "--prefill-servers-urls", urls("prefill"),
        "--decode-servers-urls", urls("decode", "pd"),
        "--policy", proxy.policy,
        "--encode-timeout-s", f"{proxy.encode_timeout_s:g}",
        "--prefill-timeout-s", f"{proxy.prefill_timeout_s:g}",
        "--decode-timeout-s", f"{proxy.decode_timeout_s:g}",
        "--max-body-mb", f"{proxy.max_body_mb:g}",
        "--max-media-items", str(proxy.max_media_items),
    ]
    if proxy.workers > 1:
        argv += ["--workers", str(proxy.workers)]
    for flag, roles in (("--encode-servers-names", ("encode",)), ("--prefill-servers-names", ("prefill",)),
                        ("--decode-servers-names", ("decode", "pd"))):
        names = [spec.name for spec in instances if spec.role in roles]
        if names:
            argv += [flag, ",".join(names)]
    if kv_connector := proxy_kv_connector(topology):
        argv += ["--kv-connector", kv_connector]
    if is_layerwise(topology) and (metaserver_host := proxy_metaserver_host(topology) or callback_host):
        argv += ["--metaserver-host", metaserver_host]
    if ec_path := proxy_ec_storage_path(topology):
        argv += ["--ec-shared-storage-path", ec_path]
    if ec_connector := proxy_ec_connector(topology):
        argv += ["--ec-connector", ec_connector]
    zmq = ec_consumer_zmq_addrs(topology, instances)
    if zmq:
        argv += ["--ec-consumer-zmq-addrs", ",".join(zmq)]
    if topology.media.allowed_local_path:
        argv += ["--allowed-local-media-path", topology.media.allowed_local_path]
    return argv


# ---------------------------------------------------------------- ports


def hand_out(candidate: int, taken: set[int], count: int = 1) -> tuple[int, ...]:
    """The first `count` consecutive ports from `candidate` up that are not `taken` (past 65535
    when the range runs out: the checks name that port and the key that moves it)."""
    while any(port in taken for port in range(candidate, candidate + count)):
        candidate += 1
    return tuple(range(candidate, candidate + count))


def router_metrics_port(proxy: ProxySpec) -> int:
    """vllm-router's Prometheus port: its own, else the proxy's port + 1."""
    return proxy.metrics_port or proxy.port + 1


def proxy_ports(proxy: ProxySpec) -> set[int]:
    """Every port the proxy process binds."""
    return {proxy.port, router_metrics_port(proxy)} if proxy.impl == "vllm-router" else {proxy.port}


def router_metrics_host(host: str) -> Optional[str]:
    """The address vllm-router's metrics can bind for `host` (an IPv4 literal, or localhost), else None."""
    import ipaddress

    if host == "localhost":
        return "127.0.0.1"
    try:
        return host if ipaddress.ip_address(host).version == 4 else None
    except ValueError:
        return None


def _ec_port_count(topology: Topology, ref: InstanceRef) -> int:
    assert topology.ec_transfer is not None
    return ec_port_count(topology.ec_transfer.connector, tensor_parallel_size(topology, ref.spec))


def _pinned_ec_ports(topology: Topology) -> set[int]:
    """The EC ports the file sets per instance: never handed out to anything else."""
    return {port for ref in ec_port_owners(topology) if ref.spec.ec_port
            for port in range(ref.spec.ec_port, ref.spec.ec_port + _ec_port_count(topology, ref))}


def ec_ports(topology: Topology) -> dict[str, tuple[int, ...]]:
    """Each owner's EC ports (connectors.ec_port_owners): one side channel per ECCPU producer; one
    control port per TP rank for a Mooncake consumer. Handed out from `ec_transfer.port_base` past
    every other port of the topology, unless set per instance."""
    owners = ec_port_owners(topology)
    if not owners:
        return {}
    assert topology.ec_transfer is not None
    taken = {ref.spec.port for ref in topology.instances()} | proxy_ports(topology.proxy)
    taken |= set(side_channel_ports(topology).values()) | _pinned_ec_ports(topology)
    taken |= {port for ports in kv_ports(topology).values() for port in ports}
    ports: dict[str, tuple[int, ...]] = {}
    candidate = topology.ec_transfer.port_base
    for ref in owners:
        count = _ec_port_count(topology, ref)
        if ref.spec.ec_port:
            ports[ref.name] = tuple(range(ref.spec.ec_port, ref.spec.ec_port + count))
            continue
        ports[ref.name] = hand_out(candidate, taken, count)
        candidate = ports[ref.name][0]
        taken |= set(ports[ref.name])
    return ports


def kv_ports(topology: Topology) -> dict[str, tuple[int, ...]]:
    """vllm-ascend's Mooncake connectors: each P and D instance's kv_port and the ports after it
    that its ranks bind (connectors.kv_port_count). Handed out from `side_channel_port_base` past
    every other port, unless an instance sets its own `side_channel_port` (the first of them)."""
    if not uses_mooncake_kv(topology):
        return {}
    assert topology.kv_transfer is not None
    refs = [ref for ref in topology.instances() if ref.role in ("prefill", "decode")]
    taken = {ref.spec.port for ref in topology.instances()} | proxy_ports(topology.proxy) | _pinned_ec_ports(topology)
    for ref in refs:
        if ref.spec.side_channel_port:
            taken |= set(range(ref.spec.side_channel_port, ref.spec.side_channel_port + kv_port_count(topology, ref.spec)))
    ports: dict[str, tuple[int, ...]] = {}
    candidate = topology.kv_transfer.side_channel_port_base
    for ref in refs:
        count = kv_port_count(topology, ref.spec)
        if ref.spec.side_channel_port:
            ports[ref.name] = tuple(range(ref.spec.side_channel_port, ref.spec.side_channel_port + count))
            continue
        ports[ref.name] = hand_out(candidate, taken, count)
        candidate = ports[ref.name][0]
        taken |= set(ports[ref.name])
    return ports


def side_channel_ports(topology: Topology) -> dict[str, int]:
    """The NIXL side-channel port of each P and D instance.

    Unless an instance sets its own, ports are handed out from `side_channel_port_base`,
    skipping any port already used elsewhere in the topology.
    """
    if not uses_nixl(topology):
        return {}
    assert topology.kv_transfer is not None
    taken = {ref.spec.port for ref in topology.instances()} | proxy_ports(topology.proxy)
    taken |= {ref.spec.side_channel_port for ref in topology.instances() if ref.spec.side_channel_port}
    taken |= _pinned_ec_ports(topology)  # an EC port the file pins is not handed out again here
    ports: dict[str, int] = {}
    candidate = topology.kv_transfer.side_channel_port_base
    for ref in topology.instances():
        if ref.role not in ("prefill", "decode"):
            continue
        if ref.spec.side_channel_port:
            ports[ref.name] = ref.spec.side_channel_port
            continue
        (candidate,) = hand_out(candidate, taken)
        ports[ref.name] = candidate
        taken.add(candidate)
    return ports
