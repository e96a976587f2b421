"""Is our CUDA GEMM's stream-K deterministic? Launches the same stream-K GEMM many times on the
same inputs (the bf16 output, and GEMM1 storing SiLU*up quant) and counts the launches whose
output differs bit for bit from the first; the same config without stream-K beside it. A launch
that reads a helper's partial sum before it is written, or a split that changes between launches,
shows up as differing launches; the grid each kernel launches with is printed (the bf16 and the
SiLU*up quant kernels split the K pool the same way only on equal grids). GPU only.

    python -m lab.stream_k_repeat [--repeats 30]
"""

from __future__ import annotations

import argparse

CASES = [
    # (name, I, K, expert counts, config kwargs, gather tokens)
    ("ep8_w13_pairs", 2048, 7168, "skewed:32:96:16", dict(block_n=256, cluster=2), 0),
    ("few_units", 2048, 7168, "300,0,5", dict(block_n=256), 0),
    ("tp8_w13_gather", 256, 7168, "skewed:64:40:18", dict(block_n=256, cluster=2), 333),
]


def _counts(spec: str) -> list[int]:
    import torch

    if not spec.startswith("skewed:"):
        return [int(c) for c in spec.split(",")]
    _, experts, mean, seed = spec.split(":")
    g = torch.Generator().manual_seed(int(seed))
    w = torch.rand(int(experts), generator=g) ** 3
    counts = (w / w.sum() * int(experts) * int(mean)).floor().long()
    counts[torch.randperm(int(experts), generator=g)[: int(experts) // 8]] = 0
    return counts.tolist()


def main(argv=None) -> int:
    import torch

    from moe_backend.cuda import jit
    from moe_backend.cuda import launch as launch_mod
    from moe_backend.cuda.grouped_gemm_contiguous import ContiguousConfig, launch
    from moe_backend.quant import quantize_fp8_blockwise, quantize_fp8_per_token_group

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    print("| case | stream-K | output | grid | launches differing from the first | most elements differing |")
    print("|---|---|---|---:|---:|---:|")
    for name, inter, k, counts_spec, cfg, tokens in CASES:
        counts = _counts(counts_spec)
        ids = []
        for e, c in enumerate(counts):
            ids += [e] * c + [-1] * (-c % 128)
        expert_ids = torch.tensor(ids + [-1] * 128, dtype=torch.int32, device="cuda")
        rows, n = expert_ids.numel(), 2 * inter
        g = torch.Generator(device="cuda").manual_seed(len(counts) * 7 + n)
        src = None
        if tokens:
            real = expert_ids >= 0
            src = torch.full(expert_ids.shape, -1, dtype=torch.int64, device="cuda")
            src[real] = torch.randint(0, tokens, (int(real.sum()),), generator=g, device="cuda")
            a, a_scale = quantize_fp8_per_token_group(torch.randn(tokens, k, device="cuda"))
        else:
            a, a_scale = quantize_fp8_per_token_group(torch.randn(rows, k, device="cuda"))
        b, b_scale = quantize_fp8_blockwise(torch.randn(len(counts), n, k, device="cuda") * 0.05)
        for stream_k in (True, False):
            rest = {x: v for x, v in cfg.items() if x != "block_n"}
            config = ContiguousConfig(cfg["block_n"], **rest, stream_k=stream_k)
            for output in ("bf16", "silu"):
                silu = int(output == "silu")
                grid = launch_mod._kernel_and_grid(
                    rows, n, k, config, 0, torch.cuda.current_device(), jit.env_flags(), bool(tokens), silu, False
                )[1]
                firsts, differing, most = None, 0, 0
                for _ in range(args.repeats):
                    if output == "bf16":
                        out = torch.full((rows, n), float("nan"), dtype=torch.bfloat16, device="cuda")
                        launch(a, a_scale, b, b_scale, expert_ids, out, config=config, a_rows=src)
                        got = (out.view(torch.int16),)
                    else:
                        act = torch.full((rows, inter), 0x7F, dtype=torch.uint8, device="cuda")
                        scale = torch.full((rows, inter // 128), float("nan"), device="cuda")
                        launch(a, a_scale, b, b_scale, expert_ids, act.view(torch.float8_e4m3fn), config=config,
                               a_rows=src, act_scale=scale)  # fmt: skip
                        got = (act, scale.view(torch.int32))
                    torch.cuda.synchronize()
                    if firsts is None:
                        firsts = got
                        continue
                    diff = sum(int((x != y).sum()) for x, y in zip(got, firsts))
                    differing += diff > 0
                    most = max(most, diff)
                mode = "on" if stream_k else "off"
                row = f"| {name} | {mode} | {output} | {grid} | {differing} / {args.repeats - 1} | {most} |"
                print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
