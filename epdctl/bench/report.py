"""Bench results → the figures `vllm bench serve` reports, as a table, JSON, a saved file, a plot."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from epdctl.bench import ec_reuse
from epdctl.bench.pool import describe as describe_pool
from epdctl.bench.runner import Run
from epdctl.errors import EXIT_USAGE, EpdctlError
from epdctl.run.logfiles import display

LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
PERCENTILES = (50, 90, 99)


def stats(values_ms: list[float]) -> dict[str, float]:
    import numpy as np

    if not values_ms:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "std": 0.0}
    arr = np.asarray(values_ms, dtype=float)
    out = {"mean": float(arr.mean())}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(arr, p))
    out["std"] = float(arr.std())
    return out


def summarize(run: Run, config: dict[str, Any], slo_ttft_ms: Optional[float] = None,
              slo_tpot_ms: Optional[float] = None, media: tuple[int, int] = (0, 0),
              encoders: Optional[bool] = None) -> dict[str, Any]:
    """The report. `media` is ec_reuse.workload() of the requests: items looked up, and repeats within
    the run; `encoders` False: the target has none, so no EC cache is in play."""
    done = [r for r in run.results if r.ok]
    failed = [r for r in run.results if not r.ok]
    ttft = [r.ttft * 1000 for r in done]
    tpot = [(r.e2e - r.ttft) * 1000 / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    itl = [gap * 1000 for r in done for gap in r.itl]
    e2e = [r.e2e * 1000 for r in done]
    output_tokens = sum(r.output_tokens for r in done)
    input_tokens = sum(r.prompt_tokens for r in done)
    duration = run.duration or 1e-9
    report: dict[str, Any] = {
        "completed": len(done),
        "failed": len(failed),
        "duration_s": run.duration,
        "request_throughput": len(done) / duration,
        "output_token_throughput": output_tokens / duration,
        "total_token_throughput": (output_tokens + input_tokens) / duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "ttft_ms": stats(ttft),
        "tpot_ms": stats(tpot),
        "itl_ms": stats(itl),
        "e2e_ms": stats(e2e),
    }
    if run.interrupted:  # Ctrl-C: the figures cover only the requests that finished before it
        report["interrupted"] = True
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        good = 0
        for r in done:
            r_tpot = (r.e2e - r.ttft) * 1000 / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
            if (slo_ttft_ms is None or r.ttft * 1000 <= slo_ttft_ms) and (slo_tpot_ms is None or r_tpot <= slo_tpot_ms):
                good += 1
        report["goodput"] = good / duration
        report["slo"] = {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms, "met": good}
    report["ec"] = ec_reuse.summarize(run.ec_reused, *media, encoders=encoders)
    if run.pool:  # an epdctl proxy: its pool at the start and at each change (bench/pool.py)
        report["pool"] = run.pool
    report["errors"] = sorted({r.error for r in failed})[:5]
    report["config"] = {**config, "model": run.model}
    report["samples_ms"] = {"ttft": ttft, "tpot": tpot, "e2e": e2e}
    return report


def public(report: dict[str, Any]) -> dict[str, Any]:
    """The report without the raw samples (those go only into saved files, for plots)."""
    return {k: v for k, v in report.items() if k != "samples_ms"}


def print_table(report: dict[str, Any], out) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(file=out)
    partial = " (interrupted: partial figures)" if report.get("interrupted") else ""
    table = Table(title=f"epdctl bench: {report['config'].get('target', '')}{partial}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("completed / failed", f"{report['completed']} / {report['failed']}")
    table.add_row("duration (s)", f"{report['duration_s']:.2f}")
    table.add_row("request throughput (req/s)", f"{report['request_throughput']:.2f}")
    table.add_row("output token throughput (tok/s)", f"{report['output_token_throughput']:.1f}")
    if "goodput" in report:
        table.add_row("goodput (req/s)", f"{report['goodput']:.2f}")
    for key in LATENCIES:
        s = report[key]
        table.add_row(f"{key[:-3].upper()} ms mean / p50 / p90 / p99",
                      f"{s['mean']:.2f} / {s['p50']:.2f} / {s['p90']:.2f} / {s['p99']:.2f}")
    console.print(table)
    ec_line = ("EC cache: not counted (the run was interrupted)" if report.get("interrupted")
               else ec_reuse.describe(report["ec"], bool(report["config"].get("reuse_images"))))
    if ec_line:
        console.print(ec_line, markup=False, highlight=False)
    pool_line = describe_pool(report.get("pool") or [])
    if pool_line:
        console.print(pool_line, markup=False, highlight=False)
    for error in report.get("errors", []):
        console.print(f"[red]error:[/red] {escape(display(error))}", markup=True, highlight=False)  # not markup


def save(report: dict[str, Any], directory: str, label: str) -> list[Path]:
    """DIR/LABEL-TIMESTAMP.json, plus a PNG of the latency CDFs when matplotlib is installed."""
    from epdctl.atomicfile import figure_bytes, make_output_folder, write_output

    folder = make_output_folder(directory, "--save")
    stem = f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    written = [write_output(folder / f"{stem}.json", json.dumps(report, indent=2) + "\n", "--save")]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key in zip(axes, ("ttft", "tpot", "e2e")):
        values = sorted(report["samples_ms"][key])
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))])
        ax.set_title(f"{key.upper()} CDF")
        ax.set_xlabel("ms")
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of requests")
    fig.suptitle(f"{label}: {report['completed']} requests, {report['request_throughput']:.2f} req/s")
    fig.tight_layout()
    png = figure_bytes(fig, dpi=100)
    plt.close(fig)
    written.append(write_output(folder / f"{stem}.png", png, "--save"))
    return written


def load_report(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise EpdctlError(f"{path}: not a bench report: {exc}", EXIT_USAGE) from None
    if not isinstance(data, dict) or "ttft_ms" not in data:
        raise EpdctlError(f"{path}: not a bench report (no ttft_ms)", EXIT_USAGE)
    return data


# (label, key, higher is better): labels short enough that three reports fit 80 columns.
COMPARED = [("requests/s", "request_throughput", True), ("output tok/s", "output_token_throughput", True),
            ("goodput req/s", "goodput", True)] + [
    (f"{key[:-3].upper()} {stat} ms", f"{key}.{stat}", False) for key in LATENCIES for stat in ("mean", "p50", "p99")]


def _get(report: dict[str, Any], dotted: str) -> Optional[float]:
    value: Any = report
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def compare(paths: list[str], out) -> None:
    """Side by side, each column with its ratio to the first report (the baseline)."""
    from rich.console import Console
    from rich.table import Table

    reports = [load_report(p) for p in paths]
    table = Table(title="epdctl bench --compare (ratio to the first)", title_justify="left",
                  caption="+ higher is better, - lower is better; goodput needs --slo-ttft-ms/--slo-tpot-ms",
                  caption_justify="left")
    table.add_column("metric", no_wrap=True)
    for path in paths:
        table.add_column(Path(path).stem, justify="right", overflow="fold")
    for label, key, higher_better in COMPARED:
        base = _get(reports[0], key)
        cells = []
        for i, report in enumerate(reports):
            value = _get(report, key)
            if value is None:
                cells.append("-")
                continue
            cell = f"{value:.2f}"
            if i and base:
                cell += f" ({value / base:.2f}x)"
            cells.append(cell)
        table.add_row(f"{label} {'+' if higher_better else '-'}", *cells)
    # A warm run beside a cold one compares the cache with the encoders: the row makes that visible.
    table.add_row("EC items reused", *(_ec_cell(report) for report in reports))
    Console(file=out).print(table)


def _ec_cell(report: dict[str, Any]) -> str:
    ec = report.get("ec")
    if not isinstance(ec, dict):
        return "not recorded"
    if ec.get("reused_items") is None:
        return "no encoders" if ec.get("source") == ec_reuse.NO_ENCODERS else "unknown"
    return f"{ec['reused_items']} of {ec.get('media_items', '?')}"
