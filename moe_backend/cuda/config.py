"""The CUDA grouped GEMM's launch config: the block shape the kernel is built around and
`ContiguousConfig`, whose fields are the choices the heuristics make (`moe_backend.cuda.heuristic`)
and whose defaults are the shipped kernel's. Shared-memory sizes mirror `kernel_traits.cuh`
(a static_assert in the rendered source keeps the two in step)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ContiguousConfig",
    "max_stages",
    "BLOCK_M",
    "BLOCK_K",
    "BLOCK_N_CHOICES",
    "CONTIGUOUS_ALIGNMENT",
    "MAX_MASKED_EXPERTS",
]

BLOCK_M = 128  # rows per tile: 2 consumer warpgroups x 64; also the segment alignment
BLOCK_K = 128  # = the scale block
NUM_THREADS = 384  # 2 consumer warpgroups + 1 producer warpgroup
CONTIGUOUS_ALIGNMENT = BLOCK_M
# N tiles: 64, 128 and 192 run as one MMA unit, 256 as two 128-wide units (KernelTraits::kPartN).
BLOCK_N_CHOICES = (64, 128, 192, 256)
SMEM_LIMIT = 232448  # bytes of shared memory one block may opt into on sm_90
# Per stage besides the tiles: the staged b_scale values (4 fp32 slots) and the stage's two
# mbarriers; once per kernel the ring of a_scale chunk slots (kAScaleArea).
STAGE_EXTRA_BYTES = 4 * 4 + 16
A_SCALE_AREA = 12288
MAX_STAGES = 6  # deeper rings stopped paying in other Hopper GEMMs; unmeasured here
GROUP_M = 8  # M tiles swept together across N (L2 reuse)
# A kernel storing direct rows (GEMM2 of an expert-parallel slice) stages each tile's 128
# destination tokens and weights in two slots of shared memory (KernelTraits::kDirectArea).
DIRECT_ROWS_AREA = 2 * BLOCK_M * 8
# Experts the masked layout may hold: the kernel counts their live tiles in a shared-memory table of
# this size (scheduler.cuh, kMaxMaskedExperts).
MAX_MASKED_EXPERTS = 1024


def stage_bytes(block_n: int) -> int:
    return BLOCK_M * BLOCK_K + block_n * BLOCK_K


def max_stages(block_n: int) -> int:
    """As many stages as fit the shared memory, capped at MAX_STAGES (6; 5 for 192-wide tiles, 4 for 256-wide)."""
    free = SMEM_LIMIT - 1024 - A_SCALE_AREA
    return min(MAX_STAGES, free // (stage_bytes(block_n) + STAGE_EXTRA_BYTES))


@dataclass(frozen=True)
class ContiguousConfig:
    block_n: int  # N tile; one of BLOCK_N_CHOICES
    num_stages: int = 0  # depth of the shared-memory ring (A + B tile per stage); 0 = as many as fit
    group_m: int = GROUP_M  # M units walked together by the persistent scheduler (1: M-unit-major)
    cluster: int = 1  # 2: CTA pairs sharing one operand through TMA multicast (below)
    multicast: str = "b"  # with cluster=2: "b" = pairs of M tiles 2i, 2i+1 share B (when both hold
    #                         one expert); "a" = pairs of N tiles 2j, 2j+1 share A (always one expert);
    #                         "mixed" (masked layout, group_m 1): per expert, pairs of its M tiles
    #                         share B and its odd last tile pairs N tiles sharing A
    stream_k: bool = False  # the units of a last part-full wave dealt over every CTA by K chunks,
    #                         cut units finished from partial sums in a workspace (either layout; on
    #                         the masked one not the B-sharing pairs of live tiles, whose units may
    #                         span two experts: launch.check_paired_tiles; docs/cuda_kernel.md)
    skip_padding_halves: bool = False  # a consumer warpgroup whose 64 rows of a tile are all padding
    #                         skips that tile's MMAs (no stream_k). Assumes a segment's valid rows
    #                         come before its padding, as in the masked layout and the layer's
    #                         contiguous layouts; a padding row before a valid one in the same
    #                         half would leave that half unwritten
    split_padding_halves: bool = False  # with skip_padding_halves and 256-wide tiles: a tile whose
    #                         rows all lie in its first 64 runs its two 128-wide parts of N on the
    #                         two warpgroups instead of one idling (bf16 output, no direct rows)
    a_regs: bool = False  # 256-wide tiles: each K block's A fragments read from shared memory once into
    #                         registers, where both 128-wide parts' wgmmas would read them again

    def __post_init__(self) -> None:
        if self.block_n not in BLOCK_N_CHOICES:
            raise ValueError(f"config.block_n: must be one of {BLOCK_N_CHOICES}, got {self.block_n}")
        limit = max_stages(self.block_n)
        if self.num_stages == 0:
            object.__setattr__(self, "num_stages", limit)
        if not 2 <= self.num_stages <= limit:
            raise ValueError(
                f"config.num_stages: must lie in [2, {limit}] for block_n={self.block_n} "
                f"(0: as many as fit), got {self.num_stages}"
            )
        if self.group_m < 1:
            raise ValueError(f"config.group_m: must be >= 1, got {self.group_m}")
        if self.cluster not in (1, 2):
            raise ValueError(f"config.cluster: must be 1 or 2, got {self.cluster}")
        if self.multicast not in ("a", "b", "mixed"):
            raise ValueError(f"config.multicast: must be 'a', 'b' or 'mixed', got {self.multicast!r}")
        if self.multicast == "mixed" and (self.cluster != 2 or self.group_m != 1):
            raise ValueError(
                "config.multicast: 'mixed' pairs need cluster=2 and group_m=1 "
                f"(got cluster={self.cluster}, group_m={self.group_m})"
            )
        if not isinstance(self.stream_k, bool):
            raise TypeError(f"config.stream_k: must be a bool, got {self.stream_k!r}")
        if not isinstance(self.skip_padding_halves, bool):
            raise TypeError(f"config.skip_padding_halves: must be a bool, got {self.skip_padding_halves!r}")
        if self.skip_padding_halves and self.stream_k:
            raise ValueError("config.skip_padding_halves: not with stream_k (its pieces keep every MMA)")
        if not isinstance(self.split_padding_halves, bool):
            raise TypeError(f"config.split_padding_halves: must be a bool, got {self.split_padding_halves!r}")
        if not isinstance(self.a_regs, bool):
            raise TypeError(f"config.a_regs: must be a bool, got {self.a_regs!r}")
        if self.a_regs and self.block_n != 256:
            raise ValueError(f"config.a_regs: needs block_n=256 (two parts sharing A), got {self.block_n}")
        if self.split_padding_halves and (not self.skip_padding_halves or self.block_n != 256):
            raise ValueError(
                "config.split_padding_halves: needs skip_padding_halves=True and block_n=256 (got "
                f"skip_padding_halves={self.skip_padding_halves}, block_n={self.block_n})"
            )

    @property
    def shares_a(self) -> bool:
        """CTA pairs on N tiles sharing the A tile (else, with pairs, M tiles sharing B)."""
        return self.cluster > 1 and self.multicast == "a"

    @property
    def mixed_pairs(self) -> bool:
        """CTA pairs sharing B or A unit by unit (the masked layout's mixed walk)."""
        return self.cluster > 1 and self.multicast == "mixed"

    @property
    def smem_bytes(self) -> int:
        """Mirrors KernelTraits::kSmemBytes (a static_assert in the rendered source checks it)."""
        return self.num_stages * (stage_bytes(self.block_n) + STAGE_EXTRA_BYTES) + A_SCALE_AREA + 1024
