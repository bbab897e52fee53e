"""Topology → Plan: every process's argv, env and port (DESIGN §3). Pure: no I/O."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from epdctl.config.schema import EC_CPU, EC_MOONCAKE, ROUTER_KV_CONNECTORS, RestartSpec, Topology, router_metrics_host

LOOPBACK = "127.0.0.1"
ENCODER_MIN_BATCHED_TOKENS = 114688  # the seeds' value: a whole multi-image prompt in one step
DEVICE_VARIABLE = {"cuda": "CUDA_VISIBLE_DEVICES", "xpu": "ZE_AFFINITY_MASK"}


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

    @property
    def url(self) -> str:
        # An IPv6 address goes in brackets in a URL (RFC 3986): http://[::1]:10001.
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"http://{host}:{self.port}"

    def ports(self) -> tuple[int, ...]:
        return ((self.port,) + ((self.side_channel_port,) if self.side_channel_port else ()) + self.ec_ports
                + ((self.metrics_port,) if self.metrics_port else ()))

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

    @property
    def storage_paths(self) -> tuple[str, ...]:
        """Folders `up` creates when missing and `down` removes again (only those it created)."""
        return tuple(p for p in (self.ec_storage_path, self.kv_storage_path) if p)

    @property
    def processes(self) -> tuple[ProcessSpec, ...]:
        return self.instances + (self.proxy,)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "engine": self.engine,
            "platform": self.platform,
            "instances": [spec.to_json() for spec in self.instances],
            "proxy": self.proxy.to_json(),
        }


# ---------------------------------------------------------------- flags


def normalize_flag(key: str, value: Any) -> tuple[str, Any]:
    """`max_num_seqs` and `--max-num-seqs` are one flag; `no-x: true` is `x: false`."""
    key = key.lstrip("-").replace("_", "-")
    if key.startswith("no-") and isinstance(value, bool):
        return key[3:], not value
    return key, value


def merge_flags(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Later layers replace earlier ones flag by flag (DESIGN §2 precedence)."""
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


def ec_config(topology: Topology, role: str, ec_ports: tuple[int, ...] = ()) -> dict[str, Any]:
    ec = topology.ec_transfer
    assert ec is not None
    extra: dict[str, Any] = {}
    if ec.shared_storage_path:
        extra["shared_storage_path"] = ec.shared_storage_path
    extra.update(ec.extra_config)
    config: dict[str, Any] = {"ec_connector": ec.connector, "ec_role": role}
    config["ec_connector_extra_config"] = extra
    config.update(ec.config)
    if ec.connector == EC_MOONCAKE and role == "ec_consumer" and ec_ports:
        # The consumer binds and advertises ec_ip:ec_port (+ its TP rank); on one host, loopback.
        config.update(ec_ip=LOOPBACK, ec_port=ec_ports[0])
    return config


def kv_config(topology: Topology, role: str) -> dict[str, Any]:
    kv = topology.kv_transfer
    assert kv is not None
    config: dict[str, Any] = {"kv_connector": kv.connector, "kv_role": role}
    config.update(kv.config)
    if kv.extra_config:
        config["kv_connector_extra_config"] = dict(kv.extra_config)
    return config


def role_flags(topology: Topology, role: str, devices: tuple[int, ...], ec_ports: tuple[int, ...] = ()) -> dict[str, Any]:
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
        flags["ec-transfer-config"] = ec_config(topology, "ec_consumer", ec_ports)
    if role == "prefill":
        flags["kv-transfer-config"] = kv_config(topology, "kv_producer")
    elif role == "decode":
        flags["kv-transfer-config"] = kv_config(topology, "kv_consumer")
    return flags


def build_plan(topology: Topology, python: str = "python", router: str = "vllm-router") -> Plan:
    """The processes `up` will run, in start order: instances, then the proxy.

    `python` runs epdctl's own proxy; `router` is the vllm-router command (proxy.impl vllm-router)."""
    prefix, positional_model = engine_prefix(topology, python)
    side_channels = topology.side_channel_ports()
    all_ec_ports = topology.ec_ports()
    device_variable = DEVICE_VARIABLE.get(topology.platform)
    instances = []
    for ref in topology.instances():
        spec = ref.spec
        instance_flags: dict[str, Any] = {}
        if spec.gpu_memory_utilization is not None:
            instance_flags["gpu-memory-utilization"] = spec.gpu_memory_utilization
        instance_flags.update(spec.args)
        # A sim profile's costs are the lowest level: any `args:` still overrides them.
        ec_ports = all_ec_ports.get(ref.name, ())
        flags = merge_flags(topology.sim_costs(ref.role), topology.defaults.args,
                            role_flags(topology, ref.role, spec.devices, ec_ports), instance_flags)
        model_argv = [topology.model] if positional_model else ["--model", topology.model]
        argv = prefix + model_argv + ["--port", str(spec.port)] + flags_to_argv(flags)

        role_env: dict[str, str] = {}
        if device_variable and spec.devices:
            role_env[device_variable] = ",".join(str(d) for d in spec.devices)
        side_channel = side_channels.get(ref.name)
        if side_channel:
            role_env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(side_channel)
            role_env["UCX_NET_DEVICES"] = "all"
        role_env.update(ec_connector_env(topology, ref.role, ec_ports))
        env = {**topology.defaults.env, **role_env, **spec.env}
        instances.append(
            ProcessSpec(
                name=ref.name, role=ref.role, devices=spec.devices, argv=tuple(argv), env=env,
                host=LOOPBACK, port=spec.port, side_channel_port=side_channel, ec_ports=ec_ports,
                restart=spec.restart.over(topology.restart) if spec.restart else topology.restart,
            )
        )
    instances_t = tuple(instances)
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
                       else proxy_argv(topology, instances_t, python)),
            host=topology.proxy.host, port=topology.proxy.port,
            metrics_port=topology.proxy.router_metrics_port() if topology.proxy.impl == "vllm-router" else None,
            restart=topology.proxy.restart.over(topology.restart) if topology.proxy.restart else topology.restart,
        ),
        health_timeout_s=topology.health.timeout_s,
        health_interval_s=topology.health.interval_s,
        ec_storage_path=topology.ec_transfer.shared_storage_path if topology.ec_transfer and topology.encode else None,
        kv_storage_path=kv_storage_path(topology),
        log_max_bytes=int(topology.logs.max_mb * 1024 * 1024),
        log_keep=topology.logs.keep,
        proxy_impl=topology.proxy.impl,
    )


def ec_connector_env(topology: Topology, role: str, ec_ports: tuple[int, ...]) -> dict[str, str]:
    """What ECCPUConnector (and Mooncake's cross_encoder_cache) need in the environment."""
    ec = topology.ec_transfer
    if ec is None or not topology.encode or role == "decode":
        return {}
    env: dict[str, str] = {}
    if ec.connector == EC_CPU or (ec.connector == EC_MOONCAKE and role == "encode"
                                  and ec.extra_config.get("cross_encoder_cache") is True):
        env["VLLM_USE_V2_MODEL_RUNNER"] = "1"  # vLLM refuses the connector (or the cache) without it
    if ec.connector == EC_CPU and role == "encode" and ec_ports:
        # Each producer's own side channel: two on one host with vLLM's default 5601 would collide.
        env["VLLM_EC_SIDE_CHANNEL_HOST"] = LOOPBACK
        env["VLLM_EC_SIDE_CHANNEL_PORT"] = str(ec_ports[0])
    return env


def ec_consumers(topology: Topology, instances: tuple[ProcessSpec, ...]) -> list[ProcessSpec]:
    """The instances that receive encoder outputs, in the order of the proxy's pool that serves
    them: the prefill pool with P instances, else the decode pool (PD)."""
    role = "prefill" if topology.prefill else "pd"
    return [spec for spec in instances if spec.role == role]


def ec_consumer_zmq_addrs(topology: Topology, instances: tuple[ProcessSpec, ...],
                          host_of=lambda spec: spec.host) -> list[str]:
    """ECMooncakeConnector: each consumer's control address (TP rank 0), which the proxy names to
    the encoders so they push to the instance that will get the request (vLLM 0.33's proxy
    flag --ec-consumer-zmq-addrs)."""
    ec = topology.ec_transfer
    if ec is None or ec.connector != EC_MOONCAKE or not topology.encode:
        return []
    return [f"tcp://{host_of(spec)}:{spec.ec_ports[0]}" for spec in ec_consumers(topology, instances)]


def kv_storage_path(topology: Topology) -> Optional[str]:
    """The folder of a storage-based KV connector, when P and D exchange KV through files."""
    kv = topology.kv_transfer
    if kv is None or not topology.prefill:
        return None
    path = kv.extra_config.get("shared_storage_path")
    return path if isinstance(path, str) and path else None


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
        "--prometheus-port", str(proxy.router_metrics_port()),
        "--log-level", "info",
    ]
    return argv


def proxy_argv(topology: Topology, instances: tuple[ProcessSpec, ...], python: str) -> list[str]:
    def urls(*roles: str) -> str:
        return ",".join(spec.url for spec in instances if spec.role in roles) or "disable"

    proxy = topology.proxy
    argv = [
        python, "-m", "epdctl.proxy",
        "--host", proxy.host, "--port", str(proxy.port),
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
    kv = topology.kv_transfer
    if topology.prefill and kv is not None and kv.connector != "NixlConnector":
        # The proxy assumes NixlConnector (vLLM's reference) unless told: then it knows whether P's
        # answer must carry kv_transfer_params (a storage connector's never does).
        argv += ["--kv-connector", kv.connector]
    ec = topology.ec_transfer
    if topology.encode and ec is not None and ec.connector == "ECExampleConnector" and ec.shared_storage_path:
        argv += ["--ec-shared-storage-path", ec.shared_storage_path]
    if topology.encode and ec is not None and ec.connector != "ECExampleConnector":
        argv += ["--ec-connector", ec.connector]  # the proxy carries what ECCPU/Mooncake consumers need
    zmq = ec_consumer_zmq_addrs(topology, instances)
    if zmq:
        argv += ["--ec-consumer-zmq-addrs", ",".join(zmq)]
    if topology.media.allowed_local_path:
        argv += ["--allowed-local-media-path", topology.media.allowed_local_path]
    return argv

