"""epdctl: orchestrate vLLM's disaggregated Encode / Prefill / Decode serving."""


def __getattr__(name: str) -> str:
    # From the installed metadata, so it cannot drift from pyproject.toml; read only when
    # asked for, because importlib.metadata is slow to import.
    if name != "__version__":
        raise AttributeError(f"module 'epdctl' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("epdctl")
    except PackageNotFoundError:
        return "0+unknown"
