"""The sim's roles and capacity (issue #15): encoder-only producers, max-num-seqs, batched steps.

Tests assert behaviour, not the machine's speed. What a step costs, and when each request's
tokens come, is checked on the step loop itself run on a virtual clock (exact, however busy the
machine). Real sim processes over real HTTP then show the flags reach it: through lower bounds
(a sleep is never shorter than asked, however loaded the machine), through the sim's metrics, or
by costs of an hour that would hang a request charged them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import free_ports, http_post, metrics
from test_sim import chat, ec_json, kv_json

from epdctl.sim.costmodel import CostModel, Scheduler, Seq


def image(i: int) -> str:
    return "data:image/png;base64," + base64.b64encode(f"image {i}".encode()).decode()


HOUR_MS = "3600000"  # a cost no test waits for: a request charged it would not come back


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps to its next timer instead of sleeping until it.

    The step loop sleeps its costs on the loop's clock, so on this one every request's times
    are exactly what the cost model says, on an idle machine or a busy one.
    """

    def __init__(self) -> None:
        super().__init__()
        self._now = 0.0
        select = self._selector.select

        def jump(timeout=None):
            events = select(0)
            if not events and timeout:
                self._now += timeout
            return events

        self._selector.select = jump

    def time(self) -> float:
        return self._now


def on_virtual_clock(coro):
    """asyncio.run on a VirtualClockLoop (what is left running, the step loop, is cancelled)."""
    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        loop.close()


def test_producer_is_charged_no_prefill_and_no_decode(procs, tmp_path):
    url = procs.sim(free_ports(1)[0], "--ec-transfer-config", ec_json("ec_producer", tmp_path / "ec"),
                    "--sim-ttft-ms", HOUR_MS, "--sim-tpot-ms", HOUR_MS, "--sim-encode-ms", "20")
    status, body = chat(url, max_tokens=3)  # an hour per prefill or decode step: it answers, so it was charged neither
    assert status == 200, body
    counters = metrics(url)
    assert counters["epdctl_sim_encoded_items_total"] == 1
    assert counters['vllm:time_to_first_token_seconds_count{model_name="sim-model"}'] == 0  # no token was made


def test_single_request_costs_what_the_flags_say(procs):
    url = procs.sim(free_ports(1)[0], "--sim-ttft-ms", "100", "--sim-tpot-ms", "10", "--sim-encode-ms", "100")
    started = time.monotonic()
    assert chat(url, max_tokens=11)[0] == 200
    assert time.monotonic() - started >= 0.28  # 100 encode + 100 prefill + 10 x 10 decode: the flags reach the loop


def test_a_request_alone_costs_exactly_what_the_flags_say():
    async def main():
        sched = Scheduler(CostModel(prefill_ms=100, decode_ms=10, encode_ms=100))
        seq = Seq(output=11, items=1, prefill_tokens=5)
        await sched.run(seq)
        return seq

    seq = on_virtual_clock(main())
    assert seq.first_at == pytest.approx(0.2)  # encode + prefill in one step
    assert seq.done_at == pytest.approx(0.3)  # then 10 x 10 ms decode


def test_decoder_with_remote_kv_skips_prefill_and_consumer_hit_skips_encode(procs, tmp_path):
    ec = tmp_path / "ec"
    e_port, pd_port, d_port = free_ports(3)
    e = procs.sim(e_port, "--ec-transfer-config", ec_json("ec_producer", ec), "--sim-encode-ms", "0")
    pd = procs.sim(pd_port, "--ec-transfer-config", ec_json("ec_consumer", ec),
                   "--sim-ttft-ms", "50", "--sim-tpot-ms", "1", "--sim-encode-ms", HOUR_MS)
    d = procs.sim(d_port, "--kv-transfer-config", kv_json("kv_consumer"), "--sim-ttft-ms", HOUR_MS, "--sim-tpot-ms", "1")
    assert chat(e, max_tokens=1)[0] == 200
    assert chat(pd, max_tokens=1)[0] == 200  # an EC hit: the 50 ms prefill only, never the hour of encoding
    assert metrics(pd)["epdctl_sim_ec_loaded_total"] == 1 and metrics(pd)["epdctl_sim_encoded_items_total"] == 0
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "kv_transfer_params": {"do_remote_prefill": True, "remote_engine_id": "x"}}
    assert http_post(d + "/v1/chat/completions", body)[0] == 200  # the KV came from P: no hour of prefill
    assert metrics(d)["epdctl_sim_remote_prefills_total"] == 1


def _blast(url: str, n: int, body: dict) -> tuple[float, list[float]]:
    """n concurrent streamed requests; returns (wall time, TTFT of each)."""
    import urllib.request

    def one(_):
        req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
        started = time.monotonic()
        ttft = None
        with urllib.request.urlopen(req, timeout=30) as resp:
            for line in resp:
                if ttft is None and b'"content":"' in line and b'"content":""' not in line:
                    ttft = time.monotonic() - started
        return ttft

    started = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        ttfts = list(pool.map(one, range(n)))
    return time.monotonic() - started, ttfts


def test_max_num_seqs_caps_throughput_and_the_rest_wait(procs):
    url = procs.sim(free_ports(1)[0], "--max-num-seqs", "4", "--sim-ttft-ms", "0", "--sim-tpot-ms", "5")
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 64}
    wall, ttfts = _blast(url, 16, body)
    one_request = 63 * 0.005  # 0.315 s: 4 waves of 4 → ≥ 1.26 s
    rate = 16 / wall
    assert rate < 14, f"{rate:.1f} req/s: more than 4 requests ran at once (model: 4 / (64 x 5 ms) = 12.5 req/s)"
    ttfts.sort()
    assert ttfts[4] > one_request, ttfts  # the fifth waited for a whole request to finish
    assert ttfts[-1] > 3 * one_request, ttfts
    # Unstreamed, the loop sleeps identical decode steps as one: the cap holds all the same.
    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(lambda _: http_post(url + "/v1/chat/completions", body)[0], range(16))) == {200}
    assert time.monotonic() - started >= 4 * one_request


def test_max_num_seqs_runs_waves_and_the_rest_wait_their_turn():
    async def main(streamed: bool):
        sched = Scheduler(CostModel(prefill_ms=0, decode_ms=5, encode_ms=0), max_num_seqs=4)
        seqs = [Seq(output=64, prefill_tokens=1, stream=streamed) for _ in range(16)]
        await asyncio.gather(*(sched.run(seq) for seq in seqs))
        return seqs

    one_request = 63 * 0.005
    for streamed in (True, False):  # unstreamed, identical decode steps are slept as one
        seqs = on_virtual_clock(main(streamed))
        for wave in range(4):  # in arrival order: each wave starts when the last one ends
            for seq in seqs[4 * wave:4 * wave + 4]:
                assert seq.first_at == pytest.approx(wave * one_request)
                assert seq.done_at == pytest.approx((wave + 1) * one_request)  # its TPOT is 5 ms: TTFT pays the queue


def test_concurrent_requests_share_decode_steps():
    async def main():
        sched = Scheduler(CostModel(prefill_ms=0, decode_ms=5, encode_ms=0))
        seqs = [Seq(output=64, prefill_tokens=1, stream=True) for _ in range(16)]
        await asyncio.gather(*(sched.run(seq) for seq in seqs))
        return seqs, sched.step

    seqs, steps = on_virtual_clock(main())
    assert steps == 64  # one step per token, for all 16 at once
    assert max(seq.done_at for seq in seqs) == pytest.approx(63 * 0.005)  # what one request alone takes


def test_encoder_serialises_items(procs, tmp_path):
    url = procs.sim(free_ports(1)[0], "--ec-transfer-config", ec_json("ec_producer", tmp_path / "ec"),
                    "--sim-encode-ms", "50")
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        statuses = [r[0] for r in pool.map(lambda i: chat(url, image=image(i), max_tokens=1), range(8))]
    wall = time.monotonic() - started
    assert statuses == [200] * 8
    assert wall >= 0.35, f"8 images at 50 ms each took {wall:.3f}s: encoded in parallel, not one after another"


def test_zero_cost_sim_answers_at_once(procs):
    url = procs.sim(free_ports(1)[0], "--sim-ttft-ms", "0", "--sim-tpot-ms", "0", "--sim-encode-ms", "0")
    _, ttfts = _blast(url, 8, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200})
    assert None not in ttfts  # every stream got its tokens

    async def main():
        sched = Scheduler(CostModel(prefill_ms=0, decode_ms=0, encode_ms=0))
        seqs = [Seq(output=200, prefill_tokens=1, stream=True) for _ in range(8)]
        await asyncio.gather(*(sched.run(seq) for seq in seqs))
        return asyncio.get_running_loop().time()

    assert on_virtual_clock(main()) == 0.0  # no step was slept on


def test_bad_capacity_flags_are_refused():
    import subprocess
    import sys

    for flags in (["--max-num-seqs", "0"], ["--sim-tpot-ms", "-1"], ["--sim-step-per-seq-ms", "nan"]):
        result = subprocess.run([sys.executable, "-m", "epdctl.sim", "m", *flags], capture_output=True, text=True, timeout=30)
        assert result.returncode == 2 and flags[0] in result.stderr, (flags, result.stderr)


# ------------------------------------------------------------ the loop itself, in process


def test_cost_model_defaults_keep_single_request_cost():
    cost = CostModel(prefill_ms=50, decode_ms=2, encode_ms=60, per_seq_ms=0)
    assert cost.step_s(prefills=1, items=2, running=1) == pytest.approx(0.17)
    assert cost.step_s(decodes=16, running=16) == pytest.approx(0.002)
    assert cost.step_s(items=16) == pytest.approx(0.96)  # items in one step add up
    assert CostModel(decode_ms=2, per_seq_ms=0.5).step_s(decodes=4, running=4) == pytest.approx(0.004)


def test_scheduler_aborted_requests_free_their_slots():
    async def main():
        sched = Scheduler(CostModel(prefill_ms=0, decode_ms=5, encode_ms=0), max_num_seqs=1)
        hog = asyncio.ensure_future(sched.run(Seq(output=10_000)))
        await asyncio.sleep(0.05)
        hog.cancel()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await sched.run(Seq(output=3))
        assert sched.running == 0
        return loop.time() - started

    # The hog had 50 s of tokens left: the next request runs at once, 3 steps of 5 ms.
    assert on_virtual_clock(main()) == pytest.approx(0.015)


def test_a_client_gone_mid_stream_frees_its_slot(procs):
    import http.client

    port = free_ports(1)[0]
    url = procs.sim(port, "--max-num-seqs", "1", "--sim-ttft-ms", "0", "--sim-tpot-ms", "200")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20_000, "stream": True}),
        {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read(5) == b"data:"
    conn.sock.close()  # gone, an hour of tokens before it
    conn.close()
    # Answered at all (in under an hour), the request had the slot the client left.
    status, _ = http_post(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert status == 200


# ------------------------------------------------------------ issue #15's bounds, through the proxy with `epdctl bench`


def _bench(name: str, *args: str) -> dict:
    from conftest import epdctl

    return json.loads(epdctl("bench", name, *args, "--json", timeout=300, check=0).stdout)


def test_image_ttft_on_e_pd_is_encode_plus_prefill_not_two_prefills(tmp_path, state_dir):
    from conftest import assert_no_orphans, epdctl, write_sim_topology

    # The encoder's prefill and decode cost an hour: a request through it that was charged either would fail.
    topology, ports = write_sim_topology(tmp_path, "1e1pd", name="ttft",
                                         timings="sim-ttft-ms: 50, sim-tpot-ms: 1, sim-encode-ms: 20",
                                         instance_args={"encode-0": {"sim-ttft-ms": int(HOUR_MS), "sim-tpot-ms": int(HOUR_MS)}})
    try:
        epdctl("up", "-d", str(topology), check=0)
        report = _bench("ttft", "--num-prompts", "12", "--concurrency", "1", "--max-tokens", "2", "--image-size", "32",
                        "--timeout-s", "120")
        assert report["completed"] == 12, report
        assert report["ttft_ms"]["p50"] >= 50 + 20, report["ttft_ms"]  # the encode, then the PD's one prefill
    finally:
        epdctl("down", "ttft", check=0)
        assert_no_orphans(str(state_dir), list(ports.values()))


def test_a_pd_with_four_slots_serves_no_more_than_its_model_allows(tmp_path, state_dir):
    from conftest import assert_no_orphans, epdctl, write_sim_topology

    topology, ports = write_sim_topology(tmp_path, "agg", name="slots",
                                         timings="sim-ttft-ms: 0, sim-tpot-ms: 5, sim-encode-ms: 0, max-num-seqs: 4")
    try:
        epdctl("up", "-d", str(topology), check=0)
        report = _bench("slots", "--num-prompts", "48", "--concurrency", "16", "--max-tokens", "64",
                        "--images-per-request", "0", "--warmup", "0")
    finally:
        epdctl("down", "slots", check=0)
        assert_no_orphans(str(state_dir), list(ports.values()))
    # 4 at a time, each 1 + 63 steps of 5 ms: 4 / 0.315 s = 12.7 req/s at best, whatever the machine.
    assert report["completed"] == 48
    assert report["request_throughput"] <= 12.7 * 1.05, report["request_throughput"]
    # 16 in flight for 4 slots: most requests waited for about three others' whole answers first.
    assert report["ttft_ms"]["p50"] >= 2 * 315, report["ttft_ms"]


def test_a_long_prompt_is_prefilled_in_chunks_so_running_streams_keep_their_pace():
    """vLLM's --max-num-batched-tokens: a step decodes every running request, then prefills what budget is left."""

    async def main(budget: int) -> float:
        """The longest wait between two of a stream's tokens while a ~1 s prompt is prefilled."""
        sched = Scheduler(CostModel(prefill_ms=0, decode_ms=5, encode_ms=0, prefill_token_ms=0.5),
                          max_num_batched_tokens=budget)
        loop = asyncio.get_running_loop()
        stream = Seq(output=400, prefill_tokens=1, stream=True)
        times: list[float] = []

        async def watch():
            while not stream.finished:
                stream.event.clear()
                await stream.event.wait()
                if stream.produced > len(times):
                    times.append(loop.time())

        sched.submit(stream)
        watcher = asyncio.ensure_future(watch())
        await asyncio.sleep(0.3)  # the stream is decoding
        await sched.run(Seq(output=1, prefill_tokens=2000))
        await watcher
        return max(b - a for a, b in zip(times, times[1:]))

    assert on_virtual_clock(main(4096)) == pytest.approx(2000 * 0.0005 + 0.005)  # the whole prompt in one step
    assert on_virtual_clock(main(128)) == pytest.approx(127 * 0.0005 + 0.005)  # a 127-token chunk beside its decode


def test_a_long_prompt_stalls_the_streams_with_a_budget_above_it(procs):
    """Through a real sim: the flags reach the loop (a sleep is never shorter than asked, however busy the machine)."""
    from conftest import wait_for

    long_prompt = "word " * 1600  # ~2000 sim tokens; 0.5 ms each = ~1 s of prefill
    url = procs.sim(free_ports(1)[0], "--sim-ttft-ms", "0", "--sim-tpot-ms", "5", "--sim-prefill-token-ms", "0.5",
                    "--max-num-batched-tokens", "4096")
    times: list[float] = []

    def stream():
        import urllib.request

        req = urllib.request.Request(url + "/v1/chat/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 2000, "stream": True}).encode())
        with urllib.request.urlopen(req, timeout=60) as resp:
            for line in resp:
                if b'"content":"' in line and b'"content":""' not in line:
                    times.append(time.monotonic())

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(stream)
        wait_for(lambda: len(times) >= 2, 30, "the stream to decode")  # 10 s of tokens left
        status, _ = http_post(url + "/v1/chat/completions",
                              {"messages": [{"role": "user", "content": long_prompt}], "max_tokens": 1})
        running.result()
    assert status == 200
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) > 0.6, max(gaps)  # the whole prompt in one step: the stream waits ~1 s for it


def test_chunked_prefill_schedule_is_vllms():
    """Decodes first, then the prompt already under way, then arrivals, all within the token budget."""

    async def main():  # the loop's clock is asyncio's
        sched = Scheduler(CostModel(prefill_ms=0, decode_ms=1, encode_ms=0), max_num_seqs=8, max_num_batched_tokens=100)
        long, short = Seq(output=2, prefill_tokens=250), Seq(output=2, prefill_tokens=30)
        for seq in (long, short):
            seq.prefill_left = seq.prefill_tokens
            sched.waiting.append(seq)
        first = sched._schedule()
        assert first.chunks == [(long, 100)] and first.new == [long]  # no budget left: short waits its turn
        sched._apply(first, 1)
        second = sched._schedule()
        assert second.chunks == [(long, 100)] and not second.new
        sched._apply(second, 1)
        third = sched._schedule()
        assert third.chunks == [(long, 50), (short, 30)] and third.new == [short]
        sched._apply(third, 1)
        assert long.start == 2 and short.start == 2 and not sched.prefilling  # both got their first token in step 3
        fourth = sched._schedule()
        assert fourth.decodes == 2 and not fourth.chunks

    asyncio.run(main())


def test_encode_base_is_paid_once_per_step():
    cost = CostModel(prefill_ms=0, decode_ms=0, encode_ms=10, encode_base_ms=6)
    assert cost.step_s(items=1) == pytest.approx(0.016)
    assert cost.step_s(items=4) == pytest.approx(0.046)  # four items batched: one base
    assert cost.step_s(decodes=1, running=1) == 0.0  # no encode, no base


def test_the_api_servers_request_cost_is_paid_one_request_at_a_time(procs):
    url = procs.sim(free_ports(1)[0], "--sim-request-ms", "100", "--sim-ttft-ms", "0", "--sim-tpot-ms", "0",
                    "--sim-encode-ms", "0")
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda _: chat(url, max_tokens=1)[0], range(4)))
    wall = time.monotonic() - started
    assert statuses == [200] * 4
    assert wall >= 0.38, f"4 requests of 100 ms API-server work took {wall:.3f}s: they overlapped"
