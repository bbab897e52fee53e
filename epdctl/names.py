"""NAME or FILE: the one rule for every command's topology argument, and the shipped topologies.

An argument containing `/` or ending in `.yaml`/`.yml` is a FILE; anything else is a NAME.
Commands that act on a running topology (status, logs, events, down, bench, calibrate) read a
FILE's `name:`. Commands that read a file (validate, plan, up, smoke, sweep, export k8s) take a
NAME as `./NAME.yaml` when the current folder has one (a copy made by `epdctl init` wins), else
as the shipped topology NAME, which is package data and so works from any folder.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from epdctl.errors import EXIT_RUNTIME, EXIT_USAGE, EpdctlError

SHIPPED_DIR = Path(__file__).resolve().parent / "topologies"
FILE_SUFFIXES = (".yaml", ".yml")


def is_file_argument(argument: str) -> bool:
    """The rule: a FILE has a `/` or a .yaml/.yml ending; anything else is a NAME."""
    return "/" in argument or os.sep in argument or argument.endswith(FILE_SUFFIXES)


def shipped_topologies() -> dict[str, Path]:
    """The shipped topologies by name (their file names are their `name:`)."""
    return {path.stem: path for path in sorted(SHIPPED_DIR.glob("*.yaml"), key=lambda path: path.stem)}


def topology_name(argument: str) -> str:
    """The running topology a NAME-taking command acts on: a NAME as it is, or a FILE's `name:`."""
    if is_file_argument(argument):
        from epdctl.config.load import load_topology

        return load_topology(argument).name
    from epdctl.run.state import check_name  # not at the top: `plan FILE` need not import psutil

    return check_name(argument)


def topology_file(argument: str) -> Path:
    """The file a FILE-taking command reads: the FILE; for a NAME, ./NAME.yaml (or .yml) when it
    exists here, else the shipped topology NAME."""
    if is_file_argument(argument):
        return Path(argument)
    for suffix in FILE_SUFFIXES:
        local = Path(argument + suffix)
        if os.path.lexists(local):  # whatever it is: loading it names its problem
            return local
    shipped = shipped_topologies().get(argument)
    if shipped is None:
        raise EpdctlError(_not_shipped(argument), EXIT_USAGE)
    return shipped


def _not_shipped(argument: str) -> str:
    names = list(shipped_topologies())
    message = f"{argument!r} is not a shipped topology, nor is there ./{argument}.yaml here"
    if os.path.lexists(argument):
        return f"{message}; to read the file {argument!r}, write ./{argument}"
    return message + did_you_mean(argument, names) + f" (shipped: {', '.join(names)}; see `epdctl topologies`)"


def did_you_mean(argument: str, names) -> str:
    close = difflib.get_close_matches(argument, list(names), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def describe_shipped() -> list[str]:
    """`epdctl topologies`: one line each, name, engine, platform and roles."""
    from epdctl.config.load import load_topology

    rows = []
    for name, path in shipped_topologies().items():
        topology = load_topology(path)
        roles = ", ".join(f"{len(getattr(topology, role))} {role}" for role in ("encode", "prefill", "decode", "pd")
                          if getattr(topology, role))
        rows.append((name, topology.engine, topology.platform, roles))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return [f"{n:<{widths[0]}}  {e:<{widths[1]}}  {p:<{widths[2]}}  {r}" for n, e, p, r in rows]


def copy_shipped(name: str, output: Path | None) -> Path:
    """`epdctl init NAME [-o FILE]`: the shipped topology's text, to edit. Never over an existing
    file or through a symlink (O_EXCL refuses both)."""
    shipped = shipped_topologies()
    if is_file_argument(name) or name not in shipped:
        raise EpdctlError(f"init: {name!r} is not a shipped topology" + did_you_mean(name, shipped)
                          + f" (shipped: {', '.join(shipped)}; see `epdctl topologies`)", EXIT_USAGE)
    target = Path(output) if output is not None else Path(f"{name}.yaml")
    if target.is_dir() and not target.is_symlink():
        target = target / f"{name}.yaml"
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        raise EpdctlError(f"init: {target} already exists; refusing to overwrite it (choose another with -o)",
                          EXIT_RUNTIME) from None
    except OSError as exc:
        raise EpdctlError(f"init: cannot write {target}: {exc.strerror}", EXIT_RUNTIME) from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(shipped[name].read_bytes())
    return target


def as_file_argument(path: Path) -> str:
    """How to name `path` so the rule reads it as a FILE (`./x` for a bare `x`)."""
    text = str(path)
    return text if is_file_argument(text) else f"./{text}"
