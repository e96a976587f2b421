"""Host time of shadow mode's hook per MoE call that it does not sample, on the CPU: the part of
shadow mode's cost that every call pays. Times `observe_layer` (the layer's hook) and
`observe_routed` (the engines' hook) with shadow mode off, and on with a rate no call of the run
reaches; prints the median over repeats of the mean per call.

    python -m benchmarks.bench_shadow_hook [--calls 100000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def _per_call(fn, calls: int, repeats: int) -> float:
    """Median over `repeats` of the mean seconds per call of `fn()` over `calls` calls."""
    means = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter() - start) / calls)
    return statistics.median(means)


def main(argv=None) -> int:
    from prometheus_client import CollectorRegistry

    from moe_backend import MoEConfig, ops
    from moe_backend.ab import shadow_hooks
    from moe_backend.ab.shadow import Shadow
    from moe_backend.constants import QUANT_BLOCK
    from moe_backend.env import ENV
    from moe_backend.layers import DeepseekV3MoE
    from moe_backend.testing import random_moe_weights

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=100_000, help="calls per repeat (default 100000)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if ENV.shadow:
        print("unset MOE_BACKEND_SHADOW: the 'off' rows time the hook with shadow mode off")
        return 2
    hidden = 256
    config = MoEConfig(
        hidden_size=hidden,
        moe_intermediate_size=128,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
    )
    layer = DeepseekV3MoE(config)
    layer.load_weights(random_moe_weights(config, seed=0))
    x_fp8, x_scale = ops.per_token_group_quant(torch.randn(4, hidden).to(torch.bfloat16), QUANT_BLOCK)
    weights = torch.rand(4, 2)
    ids = torch.randint(0, 8, (4, 2), dtype=torch.int32)
    out = torch.zeros(4, hidden, dtype=torch.bfloat16)
    experts = (layer.w13_fp8, layer.w13_scale_inv, layer.w2_fp8, layer.w2_scale_inv)
    # A rate no call of this run reaches (seeded: the first sample lies far past it).
    never = Shadow("reference:1e-12", seed=0, registry=CollectorRegistry())

    def layer_hook():
        shadow_hooks.observe_layer(layer, out, x_fp8, x_scale, weights, ids, None)

    def engine_hook():
        shadow_hooks.observe_routed(out, x_fp8, experts, weights, ids, x_scale=x_scale, shadow=shadow)

    print(
        f"{platform.processor() or platform.machine()}, python {platform.python_version()}, torch {torch.__version__}; "
        f"{args.repeats} repeats of {args.calls} calls"
    )
    print("| hook | shadow off, µs per call | on, not sampled, µs per call |")
    print("|---|---|---|")
    rows = {}
    for name, fn in (("observe_layer (DeepseekV3MoE)", layer_hook), ("observe_routed (engines)", engine_hook)):
        for shadow in (None, never):
            layer.shadow = shadow
            rows.setdefault(name, []).append(_per_call(fn, args.calls, args.repeats))
    layer.shadow = None
    for name, (off, on) in rows.items():
        print(f"| {name} | {1e6 * off:.2f} | {1e6 * on:.2f} |")
    if never.sampled:
        print(f"note: {never.sampled} calls were sampled")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
