"""Device probe: does skipping (or splitting) tiles' all-padding 64-row halves make our CUDA masked
GEMM faster where every live tile is half empty? EP8 w13 / w2 on the masked layout, every expert
holding `rows` rows (64: each tile's second half padding; 128: none), the shipped config beside
the same config with `skip_padding_halves` (`:h`) and, 256 wide, `split_padding_halves` (`:h2`),
CUDA-graph replays timed in interleaved rounds; outputs compared byte for byte.

    python -m lab.probe_padding_halves [--rows 64,128,192] [--rounds 5]
"""

from __future__ import annotations

import argparse
import dataclasses


def main() -> None:
    import torch

    from moe_backend import testing
    from moe_backend.cuda.grouped_gemm_masked import grouped_gemm_masked, select_masked_config
    from moe_backend.kernels._launch_utils import device_name

    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="64,128,192")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), flush=True)
    for gemm, (e, n, k) in {"w13": (32, 4096, 7168), "w2": (32, 7168, 2048)}.items():
        b, bs = testing.random_fp8_weights(e, n, k)
        shipped = select_masked_config(n, k, device_name(dev))
        configs = {"shipped": shipped, ":h": dataclasses.replace(shipped, skip_padding_halves=True)}
        if shipped.block_n == 256:
            configs[":h2"] = dataclasses.replace(configs[":h"], split_padding_halves=True)
        for rows in map(int, args.rows.split(",")):
            max_m = -(-rows // 128) * 128
            a, a_s = testing.random_fp8_activations(e, max_m, k, dev)
            masked_m = torch.full((e,), rows, dtype=torch.int32, device=dev)
            fns, outs = {}, {}
            for name, cfg in configs.items():
                out = torch.zeros(e, max_m, n, dtype=torch.bfloat16, device=dev)
                grouped_gemm_masked(a, a_s, b, bs, masked_m, out, config=cfg)
                outs[name] = out
                fns[name] = testing.capture_graph(
                    lambda out=out, cfg=cfg: grouped_gemm_masked(a, a_s, b, bs, masked_m, out, config=cfg)
                )[0]
            times = testing.interleaved_us(fns, rounds=args.rounds)
            same = {name: torch.equal(o, outs["shipped"]) for name, o in outs.items()}
            line = " ".join(f"{name} {times[name]['us']:.1f}" for name in configs)
            print(f"{gemm} rows={rows} max_m={max_m} {shipped.block_n}w: {line} | same {same}", flush=True)


if __name__ == "__main__":
    main()
