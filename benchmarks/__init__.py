"""Benchmarks, run from the repository root as `python -m benchmarks.<name>` (the older scripts
also run as `python benchmarks/<name>.py`)."""
