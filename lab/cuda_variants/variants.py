"""UNSHIPPED: the CUDA grouped GEMM with every experiment it carried before the package kept only
what a heuristic picks (ping-pong token, one-accumulator loop, bulk-copy and TMA-store epilogues,
the split tail, PHASEMOE_ABLATE builds). Its kernel is `grouped_gemm_variants.cuh` beside this
file; the shipped configs compile here to the same PTX as in the package (lab/check_ptx.py was
recorded from this code). For `lab/probe_cuda_gemm.py` and the sweeps; untested, may not build.

Order in this file: config + heuristic, kernel spec (cached compile), tensor maps, public op.
"""

from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import torch

from moe_backend._checks import check_same_device, check_tensor
from moe_backend.cuda import driver, jit
from moe_backend.quant import FP8_DTYPE

__all__ = ["grouped_gemm_contiguous", "ContiguousConfig", "select_config", "kernel_spec"]

BLOCK_M = 128          # rows per tile: 2 consumer warpgroups x 64; also the segment alignment
BLOCK_K = 128          # = the scale block
NUM_THREADS = 384      # 2 consumer warpgroups + 1 producer warpgroup
CONTIGUOUS_ALIGNMENT = BLOCK_M
SMEM_LIMIT = 232448    # bytes of shared memory one block may opt into on sm_90
# Per stage besides the tiles: the staged b_scale values (4 fp32 slots) and the stage's two
# mbarriers; once per kernel the ring of a_scale chunk slots (kAScaleArea).
STAGE_EXTRA_BYTES = 4 * 4 + 16
A_SCALE_AREA = 12288
MAX_STAGES = 6         # deeper rings stopped paying in other Hopper GEMMs; unmeasured here
GROUP_M = 8            # M tiles swept together across N (L2 reuse); EP8: 4-32 within noise, 2 slower
# Two shapes where each pair (or CTA) should sweep only its own M tiles' N tiles (group_m = the
# cluster size), measured on H100 at the 700 W cap (eighth session, docs/history/cuda-kernel-sessions.md):
# - at most FEW_N_TILES N tiles: the units sharing an A tile, and at 512 rows per expert those
#   sharing a B tile, then run at the same time on neighbouring SMs. TP8 w13 (N = 512, two
#   256-wide tiles): 1036 -> 964-982 us sustained, 949 -> 889-899 interleaved;
# - at most FEW_K_BLOCKS K blocks (the output is most of the traffic): consecutive units write
#   consecutive columns of the same rows. TP8 w2 (K = 256): 942 -> 921 sustained, 874 -> 829
#   interleaved (group_m 4: 923 / 858).
# The EP8 cells (16-28 N tiles, 16-56 K blocks) are 1-5% slower with group_m 2: they keep GROUP_M.
FEW_N_TILES = 2
FEW_K_BLOCKS = 2
# Per-tile fixed cost in column-equivalents (A tile traffic, promotion, epilogue, pipeline fill)
# used to rank N tiles (fitted on H100 for the one-accumulator kernel, docs/history/cuda-kernel-sessions.md v4).
TILE_OVERHEAD_COLS = 96
# Tiles the formula picks from, all on the two-accumulator (unit-chain) K loop: 64 and 128 whole
# (two units in flight), and 256 as two 128-wide units, one in flight (the promoted sum, 128
# registers, plus one 64-register unit). 256 beat 128 on the EP8 and TP8 w13 cells by 7-13%
# (docs/history/cuda-kernel-sessions.md, v12): half the A traffic per FLOP, the K-block bookkeeping spread over
# twice the columns. With few K blocks per tile (TP8 w2, K = 256) the wider tile lost (876 vs
# 991 us), so it needs WIDE_TILE_MIN_K. 64 fills the SMs when few rows give few tiles. The
# other tiles stay available through `config=`.
HEURISTIC_BLOCK_N = (64, 128, 256)
WIDE_TILE = dict(part_n=128, unit_accs=1)  # how the heuristic runs a 256-wide tile
WIDE_TILE_MIN_K = 1024
# Every wgmma width the lab's wgmma_fp8.cuh holds, and 256 split into MMA units (two_acc, part_n).
BLOCK_N_CHOICES = (64, 80, 96, 112, 128, 144, 160, 176, 192)
TILE_N_CHOICES = BLOCK_N_CHOICES + (256,)
CLUSTER = 2            # CTA pairs sharing an operand by TMA multicast (`_pairing`); 1 turns them off
CLUSTER_MIN_PAIRS = 4  # below 8 M tiles, no B-sharing pairs (dead halves of pairs cost more)
SPLIT_QUANTUM = 8      # K blocks per split-tail chunk (TileScheduler::kSplitQuantum = the a_scale chunk)
_TEMPLATE = Path(__file__).with_name("grouped_gemm_variants.cu")
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ContiguousConfig:
    block_n: int           # N tile = wgmma N; one of BLOCK_N_CHOICES
    num_stages: int        # depth of the shared-memory ring (A + B tile per stage)
    group_m: int = GROUP_M  # M tiles walked together by the persistent scheduler
    pingpong: bool = True   # consumer warpgroups take turns per K block (promotion overlaps MMAs)
    cluster: int = 1        # 2: CTA pairs sharing one operand through TMA multicast (below)
    multicast: str = "b"    # with cluster=2: "b" = pairs of M tiles 2i, 2i+1 share B (when both hold
    #                         one expert); "a" = pairs of N tiles 2j, 2j+1 share A (always one expert)
    k_unroll: int = 0       # consumer K-loop unroll; 0 = auto (`resolved_k_unroll`)
    bulk_store: bool = False  # epilogue through shared memory + one bulk copy per row (needs N % 8 == 0;
    #                          costs a stage of the ring); False: 16-byte stores from registers
    two_acc: bool = False    # two block accumulators, K block kb+1 issued before kb is promoted
    #                          (the ping-pong token is not used with it)
    part_n: int = 0          # two_acc: columns per MMA unit (0 = the whole tile); narrower units let
    #                          192/256-wide tiles keep their unit accumulators in the registers
    unit_accs: int = 2       # two_acc: MMA units in flight per warpgroup: 2 = the next unit is issued
    #                          before the previous one is promoted; 1 = each is waited for (the other
    #                          warpgroup fills the gap), which fits 128-wide parts of a 256-wide tile
    tma_store: bool = False  # two_acc: epilogue through shared memory and TMA tensor stores (64 x 64 boxes)
    #                          when a warpgroup's 64 rows are all written; register stores otherwise
    split_tail: bool = False  # two_acc, K/128 a multiple of 8: the last, partial wave's units cut into
    #                          runs of 8-K-block chunks shared by every SM (stream-K); the partial sums
    #                          meet in a per-stream fp32 workspace (`_split_buffers`)

    def __post_init__(self) -> None:
        if self.block_n not in TILE_N_CHOICES:
            raise ValueError(f"config.block_n: must be one of {TILE_N_CHOICES}, got {self.block_n}")
        limit = max_stages(self.block_n, self.bulk_store, self.tma_store)
        if not 2 <= self.num_stages <= limit:
            raise ValueError(f"config.num_stages: must lie in [2, {limit}] for block_n={self.block_n}"
                             f"{' with bulk_store' if self.bulk_store else ''}, got {self.num_stages}")
        if self.cluster not in (1, 2):
            raise ValueError(f"config.cluster: must be 1 or 2, got {self.cluster}")
        if self.k_unroll not in (0, 1, 2, 4, 8):
            raise ValueError(f"config.k_unroll: must be 0 (auto), 1, 2, 4 or 8, got {self.k_unroll}")
        if self.multicast not in ("a", "b"):
            raise ValueError(f"config.multicast: must be 'a' or 'b', got {self.multicast!r}")
        if self.group_m < 1:
            raise ValueError(f"config.group_m: must be >= 1, got {self.group_m}")
        if self.two_acc and self.pingpong and self.unit_accs != 1:
            raise ValueError(f"config.two_acc: the ping-pong token needs unit_accs=1 (one unit in flight), got "
                             f"pingpong={self.pingpong}, unit_accs={self.unit_accs}")
        if self.tma_store and (not self.two_acc or self.bulk_store or self.block_n % 64):
            raise ValueError(f"config.tma_store: needs two_acc=True, bulk_store=False and block_n a multiple of 64, "
                             f"got two_acc={self.two_acc}, bulk_store={self.bulk_store}, block_n={self.block_n}")
        if self.split_tail and (not self.two_acc or self.resolved_k_unroll > 4):
            raise ValueError(f"config.split_tail: needs two_acc=True and k_unroll <= 4 (chains of at most 8 K "
                             f"blocks), got two_acc={self.two_acc}, k_unroll={self.k_unroll}")
        if self.unit_accs not in (1, 2):
            raise ValueError(f"config.unit_accs: must be 1 or 2, got {self.unit_accs}")
        if self.two_acc and not _parts_fit(self.block_n, self.unit_n, self.unit_accs):
            raise ValueError(f"config.part_n: two accumulators need MMA units of 64 or 128 columns (or the whole "
                             f"tile) that tile block_n, tiles that start at <= 2 offsets in a scale block, and "
                             f"registers (block_n / 2 + unit_accs x part_n / 2 <= 192), e.g. block_n 64/128 "
                             f"whole, 128/192/256 in parts of 64, 256 in parts of 128 or 192 whole with "
                             f"unit_accs=1; got "
                             f"block_n={self.block_n}, part_n={self.part_n}, unit_accs={self.unit_accs}")
        if self.part_n and not self.two_acc:
            raise ValueError(f"config.part_n: MMA units narrower than the tile need two_acc=True, got "
                             f"part_n={self.part_n}")
        if self.block_n not in BLOCK_N_CHOICES and not (self.two_acc and self.unit_n < self.block_n):
            raise ValueError(f"config.block_n: {self.block_n} needs two_acc=True with part_n 64 or 128 (no "
                             f"whole-tile wgmma of that width fits the registers)")

    @property
    def unit_n(self) -> int:
        """Columns of one MMA unit (two_acc); the whole tile otherwise."""
        return self.part_n or self.block_n

    @property
    def resolved_k_unroll(self) -> int:
        """One-accumulator loop: 2 measured 1-9% faster than 1 (docs/history/cuda-kernel-sessions.md, v8); the
        tiles that pick scales at run time (80/112/144/176) keep 1: unrolled, 176 spills. With
        two accumulators the K blocks go in straight-line chains of 2 x k_unroll (2: chains of
        4; 1, 2, 4 measured within noise of each other, v10)."""
        if self.k_unroll:
            return self.k_unroll
        return 2 if self.block_n in (64, 96, 128, 160, 192) else 1

    @property
    def smem_bytes(self) -> int:
        """Mirrors GroupedGemmContiguous::kSmemBytes (a static_assert in the rendered source checks it)."""
        return (self.num_stages * (stage_bytes(self.block_n) + STAGE_EXTRA_BYTES)
                + epilogue_buffer_bytes(self.block_n, self.bulk_store, self.tma_store) + A_SCALE_AREA + 1024)


def _offset_quantum(block_n: int) -> int:
    """Tiles start at multiples of this inside a 128-column scale block."""
    return next(q for q in (128, 64, 32, 16) if block_n % q == 0)


def _parts_fit(block_n: int, unit_n: int, unit_accs: int = 2) -> bool:
    """Mirrors the kernel's two-accumulator static_assert: units of 64 or 128 columns or the whole
    tile, tiles starting at no more than 2 offsets inside a scale block (the K loop is compiled per
    offset), and the registers (promoted sum + unit accumulators <= 192 per thread)."""
    offsets = 1 if 128 % block_n == 0 or block_n % 128 == 0 else 128 // _offset_quantum(block_n)
    return ((unit_n in (64, 128) or unit_n == block_n) and block_n % unit_n == 0 and offsets <= 2
            and block_n // 2 + unit_accs * unit_n // 2 <= 192)


def stage_bytes(block_n: int) -> int:
    return BLOCK_M * BLOCK_K + block_n * BLOCK_K


def out_buffer_bytes(block_n: int) -> int:
    """The bulk-store epilogue's buffer: 128 rows of BLOCK_N bf16, each padded by 16 bytes."""
    return BLOCK_M * (2 * block_n + 16)


def epilogue_buffer_bytes(block_n: int, bulk_store: bool = False, tma_store: bool = False) -> int:
    """Shared memory the epilogue stages the tile through: padded rows (bulk copies) or the TMA
    store's swizzled 64 x 64 boxes (128 rows x BLOCK_N bf16)."""
    if bulk_store:
        return out_buffer_bytes(block_n)
    return BLOCK_M * block_n * 2 if tma_store else 0


def max_stages(block_n: int, bulk_store: bool = False, tma_store: bool = False) -> int:
    free = SMEM_LIMIT - 1024 - A_SCALE_AREA - epilogue_buffer_bytes(block_n, bulk_store, tma_store)
    return min(MAX_STAGES, free // (stage_bytes(block_n) + STAGE_EXTRA_BYTES))


def select_config(m: int, n: int, num_sms: int, override: ContiguousConfig | None = None,
                  verbose: bool = False, *, k: int | None = None) -> ContiguousConfig:
    """N tile by formula: minimize (waves of tiles over the SMs) x (columns per tile + fixed
    cost), ties to the larger tile (fewer re-reads of A). `m` is the row count including padding
    (no host sync to count real rows); non-power-of-two tiles (112, 160, ...) often fill the last
    wave better. CTA pairs with TMA multicast (`_pairing`) when there are tiles to pair.
    `override` wins when given."""
    if override is not None:
        cfg = override
    else:
        m_tiles = max(1, math.ceil(m / BLOCK_M))

        def cost(bn: int) -> tuple[int, int]:
            waves = math.ceil(m_tiles * math.ceil(n / bn) / num_sms)
            return waves * (bn + TILE_OVERHEAD_COLS), -bn

        tiles = [bn for bn in HEURISTIC_BLOCK_N if bn <= 128 or (k is not None and k >= WIDE_TILE_MIN_K)]
        bn = min(tiles, key=cost)
        cluster, multicast = _pairing(m_tiles)
        few_k_blocks = k is not None and k // BLOCK_K <= FEW_K_BLOCKS
        group_m = cluster if math.ceil(n / bn) <= FEW_N_TILES or few_k_blocks else GROUP_M
        cfg = ContiguousConfig(block_n=bn, num_stages=max_stages(bn), group_m=group_m, cluster=cluster,
                               multicast=multicast, pingpong=False, two_acc=True,
                               **(WIDE_TILE if bn > 128 else {}))
    if verbose and (m, n, num_sms, cfg) not in _printed:
        _printed.add((m, n, num_sms, cfg))
        print(f"[moe_backend] cuda grouped_gemm_contiguous m={m} N={n} sms={num_sms}: "
              f"{'override' if override is not None else 'formula'} -> {cfg}", flush=True)
    return cfg


def _pairing(m_tiles: int) -> tuple[int, str]:
    """(cluster, multicast). Measured on H100 (docs/history/cuda-kernel-sessions.md, v6-v8): CTA pairs sharing B
    (M-tile pairs) beat single CTAs by 5-15% on the EP8 cells once the remote stage release lost
    its GPU-wide fence; pairs sharing A (N-tile pairs) were no faster than B-sharing ones (EP8 w13
    4096 rows: 8095 vs 7224-7735 µs) and stay opt-in (`multicast="a"`)."""
    if CLUSTER == 1 or m_tiles < 2 * CLUSTER_MIN_PAIRS:
        return 1, "b"
    return 2, "b"


_printed: set = set()


def _print_config() -> bool:
    return os.environ.get("MOE_BACKEND_PRINT_CONFIG") == "1"


@lru_cache(maxsize=1)
def _template() -> str:
    return _TEMPLATE.read_text()


# Bounded: masked_max_m follows the masked layout's max_m, which an engine may vary per batch.
@lru_cache(maxsize=1024)
def kernel_spec(n: int, k: int, config: ContiguousConfig, arch: str = jit.DEFAULT_ARCH,
                masked_max_m: int = 0) -> jit.KernelSpec:
    """The rendered source for one (N, K, config); M stays a runtime argument. masked_max_m > 0:
    the masked layout `[E, max_m, K]`, the kernel reading masked_m in place of per-row ids."""
    if k <= 0 or k % BLOCK_K:
        raise ValueError(f"k: must be a positive multiple of {BLOCK_K}, got {k}")
    if n <= 0:
        raise ValueError(f"n: must be positive, got {n}")
    if masked_max_m < 0 or masked_max_m % BLOCK_M:
        raise ValueError(f"masked_max_m: must be 0 or a multiple of {BLOCK_M}, got {masked_max_m}")
    if config.tma_store and n % 8:
        raise ValueError(f"config.tma_store: TMA stores need 16-byte rows (N % 8 == 0), got N={n}; pass tma_store=False")
    if config.split_tail and (k // BLOCK_K) % SPLIT_QUANTUM:
        raise ValueError(f"config.split_tail: the tail is cut in chunks of {SPLIT_QUANTUM} K blocks, so K must be a "
                         f"multiple of {SPLIT_QUANTUM * BLOCK_K}, got K={k}; pass split_tail=False")
    if config.split_tail and masked_max_m:
        raise ValueError("config.split_tail: the masked layout has no split tail; pass split_tail=False")
    if config.bulk_store and n % 8:
        raise ValueError(f"config.bulk_store: the bulk-copy epilogue needs N % 8 == 0 (16-byte rows), got N={n}; "
                         f"pass bulk_store=False")
    constants = {"N": n, "K": k, "BLOCK_N": config.block_n, "STAGES": config.num_stages,
                 "GROUP_M": config.group_m, "PINGPONG": int(config.pingpong), "CLUSTER": config.cluster,
                 "MCAST_A": int(config.cluster > 1 and config.multicast == "a"), "K_UNROLL": config.resolved_k_unroll,
                 "BULK_STORE": int(config.bulk_store), "TWO_ACC": int(config.two_acc), "MASKED_MAX_M": masked_max_m,
                 "PART_N": config.part_n if config.two_acc and config.part_n != config.block_n else 0,
                 "UNIT_ACCS": config.unit_accs if config.two_acc else 2, "TMA_STORE": int(config.tma_store),
                 "SPLIT_TAIL": int(config.split_tail)}
    name = ("phasemoe_gg_contig_n{N}_k{K}_bn{BLOCK_N}_s{STAGES}_g{GROUP_M}_pp{PINGPONG}_c{CLUSTER}"
            "_ma{MCAST_A}_u{K_UNROLL}_bs{BULK_STORE}_ta{TWO_ACC}_mm{MASKED_MAX_M}_pn{PART_N}_ua{UNIT_ACCS}_ts{TMA_STORE}_st{SPLIT_TAIL}").format(**constants)
    source = _template()
    checked = {"KERNEL_NAME": name, "SMEM_BYTES": config.smem_bytes, "NUM_THREADS": NUM_THREADS,
               "BLOCK_M": BLOCK_M, "BLOCK_K": BLOCK_K}
    for field, value in {**constants, **checked}.items():
        source = source.replace("{{" + field + "}}", str(value))
    # This directory first: its sm90_ptx.cuh and wgmma_fp8.cuh hold what the experiments need.
    return jit.KernelSpec(family="grouped_gemm_variants", kernel_name=name, source=source,
                          constants=constants, arch=arch, include_dirs=(HERE,))


def warmup_specs(shapes: Iterable[tuple[int, int]], row_counts: Iterable[int], num_sms: int = 132
                 ) -> list[jit.KernelSpec]:
    """Distinct specs the heuristic picks for each (N, K) over the given total row counts."""
    specs = {}
    for n, k in shapes:
        for m in row_counts:
            spec = kernel_spec(n, k, select_config(m, n, num_sms, k=k))
            specs[spec.kernel_name] = spec
    return list(specs.values())


# ------------------------------------------------------------------------------------------
# Tensor maps (cuTensorMapEncodeTiled) and launch


@lru_cache(maxsize=1024)
def _tma_param_for(ptr: int, dims: tuple[int, ...], strides_bytes: tuple[int, ...], box: tuple[int, ...],
                   dtype: str = "UINT8") -> ctypes.Array:
    """The kernel parameter bytes of a tensor map. A map is a pure function of these arguments,
    so a cache keyed on them is exact; it spares the driver call on every launch (weights keep
    their addresses, and the caching allocator hands activations the same ones again)."""
    return _tma_param(_tensor_map(ptr, list(dims), list(strides_bytes), list(box), dtype))


def _tensor_map(ptr: int, dims: list[int], strides_bytes: list[int], box: list[int], dtype: str = "UINT8"):
    """Tile map (uint8 = fp8 bytes, or BFLOAT16), innermost dim first, 128-byte swizzle, zero fill
    out of bounds (loads) / clipped (stores)."""
    drv = driver.bindings()
    return driver.check(drv.cuTensorMapEncodeTiled(
        getattr(drv.CUtensorMapDataType, f"CU_TENSOR_MAP_DATA_TYPE_{dtype}"), len(dims), ptr,
        [drv.cuuint64_t(d) for d in dims], [drv.cuuint64_t(s) for s in strides_bytes],
        [drv.cuuint32_t(b) for b in box], [drv.cuuint32_t(1)] * len(dims),
        drv.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        drv.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        drv.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        drv.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE))


def _tma_param(tmap) -> ctypes.Array:
    return (ctypes.c_uint64 * 16)(*[int(x) for x in tmap.opaque])


def num_tiles(m: int, n: int, cfg: ContiguousConfig) -> int:
    return math.ceil(m / BLOCK_M) * math.ceil(n / cfg.block_n)


def grid_size(m: int, n: int, cfg: ContiguousConfig, num_sms: int) -> int:
    """Persistent grid: one CTA per SM at most, whole clusters (a cluster walks pair tiles)."""
    m_tiles, n_tiles = math.ceil(m / BLOCK_M), math.ceil(n / cfg.block_n)
    if cfg.cluster > 1 and cfg.multicast == "a":
        units = m_tiles * math.ceil(n_tiles / cfg.cluster)
    else:
        units = math.ceil(m_tiles / cfg.cluster) * n_tiles
    return min(num_sms // cfg.cluster, units) * cfg.cluster


def kernel_args(a_fp8: torch.Tensor, a_scale: torch.Tensor, b_fp8: torch.Tensor, b_scale: torch.Tensor,
                expert_ids: torch.Tensor, out: torch.Tensor, cfg: ContiguousConfig,
                split: tuple[torch.Tensor, torch.Tensor] | None = None,
                rows_in_use: torch.Tensor | None = None) -> list:
    """The kernel's parameters in declaration order, as ctypes objects the driver copies from:
    (tmap_a, tmap_b, tmap_out, a_scale*, b_scale*, expert_ids*, out*, m, workspace*, flags*,
    rows_in_use*); `split` = the split tail's (workspace, flags), null pointers without one;
    `rows_in_use` int32 [1] on the device (rows of A in use), a null pointer without one. Tensor maps: A `[M, K]`
    in 128 x 128 boxes, B `[E, N, K]` in 1 x BLOCK_N x 128 boxes (innermost dim first), out
    `[M, N]` bf16 in 64 x 64 boxes when the config stores through TMA (else A's map again, unused)."""
    m, k = a_fp8.shape
    num_experts, n, _ = b_fp8.shape
    shares_a = cfg.cluster > 1 and cfg.multicast == "a"  # the shared operand loads in cluster parts
    a_rows = BLOCK_M // cfg.cluster if shares_a else BLOCK_M
    b_rows = cfg.block_n if shares_a else cfg.block_n // cfg.cluster
    tmap_a = _tma_param_for(a_fp8.data_ptr(), (k, m), (k,), (BLOCK_K, a_rows))
    tmap_b = _tma_param_for(b_fp8.data_ptr(), (k, n, num_experts), (k, n * k), (BLOCK_K, b_rows, 1))
    tmap_out = _tma_param_for(out.data_ptr(), (n, m), (2 * n,), (64, 64), "BFLOAT16") if cfg.tma_store else tmap_a
    return [
        tmap_a, tmap_b, tmap_out,
        ctypes.c_uint64(a_scale.data_ptr()), ctypes.c_uint64(b_scale.data_ptr()),
        ctypes.c_uint64(expert_ids.data_ptr()), ctypes.c_uint64(out.data_ptr()), ctypes.c_int32(m),
        ctypes.c_uint64(split[0].data_ptr() if split else 0), ctypes.c_uint64(split[1].data_ptr() if split else 0),
        ctypes.c_uint64(rows_in_use.data_ptr() if rows_in_use is not None else 0),
    ]


def split_tail_plan(num_units: int, workers: int, k_blocks: int) -> list[list[tuple[int, int, int, str, int]]]:
    """What each worker (CTA, or CTA pair) computes under `split_tail`, as the kernel's
    TileScheduler walks it: per worker, (unit, kb_begin, kb_count, kind, others) with kind
    "whole", "finalizer" (adds the partial sums of the `others` workers after it) or
    "contributor" (hands its sums over). Units of whole waves go round-robin; the last, partial
    wave's units are cut into chunks of SPLIT_QUANTUM K blocks, each worker taking an equal run;
    no split when each tail unit would get one worker anyway. For reading a plan and for the
    CPU tests of its invariants; the GPU tests check the kernel against the reference."""
    if k_blocks % SPLIT_QUANTUM:
        raise ValueError(f"k_blocks: the split tail needs a multiple of {SPLIT_QUANTUM}, got {k_blocks}")
    chunks = k_blocks // SPLIT_QUANTUM
    full = num_units - num_units % workers
    tail_chunks = (num_units - full) * chunks
    run_len = -(-tail_chunks // workers)
    if tail_chunks == 0 or run_len >= chunks:
        full, run_len = num_units, 1
    plan = []
    for w in range(workers):
        pieces = [(t, 0, k_blocks, "whole", 0) for t in range(w, full, workers)]
        c, end = min(w * run_len, tail_chunks), min(w * run_len + run_len, tail_chunks)
        while full < num_units and c < end:
            u = c // chunks
            stop = min(end, (u + 1) * chunks)
            first = c == u * chunks
            kind = ("whole" if stop == (u + 1) * chunks else "finalizer") if first else "contributor"
            others = ((u + 1) * chunks - 1) // run_len - w if kind == "finalizer" else 0
            pieces.append((full + u, (c - u * chunks) * SPLIT_QUANTUM, (stop - c) * SPLIT_QUANTUM, kind, others))
            c = stop
        plan.append(pieces)
    return plan


_split_cache: dict = {}


def _split_buffers(dev: torch.device, stream: int, ctas: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The split tail's workspace (one 128 x block_n fp32 slot per CTA) and flags (one int32 per
    CTA and consumer warpgroup, zero between launches: each launch clears what it set). Kept per
    (device, stream), never freed: GEMMs on one stream run one after another, a CUDA graph keeps
    the addresses it captured, and kernels on two streams must not share the flags."""
    key = (dev, stream)
    floats = ctas * BLOCK_M * block_n
    bufs = _split_cache.get(key)
    if bufs is None or bufs[0].numel() < floats or bufs[1].numel() < 2 * ctas:
        if bufs is not None:
            torch.cuda.current_stream(dev).synchronize()  # a launch in flight may still use the old flags
        bufs = (torch.empty(floats, dtype=torch.float32, device=dev),
                torch.zeros(2 * ctas, dtype=torch.int32, device=dev))
        _split_cache[key] = bufs
    return bufs


@lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def check_device(dev: torch.device) -> None:
    if dev.type != "cuda":
        raise ValueError(f"a_fp8: the CUDA kernel needs a CUDA tensor, got one on {dev} "
                         f"(use moe_backend.ops, which falls back to the reference on CPU)")
    if torch.cuda.get_device_capability(dev) != (9, 0):
        raise ValueError(f"a_fp8: the CUDA grouped GEMM is built for sm_90a (Hopper), got a device of "
                         f"capability {torch.cuda.get_device_capability(dev)}")


def check_weights(b_fp8: torch.Tensor, b_scale: torch.Tensor, k: int) -> tuple[int, int]:
    """Checks B `[E, N, K]` e4m3 and its scales `[E, ceil(N/128), K/128]` f32 against the
    activations' K; returns (E, N)."""
    check_tensor("b_fp8", b_fp8, dtypes=(FP8_DTYPE,), ndim=3, contiguous=True)
    num_experts, n, kb = b_fp8.shape
    if kb != k:
        raise ValueError(f"b_fp8: K ({kb}) must equal the activations' K ({k})")
    check_tensor("b_scale", b_scale, dtypes=(torch.float32,), shape=(num_experts, -(-n // 128), k // BLOCK_K),
                 contiguous=True)
    return num_experts, n


def grouped_gemm_contiguous(a_fp8: torch.Tensor, a_scale: torch.Tensor, b_fp8: torch.Tensor,
                            b_scale: torch.Tensor, expert_ids: torch.Tensor,
                            out: torch.Tensor | None = None, *,
                            config: ContiguousConfig | None = None) -> torch.Tensor:
    """out[m, :] = A[m] @ B[expert_ids[m]]^T with block scales; rows with id -1 are not written.

    a_fp8 e4m3 `[M, K]` (K % 128 == 0), a_scale f32 `[M, K/128]`, b_fp8 e4m3 `[E, N, K]`,
    b_scale f32 `[E, ceil(N/128), K/128]`, expert_ids int32 (int64 is converted) `[M]`, each
    expert's segment starting on a multiple of 128 rows (padding rows -1; ids are not
    range-checked: that would sync with the host), out bf16 `[M, N]` (allocated zeroed when
    None, like the reference). All contiguous, on one Hopper GPU. `config` overrides the
    heuristic (MOE_BACKEND_PRINT_CONFIG=1 prints each new choice).
    """
    check_tensor("a_fp8", a_fp8, dtypes=(FP8_DTYPE,), ndim=2, contiguous=True)
    m, k = a_fp8.shape
    if k == 0 or k % BLOCK_K:
        raise ValueError(f"a_fp8: K ({k}) must be a positive multiple of {BLOCK_K}")
    check_tensor("a_scale", a_scale, dtypes=(torch.float32,), shape=(m, k // BLOCK_K), contiguous=True)
    num_experts, n = check_weights(b_fp8, b_scale, k)
    check_tensor("expert_ids", expert_ids, dtypes=(torch.int32, torch.int64), shape=(m,), contiguous=True)
    check_same_device(a_fp8=a_fp8, a_scale=a_scale, b_fp8=b_fp8, b_scale=b_scale, expert_ids=expert_ids)
    dev = a_fp8.device
    if out is None:
        out = torch.zeros((m, n), dtype=torch.bfloat16, device=dev)
    else:
        check_tensor("out", out, dtypes=(torch.bfloat16,), shape=(m, n), device=dev, contiguous=True)
    check_device(dev)
    for name, t in (("a_fp8", a_fp8), ("b_fp8", b_fp8)):
        if t.data_ptr() % 16:
            raise ValueError(f"{name}: TMA needs a 16-byte aligned base address (got a view at offset "
                             f"{t.data_ptr() % 16} mod 16); pass a fresh tensor")
    if m == 0 or n == 0 or num_experts == 0:
        return out
    if expert_ids.dtype != torch.int32:
        expert_ids = expert_ids.to(torch.int32)
    if out.data_ptr() % 16:  # the epilogue stores 16-byte vectors
        staged = grouped_gemm_contiguous(a_fp8, a_scale, b_fp8, b_scale, expert_ids, None, config=config)
        pad = expert_ids < 0
        out[~pad] = staged[~pad]
        return out

    return launch(a_fp8, a_scale, b_fp8, b_scale, expert_ids, out, config=config)


@lru_cache(maxsize=1024)
def _kernel_and_grid(m: int, n: int, k: int, cfg: ContiguousConfig, masked_max_m: int, index: int,
                     env_flags: tuple[str, ...]):
    """The loaded kernel and its persistent grid for one (shape, config, device): built once, so
    a launch does no rendering, hashing or occupancy query (env_flags: part of the binary's key)."""
    kernel = driver.load_kernel(kernel_spec(n, k, cfg, masked_max_m=masked_max_m), index)
    grid = grid_size(m, n, cfg, _num_sms(index))
    if cfg.cluster > 1:  # GPCs may not hold num_sms / 2 resident pairs
        resident = kernel.max_active_clusters((NUM_THREADS, 1, 1), cfg.smem_bytes, (cfg.cluster, 1, 1))
        if resident > 0:
            grid = min(grid, resident * cfg.cluster)
    return kernel, grid


def launch(a_fp8: torch.Tensor, a_scale: torch.Tensor, b_fp8: torch.Tensor, b_scale: torch.Tensor,
           row_ids: torch.Tensor, out: torch.Tensor, *, config: ContiguousConfig | None,
           masked_max_m: int = 0, rows_in_use: torch.Tensor | None = None) -> torch.Tensor:
    """Runs the kernel on checked operands (A `[M, K]`, out `[M, N]` 16-byte aligned, int32
    row_ids: per-row expert ids, or masked_m when masked_max_m > 0; rows_in_use: optional int32
    [1] on the device, the rows of A in use, so the tail past it is not walked)."""
    m, k = a_fp8.shape
    n = b_fp8.shape[1]
    dev = a_fp8.device
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if a_scale.data_ptr() % 16:  # the scale warp copies 16-byte runs of a row (a view at an odd offset)
        a_scale = a_scale.clone()
    cfg = select_config(m, n, _num_sms(index), override=config, verbose=_print_config(), k=k)
    with torch.cuda.device(index):
        kernel, grid = _kernel_and_grid(m, n, k, cfg, masked_max_m, index, jit.env_flags())
        stream = torch.cuda.current_stream(dev).cuda_stream
        split = _split_buffers(dev, stream, grid, cfg.block_n) if cfg.split_tail else None
        kernel.launch(grid=(grid, 1, 1), block=(NUM_THREADS, 1, 1),
                      smem=cfg.smem_bytes, stream=stream,
                      params=kernel_args(a_fp8, a_scale, b_fp8, b_scale, row_ids, out, cfg, split, rows_in_use),
                      cluster=(cfg.cluster, 1, 1))
    return out
