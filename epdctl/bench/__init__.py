"""`epdctl bench`: a streaming load generator and the report `vllm bench serve` users know."""
