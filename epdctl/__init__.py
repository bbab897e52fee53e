"""epdctl: orchestrate vLLM's disaggregated Encode / Prefill / Decode serving."""

__version__ = "0.1.0"
