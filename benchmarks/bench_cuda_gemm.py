"""Our CUDA (TMA + wgmma) contiguous grouped GEMM side by side with DeepGEMM 0.1.5 and our Triton
kernel, on the prefill cells of issue 5 (EP8 512/2048/4096 rows per expert, TP8 512), with each
output checked against the fp32 reference in the same run.

    python -m benchmarks.bench_cuda_gemm [--rows 512,2048,4096] [--md OUT.md] [--sustained] [--ceilings]

--sustained also runs ours and DeepGEMM back to back for 2 s each (`moe_backend.testing.sustained_us`): the
steady state of a long prefill, where the chip sits at its power cap and the SM clock drops.

--ceilings adds NVIDIA's own FP8 GEMMs (cuBLASLt through torch) on the *dense* problem with the
same rows, N and K and one weight matrix: an easier problem than the grouped one (no expert
boundaries, the weights reused by every row). Block-scaled (1x128 activations, 128x128 weights:
the same format and promotion), per-tensor scaled with cuBLAS's own promotion, and per-tensor
with fast accumulation (no promotion at all: the FP8 tensor-core ceiling). They say how far above
DeepGEMM a kernel of this format can be expected to go on this card.

DeepGEMM is optional (`import deep_gemm`; the bench carries the sgl-deep-gemm wheel to the GPU).
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch
import triton

from moe_backend import reference
from moe_backend.constants import DEEPSEEK_V3_GEMM_SHAPES
from moe_backend.kernels.grouped_gemm_contiguous import grouped_gemm_contiguous as triton_contiguous
from moe_backend.quant import quantize_fp8_blockwise, quantize_fp8_per_token_group
from moe_backend.testing import interleaved_us, sustained_us

# (slice, gemm, experts, N, K)
SHAPES = DEEPSEEK_V3_GEMM_SHAPES
ALIGN = 128


ROUNDS = 3  # contenders timed in interleaved rounds (moe_backend.testing.interleaved_us)
CHECK_ROWS = 256  # rows of the dense ceilings checked against the fp32 reference
CEILINGS = ("cublas_block", "cublas_tensor", "cublas_fast")


def dense_ceilings(a, a_s, b, bs) -> dict:
    """{name: (fn, check)}: cuBLASLt FP8 GEMMs of all of A's rows by expert 0's weight. fn() runs
    it and returns the output; check(out) is its relative error on the first rows."""
    import torch.nn.functional as F

    b0, bs0 = b[0], bs[0]
    a_s_m_major = a_s.t().contiguous().t()  # cuBLASLt reads 1x128 scales M-major
    # and 128x128 scales with the K-block count padded to a multiple of 4 (torch checks it)
    bs0_padded = F.pad(bs0, (0, -bs0.shape[1] % 4))
    one = torch.ones((), device=a.device)
    want_block = reference._expert_gemm(a[:CHECK_ROWS], a_s[:CHECK_ROWS], b0, bs0).float()
    want_plain = a[:CHECK_ROWS].float() @ b0.float().t()

    def rel(got, want):
        return float((got[:CHECK_ROWS].float() - want).norm() / want.norm())

    return {
        "cublas_block": (
            lambda: F.scaled_mm(
                a,
                b0.t(),
                a_s_m_major,
                F.ScalingType.BlockWise1x128,
                bs0_padded.t(),
                F.ScalingType.BlockWise128x128,
                output_dtype=torch.bfloat16,
            ),
            lambda out: rel(out, want_block),
        ),
        "cublas_tensor": (
            lambda: torch._scaled_mm(a, b0.t(), one, one, out_dtype=torch.bfloat16),
            lambda out: rel(out, want_plain),
        ),
        "cublas_fast": (
            lambda: torch._scaled_mm(a, b0.t(), one, one, out_dtype=torch.bfloat16, use_fast_accum=True),
            lambda out: rel(out, want_plain),
        ),
    }


def check(out, a, a_s, b, bs, ids, experts=(0, 1)) -> float:
    """Relative error over the rows of a few experts vs the fp32 reference."""
    num, den = 0.0, 0.0
    for e in experts:
        rows = (ids == e).nonzero().squeeze(1)
        want = reference._expert_gemm(a[rows], a_s[rows], b[e], bs[e]).float()
        got = out[rows].float()
        num += float((got - want).norm() ** 2)
        den += float(want.norm() ** 2)
    return (num / max(den, 1e-30)) ** 0.5


def run(rows_list, slices, sustained: bool = False, ceilings: bool = False) -> list[dict]:
    from moe_backend.cuda.grouped_gemm_contiguous import grouped_gemm_contiguous as cuda_contiguous

    try:
        import deep_gemm as dg
    except ImportError:
        dg = None
    cells = []
    for sl, gemm, e, n, k in SHAPES:
        if sl not in slices:
            continue
        b, bs = quantize_fp8_blockwise(torch.randn(e, n, k, device="cuda", dtype=torch.bfloat16) / k**0.5)
        sfb = dg.transform_sf_into_required_layout(bs, n, k, (1, 128, 128), e, False) if dg else None
        for rows in rows_list if sl == "ep8" else [512]:
            # a ragged segment per expert (rows - 37) keeps tile tails in play; padded to 128
            seg_rows = [rows - 37 if i % 2 else rows for i in range(e)]
            ids = torch.cat(
                [
                    torch.tensor([i] * r + [-1] * (-(-r // ALIGN) * ALIGN - r), dtype=torch.int32)
                    for i, r in enumerate(seg_rows)
                ]
            ).cuda()
            m = ids.numel()
            a, a_s = quantize_fp8_per_token_group(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
            real_rows = sum(seg_rows)
            flops = 2.0 * real_rows * n * k
            cell = {"slice": sl, "gemm": gemm, "rows": rows, "E": e, "N": n, "K": k}
            providers = {
                "cuda": lambda o: cuda_contiguous(a, a_s, b, bs, ids, o),
                "triton": lambda o: triton_contiguous(a, a_s, b, bs, ids, o, expected_m=rows),
            }
            if dg:
                providers["deepgemm"] = lambda o: dg.m_grouped_fp8_gemm_nt_contiguous(
                    (a, dg.transform_sf_into_required_layout(a_s, m, k, (1, 128, 128), None, True)), (b, sfb), o, ids
                )
            timed = {}
            for name, fn in providers.items():  # correctness first, each on a poisoned output
                out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
                try:
                    fn(out)
                    torch.cuda.synchronize()
                    cell[name] = {"err": check(out, a, a_s, b, bs, ids)}
                except Exception as exc:  # report, keep going: one broken provider must not hide the others
                    cell[name] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
                    continue
                if name == "deepgemm":  # timed with the scale layout transformed once, as engines do
                    sfa = dg.transform_sf_into_required_layout(a_s, m, k, (1, 128, 128), None, True)
                    timed[name] = lambda o=out, sfa=sfa: dg.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), o, ids)
                else:
                    timed[name] = lambda fn=fn, o=out: fn(o)
            if ceilings:
                for name, (fn, err) in dense_ceilings(a, a_s, b, bs).items():
                    try:
                        cell[name] = {"err": err(fn())}
                        timed[name] = fn
                    except Exception as exc:  # e.g. a cuBLASLt without block scaling on this card
                        cell[name] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
            for name, t in interleaved_us(timed, rounds=ROUNDS).items():
                cell[name].update(t, tflops=flops / t["us"] / 1e6)
            if sustained:
                for name in ("cuda", "deepgemm") + (CEILINGS if ceilings else ()):
                    if name in timed:
                        cell[name]["sustained"] = sustained_us(timed[name])
            for name in [n for n in (*providers, *CEILINGS) if n in cell]:
                print(f"{sl} {gemm} rows={rows} {name}: {cell[name]}", file=sys.stderr, flush=True)
            cells.append(cell)
            a = a_s = ids = None
        b = bs = None
        torch.cuda.empty_cache()
    return cells


def render(cells: list[dict]) -> str:
    env = (
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"CUDA {torch.version.cuda}, {datetime.date.today().isoformat()}"
    )
    lines = [
        f"CUDA contiguous grouped GEMM vs peers ({env}); µs = median of {ROUNDS} interleaved rounds of "
        f"do_bench medians (range in brackets), TFLOPS on real rows, rel err vs fp32 reference; "
        f"speedup = DeepGEMM µs / ours µs",
        "",
        "| slice | gemm | rows/e | ours CUDA µs | TFLOPS | err | Triton µs | DeepGEMM µs | TFLOPS | err "
        "| speedup vs DG |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(cell, name, key, spec):
        v = cell.get(name, {})
        if key not in v:
            return "error" if "error" in v else "–"
        text = format(v[key], spec)
        if key == "us" and "lo" in v:
            text += f" [{v['lo']:.0f}–{v['hi']:.0f}]"
        return text

    sustained = [c for c in cells if "sustained" in c.get("cuda", {}) and "sustained" in c.get("deepgemm", {})]
    for c in cells:
        speed = (
            f"{c['deepgemm']['us'] / c['cuda']['us']:.2f}×"
            if "us" in c.get("cuda", {}) and "us" in c.get("deepgemm", {})
            else "–"
        )
        lines.append(
            f"| {c['slice']} | {c['gemm']} | {c['rows']} | {f(c, 'cuda', 'us', '.1f')} | "
            f"{f(c, 'cuda', 'tflops', '.0f')} | {f(c, 'cuda', 'err', '.1e')} | "
            f"{f(c, 'triton', 'us', '.1f')} | "
            f"{f(c, 'deepgemm', 'us', '.1f')} | {f(c, 'deepgemm', 'tflops', '.0f')} | "
            f"{f(c, 'deepgemm', 'err', '.1e')} | {speed} |"
        )
    if sustained:
        lines += [
            "",
            "Sustained: each kernel back to back for 2 s (no L2 flush), SM clock and board power sampled "
            "by nvidia-smi (median); throttle 0x4 = software power cap.",
            "",
            "| slice | gemm | rows/e | ours µs | MHz | W | DeepGEMM µs | MHz | W | speedup vs DG |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in sustained:
            o, d = c["cuda"]["sustained"], c["deepgemm"]["sustained"]
            lines.append(
                f"| {c['slice']} | {c['gemm']} | {c['rows']} | {o['us']:.1f} | {o['mhz']:.0f} | "
                f"{o['watts']:.0f} | {d['us']:.1f} | {d['mhz']:.0f} | {d['watts']:.0f} | "
                f"{d['us'] / o['us']:.2f}× |"
            )
    ceil = [c for c in cells if any(name in c for name in CEILINGS) and "us" in c.get("deepgemm", {})]
    if ceil:
        lines += [
            "",
            "Ceilings: cuBLASLt FP8 GEMMs (torch) on the dense problem with the same rows, N and K and one "
            "weight matrix; each cell is DeepGEMM's time / the contender's (> 1: faster than DeepGEMM), "
            "interleaved rounds, then sustained (2 s each, SM clock) where measured; rel err vs the fp32 reference of "
            "the same format.",
            "",
            "| slice | gemm | rows/e | ours | cuBLAS block-scaled | cuBLAS per-tensor | cuBLAS per-tensor, "
            "fast accum (no promotion) | errs (block / tensor / fast) |",
            "|---|---|---|---|---|---|---|---|",
        ]

        def vs_dg(c, name):
            v, d = c.get(name, {}), c["deepgemm"]
            if "us" not in v:
                return "error" if "error" in v else "–"
            text = f"{d['us'] / v['us']:.2f}×"
            if "sustained" in v and "sustained" in d:
                text += f" / {d['sustained']['us'] / v['sustained']['us']:.2f}× ({v['sustained']['mhz']:.0f} MHz)"
            return text

        for c in ceil:
            errs = " / ".join(f"{c[n]['err']:.1e}" if "err" in c.get(n, {}) else "–" for n in CEILINGS)
            lines.append(
                f"| {c['slice']} | {c['gemm']} | {c['rows']} | {vs_dg(c, 'cuda')} | "
                f"{' | '.join(vs_dg(c, n) for n in CEILINGS)} | {errs} |"
            )
        errors = {c[n]["error"] for c in ceil for n in CEILINGS if "error" in c.get(n, {})}
        lines += [f"- error: {e}" for e in sorted(errors)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="512,2048,4096")
    p.add_argument("--slices", default="ep8,tp8")
    p.add_argument("--md", default=None)
    p.add_argument("--sustained", action="store_true", help="also time ours and DeepGEMM back to back for 2 s each")
    p.add_argument("--ceilings", action="store_true", help="also time cuBLASLt FP8 GEMMs on the dense problem")
    args = p.parse_args(argv)
    cells = run([int(r) for r in args.rows.split(",")], args.slices.split(","), args.sustained, args.ceilings)
    table = render(cells)
    print(table)
    if args.md:
        with open(args.md, "w") as fh:
            fh.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
