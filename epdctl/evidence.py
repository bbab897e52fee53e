"""What each instance's own signals say it did: the names smoke and status read, and the rules.

Both `epdctl smoke` (once, around its golden requests) and the supervisor (all the time, for
`status`: run/witness.py) judge disaggregation by the same signals: the sim's counters, vLLM's
metrics where it has them, and vLLM's log lines where it has none (docs/commands.md, "Health
and evidence"). Pure: no process, no socket; the callers fetch and read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

# Counters the sim exports (docs/sim.md).
SIM = {
    "requests": "epdctl_sim_requests_total",
    "encoded": "epdctl_sim_encoded_items_total",
    "loaded": "epdctl_sim_ec_loaded_total",
    "missed": "epdctl_sim_ec_missed_total",
    "prefills": "epdctl_sim_prefills_total",
    "remote_prefills": "epdctl_sim_remote_prefills_total",
    "kv_pushes": "epdctl_sim_kv_pushes_total",  # the layerwise flow: KV a prefill pushed to a decoder
}
# vLLM's own (names read in vLLM 0.32's vllm/v1/metrics/loggers.py): finished requests (all finish
# reasons summed), and prompt tokens by where their KV came from.
VLLM_REQUESTS = "vllm:request_success_total"
VLLM_REMOTE_KV_TOKENS = 'vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}'
VLLM_LOCAL_KV_TOKENS = 'vllm:prompt_tokens_by_source_total{source="local_compute"}'
# ECExampleConnector has no metric: its DEBUG log says what it loaded (VLLM_LOGGING_LEVEL=DEBUG),
# and `--enable-logging-iteration-details` logs the encoder inputs an instance computed itself.
VLLM_EC_LOADED = "Success load encoder cache for hash"
VLLM_ENCODER_RAN = ", encoder inputs: "
VLLM_DEBUG = " DEBUG "
VLLM_ITERATIONS = "Iteration("
# The log markers the supervisor counts in a vLLM consumer's log (run/witness.py).
LOG_MARKERS = (VLLM_EC_LOADED, VLLM_ENCODER_RAN, VLLM_DEBUG, VLLM_ITERATIONS)
# The other connectors export no ECConnector metric either (vLLM 0.32: neither implements
# build_prom_metrics); their log lines, from vllm/distributed/ec_transfer/ec_connector/.
EC_EVIDENCE = {
    "ECCPUConnector": {
        # DEBUG: a producer's output landed in its CPU region; a consumer read one over NIXL.
        "saved": "EC producer: mm_hash=", "saved_end": " marked ready",
        "loaded": "EC consumer: NIXL xfer complete mm_hash=",
        # WARNING/ERROR: the consumer gave up on a remote read and encoded the item itself, or failed it.
        "fallbacks": ("; using local input", "needs remote encoding"),
    },
    "ECMooncakeConnector": {
        "fallbacks": ("never arrived", "EC Mooncake pushed load failed", "could not resolve a transfer id",
                      "Rejected conflicting EC push"),
    },
}

# Labels that only say which engine or model answered: summed over, never keyed.
IGNORED_LABELS = ("engine", "model_name")

# The window status judges by: work an instance did in the last WINDOW_S seconds.
WINDOW_S = 30.0


def parse_metrics(text: str) -> dict[str, float]:
    """Each sample name summed over labels, and also keyed by each other label: `name{label="value"}`."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith(("_created", "_bucket")):
                continue
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
            for label, value in sample.labels.items():
                if label not in IGNORED_LABELS:
                    key = f'{sample.name}{{{label}="{value}"}}'
                    totals[key] = totals.get(key, 0.0) + sample.value
    return totals


@dataclass(frozen=True)
class Part:
    """What one instance is there to do, given the topology around it."""

    name: str
    role: str
    engine: str  # sim | vllm
    consumer: bool  # it must take its media items from the encoders (prefill, or pd beside encoders)
    kv_consumer: bool  # it must take its prompt's KV from the prefill instances (decode beside prefill)

    @property
    def watches_log(self) -> bool:
        """vLLM says what a consumer loaded only in its log."""
        return self.engine != "sim" and self.consumer


def parts(instances: Iterable[tuple[str, str]], engine: str) -> list[Part]:
    """(name, role) of every instance -> what each must do."""
    instances = list(instances)
    roles = {role for _, role in instances}
    return [Part(name, role, engine, consumer="encode" in roles and role in ("prefill", "pd"),
                 kv_consumer="prefill" in roles and role == "decode") for name, role in instances]


def counts(part: Part, metrics: Optional[Mapping[str, float]], log: Optional[Mapping[str, int]]) -> dict[str, Optional[float]]:
    """The counters that show the part's work since it started; None: its signals cannot say.

    `metrics` is its /metrics (parsed; None when it did not answer), `log` the markers counted
    in its log (LOG_MARKERS; None when there is no log to read).
    """
    out: dict[str, Optional[float]] = {}
    m = metrics or {}
    known = metrics is not None

    def metric(name: str) -> Optional[float]:
        value = m.get(name, 0.0) if known else None
        return value if value is None or math.isfinite(value) else None  # NaN or inf says nothing

    sim = part.engine == "sim"
    if part.role == "encode":
        # The sim counts items it encoded; a vLLM encoder finishes one request per item.
        out["encoded"] = metric(SIM["encoded"] if sim else VLLM_REQUESTS)
    if part.consumer:
        if sim:
            out["ec_loaded"], out["encoded_locally"] = metric(SIM["loaded"]), metric(SIM["encoded"])
        else:
            have = log or {}
            out["ec_loaded"] = float(have[VLLM_EC_LOADED]) if have.get(VLLM_DEBUG) else None
            out["encoded_locally"] = float(have[VLLM_ENCODER_RAN]) if have.get(VLLM_ITERATIONS) else None
    if part.role == "prefill":
        out["prefilled"] = metric(SIM["prefills"] if sim else VLLM_REQUESTS)
    if part.kv_consumer:
        if sim:
            out["kv_remote"], out["kv_computed"] = metric(SIM["remote_prefills"]), metric(SIM["prefills"])
        else:
            out["kv_remote"], out["kv_computed"] = metric(VLLM_REMOTE_KV_TOKENS), metric(VLLM_LOCAL_KV_TOKENS)
    return out


def recent(now: Mapping[str, Optional[float]], then: Mapping[str, Optional[float]]) -> dict[str, Optional[float]]:
    """What the counters grew by since `then`, an earlier reading of the same process."""
    return {key: (None if value is None or then.get(key) is None else max(0.0, value - then[key]))  # type: ignore[operator]
            for key, value in now.items()}


def _n(value: Optional[float]) -> str:
    return "?" if value is None else f"{value:g}"


def verdict(part: Part, total: Mapping[str, Optional[float]], last: Mapping[str, Optional[float]],
            window_s: float = WINDOW_S) -> tuple[str, str, Optional[str]]:
    """(ok | degraded | unknown, what its signals say, the reason when degraded).

    Degraded is direct evidence only: a consumer that encoded media items itself while encoders
    exist, or a decoder that computed prefills while prefill instances exist, in the last window.
    """
    unit = "prefill(s)" if part.engine == "sim" else "prompt token(s)"
    said: list[str] = []
    if "encoded" in total:
        said.append(f"encoded {_n(total['encoded'])} item(s)")
    if part.consumer:
        said.append(f"loaded {_n(total['ec_loaded'])} EC item(s), encoded {_n(total['encoded_locally'])} itself")
    if "prefilled" in total:
        said.append(f"prefilled {_n(total['prefilled'])}")
    if part.kv_consumer:
        said.append(f"took KV for {_n(total['kv_remote'])} {unit} from prefill, computed {_n(total['kv_computed'])}")
    text = "; ".join(said)
    if part.consumer and (last.get("encoded_locally") or 0) > 0:
        return "degraded", text, (f"{part.name} encoded {last['encoded_locally']:g} media item(s) itself in the last "
                                  f"{window_s:g}s: the encoders' EC did not reach it (does its ec_transfer read where "
                                  "the encoders write?)")
    if part.kv_consumer and (last.get("kv_computed") or 0) > 0 and (part.engine == "sim" or not last.get("kv_remote")):
        return "degraded", text, (f"{part.name} computed {last['kv_computed']:g} {unit} itself in the last {window_s:g}s "
                                  "and took no KV from the prefill instances (is kv_transfer wired to both?)")
    if not said or any(v is None for v in total.values()):
        missing = [key for key, value in total.items() if value is None]
        why = (f"{text} ({', '.join(missing)}: " + ("it did not answer /metrics" if part.engine == "sim" or
               any(k not in ("ec_loaded", "encoded_locally") for k in missing) else
               "set VLLM_LOGGING_LEVEL=DEBUG and enable-logging-iteration-details on it to let epdctl see it") + ")"
               ) if said else "nothing to prove for its role"
        return ("unknown" if said else "ok"), why, None
    return "ok", text, None
