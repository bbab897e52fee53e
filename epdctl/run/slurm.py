"""Slurm, as `launcher: slurm` uses it (docs/design.md, "Seams"; docs/slurm.md).

Three facts come from Slurm itself, through its own commands (never a home-made remote shell):
- the allocation `up` runs in: its job id, its nodes (`scontrol show hostnames`) and each node's
  routable address (`scontrol show node`'s NodeAddr), gathered once before planning;
- the job steps of a run: named `epdctl.<run token>.<instance>`, listed with `squeue --steps`;
- ending them: `scancel --signal=SIG JOB.STEP` delivers a signal to a step's task (SIGTERM to
  `srun` itself would make srun kill the task at once), `scancel JOB.STEP` ends it for good.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Mapping, Optional

from epdctl.errors import EXIT_USAGE, EpdctlError

STEP_PREFIX = "epdctl."
# What Slurm's ids look like; anything else from a state file is never passed to scancel (an
# option such as --user=... in its place would end other people's work).
JOB_ID = re.compile(r"[0-9]{1,12}")
STEP_ID = re.compile(r"[0-9]{1,12}\.[0-9]{1,12}")
COMMAND_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Allocation:
    job_id: str
    nodes: tuple[str, ...]
    addresses: Mapping[str, str]  # node -> its routable address (NodeAddr)
    here: str  # the address on which this host reaches the nodes: where the proxy is found

    def address(self, node: str) -> str:
        return self.addresses.get(node, node)


def _run(argv: list[str], what: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise EpdctlError(f"launcher slurm: {argv[0]!r} not found: is this a Slurm machine? "
                          "(apt-get install slurm-client, or run on the cluster)") from None
    except subprocess.TimeoutExpired:
        raise EpdctlError(f"launcher slurm: {' '.join(argv)} gave no answer in {COMMAND_TIMEOUT_S:g}s ({what})") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise EpdctlError(f"launcher slurm: {what}: {' '.join(argv)} failed: {detail[-1] if detail else done.returncode}")
    return done.stdout


def discover(environ: Optional[Mapping[str, str]] = None) -> Allocation:
    """The allocation this process runs in (sbatch or salloc), or a one-line error saying how to get one."""
    environ = os.environ if environ is None else environ
    job = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not job or not nodelist:
        raise EpdctlError("launcher slurm: not inside a Slurm allocation (SLURM_JOB_ID is unset): "
                          "run `epdctl up` in sbatch or salloc; `epdctl export slurm FILE -o job.sh` writes the job",
                          EXIT_USAGE)
    if not JOB_ID.fullmatch(job):
        raise EpdctlError(f"launcher slurm: SLURM_JOB_ID={job!r} is not a job id", EXIT_USAGE)
    nodes = tuple(line.strip() for line in _run(["scontrol", "show", "hostnames", nodelist],
                                                 "the allocation's nodes").splitlines() if line.strip())
    addresses: dict[str, str] = {}
    for line in _run(["scontrol", "-o", "show", "node", ",".join(nodes)], "the nodes' addresses").splitlines():
        fields = dict(word.split("=", 1) for word in line.split() if "=" in word)
        if fields.get("NodeName") in nodes:
            addresses[fields["NodeName"]] = fields.get("NodeAddr") or fields["NodeName"]
    if not nodes:
        raise EpdctlError(f"launcher slurm: the allocation {job} lists no node ({nodelist!r})")
    return Allocation(job_id=job, nodes=nodes, addresses=addresses, here=route_source(addresses.get(nodes[0], nodes[0])))


def route_source(address: str) -> str:
    """The local address the kernel would send from to reach `address` (no packet is sent): the
    address the nodes reach this host on, where a name like the host's own could resolve to loopback."""
    try:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((address, 9))
            return probe.getsockname()[0]
    except OSError:
        return socket.gethostname()


def step_name(run_token: str, instance: str) -> str:
    return f"{STEP_PREFIX}{run_token}.{instance}"


def srun_argv(job_id: str, node: str, run_token: str, instance: str) -> list[str]:
    """The argv prefix that runs one instance as a job step on `node` of the allocation.

    --overlap: steps share the job's resources (each instance is one task on whole nodes; epdctl
    pins devices itself). --kill-on-bad-exit: the step ends with its task. The environment is
    srun's own (--export=ALL), which the supervisor sets up exactly as for a local process."""
    return ["srun", f"--jobid={job_id}", "--overlap", "--nodes=1", "--ntasks=1", f"--nodelist={node}",
            f"--job-name={step_name(run_token, instance)}", "--kill-on-bad-exit=1", "--export=ALL",
            "--quiet", "--"]


def steps_of(job_id: str, run_token: str) -> dict[str, str]:
    """The live steps of a run: step id ("JOB.STEP") -> instance name. Empty when the job is gone."""
    if not JOB_ID.fullmatch(job_id):
        return {}
    try:
        out = _run(["squeue", "-h", "--steps", f"--jobs={job_id}", "-o", "%i %j"], "the run's steps")
    except EpdctlError:
        return {}
    prefix = step_name(run_token, "")
    steps = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].startswith(prefix) and STEP_ID.fullmatch(parts[0]):
            steps[parts[0]] = parts[1][len(prefix):]
    return steps


def signal_step(step: str, signame: str) -> None:
    """Deliver a signal to a step's task; KILL ends the step through Slurm. A step already gone is fine."""
    if not STEP_ID.fullmatch(step) or not signame.isalnum():
        return
    argv = ["scancel", "--quiet"] + ([] if signame == "KILL" else [f"--signal={signame}"]) + [step]
    try:
        subprocess.run(argv, capture_output=True, timeout=COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        pass


def end_steps(job_id: str, run_token: str, wait_s: float = 15.0) -> list[str]:
    """Every step of the run ended through Slurm, then checked gone: the steps that would not go."""
    deadline = time.monotonic() + wait_s
    left = steps_of(job_id, run_token)
    for step in left:
        signal_step(step, "KILL")
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = steps_of(job_id, run_token)
    return [f"{name} (step {step})" for step, name in left.items()]


def check_shared_folder(job_id: str, nodes: list[str], folder: str) -> None:
    """A folder the instances exchange files through (ECExampleConnector's) must be one folder on
    every node: a marker written here is read back by a step on each node before anything starts."""
    if not nodes or not JOB_ID.fullmatch(job_id):
        return
    import secrets

    token = secrets.token_hex(16)
    marker = os.path.join(folder, f".epdctl-shared-{token}")
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, token.encode())
        os.close(fd)
        argv = ["srun", f"--jobid={job_id}", "--overlap", f"--nodes={len(nodes)}", f"--ntasks={len(nodes)}",
                "--ntasks-per-node=1", f"--nodelist={','.join(nodes)}", "--quiet", "--label", "--",
                "cat", marker]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S * 2,
                                  stdin=subprocess.DEVNULL)
            out = done.stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EpdctlError(f"launcher slurm: cannot check that {folder} is shared by the nodes: {exc}") from None
        seen = sum(1 for line in out.splitlines() if line.split(":", 1)[-1].strip() == token)
        if seen < len(nodes):
            raise EpdctlError(f"launcher slurm: {folder} (the EC connector's shared_storage_path) is not the same "
                              f"folder on every node of {', '.join(nodes)}: ECExampleConnector across nodes needs a "
                              "shared file system (put it on one, e.g. NFS or Lustre, or pin the encoders and their "
                              "consumers to one node)")
    finally:
        try:
            os.unlink(marker)
        except OSError:
            pass
