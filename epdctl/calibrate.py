"""`epdctl calibrate NAME`: probe a running topology's instances and fit the sim's cost model.

Probes go straight to the instances, not through the proxy, so each role is timed alone:

- encode: one request with k unique images, then B requests with one image each at once, on
  the first encoder (without encoders, on the PD, less its fitted prefill);
  fit  time = encode_base_ms + encode_ms x items;
- prefill: one prompt at a time, of several lengths, max_tokens 1, on the first prefill instance
  (or PD); fit  time = prefill_ms + prefill_token_ms x prompt tokens (+ per_seq_ms, which the sim's
  step adds). Prompts sent together do not arrive in one step (the first starts a step alone, the
  rest wait for the next), so they cannot separate a per-request cost from a per-step one:
  prefill_request_ms is left at 0, and long prompts' cost shows in prefill_token_ms;
- decode: B streams at once of N tokens each on the first decode instance (or PD);
  fit  TPOT = decode_ms + per_seq_ms x B.

Every probe is new to every cache (random prompt prefixes, images with a random stamp in their
pixels): vLLM's prefix cache and the EC would otherwise time a lookup, not the work.
Fits are non-negative least squares (epdctl/costfit.py). The profile keeps every probe, the fit,
and its error, so a reader can judge it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from epdctl.cliparse import CommandParser, number
from epdctl.errors import EXIT_RUNTIME, EXIT_USAGE, EpdctlError
from epdctl.run.logfiles import display

ENCODE_ITEMS = (1, 2, 4)
BATCHES = (1, 2, 4, 8)
PROMPT_WORDS = (16, 128, 512, 1024)
WORD = " the"  # one token in the tokenizers vLLM serves, and 4 characters (one sim token)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = CommandParser(prog="epdctl calibrate", description=(
        "Probe each role of a running topology (straight to its instances), fit the simulated engine's cost "
        "model, and write a sim profile. A topology with `engine: sim` and `sim_profile: FILE` then runs as "
        "the twin of the probed one."))
    parser.add_argument("name", help="A running topology's name, or its YAML file (see `epdctl status`).")
    parser.add_argument("-o", "--output", metavar="PROFILE.yaml",
                        help="Write the profile here (default: print it as YAML).")
    parser.add_argument("--twin", metavar="TOPOLOGY.yaml",
                        help="Also write the twin: the topology's file with engine: sim and sim_profile: the profile "
                             "(needs -o).")
    parser.add_argument("--json", action="store_true", help="Print the profile as JSON.")
    parser.add_argument("--repeats", type=number(int, 1, 50), default=3, help="Times each probe is run; the median counts (default 3).")
    parser.add_argument("--image-size", type=number(int, 16, 4096), default=224,
                        help="Side of the probe images in pixels; encode cost depends on it (default 224, as bench).")
    parser.add_argument("--max-batch", type=number(int, 1, 256), default=8, help="Most requests at once in a probe (default 8).")
    parser.add_argument("--decode-tokens", type=number(int, 3, 4096), default=32, help="Tokens per decode probe stream (default 32).")
    parser.add_argument("--contention", choices=("auto", "cpu", "device", "none"), default="auto",
                        help="The twin's contention model: cpu (measure each instance's CPU share; the twin burns it), "
                             "device (sims sharing a device split its time), none; auto: cpu when the instances have "
                             "no devices, else device (default auto).")
    parser.add_argument("--timeout-s", type=number(float, 0, 86_400, above=True), default=300.0, help="Per probe request (default 300).")
    args = parser.parse_args(argv)
    if args.twin and not args.output:
        parser.error("--twin needs -o: the twin names the profile file")
    return args


# ---------------------------------------------------------------- which instances


@dataclass(frozen=True)
class Target:
    name: str
    role: str
    url: str
    argv: tuple[str, ...]
    pid: Optional[int] = None
    create_time: Optional[float] = None
    env: Mapping[str, str] = field(default_factory=dict)  # what epdctl set for it

    def flag(self, flag: str) -> Optional[str]:
        """The value of `--flag` in the instance's argv (as `--flag V` or `--flag=V`)."""
        for i, word in enumerate(self.argv):
            if word == flag and i + 1 < len(self.argv):
                return self.argv[i + 1]
            if word.startswith(flag + "="):
                return word.split("=", 1)[1]
        return None

    def int_flag(self, flag: str, default: int) -> int:
        value = self.flag(flag)
        return int(value) if value and value.isdigit() else default


def pick_targets(state: dict[str, Any]) -> dict[str, Target]:
    """The instance each role's probes go to: the first of the role, a PD standing in for P and D."""
    found: dict[str, Target] = {}
    for record in state.get("processes", []):
        role = record.get("role")
        if role in (None, "proxy") or not isinstance(record.get("url"), str):
            continue
        target = Target(str(record.get("name")), role, record["url"], tuple(str(w) for w in record.get("argv") or ()),
                        record.get("pid"), record.get("create_time"),
                        {str(k): str(v) for k, v in (record.get("env") or {}).items()})
        for job, roles in (("encode", ("encode",)), ("prefill", ("prefill", "pd")), ("decode", ("decode", "pd"))):
            if role in roles and job not in found:
                found[job] = target
    if "prefill" not in found or "decode" not in found:
        raise EpdctlError("calibrate: the topology has no prefill/decode (or pd) instance to probe", EXIT_USAGE)
    if "encode" not in found:
        found["encode"] = found["prefill"]  # it encodes its own images: probed there, less its prefill
    return found


# ---------------------------------------------------------------- probes


@dataclass
class Answer:
    ms: float
    prompt_tokens: Optional[int] = None
    tpot_ms: Optional[float] = None  # streams only: (end - first token) / (tokens - 1), as `epdctl bench`


class Prober:
    def __init__(self, session, model: str, args: argparse.Namespace, tick: Callable[[], None], meter=None):
        self.session = session
        self.model = model
        self.args = args
        self.tick = tick
        self.meter = meter  # contention_probe.Meter: CPU time of the probed instance around lone probes

    def image(self) -> dict[str, Any]:
        from epdctl.bench.dataset import png_data_url

        return {"type": "image_url", "image_url": {"url": png_data_url(0, self.args.image_size, secrets.token_bytes(16))}}

    async def ask(self, url: str, content: Any, max_tokens: int, stream: bool = False, alone: bool = False) -> Answer:
        """One probe. `alone`: nothing else is in flight, so the instance's CPU time meanwhile is its own."""
        import aiohttp

        body = {"model": self.model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                "ignore_eos": True, "temperature": 0, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        cpu_before = self.meter.read(url) if alone and self.meter else None
        started = time.perf_counter()
        first: Optional[float] = None
        last: Optional[float] = None
        usage: dict[str, Any] = {}
        timeout = aiohttp.ClientTimeout(total=self.args.timeout_s)
        try:
            async with self.session.post(url + "/v1/chat/completions", json=body, timeout=timeout) as resp:
                if resp.status != 200:
                    text = (await resp.text())[:300]
                    raise EpdctlError(f"calibrate: {url} answered {resp.status}: {display(' '.join(text.split()))}",
                                      EXIT_RUNTIME)
                if not stream:
                    usage = (await resp.json()).get("usage") or {}
                else:
                    async for line in resp.content:
                        if not line.startswith(b"data: {"):
                            continue
                        event = json.loads(line[6:])
                        if event.get("usage"):
                            usage = event["usage"]
                        if event.get("choices"):  # a token's chunk, its text empty or not (as bench)
                            last = time.perf_counter()
                            first = last if first is None else first
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise EpdctlError(f"calibrate: {url}: {type(exc).__name__}: {exc}", EXIT_RUNTIME) from None
        end = time.perf_counter()
        if cpu_before is not None:
            self.meter.add(url, cpu_before, end - started)
        self.tick()
        answer = Answer((end - started) * 1000, usage.get("prompt_tokens"))
        # As `epdctl bench` and `vllm bench serve` time it: from the first chunk carrying a choice to
        # the last, over the tokens the usage counts. A token that decodes to no text yet (a partial
        # UTF-8 sequence, common with random weights) still has its chunk, with empty content:
        # waiting for text instead put most of a stream's tokens before `first` (TPOT ~0).
        tokens = usage.get("completion_tokens")
        if first is not None and last is not None and isinstance(tokens, int) and tokens >= 3:
            answer.tpot_ms = (last - first) * 1000 / (tokens - 1)
        return answer

    def _text(self, words: int) -> str:
        # A random head defeats vLLM's prefix cache: every probe prefills all of its tokens.
        return secrets.token_hex(4) + WORD * max(0, words - 2)

    async def encode(self, target: Target, items: list[int], batches: list[int]) -> list[dict[str, float]]:
        probes: list[dict[str, float]] = []
        encoder = target.role == "encode"
        for k in items:
            for _ in range(self.args.repeats):
                content: list[Any] = [self.image() for _ in range(k)]
                if not encoder:
                    content.append({"type": "text", "text": self._text(2)})
                answer = await self.ask(target.url, content, 1, alone=True)
                probes.append({"items": k, "requests": 1, "ms": answer.ms, "prompt_tokens": answer.prompt_tokens or 0})
        for batch in batches if encoder else ():  # a PD's concurrent prefills would blur the encode time
            for _ in range(self.args.repeats):
                cpu_before = self.meter.read(target.url) if self.meter else None
                started = time.perf_counter()
                await asyncio.gather(*(self.ask(target.url, [self.image()], 1) for _ in range(batch)))
                wall = time.perf_counter() - started
                if self.meter:
                    self.meter.add(target.url, cpu_before, wall, batch)
                probes.append({"items": batch, "requests": batch, "ms": wall * 1000})
        return probes

    async def consumer(self, encoder: Target, target: Target, items: list[int]) -> list[dict[str, float]]:
        """What a consumer spends on items already in the EC: images to the encoder first, then to it."""
        probes = []
        for k in items:
            for _ in range(self.args.repeats):
                images = [self.image() for _ in range(k)]
                await self.ask(encoder.url, images, 1)
                answer = await self.ask(target.url, images + [{"type": "text", "text": self._text(2)}], 1, alone=True)
                probes.append({"items": k, "prompt_tokens": answer.prompt_tokens or 0, "ms": answer.ms})
        return probes

    async def prefill(self, target: Target, lengths: list[int]) -> list[dict[str, float]]:
        probes = []
        for words in lengths:
            for _ in range(self.args.repeats):
                answer = await self.ask(target.url, self._text(words), 1, alone=True)
                if answer.prompt_tokens is None:
                    raise EpdctlError(f"calibrate: {target.name} reported no usage.prompt_tokens", EXIT_RUNTIME)
                probes.append({"words": words, "prompt_tokens": answer.prompt_tokens, "ms": answer.ms})
        return probes

    async def decode(self, target: Target, batches: list[int], tokens: int) -> list[dict[str, float]]:
        probes = []
        for batch in batches:
            for _ in range(self.args.repeats):
                answers = await asyncio.gather(*(self.ask(target.url, self._text(8), tokens, stream=True,
                                                          alone=batch == 1) for _ in range(batch)))
                tpots = [a.tpot_ms for a in answers if a.tpot_ms is not None]
                if not tpots:
                    raise EpdctlError(f"calibrate: {target.name} streamed fewer than 3 tokens: no TPOT to measure",
                                      EXIT_RUNTIME)
                probes.append({"batch": batch, "tpot_ms": statistics.median(tpots)})
        return probes


# ---------------------------------------------------------------- fitting


def _median_by(probes: list[dict[str, float]], key: Callable[[dict], tuple], value: str) -> list[tuple[tuple, float]]:
    """One point per probe setting (the median of its repeats): one slow outlier cannot tilt a line."""
    groups: dict[tuple, list[float]] = {}
    for probe in probes:
        groups.setdefault(key(probe), []).append(probe[value])
    return [(k, statistics.median(v)) for k, v in sorted(groups.items())]


def fit_profile(model: str, targets: dict[str, Target], encode: list[dict], prefill: list[dict],
                decode: list[dict], source: dict[str, str], consumer: Optional[list[dict]] = None):
    """The profile from probe data: decode first (its per_seq_ms enters the others), then prefill, then encode."""
    from epdctl.config.profile import Costs, Fit, SimProfile, rounded
    from epdctl.costfit import fit_nonnegative

    points = _median_by(decode, lambda p: (p["batch"],), "tpot_ms")
    dfit = fit_nonnegative([[1.0, b] for (b,), _ in points], [y for _, y in points])
    decode_ms, per_seq_ms = dfit.coefficients

    # The sim's prefill step of one request also charges per_seq_ms (known from decode): taken off first.
    # One point per prompt length asked for (its token count may differ by one between repeats).
    def asked(probe: dict) -> float:
        return probe.get("words", probe["prompt_tokens"])

    tokens_of = {w: statistics.median(p["prompt_tokens"] for p in prefill if asked(p) == w) for w in map(asked, prefill)}
    points = [((tokens_of[w],), y) for (w,), y in _median_by(prefill, lambda p: (asked(p),), "ms")]
    pfit = fit_nonnegative([[1.0, t] for (t,), _ in points], [y - per_seq_ms for _, y in points])
    prefill_ms, prefill_token_ms = pfit.coefficients

    encoder = targets["encode"].role == "encode"
    note = ""
    encode_request_ms = 0.0
    if encoder:
        # One request with k items against k requests with one: what a request costs the API
        # server (one at a time) apart from what an item costs the encoder.
        points = _median_by(encode, lambda p: (p["items"], p["requests"]), "ms")
        efit = fit_nonnegative([[1.0, k[0], k[1]] for k, _ in points], [y for _, y in points])
        encode_base_ms, encode_ms, encode_request_ms = efit.coefficients
        # A lone request pays its request cost before its step: the step's base is what is left.
        encode_base_ms = max(0.0, encode_base_ms)
    else:
        # No encoder: the PD's own time, less what the prefill fit says its prompt cost.
        points = _median_by(encode, lambda p: (p["items"], p["requests"], p["prompt_tokens"]), "ms")
        ys = [y - pfit.predict([1.0, k[2]]) - per_seq_ms for k, y in points]
        note = f"no encoder: probed on {targets['encode'].name}, its prefill (the prefill fit) subtracted"
        efit = fit_nonnegative([[1.0, k[0]] for k, _ in points], ys)
        encode_base_ms, encode_ms = efit.coefficients

    # A consumer's items from the EC: its time less its prefill, per item (image preprocessing and
    # the load happen on the consumer too).
    cfit = None
    if consumer:
        points = _median_by(consumer, lambda p: (p["items"], p["prompt_tokens"]), "ms")
        cfit = fit_nonnegative([[k[0]] for k, _ in points],
                               [y - pfit.predict([1.0, k[1]]) - per_seq_ms for k, y in points])
    ec_load_ms = cfit.coefficients[0] if cfit else 0.0

    def fit(role: str, equation: str, coefficients: dict[str, float], result, probes: list[dict], extra: str = ""):
        return Fit(instance=targets[role].name, model=equation,
                   coefficients={k: rounded(v) for k, v in coefficients.items()}, rmse_ms=rounded(result.rmse),
                   r2=None if result.r2 is None else rounded(result.r2), note=extra,
                   probes=[{k: rounded(float(v)) for k, v in p.items()} for p in probes])

    return SimProfile(
        model=model, source=source,
        cost=Costs(prefill_ms=rounded(prefill_ms),
                   prefill_token_ms=rounded(prefill_token_ms, 6),
                   encode_base_ms=rounded(encode_base_ms), encode_ms=rounded(encode_ms), ec_load_ms=rounded(ec_load_ms),
                   encode_request_ms=rounded(encode_request_ms),
                   decode_ms=rounded(decode_ms), per_seq_ms=rounded(per_seq_ms)),
        fits={
            "encode": fit("encode", "ms = encode_base_ms + encode_ms * items + encode_request_ms * requests"
                          if encoder else "ms - prefill = encode_base_ms + encode_ms * items",
                          {"encode_base_ms": encode_base_ms, "encode_ms": encode_ms,
                           **({"encode_request_ms": encode_request_ms} if encoder else {})}, efit, encode, note),
            "prefill": fit("prefill", "ms - per_seq_ms = prefill_ms + prefill_token_ms * prompt_tokens",
                           {"prefill_ms": prefill_ms, "prefill_token_ms": prefill_token_ms}, pfit, prefill,
                           "prefill_request_ms is not fitted (prompts sent together start in different steps)"),
            "decode": fit("decode", "tpot_ms = decode_ms + per_seq_ms * batch",
                          {"decode_ms": decode_ms, "per_seq_ms": per_seq_ms}, dfit, decode),
            **({"consumer": fit("prefill", "ms - prefill(prompt_tokens) - per_seq_ms = ec_load_ms * items",
                                {"ec_load_ms": ec_load_ms}, cfit, consumer or [])} if cfit else {}),
        },
    )


# ---------------------------------------------------------------- the command


async def _probe(targets: dict[str, Target], args: argparse.Namespace, say: Callable[[str], None]):
    import aiohttp

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    decode_target, prefill_target, encode_target = targets["decode"], targets["prefill"], targets["encode"]
    max_len = prefill_target.int_flag("--max-model-len", 0) or None
    max_seqs = decode_target.int_flag("--max-num-seqs", 10 ** 6)
    encode_max_seqs = encode_target.int_flag("--max-num-seqs", 10 ** 6)
    tokens = args.decode_tokens
    if max_len:
        tokens = max(3, min(tokens, max_len - 64))
    lengths = [w for w in PROMPT_WORDS if not max_len or w + 64 <= max_len] or [8]
    batches = [b for b in BATCHES if b <= min(args.max_batch, max_seqs)] or [1]
    encode_batches = [b for b in BATCHES[1:] if b <= min(args.max_batch, encode_max_seqs)]
    items = list(ENCODE_ITEMS)
    total = args.repeats * (sum(batches) + len(lengths) + len(items) * (3 if encode_target.role == "encode" else 1)
                            + (sum(encode_batches) if encode_target.role == "encode" else 0))
    progress = Progress(TextColumn("calibrate {task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), transient=True, disable=args.json or not sys.stderr.isatty())
    connector = aiohttp.TCPConnector(limit=0)
    distinct = {t.name: t for t in targets.values()}.values()
    meter = _meter(distinct) if args.contention == "cpu" else None
    async with aiohttp.ClientSession(connector=connector) as session:
        model = await _served_model(session, decode_target)
        with progress:
            task = progress.add_task("", total=total + len(distinct))
            prober = Prober(session, model, args, lambda: progress.advance(task), meter)
            for target in distinct:  # warm each instance up once: its first request is slow
                progress.update(task, description=f"{target.name}: warm-up")
                await prober.ask(target.url, [prober.image(), {"type": "text", "text": "hi"}]
                                 if target.role != "encode" else [prober.image()], 2)
            if meter:
                meter.time_cores()
            progress.update(task, description=f"{decode_target.name}: decode")
            decode = await prober.decode(decode_target, batches, tokens)
            say(f"decode: {decode_target.name}, {len(decode)} probes (batches {', '.join(map(str, batches))}, "
                f"{tokens} tokens)")
            if meter:
                meter.time_cores()
            progress.update(task, description=f"{prefill_target.name}: prefill")
            prefill = await prober.prefill(prefill_target, lengths)
            say(f"prefill: {prefill_target.name}, {len(prefill)} probes (prompts of {', '.join(map(str, lengths))} words)")
            if meter:
                meter.time_cores()
            progress.update(task, description=f"{encode_target.name}: encode")
            encode = await prober.encode(encode_target, items, encode_batches)
            say(f"encode: {encode_target.name}, {len(encode)} probes ({args.image_size}px images)")
            consumer: list[dict] = []
            if encode_target.role == "encode":
                progress.update(task, description=f"{prefill_target.name}: items from the EC")
                consumer = await prober.consumer(encode_target, prefill_target, items)
                say(f"consumer: {prefill_target.name}, {len(consumer)} probes (items from the EC)")
        version = await _vllm_version(session, decode_target)
    return model, encode, prefill, decode, consumer, version, meter


def _meter(targets):
    """CPU readers of the probed instances' process trees (contention_probe.py)."""
    from epdctl.contention_probe import Meter, cpu_reader

    from epdctl.sim.contention import bind_cores

    readers, cores = {}, {}
    for target in targets:
        read = cpu_reader(target.pid, target.create_time)
        if read is not None:
            readers[target.url] = (target.role, read)
            cores[target.url] = bind_cores(target.env.get("VLLM_CPU_OMP_THREADS_BIND"))
    return Meter(readers, cores)


async def _served_model(session, target: Target) -> str:
    try:
        async with session.get(target.url + "/v1/models") as resp:
            data = await resp.json(content_type=None)
        return str(data["data"][0]["id"])
    except Exception as exc:  # any failure here means the same thing to the user
        raise EpdctlError(f"calibrate: {target.name} ({target.url}) did not list its model: {exc}", EXIT_RUNTIME) from None


async def _vllm_version(session, target: Target) -> str:
    try:
        async with session.get(target.url + "/version") as resp:
            if resp.status == 200:
                return str((await resp.json(content_type=None)).get("version", ""))[:64]
    except Exception:  # only a label in the profile
        pass
    return ""


def running_state(name: str) -> dict[str, Any]:
    from epdctl.run.state import StateDir, check_name

    state = StateDir(check_name(name)).read()
    if not state:
        raise EpdctlError(f"calibrate: no topology named {name!r} is up (see `epdctl status`)", EXIT_USAGE)
    if state.get("phase") not in (None, "running"):
        raise EpdctlError(f"calibrate: topology {name!r} is {state.get('phase')}, not running", EXIT_USAGE)
    return state


def check_outputs(args: argparse.Namespace, state: dict[str, Any]) -> None:
    """Before probing: neither output may be a symlink, the probed topology's own file, or the other output."""
    from epdctl.atomicfile import check_output

    source = f"the file of the running topology {args.name!r}"
    if args.output:
        check_output(args.output, "calibrate: -o",
                     not_over={source: state.get("source"), "also the --twin path": args.twin})
    if args.twin:
        check_output(args.twin, "calibrate: --twin", not_over={source: state.get("source")})


def calibrate(name: str, state: dict[str, Any], args: argparse.Namespace, say: Callable[[str], None]):
    from epdctl.contention_probe import contention_block

    targets = pick_targets(state)
    engine = "sim" if any("epdctl.sim" in t.argv for t in targets.values()) else "vllm"
    if args.contention == "auto":
        on_devices = any(r.get("devices") for r in state.get("processes", []) if r.get("role") not in (None, "proxy"))
        args.contention = "device" if on_devices else "cpu"
    model, encode, prefill, decode, consumer, version, meter = asyncio.run(_probe(targets, args, say))
    source = {"topology": name, "engine": engine, "file": str(state.get("source") or ""),
              "probed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "image_size": str(args.image_size)}
    if version:
        source["vllm_version"] = version
    profile = fit_profile(model, targets, encode, prefill, decode, source, consumer)
    if args.contention == "none":
        return profile
    names = {t.url: t.name for t in targets.values()}
    contention = contention_block("cpu" if args.contention == "cpu" else "device", meter, names)
    if contention.mode == "cpu":
        say("contention: cpu share " + ", ".join(f"{role} {share:.2f}" for role, share in contention.cpu_share.items())
            + f" ({contention.host_cores} core(s) here)")
    return profile.model_copy(update={"contention": contention})


def write_twin(state: dict[str, Any], profile_path: Path, twin_path: Path) -> None:
    """The probed topology's file as data, with engine: sim and the profile: the same layout, ports and args."""
    import yaml

    from epdctl.atomicfile import write_output
    from epdctl.config.load import load_topology
    from epdctl.config.schema import ROLES

    source = state.get("source")
    if not source:
        raise EpdctlError("calibrate: --twin: the running topology's file is not recorded", EXIT_USAGE)
    topology = load_topology(source)
    data = topology.model_dump(mode="json", exclude_none=True)
    data.update(engine="sim", sim_profile=str(profile_path.resolve()), name=f"{topology.name}-twin"[:200])
    # The profile's costs are the twin's: a `sim-*` flag in args (a sim topology probed) would override them.
    for args in [data["defaults"]["args"]] + [spec["args"] for role in ROLES for spec in data.get(role, [])]:
        for key in [k for k in args if k.lstrip("-").replace("_", "-").startswith("sim-")]:
            del args[key]
    header = (f"# The sim twin of {source}, written by `epdctl calibrate`: the same instances, ports and args on\n"
              f"# the simulated engine with the costs measured on the real one. Same ports: `epdctl down` the\n"
              f"# real topology first, or change them.\n")
    write_output(twin_path, header + yaml.safe_dump(data, sort_keys=False, width=120), "calibrate: --twin")


def main(argv: list[str]) -> int:
    from epdctl.atomicfile import write_output
    from epdctl.config.profile import dump_profile
    from epdctl.names import topology_name

    args = parse_args(argv)

    def say(message: str) -> None:
        print(f"calibrate: {message}", file=sys.stderr)

    args.name = topology_name(args.name)  # a NAME, or a FILE naming the topology in it
    state = running_state(args.name)
    check_outputs(args, state)
    profile = calibrate(args.name, state, args, say)
    if args.output:
        write_output(args.output, dump_profile(profile), "calibrate: -o")
        if args.twin:
            write_twin(state, Path(args.output), Path(args.twin))
    if args.json:
        print(json.dumps(profile.model_dump(mode="json"), indent=2))
    elif args.output:
        print_summary(profile, sys.stdout)
        print(f"wrote {args.output}" + (f" and the twin {args.twin}" if args.twin else ""))
    else:
        sys.stdout.write(dump_profile(profile))
    return 0


def print_summary(profile, out) -> None:
    cost = profile.cost
    rows = [
        ("encode", f"{cost.encode_base_ms:.2f} ms + {cost.encode_ms:.2f} ms/item + "
                   f"{cost.encode_request_ms:.2f} ms/request", profile.fits["encode"]),
        ("prefill", f"{cost.prefill_ms:.2f} ms + {cost.prefill_token_ms * 1000:.2f} us/token",
         profile.fits["prefill"]),
        ("decode", f"{cost.decode_ms:.2f} ms + {cost.per_seq_ms:.3f} ms/running request", profile.fits["decode"]),
    ]
    if "consumer" in profile.fits:
        rows.append(("consumer", f"{cost.ec_load_ms:.2f} ms/item loaded from the EC", profile.fits["consumer"]))
    print(f"{'role':<8} {'instance':<12} {'cost':<50} {'rmse':>9} {'r2':>6}", file=out)
    for role, text, fit in rows:
        r2 = "-" if fit.r2 is None else f"{fit.r2:.3f}"
        print(f"{role:<8} {fit.instance:<12} {text:<50} {fit.rmse_ms:>6.2f} ms {r2:>6}", file=out)
    contention = profile.contention
    if contention.mode == "cpu":
        shares = ", ".join(f"{role} {share:.2f}" for role, share in contention.cpu_share.items())
        print(f"contention: cpu ({contention.host_cores} core(s)); CPU burnt per ms of cost: {shares}", file=out)
    elif contention.mode == "device":
        print(f"contention: device; {contention.device_slots} step(s) at once per device (assumed)", file=out)
