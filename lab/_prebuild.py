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


def old_launcher(spec, old_dir: Path, m: int, n: int, cfg, params):
    """A callable launching `spec` built from the headers in `old_dir` on `params`
    (`launch.kernel_args`), with the persistent grid the package gives the same config."""
    import torch

    from moe_backend.cuda import driver, launch
    from moe_backend.cuda.config import NUM_THREADS

    kernel = driver.load_kernel(old_spec(spec, old_dir), torch.cuda.current_device())
    grid = launch.grid_size(m, n, cfg, torch.cuda.get_device_properties(0).multi_processor_count)
    if cfg.cluster > 1:
        resident = kernel.max_active_clusters((NUM_THREADS, 1, 1), cfg.smem_bytes, (cfg.cluster, 1, 1))
        grid = min(grid, resident * cfg.cluster) if resident > 0 else grid

    def run():
        kernel.launch(
            grid=(grid, 1, 1),
            block=(NUM_THREADS, 1, 1),
            smem=cfg.smem_bytes,
            stream=torch.cuda.current_stream().cuda_stream,
            params=params,
            cluster=(cfg.cluster, 1, 1),
        )

    return run
