"""The simulated engine (`engine: sim`): a drop-in for `vllm serve` for tests, demos and CI.

It is a simulator, not an inference engine: answers are deterministic filler text, and the
timing model is a handful of sleeps. What it keeps exactly are vLLM's EC and KV contracts
(docs/design.md, Separate processes: the proxy and the sim), so a whole topology runs, and its disaggregation can be proven, anywhere.
"""
