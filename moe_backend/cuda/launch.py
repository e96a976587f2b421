"""Building and launching the CUDA grouped GEMM: the rendered source per (N, K, config) for the JIT
(`kernel_spec`), the TMA tensor maps and kernel parameters, the persistent grid, and `launch` on
checked operands. The ops (`grouped_gemm_contiguous`, `grouped_gemm_masked`) check arguments and
call `launch`; the layer pipeline calls it directly with the config its plan holds."""

from __future__ import annotations

import ctypes
import dataclasses
import math
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import torch

from moe_backend._checks import check_tensor
from moe_backend.cuda import driver, jit
from moe_backend.cuda.config import (
    BLOCK_K,
    BLOCK_M,
    BLOCK_N_CHOICES,
    DIRECT_ROWS_AREA,
    MAX_MASKED_EXPERTS,
    NUM_THREADS,
    SMEM_LIMIT,
    ContiguousConfig,
)
from moe_backend.cuda.heuristic import print_config, select_config
from moe_backend.kernels._launch_utils import device_name
from moe_backend.quant import FP8_DTYPE

__all__ = [
    "kernel_spec",
    "warmup_specs",
    "kernel_args",
    "grid_size",
    "launch",
    "check_device",
    "check_weights",
    "stream_k_workspace",
    "kept_stream_k_workspace",
]

_TEMPLATE = Path(__file__).with_name("grouped_gemm_contiguous.cu")


@lru_cache(maxsize=1)
def _template() -> str:
    return _TEMPLATE.read_text()


# Bounded: masked_max_m follows the masked layout's max_m, which an engine may vary per batch.
@lru_cache(maxsize=1024)
def kernel_spec(
    n: int,
    k: int,
    config: ContiguousConfig,
    arch: str = jit.DEFAULT_ARCH,
    masked_max_m: int = 0,
    gather_a: bool = False,
    silu_quant: int = 0,
    direct_rows: bool = False,
) -> jit.KernelSpec:
    """The rendered source for one (N, K, config); M stays a runtime argument. masked_max_m > 0:
    the masked layout `[E, max_m, K]`, the kernel reading masked_m in place of per-row ids.
    gather_a: A's rows are token rows read through a per-row index (contiguous layout, configs
    whose CTA pairs do not share A). silu_quant (GEMM1, N = 2I: gate rows then up rows): 1 or 2
    (UE8M0 scales), the kernel stores FP8 silu(gate) * up `[M, I]` and its 1 x 128 scales instead
    of the bf16 product (contiguous layout, 256-wide tiles not sharing A, N a multiple of 256).
    direct_rows (GEMM2 of an expert-parallel slice): rows whose token has no other local slot are
    stored weighted into the layer's output (`launch`'s `direct`; contiguous bf16 output, N a
    multiple of 8, at least as many K blocks as stages). config.stream_k: K blocks in a_scale chunks
    of whole K-loop chains (`stream_k_chunk`), with direct_rows chunks of at least as many K blocks
    as stages."""
    if config.mixed_pairs and not masked_max_m:
        raise ValueError("config.multicast: 'mixed' pairs walk the masked layout only (masked_max_m > 0)")
    if config.mixed_pairs and -(-n // config.block_n) < 2:
        raise ValueError(f"config.multicast: 'mixed' pairs need at least 2 N tiles, got N={n} at {config}")
    if gather_a and (masked_max_m or config.shares_a):
        raise ValueError("gather_a: only on the contiguous layout, with a config whose CTA pairs do not share A")
    if silu_quant not in (0, 1, 2):
        raise ValueError(f"silu_quant: must be 0, 1 or 2 (UE8M0), got {silu_quant!r}")
    if silu_quant and (masked_max_m or config.shares_a or config.block_n != 256 or n % 256):
        raise ValueError(
            "silu_quant: only on the contiguous layout, with 256-wide tiles whose CTA pairs do not share A "
            f"and N a multiple of 256 (got N={n}, {config})"
        )
    if direct_rows and (masked_max_m or silu_quant or n % 8 or k // BLOCK_K < config.num_stages):
        raise ValueError(
            "direct_rows: only for a bf16 output on the contiguous layout, N a multiple of 8 and at least "
            f"{config.num_stages} K blocks (got N={n}, K={k}, {config})"
        )
    if direct_rows and smem_bytes(config, True) > SMEM_LIMIT:
        raise ValueError(f"direct_rows: {config} leaves no room for the staged rows; use fewer stages")
    if config.split_padding_halves and (silu_quant or direct_rows or n % 2):
        raise ValueError(
            "config.split_padding_halves: a bf16 output without direct rows, N even "
            f"(got N={n}, silu_quant={silu_quant}, direct_rows={direct_rows}); use skip_padding_halves alone"
        )
    if k <= 0 or k % BLOCK_K:
        raise ValueError(f"k: must be a positive multiple of {BLOCK_K}, got {k}")
    if n <= 0:
        raise ValueError(f"n: must be positive, got {n}")
    if masked_max_m < 0 or masked_max_m % BLOCK_M:
        raise ValueError(f"masked_max_m: must be 0 or a multiple of {BLOCK_M}, got {masked_max_m}")
    if config.stream_k and stream_k_chunk(k, config.block_n) == 0:
        raise ValueError(
            f"config.stream_k: K={k} gives a_scale chunks shorter than the K loop's chains at "
            f"block_n={config.block_n} (K / 128 must be even)"
        )
    if config.stream_k and direct_rows and stream_k_chunk(k, config.block_n) < config.num_stages:
        raise ValueError(
            f"config.stream_k with direct_rows: the pieces (a_scale chunks of {stream_k_chunk(k, config.block_n)} "
            f"K blocks) must span at least {config.num_stages} K blocks (the stages)"
        )
    constants = {
        "N": n,
        "K": k,
        "BLOCK_N": config.block_n,
        "STAGES": config.num_stages,
        "GROUP_M": config.group_m,
        "CLUSTER": config.cluster,
        "MCAST_A": 2 if config.mixed_pairs else int(config.shares_a),
        "MASKED_MAX_M": masked_max_m,
        "GATHER_A": int(gather_a),
        "SILU_QUANT": silu_quant,
        "DIRECT_ROWS": int(direct_rows),
        "STREAM_K": int(config.stream_k),
        "SKIP_HALVES": 2 if config.split_padding_halves else int(config.skip_padding_halves),
        "A_REGS": int(config.a_regs),
    }
    name = (
        "phasemoe_gg_contig_n{N}_k{K}_bn{BLOCK_N}_s{STAGES}_g{GROUP_M}_c{CLUSTER}_ma{MCAST_A}_mm{MASKED_MAX_M}"
    ).format(**constants)
    name += ("_ga" if gather_a else "") + (f"_sq{silu_quant}" if silu_quant else "") + ("_dr" if direct_rows else "")
    name += ("_sk" if config.stream_k else "") + ("_sh" if config.skip_padding_halves else "")
    name += "2" if config.split_padding_halves else ""
    name += "_ar" if config.a_regs else ""
    source = _template()
    checked = {
        "KERNEL_NAME": name,
        "SMEM_BYTES": smem_bytes(config, direct_rows),
        "NUM_THREADS": NUM_THREADS,
        "BLOCK_M": BLOCK_M,
        "BLOCK_K": BLOCK_K,
    }
    for field, value in {**constants, **checked}.items():
        source = source.replace("{{" + field + "}}", str(value))
    return jit.KernelSpec(
        family="grouped_gemm_contiguous", kernel_name=name, source=source, constants=constants, arch=arch
    )


def stream_k_chunk(k: int, block_n: int) -> int:
    """K blocks per stream-K chunk (KernelTraits::kScaleChunk: a cut starts an a_scale chunk), or
    0 where a chunk is not a whole number of the K loop's chains (kLoopChain)."""
    k_blocks = k // BLOCK_K
    chunk = next(c for c in (8, 4, 2, 1) if k_blocks % c == 0)
    chain = min(2 if block_n == 256 else 4, k_blocks)
    return chunk if chunk % chain == 0 else 0


# M tiles of the masked layout that CTA pairs sharing B can walk (scheduler.cuh, PairedTiles: a tile
# index + 1 in 16 bits).
MAX_PAIRED_TILES = 0xFFFF


def paired_live_walk(cfg: ContiguousConfig, masked_max_m: int) -> bool:
    """Whether the kernel walks pairs of live M tiles (scheduler.cuh, kPairedLiveWalk, or the mixed
    pairs' MixedUnits): the masked layout's dense walk (one M unit per group: group_m // cluster <= 1)
    with CTA pairs sharing B (or, mixed, B or A unit by unit)."""
    return bool(masked_max_m) and cfg.cluster == 2 and not cfg.shares_a and cfg.group_m // 2 <= 1


def check_paired_tiles(m: int, cfg: ContiguousConfig, masked_max_m: int) -> None:
    """CTA pairs sharing B on the masked layout walk pairs of live tiles, two tile indices packed
    in one int (scheduler.cuh, PairedTiles): at most MAX_PAIRED_TILES M tiles. That walk deals
    whole units only: a unit of it cut by stream-K leaves rows unwritten on the GPU, so the pair
    is refused. The mixed pairs' units hold one expert each and take stream-K."""
    if not paired_live_walk(cfg, masked_max_m):
        return
    if cfg.stream_k and not cfg.mixed_pairs:
        raise ValueError(
            "config.stream_k: CTA pairs sharing B on the masked layout deal whole units only; "
            "use stream_k=False, or pair N tiles (multicast='a') or single CTAs with stream-K"
        )
    if m // BLOCK_M > MAX_PAIRED_TILES:
        raise ValueError(
            f"row_ids: CTA pairs sharing B on the masked layout serve at most {MAX_PAIRED_TILES} M tiles "
            f"(experts x max_m / {BLOCK_M}), got {m // BLOCK_M}; pair N tiles (multicast='a') instead"
        )


# Stream-K workspace (stream_k.cuh): a flag area for at most STREAM_K_MAX_CTAS CTAs, 8 int32 flags
# each, then per CTA a slot of 256 consumer threads x block_n / 2 fp32 partial sums.
STREAM_K_MAX_CTAS = 256
STREAM_K_FLAG_WORDS = STREAM_K_MAX_CTAS * 8


def stream_k_workspace(device: torch.device, num_ctas: int | None = None) -> torch.Tensor:
    """A workspace for stream-K launches on `device` of up to `num_ctas` CTAs (default: its SMs)
    at any tile width, flags zeroed. The kernel lowers every flag it raised, so one workspace
    serves every later stream-K launch on one stream (`launch` keeps one per stream); launches on
    streams that may overlap need one each."""
    if num_ctas is None:
        num_ctas = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    if not 0 < num_ctas <= STREAM_K_MAX_CTAS:
        raise ValueError(f"num_ctas: stream-K serves 1 to {STREAM_K_MAX_CTAS} CTAs, got {num_ctas}")
    workspace = torch.empty(STREAM_K_FLAG_WORDS + num_ctas * 128 * max(BLOCK_N_CHOICES), dtype=torch.float32,
                            device=device)  # fmt: skip
    workspace[:STREAM_K_FLAG_WORDS].zero_()
    return workspace


# Stream-K workspaces kept per (device, stream): launches on one stream run one after another, and
# each leaves the flags zero for the next.
_KEPT_WORKSPACES: dict[tuple[int, int], torch.Tensor] = {}


def kept_stream_k_workspace(device: torch.device, stream: int) -> torch.Tensor:
    """The workspace kept for stream-K launches on `stream` (a handle) of `device`, made at first
    use outside CUDA-graph capture. Under capture: a fresh one, its zeroing captured with it (a
    kept one would be shared by the graph's replays and the stream's eager launches)."""
    if torch.cuda.is_current_stream_capturing():
        return stream_k_workspace(device)
    key = (device.index if device.index is not None else torch.cuda.current_device(), stream)
    workspace = _KEPT_WORKSPACES.get(key)
    if workspace is None:
        workspace = _KEPT_WORKSPACES[key] = stream_k_workspace(device)
    return workspace


def stream_k_workspace_for(grid: int, block_n: int, device: torch.device, given: torch.Tensor | None) -> torch.Tensor:
    """`given` checked to hold `grid` CTAs' slots at `block_n`, or a fresh workspace for this launch."""
    if grid > STREAM_K_MAX_CTAS:
        raise ValueError(f"num_ctas: stream-K serves 1 to {STREAM_K_MAX_CTAS} CTAs, got a grid of {grid}")
    if given is None:
        return stream_k_workspace(device, grid)
    need = STREAM_K_FLAG_WORDS + grid * 128 * block_n
    if given.dtype != torch.float32 or given.device != device or given.numel() < need:
        raise ValueError(
            f"stream_k_workspace: expected a launch.stream_k_workspace buffer of at least {need} fp32 elements "
            f"on {device}, got {tuple(given.shape)} {given.dtype} on {given.device}"
        )
    return given


def smem_bytes(config: ContiguousConfig, direct_rows: bool = False) -> int:
    """The dynamic shared memory of a kernel (KernelTraits::kSmemBytes)."""
    return config.smem_bytes + (DIRECT_ROWS_AREA if direct_rows else 0)


def warmup_specs(
    shapes: Iterable[tuple[int, int]], row_counts: Iterable[int], num_sms: int = 132, gpu: str | None = None
) -> list[jit.KernelSpec]:
    """Distinct specs the heuristic picks for each (N, K) over the given total row counts on the
    GPU named `gpu` (torch.cuda.get_device_name)."""
    specs = {}
    for n, k in shapes:
        for m in row_counts:
            spec = kernel_spec(n, k, select_config(m, n, num_sms, k=k, device_name=gpu))
            specs[spec.kernel_name] = spec
    return list(specs.values())


# ------------------------------------------------------------------------------------------
# Tensor maps (cuTensorMapEncodeTiled) and kernel parameters


@lru_cache(maxsize=1024)
def _tma_param_for(
    ptr: int, dims: tuple[int, ...], strides_bytes: tuple[int, ...], box: tuple[int, ...]
) -> ctypes.Array:
    """The kernel parameter bytes of a tensor map. A map is a pure function of these arguments,
    so a cache keyed on them is exact; it spares the driver call on every launch (weights keep
    their addresses, and the caching allocator hands activations the same ones again)."""
    return _tma_param(_tensor_map(ptr, list(dims), list(strides_bytes), list(box)))


def _tensor_map(ptr: int, dims: list[int], strides_bytes: list[int], box: list[int]):
    """fp8 (as uint8) tile map, innermost dim first, 128-byte swizzle, zero fill out of bounds."""
    drv = driver.bindings()
    return driver.check(
        drv.cuTensorMapEncodeTiled(
            drv.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_UINT8,
            len(dims),
            ptr,
            [drv.cuuint64_t(d) for d in dims],
            [drv.cuuint64_t(s) for s in strides_bytes],
            [drv.cuuint32_t(b) for b in box],
            [drv.cuuint32_t(1)] * len(dims),
            drv.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
            drv.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
            drv.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            drv.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    )


def _tma_param(tmap) -> ctypes.Array:
    return (ctypes.c_uint64 * 16)(*[int(x) for x in tmap.opaque])


def kernel_args(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    expert_ids: torch.Tensor,
    out: torch.Tensor,
    cfg: ContiguousConfig,
    rows_in_use: torch.Tensor | None = None,
    a_rows: torch.Tensor | None = None,
    act_scale: torch.Tensor | None = None,
    direct: tuple[torch.Tensor, torch.Tensor] | None = None,
    stream_k: torch.Tensor | None = None,
) -> list:
    """The kernel's parameters in declaration order, as ctypes objects the driver copies from:
    (tmap_a, tmap_b, a_scale*, b_scale*, expert_ids*, out*, m, rows_in_use*, a_rows*, a*,
    act_scale*, direct_pairs*, direct_out*, stream_k_workspace*); stream_k (a config with
    stream_k): `stream_k_workspace`'s buffer; direct (a kernel with direct_rows): every row's
    (destination token, fp32 weight bits) int32 pair `[M, 2]` and the layer's output `[T, N]`;
    act_scale (a kernel with silu_quant): fp32 `[M, N / 256]`, out then being the
    FP8 activation `[M, N / 2]`, and B is loaded in 128-row boxes (gate half, up half);
    rows_in_use: int32 [1] on the device (rows of A in use) or a null pointer. Tensor maps: A
    `[M, K]` in 128 x 128 boxes, B `[E, N, K]` in 1 x BLOCK_N x 128 boxes (innermost dim first);
    the operand a CTA pair shares is loaded in halves, one per CTA (mixed pairs: both). a_rows (gathered A): int64
    `[M]`, the row of A (token rows, `[T, K]`) behind each layout row, -1 for padding; M is then
    the layout's rows (expert_ids), and the kernel reads A through a_rows instead of tmap_a."""
    m, k = a_fp8.shape
    num_experts, n, _ = b_fp8.shape
    a_box = BLOCK_M // cfg.cluster if cfg.shares_a or cfg.mixed_pairs else BLOCK_M
    if act_scale is not None:  # gate half and up half of the tile, each from its own rows
        b_rows = cfg.block_n // 2
    else:
        b_rows = cfg.block_n if cfg.shares_a else cfg.block_n // cfg.cluster
    tmap_a = None if a_rows is not None else _tma_param_for(a_fp8.data_ptr(), (k, m), (k,), (BLOCK_K, a_box))
    tmap_b = _tma_param_for(b_fp8.data_ptr(), (k, n, num_experts), (k, n * k), (BLOCK_K, b_rows, 1))
    if a_rows is not None:
        m = expert_ids.shape[0]
        tmap_a = tmap_b  # not read: a valid map for the prefetch
    direct_ptrs = [t.data_ptr() for t in direct] if direct is not None else [0, 0]
    return [
        tmap_a,
        tmap_b,
        ctypes.c_uint64(a_scale.data_ptr()),
        ctypes.c_uint64(b_scale.data_ptr()),
        ctypes.c_uint64(expert_ids.data_ptr()),
        ctypes.c_uint64(out.data_ptr()),
        ctypes.c_int32(m),
        ctypes.c_uint64(rows_in_use.data_ptr() if rows_in_use is not None else 0),
        ctypes.c_uint64(a_rows.data_ptr() if a_rows is not None else 0),
        ctypes.c_uint64(a_fp8.data_ptr() if a_rows is not None else 0),
        ctypes.c_uint64(act_scale.data_ptr() if act_scale is not None else 0),
        *(ctypes.c_uint64(ptr) for ptr in direct_ptrs),
        ctypes.c_uint64(stream_k.data_ptr() if stream_k is not None else 0),
    ]


def num_tiles(m: int, n: int, cfg: ContiguousConfig) -> int:
    return math.ceil(m / BLOCK_M) * math.ceil(n / cfg.block_n)


def grid_size(m: int, n: int, cfg: ContiguousConfig, num_sms: int) -> int:
    """Persistent grid: one CTA per SM at most, whole clusters (a cluster walks pair tiles). With
    stream_k every SM: a pool of fewer units than clusters is still spread over all of them."""
    if cfg.stream_k:
        return num_sms // cfg.cluster * cfg.cluster
    m_tiles, n_tiles = math.ceil(m / BLOCK_M), math.ceil(n / cfg.block_n)
    if cfg.shares_a or cfg.mixed_pairs:  # mixed: at most one unit per M tile and pair of N tiles
        units = m_tiles * math.ceil(n_tiles / cfg.cluster)
    else:
        units = math.ceil(m_tiles / cfg.cluster) * n_tiles
    return min(num_sms // cfg.cluster, units) * cfg.cluster


# ------------------------------------------------------------------------------------------
# Checks shared by the ops, and the launch


@lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def check_device(dev: torch.device) -> None:
    if dev.type != "cuda":
        raise ValueError(
            f"a_fp8: the CUDA kernel needs a CUDA tensor, got one on {dev} "
            f"(use moe_backend.ops, which falls back to the reference on CPU)"
        )
    if torch.cuda.get_device_capability(dev) != (9, 0):
        raise ValueError(
            f"a_fp8: the CUDA grouped GEMM is built for sm_90a (Hopper), got a device of "
            f"capability {torch.cuda.get_device_capability(dev)}"
        )


def check_weights(b_fp8: torch.Tensor, b_scale: torch.Tensor, k: int) -> tuple[int, int]:
    """Checks B `[E, N, K]` e4m3 and its scales `[E, ceil(N/128), K/128]` f32 against the
    activations' K; returns (E, N)."""
    check_tensor("b_fp8", b_fp8, dtypes=(FP8_DTYPE,), ndim=3, contiguous=True)
    num_experts, n, kb = b_fp8.shape
    if kb != k:
        raise ValueError(f"b_fp8: K ({kb}) must equal the activations' K ({k})")
    check_tensor(
        "b_scale", b_scale, dtypes=(torch.float32,), shape=(num_experts, -(-n // 128), k // BLOCK_K), contiguous=True
    )
    return num_experts, n


@lru_cache(maxsize=1024)
def _kernel_and_grid(
    m: int,
    n: int,
    k: int,
    cfg: ContiguousConfig,
    masked_max_m: int,
    index: int,
    env_flags: tuple[str, ...],
    gather_a: bool = False,
    silu_quant: int = 0,
    direct_rows: bool = False,
):
    """The loaded kernel and its persistent grid for one (shape, config, device): built once, so
    a launch does no rendering, hashing or occupancy query (env_flags: part of the binary's key)."""
    spec = kernel_spec(
        n, k, cfg, masked_max_m=masked_max_m, gather_a=gather_a, silu_quant=silu_quant, direct_rows=direct_rows
    )
    kernel = driver.load_kernel(spec, index)
    grid = grid_size(m, n, cfg, _num_sms(index))
    if cfg.cluster > 1:  # GPCs may not hold num_sms / 2 resident pairs
        resident = kernel.max_active_clusters((NUM_THREADS, 1, 1), smem_bytes(cfg, direct_rows), (cfg.cluster, 1, 1))
        if resident > 0:
            grid = min(grid, resident * cfg.cluster)
    return kernel, grid


def layout_config(cfg: ContiguousConfig, masked_max_m: int) -> ContiguousConfig:
    """`cfg` for a launch on this layout: mixed pairs walk only the masked layout's live units, so
    elsewhere (a masked op's fallback on per-row ids, an override on the contiguous layout) they
    run as the A-sharing pairs their one-tile experts use."""
    if cfg.mixed_pairs and not masked_max_m:
        return dataclasses.replace(cfg, multicast="a")
    return cfg


def silu_config(cfg: ContiguousConfig) -> ContiguousConfig:
    """`cfg` for a kernel storing SiLU*up quant: a tile holds one 128-column group of gate and
    up each (block_n 256), CTA pairs (if any) sharing B."""
    if cfg.block_n == 256 and not cfg.shares_a:
        return cfg
    return ContiguousConfig(
        256,
        group_m=cfg.group_m,
        cluster=cfg.cluster,
        multicast="b",
        stream_k=cfg.stream_k,
        skip_padding_halves=cfg.skip_padding_halves,
    )


def launch(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    row_ids: torch.Tensor,
    out: torch.Tensor,
    *,
    config: ContiguousConfig | None,
    masked_max_m: int = 0,
    rows_in_use: torch.Tensor | None = None,
    a_rows: torch.Tensor | None = None,
    act_scale: torch.Tensor | None = None,
    ue8m0: bool = False,
    direct: tuple[torch.Tensor, torch.Tensor] | None = None,
    stream_k_workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Runs the kernel on checked operands (A `[M, K]`, out `[M, N]` 16-byte aligned, int32
    row_ids: per-row expert ids, or masked_m when masked_max_m > 0; rows_in_use: optional int32
    [1] on the device, the rows of A in use, so the tail past it is not walked). a_rows: int64
    `[M]` (contiguous layout): A holds token rows `[T, K]` and layout row r reads A[a_rows[r]]
    (-1: padding); M is then row_ids' length, and a config whose CTA pairs share A is replaced
    by the same config sharing B. act_scale: fp32 `[M, N / 256]` (GEMM1, N = 2I): the kernel
    stores FP8 silu(gate) * up into out (fp8 `[M, N / 2]`) and its scales (UE8M0 with ue8m0)
    into act_scale; the config then has 256-wide tiles (silu_config). direct: (pairs int32 `[M, 2]`,
    y bf16 `[T, N]`): a row whose pair (token, weight bits) has token >= 0 is stored as
    bf16(weight * bf16(its sum)) into y[token] instead of out (`kernel_spec`'s direct_rows; not
    checked here: `kernels/direct_rows.py` fills the pairs). stream_k_workspace (a config with
    stream_k): a `stream_k_workspace` buffer for at least this launch's grid, kept by the caller
    for launches on one stream (the kernel leaves its flags zero); None: the one kept for the
    current stream (`kept_stream_k_workspace`)."""
    m, k = a_fp8.shape
    if a_rows is not None:
        m = row_ids.shape[0]
    n = b_fp8.shape[1]
    if masked_max_m and m // masked_max_m > MAX_MASKED_EXPERTS:  # the kernel's live-tile table
        raise ValueError(
            f"row_ids: the CUDA masked GEMM serves at most {MAX_MASKED_EXPERTS} experts, got {m // masked_max_m}"
        )
    dev = a_fp8.device
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if a_scale.data_ptr() % 16:  # the scale warp copies 16-byte runs of a row (a view at an odd offset)
        a_scale = a_scale.clone()
    gpu = None if config is not None else device_name(dev)  # the name only picks a config when none is given
    cfg = layout_config(
        select_config(m, n, _num_sms(index), override=config, verbose=print_config(), k=k, device_name=gpu),
        masked_max_m,
    )
    check_paired_tiles(m, cfg, masked_max_m)
    if a_rows is not None and cfg.shares_a:  # gathered rows are not multicast
        cfg = dataclasses.replace(cfg, multicast="b")
    silu_quant = 0
    if act_scale is not None:
        cfg, silu_quant = silu_config(cfg), 2 if ue8m0 else 1
    with torch.cuda.device(index):
        kernel, grid = _kernel_and_grid(
            m, n, k, cfg, masked_max_m, index, jit.env_flags(), a_rows is not None, silu_quant, direct is not None
        )
        stream = torch.cuda.current_stream(dev).cuda_stream
        workspace = None
        if cfg.stream_k:
            given = stream_k_workspace if stream_k_workspace is not None else kept_stream_k_workspace(dev, stream)
            workspace = stream_k_workspace_for(grid, cfg.block_n, dev, given)
        kernel.launch(
            grid=(grid, 1, 1),
            block=(NUM_THREADS, 1, 1),
            smem=smem_bytes(cfg, direct is not None),
            stream=stream,
            params=kernel_args(
                a_fp8, a_scale, b_fp8, b_scale, row_ids, out, cfg, rows_in_use, a_rows, act_scale, direct, workspace
            ),
            cluster=(cfg.cluster, 1, 1),
        )
    return out
