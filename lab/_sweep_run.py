"""Shared by the copy-bound kernel sweeps (sweep_quant_gather, sweep_combine): the timing of one
contender, the copy floor, and the run loop (header, one result per shape, table, JSON)."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from typing import Callable


def graph_us(fn, rep_ms: int) -> float:
    """fn as a CUDA-graph replay: do_bench's median, L2 flushed, in µs."""
    from moe_backend.testing import time_graph

    return time_graph(fn, warmup_ms=3, rep_ms=rep_ms)


def copy_floor_us(nbytes: int, rep_ms: int, device: str = "cuda") -> float:
    """An SM copy kernel (`lab.copy_bandwidth.triton_copy`) reading and writing `nbytes` in all
    (nbytes / 2 each way), graph-replayed. Not a torch `copy_`: replayed from a graph that is a
    memcpy node, which moved 2.2-2.7 TB/s at 64-468 MB where the SM copy moved 3.0-3.9
    (docs/benchmarks.md, "Device copy bandwidth against size and timing method")."""
    import torch

    from lab.copy_bandwidth import triton_copy

    src = torch.empty(nbytes // 2 // 16 * 4, dtype=torch.int32, device=device).random_(0, 1 << 30)
    dst = torch.empty_like(src)
    return graph_us(lambda: triton_copy(src, dst), rep_ms)


def run_sweep(shapes: list, run_one: Callable, name_of: Callable, render: Callable, json_path: str | None) -> int:
    """Runs `run_one(shape)` for each shape on the GPU (a result dict with an "equal" entry),
    prints the header, each shape's seconds, `render(results)`; writes the JSON when asked.
    Returns 0 when every result's outputs were equal, 1 otherwise, 2 without a GPU."""
    import torch
    import triton

    if not torch.cuda.is_available():
        print("needs a CUDA GPU (--list runs on CPU)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    header = (
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"CUDA {torch.version.cuda}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"CUDA-graph replay, do_bench median, L2 flushed; floor = an SM copy kernel moving the same bytes"
    )
    print(header, flush=True)
    results = []
    for shape in shapes:
        t0 = time.perf_counter()
        results.append(run_one(shape))
        torch.cuda.empty_cache()
        print(f"  {name_of(shape)}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    print(render(results))
    elapsed = time.perf_counter() - start
    print(f"elapsed {elapsed:.0f} s")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(header=header, elapsed_s=elapsed, results=results), f, indent=1)
    return 0 if all(r["equal"] for r in results) else 1


def sweep_parser(doc: str, rep_ms: int) -> argparse.ArgumentParser:
    """--json, --list and --rep-ms (>= 1, checked by `parse`), described by the module's first paragraph."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--json", default=None, help="write the results here as JSON")
    p.add_argument("--list", action="store_true", help="print the shapes and candidates only (no GPU)")
    help_rep = f"do_bench's timing window per contender (default {rep_ms})"
    p.add_argument("--rep-ms", type=int, default=rep_ms, help=help_rep)
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = p.parse_args(argv)
    if args.rep_ms < 1:
        p.error("--rep-ms must be >= 1")
    return args


def candidate_table(results: list[dict], labels: list[str], title: str) -> list[str]:
    """Markdown lines: every contender's µs (and its ratio to the floor) per result row."""
    lines = ["", f"{title} (µs; ratio to the floor)", ""]
    lines.append("| shape | " + " | ".join(labels) + " |")
    lines.append("|---|" + "---:|" * len(labels))
    for r in results:
        cells = [f"{r['configs'][c]:.1f} ({r['configs'][c] / r['floor_us']:.2f})" for c in labels]
        lines.append(f"| {r['shape']} | " + " | ".join(cells) + " |")
    return lines
