"""The sim's step loop: vLLM's scheduler in miniature (capacity, a token budget, a FIFO wait queue).

Each instance runs one background task. A step, as vLLM V1's scheduler builds it, runs one
token for every request that is decoding, then spends what is left of `--max-num-batched-tokens`
on prompts: first those already partly prefilled, then waiting requests admitted in arrival
order while fewer than `--max-num-seqs` run (a prompt larger than what is left is chunked over
several steps). The step then costs (CostModel.step_s):

    prefill_ms if it prefills anything                        (--sim-ttft-ms: prompts prefilled together share it)
  + prefill_request_ms x requests whose prefill starts in it  (--sim-prefill-request-ms, default 0)
  + prefill_token_ms x prompt tokens prefilled in the step    (--sim-prefill-token-ms, default 0)
  + encode_base_ms if it encodes anything                     (--sim-encode-base-ms, default 0)
  + encode_ms x media items encoded in the step               (--sim-encode-ms: one encoder, items add up)
  + ec_load_ms x media items a consumer loaded from the EC    (--sim-ec-load-ms, default 0)
  + per_seq_ms x running requests                             (--sim-step-per-seq-ms, default 0)
  + decode_ms when the step decodes anything                  (--sim-tpot-ms: a decode step's base)

so one request alone costs what the flags say (encode + TTFT, then TPOT per further token), and
concurrent requests share steps. A request gets its first token at the end of the step that
finishes its prompt, then one token per step. An encoder-only request (an ec_producer's)
finishes with its first step. Steps whose cost is 0 are not slept on: zero-cost sims answer at
once, and identical decode steps with nothing to stream are slept as one. With contention
(`--sim-contention`, epdctl/sim/contention.py) each step is spent through a Pace instead: on a
device shared with other sims, or as CPU burnt on the host's cores, one step at a time.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from epdctl.sim.contention import Pace

# vLLM's defaults for `vllm serve` (OPENAI_API_SERVER) on a GPU under 70 GiB; it picks 1024 and
# 8192 on H100-class GPUs, and less on CPU. 256 is also the value most vLLM docs show.
DEFAULT_MAX_NUM_SEQS = 256
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048


@dataclass(frozen=True)
class CostModel:
    prefill_ms: float = 20.0
    decode_ms: float = 2.0
    encode_ms: float = 10.0
    per_seq_ms: float = 0.0
    prefill_token_ms: float = 0.0
    encode_base_ms: float = 0.0
    prefill_request_ms: float = 0.0
    ec_load_ms: float = 0.0

    def step_s(self, prefills: int = 0, prefill_tokens: int = 0, items: int = 0, decodes: int = 0,
               running: int = 0, loaded: int = 0) -> float:
        ms = ((self.prefill_ms if prefills or prefill_tokens else 0.0) + self.prefill_request_ms * prefills
              + self.prefill_token_ms * prefill_tokens
              + (self.encode_base_ms + self.encode_ms * items if items else 0.0) + self.ec_load_ms * loaded
              + self.per_seq_ms * running + (self.decode_ms if decodes else 0.0))
        return max(0.0, ms) / 1000.0


@dataclass(eq=False)
class Seq:
    """One request in the loop. `produced` counts the tokens it has so far; `event` is set on change."""

    output: int  # tokens to produce
    prefill: bool = True  # charged a prefill (False: KV came from a P, or an encoder-only instance)
    prefill_tokens: int = 0
    items: int = 0  # media items encoded in its first step
    loaded: int = 0  # media items loaded from the EC in its first step (a consumer's)
    decode: bool = True  # False: encoder-only, finishes with its first step
    stream: bool = False
    produced: int = 0
    finished: bool = False
    admitted: bool = False
    aborted: bool = False
    start: int = 0  # the step before its first token
    prefill_left: int = 0
    arrived: float = 0.0  # loop times: arrived (0: when queued), first token, last token (for the histograms)
    first_at: float = 0.0
    done_at: float = 0.0
    event: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Step:
    """What one step runs: requests admitted, prompt chunks (request, tokens), decoding requests."""

    new: list[Seq]
    chunks: list[tuple[Seq, int]]
    decodes: int

    @property
    def busy(self) -> bool:
        return bool(self.new or self.chunks)


class Scheduler:
    def __init__(self, cost: CostModel, max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
                 max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
                 on_finish: Optional[Callable[[Seq], None]] = None, pace: Optional["Pace"] = None) -> None:
        self.cost = cost
        # Set when instances contend for a device or the host's cores (epdctl/sim/contention.py):
        # each step is then spent through it, one at a time, as the sharing can change between steps.
        self.pace = pace
        self.on_finish = on_finish
        self.max_num_seqs = max(1, max_num_seqs)
        self.max_num_batched_tokens = max(1, max_num_batched_tokens)
        self.waiting: collections.deque[Seq] = collections.deque()
        self.prefilling: dict[Seq, None] = {}  # admitted, prompt not done, in admission order
        self.running = 0  # admitted, not finished, not aborted
        self.heap: list[tuple[int, int, Seq]] = []  # (step it finishes at, tie-break, seq)
        self.streams: set[Seq] = set()
        self.step = 0  # steps done
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self._task: Optional[asyncio.Task] = None

    # ------------------------------------------------------------ requests

    async def run(self, seq: Seq) -> None:
        """Queue `seq` and wait until it finishes (streams read `seq.produced` meanwhile)."""
        self.submit(seq)
        try:
            while not seq.finished:
                seq.event.clear()
                await seq.event.wait()
        finally:
            self.abort(seq)

    def submit(self, seq: Seq) -> None:
        seq.prefill_left = max(1, seq.prefill_tokens) if seq.prefill else 0
        seq.arrived = seq.arrived or asyncio.get_running_loop().time()
        self.waiting.append(seq)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    def abort(self, seq: Seq) -> None:
        """The client went away (or the request is done): free its slot."""
        if seq.finished or seq.aborted:
            return
        seq.aborted = True
        if seq.admitted:
            self.running -= 1
            self.streams.discard(seq)
            self.prefilling.pop(seq, None)
            self._wake.set()

    # ------------------------------------------------------------ the loop

    def _schedule(self) -> _Step:
        """Decodes first, then prompts under the token budget (vLLM V1's order), then admissions."""
        decodes = self.running - len(self.prefilling)
        budget = self.max_num_batched_tokens - decodes
        chunks: list[tuple[Seq, int]] = []
        for seq in self.prefilling:
            if budget <= 0:
                break
            take = min(seq.prefill_left, budget)
            chunks.append((seq, take))
            budget -= take
        new: list[Seq] = []
        while self.waiting and self.running < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.aborted:
                self.waiting.popleft()
                continue
            if seq.prefill_left and budget <= 0:
                break  # no tokens left this step: it waits, first come first served
            self.waiting.popleft()
            seq.admitted = True
            self.running += 1
            new.append(seq)
            if seq.prefill_left:
                take = min(seq.prefill_left, budget)
                chunks.append((seq, take))
                budget -= take
                self.prefilling[seq] = None
            elif seq.decode:
                decodes += 1  # its KV came from elsewhere: one decode step gives its first token
        return _Step(new, chunks, decodes)

    def _cost(self, plan: _Step) -> float:
        return self.cost.step_s(prefills=sum(1 for s in plan.new if s.prefill_left),
                                prefill_tokens=sum(take for _, take in plan.chunks),
                                items=sum(s.items for s in plan.new), decodes=plan.decodes, running=self.running,
                                loaded=sum(s.loaded for s in plan.new))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        clock = loop.time()
        while True:
            if not self.running and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                clock = loop.time()
            plan = self._schedule()
            if not self.running:
                continue
            cost = self._cost(plan)
            steps = 1
            if self.pace is not None and cost > 0:
                await self.pace.spend(cost)
                clock = loop.time()
                self._apply(plan, steps)
                continue
            if not plan.busy and self.heap and not (self.streams and cost > 0):
                # Identical decode steps up to the next finish: slept as one unless something must stream.
                steps = max(1, self.heap[0][0] - self.step)
            if cost > 0:
                now = loop.time()
                # A step starts when the last one ended, or now if that is later: a step is never
                # shorter than its cost (a late one is not made up by a short one, as on a GPU).
                clock = max(clock, now)
                deadline = clock + steps * cost
                if steps > 1:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), deadline - now)
                        # Woken (an arrival, an abort): end the step under way, then admit.
                        steps = min(steps, int((loop.time() - clock) / cost) + 1)
                        deadline = clock + steps * cost
                    except asyncio.TimeoutError:
                        pass
                remaining = deadline - loop.time()
                if remaining > 0:
                    await asyncio.sleep(remaining)
                clock = deadline
            else:
                await asyncio.sleep(0)  # free steps are not slept on, but handlers get their turn
                clock = loop.time()
            self._apply(plan, steps)

    def _apply(self, plan: _Step, steps: int) -> None:
        now = asyncio.get_running_loop().time()
        self.step += steps
        started = [seq for seq in plan.new if not seq.prefill_left]
        for seq, take in plan.chunks:
            seq.prefill_left -= take
            if not seq.prefill_left and seq in self.prefilling:
                del self.prefilling[seq]
                started.append(seq)
        for seq in started:
            if seq.aborted:
                continue
            seq.start = self.step - 1
            seq.first_at = now
            finish = self.step + (seq.output - 1 if seq.decode else 0)
            heapq.heappush(self.heap, (finish, next(self._ids), seq))
            if seq.stream:
                self.streams.add(seq)
        for seq in self.streams:
            seq.produced = min(seq.output, self.step - seq.start)
            seq.event.set()
        while self.heap and self.heap[0][0] <= self.step:
            _, _, seq = heapq.heappop(self.heap)
            if seq.aborted:
                continue
            self.running -= 1
            self.streams.discard(seq)
            seq.produced = seq.output
            seq.finished = True
            seq.done_at = now
            seq.event.set()
            if self.on_finish is not None:
                self.on_finish(seq)
