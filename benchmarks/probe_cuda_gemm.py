"""Device probe for the CUDA grouped GEMM: time config variants on the issue-5 cells (`time`),
run each for 2 s while nvidia-smi samples SM clock and power (`power`), or launch one cell twice
for ncu (`ncu`; `dg` launches DeepGEMM).  python -m benchmarks.probe_cuda_gemm time|power|ncu|dg CELLS VARIANTS
A variant's '@' suffix adds compile flags (build_flags)."""
from __future__ import annotations

import contextlib
import dataclasses
import sys

import torch

from moe_backend.cuda import grouped_gemm_contiguous as g
from moe_backend.quant import quantize_fp8_blockwise, quantize_fp8_per_token_group
from moe_backend.testing import interleaved_us, sustained_us

CELLS = {"w13_512": (32, 4096, 7168, 512), "w13_2048": (32, 4096, 7168, 2048), "w13_4096": (32, 4096, 7168, 4096),
         "w2_512": (32, 7168, 2048, 512), "w2_2048": (32, 7168, 2048, 2048), "w2_4096": (32, 7168, 2048, 4096),
         "tp8w13": (256, 512, 7168, 512), "tp8w2": (256, 7168, 256, 512)}


def operands(e, n, k, rows):
    b, bs = quantize_fp8_blockwise(torch.randn(e, n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5)
    seg = [rows - 37 if i % 2 else rows for i in range(e)]
    ids = torch.cat([torch.tensor([i] * r + [-1] * (-(-r // 128) * 128 - r), dtype=torch.int32)
                     for i, r in enumerate(seg)]).cuda()
    a, a_s = quantize_fp8_per_token_group(torch.randn(ids.numel(), k, device="cuda", dtype=torch.bfloat16))
    return a, a_s, b, bs, ids, 2.0 * sum(seg) * n * k


def _ablates(spec, bit):
    """Whether a variant's '@' flags leave out `bit` (PHASEMOE_ABLATE)."""
    return any(item.isdigit() and int(item) & bit for item in spec.split(","))


def parse(v, m, n, k, relax_registers=False):
    """'h' = heuristic; else bn[,pp][,stages][,group_m][,cluster][,share_a][,k_unroll][,bulk_store][,two_acc]
    [,part_n][,unit_accs][,tma_store][,split_tail], e.g. 128,0,0,8,2,0,2,0,1 or 256,0,0,8,2,0,0,0,1,64
    (stages 0 = as many as fit)"""
    base = g.select_config(m, n, 132, k=k)
    if v == "h":
        return base
    f = [int(x) for x in v.split(",")]
    bn = f[0]
    pp = bool(f[1]) if len(f) > 1 else True
    bulk = bool(f[7]) if len(f) > 7 else False
    two_acc = bool(f[8]) if len(f) > 8 else False
    tma = bool(f[11]) if len(f) > 11 else False
    split = bool(f[12]) if len(f) > 12 else False
    st = f[2] if len(f) > 2 and f[2] else g.max_stages(bn, bulk, tma)
    gm = f[3] if len(f) > 3 and f[3] else g.GROUP_M
    cl = f[4] if len(f) > 4 else 1
    mc = "a" if len(f) > 5 and f[5] else "b"
    u = f[6] if len(f) > 6 else 1
    part = f[9] if len(f) > 9 else 0
    accs = f[10] if len(f) > 10 else 2
    with _registers_unchecked() if relax_registers else contextlib.nullcontext():
        return g.ContiguousConfig(bn, st, gm, pp, cl, mc, u, bulk, two_acc, part, accs, tma, split)


@contextlib.contextmanager
def _registers_unchecked():
    """Ablation 128 sums the promotion into 8 registers, so two 128-wide units fit in flight at
    256 wide: a config the register rule (`_parts_fit`) rejects for real builds."""
    fits, g._parts_fit = g._parts_fit, lambda *a, **kw: True
    try:
        yield
    finally:
        g._parts_fit = fits


_kernel_spec = g.kernel_spec


def build_flags(spec):
    """'@' part of a variant: comma-separated; an integer = PHASEMOE_ABLATE bits, NAME=V =
    -DPHASEMOE_NAME=V (e.g. '@1,DEBUG=1': no promotion FFMAs, debug waits)."""
    flags = []
    for item in filter(None, spec.split(",")):
        name, eq, value = item.partition("=")
        flags.append(f"-DPHASEMOE_{name}={value}" if eq else f"-DPHASEMOE_ABLATE={item}")
    return tuple(flags)


def with_flags(spec, fn, *args, **kwargs):
    """Runs fn with the kernel compiled with the variant's '@' flags (own cache entry)."""
    if not spec:
        return fn(*args, **kwargs)
    g.kernel_spec = lambda *a, **kw: dataclasses.replace(_kernel_spec(*a, **kw), flags=build_flags(spec))
    try:
        return fn(*args, **kwargs)
    finally:
        g.kernel_spec = _kernel_spec


def main():
    mode, cells, variants = sys.argv[1], sys.argv[2].split(";"), sys.argv[3].split(";")
    for c in cells:
        e, n, k, rows = CELLS[c]
        a, a_s, b, bs, ids, flops = operands(e, n, k, rows)
        m = ids.numel()
        out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
        ref = None
        if mode == "dg":
            import deep_gemm as dg
            sfb = dg.transform_sf_into_required_layout(bs, n, k, (1, 128, 128), e, False)
            sfa = dg.transform_sf_into_required_layout(a_s, m, k, (1, 128, 128), None, True)
            for _ in range(2):
                dg.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), out, ids)
            torch.cuda.synchronize()
            continue
        fns = {}
        for v in variants:
            if v == "dg":  # DeepGEMM 0.1.5 on the same operands, for a same-run ratio
                import deep_gemm as dg
                sfb = dg.transform_sf_into_required_layout(bs, n, k, (1, 128, 128), e, False)
                sfa = dg.transform_sf_into_required_layout(a_s, m, k, (1, 128, 128), None, True)
                fns["DeepGEMM"] = lambda sfa=sfa, sfb=sfb: dg.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), out, ids)
                continue
            # "@bits": PHASEMOE_ABLATE (a part left out; wrong results); "@NAME=V": -DPHASEMOE_NAME=V
            v, _, flags = v.partition("@")
            cfg = parse(v, m, n, k, relax_registers=_ablates(flags, 128))
            def fn(cfg=cfg, flags=flags):
                return with_flags(flags, g.grouped_gemm_contiguous, a, a_s, b, bs, ids, out, config=cfg)

            if mode == "ncu":
                fn()
                fn()
                torch.cuda.synchronize()
                continue
            out.zero_()
            fn()
            torch.cuda.synchronize()
            if ref is None:
                ref = out.clone()
            err = float((out.float() - ref.float()).norm() / ref.float().norm())
            fns[f"{cfg}{'@' + flags if flags else ''} diff {err:.1e}"] = fn
        if mode == "power":
            for name, fn in fns.items():
                t = sustained_us(fn)
                print(f"{c:9s} {name:90s} {t['us']:8.1f} us/call  sm {t['mhz']:.0f} MHz  {t['watts']:.0f} W  "
                      f"throttle {t['throttle']}", flush=True)
            continue
        for name, t in interleaved_us(fns).items():  # rounds A B C A B C: drift hits all alike
            print(f"{c:9s} {name:90s} {t['us']:8.1f} us [{t['lo']:.0f}-{t['hi']:.0f}] "
                  f"{flops / t['us'] / 1e6:6.0f} TF", flush=True)
        a = a_s = b = bs = ids = out = ref = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
