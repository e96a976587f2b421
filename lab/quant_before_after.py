"""Same-run before/after check of the Triton activation quant: the package's kernels against an
earlier copy of their sources (`--old DIR`, default `.old_triton`: `_numerics.py`,
`_group_quant_core.py` and `permute_quant.py` from another revision, e.g.
`git show REV:moe_backend/kernels/_numerics.py > .old_triton/_numerics.py`), loaded as a package
of their own so both builds run in one process.

Cells: the fused permute + quant of the EP8 prefill plan (the busiest rank's 32 experts under
`bench_layer`'s routing, contiguous layout with the static row bound and `used_rows`) and the
token quant `per_token_group_quant` of the TP8 prefill plan (x `[T, 7168]`), bf16 x, float and
UE8M0 scales. Each contender is a CUDA-graph replay timed in interleaved rounds
(`testing.interleaved_us`, do_bench medians, L2 flushed), beside an SM copy of the bytes that must
move (`lab._sweep_run.copy_floor_us`). Outputs are poisoned first; on every row holding a token
the table counts the q bytes where the builds differ (and whether each such byte is only a zero
of the other sign) and says whether the scales agree and whether the new build's bytes equal
torch's reference (`quant.quantize_fp8_per_token_group`); the padding rows must keep their
poison in both.

    python -m lab.quant_before_after [--tokens 2048,8192,16384] [--rounds 5]   # GPU
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from pathlib import Path

OLD_FILES = ("_numerics.py", "_group_quant_core.py", "permute_quant.py")
OLD_PACKAGE = "_old_quant_kernels"
HIDDEN, GROUP = 7168, 128


def load_old(old_dir: str):
    """(permute_quant, group quant `launch`) of the sources in `old_dir`, their imports of each
    other redirected to the copies."""
    root = Path(tempfile.mkdtemp(prefix="old_quant_"))
    pkg = root / OLD_PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in OLD_FILES:
        text = (Path(old_dir) / name).read_text()
        for mod in ("_numerics", "_group_quant_core"):
            text = text.replace(f"moe_backend.kernels.{mod}", f"{OLD_PACKAGE}.{mod}")
        (pkg / name).write_text(text)
    sys.path.insert(0, str(root))
    permute = importlib.import_module(f"{OLD_PACKAGE}.permute_quant")
    core = importlib.import_module(f"{OLD_PACKAGE}._group_quant_core")
    return permute.permute_quant, core.launch


def _poisoned(rows: int):
    import torch

    return (
        torch.full((rows, HIDDEN), 0x7F, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn),
        torch.full((rows, HIDDEN // GROUP), float("nan"), device="cuda"),
    )


def _compare(new, old, valid, ref_q, ref_s) -> dict:
    """How the two builds' outputs differ on the valid rows (bytes of q, and whether every
    differing byte is a zero of the other sign: 0x00 against 0x80), whether the new build's bytes
    equal torch's reference (`ref_q`, `ref_s`: the valid rows' expected values) and whether the
    padding rows kept their poison in both."""
    import torch

    nq, oq = new[0][valid].view(torch.uint8), old[0][valid].view(torch.uint8)
    differ = nq != oq
    zero_sign = bool(((nq[differ] | oq[differ]) == 0x80).all() and ((nq[differ] & 0x7F) == 0).all())
    return dict(
        q_diff=int(differ.sum()),
        q_diff_zero_sign=zero_sign,
        s_equal=torch.equal(new[1][valid].view(torch.int32), old[1][valid].view(torch.int32)),
        new_is_ref=torch.equal(nq, ref_q.view(torch.uint8)) and torch.equal(new[1][valid], ref_s),
        padding_kept=all(bool((out[0][~valid].view(torch.uint8) == 0x7F).all()) for out in (new, old)),
    )


def _result(cell: str, rows: int, times: dict, check: dict) -> dict:
    """A table row: the cell, its rows, the bytes that must move (each row's bf16 source read once,
    its fp8 row and scales written once) and an SM copy of them, the timings and the checks."""
    from lab._sweep_run import copy_floor_us

    nbytes = rows * (3 * HIDDEN + 4 * HIDDEN // GROUP)
    return dict(cell=cell, rows=rows, mb=nbytes / 1e6, floor=copy_floor_us(nbytes, 30), times=times, check=check)


def permute_cell(tokens: int, routing: str, ue8m0: bool, old_permute, rounds: int) -> dict:
    import torch

    from benchmarks import bench_layer
    from moe_backend import ops
    from moe_backend.kernels.permute_quant import permute_quant
    from moe_backend.quant import quantize_fp8_per_token_group
    from moe_backend.testing import capture_graph, interleaved_us

    num_local = bench_layer.SLICES["ep8"][0]
    _, topk_ids, _ = bench_layer.cell_routing("ep8", routing, tokens, 0, "busiest")
    layout = ops.build_contiguous_layout(topk_ids, num_local, alignment=128)
    src, used = layout.src_token, layout.expert_offsets[num_local:]
    x = (torch.randn(tokens, HIDDEN, device="cuda") * 3).bfloat16()
    rows = src.numel()
    valid = (src >= 0) & (torch.arange(rows, device="cuda") < used)
    new_out, old_out = _poisoned(rows), _poisoned(rows)
    fns = {
        "new": capture_graph(lambda: permute_quant(x, src, ue8m0=ue8m0, out=new_out, used_rows=used))[0],
        "old": capture_graph(lambda: old_permute(x, src, ue8m0=ue8m0, out=old_out, used_rows=used))[0],
    }
    times = interleaved_us(fns, rounds=rounds)
    n_valid = int(valid.sum())
    ref_q, ref_s = quantize_fp8_per_token_group(x, ue8m0=ue8m0)
    check = _compare(new_out, old_out, valid, ref_q[src[valid]], ref_s[src[valid]])
    return _result(f"permute+quant ep8 {routing} T={tokens}{' ue8m0' if ue8m0 else ''}", n_valid, times, check)


def token_quant_cell(tokens: int, ue8m0: bool, old_launch, rounds: int) -> dict:
    import torch

    from moe_backend.kernels.per_token_group_quant import per_token_group_quant
    from moe_backend.quant import quantize_fp8_per_token_group
    from moe_backend.testing import capture_graph, interleaved_us

    x = (torch.randn(tokens, HIDDEN, device="cuda") * 3).bfloat16()
    new_out, old_out = _poisoned(tokens), _poisoned(tokens)

    def old():
        old_launch(x, old_out[0], old_out[1], cols=HIDDEN, silu_mul=False, ue8m0=ue8m0, group=GROUP)

    fns = {
        "new": capture_graph(lambda: per_token_group_quant(x, ue8m0=ue8m0, out=new_out))[0],
        "old": capture_graph(old)[0],
    }
    times = interleaved_us(fns, rounds=rounds)
    valid = torch.ones(tokens, dtype=torch.bool, device="cuda")
    ref_q, ref_s = quantize_fp8_per_token_group(x, ue8m0=ue8m0)
    return _result(
        f"token quant T={tokens}{' ue8m0' if ue8m0 else ''}",
        tokens,
        times,
        _compare(new_out, old_out, valid, ref_q, ref_s),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default=".old_triton", help="directory holding the earlier sources")
    parser.add_argument("--tokens", default="2048,8192,16384")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    old_permute, old_launch = load_old(args.old)
    tokens = [int(t) for t in args.tokens.split(",")]
    results = []
    for t in tokens:
        for routing in ("uniform", "zipf:0.6"):
            results.append(permute_cell(t, routing, False, old_permute, args.rounds))
        results.append(token_quant_cell(t, False, old_launch, args.rounds))
    results.append(permute_cell(tokens[-1], "uniform", True, old_permute, args.rounds))
    results.append(token_quant_cell(tokens[-1], True, old_launch, args.rounds))
    print(
        "| cell | rows | MB | SM copy µs | old µs (lo-hi) | new µs (lo-hi) | new / old | new / SM copy "
        "| q bytes that differ | all zeros of the other sign | scales equal | new = torch reference |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|")
    for r in results:
        old, new, c = r["times"]["old"], r["times"]["new"], r["check"]
        print(
            f"| {r['cell']} | {r['rows']} | {r['mb']:.0f} | {r['floor']:.1f} "
            f"| {old['us']:.1f} ({old['lo']:.1f}-{old['hi']:.1f}) | {new['us']:.1f} ({new['lo']:.1f}-{new['hi']:.1f}) "
            f"| {new['us'] / old['us']:.3f} | {new['us'] / r['floor']:.2f} | {c['q_diff']} "
            f"| {'yes' if c['q_diff_zero_sign'] else 'NO'} | {'yes' if c['s_equal'] else 'NO'} "
            f"| {'yes' if c['new_is_ref'] else 'NO'} |"
        )
    ok = all(r["check"]["new_is_ref"] and r["check"]["s_equal"] and r["check"]["padding_kept"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
