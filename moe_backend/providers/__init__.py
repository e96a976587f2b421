"""Optional third-party grouped-GEMM providers, imported lazily (peers for the policy and benchmarks)."""
