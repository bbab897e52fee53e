"""`bench --compare` on saved reports: no server needed."""

from __future__ import annotations

import json

from conftest import epdctl

LATENCY = {"mean": 10.0, "p50": 9.0, "p90": 12.0, "p99": 15.0}


def _report(path, throughput: float, goodput=None) -> str:
    report = {"completed": 8, "failed": 0, "duration_s": 1.0, "request_throughput": throughput,
              "output_token_throughput": throughput * 4, "ttft_ms": LATENCY, "tpot_ms": LATENCY,
              "itl_ms": LATENCY, "e2e_ms": LATENCY, "ec": {"source": "no encoders", "reused_items": None}}
    if goodput is not None:
        report["goodput"] = goodput
    path.write_text(json.dumps(report))
    return str(path)


def test_compare_fits_80_columns_and_shows_goodput(tmp_path):
    reports = [_report(tmp_path / "baseline-20261206-034512.json", 4.0, goodput=2.0),
               _report(tmp_path / "split-2e1pd-20261206-040000.json", 8.0, goodput=6.0),
               _report(tmp_path / "no-slo-20261206-041500.json", 6.0)]
    out = epdctl("bench", "--compare", *reports, env={"COLUMNS": "80"}, check=0).stdout
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines), "\n".join(lines)
    rows = {line.split("│")[1].strip(): line for line in lines if line.count("│") >= 4}
    for metric in ("requests/s +", "output tok/s +", "goodput req/s +", "TTFT p50 ms -", "E2E p99 ms -",
                   "EC items reused"):
        assert metric in rows, f"{metric!r} not a whole row label in:\n{out}"
    assert "(2.00x)" in rows["requests/s +"] and "(3.00x)" in rows["goodput req/s +"]
    assert rows["goodput req/s +"].rstrip(" │").endswith("-")  # the third report had no SLO
    assert "no encoders" in rows["EC items reused"]
