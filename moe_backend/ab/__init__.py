"""A/B comparison of MoE backends: `compare` (offline, one report over shapes and backends), shadow
mode (a sampled fraction of served MoE calls re-run on a second backend, divergence and latency as
Prometheus metrics and JSON lines) and `ab-serve` (the same requests to two OpenAI-compatible
servers). See docs/ab-testing.md. Nothing here is imported by the serving path unless shadow mode
is switched on.
"""
