"""`python -m moe_backend {info,demo,tune,compare,ab-serve}`."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time

import torch

from moe_backend.ab.cli import add_ab_parsers


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        from importlib.metadata import version

        dist = {"deep_gemm": "sgl-deep-gemm"}.get(module, module)
        return version(dist)
    except Exception:  # noqa: BLE001 - a module without distribution metadata is still present
        return "present"


def cmd_info(_: argparse.Namespace) -> int:
    from moe_backend import __version__
    from moe_backend.dispatch.policy import Policy

    print(f"moe-backend {__version__}")
    print(f"python      {sys.version.split()[0]}")
    print(f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"triton      {_version('triton') or 'not installed'}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"GPU         {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
              f"{props.total_memory / 2**30:.0f} GiB")
    else:
        print("GPU         none (the layer runs on the torch reference path)")
    kernels_ok = torch.cuda.is_available() and _version("triton") is not None
    print(f"kernels     {'Triton FP8 grouped GEMMs (contiguous, masked)' if kernels_ok else 'reference (torch)'}")
    print("peers       " + ", ".join(f"{name}: {_version(mod) or 'not installed'}" for name, mod in
                                     (("DeepGEMM", "deep_gemm"), ("vLLM", "vllm"), ("SGLang", "sglang"))))
    policy = Policy.from_env()
    print(f"policy      {policy.to_dict()}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from moe_backend import reference
    from moe_backend._progress import progress
    from moe_backend.config import MoEConfig
    from moe_backend.dispatch.policy import Policy
    from moe_backend.layers import DeepseekV3MoE
    from moe_backend.layers.router import noaux_tc_route
    from moe_backend.random_weights import random_moe_weights

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if args.checkpoint:
        config = MoEConfig.from_hf_config(args.checkpoint)
    else:
        config = MoEConfig()  # DeepSeek-V3's dimensions
    # On CPU, hold only an EP8 slice of a full-size layer: all 256 experts are 11 GB of FP8.
    expert_bytes = 3 * config.hidden_size * config.moe_intermediate_size * config.n_routed_experts
    ep_size = args.ep_size or (1 if device.type == "cuda" or expert_bytes < 2**32 else 8)
    if config.n_routed_experts % ep_size:
        print(f"--ep-size {ep_size} must divide the {config.n_routed_experts} experts", file=sys.stderr)
        return 2
    per_rank = config.n_routed_experts // ep_size
    expert_range = (0, per_rank)
    print(f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'no GPU: reference path'})")
    print(f"layer: hidden={config.hidden_size} intermediate={config.moe_intermediate_size} "
          f"experts={config.n_routed_experts} top-{config.num_experts_per_tok}; this process holds experts "
          f"[0, {per_rank}) (EP slice 1 of {ep_size}) + the shared expert")
    layer = DeepseekV3MoE(config, expert_range=expert_range, device=device)
    if args.checkpoint:
        layer.load_from_checkpoint(args.checkpoint, args.layer)
    else:
        names = 2 + per_rank * 6 + 6
        with progress(total=names, desc="generating random FP8 weights", unit="tensor") as bar:
            def counted():
                for item in random_moe_weights(config, seed=args.seed, experts=range(*expert_range),
                                               device=device):
                    bar.update(1)
                    yield item
            layer.load_weights(counted())

    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    x = torch.randn(args.tokens, config.hidden_size, generator=gen, device=device).to(torch.bfloat16)
    out = layer(x)  # warm-up (JIT compile on GPU)
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps = args.reps
    start = time.perf_counter()
    for _ in range(reps):
        out = layer(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / reps

    # The oracle: the reference experts + shared expert, from the same router output.
    topk_weights, topk_ids = noaux_tc_route(x, layer.gate_weight, layer.e_score_correction_bias, config)
    ref = reference.routed_experts(x, layer.w13_fp8, layer.w13_scale_inv, layer.w2_fp8, layer.w2_scale_inv,
                                   topk_weights, topk_ids, ue8m0=config.ue8m0_scales).float()
    ref += _shared_reference(layer, x)
    err = ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    local = ((topk_ids >= 0) & (topk_ids < per_rank)).sum().item()
    print(f"tokens={args.tokens} routed pairs on this slice={local}/{topk_ids.numel()} "
          f"kernel={Policy.from_env().choose(args.tokens).name}")
    print(f"time per forward: {elapsed * 1e3:.3f} ms   relative error vs reference: {err:.2e}")
    return 0 if err < 1e-2 else 1


def _shared_reference(layer, x: torch.Tensor) -> torch.Tensor:
    from moe_backend import reference

    if not layer.with_shared_experts:
        return torch.zeros_like(x, dtype=torch.float32)
    ids = torch.zeros(x.shape[0], 1, dtype=torch.int32, device=x.device)
    ones = torch.ones(x.shape[0], 1, dtype=torch.float32, device=x.device)
    return reference.routed_experts(x, layer.shared_w13_fp8, layer.shared_w13_scale_inv, layer.shared_w2_fp8,
                                    layer.shared_w2_scale_inv, ones, ids,
                                    ue8m0=layer.config.ue8m0_scales).float()


def cmd_tune(args: argparse.Namespace) -> int:
    try:
        from moe_backend import tune
    except ImportError as exc:
        print(f"tune is unavailable: {exc}", file=sys.stderr)
        return 2
    return tune.main(args.rest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_backend", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, available kernels and peers, the active policy")
    demo = sub.add_parser("demo", help="run a DeepSeek-V3-shaped MoE layer and check it against the reference")
    demo.add_argument("--checkpoint", help="a DeepSeek-V3-format FP8 checkpoint folder (default: random weights)")
    demo.add_argument("--layer", type=int, default=3, help="MoE layer index in the checkpoint (default 3)")
    demo.add_argument("--tokens", type=int, default=64, help="tokens in the batch (default 64)")
    demo.add_argument("--ep-size", type=int, default=0,
                      help="hold 1/EP of the routed experts (default: all, or 1/8 of a full-size layer on CPU)")
    demo.add_argument("--reps", type=int, default=3, help="timed repetitions (default 3)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--cpu", action="store_true", help="use the reference path even when a GPU is present")
    tune = sub.add_parser("tune", help="regenerate the kernels' tuned configs on this GPU")
    tune.add_argument("rest", nargs=argparse.REMAINDER)
    add_ab_parsers(sub)
    args = parser.parse_args(argv)
    if hasattr(args, "ab_command"):
        return args.ab_command(args)
    return {"info": cmd_info, "demo": cmd_demo, "tune": cmd_tune}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
