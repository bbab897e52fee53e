"""Media items in OpenAI chat requests: finding them, keying them, checking local paths.

Shared by the sim and the proxy so both key the encoder cache the same way.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator, Optional
from urllib.parse import unquote, urlparse

# content-part type → the key holding its payload
MEDIA_PARTS = {
    "image_url": "image_url",
    "video_url": "video_url",
    "audio_url": "audio_url",
    "input_audio": "input_audio",
}


class MediaError(ValueError):
    """A media item the server must refuse with 400."""


# vLLM's ECExampleConnector (and the sim) use a media item's key as a folder name under the EC
# path, so a client's `uuid` must be a plain file name: no separators, no `.`/`..`, bounded.
_SAFE_KEY = re.compile(r"[A-Za-z0-9._-]{1,128}")


def is_safe_media_key(key: str) -> bool:
    return bool(_SAFE_KEY.fullmatch(key)) and key not in (".", "..")


def check_media_key(key: str) -> str:
    """`key` if it is safe as a folder name under the EC path; else MediaError."""
    if not is_safe_media_key(key):
        shown = key if len(key) <= 40 else key[:40] + "..."
        raise MediaError(f"media uuid {shown!r} is not a safe cache key (1-128 of A-Z a-z 0-9 . _ -, not . or ..)")
    return key


@dataclass
class MediaItem:
    part: dict  # the content part itself (mutable: the proxy sets its uuid)
    kind: str
    locator: str  # the URL, or the inline data for input_audio

    @property
    def uuid(self) -> Optional[str]:
        """The client's key as vLLM reads it: any value but null, as its str() (vLLM's content-part
        models let `"uuid": 5` through and key the item "5"). Check it with check_media_key."""
        value = self.part.get("uuid")
        return None if value is None else str(value)


def iter_media(body: dict) -> Iterator[MediaItem]:
    """Every media content part of a chat request, in order."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            key = MEDIA_PARTS.get(kind)
            if key is None:
                continue
            payload = part.get(key)
            if isinstance(payload, dict):
                locator = payload.get("url") if kind != "input_audio" else payload.get("data")
            else:
                locator = payload
            if not isinstance(locator, str) or not locator:
                raise MediaError(f"{kind} part without a url/data")
            yield MediaItem(part, kind, locator)


def content_hash(locator: str) -> str:
    """A stable key from the item's URL or inline data (sha256, hex)."""
    return hashlib.sha256(locator.encode("utf-8", "surrogatepass")).hexdigest()


def local_media_path(url: str, allowed_root: Optional[str]) -> Optional[str]:
    """For a file:// URL, the file's real path if it lies under `allowed_root`; else MediaError.

    Returns None for URLs that are not file://.
    """
    # URL schemes are case-insensitive and clients (and vLLM) forgive surrounding space, so
    # ` FILE:///etc/passwd` is a file URL too.
    if url.strip()[:5].lower() != "file:":
        return None
    if not allowed_root:
        raise MediaError("file:// media is refused: no allowed local media path is configured")
    try:
        path = unquote(urlparse(url.strip()).path)
        if "\0" in path:
            raise ValueError("a NUL byte in the path")
        path = os.path.realpath(path)
    except ValueError as exc:
        raise MediaError(f"malformed file:// URL: {exc}") from None
    root = os.path.realpath(allowed_root)
    if os.path.commonpath([path, root]) != root:
        raise MediaError(f"file:// media outside the allowed local media path {root}")
    return path


def strip_text(body: dict[str, Any], item: MediaItem) -> dict[str, Any]:
    """The encoder request for one item: that item alone, no text, one output token."""
    request = {key: value for key, value in body.items() if key not in ("messages", "stream", "stream_options")}
    request["messages"] = [{"role": "user", "content": [item.part]}]
    request["max_tokens"] = 1
    request.pop("max_completion_tokens", None)
    request["stream"] = False
    return request
