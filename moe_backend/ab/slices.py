"""The shapes `compare` runs: slices of a MoE layer as one GPU of an 8-GPU deployment holds them.

`epN`: expert parallel, 1/N of the experts with the full intermediate size (DeepSeek-V3 ep8: 32 of
256 experts, I = 2048); `tpN`: tensor parallel, every expert with 1/N of the intermediate size
(tp8: 256 experts, I = 256); `full` = ep1; a path to a `config.json`: that model's whole layer.
`small=True` shrinks a slice to CPU size while keeping its character (EP: few wide experts; TP:
many narrow ones), so CI runs it in seconds.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace

import torch

from moe_backend.config import MoEConfig
from moe_backend.constants import QUANT_BLOCK
from moe_backend.quant import FP8_DTYPE, quantize_fp8_blockwise

__all__ = ["SliceSpec", "parse_slices", "random_slice_weights", "checkpoint_slice_weights"]

_SLICE = re.compile(r"^(ep|tp)(\d+)$")


@dataclass(frozen=True)
class SliceSpec:
    name: str
    hidden: int  # H
    intermediate: int  # I of each expert as held here (the full I / tp)
    num_experts: int  # global experts the router picks from
    local_experts: int  # experts held here: ids [0, local_experts), other ids are dropped
    topk: int
    tp: int = 1  # tensor-parallel degree this slice was cut with (checkpoint sharding)

    def shrunk(self) -> "SliceSpec":
        """CPU size: H 256, experts / 16, I / 8 (a multiple of 128), top-k halved (at least 2)."""
        shrink = max(1, self.num_experts // 16)
        inter = max(QUANT_BLOCK, -(-self.intermediate // 8 // QUANT_BLOCK) * QUANT_BLOCK)
        return replace(
            self,
            name=f"{self.name}-small",
            hidden=min(self.hidden, 256),
            intermediate=inter,
            num_experts=max(self.num_experts // shrink, 2),
            local_experts=max(self.local_experts // shrink, 1),
            topk=max(2, min(self.topk // 2, self.num_experts // shrink)),
        )


def parse_slices(spec: str, base: MoEConfig, *, small: bool = False) -> list[SliceSpec]:
    """Comma-separated `epN`, `tpN`, `full` or config.json paths, over the layer `base`."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"slice: expected e.g. 'ep8,tp8', got {spec!r}")
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if item == "full":
            item = "ep1"
        match = _SLICE.match(item)
        if match:
            kind, n = match.group(1), int(match.group(2))
            if n < 1:
                raise ValueError(f"slice {item!r}: the degree must be >= 1")
            if kind == "ep":
                if base.n_routed_experts % n:
                    raise ValueError(f"slice {item!r}: {n} must divide the {base.n_routed_experts} experts")
                s = SliceSpec(
                    item,
                    base.hidden_size,
                    base.moe_intermediate_size,
                    base.n_routed_experts,
                    base.n_routed_experts // n,
                    base.num_experts_per_tok,
                )
            else:
                if base.moe_intermediate_size % (n * QUANT_BLOCK):
                    raise ValueError(
                        f"slice {item!r}: the intermediate size {base.moe_intermediate_size} / {n} "
                        f"must be a multiple of {QUANT_BLOCK} (FP8 weight blocks)"
                    )
                s = SliceSpec(
                    item,
                    base.hidden_size,
                    base.moe_intermediate_size // n,
                    base.n_routed_experts,
                    base.n_routed_experts,
                    base.num_experts_per_tok,
                    tp=n,
                )
        elif item.endswith(".json") and os.path.isfile(item):
            cfg = MoEConfig.from_hf_config(item)
            name = os.path.basename(os.path.dirname(os.path.abspath(item))) or "config"
            s = SliceSpec(
                name,
                cfg.hidden_size,
                cfg.moe_intermediate_size,
                cfg.n_routed_experts,
                cfg.n_routed_experts,
                cfg.num_experts_per_tok,
            )
        else:
            raise ValueError(f"slice {item!r}: expected epN, tpN, full or an existing config.json path")
        out.append(s.shrunk() if small else s)
    return out


def _random_fp8(num_experts: int, n: int, k: int, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    # One expert at a time: the fp32 draw of a whole TP8/EP8 weight would be 4x its fp8 size.
    w = torch.empty(num_experts, n, k, dtype=FP8_DTYPE, device=device)
    s = torch.empty(num_experts, -(-n // QUANT_BLOCK), k // QUANT_BLOCK, dtype=torch.float32, device=device)
    for e in range(num_experts):
        w[e], s[e] = quantize_fp8_blockwise(torch.randn(n, k, generator=gen, device=device) / math.sqrt(k))
    return w, s


def random_slice_weights(s: SliceSpec, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(w13_fp8 `[E, 2I, H]`, w13_scale_inv, w2_fp8 `[E, H, I]`, w2_scale_inv) with 128x128 block
    scales, from a seeded normal draw scaled by 1/sqrt(K) (unit-order activations)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    w13, w13_s = _random_fp8(s.local_experts, 2 * s.intermediate, s.hidden, gen, device)
    w2, w2_s = _random_fp8(s.local_experts, s.hidden, s.intermediate, gen, device)
    return w13, w13_s, w2, w2_s


def checkpoint_slice_weights(
    s: SliceSpec, w13: torch.Tensor, w13_s: torch.Tensor, w2: torch.Tensor, w2_s: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """A slice of a loaded layer's experts (ids from 0): the first `local_experts`, and for TP the
    first rank's shard of the intermediate dimension (gate rows [0, I/tp), up rows [I, I + I/tp),
    w2 columns [0, I/tp)), as each rank of a TP deployment holds it."""
    if w13.shape[0] < s.local_experts:
        raise ValueError(f"slice {s.name}: needs {s.local_experts} experts, {w13.shape[0]} were loaded")
    w13, w13_s, w2, w2_s = (t[: s.local_experts] for t in (w13, w13_s, w2, w2_s))
    if s.tp == 1:
        return w13, w13_s, w2, w2_s
    full_i, part = w2.shape[2], s.intermediate
    fb, pb = full_i // QUANT_BLOCK, part // QUANT_BLOCK
    w13 = torch.cat([w13[:, :part], w13[:, full_i : full_i + part]], dim=1).contiguous()
    w13_s = torch.cat([w13_s[:, :pb], w13_s[:, fb : fb + pb]], dim=1).contiguous()
    return w13, w13_s, w2[:, :, :part].contiguous(), w2_s[:, :, :pb].contiguous()
