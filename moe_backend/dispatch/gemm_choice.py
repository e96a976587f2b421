"""Which provider and launch config serve one grouped GEMM, and the measured crossovers behind
the choice (`kernels/configs/dispatch_thresholds.json`, each entry naming its benchmark table).
`moe_backend.dispatch.plan` assembles these per-GEMM choices into a batch's `Plan`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from moe_backend.constants import LAYOUT_ALIGNMENT
from moe_backend.dispatch.policy import CUDA_ONLY_IMPLS

__all__ = [
    "GemmPlan",
    "THRESHOLDS_FILE",
    "thresholds",
    "gemm_provider",
    "gemm_plan",
    "segment_alignment",
    "cuda_contiguous_pays",
    "cuda_masked_pays",
    "fused_permute_quant_pays",
    "with_split_k",
    "silu_in_gemm2_pays",
    "cuda_gathers_rows",
    "cuda_silu_in_gemm1",
    "branch_on_absent_slots",
]

THRESHOLDS_FILE = Path(__file__).resolve().parents[1] / "kernels" / "configs" / "dispatch_thresholds.json"


@dataclass(frozen=True)
class GemmPlan:
    provider: str  # "cuda" | "triton" | "deepgemm" | "reference"
    n: int  # output columns
    k: int  # reduction
    config: Any = None  # Triton: a launch-config dict frozen as sorted items; CUDA: ContiguousConfig

    @property
    def triton_config(self) -> dict:
        return dict(self.config)

    @property
    def split_k(self) -> int:
        """K slices (> 1: the GEMM writes f32 partial sums `[split_k, rows, n]` for its consumer)."""
        return self.triton_config.get("SPLIT_K", 1) if self.provider == "triton" else 1


@lru_cache(maxsize=1)
def thresholds() -> dict:
    """The measured crossovers (dispatch_thresholds.json), without its "meta" entry."""
    with open(THRESHOLDS_FILE) as f:
        data = json.load(f)
    return {key: value for key, value in data.items() if key != "meta"}


def _cuda_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    from moe_backend.ops import cuda_kernel_available

    return cuda_kernel_available(device.index or 0)


def cuda_contiguous_pays(n: int, k: int, expected_m: int) -> bool:
    t = thresholds()["cuda_contiguous"]
    wide = n >= t["wide_min_nk"] and k >= t["wide_min_nk"]
    return wide and expected_m >= t["wide_min_rows_per_expert"] or expected_m >= t["min_rows_per_expert"]


def cuda_masked_pays(n: int, k: int, max_m: int, expected_m: int, num_experts: int = 0) -> bool:
    from moe_backend.cuda.grouped_gemm_masked import supports_experts, supports_max_m

    threshold = thresholds()["cuda_masked_min_rows"].get(f"N={n},K={k}")
    return supports_max_m(max_m) and supports_experts(num_experts) and threshold is not None and expected_m >= threshold


def gemm_provider(
    impl: str,
    layout: str,
    n: int,
    k: int,
    expected_m: int,
    device: torch.device,
    max_m: int = 0,
    num_experts: int = 0,
) -> str:
    """The provider that serves one GEMM: `impl` as the policy's KernelChoice names it ("best" is
    resolved here, the one place that compares our kernels)."""
    if device.type != "cuda" or impl == "reference":
        if impl in CUDA_ONLY_IMPLS:
            raise ValueError(f"impl={impl!r} runs on CUDA tensors only, got tensors on {device}")
        return "reference"
    if impl != "best":
        return impl
    if not _cuda_available(device):
        return "triton"
    if layout == "masked":
        return "cuda" if cuda_masked_pays(n, k, max_m, expected_m, num_experts) else "triton"
    return "cuda" if cuda_contiguous_pays(n, k, expected_m) else "triton"


def _triton_config(layout: str, expected_m: int, n: int, k: int, device: torch.device) -> tuple:
    from moe_backend.kernels import _gemm_config
    from moe_backend.kernels._launch_utils import device_name

    name = device_name(device)
    if layout == "contiguous":
        table = _gemm_config.load_table("grouped_gemm_contiguous", name) or _gemm_config.load_table(
            "grouped_gemm_contiguous", _gemm_config.HOPPER_FALLBACK_DEVICE
        )
        tuned_rows = sorted(table.get(f"N={n},K={k}", {}))
        # The contiguous tables start where prefill does; decode-sized rows take the masked
        # table's tiles, which the same kernel runs on either layout.
        if tuned_rows and expected_m >= tuned_rows[0]:
            cfg = _gemm_config.get_config(
                "grouped_gemm_contiguous", expected_m, n, k, name, masked=False, max_block_m=128
            )
            cfg["NARROW_M"] = 0
        else:
            cfg = masked_tiles_on_contiguous(expected_m, n, k, name)
    else:
        cfg = _gemm_config.get_config("grouped_gemm_masked", expected_m, n, k, name, masked=True)
    return tuple(sorted(cfg.items()))


def masked_tiles_on_contiguous(expected_m: int, n: int, k: int, device_name: str) -> dict:
    """The masked table's Triton config as the contiguous walk runs it (decode-sized rows). Only
    the masked walk picks a narrow tile per unit, and such an entry was timed there: the contiguous
    walk takes the nearest entry tuned without one (else runs the entry BLOCK_M wide)."""
    from moe_backend.kernels import _gemm_config

    cfg = _gemm_config.get_config("grouped_gemm_masked", expected_m, n, k, device_name, masked=True, max_block_m=128)
    if cfg.get("NARROW_M"):
        plain = _plain_masked_entry(expected_m, n, k, device_name)
        if plain is not None:
            cfg = _gemm_config.get_config(
                "grouped_gemm_masked", expected_m, n, k, device_name, masked=True, override=plain, max_block_m=128
            )
    cfg["NARROW_M"] = 0
    return cfg


def _plain_masked_entry(expected_m: int, n: int, k: int, device_name: str) -> dict | None:
    """The masked table's entry without NARROW_M nearest `expected_m` (in the table get_config
    read): the largest bucket below it, else the smallest above; None when every entry has one."""
    from moe_backend.kernels import _gemm_config

    by_m = _gemm_config.table_for("grouped_gemm_masked", device_name)[0].get(f"N={n},K={k}", {})
    plain = sorted(m for m, cfg in by_m.items() if not cfg.get("NARROW_M"))
    below = [m for m in plain if m <= expected_m]
    above = [m for m in plain if m > expected_m]
    pick = below[-1] if below else (above[0] if above else None)
    return dict(by_m[pick]) if pick is not None else None


def _cuda_config(layout: str, rows_hint: int, n: int, k: int, device: torch.device):
    from moe_backend.cuda import grouped_gemm_contiguous as cuda_contiguous
    from moe_backend.cuda.grouped_gemm_masked import select_masked_config
    from moe_backend.kernels._launch_utils import device_name

    gpu = device_name(device)
    if layout == "masked":
        return select_masked_config(n, k, gpu)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return cuda_contiguous.select_config(rows_hint, n, cuda_contiguous._num_sms(index), k=k, device_name=gpu)


def gemm_plan(
    provider: str, layout: str, expected_m: int, rows_hint: int, n: int, k: int, device: torch.device
) -> GemmPlan:
    if provider == "triton":
        return GemmPlan(provider, n, k, _triton_config(layout, expected_m, n, k, device))
    if provider == "cuda":
        return GemmPlan(provider, n, k, _cuda_config(layout, rows_hint, n, k, device))
    return GemmPlan(provider, n, k)


def segment_alignment(gemms: tuple[GemmPlan, ...]) -> int:
    """Rows per segment: a multiple of every GEMM's M tile (powers of two: their maximum)."""
    align = 1
    for g in gemms:
        if g.provider == "cuda":
            from moe_backend.cuda.grouped_gemm_contiguous import CONTIGUOUS_ALIGNMENT

            need = CONTIGUOUS_ALIGNMENT
        elif g.provider == "deepgemm":
            from moe_backend.providers import deepgemm

            need = deepgemm.contiguous_alignment()
        elif g.provider == "triton":
            need = dict(g.config)["BLOCK_M"]
        else:
            need = LAYOUT_ALIGNMENT
        align = max(align, need)
    return align


def fused_permute_quant_pays(num_tokens: int, layout_rows: int) -> bool:
    """Fused permute+quant reads bf16 and writes fp8 for each layout row in use (3 bytes per
    element and row); unfused quantizes each token once (3 per token), then gathers the fp8 rows
    in use (2 per row); both skip padding rows. The measured crossover (dispatch_thresholds.json:
    fused faster while rows < c x tokens) fixes the fused cost per row at 2 + 3/c bytes."""
    per_row = 2 + 3 / thresholds()["fused_permute_quant_max_rows_per_token"]
    return per_row * layout_rows < 3 * num_tokens + 2 * layout_rows


def cuda_gathers_rows(num_tokens: int, layout_rows: int) -> bool:
    """Our CUDA contiguous GEMM1 reads the token rows through the layout's src_token (its producer
    copies them row by row) instead of a copy of them gathered into the layout: where the layout
    holds several rows per token (TP8: each token's k slots are local), the gathered copy writes
    and GEMM1 reads k rows per token (dispatch_thresholds.json `cuda_gather_a`: from this many
    rows per token). At about one row per token (EP8) the fused permute+quant costs what quantizing
    the tokens costs, and TMA's whole-tile loads stay."""
    return layout_rows >= thresholds()["cuda_gather_a"]["min_rows_per_token"] * max(num_tokens, 1)


def branch_on_absent_slots(num_experts: int, num_global_experts: int) -> bool:
    """The combine skips a token's absent slots (experts not local) by a branch rather than by a
    masked load: where this rank holds at most a share of the experts (dispatch_thresholds.json
    `combine_branch`), most slots are absent. Unknown global count (0): masked loads."""
    if num_global_experts <= 0:
        return False
    return num_experts <= thresholds()["combine_branch"]["max_local_share"] * num_global_experts


def cuda_direct_rows(gemm2: GemmPlan, num_tokens: int, num_experts: int, num_global_experts: int) -> bool:
    """Our CUDA contiguous GEMM2 stores the rows of tokens with one local slot, weighted, into the
    layer's output itself and the combine skips those tokens (`kernels/direct_rows.py`): from a
    batch size on and where this rank holds at most a share of the experts
    (dispatch_thresholds.json `cuda_direct_rows`), so that many tokens have a single local slot,
    and GEMM2's K spans at least as many 128-wide blocks as any config has stages (the kernel's
    slot reuse needs it)."""
    if gemm2.provider != "cuda" or num_global_experts <= 0:
        return False
    from moe_backend.cuda.config import BLOCK_K, MAX_STAGES

    t = thresholds()["cuda_direct_rows"]
    return (
        bool(t["enabled"])
        and num_tokens >= t["min_tokens"]
        and gemm2.k >= MAX_STAGES * BLOCK_K
        and num_experts <= t["max_local_share"] * num_global_experts
    )


def cuda_silu_in_gemm1(gemm1: GemmPlan) -> bool:
    """Our CUDA contiguous GEMM1 stores SiLU*up quantized to FP8 itself (a 256-wide tile holding
    one 128-column group of gate and of up; `cuda.launch.silu_config`), so neither its bf16
    output nor the SiLU*up quant kernel exist: where I (gemm1.n / 2) is a multiple of 128
    (dispatch_thresholds.json `cuda_silu_in_gemm1`)."""
    if gemm1.provider != "cuda" or gemm1.n % 256:
        return False
    return bool(thresholds()["cuda_silu_in_gemm1"]["enabled"])


def with_stream_k(g: GemmPlan, which: str, num_tokens: int, *, direct_rows: bool = False) -> GemmPlan:
    """`g` (`which`: "gemm1" or "gemm2") with our CUDA contiguous kernel dealing its last part-full
    wave by K chunks over every SM (`ContiguousConfig.stream_k`), where dispatch_thresholds.json
    `cuda_stream_k` enables it for that GEMM from `min_tokens` tokens and the kernel takes it: K
    blocks in chunks of whole K-loop chains, and with direct rows chunks of at least as many K
    blocks as stages."""
    switch = thresholds()["cuda_stream_k"]
    if g.provider != "cuda" or not switch[which] or num_tokens < switch["min_tokens"]:
        return g
    from moe_backend.cuda.launch import stream_k_chunk

    cfg = g.config
    if cfg is None:  # the masked layout's, or one the launch picks: not ours to change
        return g
    # GEMM1 storing SiLU*up quant runs 256-wide tiles whatever the plan's config says.
    block_n = 256 if which == "gemm1" and cuda_silu_in_gemm1(g) else cfg.block_n
    chunk = stream_k_chunk(g.k, block_n)
    if chunk == 0 or (direct_rows and chunk < cfg.num_stages):
        return g
    return GemmPlan(g.provider, g.n, g.k, dataclasses.replace(cfg, stream_k=True))


def with_padding_halves(g: GemmPlan) -> GemmPlan:
    """`g` with our CUDA contiguous kernel skipping the MMAs of tiles' all-padding 64-row halves
    (`ContiguousConfig.skip_padding_halves`: valid rows lead each segment of the layouts the plan
    builds) where dispatch_thresholds.json `cuda_skip_padding_halves` enables it, on single CTAs
    where it says `single_ctas` (a CTA pair runs in step, so one CTA's skipped half frees its SM
    only where its partner skips too). Not with stream-K, whose pieces keep every MMA."""
    t = thresholds()["cuda_skip_padding_halves"]
    cfg = g.config
    if g.provider != "cuda" or cfg is None or cfg.stream_k or not t["enabled"]:
        return g
    changes = {"skip_padding_halves": True}
    if t["single_ctas"]:
        changes |= {"cluster": 1, "multicast": "b"}
    return GemmPlan(g.provider, g.n, g.k, dataclasses.replace(cfg, **changes))


def with_split_k(g: GemmPlan, active_experts: int, expected_m: int) -> GemmPlan:
    """`g` allowed to split K when its expected work units (active_experts x m-tiles x n-tiles)
    number fewer than `split_k.min_units` (dispatch_thresholds.json): a Triton GEMM on the
    contiguous layout gets SPLIT_K = the most slices K allows (a power of two up to `max_split`,
    each of at least `min_k_blocks` 128-wide blocks) and SPLIT_MIN_UNITS = min_units, so that the
    kernel, reading the tiles that hold rows on the device, cuts only as many slices as reach it.
    At most `narrow_max_units` units: BLOCK_N `narrow_block_n` and up to `narrow_max_split` slices,
    SPLIT_MIN_UNITS scaled to the narrower units."""
    if g.provider != "triton":
        return g
    t = thresholds()["split_k"]
    cfg = g.triton_config
    num_kb = g.k // 128
    units = max(active_experts, 1) * -(-expected_m // cfg["BLOCK_M"]) * -(-g.n // cfg["BLOCK_N"])
    if units >= t["min_units"]:
        return g
    changes, max_split, min_units = {}, t["max_split"], t["min_units"]
    if units <= t["narrow_max_units"] and cfg["BLOCK_N"] > t["narrow_block_n"]:
        # So few units (one row per expert: T = 1) that narrower n-tiles, fewer slices, spread further.
        # The kernel's cut counts its own (narrower) units: the threshold scales with them.
        changes, max_split = {"BLOCK_N": t["narrow_block_n"]}, t["narrow_max_split"]
        min_units = min_units * cfg["BLOCK_N"] // t["narrow_block_n"]
    split = 1
    while split * 2 <= max_split and num_kb % (split * 2) == 0 and num_kb // (split * 2) >= t["min_k_blocks"]:
        split *= 2
    if split == 1:
        return g
    changes |= {"SPLIT_K": split, "SPLIT_MIN_UNITS": min_units}
    return GemmPlan(g.provider, g.n, g.k, tuple(sorted((cfg | changes).items())))


def silu_in_gemm2_pays(num_tokens: int, gemm2: GemmPlan) -> bool:
    """GEMM2 computes its A (SiLU*up, quant) from GEMM1's output itself, saving the SiLU*up quant
    kernel and its launch, at the cost of each of its units recomputing its rows' activations
    inside its K loop (a loop over the partial-sum slabs nested there): a Triton GEMM2 without
    TMA whose K holds at most `silu_in_gemm2.max_k_blocks` 128-wide blocks, at batches up to
    `max_tokens` (dispatch_thresholds.json)."""
    if gemm2.provider != "triton" or gemm2.triton_config.get("TMA"):
        return False
    t = thresholds()["silu_in_gemm2"]
    return num_tokens <= t["max_tokens"] and gemm2.k // 128 <= t["max_k_blocks"]


def dependent_launch_pays(phase: str, device: torch.device) -> bool:
    """The plan's kernels launched as dependents of each other (`kernels/_dependent_launch`): each
    kernel's launch and prologue overlap the tail of the one before, which pays where kernels are
    short (dispatch_thresholds.json `dependent_launch`: the phases, and the compute capability
    that has it, Hopper's 9.0)."""
    t = thresholds()["dependent_launch"]
    if phase not in t["phases"] or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= t["min_capability"]
