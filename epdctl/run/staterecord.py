"""`state.json`'s format, typed: the one definition of what the supervisor writes and every
command reads (docs/design.md, "State on disk").

The supervisor builds a StateRecord and `StateDir.write` checks it before it is written;
`StateDir.read` checks every file against it before a command sees a value, so a pid is an int
(never `true` or `"1"`), a port is a port, and a hand-edited or truncated file is one line naming
the field, not a traceback in whichever command reads it first. The format only grows: keys an
older epdctl wrote are all optional here, and keys a newer one adds are kept as they are.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError

from epdctl.errors import EpdctlError

Pid = Annotated[StrictInt, Field(gt=0)]
Port = Annotated[StrictInt, Field(ge=1, le=65535)]
Text = Annotated[str, Field(max_length=64 * 1024)]
Name = Annotated[str, Field(min_length=1, max_length=256)]


class _Record(BaseModel):
    # A newer epdctl's keys are kept (and written back) as they are, never refused.
    model_config = ConfigDict(extra="allow")


class ProcessRecord(_Record):
    """One supervised process (run/child.py writes it)."""

    name: Name
    role: Name
    port: Port
    url: Text
    devices: list[StrictInt] = []
    host: Optional[Text] = None
    side_channel_port: Optional[Port] = None
    pid: Optional[Pid] = None
    pgid: Optional[Pid] = None
    create_time: Optional[float] = None
    log: Optional[Text] = None
    argv: list[str] = []
    env: dict[str, str] = {}
    state: Optional[Name] = None  # a ProcessState word; one this version does not know is read as exited
    exit_code: Optional[StrictInt] = None
    healthy_after_s: Optional[float] = None
    error: Optional[Text] = None
    restarts: StrictInt = 0
    last_exit: Optional[dict[str, Any]] = None
    since: Optional[Text] = None
    adopted: StrictBool = False
    # launcher slurm: the job step and its task on the node
    node: Optional[Name] = None
    step: Optional[Name] = None
    task_pid: Optional[Pid] = None
    task_create_time: Optional[float] = None


class SupervisorRecord(_Record):
    pid: Optional[Pid] = None
    create_time: Optional[float] = None
    mode: Optional[Name] = None  # foreground | detached
    host: Optional[Name] = None


class StorageRecord(_Record):
    path: Text
    created: StrictBool = False


class LauncherRecord(_Record):
    kind: Optional[Name] = None  # local | slurm
    job: Optional[Name] = None


class AutoscaleBounds(_Record):
    min: StrictInt
    max: StrictInt
    target_inflight: StrictFloat


class AutoscaleChange(_Record):
    at: Optional[Text] = None
    role: Name
    from_: StrictInt = Field(alias="from")
    to: StrictInt
    why: Text = ""
    status: Optional[Name] = None
    job: Optional[Name] = None


class AutoscaleRecord(_Record):
    roles: dict[Name, AutoscaleBounds] = {}
    history: list[AutoscaleChange] = []


class ScaleRecord(_Record):
    """run/scaler.py's record: the scaled sizes and ports (what an adopting `up` plans), the pool
    file's version, the scale under way (and the last one refused), the autoscaler's pools."""

    counts: dict[Name, StrictInt] = {}
    ports: dict[Name, Port] = {}
    pool_version: StrictInt = 0
    job: Optional[dict[str, Any]] = None
    refused: Optional[dict[str, Any]] = None
    autoscale: Optional[AutoscaleRecord] = None


class StateRecord(_Record):
    name: Name
    source: Optional[Text] = None
    run_token: Optional[Name] = None
    phase: Optional[Name] = None  # a TopologyPhase word
    error: Optional[Text] = None
    failure: Optional[dict[str, Any]] = None  # cause, teardown lines, detail: for `up -d` to show
    state_dir: Optional[Text] = None
    supervisor: SupervisorRecord = SupervisorRecord()
    storage: list[StorageRecord] = []
    launcher: LauncherRecord = LauncherRecord()
    processes: list[ProcessRecord] = []
    health_timeout_s: Optional[float] = None
    scale: Optional[ScaleRecord] = None
    evidence: Optional[dict[str, Any]] = None  # run/witness.py's last look


class UnreadableState(EpdctlError):
    """A state file of ours that is not the format (hand-edited, truncated): `down` then finds the
    topology's processes by their tag, as when the state is gone."""

    def __init__(self, where: str, why: str, name: str):
        super().__init__(f"{where}: unreadable state ({why}); `epdctl down {name}` stops what is left of it "
                         "by its processes' EPDCTL_RUN tag")


def checked(data: Any, where: str, name: str) -> dict[str, Any]:
    """`data` as the format has it (the keys it had, values checked), or UnreadableState naming the field."""
    try:
        record = StateRecord.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(the file)"
        raise UnreadableState(where, f"{field}: {first['msg']}", name) from None
    return record.model_dump(mode="json", exclude_unset=True, by_alias=True)
