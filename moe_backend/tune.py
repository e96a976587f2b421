"""`python -m moe_backend tune`: regenerate the grouped-GEMM config tables for this GPU.

For each DeepSeek-V3 weight shape (EP8 and TP8 slices, w13 and w2) and each rows-per-expert
bucket, times a small candidate set per kernel (CUDA-graph replay, median) and writes the fastest
into `moe_backend/kernels/configs/<kernel>_<device>.json` (or --out-dir). Decode buckets tune the
masked kernel, prefill buckets the contiguous one (the layouts the policy uses in each phase).
The masked table's tiles also run on the layer's decode layout (contiguous, segments padded to
the larger tile of the layer's two GEMMs): `--decode-layouts masked,contiguous` times each
candidate there as well.
The table is written after every finished (shape, rows) job, so a run stopped part way keeps what
it finished; a run over part of an existing table records the entries it changed under the
table's `meta.retuned`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from moe_backend.constants import DEEPSEEK_V3_GEMM_SHAPES, DEEPSEEK_V3_HIDDEN

# (slice, gemm, experts, N, K)
SHAPES = DEEPSEEK_V3_GEMM_SHAPES
DECODE_ROWS = (1, 4, 16, 64, 128)
PREFILL_ROWS = (256, 512, 2048, 4096)
# Prefill buckets above this many rows in all are skipped on TP8 (256 experts: memory, time).
MAX_TOTAL_ROWS = 256 * 512
# The masked kernel's tiles run on the masked layout and, in the layer's decode, on the contiguous one.
DECODE_LAYOUTS = ("masked", "contiguous")


# (K_UNROLL, num_stages) pairs the grids try
DEPTHS = ((1, 3), (1, 4), (1, 5), (2, 2), (2, 3), (4, 2))


def _pow2ceil(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def candidates(m: int, *, masked: bool, k: int = DEEPSEEK_V3_HIDDEN) -> list[dict]:
    """A small grid around what the rows-per-expert count needs (see _gemm_config.formula)."""
    out = []
    if k <= 256:
        # Short K: one program loops over N_LOOP n-tiles with the whole K of A held (see the kernel).
        for bm, bn, n_loop, stages, w in itertools.product(
            sorted({min(max(_pow2ceil(m), 16), 128), 64}), (128, 256), (4, 8), (2, 3), (4, 8)
        ):
            if (bm * bn < 64 * 128 and w == 8) or stages * 256 * bn + 256 * bm > 200 * 1024:
                continue
            out.append(
                dict(BLOCK_M=bm, BLOCK_N=bn, GROUP_M=1, SWAP_AB=False, N_LOOP=n_loop, num_warps=w, num_stages=stages)
            )
    if masked and m <= 128:
        top = min(max(_pow2ceil(m), 16), 128)
        # Twice the mean rows too where that is at most 32: under imbalanced routing a hot expert
        # holds several times the mean, and each of its M tiles streams the expert's weights again.
        wide = {2 * top} if top <= 16 else set()
        for bm in sorted({top, max(16, top // 2)} | wide):
            out += _masked_tiles(bm, m)
        if top <= 16:
            out += _hot_expert_candidates(top, DEPTHS)
        return out
    for bm, bn, w, (unroll, stages), gm in itertools.product(
        (64, 128), (128, 256), (4, 8), DEPTHS[:2] + DEPTHS[3:], (1, 8)
    ):
        if (bm == 64 and w == 8 and bn == 128) or _smem_bytes(bm, bn, unroll, stages) > 200 * 1024:
            continue
        out.append(
            dict(BLOCK_M=bm, BLOCK_N=bn, GROUP_M=gm, SWAP_AB=False, K_UNROLL=unroll, num_warps=w, num_stages=stages)
        )
    return out


def _masked_tiles(bm: int, m: int) -> list[dict]:
    """The masked grid's plain (not narrow) tiles of `bm` rows for m rows per expert."""
    out = []
    for bn, (unroll, stages) in itertools.product((64, 128, 256), DEPTHS):
        if _smem_bytes(bm, bn, unroll, stages) > 200 * 1024 or (unroll == 4 and m < 64):
            continue
        warps = (4, 8) if bm * bn >= 64 * 128 else (4,)
        swaps = (True,) if bm <= 32 else (False, True)
        # TMA loads pay where the tiles are large enough to be issue-bound (64+ rows).
        tmas = (False, True) if bm >= 64 else (False,)
        for w, sw, tma in itertools.product(warps, swaps, tmas):
            out.append(
                dict(
                    BLOCK_M=bm,
                    BLOCK_N=bn,
                    GROUP_M=1,
                    SWAP_AB=sw,
                    K_UNROLL=unroll,
                    TMA=tma,
                    num_warps=w,
                    num_stages=stages,
                )
            )
    return out


def _hot_expert_candidates(top: int, depth) -> list[dict]:
    """For a mean of at most 16 rows per expert under imbalanced routing: tiles 2x the mean rows
    whose m-tiles holding at most the mean's tile run narrow (NARROW_M), and tiles 4x the mean
    rows, plain and so. One kernel then covers a hot expert in few passes over its weight tile
    and the experts near the mean in narrow tiles."""
    out = []
    for bm, narrow in ((2 * top, top), (4 * top, 0), (4 * top, top)):
        # 64-row tiles unswapped (swapped, beside a narrow tile, ptxas spills at K_UNROLL 2); 32-row
        # ones swapped (unswapped, they do not fill an MMA's M).
        swap = bm <= 32
        for unroll, stages in depth:
            if _smem_bytes(bm, 128, unroll, stages) > 200 * 1024 or unroll == 4:
                continue
            out.append(
                dict(
                    BLOCK_M=bm,
                    BLOCK_N=128,
                    GROUP_M=1,
                    SWAP_AB=swap,
                    K_UNROLL=unroll,
                    TMA=False,
                    NARROW_M=narrow,
                    num_warps=4,
                    num_stages=stages,
                )
            )
    return out


def _smem_bytes(bm: int, bn: int, unroll: int, stages: int) -> int:
    return stages * unroll * 128 * (bm + bn)


def _job_inputs(kernel: str, e: int, m: int, n: int, k: int, routing: str, weights, layout: str, job) -> Callable:
    """`run(config)`: one job's GEMM under one routing (m rows per expert on average, per-expert
    counts from `testing.routed_counts`) on one layout, its operands drawn once here."""
    from moe_backend.kernels.grouped_gemm_contiguous import CONTIGUOUS_ALIGNMENT, grouped_gemm_contiguous
    from moe_backend.kernels.grouped_gemm_masked import grouped_gemm_masked
    from moe_backend.testing import make_contiguous_inputs, make_masked_inputs, routed_counts

    counts = routed_counts(e, m, routing)
    if kernel == "grouped_gemm_masked" and layout == "contiguous":
        block_ms = {cfg["BLOCK_M"] for cfg in job.candidates}
        return _layer_decode_inputs(
            counts, m, n, k, weights, block_ms, gather_a=job.gemm == "w13", pad_at_least=job.partner_block_m
        )
    if kernel == "grouped_gemm_masked":
        a, a_s, b, bs, idx = make_masked_inputs(e, counts, n, k, weights)
        out = torch.empty(*a.shape[:2], n, dtype=torch.bfloat16, device="cuda")
        return lambda cfg: grouped_gemm_masked(a, a_s, b, bs, idx, out, config=cfg)
    a, a_s, b, bs, idx = make_contiguous_inputs(e, counts, n, k, CONTIGUOUS_ALIGNMENT, weights)
    out = torch.empty(a.shape[0], n, dtype=torch.bfloat16, device="cuda")
    return lambda cfg: grouped_gemm_contiguous(a, a_s, b, bs, idx, out, config=cfg)


def layer_decode_layout(counts: torch.Tensor, block_m: int, perm: torch.Tensor) -> tuple:
    """(expert id per row int32, token row per row int64, rows in use): the layer's decode layout
    for per-expert `counts` (int64 `[E]`, on the host), each expert's segment padded to `block_m`
    rows over the static bound the layer sizes it by (`max_contiguous_rows`); padding rows have
    id -1 and token row -1. `perm` (int64 `[rows]`) gives the token row of each routed row in
    expert order (the layer's rows come from scattered tokens)."""
    from moe_backend.dispatch.layouts import max_contiguous_rows

    bound = max_contiguous_rows(int(counts.sum()), counts.numel(), block_m)
    ids = torch.full((bound,), -1, dtype=torch.int32)
    src = torch.full((bound,), -1, dtype=torch.int64)
    row = done = 0
    for expert, c in enumerate(counts.tolist()):
        ids[row : row + c] = expert
        src[row : row + c] = perm[done : done + c]
        row += -(-c // block_m) * block_m
        done += c
    return ids, src, row


def _layer_decode_inputs(
    counts, m: int, n: int, k: int, weights, block_ms, *, gather_a: bool, pad_at_least: int = 1, device: str = "cuda"
) -> Callable:
    """`run(config)`: a masked-table config as the layer's decode plan runs it on its contiguous
    layout (`dispatch.gemm_choice.masked_tiles_on_contiguous`, `with_split_k`): segments padded to
    the config's BLOCK_M, or to `pad_at_least` rows (the layer's other GEMM's tile) where that is
    larger (`segment_alignment`), over the static bound, the rows in use read on the device, A
    read through the token rows (GEMM1 without TMA: the plan's gather), K split where the plan
    would split it."""
    from moe_backend.dispatch.gemm_choice import GemmPlan, with_split_k
    from moe_backend.kernels import _gemm_config
    from moe_backend.plan_execution import run_contiguous_gemm
    from moe_backend.quant import quantize_fp8_per_token_group

    e = counts.numel()
    b, bs = weights
    total = int(counts.sum())
    tokens_a, tokens_s = quantize_fp8_per_token_group(torch.randn(total, k, device=device, dtype=torch.bfloat16))
    perm = torch.randperm(total)
    layouts = {}
    for bm in sorted(block_ms):
        ids, src, used = layer_decode_layout(counts, max(bm, pad_at_least), perm)
        src = src.to(device)
        rows = src.clamp(min=0)  # padding rows read token 0; the kernel does not walk or write them
        layouts[bm] = (
            ids.to(device),
            src,
            tokens_a[rows],
            tokens_s[rows],
            torch.tensor([used], dtype=torch.int32, device=device),
        )
    outs: dict = {}

    def run(cfg):
        full = _gemm_config.check_config(dict(cfg, NARROW_M=0), max_block_m=128)
        g = with_split_k(GemmPlan("triton", n, k, tuple(sorted(full.items()))), e, m)
        ids, src, a, a_s, used = layouts[full["BLOCK_M"]]
        key = (full["BLOCK_M"], g.split_k)
        if key not in outs:  # on the first call, which runs before the graph is captured
            shape, dtype = (
                ((g.split_k, ids.numel(), n), torch.float32) if g.split_k > 1 else ((ids.numel(), n), torch.bfloat16)
            )
            outs[key] = (
                torch.empty(shape, dtype=dtype, device=device),
                torch.zeros(1, dtype=torch.int32, device=device),
            )
        out, splits = outs[key]
        gather = gather_a and not full["TMA"]
        return run_contiguous_gemm(
            g, tokens_a if gather else a, tokens_s if gather else a_s, b, bs, ids, out, e,
            rows_in_use=used, a_rows=src if gather else None, splits_out=splits if g.split_k > 1 else None,
        )  # fmt: skip

    return run


@dataclass(frozen=True)
class _Job:
    gemm: str  # "w13" or "w2"
    candidates: tuple
    partner_block_m: int  # the layer's other GEMM's BLOCK_M at these rows (1: not timed on its layout)


def job_candidates(kernel: str, m: int, n: int, k: int, decode_layouts=("masked",)) -> list[dict]:
    """The configs a job times. With the layer's decode layout among `decode_layouts`, the masked
    kernel's candidates are those the layer can run as timed: no narrow tiles (NARROW_M; the
    contiguous walk does not run them), and only the BLOCK_M the layer runs this GEMM with now
    (`_layer_block_m`; the grid's plain tiles of that height where the grid has none). The layer
    pads each expert's segment to the larger BLOCK_M of its two GEMMs, so another BLOCK_M changes
    the other GEMM's layout too, which a GEMM timed alone does not see."""
    masked = kernel == "grouped_gemm_masked"
    out = candidates(m, masked=masked, k=k)
    if masked and "contiguous" in decode_layouts:
        block_m = _layer_block_m(m, n, k)
        out = [cfg for cfg in out if cfg["BLOCK_M"] == block_m and not cfg.get("NARROW_M")]
        out = out or _masked_tiles(block_m, m)
    return out


def _layer_block_m(m: int, n: int, k: int) -> int:
    """BLOCK_M of the config the layer's decode runs now for this GEMM at m rows per expert."""
    from moe_backend.dispatch.gemm_choice import masked_tiles_on_contiguous

    return masked_tiles_on_contiguous(m, n, k, torch.cuda.get_device_name())["BLOCK_M"]


def _partner_block_m(sl: str, gemm: str, m: int) -> int:
    """The decode BLOCK_M at m rows per expert of the layer's other GEMM in slice `sl` (w2 for
    w13 and back; 1 where SHAPES holds no such GEMM)."""
    for other in SHAPES:
        if other[0] == sl and other[1] != gemm:
            return _layer_block_m(m, other[3], other[4])
    return 1


def _time_candidates(kernels, jobs, bar, log, routings=("uniform",), on_job=None, decode_layouts=("masked",)) -> dict:
    """{kernel: {"N=..,K=..": {m: best config with its µs}}} for each (kernel, shape, m) job: the
    config with the least time summed over `routings` (uniform and imbalanced counts at the same
    mean rows per expert, so a tile that only suits equal counts does not win) and, for the masked
    kernel, over `decode_layouts` (masked; contiguous: as the layer's decode runs the table's
    tiles). `on_job(kernel, tables)` runs after each job, so a caller can save what is done before
    the next one starts."""
    from moe_backend.testing import random_fp8_weights, time_graph

    tables: dict = {kernel: {} for kernel in kernels}
    weights_cache: dict = {}
    for kernel, (sl, gemm, e, n, k), m in jobs:
        layouts = decode_layouts if kernel == "grouped_gemm_masked" else ("contiguous",)
        on_layer_layout = kernel == "grouped_gemm_masked" and "contiguous" in layouts
        job = _Job(
            gemm,
            tuple(job_candidates(kernel, m, n, k, decode_layouts)),
            _partner_block_m(sl, gemm, m) if on_layer_layout else 1,
        )
        key = (e, n, k)
        if key not in weights_cache:
            weights_cache.clear()
            torch.cuda.empty_cache()
            weights_cache[key] = random_fp8_weights(e, n, k)
        runs = []
        for routing, layout in itertools.product(routings, layouts):
            name = routing + (f" {layout}" if len(layouts) > 1 else "")
            runs.append((name, _job_inputs(kernel, e, m, n, k, routing, weights_cache[key], layout, job)))
        best = None
        for cfg in job.candidates:
            _interrupts_to_python()
            per_run = []
            for name, run_gemm in runs:
                try:
                    per_run.append(time_graph(lambda: run_gemm(cfg)))  # noqa: B023
                except Exception as exc:  # out of shared memory / registers: not a candidate here
                    per_run.append(float("inf"))
                    if log:
                        print(
                            f"{kernel} {sl} {gemm} m={m} {name} {cfg}: {type(exc).__name__}: {str(exc)[:120]}",
                            file=log,
                            flush=True,
                        )
                    break
            us = sum(per_run)
            if log and us != float("inf"):
                detail = ", ".join(f"{name} {t:.1f}" for (name, _), t in zip(runs, per_run))
                print(f"{kernel} {sl} {gemm} m={m} {cfg} {us:.1f}us ({detail})", file=log, flush=True)
            if best is None or us < best[0]:
                best = (us, cfg)
            bar.update(1)
        bar.set_postfix_str(f"{sl} {gemm} m={m}: {best[0]:.1f}us")
        tables[kernel].setdefault(f"N={n},K={k}", {})[str(m)] = dict(best[1], us=round(best[0], 1))
        runs = None  # freed before the next job's inputs are drawn
        if on_job is not None:
            on_job(kernel, tables)
    return tables


def tune(
    kernels=("grouped_gemm_masked", "grouped_gemm_contiguous"),
    shapes=SHAPES,
    decode_rows=DECODE_ROWS,
    prefill_rows=PREFILL_ROWS,
    out_dir=None,
    log=None,
    routings=("uniform",),
    decode_layouts=("masked",),
) -> dict:
    """Times the candidates of every (kernel, shape, rows) job and merges the fastest into the
    GPU's tables (`merge_tuned`), saving them after each job. `routings`: the counts each
    candidate is timed under (summed), e.g. ("uniform", "zipf:0.6") to tune for imbalanced
    routing as well. `decode_layouts`: the layouts each masked-kernel candidate is timed on
    (summed): "masked", and "contiguous" as the layer's decode runs the masked table's tiles."""
    layouts = () if isinstance(decode_layouts, str) else tuple(decode_layouts)
    if not layouts or len(set(layouts)) != len(layouts) or any(name not in DECODE_LAYOUTS for name in layouts):
        raise ValueError(
            f"decode_layouts: expected a non-empty sequence of distinct names from {DECODE_LAYOUTS}, "
            f"got {decode_layouts!r}"
        )
    import triton

    from moe_backend._json_file import write_json
    from moe_backend._progress import progress
    from moe_backend.kernels import _gemm_config

    device = torch.cuda.get_device_name()
    jobs = []
    for kernel in kernels:
        rows = decode_rows if kernel == "grouped_gemm_masked" else prefill_rows
        for shape, m in itertools.product(shapes, rows):
            if shape[2] * m <= MAX_TOTAL_ROWS or shape[2] <= 32:
                jobs.append((kernel, shape, m))
    if not jobs:
        raise ValueError(
            f"nothing to tune: no shape with these rows per expert (buckets of more than {MAX_TOTAL_ROWS} "
            "rows in all are skipped where a slice has more than 32 experts)"
        )
    layouts_note = (
        "" if tuple(decode_layouts) == ("masked",) else f", summed over layouts ({', '.join(decode_layouts)})"
    )
    run_meta = {
        kernel: dict(
            device=device,
            torch=torch.__version__,
            triton=triton.__version__,
            date=datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            method="CUDA-graph replay, median"
            + ("" if tuple(routings) == ("uniform",) else ", summed over routings")
            + (layouts_note if kernel == "grouped_gemm_masked" else ""),
            routings=list(routings),
        )
        for kernel in kernels
    }
    out_dir = Path(out_dir or _gemm_config.CONFIG_DIR)
    base: dict = {}  # per kernel: the table as it was before this run (None: there was none)

    def path_of(kernel: str) -> Path:
        return out_dir / _gemm_config.table_path(kernel, device).name

    def save(kernel: str, tables: dict) -> None:
        # After every job, so a run stopped part way (time limit, Ctrl-C) keeps the jobs it finished.
        if kernel not in base:
            shipped = path_of(kernel) if path_of(kernel).exists() else _gemm_config.table_path(kernel, device)
            base[kernel] = json.loads(shipped.read_text()) if shipped.exists() else None
        write_json(path_of(kernel), merge_tuned(base[kernel], tables[kernel], run_meta[kernel]))

    total = sum(len(job_candidates(kernel, m, shape[3], shape[4], decode_layouts)) for kernel, shape, m in jobs)
    with progress(total, f"tune on {device}", unit="config") as bar:
        try:
            _time_candidates(kernels, jobs, bar, log, routings, on_job=save, decode_layouts=decode_layouts)
        except KeyboardInterrupt:
            saved = ", ".join(str(path_of(k)) for k in base) or "none yet"
            with _second_interrupt_ignored():
                print(f"\ntune: interrupted; tables with the finished jobs: {saved}", file=sys.stderr)
            raise
        finally:
            _gemm_config.load_table.cache_clear()
    return {"paths": [str(path_of(k)) for k in base]}


def _interrupts_to_python() -> None:
    """Python's SIGINT handler installed again at the C level (main thread only), in case native
    code loaded by the kernel compiler replaced it: on an H100 a tune interrupted in its second job
    ended on the signal itself, without a KeyboardInterrupt or the line naming the saved tables
    (the finished jobs were saved), while one interrupted in its first job raised it."""
    if threading.current_thread() is threading.main_thread():
        handler = signal.getsignal(signal.SIGINT)
        if handler is not None:  # None: installed outside Python, left alone
            signal.signal(signal.SIGINT, handler)


@contextlib.contextmanager
def _second_interrupt_ignored():
    """SIGINT ignored for the block (main thread only): `timeout -s INT` signals the command and
    then its whole process group, so Python can get a second interrupt while it says what it saved."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def merge_tuned(table: dict | None, tuned: dict, run_meta: dict) -> dict:
    """`table` (a loaded JSON table, or None) with this run's winners `tuned` ({shape: {m: config
    with "us"}}) merged in. A new table, or a run that covers every entry of the old one, takes
    the run's meta with each winner's time under `tuned_us`. A run over part of an existing table
    leaves the table's meta as it was and records each entry it changed under `retuned` (date,
    method, routings, time), since the table's own date and method no longer hold for those."""
    table = json.loads(json.dumps(table)) if table else {}
    old_meta = table.pop("meta", None)
    covered = {(shape, m) for shape, by_m in tuned.items() for m in by_m}
    existing = {(shape, m) for shape, by_m in table.items() for m in by_m}
    partial = old_meta is not None and not existing <= covered
    meta = old_meta if partial else dict(run_meta, tuned_us={})
    timings = meta.setdefault("tuned_us", {})
    run = {key: run_meta[key] for key in ("date", "method", "routings")}
    for shape, by_m in tuned.items():
        for m, cfg in by_m.items():
            # Configs hold launch keys only; the timings go into meta (the loader skips it).
            table.setdefault(shape, {})[m] = {key: v for key, v in cfg.items() if key != "us"}
            if partial:
                timings.get(shape, {}).pop(m, None)
                meta.setdefault("retuned", {}).setdefault(shape, {})[m] = dict(run, us=cfg["us"])
            else:
                timings.setdefault(shape, {})[m] = cfg["us"]
    return {"meta": meta, **table}


TUNABLE_KERNELS = ("grouped_gemm_masked", "grouped_gemm_contiguous")


def _routings(text: str) -> list[str]:
    from moe_backend.testing import parse_routing_exponent

    specs = [t.strip() for t in text.split(",") if t.strip()]
    if not specs:
        raise argparse.ArgumentTypeError("expected one or more of uniform, zipf:A")
    for spec in specs:
        try:
            parse_routing_exponent(spec)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("routing: ")) from None
    return specs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moe_backend._cli import csv_of, csv_of_ints

    parser.add_argument(
        "--kernels",
        type=csv_of(TUNABLE_KERNELS),
        default=",".join(TUNABLE_KERNELS),
        help="which kernels (default: both)",
    )
    parser.add_argument(
        "--slices", type=csv_of(("ep8", "tp8")), default="ep8,tp8", help="which DeepSeek-V3 slices (ep8, tp8)"
    )
    parser.add_argument(
        "--gemms", type=csv_of(("w13", "w2")), default="w13,w2", help="which GEMMs of each slice (w13, w2)"
    )
    parser.add_argument(
        "--decode-rows",
        type=csv_of_ints(1, 65536),
        default=",".join(map(str, DECODE_ROWS)),
        help="rows-per-expert buckets of the masked kernel",
    )
    parser.add_argument(
        "--prefill-rows",
        type=csv_of_ints(1, 65536),
        default=",".join(map(str, PREFILL_ROWS)),
        help="rows-per-expert buckets of the contiguous kernel",
    )
    parser.add_argument(
        "--routing",
        type=_routings,
        default="uniform",
        help="comma-separated: uniform, zipf:A (0 <= A <= 4); each candidate is timed under each and the "
        "least summed time wins (e.g. uniform,zipf:0.6 tunes for imbalanced routing as well)",
    )
    parser.add_argument(
        "--decode-layouts",
        type=csv_of(DECODE_LAYOUTS),
        default="masked",
        help="layouts each masked-kernel candidate is timed on, summed: masked, contiguous (the layer's decode "
        "layout, as the layer runs the masked table's tiles; candidates are then those it can run as timed: "
        "no narrow tiles, and the BLOCK_M it runs now)",
    )
    parser.add_argument("--out-dir", default=None, help="where the JSON tables go (default: the package's)")
    parser.add_argument("--log", default=None, help="file for every candidate's timing")


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("tune: needs a CUDA GPU", file=sys.stderr)
        return 2
    slices, gemms = set(args.slices), set(args.gemms)
    try:
        log = open(args.log, "w") if args.log else None
    except OSError as exc:
        print(
            f"python -m moe_backend tune: error: argument --log: cannot write {args.log!r}: {exc.strerror}",
            file=sys.stderr,
        )
        return 2
    try:
        result = tune(
            kernels=tuple(args.kernels),
            shapes=[s for s in SHAPES if s[0] in slices and s[1] in gemms],
            decode_rows=tuple(args.decode_rows),
            prefill_rows=tuple(args.prefill_rows),
            out_dir=args.out_dir,
            log=log,
            routings=tuple(args.routing),
            decode_layouts=tuple(args.decode_layouts),
        )
    except KeyboardInterrupt:  # tune() has said what it saved; no traceback for a Ctrl-C
        return 130
    except ValueError as exc:
        print(f"python -m moe_backend tune: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if log:
            log.close()
    for path in result["paths"]:
        print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    from moe_backend._cli import new_parser

    parser = new_parser("python -m moe_backend tune", __doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
