"""What the proxy carries between encoders and the EC consumer, for the connectors that need it (vLLM 0.32+).

- ECCPUConnector: an encoder answers with `ec_transfer_params` = {mm_hash: {peer_host, peer_port,
  size_bytes, shape, ...}}, where its output can be read over NIXL. A consumer reads an item only
  when its own request carries that entry; without it, it encodes the item itself, silently.
- ECMooncakeConnector: an encoder pushes each item to the consumer its request names
  (`consumer_zmq`), under a transfer id per item (`ec_items`); the consumer's request lists the
  same ids in item order (vLLM matches them by position, or by mm_hash when given), and it waits
  for those pushes. So the proxy picks the consumer before it calls the encoders, and then sends
  the request to that instance and no other (vLLM 0.33's proxy: --ec-consumer-zmq-addrs).

ECExampleConnector needs none of this: the consumer finds the file by the item's key.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

CPU = "ECCPUConnector"
MOONCAKE = "ECMooncakeConnector"
HANDLE_CONNECTORS = frozenset({CPU, MOONCAKE})  # their encoder answers carry what the consumer needs
ZMQ_ADDRESS = re.compile(r"tcp://(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])"
                         r":(?P<port>[0-9]{1,5})")


def check_zmq_address(address: str) -> str | None:
    """Why `address` is not a `tcp://HOST:PORT` an encoder may be told to push to (None when it is)."""
    match = ZMQ_ADDRESS.fullmatch(address)
    if not match:
        return f"{address[:80]!r} is not tcp://HOST:PORT"
    if not 1 <= int(match["port"]) <= 65535:
        return f"{address[:80]!r}: port {match['port']} is outside 1-65535"
    host = match["host"]
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"{address[:80]!r}: {host} is not an IPv6 address"
    return None


def push_params(consumer_zmq: str, transfer_id: str) -> dict[str, Any]:
    """The encoder request's `ec_transfer_params` for one item (one feature) pushed over Mooncake."""
    return {"consumer_zmq": consumer_zmq, "ec_items": [{"transfer_id": transfer_id}]}


def consumer_params(item_keys: list[str | None], answers: dict[str, Any],
                    transfer_ids: dict[str, str]) -> dict[str, Any]:
    """The consumer request's `ec_transfer_params`, from the encoders' answers (by item key) and,
    for a push connector, the transfer id each item was pushed under.

    `item_keys` are the request's media items in order (a repeated item repeats its key).
    """
    params: dict[str, Any] = {}
    reported: dict[str, str] = {}
    for key, answer in answers.items():
        given = answer.get("ec_transfer_params") if isinstance(answer, dict) else None
        if not isinstance(given, dict):
            continue
        entries = {mm_hash: entry for mm_hash, entry in given.items()
                   if isinstance(mm_hash, str) and mm_hash != "ec_items" and isinstance(entry, dict)}
        params.update(entries)
        if len(entries) == 1:
            reported[key] = next(iter(entries))  # the engine's own mm_hash for the item
    if transfer_ids:
        params["ec_items"] = [
            {"transfer_id": transfer_ids[key], **({"mm_hash": reported[key]} if key in reported else {})}
            for key in item_keys if key in transfer_ids]
    return params
