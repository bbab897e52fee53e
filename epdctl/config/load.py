"""Topology file -> Topology: a bounded read, YAML with marks and ${VARS}, the schema, the
cross-field checks, and the sim profile it names. Every error is one `FILE:LINE: field: message`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

from pydantic import ValidationError

from epdctl.config.checks import cross_check
from epdctl.config.profile import load_profile
from epdctl.config.schema import ROLES, Topology
from epdctl.config.yamlmarks import Marks, error_line, format_validation, load_marked, read_text_file
from epdctl.errors import EXIT_USAGE, EpdctlError

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
    text = read_text_file(path)
    return parse_topology(text, str(path), environ=environ, device_count=device_count, source=path,
                          check_folders=check_folders)


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
        raise EpdctlError(format_validation(exc, filename, marks, Topology), EXIT_USAGE, one_per_line=True) from None
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
    resolved._sim_costs = {role: profile.flags(role) for role in ROLES}
    return resolved


def _name_from_stem(stem: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", stem.lower()).strip("-")
    return name or "topology"
