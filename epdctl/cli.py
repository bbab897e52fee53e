"""The `epdctl` command line. Thin: parse, call one function, print.

Imports of anything heavy (aiohttp, the proxy, vllm, torch) happen inside the commands, so
`epdctl --help` and `epdctl plan` start fast (docs/design.md, Style rules). Typer itself costs more to import
and set up than validating a file, so `validate`, `plan` and `--version` in their plain forms
are parsed by `_fast_command` without it; everything else (help, errors in the arguments)
goes to the typer app, which `_typer_app` builds on demand.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

from epdctl.errors import EXIT_RUNTIME, EXIT_USAGE, EpdctlError

_verbose = False
# The ranges of the numbers these commands take (bench, sweep, calibrate and proxy: cliparse.number).
# Typer takes them as text: cliparse parses and checks them, so that any bad one is one line.
WAIT_SECONDS = (0, 86_400)  # --wait-timeout (more than 0), down -t
MAX_TAIL_LINES = 10 ** 9


def _number(flag: str, text: Optional[str], kind: type, low, high, above: bool = False):
    """The number an option gives, or a one-line usage error (exit 2): cliparse.option."""
    from epdctl.cliparse import option  # argparse: kept off validate's and plan's fast path

    return option(flag, text, kind, low, high, above)


def _global_options(
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Show tracebacks and debug detail on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=lambda given: _version_option(given),
                                          help="Print epdctl's version and exit.")] = False,
) -> None:
    global _verbose
    _verbose = verbose


def _version_option(given: bool) -> None:
    if given:
        _print_version()


def _print_version() -> None:
    import epdctl

    print(f"epdctl {epdctl.__version__}")
    raise SystemExit(0)


def _command(fn):
    """Turn EpdctlError into one line on stderr and its exit code; tracebacks only with -v."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EpdctlError as exc:
            _traceback_if_verbose()
            print(_error_text(exc), file=sys.stderr)
            raise SystemExit(exc.exit_code) from None
        except KeyboardInterrupt:
            raise SystemExit(130) from None
        except BrokenPipeError:  # our reader left (`epdctl plan F | head`): nothing more to say
            from epdctl.pipes import silence

            silence(sys.stdout)  # or the exit flush fails again
            raise SystemExit(EXIT_RUNTIME) from None
        except Exception as exc:  # a bug: still one line unless -v
            _traceback_if_verbose()
            print(f"epdctl: internal error: {type(exc).__name__}: {exc} (run with -v for the traceback)", file=sys.stderr)
            raise SystemExit(EXIT_RUNTIME) from None

    return wrapper


def _error_text(exc: EpdctlError) -> str:
    """`epdctl: ` before each error, so every line of a report of several problems names us;
    a message with detail lines (a log tail) gets it once, unless it already starts with it."""
    lines = exc.message.splitlines() or [""]
    if exc.one_per_line or len(lines) == 1:
        return "\n".join(f"epdctl: {line}" for line in lines)
    return exc.message if exc.message.startswith("epdctl") else f"epdctl: {exc.message}"


def _traceback_if_verbose() -> None:
    if _verbose:
        import traceback  # only here: it is not free to import

        traceback.print_exc()


def _load(file: Path, on_this_machine: bool = True):
    """The topology, checked against this machine's devices and folders when it runs here."""
    from epdctl.config.load import load_topology
    from epdctl.devices import detect_device_count

    if not on_this_machine:
        return load_topology(file)
    return load_topology(file, device_count=detect_device_count, check_folders=True)


def _plan(file: Path):
    from epdctl.plan import build_plan

    from epdctl.commands import python_command, router_command

    topology = _load(file)
    return topology, build_plan(topology, python=python_command(), router=router_command(),
                                allocation=_allocation(topology))


def _allocation(topology):
    """launcher slurm: the allocation `up` runs in (its nodes and their addresses), else None."""
    if topology.launcher != "slurm":
        return None
    from epdctl.run.slurm import discover

    return discover()


def _topology_file(argument: str) -> Path:
    """A FILE argument, or a NAME: `./NAME.yaml` when here, else the shipped topology (see epdctl.names)."""
    from epdctl.names import topology_file

    return topology_file(argument)


def _topology_name(argument: Optional[str]) -> Optional[str]:
    """A NAME argument, or a FILE whose `name:` is read (see epdctl.names)."""
    from epdctl.names import topology_name

    return topology_name(argument) if argument is not None else None


# The annotations below are strings until `_typer_app` imports typer and typer reads them.
# A topology argument is a str, not a Path: Path("./x") would drop the `/` that makes it a FILE.

FILE_HELP = "The topology YAML file, or the name of a shipped one (see `epdctl topologies`)."
NAME_HELP = "Topology name, or its YAML file."


@_command
def validate(file: Annotated[str, typer.Argument(help=FILE_HELP, show_default=False)]) -> None:
    """Check a topology file. Exit 0 when it is valid, 2 with FILE:LINE: errors when not."""
    from epdctl.config.yamlmarks import one_line

    file = _topology_file(file)
    topology = _load(file)
    if topology.launcher == "slurm" and (os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID")):
        from epdctl.plan import place

        place(topology, _allocation(topology))  # in an allocation: its nodes are known, so check node: too
    roles = ", ".join(f"{len(getattr(topology, r))} {r}" for r in ("encode", "prefill", "decode", "pd") if getattr(topology, r))
    print(one_line(f"{file}: ok: topology {topology.name!r}, engine {topology.engine}, platform {topology.platform}: {roles}; proxy on {topology.proxy.host}:{topology.proxy.port}"))


PLAN_FORMATS = ("text", "json", "sh")


@_command
def plan(
    file: Annotated[str, typer.Argument(help=FILE_HELP, show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON (name, engine, platform, instances, proxy); the same as --format json.")] = False,
    format: Annotated[Optional[str], typer.Option("--format", help="text (the default), json, or sh (a standalone bash script).",
                                                  show_default=False)] = None,
) -> None:
    """Print every process epdctl would start: argv, env, port and url."""
    if format is not None and format not in PLAN_FORMATS:
        raise EpdctlError(f"--format: unknown format {format!r} (text, json or sh)", EXIT_USAGE)
    if as_json and format not in (None, "json"):
        raise EpdctlError(f"--json and --format {format} ask for different outputs: give one of them", EXIT_USAGE)
    file = _topology_file(file)
    topology, the_plan = _plan(file)
    format = "json" if as_json else format or "text"
    if format == "json":
        print(json.dumps(the_plan.to_json(), indent=2))
    elif format == "sh":
        from epdctl.export.sh import render_script

        if the_plan.launcher != "local":  # the script starts every process here, with no srun
            raise EpdctlError(f"--format sh: {file} has launcher {the_plan.launcher}; "
                              f"`epdctl export slurm {file} -o job.sh` writes its batch script", EXIT_USAGE)

        print(render_script(the_plan, str(file)), end="")
    else:
        _print_plan_text(the_plan)


def _print_plan_text(the_plan) -> None:
    import shlex

    from epdctl.run.logfiles import display  # values from the file may hold what a terminal acts on

    print(f"# topology {the_plan.name}: engine {the_plan.engine}, platform {the_plan.platform}")
    for spec in the_plan.processes:
        where = f"{spec.role}, devices {list(spec.devices)}" if spec.role != "proxy" else "proxy"
        print(f"\n## {spec.name} ({where}) -> {spec.url}")
        env = " ".join(shlex.quote(f"{k}={v}") for k, v in spec.env.items())
        print(display((env + " " if env else "") + " ".join(shlex.quote(a) for a in spec.argv)))


@_command
def up(
    file: Annotated[str, typer.Argument(help=FILE_HELP, show_default=False)],
    detach: Annotated[bool, typer.Option("-d", "--detach", help="Return once everything is healthy; a supervisor stays behind.")] = False,
    wait_timeout: Annotated[Optional[str], typer.Option("--wait-timeout", metavar="SECONDS", show_default=False,
                                                        help="Seconds to wait for health (default: the topology's health.timeout_s).")] = None,
) -> None:
    """Launch the topology: spawn, health-gate, then stream logs (or detach with -d).

    Ctrl-C, SIGTERM or SIGHUP tears everything down (exit 130, 143, 129).
    """
    from epdctl.up import up as run_up

    seconds = _number("--wait-timeout", wait_timeout, float, *WAIT_SECONDS, above=True)
    file = _topology_file(file)
    topology, the_plan = _plan(file)
    raise SystemExit(run_up(topology, the_plan, detach=detach, wait_timeout=seconds, source=file))


@_command
def status(
    name: Annotated[Optional[str], typer.Argument(help="Topology name, or its YAML file (default: all).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON: state, health, reasons, and each instance and the proxy.")] = False,
) -> None:
    """Show each instance: pid, port, url, state. Exit 0 healthy, 1 degraded or failed, 3 nothing running."""
    from epdctl.status import show_status

    raise SystemExit(show_status(_topology_name(name), as_json=as_json))


@_command
def logs(
    name: Annotated[str, typer.Argument(help=NAME_HELP)],
    instance: Annotated[Optional[str], typer.Argument(help="One instance (e.g. encode-0, proxy); default: all.")] = None,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="Keep printing new lines.")] = False,
    tail: Annotated[Optional[str], typer.Option("--tail", "-n", metavar="N", show_default=False,
                                                help="Only the last N lines of each log.")] = None,
) -> None:
    """Print the logs of a topology, prefixed by instance name."""
    from epdctl.status import show_logs

    lines = _number("--tail", tail, int, 0, MAX_TAIL_LINES)
    show_logs(_topology_name(name), instance, follow=follow, tail=lines)


@_command
def down(
    target: Annotated[Optional[str], typer.Argument(help="Topology name or file (default: the only one up).")] = None,
    grace: Annotated[str, typer.Option("-t", "--timeout", metavar="SECONDS", help="Seconds between SIGTERM and SIGKILL.")] = "10",
    ignore_missing: Annotated[bool, typer.Option("--ignore-missing", help="Exit 0 when NAME is not up (for cleanup scripts); without it, exit 1.")] = False,
) -> None:
    """Stop a topology: SIGTERM each process group, SIGKILL after GRACE, sweep descendants."""
    seconds = _number("-t/--timeout", grace, float, *WAIT_SECONDS)
    from epdctl.down import down as run_down

    raise SystemExit(run_down(target, grace=seconds, ignore_missing=ignore_missing))


@_command
def scale(
    name: Annotated[str, typer.Argument(help=NAME_HELP)],
    counts: Annotated[Optional[list[str]], typer.Argument(help="ROLE=N for encode, prefill, decode or pd (e.g. encode=3).",
                                                          show_default=False)] = None,
    wait_timeout: Annotated[str, typer.Option("--wait-timeout", help="Seconds to wait for new instances to be healthy "
                                              "and removed ones to drain.")] = "900",
) -> None:
    """Grow or drain a running topology's role without restarting the rest: new instances take traffic
    once healthy, removed ones finish their requests first."""
    seconds = _number("--wait-timeout", wait_timeout, float, *WAIT_SECONDS, above=True)
    from epdctl.scale import scale as run_scale

    raise SystemExit(run_scale(_topology_name(name), counts or [], seconds))


@_command
def events(
    name: Annotated[str, typer.Argument(help=NAME_HELP)],
    follow: Annotated[bool, typer.Option("-f", "--follow", help="Keep printing new events.")] = False,
) -> None:
    """Starts, health changes, exits and restarts of every process (events.jsonl)."""
    from epdctl.status import show_events

    show_events(_topology_name(name), follow=follow)


@_command
def proxy(ctx: typer.Context) -> None:
    """Run the EPD proxy alone (flags of the upstream proxy; see `epdctl proxy --help`)."""
    from epdctl.proxy.__main__ import main as proxy_main

    raise SystemExit(proxy_main(list(ctx.args)))


@_command
def bench(ctx: typer.Context) -> None:
    """Load-test a topology through its proxy: TTFT, TPOT, ITL, E2E, throughput (see `epdctl bench --help`)."""
    from epdctl.bench.cli import main as bench_main

    raise SystemExit(bench_main(list(ctx.args)))


@_command
def sweep(ctx: typer.Context) -> None:
    """Bring each split (1e1pd, 2e1pd, 1e1p1d, ...) up, bench it, bring it down; rank by goodput (see `epdctl sweep --help`)."""
    from epdctl.sweep import main as sweep_main

    raise SystemExit(sweep_main(list(ctx.args)))


@_command
def calibrate(ctx: typer.Context) -> None:
    """Probe a running topology's instances and fit the simulated engine's costs: a sim profile (see `epdctl calibrate --help`)."""
    from epdctl.calibrate import main as calibrate_main

    raise SystemExit(calibrate_main(list(ctx.args)))


@_command
def smoke(
    file: Annotated[str, typer.Argument(help=FILE_HELP, show_default=False)],
    keep_up: Annotated[bool, typer.Option("--keep-up", help="Leave the topology running afterwards.")] = False,
    junit: Annotated[Optional[Path], typer.Option("--junit", help="Write a JUnit XML report here.")] = None,
    wait_timeout: Annotated[Optional[str], typer.Option("--wait-timeout", metavar="SECONDS", show_default=False,
                                                        help="Seconds to wait for health.")] = None,
) -> None:
    """Bring the topology up, send golden requests, prove each role did its part, bring it down."""
    from epdctl.smoke import run_smoke

    seconds = _number("--wait-timeout", wait_timeout, float, *WAIT_SECONDS, above=True)
    file = _topology_file(file)
    topology, the_plan = _plan(file)
    raise SystemExit(run_smoke(topology, the_plan, source=file, keep_up=keep_up, junit=junit, wait_timeout=seconds))


@_command
def export_k8s(
    file: Annotated[str, typer.Argument(help=FILE_HELP, show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the manifests.")] = Path("k8s"),
    namespace: Annotated[Optional[str], typer.Option("--namespace", help="Namespace for every object.")] = None,
    image: Annotated[Optional[str], typer.Option("--image", help="Container image for the vLLM instances.")] = None,
    proxy_image: Annotated[Optional[str], typer.Option("--proxy-image", help="Container image with epdctl for the proxy.")] = None,
    storage_class: Annotated[Optional[str], typer.Option("--storage-class", help="StorageClass of the RWX EC volume.")] = None,
    device_resource: Annotated[Optional[str], typer.Option("--device-resource", help="The device plugin's resource each instance requests (default: nvidia.com/gpu for cuda, gpu.intel.com/i915 for xpu, huawei.com/Ascend910 for npu).")] = None,
    check: Annotated[bool, typer.Option("--check", help="Validate every manifest against the Kubernetes schema.")] = False,
) -> None:
    """Write kubectl-apply-ready manifests (and a kustomization.yaml) for the topology."""
    from epdctl.export.k8s import export

    file = _topology_file(file)
    topology = _load(file, on_this_machine=False)  # its devices and folders are the cluster's
    export(topology, file, output, namespace=namespace, image=image, proxy_image=proxy_image,
           storage_class=storage_class, device_resource=device_resource, check=check)


@_command
def export_slurm(
    file: Annotated[str, typer.Argument(help=FILE_HELP, show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="The batch script to write.")] = Path("job.sh"),
    nodes: Annotated[Optional[str], typer.Option("--nodes", help="Nodes to ask for (default: the nodes the topology names, at least 1).")] = None,
    time: Annotated[Optional[str], typer.Option("--time", help="The job's time limit (Slurm's form, e.g. 02:00:00).")] = None,
    partition: Annotated[Optional[str], typer.Option("--partition", help="Slurm partition.")] = None,
    account: Annotated[Optional[str], typer.Option("--account", help="Slurm account.")] = None,
    grace: Annotated[str, typer.Option("--grace", help="Seconds before the time limit that epdctl gets SIGTERM.")] = "60",
    gres: Annotated[Optional[str], typer.Option("--gres", help="The GRES name the nodes' devices are asked for by (--gres=NAME:N; default: npu for platform npu, else --gpus-per-node).")] = None,
) -> None:
    """Write a Slurm batch script that runs `epdctl up FILE` in the allocation: `sbatch job.sh`."""
    from epdctl.export.slurm import export

    node_count = _number("--nodes", nodes, int, 1, 10000) if nodes is not None else None
    grace_s = _number("--grace", grace, int, 1, 86400)
    file = _topology_file(file)
    topology = _load(file, on_this_machine=False)  # its devices and folders are the cluster's
    export(topology, file, output, nodes=node_count, time=time, partition=partition, account=account, grace_s=grace_s,
           gres=gres)


@_command
def topologies() -> None:
    """List the shipped topologies (name, engine, platform, roles): `epdctl up NAME` runs one from any folder."""
    from epdctl.names import describe_shipped

    print("\n".join(describe_shipped()))


@_command
def init(
    name: Annotated[str, typer.Argument(help="A shipped topology (see `epdctl topologies`).", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Where to write it (default: ./NAME.yaml); never over an existing file.", show_default=False)] = None,
) -> None:
    """Copy a shipped topology out, to edit and run as your own."""
    from epdctl.names import as_file_argument, copy_shipped

    written = copy_shipped(name, output)
    print(f"wrote {written}; edit it, then `epdctl up {as_file_argument(written)}`")


def _typer_app():
    """The full command line, with help and typer's argument errors."""
    global typer  # the commands' annotations name it: they are evaluated when typer reads them
    import typer

    app = typer.Typer(
        help="Run vLLM's disaggregated Encode / Prefill / Decode serving from one YAML file.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )
    app.callback()(_global_options)
    for command in (validate, plan, up, status, logs, events, down, scale, topologies, init):
        app.command()(command)
    passthrough = {"context_settings": {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
                   "add_help_option": False}
    app.command(**passthrough)(proxy)
    app.command(**passthrough)(bench)
    app.command(**passthrough)(sweep)
    app.command(**passthrough)(calibrate)
    app.command()(smoke)
    export_app = typer.Typer(help="Compile a topology for another runtime.", no_args_is_help=True)
    export_app.command("k8s")(export_k8s)
    export_app.command("slurm")(export_slurm)
    app.add_typer(export_app, name="export")
    return app


def _fast_command(args: list[str]) -> Optional[Callable[[], None]]:
    """The call for `[-v] validate FILE`, `[-v] plan FILE [--json] [--format F]` or `--version`.

    None for anything else, including any form typer would read differently or answer with a
    usage error (an unknown or repeated option, `--format=F`, a file it cannot read):
    typer then handles it as usual.
    """
    global _verbose
    verbose = args[:1] in (["-v"], ["--verbose"])
    args = args[1:] if verbose else args
    if args == ["--version"]:
        return _print_version
    if not args or args[0] not in ("validate", "plan"):
        return None
    options: dict[str, object] = {}
    files: list[str] = []
    words = iter(args[1:])
    for word in words:
        if args[0] == "plan" and word == "--json" and "as_json" not in options:
            options["as_json"] = True
        elif args[0] == "plan" and word == "--format" and "format" not in options:
            options["format"] = next(words, "-")
            if options["format"].startswith("-"):
                return None
        elif word and not word.startswith("-") and not files:
            files.append(word)
        else:
            return None
    if not files or (os.path.exists(files[0]) and not os.access(files[0], os.R_OK)):
        return None
    _verbose = verbose
    command = validate if args[0] == "validate" else plan
    return functools.partial(command, files[0], **options)


def main() -> None:
    fast = _fast_command(sys.argv[1:])
    if fast is not None:
        fast()
    else:
        _typer_app()(prog_name="epdctl")


if __name__ == "__main__":  # pragma: no cover
    main()
