"""The `epdctl` command line. Thin: parse, call one function, print.

Imports of anything heavy (aiohttp, the proxy, vllm, torch) happen inside the commands, so
`epdctl --help` and `epdctl plan` start fast (DESIGN §7.9).
"""

from __future__ import annotations

import functools
import json
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer

from epdctl.errors import EXIT_RUNTIME, EXIT_USAGE, EpdctlError

app = typer.Typer(
    help="Run vLLM's disaggregated Encode / Prefill / Decode serving from one YAML file.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

export_app = typer.Typer(help="Compile a topology for another runtime.", no_args_is_help=True)
app.add_typer(export_app, name="export")

_verbose = False


@app.callback()
def _global_options(
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Show tracebacks and debug detail on errors."),
) -> None:
    global _verbose
    _verbose = verbose


def _command(fn):
    """Turn EpdctlError into one line on stderr and its exit code; tracebacks only with -v."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EpdctlError as exc:
            if _verbose:
                traceback.print_exc()
            print(f"epdctl: {exc.message}" if "\n" not in exc.message else exc.message, file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:  # a bug: still one line unless -v
            if _verbose:
                traceback.print_exc()
            print(f"epdctl: internal error: {type(exc).__name__}: {exc} (run with -v for the traceback)", file=sys.stderr)
            raise typer.Exit(EXIT_RUNTIME) from None

    return wrapper


def _load(file: Path):
    from epdctl.devices import detect_device_count
    from epdctl.topology import load_topology, parse_topology

    # Detect devices only for the platform the file names: read it once cheaply first.
    topology = load_topology(file)
    count = detect_device_count(topology.platform)
    if count is not None:
        topology = parse_topology(file.read_text(encoding="utf-8"), str(file), device_count=count, source=file)
    return topology


def _plan(file: Path):
    from epdctl.plan import build_plan

    topology = _load(file)
    return topology, build_plan(topology, python=sys.executable)


FILE_ARG = typer.Argument(..., help="The topology YAML file.", show_default=False)


@app.command()
@_command
def validate(file: Path = FILE_ARG) -> None:
    """Check a topology file. Exit 0 when it is valid, 2 with FILE:LINE: errors when not."""
    topology = _load(file)
    roles = ", ".join(f"{len(getattr(topology, r))} {r}" for r in ("encode", "prefill", "decode", "pd") if getattr(topology, r))
    print(f"{file}: ok: topology {topology.name!r}, engine {topology.engine}, platform {topology.platform}: {roles}; proxy on {topology.proxy.host}:{topology.proxy.port}")


@app.command()
@_command
def plan(
    file: Path = FILE_ARG,
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON (DESIGN §4)."),
    format: str = typer.Option("text", "--format", help="text, json, or sh (a standalone bash script)."),
) -> None:
    """Print every process epdctl would start: argv, env, port and url."""
    topology, the_plan = _plan(file)
    if as_json:
        format = "json"
    if format == "json":
        print(json.dumps(the_plan.to_json(), indent=2))
    elif format == "sh":
        from epdctl.shellscript import render_script

        print(render_script(the_plan, str(file)), end="")
    elif format == "text":
        import shlex

        print(f"# topology {the_plan.name}: engine {the_plan.engine}, platform {the_plan.platform}")
        for spec in the_plan.processes:
            where = f"{spec.role}, devices {list(spec.devices)}" if spec.role != "proxy" else "proxy"
            print(f"\n## {spec.name} ({where}) -> {spec.url}")
            env = " ".join(shlex.quote(f"{k}={v}") for k, v in spec.env.items())
            print((env + " " if env else "") + " ".join(shlex.quote(a) for a in spec.argv))
    else:
        raise EpdctlError(f"--format: unknown format {format!r} (text, json or sh)", EXIT_USAGE)


@app.command()
@_command
def up(
    file: Path = FILE_ARG,
    detach: bool = typer.Option(False, "-d", "--detach", help="Return once everything is healthy; a supervisor stays behind."),
    wait_timeout: Optional[float] = typer.Option(None, "--wait-timeout", help="Seconds to wait for health (default: the topology's health.timeout_s)."),
) -> None:
    """Launch the topology: spawn, health-gate, then stream logs (or detach with -d).

    Ctrl-C, SIGTERM or SIGHUP tears everything down (exit 130, 143, 129).
    """
    from epdctl.supervisor import up as run_up

    topology, the_plan = _plan(file)
    code = run_up(topology, the_plan, detach=detach, wait_timeout=wait_timeout, source=file)
    raise typer.Exit(code)


@app.command()
@_command
def status(
    name: Optional[str] = typer.Argument(None, help="Topology name (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (DESIGN §4)."),
) -> None:
    """Show each instance: pid, port, url, state. Exit 3 when nothing is running."""
    from epdctl.status import show_status

    raise typer.Exit(show_status(name, as_json=as_json))


@app.command()
@_command
def logs(
    name: str = typer.Argument(..., help="Topology name."),
    instance: Optional[str] = typer.Argument(None, help="One instance (e.g. encode-0, proxy); default: all."),
    follow: bool = typer.Option(False, "-f", "--follow", help="Keep printing new lines."),
    tail: Optional[int] = typer.Option(None, "--tail", "-n", help="Only the last N lines of each log."),
) -> None:
    """Print the logs of a topology, prefixed by instance name."""
    from epdctl.status import show_logs

    show_logs(name, instance, follow=follow, tail=tail)


@app.command()
@_command
def down(
    target: Optional[str] = typer.Argument(None, help="Topology name or file (default: the only one running)."),
    grace: float = typer.Option(10.0, "-t", "--timeout", help="Seconds between SIGTERM and SIGKILL."),
) -> None:
    """Stop a topology: SIGTERM each process group, SIGKILL after GRACE, sweep descendants."""
    from epdctl.supervisor import down as run_down

    raise typer.Exit(run_down(target, grace=grace))


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@_command
def proxy(ctx: typer.Context) -> None:
    """Run the EPD proxy alone (flags of the upstream proxy; see `epdctl proxy --help`)."""
    from epdctl.proxy.__main__ import main as proxy_main

    raise typer.Exit(proxy_main(list(ctx.args)))


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@_command
def bench(ctx: typer.Context) -> None:
    """Load-test a topology through its proxy: TTFT, TPOT, ITL, E2E, throughput (see `epdctl bench --help`)."""
    from epdctl.bench.cli import main as bench_main

    raise typer.Exit(bench_main(list(ctx.args)))


@app.command()
@_command
def smoke(
    file: Path = FILE_ARG,
    keep_up: bool = typer.Option(False, "--keep-up", help="Leave the topology running afterwards."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write a JUnit XML report here."),
    wait_timeout: Optional[float] = typer.Option(None, "--wait-timeout", help="Seconds to wait for health."),
) -> None:
    """Bring the topology up, send golden requests, prove each role did its part, bring it down."""
    from epdctl.smoke import run_smoke

    topology, the_plan = _plan(file)
    raise typer.Exit(run_smoke(topology, the_plan, source=file, keep_up=keep_up, junit=junit, wait_timeout=wait_timeout))


@export_app.command("k8s")
@_command
def export_k8s(
    file: Path = FILE_ARG,
    output: Path = typer.Option(Path("k8s"), "-o", "--output", help="Folder for the manifests."),
    namespace: Optional[str] = typer.Option(None, "--namespace", help="Namespace for every object."),
    image: Optional[str] = typer.Option(None, "--image", help="Container image for the vLLM instances."),
    proxy_image: Optional[str] = typer.Option(None, "--proxy-image", help="Container image with epdctl for the proxy."),
    storage_class: Optional[str] = typer.Option(None, "--storage-class", help="StorageClass of the RWX EC volume."),
    check: bool = typer.Option(False, "--check", help="Validate every manifest against the Kubernetes schema."),
) -> None:
    """Write kubectl-apply-ready manifests (and a kustomization.yaml) for the topology."""
    from epdctl.k8s import export

    topology = _load(file)
    export(topology, file, output, namespace=namespace, image=image, proxy_image=proxy_image,
           storage_class=storage_class, check=check)


def main() -> None:
    app(prog_name="epdctl")


if __name__ == "__main__":  # pragma: no cover
    main()
