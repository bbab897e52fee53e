"""`epdctl bench` run after run against one topology: each run cold unless asked, and the EC reuse it saw reported."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

from epdctl.bench.dataset import synthetic
from epdctl.bench.ec_reuse import workload

from conftest import REPO, assert_no_orphans, epdctl, free_ports, write_sim_topology

# A real encode cost, so a run that skips the encoders shows in TTFT; large enough that a loaded
# test machine's scheduling noise stays well inside the 25% the runs must agree within.
TIMINGS = "sim-ttft-ms: 50, sim-tpot-ms: 2, sim-encode-ms: 150"
RUN = ("--num-prompts", "40", "--concurrency", "8", "--max-tokens", "4", "--image-size", "64")


def bench_json(*args: str) -> dict:
    return json.loads(epdctl("bench", *args, "--json", check=0).stdout)


def test_identical_runs_measure_the_same_and_a_warm_run_says_so(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="runs", timings=TIMINGS)
    try:
        epdctl("up", "-d", str(topology), check=0)
        first, second = bench_json("runs", *RUN), bench_json("runs", *RUN)
        assert first["completed"] == second["completed"] == 40
        ttft = first["ttft_ms"]["p50"], second["ttft_ms"]["p50"]
        assert min(ttft) >= 200, f"TTFT p50 {ttft}: an encode (150 ms) + prefill (50 ms) is missing"
        assert abs(ttft[1] - ttft[0]) <= 0.25 * ttft[0], f"TTFT p50 of two identical runs: {ttft}"
        for report in (first, second):
            assert report["ec"] == {"reused_items": 0, "encoded_items": 40, "media_items": 40, "repeats_in_run": 0,
                                    "warm": False, "source": "proxy /metrics"}

        cold = bench_json("runs", *RUN, "--reuse-images")  # the seed's own images: new to this cache
        assert cold["ec"]["reused_items"] == 0 and cold["ec"]["warm"] is False
        warm = epdctl("bench", "runs", *RUN, "--reuse-images", check=0).stdout
        assert "EC cache: 40 of 40 items reused (warm run: as --reuse-images asked)" in warm, warm
        warm_json = bench_json("runs", *RUN, "--reuse-images")
        assert warm_json["ec"]["reused_items"] == 40 and warm_json["ec"]["encoded_items"] == 0
        assert warm_json["ec"]["warm"] is True and warm_json["config"]["reuse_images"] is True
        # Skipping the encoder shows: the figures are the cache's, and the report says so.
        assert warm_json["ttft_ms"]["p50"] < 0.8 * first["ttft_ms"]["p50"]
    finally:
        epdctl("down", "runs", check=0)
        assert_no_orphans(str(state_dir), list(ports.values()))


def test_repeat_ratio_reuses_within_the_run_and_the_text_report_says_cold(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="repeats")
    try:
        epdctl("up", "-d", str(topology), check=0)
        # One request at a time: a repeated image's EC file is always written before it comes again.
        args = ("repeats", "--num-prompts", "20", "--concurrency", "1", "--max-tokens", "2", "--image-size", "32",
                "--repeat-ratio", "0.5", "--seed", "7")
        report = bench_json(*args)
        ec = report["ec"]
        assert ec["repeats_in_run"] > 0 and ec["reused_items"] == ec["repeats_in_run"], ec
        assert ec["warm"] is False and ec["encoded_items"] == 20 - ec["reused_items"]
        text = epdctl("bench", *args, check=0).stdout
        assert f"EC cache: {ec['reused_items']} of 20 items reused (cold run; {ec['repeats_in_run']} repeats within it)" \
            in text, text
    finally:
        epdctl("down", "repeats", check=0)
        assert_no_orphans(str(state_dir), list(ports.values()))


def test_the_seed_fixes_the_workload_and_the_nonce_only_the_pixels():
    from PIL import Image

    def run(nonce: bytes):
        return synthetic(12, images_per_request=2, image_size=48, repeat_ratio=0.4, prompt_len=9, max_tokens=5,
                         seed=3, nonce=nonce)

    a, b, again = run(b"first run"), run(b"second run"), run(b"first run")

    def shape(requests):
        out = []
        for request in requests:
            parts = request.body["messages"][0]["content"]
            urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
            sizes = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).size for u in urls]
            out.append((parts[-1]["text"], request.body["max_tokens"], sizes))
        return out

    def urls(requests):
        return [p["image_url"]["url"] for r in requests for p in r.body["messages"][0]["content"] if "image_url" in p]

    assert shape(a) == shape(b)
    assert workload(a, 0) == workload(b, 0) and workload(a, 0)[1] > 0  # the same repeats, at the same places
    assert [u == v for u in urls(a) for v in urls(a)] == [u == v for u in urls(b) for v in urls(b)]
    assert not set(urls(a)) & set(urls(b))  # no image of one run is an image of the other
    assert urls(a) == urls(again)


def test_a_target_without_proxy_metrics_reports_unknown_reuse(procs):
    url = procs.sim(free_ports(1)[0], "--sim-ttft-ms", "1", "--sim-tpot-ms", "1", "--sim-encode-ms", "1")
    args = ("--url", url, "--num-prompts", "3", "--concurrency", "1", "--max-tokens", "2", "--image-size", "16")
    report = bench_json(*args)
    assert report["completed"] == 3
    assert report["ec"]["reused_items"] is None and report["ec"]["encoded_items"] is None
    assert report["ec"]["source"] == "unknown"
    text = epdctl("bench", *args, check=0).stdout
    assert "EC cache: unknown" in text and "reused (" not in text


def test_a_topology_without_encoders_reports_no_ec_cache(tmp_path, state_dir):
    """P+D behind epdctl's proxy counts 0 reused items, vllm-router counts none: either way no EC
    cache is in play, and the report must say that rather than "0 reused (cold run)" or "unknown"."""
    topology, ports = write_sim_topology(tmp_path, "1p1d", name="noenc")
    try:
        epdctl("up", "-d", str(topology), check=0)
        args = ("noenc", "--num-prompts", "3", "--concurrency", "1", "--max-tokens", "2", "--image-size", "16")
        ec = bench_json(*args)["ec"]
        assert ec == {"reused_items": None, "encoded_items": None, "media_items": 3, "repeats_in_run": 0,
                      "warm": None, "source": "no encoders"}
        text = epdctl("bench", *args, check=0).stdout
        assert "EC cache: not in play (no encoders" in text and "unknown" not in text, text
    finally:
        epdctl("down", "noenc", check=0)
        assert_no_orphans(str(state_dir), list(ports.values()))


def test_save_without_matplotlib_says_so(procs, tmp_path):
    url = procs.sim(free_ports(1)[0], "--sim-ttft-ms", "1", "--sim-tpot-ms", "1")
    saved = tmp_path / "saved"
    # `import matplotlib` raises ImportError when sys.modules holds None for it: the CLI as a user
    # without the plot extra runs it.
    launcher = "import sys; sys.modules['matplotlib'] = None; from epdctl.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", launcher, "bench", "--url", url, "--num-prompts", "2",
                             "--images-per-request", "0", "--max-tokens", "2", "--save", str(saved), "--label", "np"],
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert [p.suffix for p in saved.iterdir()] == [".json"]
    hint = [line for line in result.stderr.splitlines() if "epdctl[plot]" in line]
    assert hint == ["epdctl bench: no PNG of the latency CDFs: matplotlib is not installed "
                    "(pip install 'epdctl[plot]')"]
