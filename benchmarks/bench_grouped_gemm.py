"""Side-by-side benchmark of the FP8 grouped GEMMs on the DeepSeek-V3 EP8 / TP8 slices.

Ours (masked and contiguous layouts) against the peers in the same process: vLLM's Triton
`fused_moe_kernel` (fastest of all its tuned H200/H100 configs per cell) and DeepGEMM 0.1.5
(contiguous and masked). CUDA-graph replay, median (do_bench, L2 flushed between reps); every
output checked against an fp32 dequantized reference on a few experts in the same run.
Writes a Markdown report (--md: a whole file; its tables go into docs/benchmarks.md by hand)
and a JSON of every number (--json).

    python -m benchmarks.bench_grouped_gemm --json $OUT/bench.json --md $OUT/benchmarks.md [--rounds 5]
    python -m benchmarks.bench_grouped_gemm --from-json bench.json --md benchmarks.md  # no GPU

Every cell's target is issue 22's mark: at least SPEED_MIN (0.97) x the best peer's speed. With
--rounds R the prefill cells' contenders that decide it (the policy's GEMM, DeepGEMM masked and
contiguous) are timed again in R interleaved rounds.

Routed mode (--routings): each cell is (slice, GEMM, mean rows per expert, routing); the routing
gives per-expert row counts (uniform, or Zipf-like with exponent A: `moe_backend.testing.zipf_counts`),
the same counts for every contender: our masked GEMM on layouts with each --max-m (fixed total
rows, so the times show what max_m costs), our contiguous GEMM (segments padded to 128, and at
decode padded to the masked config's BLOCK_M on a static row bound with the rows in use read on
the device), vLLM's Triton kernel (its launcher fed the same counts) and DeepGEMM masked (at the
smallest and largest max_m) and contiguous. Rows past each expert's count are checked untouched.

    python -m benchmarks.bench_grouped_gemm --routings uniform,zipf:0.6,zipf:0.9,zipf:1.2 \
        --slices tp8 --tp8-rows 16 --json $OUT/routed.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks import _peers
from moe_backend import ops, testing
from moe_backend.constants import DEEPSEEK_V3_GEMM_SHAPES
from moe_backend.dispatch.gemm_choice import masked_tiles_on_contiguous
from moe_backend.dispatch.plan import gemm_provider
from moe_backend.kernels._launch_utils import device_name
from moe_backend.kernels.grouped_gemm_contiguous import CONTIGUOUS_ALIGNMENT, grouped_gemm_contiguous
from moe_backend.kernels.grouped_gemm_masked import grouped_gemm_masked
from moe_backend.quant import dequantize_fp8_blockwise, dequantize_fp8_per_token_group, quantize_fp8_per_token_group
from moe_backend.testing import measure_ceilings, random_fp8_weights, time_graph

SHAPES = {  # slice -> [(gemm, experts, N, K, vLLM JSON's N = intermediate per rank)]
    sl: [(s.gemm, s.experts, s.n, s.k, s.intermediate) for s in DEEPSEEK_V3_GEMM_SHAPES if s.slice == sl]
    for sl in ("ep8", "tp8")
}
ROWS = {"ep8": (1, 4, 16, 64, 128, 256, 512, 2048, 4096), "tp8": (1, 4, 16, 64, 128, 256, 512)}
DECODE_MAX_ROWS = 128
# Issue 22's mark for every cell, decode and prefill, uniform and routed: at least 0.97x the best
# peer's speed (best peer us / ours us), i.e. ours / best peer <= 1 / 0.97.
SPEED_MIN = 0.97
TOPK = 8
RELERR_MAX = 2e-3
# Routed mode (--routings): per-expert counts from a routing, masked layouts at several max_m.
ROUTINGS = ("uniform", "zipf:0.6", "zipf:0.9", "zipf:1.2")
MAX_MS = (128, 256, 512, 1024)
ROUTED_ROWS = {"ep8": (16, 128), "tp8": (16, 128)}
ROUTED_EXPERTS = 256  # DeepSeek-V3's, of which a slice holds E
DEVICE = "cuda"  # the routed cells' device (a CPU smoke test runs them under the Triton interpreter)


def bench(fn, warmup_ms=10, rep_ms=50) -> float:
    """CUDA-graph replay, do_bench median, µs (the CPU smoke test swaps this name for one call)."""
    return time_graph(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)


class RefChecker:
    """fp32 dequantized reference on a few experts (all experts are alike; this keeps memory low)."""

    def __init__(self, b, bs, experts):
        self.experts = experts
        self.b, self.bs = b, bs
        self.b_deq = {e: dequantize_fp8_blockwise(b[e], bs[e]) for e in experts}

    def weights(self, e):
        if e not in self.b_deq:
            self.b_deq[e] = dequantize_fp8_blockwise(self.b[e], self.bs[e])
        return self.b_deq[e]

    def rel(self, pairs) -> float:
        num = den = 0.0
        for e, a_fp8, a_scale, got in pairs:
            if got.shape[0] == 0:
                continue
            ref = dequantize_fp8_per_token_group(a_fp8, a_scale) @ self.weights(e).t()
            num += float((got.float() - ref).pow(2).sum())
            den += float(ref.pow(2).sum())
        return math.sqrt(num / max(den, 1e-30))


def run_cell(sl, gemm, e, n, k, inter, rows, weights, checker, peers, log, rounds=1) -> dict:
    b, bs = weights
    res = {"slice": sl, "gemm": gemm, "rows": rows, "E": e, "N": n, "K": k}
    check_e = checker.experts
    # Prefill cells with rounds > 1: the policy's GEMM and DeepGEMM's two keep their graphs (and
    # buffers) and are timed again in interleaved rounds at the end. At these sizes the board runs
    # at its power cap, and a contender timed first on a cooler board reads faster.
    retime = rounds > 1 and rows > DECODE_MAX_ROWS
    kept: dict = {}
    held: list = []

    # ours, masked: max_m = rows (the layout sized for this batch)
    a, a_s = quantize_fp8_per_token_group(torch.randn(e, rows, k, device="cuda", dtype=torch.bfloat16))
    masked_m = torch.full((e,), rows, dtype=torch.int32, device="cuda")
    out = torch.empty(e, rows, n, dtype=torch.bfloat16, device="cuda")
    fn = lambda: grouped_gemm_masked(a, a_s, b, bs, masked_m, out)  # noqa: E731
    res["ours_masked_us"] = bench(fn)
    res["ours_masked_err"] = checker.rel([(x, a[x], a_s[x], out[x]) for x in check_e])

    # ours, what the policy runs (ops impl="best"): decode -> masked layout, our CUDA kernel on the
    # shapes where it measured faster than Triton (max_m % 128 == 0), prefill -> contiguous, CUDA.
    if rows <= DECODE_MAX_ROWS:
        fn = lambda: ops.grouped_gemm_masked(a, a_s, b, bs, masked_m, out, impl="best", expected_m=rows)  # noqa: E731
        provider = gemm_provider("best", "masked", n, k, rows, a.device, rows)
        res["ours_policy_kernel"] = "cuda m" if provider == "cuda" else "triton m"
        out.fill_(float("nan"))
        res["ours_policy_us"] = bench(fn)
        res["ours_policy_err"] = checker.rel([(x, a[x], a_s[x], out[x]) for x in check_e])

    # DeepGEMM masked: the same rows, max_m padded to 64 (0.1.5 returns wrong rows for max_m < 64
    # on this machine: rel err 0.5-1e3 at max_m = 1..16), scales put in its layout beforehand.
    if peers.get("dg") is not None:
        dg = peers["dg"]
        dg_m = -(-rows // 64) * 64
        try:
            a_dg = torch.cat([a, a.new_zeros(e, dg_m - rows, k)], 1) if dg_m > rows else a
            s_dg = torch.cat([a_s, a_s.new_ones(e, dg_m - rows, k // 128)], 1) if dg_m > rows else a_s
            out_dg = torch.full((e, dg_m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
            sfa = dg.transform_sf_into_required_layout(s_dg, dg_m, k, (1, 128, 128), e, True)
            sfb = peers["dg_sfb"]
            fn = lambda: dg.m_grouped_fp8_fp4_gemm_nt_masked((a_dg, sfa), (b, sfb), out_dg, masked_m, rows)  # noqa: E731
            res["dg_masked_us"] = bench(fn)
            res["dg_masked_max_m"] = dg_m
            res["dg_masked_err"] = checker.rel([(x, a[x], a_s[x], out_dg[x, :rows]) for x in check_e])
            if retime:
                kept["dg_masked"] = testing.capture_graph(fn)[0]
                held.append((a_dg, s_dg, sfa, out_dg, masked_m))
            a_dg = s_dg = out_dg = None
        except Exception as exc:
            res["dg_masked_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            print(f"[{sl} {gemm} {rows}] deepgemm masked: {res['dg_masked_error']}", file=log, flush=True)
    a = a_s = out = None

    # ours, contiguous (segments padded to CONTIGUOUS_ALIGNMENT = DeepGEMM's alignment)
    seg = -(-rows // CONTIGUOUS_ALIGNMENT) * CONTIGUOUS_ALIGNMENT
    ids = torch.full((e, seg), -1, dtype=torch.int32, device="cuda")
    ids[:, :rows] = torch.arange(e, dtype=torch.int32, device="cuda")[:, None]
    ids = ids.reshape(-1)
    a, a_s = quantize_fp8_per_token_group(torch.randn(e * seg, k, device="cuda", dtype=torch.bfloat16))
    out = torch.empty(e * seg, n, dtype=torch.bfloat16, device="cuda")
    fn = lambda: grouped_gemm_contiguous(a, a_s, b, bs, ids, out, expected_m=rows)  # noqa: E731
    res["ours_contig_us"] = bench(fn)
    seg_rows = lambda x: slice(x * seg, x * seg + rows)  # noqa: E731
    res["ours_contig_err"] = checker.rel([(x, a[seg_rows(x)], a_s[seg_rows(x)], out[seg_rows(x)]) for x in check_e])
    if rows > DECODE_MAX_ROWS:
        fn = lambda: ops.grouped_gemm_contiguous(a, a_s, b, bs, ids, out, impl="best", expected_m=rows)  # noqa: E731
        res["ours_policy_kernel"] = "cuda c" if ops.cuda_kernel_available() else "triton c"
        out.fill_(float("nan"))
        res["ours_policy_us"] = bench(fn)
        res["ours_policy_err"] = checker.rel([(x, a[seg_rows(x)], a_s[seg_rows(x)], out[seg_rows(x)]) for x in check_e])
        if retime:
            kept["ours_policy"] = testing.capture_graph(fn)[0]
    if peers.get("dg") is not None:
        dg = peers["dg"]
        try:
            sfa = dg.transform_sf_into_required_layout(a_s, e * seg, k, (1, 128, 128), None, True)
            sfb = peers["dg_sfb"]
            out.fill_(float("nan"))
            fn = lambda: dg.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), out, ids)  # noqa: E731
            res["dg_contig_us"] = bench(fn)
            res["dg_contig_err"] = checker.rel(
                [(x, a[seg_rows(x)], a_s[seg_rows(x)], out[seg_rows(x)]) for x in check_e]
            )
            if retime:
                kept["dg_contig"] = testing.capture_graph(fn)[0]
        except Exception as exc:
            res["dg_contig_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            print(f"[{sl} {gemm} {rows}] deepgemm contiguous: {res['dg_contig_error']}", file=log, flush=True)
    if len(kept) > 1:  # the kept graphs write out and the held buffers until here
        retime_interleaved(res, kept, rounds, log)
    kept.clear()
    held.clear()
    a = a_s = out = ids = None

    # vLLM Triton fused_moe_kernel: fastest of its tuned configs
    if peers.get("vllm") is not None and rows * e % TOPK == 0:
        moe = _peers.VllmMoE(peers["vllm"], [rows] * e, TOPK, gemm)
        a, a_s = quantize_fp8_per_token_group(torch.randn(moe.a_rows(), k, device="cuda", dtype=torch.bfloat16))
        c = torch.empty(moe.slots, n, dtype=torch.bfloat16, device="cuda")
        best = None
        for cfg in peers["vllm_cfgs"][(e, inter)]:
            try:
                us = bench(lambda: moe(a, a_s, b, bs, c, cfg))
            except Exception as exc:
                print(f"[{sl} {gemm} {rows}] vllm {cfg}: {type(exc).__name__}: {str(exc)[:160]}", file=log, flush=True)
                continue
            print(f"[{sl} {gemm} {rows}] vllm {cfg}: {us:.1f}us", file=log, flush=True)
            if best is None or us < best[0]:
                best = (us, cfg)
        if best is not None:
            res["vllm_us"], res["vllm_cfg"] = best
            c.fill_(float("nan"))
            moe(a, a_s, b, bs, c, best[1])
            rows_of = lambda x: moe.a_row_of_slot(moe.slots_of(x))  # noqa: E731
            res["vllm_err"] = checker.rel([(x, a[rows_of(x)], a_s[rows_of(x)], c[moe.slots_of(x)]) for x in check_e])
        a = a_s = c = None
    torch.cuda.empty_cache()
    return res


def retime_interleaved(res: dict, replays: dict, rounds: int, log) -> None:
    """The cell's `{name}_us` of each replay, timed again in interleaved rounds (the median round);
    the first figures kept in res["once_us"]."""
    res["once_us"] = {name: res[f"{name}_us"] for name in replays}
    tag = f"[{res['slice']} {res['gemm']} {res['rows']}]"
    for name, t in testing.interleaved_us(replays, rounds=rounds).items():
        res[f"{name}_us"] = t["us"]
        print(f"{tag} {name} interleaved: {t['us']:.1f} us ({t['lo']:.1f}-{t['hi']:.1f})", file=log, flush=True)
    res["interleaved"] = sorted(replays)


def derive(res: dict, ceil: dict) -> dict:
    e, n, k, rows = res["E"], res["N"], res["K"], res["rows"]
    flops = 2.0 * rows * e * n * k
    nbytes = rows * e * k + e * n * k + rows * e * n * 2
    floor_us = max(flops / (ceil["fp8_tflops"] * 1e12), nbytes / (ceil["read_tbs"] * 1e12)) * 1e6
    ours = {
        "masked": res.get("ours_masked_us"),
        "contig": res.get("ours_contig_us"),
        "policy": res.get("ours_policy_us"),
    }
    layout = min((v, key) for key, v in ours.items() if v is not None)
    # A peer counts only where its output passed the same check as ours.
    peers = {
        key: res.get(f"{key}_us")
        for key in ("vllm", "dg_masked", "dg_contig")
        if res.get(f"{key}_err") is not None and res[f"{key}_err"] <= RELERR_MAX * 2
    }
    peers = {key: v for key, v in peers.items() if v is not None}
    best_peer = min(peers.items(), key=lambda kv: kv[1]) if peers else (None, None)
    us = layout[0]
    d = dict(
        ours_us=us,
        ours_layout=layout[1],
        tflops=flops / us / 1e6,
        gbs=nbytes / us / 1e3,
        pct_floor=100 * floor_us / us,
        floor_us=floor_us,
        best_peer=best_peer[0],
        best_peer_us=best_peer[1],
        ratio=us / best_peer[1] if best_peer[1] else None,
        ratio_vllm=us / peers["vllm"] if "vllm" in peers else None,
    )
    d["target"] = f">={SPEED_MIN}x best peer's speed"
    d["met"] = d["ratio"] is not None and d["ratio"] * SPEED_MIN <= 1.0
    errs = [res.get(key) for key in ("ours_masked_err", "ours_contig_err", "ours_policy_err")]
    d["ours_err"] = max(x for x in errs if x is not None)
    return d


def rerender(json_path: Path, md_path: str | None) -> int:
    """The table of a uniform run again from its JSON, each cell's ratios and target re-derived."""
    run = json.loads(json_path.read_text())
    if "cells" not in run or "ceilings" not in run:
        raise ValueError(f"--from-json: {json_path} is not a uniform run's --json (no 'cells' / 'ceilings')")
    for cell in run["cells"]:
        cell["derived"] = derive(cell, run["ceilings"])
    md = render_md(run["env"], run["ceilings"], run["cells"])
    if md_path:
        Path(md_path).write_text(md)
    print(md)
    return 0


def _fmt(x, spec=".1f"):
    return "–" if x is None else format(x, spec)


def _retime_note(rounds: int) -> str:
    if rounds <= 1:
        return ""
    return (
        f" Prefill cells (more than {DECODE_MAX_ROWS} rows per expert): the policy's GEMM, DeepGEMM masked and "
        f"DeepGEMM contiguous timed again in {rounds} interleaved rounds of graph replays, each figure the median "
        "round (these GEMMs hold the board at its power cap, where a contender timed first, on a cooler board, "
        "reads faster); the other contenders timed once."
    )


def render_md(env: dict, ceil: dict, cells: list) -> str:
    lines = [
        "# Benchmarks: FP8 grouped GEMM (ours vs peers, same run)",
        "",
        f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; "
        f"DeepGEMM {env['deep_gemm']}; vLLM Triton kernel from `{env['vllm_source']}` (vllm 0.33.0 source, "
        f"loaded at run time, fastest of its tuned fp8 block configs per cell); date {env['date']}.",
        "",
        f"Ceilings measured in this run: read {ceil['read_tbs']:.2f} TB/s (sum over 2 GB), D2D copy "
        f"{ceil['copy_tbs']:.2f} TB/s (read+write), FP8 `_scaled_mm` {ceil['fp8_tflops']:.0f} TFLOPS.",
        "",
        "Method: `python -m benchmarks.bench_grouped_gemm` (`benchmarks/run_device.sh` on the GPU machine); "
        "CUDA-graph replay, median of `triton.testing.do_bench` (L2 flushed between reps); random "
        "inputs; every output checked against an fp32 dequantized reference (3 experts) in the same run. "
        "Floor = max(FLOPs / FP8 ceiling, bytes / read bandwidth) with bytes = A once + weights of all "
        "experts once + D once. A peer whose output fails the check (rel err > 4e-3) is shown but not "
        "counted as best peer. DeepGEMM masked runs with max_m = rows rounded up to 64. "
        "Ours = the fastest of our Triton kernel on both layouts (masked, max_m = rows; contiguous, "
        'segments padded to 128) and what the policy runs (`moe_backend.ops` with impl="best": '
        "decode on the masked layout, our CUDA kernel where it measured faster; "
        "prefill on the contiguous layout, our CUDA kernel). Ratio = ours / best peer (lower is better). "
        f"Target (issue 22), every cell: at least {SPEED_MIN}x the best peer's speed, that is ours / best peer "
        f"<= {1 / SPEED_MIN:.3f}." + _retime_note(env.get("rounds", 1)),
        "",
        "| slice | gemm | rows/e | Triton masked µs | Triton contig µs | policy µs (kernel) | vLLM Triton µs | "
        "DG masked µs | DG contig µs | ours TFLOPS | ours GB/s | % floor | ours/best peer | ours/vLLM | "
        "target met | ours rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        d = c["derived"]
        err = d["ours_err"]
        mark = lambda key: _fmt(c.get(f"{key}_us")) + (" ◀" if d["ours_layout"] == key.split("_")[-1] else "")  # noqa: E731
        lines.append(
            f"| {c['slice']} | {c['gemm']} | {c['rows']} | {mark('ours_masked')} | {mark('ours_contig')} | "
            f"{mark('ours_policy')} ({c.get('ours_policy_kernel', '–')}) | "
            f"{_fmt(c.get('vllm_us'))} | {_fmt(c.get('dg_masked_us'))} | {_fmt(c.get('dg_contig_us'))} | "
            f"{_fmt(d['tflops'], '.0f')} | {_fmt(d['gbs'], '.0f')} | {_fmt(d['pct_floor'], '.0f')} | "
            f"{_fmt(d['ratio'], '.3f')} ({d['best_peer'] or '–'}) | {_fmt(d['ratio_vllm'], '.3f')} | "
            f"{'yes' if d['met'] else '**no**'} | {_fmt(err, '.1e')} |"
        )
    wrong = [
        f"{c['slice']} {c['gemm']} {c['rows']} {key[:-4]} ({c[key]:.1e})"
        for c in cells
        for key in ("vllm_err", "dg_masked_err", "dg_contig_err")
        if c.get(key, 0) > RELERR_MAX * 2
    ]
    errors = [
        f"{c['slice']} {c['gemm']} {c['rows']} {key[:-6]}: {c[key]}"
        for c in cells
        for key in ("dg_masked_error", "dg_contig_error")
        if key in c
    ]
    missed = [c for c in cells if not c["derived"]["met"]]
    if wrong:
        lines += ["", "Peer outputs that failed the check (not counted): " + ", ".join(wrong) + "."]
    if errors:
        lines += ["", "Peer calls that raised: " + "; ".join(errors) + "."]
    lines += ["", f"Cells meeting their target: {len(cells) - len(missed)} / {len(cells)}."]
    if missed:
        lines.append(
            "Misses: "
            + ", ".join(
                f"{c['slice']} {c['gemm']} {c['rows']} ({c['derived']['ratio']:.3f}x best peer)"
                if c["derived"]["ratio"]
                else f"{c['slice']} {c['gemm']} {c['rows']}"
                for c in missed
            )
            + "."
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Routed mode: the same per-expert row counts for every contender of a cell (uniform or Zipf-like
# imbalanced routing), our masked GEMM at several max_m (the bound an engine fixes for the worst
# case) at fixed total rows.


def pad_rows_ok(out, counts, chunk: int = 16) -> bool:
    """Masked output `[E, max_m, N]` poisoned with NaN before the runs: rows at or past counts[e]
    are still NaN (untouched) and the rows below were written (finite)."""
    max_m = out.shape[1]
    rows = torch.arange(max_m, device=out.device)
    for e0 in range(0, out.shape[0], chunk):
        part = out[e0 : e0 + chunk]
        pad = rows[None, :] >= counts[e0 : e0 + chunk, None].to(out.device)
        if not bool(torch.isnan(part).all(-1)[pad].all()) or not bool(torch.isfinite(part).all(-1)[~pad].all()):
            return False
    return True


def contiguous_layout(counts, alignment: int, rows_bound: int | None = None):
    """(expert_ids int32 `[rows]`, first row of each expert, rows in use): each expert's segment
    padded to `alignment`; `rows_bound` appends padding up to a static size (ids -1)."""
    ids, starts, row = [], [], 0
    for e, c in enumerate(counts.tolist()):
        starts.append(row)
        padded = -(-c // alignment) * alignment
        ids.append(torch.full((padded,), -1, dtype=torch.int32))
        ids[-1][:c] = e
        row += padded
    used = row
    if rows_bound is not None and rows_bound > used:
        ids.append(torch.full((rows_bound - used,), -1, dtype=torch.int32))
    return torch.cat(ids).to(DEVICE), starts, used


def run_routed_cell(
    sl, gemm, e, n, k, inter, mean_rows, routing, counts, max_ms, weights, checker, peers, args, log
) -> dict:
    b, bs = weights
    total = int(counts.sum())
    top = int(counts.max())
    res = {
        "slice": sl,
        "gemm": gemm,
        "rows": mean_rows,
        "routing": routing,
        "E": e,
        "N": n,
        "K": k,
        "total_rows": total,
        "max_rows": top,
        "idle": int((counts == 0).sum()),
        "describe": testing.describe_counts(counts),
        "us": {},
        "err": {},
        "pad_ok": {},
    }
    usable = [m for m in max_ms if m >= top] or [1 << max(6, (top - 1).bit_length())]
    res["max_ms"] = usable
    # Checked experts: the hottest, a median one, the coldest with rows (and an idle one for padding).
    order = torch.argsort(counts, descending=True).tolist()
    live = [x for x in order if counts[x] > 0]
    check_e = sorted({live[0], live[len(live) // 2], live[-1]}) if live else []
    counts_dev = counts.to(torch.int32).to(DEVICE)
    # The valid rows' activations, shared by every masked layout of the cell (under Zipf routing
    # `top` reaches 32x the mean rows: drawn a few experts at a time).
    a_rows, s_rows = testing.random_fp8_activations(e, max(top, 1), k, DEVICE)

    # With --rounds > 1 the masked contenders (every max_m) keep their buffers and graphs, and are
    # timed again after the loop in interleaved rounds: the max_m cost compares like with like.
    interleave: dict = {}
    held: list = []

    def record(name, fn, err_pairs, pad_check=None, keep=False):
        try:
            res["us"][name] = bench(fn)
            res["err"][name] = checker.rel(err_pairs())
            if pad_check is not None:
                res["pad_ok"][name] = pad_check()
            if keep and args.rounds > 1:
                interleave[name] = testing.capture_graph(fn)[0]
        except Exception as exc:
            res.setdefault("errors", {})[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
            print(f"[{sl} {gemm} {mean_rows} {routing}] {name}: {res['errors'][name]}", file=log, flush=True)

    def retime_kept():  # the kept contenders' graphs, timed again in the same rounds
        for name, t in testing.interleaved_us(interleave, rounds=args.rounds).items():
            res["us"][name] = t["us"]
        res["interleaved"] = sorted(set(res.get("interleaved", [])) | set(interleave))
        interleave.clear()

    # ours, masked, at each max_m (the same valid rows)
    dg = peers.get("dg")
    dg_ms = {usable[0], usable[-1]}
    for max_m in usable:
        out_dg = sfa = None
        a = torch.zeros(e, max_m, k, dtype=a_rows.dtype, device=DEVICE)
        a_s = torch.ones(e, max_m, k // 128, device=DEVICE)
        a[:, :top], a_s[:, :top] = a_rows[:, :top], s_rows[:, :top]
        out = torch.full((e, max_m, n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        record(
            f"ours_masked@{max_m}",
            lambda: grouped_gemm_masked(a, a_s, b, bs, counts_dev, out, expected_m=mean_rows),  # noqa: B023
            lambda: [(x, a[x, : counts[x]], a_s[x, : counts[x]], out[x, : counts[x]]) for x in check_e],  # noqa: B023
            lambda: pad_rows_ok(out, counts),
            keep=True,
        )  # noqa: B023
        if args.cuda_masked and max_m % 128 == 0:
            # Our CUDA kernel on the masked layout (the policy's choice from 128 rows per expert;
            # compiled per max_m, so opt-in: a JIT build per max_m and shape).
            from moe_backend.cuda.grouped_gemm_masked import grouped_gemm_masked as cuda_masked

            out.fill_(float("nan"))
            record(
                f"ours_cuda_masked@{max_m}",
                lambda: cuda_masked(a, a_s, b, bs, counts_dev, out),  # noqa: B023
                lambda: [(x, a[x, : counts[x]], a_s[x, : counts[x]], out[x, : counts[x]]) for x in check_e],  # noqa: B023
                lambda: pad_rows_ok(out, counts),
                keep=True,
            )  # noqa: B023
        if dg is not None and max_m in dg_ms:
            out_dg = torch.full((e, max_m, n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
            try:
                sfa = dg.transform_sf_into_required_layout(a_s, max_m, k, (1, 128, 128), e, True)
                record(
                    f"dg_masked@{max_m}",
                    lambda: dg.m_grouped_fp8_fp4_gemm_nt_masked(
                        (a, sfa),
                        (b, peers["dg_sfb"]),
                        out_dg,  # noqa: B023
                        counts_dev,
                        mean_rows,
                    ),
                    lambda: [(x, a[x, : counts[x]], a_s[x, : counts[x]], out_dg[x, : counts[x]]) for x in check_e],
                    keep=True,
                )  # noqa: B023
            except Exception as exc:
                res.setdefault("errors", {})[f"dg_masked@{max_m}"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        if interleave:  # the captured graphs write these buffers until the rounds below
            held.append((a, a_s, out, out_dg, sfa))
        out_dg = None
        a = a_s = out = None
        if not interleave:
            torch.cuda.empty_cache()
    if interleave:
        retime_kept()
        held.clear()
        torch.cuda.empty_cache()

    # ours and DeepGEMM, contiguous: segments padded to 128 rows (DeepGEMM's alignment)
    ids, starts, used = contiguous_layout(counts, CONTIGUOUS_ALIGNMENT)
    a = torch.zeros(ids.numel(), k, dtype=a_rows.dtype, device=DEVICE)
    a_s = torch.ones(ids.numel(), k // 128, device=DEVICE)
    for x in range(e):
        c = int(counts[x])
        a[starts[x] : starts[x] + c], a_s[starts[x] : starts[x] + c] = a_rows[x, :c], s_rows[x, :c]
    seg = lambda x: slice(starts[x], starts[x] + int(counts[x]))  # noqa: E731
    out = torch.full((ids.numel(), n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    pad = ids < 0
    out_cuda = out_dg = None
    record(
        "ours_contig",
        lambda: grouped_gemm_contiguous(a, a_s, b, bs, ids, out, expected_m=mean_rows),
        lambda: [(x, a[seg(x)], a_s[seg(x)], out[seg(x)]) for x in check_e],
        lambda: bool(torch.isnan(out[pad]).all()) and bool(torch.isfinite(out[~pad]).all()),
    )
    if args.cuda_masked and ops.cuda_kernel_available():
        # Our CUDA contiguous kernel (the policy's choice on this layout from 64 rows per expert),
        # on its own output so its pad check is not undone by the other contenders' replays.
        from moe_backend.cuda.grouped_gemm_contiguous import grouped_gemm_contiguous as cuda_contig

        out_cuda = torch.full_like(out, float("nan"))
        record(
            "ours_cuda_contig",
            lambda: cuda_contig(a, a_s, b, bs, ids, out_cuda),
            lambda: [(x, a[seg(x)], a_s[seg(x)], out_cuda[seg(x)]) for x in check_e],
            lambda: bool(torch.isnan(out_cuda[pad]).all()) and bool(torch.isfinite(out_cuda[~pad]).all()),
            keep=True,
        )
    if dg is not None:
        try:
            sfa = dg.transform_sf_into_required_layout(a_s, ids.numel(), k, (1, 128, 128), None, True)
            out_dg = torch.full_like(out, float("nan"))
            record(
                "dg_contig",
                lambda: dg.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, peers["dg_sfb"]), out_dg, ids),
                lambda: [(x, a[seg(x)], a_s[seg(x)], out_dg[seg(x)]) for x in check_e],
                keep=True,
            )
        except Exception as exc:
            res.setdefault("errors", {})["dg_contig"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    if len(interleave) > 1:  # our CUDA contiguous kernel and DeepGEMM's, timed in the same rounds
        retime_kept()
    interleave.clear()
    a = a_s = out = out_cuda = out_dg = ids = None

    # ours, contiguous with the masked config's small tiles: segments padded to BLOCK_M on a static
    # bound of total + E * (BLOCK_M - 1) rows, the rows in use read on the device (num_rows)
    if mean_rows <= DECODE_MAX_ROWS:
        cfg = masked_tiles_on_contiguous(mean_rows, n, k, device_name(b.device))  # as the plan runs them
        bm = cfg["BLOCK_M"]
        ids, starts, used = contiguous_layout(counts, bm, rows_bound=total + e * (bm - 1))
        a = torch.zeros(ids.numel(), k, dtype=a_rows.dtype, device=DEVICE)
        a_s = torch.ones(ids.numel(), k // 128, device=DEVICE)
        for x in range(e):
            c = int(counts[x])
            a[starts[x] : starts[x] + c], a_s[starts[x] : starts[x] + c] = a_rows[x, :c], s_rows[x, :c]
        num_rows = torch.tensor([used], dtype=torch.int32, device=DEVICE)
        out = torch.full((ids.numel(), n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        pad = ids < 0
        res["contig_small_block_m"] = bm
        record(
            "ours_contig_small",
            lambda: grouped_gemm_contiguous(a, a_s, b, bs, ids, out, config=cfg, num_rows=num_rows),
            lambda: [(x, a[seg(x)], a_s[seg(x)], out[seg(x)]) for x in check_e],
            lambda: bool(torch.isnan(out[pad]).all()) and bool(torch.isfinite(out[~pad]).all()),
        )
        a = a_s = out = ids = None
    a_rows = s_rows = None

    # vLLM Triton fused_moe_kernel at the same per-expert counts
    if peers.get("vllm") is not None and total % TOPK == 0 and total:
        moe = _peers.VllmMoE(peers["vllm"], counts.tolist(), TOPK, gemm, device=DEVICE)
        a, a_s = quantize_fp8_per_token_group(torch.randn(moe.a_rows(), k, device=DEVICE, dtype=torch.bfloat16))
        c = torch.empty(moe.slots, n, dtype=torch.bfloat16, device=DEVICE)
        best = None
        limit = None if args.vllm_configs <= 0 else args.vllm_configs
        for cfg in _peers.vllm_configs(e, inter, near_m=moe.tokens, limit=limit):
            try:
                us = bench(lambda: moe(a, a_s, b, bs, c, cfg))  # noqa: B023
            except Exception as exc:
                print(
                    f"[{sl} {gemm} {mean_rows} {routing}] vllm {cfg}: {type(exc).__name__}: {str(exc)[:160]}",
                    file=log,
                    flush=True,
                )
                continue
            print(f"[{sl} {gemm} {mean_rows} {routing}] vllm {cfg}: {us:.1f}us", file=log, flush=True)
            if best is None or us < best[0]:
                best = (us, cfg)
        if best is not None:
            res["us"]["vllm"], res["vllm_cfg"] = best
            c.fill_(float("nan"))
            moe(a, a_s, b, bs, c, best[1])
            rows_of = lambda x: moe.a_row_of_slot(moe.slots_of(x))  # noqa: E731
            res["err"]["vllm"] = checker.rel([(x, a[rows_of(x)], a_s[rows_of(x)], c[moe.slots_of(x)]) for x in check_e])
        a = a_s = c = None
    torch.cuda.empty_cache()
    return res


def derive_routed(res: dict) -> dict:
    us, err = res["us"], res["err"]
    ok = lambda name: name in us and err.get(name, 1.0) <= RELERR_MAX * 2  # noqa: E731
    peers = {name: us[name] for name in us if not name.startswith("ours") and ok(name)}
    ours = {name: us[name] for name in us if name.startswith("ours")}
    best_peer = min(peers.items(), key=lambda kv: kv[1]) if peers else (None, None)
    best_ours = min(ours.items(), key=lambda kv: kv[1]) if ours else (None, None)
    masked = [m for m in res["max_ms"] if f"ours_masked@{m}" in us]
    hi = f"ours_masked@{masked[-1]}" if masked else None
    d = dict(best_peer=best_peer[0], best_peer_us=best_peer[1], best_ours=best_ours[0], best_ours_us=best_ours[1])
    # Speed relative to the best peer (>= 1: ours faster); acceptance: >= SPEED_MIN.
    d["best_ours_vs_peer"] = best_peer[1] / best_ours[1] if best_peer[1] and best_ours[1] else None
    d["masked_hi_vs_peer"] = best_peer[1] / us[hi] if best_peer[1] and hi else None
    # What a larger max_m costs at the same counts: largest over smallest max_m timed (the
    # acceptance reads it at 1024 over 128, <= 1.05; a hot expert above 128 rows starts higher).
    d["max_m_span"] = (masked[0], masked[-1]) if len(masked) > 1 else None
    d["max_m_cost"] = us[hi] / us[f"ours_masked@{masked[0]}"] if len(masked) > 1 else None
    cuda = [m for m in res["max_ms"] if f"ours_cuda_masked@{m}" in us]
    d["cuda_max_m_cost"] = (
        us[f"ours_cuda_masked@{cuda[-1]}"] / us[f"ours_cuda_masked@{cuda[0]}"] if len(cuda) > 1 else None
    )
    d["ours_err"] = max((v for name, v in err.items() if name.startswith("ours")), default=None)
    d["pad_ok"] = all(res["pad_ok"].values()) if res["pad_ok"] else None
    return d


def render_routed(cells: list) -> str:
    head = (
        "| slice gemm | mean rows | routing (max/mean, idle) | ours masked µs @max_m | ours CUDA masked "
        "| ours contig | ours CUDA contig | ours contig/BM | vLLM | DG masked @max_m | DG contig | best peer | "
        "ours best/peer | "
        "masked@max/peer | max_m cost (hi/lo) | err | pad |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for c in cells:
        d, us = c["derived"], c["us"]
        masked = " ".join(f"{m}:{us[f'ours_masked@{m}']:.0f}" for m in c["max_ms"] if f"ours_masked@{m}" in us)
        dgm = " ".join(f"{m}:{us[f'dg_masked@{m}']:.0f}" for m in c["max_ms"] if f"dg_masked@{m}" in us)
        cuda = " ".join(f"{m}:{us[f'ours_cuda_masked@{m}']:.0f}" for m in c["max_ms"] if f"ours_cuda_masked@{m}" in us)
        lines.append(
            f"| {c['slice']} {c['gemm']} | {c['rows']} | {c['routing']} ({c['describe']}) | {masked or '–'} | "
            f"{cuda or '–'} | "
            f"{_fmt(us.get('ours_contig'), '.0f')} | {_fmt(us.get('ours_cuda_contig'), '.0f')} | "
            f"{_fmt(us.get('ours_contig_small'), '.0f')} | {_fmt(us.get('vllm'), '.0f')} | {dgm or '–'} | "
            f"{_fmt(us.get('dg_contig'), '.0f')} | "
            f"{d['best_peer'] or '–'} | {_fmt(d['best_ours_vs_peer'], '.3f')} ({d['best_ours'] or '–'}) | "
            f"{_fmt(d['masked_hi_vs_peer'], '.3f')} | {_fmt(d['max_m_cost'], '.3f')}"
            f"{' (%d/%d)' % d['max_m_span'][::-1] if d['max_m_span'] else ''}"
            f"{'; CUDA %.3f' % d['cuda_max_m_cost'] if d['cuda_max_m_cost'] else ''} | {_fmt(d['ours_err'], '.1e')} | "
            f"{'ok' if d['pad_ok'] else ('–' if d['pad_ok'] is None else '**BAD**')} |"
        )
    return "\n".join(lines) + "\n"


def main_routed(args, env, ceil, peers, log) -> int:
    rows_by = {
        "ep8": [int(x) for x in args.ep8_rows.split(",") if x],
        "tp8": [int(x) for x in args.tp8_rows.split(",") if x],
    }
    routings = [r for r in args.routings.split(",") if r]
    for r in routings:
        testing.parse_routing_exponent(r)  # a bad spec fails before any GPU work
    max_ms = sorted(int(x) for x in args.max_m.split(",") if x)
    gemms = set(args.gemms.split(","))
    cells, skipped = [], []
    t_start = time.time()
    over = lambda: args.budget_s > 0 and time.time() - t_start > args.budget_s  # noqa: E731
    for sl in args.slices.split(","):
        for gemm, e, n, k, inter in SHAPES[sl]:
            if gemm not in gemms:
                continue
            if over():
                skipped += [f"{sl} {gemm} {r} {x}" for r in rows_by[sl] for x in routings]
                continue
            weights = random_fp8_weights(e, n, k)
            checker = RefChecker(*weights, experts=())
            if peers.get("dg") is not None:
                try:
                    peers["dg_sfb"] = peers["dg"].transform_sf_into_required_layout(
                        weights[1], n, k, (1, 128, 128), e, False
                    )
                except Exception:
                    print("deep_gemm sfb transform failed:\n" + traceback.format_exc(limit=3), file=log, flush=True)
                    peers["dg_sfb"] = weights[1]
            for mean_rows in rows_by[sl]:
                for routing in routings:
                    if over():  # the table below still gets printed within the caller's time limit
                        skipped.append(f"{sl} {gemm} {mean_rows} {routing}")
                        continue
                    counts = testing.routed_counts(e, mean_rows, routing, seed=args.seed)
                    t0 = time.time()
                    try:
                        res = run_routed_cell(
                            sl,
                            gemm,
                            e,
                            n,
                            k,
                            inter,
                            mean_rows,
                            routing,
                            counts,
                            max_ms,
                            weights,
                            checker,
                            peers,
                            args,
                            log,
                        )
                    except Exception:
                        print(
                            f"[{sl} {gemm} {mean_rows} {routing}] FAILED:\n{traceback.format_exc(limit=4)}",
                            file=log,
                            flush=True,
                        )
                        continue
                    res["derived"] = d = derive_routed(res)
                    cells.append(res)
                    print(
                        f"{sl} {gemm} {mean_rows:4d} {routing:9s} ({res['describe']}): "
                        + " ".join(f"{name} {v:.1f}" for name, v in res["us"].items())
                        + f" | best ours/peer {_fmt(d['best_ours_vs_peer'], '.3f')} masked@max/peer "
                        f"{_fmt(d['masked_hi_vs_peer'], '.3f')} max_m cost {_fmt(d['max_m_cost'], '.3f')} "
                        f"err {_fmt(d['ours_err'], '.1e')} pad {d['pad_ok']} [{time.time() - t0:.0f}s, "
                        f"{time.time() - t_start:.0f}s in all]",
                        flush=True,
                    )
                    if args.json:
                        Path(args.json).write_text(
                            json.dumps(dict(env=env, ceilings=ceil, mode="routed", cells=cells), indent=1)
                        )
            weights = checker = None
            torch.cuda.empty_cache()
    table = render_routed(cells)
    if skipped:
        table += f"\nNot run (--budget-s {args.budget_s:.0f} spent): " + ", ".join(skipped) + "\n"
    if args.md:
        Path(args.md).write_text(
            "# FP8 grouped GEMM under routed (imbalanced) counts, same run\n\n"
            f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; "
            f"DeepGEMM {env['deep_gemm']}; vLLM kernel from `{env['vllm_source']}`; {env['date']}. "
            "µs, CUDA-graph replay, median. Ratios are speeds relative to the best peer (>= 1: ours "
            "faster); max_m cost is our masked time at the largest max_m over the smallest (same counts; "
            "max_m below the hottest expert's rows are skipped). Counts: `zipf_counts`, capped at one row per "
            "token.\n\n" + table
        )
    print(table)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", default="ep8,tp8")
    p.add_argument(
        "--ep8-rows",
        default=None,
        help=f"rows per expert (routed mode: the mean); default: {ROWS['ep8']} (routed {ROUTED_ROWS['ep8']})",
    )
    p.add_argument(
        "--tp8-rows", default=None, help=f"as --ep8-rows; default {ROWS['tp8']} (routed {ROUTED_ROWS['tp8']})"
    )
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    p.add_argument("--log", default=None)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument(
        "--from-json",
        default=None,
        help="re-render a uniform run's table (--md, stdout) from its --json with the current targets (no GPU)",
    )
    p.add_argument(
        "--routings",
        default=None,
        help="routed mode: comma-separated `uniform` / `zipf:A` (e.g. " + ",".join(ROUTINGS) + "); "
        "each cell gets per-expert counts from `moe_backend.testing.zipf_counts` at mean rows x "
        "experts in all, the same for every contender",
    )
    p.add_argument(
        "--max-m",
        default=",".join(map(str, MAX_MS)),
        help="routed mode: masked layouts' max_m (those below a cell's hottest expert are skipped)",
    )
    p.add_argument("--gemms", default="w13,w2", help="routed mode: which GEMMs of each slice")
    p.add_argument(
        "--vllm-configs",
        type=int,
        default=4,
        help="routed mode: time this many of vLLM's tuned configs, nearest the batch's token count "
        "first (0 = all of them)",
    )
    p.add_argument("--seed", type=int, default=0, help="routed mode: the routing's seed")
    p.add_argument(
        "--budget-s",
        type=float,
        default=0,
        help="routed mode: start no new cell after this many seconds (0 = no limit), so the table "
        "is printed within a device call's time limit",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time contenders again in this many interleaved rounds, as CUDA-graph replays (median over "
        "rounds): routed mode, the masked ones (ours, our CUDA kernel, DeepGEMM, at every max_m); uniform "
        "mode, the prefill cells' policy GEMM and DeepGEMM's masked and contiguous GEMMs",
    )
    p.add_argument(
        "--cuda-masked",
        action="store_true",
        help="routed mode: also our CUDA kernels: the masked one at each max_m (a multiple of 128; one JIT "
        "build per max_m and shape) and the contiguous one (timed in interleaved rounds with DeepGEMM's)",
    )
    args = p.parse_args(argv)
    if args.from_json:
        return rerender(Path(args.from_json), args.md)
    routed = args.routings is not None
    defaults = ROUTED_ROWS if routed else ROWS
    args.ep8_rows = args.ep8_rows or ",".join(map(str, defaults["ep8"]))
    args.tp8_rows = args.tp8_rows or ",".join(map(str, defaults["tp8"]))
    import triton

    log = open(args.log, "w") if args.log else sys.stderr
    env = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        deep_gemm="not loaded",
        vllm_source="not loaded",
        rounds=args.rounds,
    )
    peers: dict = {}
    if not args.no_peers:
        peers, found = _peers.load_peers(log)
        env.update(found)
        if "vllm" in peers:
            peers["vllm_cfgs"] = {
                (e, inter): _peers.vllm_configs(e, inter) for shapes in SHAPES.values() for _, e, _, _, inter in shapes
            }
    ceil = measure_ceilings()
    print(f"{env}\nceilings {ceil}", flush=True)
    if routed:
        return main_routed(args, env, ceil, peers, log)
    rows_by = {
        "ep8": [int(x) for x in args.ep8_rows.split(",") if x],
        "tp8": [int(x) for x in args.tp8_rows.split(",") if x],
    }
    cells = []
    for sl in args.slices.split(","):
        for gemm, e, n, k, inter in SHAPES[sl]:
            weights = random_fp8_weights(e, n, k)
            checker = RefChecker(*weights, experts=(0, e // 2, e - 1))
            if peers.get("dg") is not None:
                try:
                    peers["dg_sfb"] = peers["dg"].transform_sf_into_required_layout(
                        weights[1], n, k, (1, 128, 128), e, False
                    )
                except Exception:
                    print("deep_gemm sfb transform failed:\n" + traceback.format_exc(limit=3), file=log, flush=True)
                    peers["dg_sfb"] = weights[1]
            for rows in rows_by[sl]:
                t0 = time.time()
                try:
                    res = run_cell(sl, gemm, e, n, k, inter, rows, weights, checker, peers, log, args.rounds)
                except Exception:
                    print(f"[{sl} {gemm} {rows}] FAILED:\n{traceback.format_exc(limit=4)}", file=log, flush=True)
                    continue
                res["derived"] = derive(res, ceil)
                cells.append(res)
                d = res["derived"]
                print(
                    f"{sl} {gemm} {rows:5d}: ours {d['ours_us']:8.1f}us ({d['ours_layout']}) "
                    f"vllm {_fmt(res.get('vllm_us'))} dgm {_fmt(res.get('dg_masked_us'))} "
                    f"dgc {_fmt(res.get('dg_contig_us'))} ratio {_fmt(d['ratio'], '.3f')} "
                    f"floor% {d['pct_floor']:.0f} err {d['ours_err']:.1e} [{time.time() - t0:.0f}s]",
                    flush=True,
                )
                if args.json:
                    Path(args.json).write_text(json.dumps(dict(env=env, ceilings=ceil, cells=cells), indent=1))
            weights = checker = None
            torch.cuda.empty_cache()
    md = render_md(env, ceil, cells)
    if args.md:
        Path(args.md).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
