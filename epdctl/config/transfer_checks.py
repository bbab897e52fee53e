"""Rules for the transfer JSON a topology plans (docs/design.md, Connectors): every top-level field
of a --kv-transfer-config / --ec-transfer-config against the fields vLLM's config has, and what
vllm-ascend's Mooncake KV connectors need (platform, one dp/tp size per role, the ports epdctl
plans, the layerwise flow's callback address).

Each rule returns problems, (loc, message, point-at-key-line), as config/checks.py does.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from epdctl.config.schema import Topology, flag_value
from epdctl.config.yamlmarks import did_you_mean
from epdctl.connectors import (ASCEND_KV_MODULES, EC_TRANSFER_FIELDS, KV_TRANSFER_FIELDS, MOONCAKE_LAYERWISE,
                               MOONCAKE_V1, WILDCARD_HOSTS, parallel_sizes, uses_mooncake_kv)
from epdctl.plan import normalize_flag

Problem = tuple  # (loc, message, prefer_key_line)
# What epdctl writes into every transfer JSON: a `config:` key naming one would be overwritten or
# would overwrite the role's own value.
PLANNED = {"kv_connector": "kv_transfer.connector", "kv_role": "the instance's role",
           "kv_connector_extra_config": "kv_transfer.extra_config",
           "ec_connector": "ec_transfer.connector", "ec_role": "the instance's role",
           "ec_connector_extra_config": "ec_transfer.extra_config"}


def transfer_problems(topology: Topology) -> list[Problem]:
    return _field_problems(topology) + _ascend_problems(topology)


def _field_problems(topology: Topology) -> list[Problem]:
    """A misspelt field (kv_connnector_module_path) is not an error to vLLM's config: it would run
    without what the file meant. Checked in `config:` and in any JSON an `args:` level gives."""
    problems: list[Problem] = []
    for key, fields, what in (("kv_transfer", KV_TRANSFER_FIELDS, "KVTransferConfig"),
                              ("ec_transfer", EC_TRANSFER_FIELDS, "ECTransferConfig")):
        connector = getattr(topology, key)
        if connector is None:
            continue
        for name in connector.config:
            if name in PLANNED:
                problems.append(((key, "config", name), f"{name} is planned by epdctl: set {PLANNED[name]}", True))
            elif name not in fields:
                problems.append(((key, "config", name), f"{name!r} is not a field of vLLM's {what}"
                                 f"{did_you_mean(name, fields)}", True))
    levels = [(("defaults", "args"), topology.defaults.args)] + [
        ((ref.role, ref.index, "args"), ref.spec.args) for ref in topology.instances()]
    for loc, args in levels:
        for raw_key, value in args.items():
            flag, _ = normalize_flag(raw_key, value)
            fields, what = {"kv-transfer-config": (KV_TRANSFER_FIELDS, "KVTransferConfig"),
                            "ec-transfer-config": (EC_TRANSFER_FIELDS, "ECTransferConfig")}.get(flag, (None, None))
            if fields is None:
                continue
            config = _as_json_object(value)
            if config is None:
                if value is not None:
                    problems.append((loc + (raw_key,), f"--{flag} must be a JSON object (a mapping, or its JSON text)",
                                     False))
                continue
            for name in config:
                if name not in fields:
                    problems.append((loc + (raw_key,), f"{name!r} is not a field of vLLM's {what}"
                                     f"{did_you_mean(str(name), fields)}", False))
    return problems


def _as_json_object(value: Any) -> Mapping[str, Any] | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return value if isinstance(value, dict) else None


def _ascend_problems(topology: Topology) -> list[Problem]:
    kv = topology.kv_transfer
    problems: list[Problem] = []
    layerwise = uses_mooncake_kv(topology) and kv is not None and kv.connector == MOONCAKE_LAYERWISE
    if topology.proxy.metaserver_host is not None and not layerwise:
        problems.append((("proxy", "metaserver_host"), f"is for kv_transfer.connector {MOONCAKE_LAYERWISE} with "
                                                        "prefill instances (the decoder-first flow)", True))
    if kv is None or kv.connector not in ASCEND_KV_MODULES or not topology.prefill:
        return problems
    if topology.engine == "vllm" and topology.platform != "npu":
        problems.append((("kv_transfer", "connector"), f"{kv.connector} is vllm-ascend's (Ascend NPUs): it needs "
                                                        "platform: npu (engine: sim runs it anywhere)", False))
    for side in ("prefill", "decode"):
        if side in kv.extra_config:
            problems.append((("kv_transfer", "extra_config", side), f"{side}'s dp_size/tp_size are planned from the "
                             f"topology's {side} instances", True))
        sizes = parallel_sizes(topology, side)
        if len(sizes) > 1:
            shown = ", ".join(f"dp {dp} tp {tp}" for dp, tp in sorted(sizes))
            problems.append(((side,), f"{kv.connector} takes one dp_size/tp_size for all {side} instances "
                                      f"(kv_connector_extra_config.{side}); these differ: {shown}", True))
    prefill_tp = {tp for _, tp in parallel_sizes(topology, "prefill")}
    decode_tp = {tp for _, tp in parallel_sizes(topology, "decode")}
    if kv.connector == MOONCAKE_V1 and len(prefill_tp) == 1 and len(decode_tp) == 1 and min(prefill_tp) < min(decode_tp):
        problems.append((("decode",), f"{MOONCAKE_V1} needs the prefill tp_size ({min(prefill_tp)}) at least the "
                                      f"decode tp_size ({min(decode_tp)})", True))
    if "kv_port" in kv.config:
        problems.append((("kv_transfer", "config", "kv_port"), "kv_port is planned per instance (set "
                         "kv_transfer.side_channel_port_base, or an instance's side_channel_port)", True))
    module = kv.config.get("kv_connector_module_path")
    if module is not None and not (isinstance(module, str) and module.replace(".", "").replace("_", "").isalnum()):
        problems.append((("kv_transfer", "config", "kv_connector_module_path"), "must be a Python module path "
                         "(dotted names)", False))
    for ref in topology.instances():
        if ref.role != "decode":
            continue
        extra = flag_value(topology, ref.spec, "additional-config")
        extra = _as_json_object(extra) if extra is not None else None
        scheduler = extra.get("scheduler_config") if extra else None
        recompute = (extra or {}).get("recompute_scheduler_enable") or (
            isinstance(scheduler, dict) and scheduler.get("recompute_scheduler_enable"))
        if recompute:
            problems.append(((ref.role, ref.index, "args"), "recompute_scheduler_enable makes a decoder end a request "
                             "with stop_reason 'recomputed' for the proxy to re-send; epdctl's proxy does not re-send "
                             "(it answers such a request with an error): leave it off", True))
    if layerwise:
        proxy = topology.proxy
        if proxy.host in WILDCARD_HOSTS and proxy.metaserver_host is None:
            problems.append((("proxy", "host"), f"{MOONCAKE_LAYERWISE}: decoders call the proxy back at its own "
                             f"address, and {proxy.host} is none: set proxy.metaserver_host to the address they "
                             "reach it at", False))
        if proxy.workers > 1:
            problems.append((("proxy", "workers"), f"{MOONCAKE_LAYERWISE}: a decoder's metaserver call must reach "
                             "the proxy process that sent it the request: run workers: 1", True))
        if proxy.metaserver_host in WILDCARD_HOSTS:
            problems.append((("proxy", "metaserver_host"), "must be an address decoders can call, not a wildcard",
                             False))
    return problems
