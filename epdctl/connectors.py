"""Every fact about vLLM's EC and KV connectors that epdctl plans around, in one place
(docs/design.md, Connectors): their names, which instances bind ports for them and how many,
the bounds of what they read, the JSON and environment each role gets, what the proxy must be
told, and ECExampleConnector's file layout.

The rules that turn these facts into FILE:LINE problems are in config/checks.py; the ports
themselves are handed out in plan.py. Standard library only at import: the sim and the proxy
import the EC file layout from here.
"""

from __future__ import annotations

import functools
import os
import re
from typing import TYPE_CHECKING, Any, Optional

from epdctl.atomicfile import write_atomic
from epdctl.media import check_media_key, is_safe_media_key

if TYPE_CHECKING:
    from epdctl.config.schema import InstanceRef, Topology
    from epdctl.plan import ProcessSpec

LOOPBACK = "127.0.0.1"

# ---------------------------------------------------------------- names

EC_EXAMPLE = "ECExampleConnector"  # a shared folder of files (below); the proxy's default
# EC connectors without a shared folder (vLLM 0.32+): each plans ports of its own.
EC_CPU = "ECCPUConnector"  # producers advertise a ZMQ side channel (VLLM_EC_SIDE_CHANNEL_HOST/PORT)
EC_MOONCAKE = "ECMooncakeConnector"  # consumers bind a control port per TP rank (ec_ip:ec_port + rank)
NIXL = "NixlConnector"  # vLLM's reference P->D KV connector; the proxy's default
NIXL_CONNECTORS = (NIXL,)  # KV connectors whose P and D instances each bind a NIXL side channel
# vllm-router's --kv-connector names for the KV connectors epdctl can run it with. It knows
# mooncake and moriio too, but Mooncake needs a bootstrap port per prefill instance (it waits on
# 8998 otherwise) and MoRI-IO a service-discovery address, neither of which epdctl plans yet.
ROUTER_KV_CONNECTORS = {NIXL: "nixl"}
# vllm-ascend's Mooncake KV connectors (Ascend NPUs) and the module each is registered from
# (vllm_ascend/distributed/kv_transfer/__init__.py), planned as kv_connector_module_path.
MOONCAKE_V1 = "MooncakeConnectorV1"  # D pulls from P after P's prefill: the NIXL-like hand-off
MOONCAKE_LAYERWISE = "MooncakeLayerwiseConnector"  # D first; P pushes layer by layer (proxy/layerwise.py)
ASCEND_KV_MODULES = {
    MOONCAKE_V1: "vllm_ascend.distributed.kv_transfer.kv_p2p.mooncake_connector",
    MOONCAKE_LAYERWISE: "vllm_ascend.distributed.kv_transfer.kv_p2p.mooncake_layerwise_connector",
}
MAX_KV_PORTS_PER_INSTANCE = 64

# The fields of vLLM's KVTransferConfig and ECTransferConfig (vllm/config/kv_transfer.py,
# ec_transfer.py): any other top-level key of a transfer JSON is a typo vLLM would not act on.
KV_TRANSFER_FIELDS = ("kv_connector", "engine_id", "kv_buffer_device", "kv_buffer_size", "kv_role", "kv_rank",
                      "kv_parallel_size", "kv_ip", "kv_port", "kv_connector_extra_config", "kv_connector_module_path",
                      "enable_permute_local_kv", "kv_load_failure_policy")
EC_TRANSFER_FIELDS = ("ec_connector", "engine_id", "ec_buffer_device", "ec_buffer_size", "ec_role", "ec_rank",
                      "ec_parallel_size", "ec_ip", "ec_port", "ec_connector_extra_config", "ec_connector_module_path")

# ---------------------------------------------------------------- bounds of what they read

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


# ---------------------------------------------------------------- who binds ports for them


def uses_nixl(topology: Topology) -> bool:
    """P and D exchange KV over NIXL: each binds a side channel (VLLM_NIXL_SIDE_CHANNEL_PORT)."""
    return bool(topology.prefill) and topology.kv_transfer is not None and topology.kv_transfer.connector in NIXL_CONNECTORS


def uses_mooncake_kv(topology: Topology) -> bool:
    """P and D run one of vllm-ascend's Mooncake connectors: each binds kv_port (+ its ranks)."""
    return bool(topology.prefill) and topology.kv_transfer is not None and topology.kv_transfer.connector in ASCEND_KV_MODULES


def is_layerwise(topology: Topology) -> bool:
    """The decoder-first flow: the proxy's metaserver starts each prefill (proxy/layerwise.py)."""
    return uses_mooncake_kv(topology) and topology.kv_transfer.connector == MOONCAKE_LAYERWISE


def kv_port_count(topology: Topology, spec) -> int:
    """How many consecutive ports from kv_port a Mooncake instance binds: one per rank
    (vllm-ascend: kv_port + dp_rank * tp * pp + the rank's device index)."""
    from epdctl.config.schema import flag_value, tensor_parallel_size

    count = tensor_parallel_size(topology, spec)
    for flag in ("pipeline-parallel-size", "data-parallel-size"):
        value = flag_value(topology, spec, flag)
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            count *= value
    return min(count, MAX_KV_PORTS_PER_INSTANCE)


def parallel_sizes(topology: Topology, role: str) -> set[tuple[int, int]]:
    """The (dp_size, tp_size) pairs of a role's instances: vllm-ascend takes one per role."""
    from epdctl.config.schema import flag_value, tensor_parallel_size

    sizes = set()
    for spec in getattr(topology, role):
        dp = flag_value(topology, spec, "data-parallel-size")
        dp = dp if isinstance(dp, int) and not isinstance(dp, bool) and dp > 0 else 1
        sizes.add((dp, tensor_parallel_size(topology, spec)))
    return sizes


def ec_port_owners(topology: Topology) -> list[InstanceRef]:
    """The instances that bind an EC connector port: ECCPU producers, Mooncake consumers."""
    ec = topology.ec_transfer
    if ec is None or not topology.encode:
        return []
    if ec.connector == EC_CPU:
        return [ref for ref in topology.instances() if ref.role == "encode"]
    if ec.connector == EC_MOONCAKE:
        return [ref for ref in topology.instances() if ref.role in ("prefill", "pd")]
    return []


def ec_port_count(connector: str, tensor_parallel_size: int) -> int:
    """How many consecutive EC ports an owner binds: one ECCPU side channel; one Mooncake control
    port per TP rank (vLLM binds ec_port + rank)."""
    return min(tensor_parallel_size, MAX_EC_PORTS_PER_INSTANCE) if connector == EC_MOONCAKE else 1


# ---------------------------------------------------------------- what each role gets


def ec_config(topology: Topology, role: str, ec_ports: tuple[int, ...] = (), host: str = LOOPBACK) -> dict[str, Any]:
    """The --ec-transfer-config of an `ec_producer` (encode) or `ec_consumer` (prefill, pd)."""
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
        # The consumer binds and advertises ec_ip:ec_port (+ its TP rank): loopback on one host,
        # its node's address under launcher slurm.
        config.update(ec_ip=host, ec_port=ec_ports[0])
    return config


def kv_config(topology: Topology, role: str, kv_ports: tuple[int, ...] = ()) -> dict[str, Any]:
    """The --kv-transfer-config of a `kv_producer` (prefill) or `kv_consumer` (decode).

    vllm-ascend's Mooncake connectors also get their module, the instance's kv_port, and the
    `prefill`/`decode` dp_size/tp_size their workers assert on, from the topology's instances."""
    kv = topology.kv_transfer
    assert kv is not None
    config: dict[str, Any] = {"kv_connector": kv.connector, "kv_role": role}
    extra = dict(kv.extra_config)
    if kv.connector in ASCEND_KV_MODULES:
        config["kv_connector_module_path"] = ASCEND_KV_MODULES[kv.connector]
        if kv_ports:
            config["kv_port"] = kv_ports[0]
        for side in ("prefill", "decode"):
            sizes = parallel_sizes(topology, side)
            if len(sizes) == 1:  # more than one is refused at validate
                (dp, tp), = sizes
                extra[side] = {"dp_size": dp, "tp_size": tp}
    config.update(kv.config)  # kv_connector_module_path may be overridden here
    if extra:
        config["kv_connector_extra_config"] = extra
    return config


def ec_connector_env(topology: Topology, role: str, ec_ports: tuple[int, ...], host: str = LOOPBACK) -> dict[str, str]:
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
        env["VLLM_EC_SIDE_CHANNEL_HOST"] = host
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


def ec_storage_path(topology: Topology) -> Optional[str]:
    """ECExampleConnector's folder, when encoders write their outputs there."""
    ec = topology.ec_transfer
    return ec.shared_storage_path if ec is not None and topology.encode else None


# ---------------------------------------------------------------- what the proxy must be told


def proxy_kv_connector(topology: Topology) -> Optional[str]:
    """The KV connector to name to epdctl's proxy (None: its default, NixlConnector). Told, it knows
    whether P's answer must carry kv_transfer_params (a storage connector's never does)."""
    kv = topology.kv_transfer
    return kv.connector if topology.prefill and kv is not None and kv.connector != NIXL else None


# Addresses a proxy can bind but nobody can call back: the layerwise flow's metaserver needs a real one.
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "0:0:0:0:0:0:0:0", "", "*")
METASERVER_PATH = "/v1/metaserver"


def metaserver_url(host: str, port: int) -> str:
    """The URL the proxy names to decoders in the layerwise flow (an IPv6 address in brackets)."""
    host = host.strip("[]")
    return f"http://[{host}]:{port}{METASERVER_PATH}" if ":" in host else f"http://{host}:{port}{METASERVER_PATH}"


def proxy_metaserver_host(topology: Topology) -> Optional[str]:
    """The address decoders call the layerwise metaserver at, when it is not the proxy's bind address."""
    return topology.proxy.metaserver_host if is_layerwise(topology) else None


def proxy_ec_connector(topology: Topology) -> Optional[str]:
    """The EC connector to name to epdctl's proxy (None: its default, ECExampleConnector): it carries
    what ECCPU and Mooncake consumers need from the encoders' answers."""
    ec = topology.ec_transfer
    return ec.connector if topology.encode and ec is not None and ec.connector != EC_EXAMPLE else None


def proxy_ec_storage_path(topology: Topology) -> Optional[str]:
    """ECExampleConnector's folder, for the proxy to skip the encoder for items already cached."""
    ec = topology.ec_transfer
    return ec.shared_storage_path if topology.encode and ec is not None and ec.connector == EC_EXAMPLE else None


# ---------------------------------------------------------------- ECExampleConnector's files

# The encoder-cache file contract of vLLM's ECExampleConnector, shared by the sim and the proxy:
# `<shared_storage_path>/<mm_hash>/encoder_cache.safetensors`, one tensor named `ec_cache`.
EC_FILENAME = "encoder_cache.safetensors"
EC_TENSOR = "ec_cache"


def ec_file(storage_path: str, mm_hash: str) -> str:
    """The key's EC file. An unsafe key raises MediaError: as a folder name it could point
    anywhere (`../x`, `/abs`), and callers that forgot to check it must not write or read there."""
    return os.path.join(storage_path, check_media_key(mm_hash), EC_FILENAME)


def ec_exists(storage_path: str, mm_hash: str) -> bool:
    # No EC file is ever kept under an unsafe key, so there is none to find (and nothing outside the
    # folder is probed); saving or loading one is what gets refused.
    return is_safe_media_key(mm_hash) and os.path.exists(ec_file(storage_path, mm_hash))


@functools.lru_cache(maxsize=8)
def _ec_payload(tokens: int, hidden: int) -> bytes:
    """A serialized safetensors file with one (tokens × hidden) float16 tensor `ec_cache`.

    Built once per shape: the sim is the backend of the proxy benchmarks, and serializing a
    fresh random tensor per item cost more CPU than everything else it does for a request.
    """
    import numpy as np
    from safetensors.numpy import save

    data = np.random.default_rng(0).standard_normal((tokens, hidden), dtype=np.float32).astype(np.float16)
    return save({EC_TENSOR: data})


def save_ec(storage_path: str, mm_hash: str, tokens: int, hidden: int) -> str:
    """Write the EC file atomically: a temporary file in the same folder, then a rename.

    vLLM's own example connector writes in place, so two encoders producing the same
    mm_hash can leave a torn file for a consumer; a rename is atomic on POSIX.
    """
    final = ec_file(storage_path, mm_hash)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    write_atomic(final, _ec_payload(tokens, hidden))
    return final


def load_ec(storage_path: str, mm_hash: str):
    """The cached tensor, or None when there is no usable file (a miss). An unsafe key raises MediaError."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = ec_file(storage_path, mm_hash)
    try:
        return load_file(path)[EC_TENSOR]
    except (FileNotFoundError, KeyError, SafetensorError, OSError):
        return None


# ---------------------------------------------------------------- the proxy's KV hand-off

# NixlConnector's request shape for "prefill here, decode elsewhere" (as vLLM's own proxies send it).
PREFILL_KV_PARAMS = {
    "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
    "remote_block_ids": None, "remote_host": None, "remote_port": None,
}
# KV connectors whose prefill answer carries the kv_transfer_params the decoder needs (P2P hand-off).
# Storage-based ones (ExampleConnector, LMCache, offloading, ...) return none: the decoder finds the
# KV by the prompt itself. MultiConnector may wrap either kind.
HANDOFF_KV_CONNECTORS = frozenset({
    "NixlConnector", "NixlPullConnector", "NixlPushConnector", "MooncakeConnector", "MoRIIOConnector",
    "P2pNcclConnector", "MultiConnector", "MooncakeConnectorV1",
})
