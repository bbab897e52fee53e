"""The encoder-cache file contract of vLLM's ECExampleConnector, shared by the sim and the proxy.

`<shared_storage_path>/<mm_hash>/encoder_cache.safetensors`, one tensor named `ec_cache`.
"""

from __future__ import annotations

import functools
import os

from epdctl.atomicfile import write_atomic
from epdctl.media import check_media_key, is_safe_media_key

EC_FILENAME = "encoder_cache.safetensors"
EC_TENSOR = "ec_cache"


def ec_file(storage_path: str, mm_hash: str) -> str:
    """The key's EC file. An unsafe key raises MediaError: as a folder name it could point
    anywhere (`../x`, `/abs`), and callers that forgot to check it must not write or read there."""
    return os.path.join(storage_path, check_media_key(mm_hash), EC_FILENAME)


def ec_exists(storage_path: str, mm_hash: str) -> bool:
    # No EC file is ever kept under an unsafe key, so there is none to find (and nothing outside the
    # folder is probed); saving or loading one is what gets refused.
    return is_safe_media_key(mm_hash) and os.path.exists(ec_file(storage_path, mm_hash))


@functools.lru_cache(maxsize=8)
def _ec_payload(tokens: int, hidden: int) -> bytes:
    """A serialized safetensors file with one (tokens × hidden) float16 tensor `ec_cache`.

    Built once per shape: the sim is the backend of the proxy benchmarks, and serializing a
    fresh random tensor per item cost more CPU than everything else it does for a request.
    """
    import numpy as np
    from safetensors.numpy import save

    data = np.random.default_rng(0).standard_normal((tokens, hidden), dtype=np.float32).astype(np.float16)
    return save({EC_TENSOR: data})


def save_ec(storage_path: str, mm_hash: str, tokens: int, hidden: int) -> str:
    """Write the EC file atomically: a temporary file in the same folder, then a rename.

    vLLM's own example connector writes in place, so two encoders producing the same
    mm_hash can leave a torn file for a consumer; a rename is atomic on POSIX.
    """
    final = ec_file(storage_path, mm_hash)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    write_atomic(final, _ec_payload(tokens, hidden))
    return final


def load_ec(storage_path: str, mm_hash: str):
    """The cached tensor, or None when there is no usable file (a miss). An unsafe key raises MediaError."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = ec_file(storage_path, mm_hash)
    try:
        return load_file(path)[EC_TENSOR]
    except (FileNotFoundError, KeyError, SafetensorError, OSError):
        return None
