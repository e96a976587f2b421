"""Shared by the lab's before/after timings: every kernel a run will load, compiled up front in
parallel (one JIT build per spec takes tens of seconds; the run then finds them cached)."""

from __future__ import annotations

import dataclasses
from pathlib import Path


def old_spec(spec, old_dir: Path):
    """`spec` built from the headers in `old_dir` under a name of its own (`..._before`)."""
    name = spec.kernel_name + "_before"
    return dataclasses.replace(
        spec, kernel_name=name, source=spec.source.replace(spec.kernel_name, name), include_dirs=(old_dir,)
    )


def compile_all(specs, workers: int = 16) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from moe_backend.cuda import jit

    unique = {spec.kernel_name: spec for spec in specs}
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(jit.compile_cubin, unique.values()))
