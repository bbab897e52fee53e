"""The topology's cross-field rules (docs/design.md, Topology file): roles and connectors that
go together, distinct ports and devices, what `exec` and vLLM's connectors would refuse.

Each rule returns problems, (loc, message, point-at-key-line); config/load.py turns them into
`FILE:LINE` lines. Pure, except that `check_folders` looks at the EC folder on this machine.
"""

from __future__ import annotations

import json
import os
import re
import stat
import unicodedata
from collections import defaultdict
from typing import Any, Iterator, Mapping, Optional

from epdctl.config.schema import (MAX_INSTANCES, ROLES, ProxySpec, Topology, effective_memory_fraction, flag_value,
                                  tensor_parallel_size)
from epdctl.config.simflags import SIM_FLAGS, value_problem
from epdctl.config.yamlmarks import did_you_mean
from epdctl.connectors import (EC_CPU, EC_EXAMPLE, EC_MOONCAKE, EC_NUMBERS, EC_PLANNED_ENV, MAX_EC_BYTES,
                               MAX_EC_PORTS_PER_INSTANCE, MOONCAKE_PROTOCOL, ROUTER_KV_CONNECTORS, ec_port_owners,
                               uses_nixl)
from epdctl.config.transfer_checks import transfer_problems
from epdctl.plan import ec_ports, kv_ports, normalize_flag, router_metrics_host, router_metrics_port, side_channel_ports

# Linux refuses to exec an argument or an environment string of 32 pages or more
# (MAX_ARG_STRLEN, counting its NUL), and a whole argv + environment above ARG_MAX (2 MiB with
# the usual 8 MiB stack). What epdctl sets must leave room for the inherited environment.
MAX_ARG_BYTES = 128 * 1024 - 1
MAX_EXEC_BYTES = 1024 * 1024
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Settings of epdctl's proxy that vllm-router has no counterpart for: refused, not silently dropped.
EPDCTL_PROXY_ONLY = ("encode_timeout_s", "max_media_items", "workers")

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
    if ec is not None and ec.connector == EC_EXAMPLE and not ec.shared_storage_path:
        problems.append((("ec_transfer",), "ECExampleConnector needs shared_storage_path", True))
    problems += _path_problems(topology)
    if check_folders and not problems and has["encode"] and ec is not None and ec.shared_storage_path:
        problem = _folder_problem(ec.shared_storage_path)
        if problem:
            problems.append((("ec_transfer", "shared_storage_path"), problem, False))
    problems += _exec_problems(topology)
    problems += _ec_connector_problems(topology)
    problems += transfer_problems(topology)
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
    if topology.proxy.impl == "vllm-router" and router_metrics_port(topology.proxy) <= 65535:
        # Named even when unset (it is then port + 1): that is the key that resolves a clash.
        claim(router_metrics_port(topology.proxy), ("proxy", "metrics_port"), "vllm-router's metrics")
    if uses_nixl(topology):
        for ref in topology.instances():
            if ref.spec.side_channel_port:
                claim(ref.spec.side_channel_port, (ref.role, ref.index, "side_channel_port"), f"{ref.name}'s side channel")
        explicit = {r.spec.side_channel_port for r in topology.instances() if r.spec.side_channel_port}
        for name, port in side_channel_ports(topology).items():
            if port > 65535:
                problems.append((("kv_transfer", "side_channel_port_base"),
                                 f"{name}'s side channel would get port {port}, past 65535: lower side_channel_port_base", False))
            elif port not in explicit:
                claim(port, ("kv_transfer", "side_channel_port_base"), f"{name}'s side channel")

    for name, ports in kv_ports(topology).items():  # vllm-ascend Mooncake: kv_port and one per rank
        ref = next(r for r in topology.instances() if r.name == name)
        loc = (ref.role, ref.index, "side_channel_port") if ref.spec.side_channel_port else ("kv_transfer", "side_channel_port_base")
        for port in ports:
            if port > 65535:
                problems.append((loc, f"{name}'s kv_port range would run to {ports[-1]}, past 65535", False))
                break
            claim(port, loc, f"{name}'s Mooncake kv_port")

    for name, ports in ec_ports(topology).items():
        ref = next(r for r in topology.instances() if r.name == name)
        loc = (ref.role, ref.index, "ec_port") if ref.spec.ec_port else ("ec_transfer", "port_base")
        for port in ports:
            if port <= 65535:
                claim(port, loc, f"{name}'s EC port")

    problems += _launcher_problems(topology)
    problems += _autoscale_problems(topology)
    if topology.launcher == "slurm":
        device_count = None  # the devices are the nodes', not this machine's

    # Devices (under launcher slurm, a device of one node: instances on other nodes never share it).
    budget: dict[tuple, list[tuple[str, float]]] = defaultdict(list)
    for ref in topology.instances():
        loc = (ref.role, ref.index, "devices")
        devices = ref.spec.devices
        if topology.platform != "cpu" and not devices:
            problems.append(((ref.role, ref.index), f"devices: required on platform {topology.platform}", True))
        problems += _device_list_problems(loc, devices, device_count)
        if ref.spec.gpu_memory_utilization is not None and "gpu-memory-utilization" in _normalized_keys(ref.spec.args):
            problems.append(((ref.role, ref.index, "args"), "gpu-memory-utilization is set both here and as gpu_memory_utilization", True))
        # An instance not pinned to a node is placed by `up`, which checks the budget once placed.
        node = (ref.spec.node or ref.name) if topology.launcher == "slurm" else None
        for device in set(devices):
            budget[(node or "", device)].append((ref.name, effective_memory_fraction(topology, ref.spec)))
    for role, pool in topology.scale_devices.roles().items():
        loc = ("scale_devices", role)
        if topology.platform == "cpu":
            problems.append((loc, "platform cpu has no devices to hand out", True))
        elif not getattr(topology, role):
            problems.append((loc, f"the topology has no {role} instance to scale", True))
        problems += _device_list_problems(loc, pool, device_count)
    if topology.platform != "cpu":
        for (node, device), users in sorted(budget.items()):
            total = sum(fraction for _, fraction in users)
            if len(users) > 1 and total > 1.0 + 1e-9:
                detail = ", ".join(f"{name} {fraction:g}" for name, fraction in users)
                last = users[-1][0]
                role, index = last.rsplit("-", 1)
                problems.append(
                    ((role, int(index), "gpu_memory_utilization"),
                     f"device {device}{f' of node {node}' if topology.launcher == 'slurm' else ''} is shared "
                     f"with a memory budget of {total:g} > 1.0 ({detail})", True)
                )
    return problems


def _device_list_problems(loc: tuple, devices: tuple[int, ...], device_count: Optional[int]) -> list[Problem]:
    """A list of devices (an instance's, or a role's scale_devices): none negative, repeated or beyond the machine."""
    problems: list[Problem] = []
    for device in devices:
        if device < 0:
            problems.append((loc, f"device {device} is negative", False))
        elif device_count is not None and device >= device_count:
            machine = f"{device_count} devices: 0..{device_count - 1}" if device_count else "it has no devices"
            problems.append((loc, f"device {device} is outside this machine ({machine})", False))
    duplicated = sorted({d for d in devices if devices.count(d) > 1})
    if duplicated:
        problems.append((loc, f"device {duplicated[0]} is listed twice", False))
    return problems


def scale_refusal(topology: Topology, role: str, count: int) -> Optional[str]:
    """Why `role` cannot be scaled to `count` in this topology, or None."""
    if role not in ROLES:
        return f"{role!r} is not a role (encode, prefill, decode or pd)"
    if not 1 <= count <= MAX_INSTANCES:
        return f"{role}={count}: between 1 and {MAX_INSTANCES} instances"
    if not getattr(topology, role):
        return f"the topology has no {role} instance to scale (roles are set at up)"
    if topology.proxy.impl != "epdctl":
        return f"proxy.impl {topology.proxy.impl} routes to a fixed list of workers; scale needs impl: epdctl"
    if topology.launcher != "local":
        return f"launcher {topology.launcher}: scaling is for launcher local this round"
    ec = topology.ec_transfer
    consumer = "prefill" if topology.prefill else "pd"
    if ec is not None and ec.connector == EC_MOONCAKE and topology.encode and role == consumer:
        return (f"{EC_MOONCAKE}: the proxy names each {consumer} instance's control address to the encoders at "
                f"start, so the {consumer} pool is fixed (encoders can be scaled)")
    return None


def _autoscale_problems(topology: Topology) -> list[Problem]:
    """A role under autoscale must exist, be one that can scale, and start within its bounds."""
    problems: list[Problem] = []
    for role, spec in topology.autoscale.roles().items():
        count = len(getattr(topology, role))
        reason = scale_refusal(topology, role, max(1, min(count, MAX_INSTANCES)))
        if reason:
            problems.append((("autoscale", role), f"cannot autoscale {role}: {reason}", True))
        elif not spec.min <= count <= spec.max:
            problems.append((("autoscale", role), f"the file has {count} {role} instance(s), outside min {spec.min} "
                             f"and max {spec.max}: up starts what the file has", True))
    return problems


def _launcher_problems(topology: Topology) -> list[Problem]:
    """`node:` means a Slurm node: only under launcher slurm (elsewhere it would be ignored)."""
    if topology.launcher == "slurm":
        return []
    return [((ref.role, ref.index, "node"), "node: needs launcher: slurm (a local topology runs on this machine)", True)
            for ref in topology.instances() if ref.spec.node]


def _args_levels(topology: Topology) -> list[tuple[tuple, Mapping[str, Any]]]:
    """Each `args:` of the file, with where it is: the defaults', then each instance's."""
    return [(("defaults", "args"), topology.defaults.args)] + [
        ((ref.role, ref.index, "args"), ref.spec.args) for ref in topology.instances()]


def _sim_flag_problems(topology: Topology) -> list[Problem]:
    """The sim's own `sim-*` flags against its table: at `up` the sim would ignore a misspelt one
    (a note in its log) and stop on a bad value with a usage text."""
    if topology.engine != "sim":
        return []
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
    owners = {ref.name for ref in ec_port_owners(topology)}
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
    for name, ports in ec_ports(topology).items():
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
            dp = flag_value(topology, ref.spec, "data-parallel-size")
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
            value = flag_value(topology, ref.spec, flag)
            if isinstance(value, int) and value > 1:
                problems.append((loc, f"ECMooncakeConnector producers do not support {flag} {value}", True))
        if shared is True:
            if flag_value(topology, ref.spec, "mm-processor-cache-gb") == 0:
                problems.append((loc, "cross_encoder_cache needs mm-processor-cache-gb above 0", True))
            if flag_value(topology, ref.spec, "enable-lora") is True:
                problems.append((loc, "cross_encoder_cache does not support LoRA (enable-lora)", True))
    if shared is True:
        problems += _ec_env_problems(topology, ("encode",))
    return problems


def _normalized_keys(args: Mapping[str, Any]) -> set[str]:
    return {key.replace("_", "-").lstrip("-") for key in args}


