"""`python -m moe_backend.cuda warmup [--slice ep8 tp8] [--rows 256 512 2048 4096] [--masked-max-m 128 256]
[--sms 132] [--gpu NAME]`: compiles (or finds in the cache) every grouped-GEMM config the heuristic picks for
DeepSeek-V3's prefill GEMMs and the masked decode kernels for the given max_m values, with a
progress bar. Needs nvcc, not a GPU."""

from __future__ import annotations

import argparse

from moe_backend.cuda import jit
from moe_backend.cuda.grouped_gemm_masked import supports_max_m
from moe_backend.cuda.heuristic import select_masked_config
from moe_backend.cuda.launch import kernel_spec, warmup_specs

# (experts per GPU, [(N, K) of w13, of w2]) for the two single-GPU slices of docs' benchmarks.
SLICES = {
    "ep8": (32, [(4096, 7168), (7168, 2048)]),
    "tp8": (256, [(512, 7168), (7168, 256)]),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_backend.cuda")
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("warmup", help="compile the kernels a DeepSeek-V3 prefill needs")
    w.add_argument("--slice", nargs="+", choices=sorted(SLICES), default=sorted(SLICES))
    w.add_argument("--rows", nargs="+", type=int, default=[256, 512, 2048, 4096], help="rows per expert to plan for")
    w.add_argument(
        "--masked-max-m",
        nargs="*",
        type=int,
        default=[128, 256],
        help="max_m of the masked decode layouts to plan for (multiples of 128)",
    )
    w.add_argument("--sms", type=int, default=132, help="multiprocessors of the target GPU (H100/H200: 132)")
    w.add_argument(
        "--gpu",
        default=None,
        help="the target GPU's name as torch.cuda.get_device_name gives it, which picks the masked configs "
        "(default: this machine's GPU, if it has one)",
    )
    args = parser.parse_args(argv)
    bad = [x for x in args.masked_max_m if not supports_max_m(x)]
    if bad:
        parser.error(f"--masked-max-m: the CUDA masked kernel needs multiples of 128, got {bad}")

    gpu = args.gpu
    if gpu is None:
        import torch

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    specs = []
    for name in args.slice:
        experts, shapes = SLICES[name]
        specs += warmup_specs(shapes, [r * experts for r in args.rows], num_sms=args.sms, gpu=gpu)
        specs += [
            kernel_spec(n, k, select_masked_config(n, k, gpu), masked_max_m=mm)
            for n, k in shapes
            for mm in args.masked_max_m
        ]
    paths = jit.warmup(specs, progress=True)
    print(f"{len(paths)} kernels ready in {jit.cache_dir()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
