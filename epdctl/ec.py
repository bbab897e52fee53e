"""The encoder-cache file contract of vLLM's ECExampleConnector, shared by the sim and the proxy.

`<shared_storage_path>/<mm_hash>/encoder_cache.safetensors`, one tensor named `ec_cache`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

EC_FILENAME = "encoder_cache.safetensors"
EC_TENSOR = "ec_cache"


def ec_file(storage_path: str, mm_hash: str) -> str:
    return os.path.join(storage_path, mm_hash, EC_FILENAME)


def ec_exists(storage_path: str, mm_hash: str) -> bool:
    return os.path.exists(ec_file(storage_path, mm_hash))


def save_ec(storage_path: str, mm_hash: str, tokens: int, hidden: int) -> str:
    """Write a (tokens × hidden) float16 tensor atomically: temp file in the same folder, then rename.

    vLLM's own example connector writes in place, so two encoders producing the same
    mm_hash can leave a torn file for a consumer; a rename is atomic on POSIX.
    """
    import numpy as np
    from safetensors.numpy import save_file

    folder = os.path.join(storage_path, mm_hash)
    os.makedirs(folder, exist_ok=True)
    seed = int.from_bytes(hashlib.sha256(mm_hash.encode()).digest()[:8], "little")
    data = np.random.default_rng(seed).standard_normal((tokens, hidden), dtype=np.float32).astype(np.float16)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file({EC_TENSOR: data}, tmp)
        final = os.path.join(folder, EC_FILENAME)
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return final


def load_ec(storage_path: str, mm_hash: str):
    """The cached tensor, or None when there is no usable file (a miss)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(ec_file(storage_path, mm_hash))[EC_TENSOR]
    except (FileNotFoundError, KeyError, SafetensorError, OSError):
        return None
