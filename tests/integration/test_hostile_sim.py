"""Hostile requests to the simulated engine (issue #12): refused with a 400, never a file or memory they ask for."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import psutil
import pytest

from epdctl.connectors import EC_FILENAME, ec_exists, load_ec, save_ec
from epdctl.media import MediaError

from conftest import free_ports, http_post, metrics, send_and_hang_up_when, sim_running, wait_for

IMAGE = "data:image/png;base64," + base64.b64encode(b"\x89PNG hostile test image").decode()


def ec_json(role: str, path) -> str:
    return json.dumps({"ec_connector": "ECExampleConnector", "ec_role": role,
                       "ec_connector_extra_config": {"shared_storage_path": str(path)}})


def image_body(*parts: dict, **extra) -> dict:
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "what is it?"}]}],
            "max_tokens": 2, **extra}


def image_part(uuid: str = None, url: str = IMAGE, kind: str = "image_url") -> dict:
    part = {"type": kind, kind: {"url": url}}
    if uuid is not None:
        part["uuid"] = uuid
    return part


def assert_refused(status: int, raw: bytes, fragment: str) -> None:
    assert status == 400, raw[:300]
    error = json.loads(raw)["error"]
    assert fragment in error["message"], error
    assert error["code"] == 400 and error["type"] == "BadRequestError"


# ---------------------------------------------------------------- #12.7: a uuid is a folder name


@pytest.mark.parametrize("key", ["../x", "ABS", "..", "a/b", "x" * 129, "new\nline"])
def test_producer_refuses_an_unsafe_uuid_and_writes_nothing_outside(procs, tmp_path, key):
    ec = tmp_path / "ec"
    key = str(tmp_path / "abs" / "path") if key == "ABS" else key
    url = procs.sim(free_ports(1)[0], "--ec-transfer-config", ec_json("ec_producer", ec))
    status, raw = http_post(url + "/v1/chat/completions", image_body(image_part(uuid=key)))
    assert_refused(status, raw, "is not a safe cache key")
    assert metrics(url)["epdctl_sim_encoded_items_total"] == 0
    assert [p for p in tmp_path.rglob(EC_FILENAME) if ec not in p.parents] == []


def test_consumer_refuses_an_unsafe_uuid_instead_of_loading_a_file_outside(procs, tmp_path):
    ec, planted = tmp_path / "ec", tmp_path / "planted"
    ec.mkdir()
    save_ec(str(tmp_path), "planted", 4, 8)  # a valid EC file beside the EC folder, not in it
    url = procs.sim(free_ports(1)[0], "--ec-transfer-config", ec_json("ec_consumer", ec))
    status, raw = http_post(url + "/v1/chat/completions", image_body(image_part(uuid="../planted")))
    assert_refused(status, raw, "'../planted' is not a safe cache key")
    m = metrics(url)
    assert m["epdctl_sim_ec_loaded_total"] == 0 and m["epdctl_sim_requests_total"] == 0
    assert (planted / EC_FILENAME).exists()


def test_safe_uuids_still_key_the_cache(procs, tmp_path):
    ec = tmp_path / "ec"
    url = procs.sim(free_ports(1)[0], "--ec-transfer-config", ec_json("ec_producer", ec))
    assert http_post(url + "/v1/chat/completions", image_body(image_part(uuid="Item_1.v-2")))[0] == 200
    assert (ec / "Item_1.v-2" / EC_FILENAME).exists()


@pytest.mark.parametrize("key", ["../x", "/abs/path", "..", "a/b"])
def test_ec_files_refuse_an_unsafe_key_as_a_second_line_of_defence(tmp_path, key):
    ec = tmp_path / "ec"
    with pytest.raises(MediaError, match="not a safe cache key"):
        save_ec(str(ec), key, 4, 8)
    with pytest.raises(MediaError, match="not a safe cache key"):
        load_ec(str(ec), key)
    assert list(tmp_path.rglob(EC_FILENAME)) == []
    save_ec(str(tmp_path), "x", 4, 8)  # a file where "../x" would point from the EC folder
    assert not ec_exists(str(ec), "../x")


# ---------------------------------------------------------------- #12.17: bounded allocations


def post_status(url: str, body: dict, timeout: float = 60.0) -> tuple[int, bytes]:
    """The status and at most 64 KiB of the answer: a hostile answer may be endless, so never read it all."""
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(65536)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def rss(proc) -> int:
    return psutil.Process(proc.pid).memory_info().rss


@pytest.mark.parametrize("stream", [False, True])
def test_absurd_max_tokens_is_refused_and_costs_no_memory(procs, stream):
    url = procs.sim(free_ports(1)[0], "--sim-tpot-ms", "0", "--sim-ttft-ms", "0")
    sim = procs.procs[-1]
    assert post_status(url, {"messages": [{"role": "user", "content": "warm up"}], "max_tokens": 4})[0] == 200
    before = rss(sim)
    status, raw = post_status(url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5_000_000,
                                    "stream": stream})
    assert_refused(status, raw, "'max_tokens' or 'max_completion_tokens' is too large: 5000000")
    assert "maximum context length is 32768 tokens" in json.loads(raw)["error"]["message"]
    grown = rss(sim) - before
    assert grown < 30 * 2**20, f"the sim grew by {grown / 2**20:.0f} MiB for a refused request"


def test_max_tokens_is_bounded_by_max_model_len(procs):
    url = procs.sim(free_ports(1)[0], "--max-model-len", "128", "--sim-tpot-ms", "0")
    ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 64}
    assert post_status(url, ok)[0] == 200
    status, raw = post_status(url, {**ok, "max_completion_tokens": 200})
    assert_refused(status, raw, "is too large: 200. This model's maximum context length is 128 tokens")


def test_a_prompt_beyond_the_context_is_refused(procs):
    url = procs.sim(free_ports(1)[0], "--max-model-len", "4096")
    status, raw = post_status(url, {"messages": [{"role": "user", "content": "word " * 20000}], "max_tokens": 1})
    assert_refused(status, raw, "maximum context length is 4096 tokens. However, your request has")
    # An image costs its tokens, not its base64 length: a large one fits a small context.
    big = "data:image/png;base64," + base64.b64encode(bytes(200_000)).decode()
    assert post_status(url, image_body(image_part(url=big)))[0] == 200


def test_media_items_are_bounded_per_modality(procs):
    url = procs.sim(free_ports(1)[0], "--sim-encode-ms", "0", "--limit-mm-per-prompt", '{"image": 2, "audio": 0}')
    two = [image_part(url=f"{IMAGE}{i}") for i in range(2)]
    assert post_status(url, image_body(*two))[0] == 200
    status, raw = post_status(url, image_body(*two, image_part(url=IMAGE + "3")))
    assert_refused(status, raw, "At most 2 image(s) may be provided in one prompt.")
    status, raw = post_status(url, image_body(image_part(kind="audio_url")))
    assert_refused(status, raw, "At most 0 audio(s)")


def test_media_items_have_a_default_bound(procs):
    url = procs.sim(free_ports(1)[0], "--sim-encode-ms", "0", "--max-model-len", "10000000")
    many = [image_part(url=f"{IMAGE}{i}") for i in range(1000)]
    status, raw = post_status(url, image_body(*many))
    assert_refused(status, raw, "At most 999 image(s) may be provided in one prompt.")
    assert metrics(url)["epdctl_sim_requests_total"] == 0


def test_n_other_than_one_is_refused(procs):
    url = procs.sim(free_ports(1)[0])
    status, raw = post_status(url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": 100000})
    assert_refused(status, raw, "n must be 1")
    assert post_status(url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": 1})[0] == 200


# ---------------------------------------------------------------- #27: as vLLM answers


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_frees_its_slot(procs, stream):
    """vLLM aborts the request of a client that disconnected, streamed or not. This one would
    run for days, so its slot coming free can only be the abort."""
    port = free_ports(1)[0]
    url = procs.sim(port, "--sim-tpot-ms", "10000000")
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 30000, "stream": stream}
    send_and_hang_up_when(port, body, lambda: sim_running(url) == 1)
    wait_for(lambda: sim_running(url) == 0, 60, "the sim to abort the request of a client that left")


@pytest.mark.parametrize("given, key", [(5, "5"), (5.5, "5.5"), (True, "True"), ("7", "7")])
def test_a_uuid_that_is_not_a_string_is_keyed_as_vllm_keys_it(procs, tmp_path, given, key):
    """vLLM's content-part models let any JSON value through as `uuid` and key the item by str(uuid)."""
    ec = tmp_path / "ec"
    url = procs.sim(free_ports(1)[0], "--ec-transfer-config", ec_json("ec_producer", ec))
    assert post_status(url, image_body(image_part(uuid=given)))[0] == 200
    assert [p.name for p in ec.iterdir()] == [key]


@pytest.mark.parametrize("given, shown", [([1], "'[1]'"), ({"a": "b"}, "\"{'a': 'b'}\""), ("", "''")])
def test_a_uuid_whose_key_is_unsafe_is_refused(procs, tmp_path, given, shown):
    ec = tmp_path / "ec"
    url = procs.sim(free_ports(1)[0], "--ec-transfer-config", ec_json("ec_producer", ec))
    status, raw = post_status(url, image_body(image_part(uuid=given)))
    assert_refused(status, raw, f"media uuid {shown} is not a safe cache key")
    assert not ec.exists() or list(ec.iterdir()) == []


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_max_tokens_null_is_up_to_the_context_bounded_as_when_absent(procs, route):
    """vLLM reads `max_tokens: null` as "up to the context length" (a real model stops at its end of
    sequence): the sim gives what it gives a chat request without max_tokens, within the context."""
    url = procs.sim(free_ports(1)[0], "--max-model-len", "20")
    path, prompt = (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}) if route == "chat"
                    else ("/v1/completions", {"prompt": "a fairly long prompt text"}))
    status, raw = http_post(url + path, {**prompt, "max_tokens": None})
    assert status == 200, raw
    usage = json.loads(raw)["usage"]
    assert usage["total_tokens"] == 20 and usage["completion_tokens"] < 16, usage  # the context left
    if route == "chat":  # max_completion_tokens null defers to max_tokens, as in vLLM
        status, raw = http_post(url + path, {**prompt, "max_completion_tokens": None, "max_tokens": 3})
        assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 3, raw
    unbounded = procs.sim(free_ports(1)[0])
    status, raw = http_post(unbounded + path, {**prompt, "max_tokens": None})
    assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 16, raw
