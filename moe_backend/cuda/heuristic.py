"""Which `ContiguousConfig` the CUDA grouped GEMM runs: by formula from the shape, no autotuning on
the hot path. `select_config` serves the contiguous layout (prefill), `select_masked_config` the
masked one (decode). Both are what `moe_backend.dispatch.plan` records in a plan; `config=` on
the ops overrides them, and MOE_BACKEND_PRINT_CONFIG=1 prints each new contiguous choice."""

from __future__ import annotations

import math

from moe_backend.cuda.config import BLOCK_K, BLOCK_M, GROUP_M, ContiguousConfig
from moe_backend.env import ENV

__all__ = ["select_config", "select_masked_config"]

# GPUs whose masked GEMMs with long K all take 256-wide pairs with 3 stages: on the H100 they beat
# the 128-wide pairs at EP8's decode rows under uniform and hot-expert counts alike; on the H200
# they win some EP8 cells and lose others (docs/benchmarks.md, "Wide masked pairs on the H100" and
# "The hot-expert cells").
WIDE_MASKED_PAIRS_ON = ("H100",)
# EP8's wide masked GEMMs take mixed pairs (an expert's M tiles in pairs sharing B, its odd last
# tile in N-tile pairs sharing A: docs/benchmarks.md, "Mixed pairs on the H100" and "... on the
# H200"), 256 wide with 3 stages; elsewhere than on the H100, 192 wide up to this K (EP8 w2: faster
# under hot experts, 3% slower at uniform counts where it still leads the peers).
MIXED_PAIRS_192_MAX_K = 2048

# Tiles the formula picks from: 64 fills the SMs when few rows give few tiles; 256 halves the A
# traffic per FLOP where K is long enough to spread its per-K-block work (WIDE_TILE_MIN_K); 192
# where K has at most FEW_K_BLOCKS blocks (TP8 w2): the output is most of the traffic there, and
# fewer, wider tiles pay less per-tile cost. At long K it measured slower than the 256-wide tile,
# so it is not a choice there (docs/benchmarks.md, "192-wide tiles").
HEURISTIC_BLOCK_N = (64, 128, 192, 256)
WIDE_TILE_MIN_K = 1024
# Per-tile fixed cost in column-equivalents (A tile traffic, promotion, epilogue, pipeline fill)
# used to rank N tiles; with it the formula picks the tiles of docs/benchmarks.md, "Our CUDA C++
# contiguous GEMM vs DeepGEMM (issue 5)" (256 for EP8 and TP8 w13, 128 for TP8 w2).
TILE_OVERHEAD_COLS = 96
# CTA pairs sharing B by TMA multicast from this many pairs of M tiles (dead halves of pairs
# cost more than the shared loads save below it).
CLUSTER_MIN_PAIRS = 4
# Where each pair walks only its own M tiles across N (group_m = the cluster size): at most
# FEW_N_TILES N tiles (the units sharing an A tile then run on neighbouring SMs at one time) or
# at most FEW_K_BLOCKS K blocks (the output is most of the traffic: consecutive units write
# consecutive columns of the same rows). The TP8 cells; EP8 keeps GROUP_M.
FEW_N_TILES = 2
FEW_K_BLOCKS = 2
# GPUs whose short-K 192-wide tiles (TP8 w2) run a 3-stage ring, each CTA pair walking the N tiles
# of its own M tiles (group_m 1): on the H100 the full 5-stage ring ran 5-15% behind DeepGEMM when
# every expert's rows fill whole tiles and rounds of it drop to a slow state; 3 stages met
# DeepGEMM there and at 2048-8192 routed tokens, and cost up to 5% at 16384 (docs/benchmarks.md,
# "The H100's short-K ring").
SHORT_K_SHALLOW_RING_ON = ("H100",)
SHORT_K_SHALLOW_STAGES = 3

_printed: set = set()


def select_config(
    m: int,
    n: int,
    num_sms: int,
    override: ContiguousConfig | None = None,
    verbose: bool = False,
    *,
    k: int | None = None,
    device_name: str | None = None,
) -> ContiguousConfig:
    """The contiguous layout's config. N tile by formula: minimize (waves of tiles over the SMs)
    x (columns per tile + fixed cost), ties to the larger tile (fewer re-reads of A); `m` is the
    row count including padding (no host sync to count real rows). CTA pairs sharing B once
    there are enough M tiles to pair. `device_name` (torch.cuda.get_device_name) picks the short-K
    ring depth (SHORT_K_SHALLOW_RING_ON). `override` wins when given."""
    if override is not None:
        cfg = override
    else:
        m_tiles = max(1, math.ceil(m / BLOCK_M))

        def cost(bn: int) -> tuple[int, int]:
            waves = math.ceil(m_tiles * math.ceil(n / bn) / num_sms)
            return waves * (bn + TILE_OVERHEAD_COLS), -bn

        few_k_blocks = k is not None and k // BLOCK_K <= FEW_K_BLOCKS
        wide = {192: few_k_blocks, 256: k is not None and k >= WIDE_TILE_MIN_K}
        tiles = [bn for bn in HEURISTIC_BLOCK_N if bn <= 128 or wide[bn]]
        bn = min(tiles, key=cost)
        cluster = 2 if m_tiles >= 2 * CLUSTER_MIN_PAIRS else 1
        group_m = cluster if math.ceil(n / bn) <= FEW_N_TILES or few_k_blocks else GROUP_M
        stages = 0
        if bn == 192 and few_k_blocks and _named(device_name, SHORT_K_SHALLOW_RING_ON):
            stages, group_m = SHORT_K_SHALLOW_STAGES, 1
        cfg = ContiguousConfig(block_n=bn, num_stages=stages, group_m=group_m, cluster=cluster)
    if verbose and (m, n, num_sms, cfg) not in _printed:
        _printed.add((m, n, num_sms, cfg))
        print(
            f"[moe_backend] cuda grouped_gemm_contiguous m={m} N={n} sms={num_sms}: "
            f"{'override' if override is not None else 'formula'} -> {cfg}",
            flush=True,
        )
    return cfg


def select_masked_config(n: int, k: int, device_name: str | None = None) -> ContiguousConfig:
    """The masked layout's config (decode: 64-256 rows per expert; docs/benchmarks.md, "Decode
    cells at 128 rows per expert: config sweep"). N tiles walked N-fastest within one expert
    (group_m 1: an expert's A tile stays hot in L2 while its weights stream, and the scheduler
    can skip an expert's dead M tiles). Wide GEMMs (EP8's): mixed CTA pairs (B or A shared unit by
    unit), 256 wide with 3 stages, 192 wide for K <= MIXED_PAIRS_192_MAX_K except on an H100
    (`device_name`, torch.cuda.get_device_name); N = 512 (TP8 w13): 256-wide pairs sharing A, two
    N tiles per expert (faster than 64-128-wide pairs and than DeepGEMM's masked GEMM from 128 rows
    per expert, where our masked kernel runs, on both GPUs: docs/benchmarks.md, "TP8 w13's masked
    pairs"), 3 stages on an H100; K = 256 (two K blocks per tile): 64-wide single CTAs."""
    if k <= 256:
        return ContiguousConfig(64, group_m=1, cluster=1)
    wide_pairs = _named(device_name, WIDE_MASKED_PAIRS_ON)
    if n <= 512:
        return ContiguousConfig(256, num_stages=3 if wide_pairs else 0, group_m=1, cluster=2, multicast="a")
    if not wide_pairs and k <= MIXED_PAIRS_192_MAX_K:
        return ContiguousConfig(192, group_m=1, cluster=2, multicast="mixed")
    return ContiguousConfig(256, num_stages=3, group_m=1, cluster=2, multicast="mixed")


def _named(device_name: str | None, names: tuple[str, ...]) -> bool:
    return device_name is not None and any(name in device_name for name in names)


def print_config() -> bool:
    return ENV.print_config
