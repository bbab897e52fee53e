"""Topology → plain Kubernetes manifests (`epdctl export k8s`), built from the same Plan as `up`.

Each vLLM container runs exactly the argv `plan` prints. What changes on a cluster:
- devices are resource limits (the device plugin assigns them), so the device variables go;
- instances find each other through Services instead of loopback ports;
- the EC folder is a ReadWriteMany volume mounted in every producer and consumer (and the proxy,
  for EC reuse);
- NIXL's side channel is advertised on the pod's own IP (downward API), so P and D on different
  nodes reach each other.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from epdctl.atomicfile import check_output, make_output_folder, write_output
from epdctl.config.schema import Topology
from epdctl.connectors import EC_MOONCAKE, ec_consumer_zmq_addrs, is_layerwise
from epdctl.errors import EXIT_RUNTIME, EXIT_USAGE, EpdctlError
from epdctl.plan import DEVICE_VARIABLE, ProcessSpec, build_plan

DEFAULT_IMAGE = "vllm/vllm-openai:v0.33.0"
DEFAULT_PROXY_IMAGE = "epdctl:0.1.0"  # build it from the repository's Dockerfile (docs/howto-kubernetes.md)
# The device plugins' resource names; --device-resource names another (an Ascend 310P's, say).
DEVICE_RESOURCE = {"cuda": "nvidia.com/gpu", "xpu": "gpu.intel.com/i915", "npu": "huawei.com/Ascend910"}
RESOURCE_NAME = re.compile(r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
EC_VOLUME_SIZE = "50Gi"
PROBE_PERIOD_S = 5
# Service names are DNS-1035 labels: a letter first, at most 63 characters.
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


class _PlainDumper(yaml.SafeDumper):
    """No `&id001` anchors: manifests stay plain for people and for every tool that reads them."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


@dataclass
class Workload:
    """One Deployment (and its Service): an instance, or a role's alike instances as replicas."""

    name: str  # the Kubernetes object name
    role: str
    spec: ProcessSpec  # the first instance's process; alike replicas differ only in port numbers
    replicas: int


def _base(topology: Topology) -> str:
    """The prefix of every object's name: the topology's name, made to start with a letter."""
    return topology.name if topology.name[0].isalpha() else f"epd-{topology.name}"


def _labels(topology: Topology, role: str, workload: Optional[str] = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": "epdctl", "app.kubernetes.io/instance": topology.name,
              "epdctl.io/role": role}
    if workload:
        labels["epdctl.io/workload"] = workload
    return labels


def _alike(specs: list[ProcessSpec]) -> bool:
    """Instances that differ only in ports (host-local details on one machine) can be replicas."""

    def shape(spec: ProcessSpec) -> tuple:
        argv = list(spec.argv)
        if "--port" in argv:
            argv[argv.index("--port") + 1] = "PORT"
        env = {k: v for k, v in spec.env.items() if k != "VLLM_NIXL_SIDE_CHANNEL_PORT"}
        return (tuple(argv), tuple(sorted(env.items())), len(spec.devices))

    return len({shape(s) for s in specs}) == 1


def workloads(topology: Topology, instances: tuple[ProcessSpec, ...]) -> list[Workload]:
    out: list[Workload] = []
    by_role: dict[str, list[ProcessSpec]] = {}
    for spec in instances:
        by_role.setdefault(spec.role, []).append(spec)
    for role, specs in by_role.items():
        if len(specs) > 1 and _alike(specs):
            out.append(Workload(f"{_base(topology)}-{role}", role, specs[0], len(specs)))
        else:
            out.extend(Workload(f"{_base(topology)}-{s.name}", role, s, 1) for s in specs)
    return out


def _probe(port: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": "/health", "port": port}, "periodSeconds": period, "failureThreshold": failures,
            "timeoutSeconds": 3}


POD_IP = {"valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
# Advertised to other pods: the pod's own IP (downward API), never the loopback `plan` uses on one host.
POD_IP_VARIABLES = ("VLLM_EC_SIDE_CHANNEL_HOST",)


def _container_env(topology: Topology, spec: ProcessSpec) -> list[dict[str, Any]]:
    device_variable = DEVICE_VARIABLE.get(topology.platform)
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in spec.env.items()
                                 if k != device_variable and k not in POD_IP_VARIABLES]
    env += [{"name": k, **POD_IP} for k in POD_IP_VARIABLES if k in spec.env]
    if spec.side_channel_port:
        env.append({"name": "VLLM_NIXL_SIDE_CHANNEL_HOST", **POD_IP})
    if _mooncake_consumer(topology, spec):
        env.append({"name": "POD_IP", **POD_IP})  # `$(POD_IP)` in its --ec-transfer-config
    return env


def _mooncake_consumer(topology: Topology, spec: ProcessSpec) -> bool:
    return bool(spec.ec_ports) and topology.ec_transfer is not None and topology.ec_transfer.connector == EC_MOONCAKE


def _command(topology: Topology, spec: ProcessSpec) -> list[str]:
    """The plan's argv, with what only holds on one host replaced for a cluster."""
    argv = list(spec.argv)
    if _mooncake_consumer(topology, spec) and "--ec-transfer-config" in argv:
        # A Mooncake consumer binds and advertises ec_ip: its pod IP (Kubernetes expands $(POD_IP) in args).
        at = argv.index("--ec-transfer-config") + 1
        config = json.loads(argv[at])
        config["ec_ip"] = "$(POD_IP)"
        argv[at] = json.dumps(config, separators=(",", ":"))
    return argv + (["--host", "0.0.0.0"] if topology.engine == "sim" else [])


def _deployment(topology: Topology, work: Workload, image: str, ec_claim: Optional[str],
                resource: Optional[str] = None) -> dict[str, Any]:
    spec = work.spec
    ports = [{"name": "http", "containerPort": spec.port}]
    if spec.side_channel_port:
        ports.append({"name": "nixl", "containerPort": spec.side_channel_port})
    ports += [{"name": f"ec-{i}", "containerPort": port} for i, port in enumerate(spec.ec_ports)]
    startup_failures = max(1, math.ceil(topology.health.timeout_s / PROBE_PERIOD_S))
    container: dict[str, Any] = {
        "name": "vllm" if topology.engine == "vllm" else "sim",
        "image": image,
        # The sim binds loopback unless told otherwise; vLLM listens on every interface already.
        "command": _command(topology, spec),
        "ports": ports,
        "startupProbe": _probe("http", PROBE_PERIOD_S, startup_failures),
        "readinessProbe": _probe("http", PROBE_PERIOD_S, 3),
        "livenessProbe": _probe("http", 10, 3),
    }
    env = _container_env(topology, spec)
    if env:
        container["env"] = env
    resource = resource or DEVICE_RESOURCE.get(topology.platform)
    if resource and spec.devices:
        container["resources"] = {"limits": {resource: len(spec.devices)}}
    mounts, volumes = [], []
    if ec_claim and "--ec-transfer-config" in spec.argv:
        mounts.append({"name": "ec-cache", "mountPath": topology.ec_transfer.shared_storage_path})
        volumes.append({"name": "ec-cache", "persistentVolumeClaim": {"claimName": ec_claim}})
    if topology.engine == "vllm":
        # vLLM's workers exchange tensors through /dev/shm; a container's default 64 MiB is too small.
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    if mounts:
        container["volumeMounts"] = mounts
    labels = _labels(topology, work.role, work.name)
    pod: dict[str, Any] = {"containers": [container]}
    if volumes:
        pod["volumes"] = volumes
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": work.name, "labels": labels},
        "spec": {"replicas": work.replicas, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": pod}},
    }


def _service(topology: Topology, name: str, role: str, port: int, workload: str,
             ec_ports: tuple[int, ...] = ()) -> dict[str, Any]:
    # EC ports too: the proxy names a Mooncake consumer to the encoders as tcp://SERVICE:PORT.
    ports = [{"name": "http", "port": port, "targetPort": "http"}]
    ports += [{"name": f"ec-{i}", "port": ec_port, "targetPort": f"ec-{i}"} for i, ec_port in enumerate(ec_ports)]
    spec: dict[str, Any] = {"type": "ClusterIP", "selector": _labels(topology, role, workload), "ports": ports}
    if role == "decode" and is_layerwise(topology):
        # Headless: its name resolves to the pods' own IPs, the addresses their metaserver calls come
        # from, which the proxy checks them against (a ClusterIP is never a call's source).
        spec["clusterIP"] = "None"
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "labels": _labels(topology, role, workload)},
        "spec": spec,
    }


def _proxy_deployment(topology: Topology, works: list[Workload], image: str, ec_claim: Optional[str]) -> dict[str, Any]:
    def urls(*roles: str) -> str:
        return ",".join(f"http://{w.name}:{w.spec.port}" for w in works if w.role in roles) or "disable"

    proxy = topology.proxy
    command = [
        "python", "-m", "epdctl.proxy", "--host", "0.0.0.0", "--port", str(proxy.port),
        "--encode-servers-urls", urls("encode"), "--prefill-servers-urls", urls("prefill"),
        "--decode-servers-urls", urls("decode", "pd"), "--policy", proxy.policy,
        "--encode-timeout-s", f"{proxy.encode_timeout_s:g}", "--prefill-timeout-s", f"{proxy.prefill_timeout_s:g}",
        "--decode-timeout-s", f"{proxy.decode_timeout_s:g}", "--max-body-mb", f"{proxy.max_body_mb:g}",
        "--max-media-items", str(proxy.max_media_items),
    ]
    if proxy.workers > 1:
        command += ["--workers", str(proxy.workers)]  # SO_REUSEPORT within the pod, as `up` runs it
    kv = topology.kv_transfer
    if topology.prefill and kv is not None and kv.connector != "NixlConnector":
        command += ["--kv-connector", kv.connector]  # as `plan` passes it: the proxy's warnings know it
    if is_layerwise(topology):  # decoders call the proxy back by its Service name
        command += ["--metaserver-host", topology.proxy.metaserver_host or f"{_base(topology)}-proxy"]
    ec = topology.ec_transfer
    if topology.encode and ec is not None and ec.connector != "ECExampleConnector":
        command += ["--ec-connector", ec.connector]
    service_of = {w.spec.name: w.name for w in works if w.replicas == 1}
    zmq = ec_consumer_zmq_addrs(topology, tuple(w.spec for w in works), host_of=lambda spec: service_of[spec.name])
    if zmq:
        command += ["--ec-consumer-zmq-addrs", ",".join(zmq)]
    if topology.media.allowed_local_path:
        command += ["--allowed-local-media-path", topology.media.allowed_local_path]
    container: dict[str, Any] = {
        "name": "proxy", "image": image, "command": command,
        "ports": [{"name": "http", "containerPort": proxy.port}],
        "readinessProbe": _probe("http", PROBE_PERIOD_S, 3),
        "livenessProbe": _probe("http", 10, 6),
    }
    pod: dict[str, Any] = {"containers": [container]}
    if ec_claim:
        path = topology.ec_transfer.shared_storage_path
        command += ["--ec-shared-storage-path", path]
        container["volumeMounts"] = [{"name": "ec-cache", "mountPath": path, "readOnly": True}]
        pod["volumes"] = [{"name": "ec-cache", "persistentVolumeClaim": {"claimName": ec_claim}}]
    name = f"{_base(topology)}-proxy"
    labels = _labels(topology, "proxy", name)
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": labels},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": pod}},
    }


def manifests(topology: Topology, source_text: str, *, image: Optional[str] = None,
              proxy_image: Optional[str] = None, storage_class: Optional[str] = None,
              device_resource: Optional[str] = None) -> list[dict[str, Any]]:
    """Every object, in apply order: config, storage, instances and their services, the proxy."""
    if device_resource is not None and not RESOURCE_NAME.match(device_resource):
        raise EpdctlError(f"--device-resource {device_resource!r}: a Kubernetes resource name such as "
                          "huawei.com/Ascend910", EXIT_USAGE)
    if topology.proxy.impl != "epdctl":
        raise EpdctlError(topology.error_at(("proxy", "impl"), f"{topology.proxy.impl}: export k8s runs epdctl's proxy "
                                            "only; use impl: epdctl here (or deploy vllm-router with its own chart)"),
                          EXIT_USAGE)
    if topology.launcher != "local":
        raise EpdctlError(topology.error_at(("launcher",), f"{topology.launcher}: Kubernetes places the pods itself; "
                                            "use launcher: local here (or epdctl export slurm for a Slurm cluster)"),
                          EXIT_USAGE)
    plan = build_plan(topology, python="python")
    image = image or (DEFAULT_IMAGE if topology.engine == "vllm" else proxy_image or DEFAULT_PROXY_IMAGE)
    proxy_image = proxy_image or DEFAULT_PROXY_IMAGE
    docs: list[dict[str, Any]] = [{
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": f"{_base(topology)}-topology", "labels": _labels(topology, "config")},
        "data": {"topology.yaml": source_text},
    }]
    ec_claim = None
    ec = topology.ec_transfer
    if topology.encode and ec is not None and ec.connector == "ECExampleConnector":
        ec_claim = f"{_base(topology)}-ec-cache"
        claim: dict[str, Any] = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": EC_VOLUME_SIZE}}}
        if storage_class:
            claim["storageClassName"] = storage_class
        docs.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                     "metadata": {"name": ec_claim, "labels": _labels(topology, "ec-cache")}, "spec": claim})
    works = workloads(topology, plan.instances)
    for work in works:
        docs.append(_deployment(topology, work, image, ec_claim, device_resource))
        docs.append(_service(topology, work.name, work.role, work.spec.port, work.name, work.spec.ec_ports))
    docs.append(_proxy_deployment(topology, works, proxy_image, ec_claim))
    proxy = f"{_base(topology)}-proxy"
    docs.append(_service(topology, proxy, "proxy", topology.proxy.port, proxy))
    too_long = [d["metadata"]["name"] for d in docs if not DNS_LABEL.match(d["metadata"]["name"])]
    if too_long:
        raise EpdctlError(f"name: {topology.name!r} makes object names longer than 63 characters "
                          f"({too_long[0]}); choose a shorter topology name", EXIT_USAGE)
    return docs


def validate(docs: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """Each manifest against the newest Kubernetes schema kubernetes-validate has (offline, strict).

    Returns that release and the problems found.
    """
    try:
        import kubernetes_validate
    except ImportError:
        raise EpdctlError("--check needs kubernetes-validate: pip install 'epdctl[k8s]'", EXIT_USAGE) from None
    release = kubernetes_validate.latest_version()
    problems = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, release, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path) or "<top>"
            problems.append(f"{doc['kind']} {doc['metadata']['name']}: {where}: {exc.message}")
    return release, problems


OPTION = "export k8s: -o"
# The first line of every file export writes: how a re-export knows the files it may replace or remove.
HEADER = "# Written by `epdctl export k8s`; a re-export replaces this file, or removes it when stale.\n"


def _ours(path: Path) -> bool:
    """A regular file (not a link) that a previous export wrote."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with open(path, "rb") as handle:
            return handle.read(len(HEADER)) == HEADER.encode()
    except OSError:
        return False


def _previous_export(output: Path) -> set[Path]:
    """Before writing: OUTPUT may hold anything, but kustomization.yaml and every entry of manifests/
    must be files a previous export wrote (else `kubectl apply` would deploy them with ours, or we
    would replace a file of the user's). Returns those previous manifests."""
    kustomization = check_output(output / "kustomization.yaml", OPTION)
    if kustomization.exists() and not _ours(kustomization):
        raise EpdctlError(f"{OPTION} {kustomization}: not written by epdctl export k8s; "
                          "not replacing it (remove it, or choose another folder)", EXIT_USAGE)
    folder = output / "manifests"
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise EpdctlError(f"{OPTION} {folder}: is a symbolic link or not a folder; not writing in it", EXIT_USAGE)
    previous = sorted(folder.iterdir()) if folder.exists() else []
    for path in previous:
        check_output(path, OPTION)  # a symlink, a folder, another user's file
        if not _ours(path):
            raise EpdctlError(f"{OPTION} {path}: not written by epdctl export k8s, and `kubectl apply -f "
                              f"{folder}` would deploy it; remove it, or choose another folder", EXIT_USAGE)
    return set(previous)


def export(topology: Topology, source: Path, output: Path, *, namespace: Optional[str] = None,
           image: Optional[str] = None, proxy_image: Optional[str] = None, storage_class: Optional[str] = None,
           device_resource: Optional[str] = None, check: bool = False, out=None) -> list[Path]:
    """Write OUTPUT/manifests/*.yaml (for `kubectl apply -f`) and OUTPUT/kustomization.yaml (for `-k`)."""
    import sys

    out = out or sys.stdout
    stale = _previous_export(output)  # refused before any work, as every other check
    docs = manifests(topology, source.read_text(encoding="utf-8"), image=image, proxy_image=proxy_image,
                     storage_class=storage_class, device_resource=device_resource)
    if namespace:
        for doc in docs:
            doc["metadata"]["namespace"] = namespace
    checked = ""
    if check:
        release, problems = validate(docs)
        if problems:
            raise EpdctlError("manifests do not validate:\n" + "\n".join(problems), EXIT_RUNTIME)
        checked = f", all valid against the Kubernetes {release} schema"
    folder = output / "manifests"
    make_output_folder(folder, OPTION)
    written = []
    for index, doc in enumerate(docs):
        # Numbered so `kubectl apply -f` creates config and storage before the pods that use them.
        path = folder / f"{index:02d}-{doc['kind'].lower()}-{doc['metadata']['name']}.yaml"
        written.append(write_output(path, HEADER + yaml.dump(doc, Dumper=_PlainDumper, sort_keys=False, width=120),
                                    OPTION))
    kustomization: dict[str, Any] = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}
    if namespace:
        kustomization["namespace"] = namespace
    kustomization["resources"] = [f"manifests/{p.name}" for p in written]
    written.append(write_output(output / "kustomization.yaml", HEADER + yaml.safe_dump(kustomization, sort_keys=False),
                                OPTION))
    # A previous export's manifest this one did not rewrite (an instance since removed, an old
    # proxy routing to it) would still be deployed by `kubectl apply -f`.
    for path in stale - set(written):
        path.unlink(missing_ok=True)
    print(f"epdctl: wrote {len(docs)} manifests to {folder} and {output / 'kustomization.yaml'}{checked}; "
          f"apply with `kubectl apply -k {output}` (or `kubectl apply -f {folder}`)", file=out)
    return written
