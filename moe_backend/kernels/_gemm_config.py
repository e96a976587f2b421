"""Block sizes for the FP8 grouped GEMM: tuned table first, formula otherwise, override always.

Tables are data, one JSON per kernel and device (`configs/<kernel>_<device>.json`, device name as
`torch.cuda.get_device_name()` with spaces -> `_`), written by `python -m moe_backend tune`:
    {"meta": {...}, "N=4096,K=7168": {"4": {cfg}, "16": {cfg}, ...}, ...}
keyed by the weight shape, then by rows per expert (`m`); a call takes the smallest tuned `m` at
or above its own (the largest past the end). A Hopper GPU without its own table (H800, H100 PCIe, ...)
uses the H100 table: same SM generation, and a tuned tile beats the formula there far more often
than the bandwidth difference moves the optimum; `python -m moe_backend tune` writes its own.
`MOE_BACKEND_PRINT_CONFIG=1` prints each new choice and where it came from.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from moe_backend.env import ENV

CONFIG_DIR = Path(__file__).with_name("configs")
KERNELS = ("grouped_gemm_masked", "grouped_gemm_contiguous")
_KEYS = (
    "BLOCK_M",
    "BLOCK_N",
    "GROUP_M",
    "SWAP_AB",
    "K_UNROLL",
    "N_LOOP",
    "TMA",
    "PROGRAMS",
    "SPLIT_K",
    "SPLIT_MIN_UNITS",
    "NARROW_M",
    "num_warps",
    "num_stages",
)
_printed: set = set()
HOPPER_FALLBACK_DEVICE = "NVIDIA H100 80GB HBM3"


def device_file_name(device_name: str) -> str:
    return device_name.replace(" ", "_").replace("/", "_")


def table_path(kernel: str, device_name: str) -> Path:
    return CONFIG_DIR / f"{kernel}_{device_file_name(device_name)}.json"


@lru_cache(maxsize=None)
def load_table(kernel: str, device_name: str) -> dict:
    path = table_path(kernel, device_name)
    if not path.exists():
        return {}
    with open(path) as f:
        table = json.load(f)
    return {key: {int(m): cfg for m, cfg in by_m.items()} for key, by_m in table.items() if key != "meta"}


def table_for(kernel: str, device_name: str) -> tuple[dict, str]:
    """The tuned table a device's configs come from, and whose it is: its own, else (another
    Hopper without one) the H100's."""
    table = load_table(kernel, device_name)
    if not table and device_name.startswith("NVIDIA H") and device_name != HOPPER_FALLBACK_DEVICE:
        return load_table(kernel, HOPPER_FALLBACK_DEVICE), HOPPER_FALLBACK_DEVICE
    return table, device_name


def formula(m: int, n: int, k: int, *, masked: bool) -> dict:
    """Rows per expert `m` -> config. Few rows: the GEMM streams weights (memory-bound), so one
    m-tile covers all of an expert's rows and many n-tiles keep every SM loading; many rows: the
    largest tiles the tensor cores and shared memory take."""
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=128, GROUP_M=1, SWAP_AB=False, num_warps=4, num_stages=4)
    if m <= 32:
        return dict(BLOCK_M=32, BLOCK_N=128, GROUP_M=1, SWAP_AB=False, num_warps=4, num_stages=4)
    if m <= 64:
        return dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=1, SWAP_AB=False, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, SWAP_AB=False, num_warps=8, num_stages=3)


def check_config(cfg: dict, *, max_block_m: int | None = None) -> dict:
    """Validates an override or table entry; returns it with defaults filled in."""
    if not isinstance(cfg, dict):
        raise TypeError(f"config: expected a dict, got {type(cfg).__name__}")
    unknown = set(cfg) - set(_KEYS)
    if unknown:
        raise ValueError(f"config: unknown keys {sorted(unknown)}; allowed {list(_KEYS)}")
    # PROGRAMS: the persistent walk's grid size (masked; contiguous with num_rows); 0 = the programs
    # the GPU holds at once (the launcher's count), an override for tests and sweeps.
    full = {
        "GROUP_M": 1,
        "SWAP_AB": False,
        "K_UNROLL": 1,
        "N_LOOP": 1,
        "TMA": False,
        "PROGRAMS": 0,
        "SPLIT_K": 1,
        "SPLIT_MIN_UNITS": 0,
        "NARROW_M": 0,
        **cfg,
    }
    for key in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"):
        if key not in full:
            raise ValueError(f"config: missing {key}")
    bm, bn = full["BLOCK_M"], full["BLOCK_N"]
    if bm < 16 or bm & (bm - 1) or bn < 16 or bn & (bn - 1):
        raise ValueError(f"config: BLOCK_M and BLOCK_N must be powers of two >= 16, got {bm}, {bn}")
    if full["K_UNROLL"] not in (1, 2, 4):
        raise ValueError(f"config: K_UNROLL must be 1, 2 or 4, got {full['K_UNROLL']}")
    if full["N_LOOP"] not in (1, 2, 4, 8, 16):
        raise ValueError(f"config: N_LOOP must be 1, 2, 4, 8 or 16, got {full['N_LOOP']}")
    # SPLIT_K: K cut into up to that many slices computed by separate units (fp32 partial sums,
    # contiguous layout), fewer where the tiles holding rows already give SPLIT_MIN_UNITS units
    # (0: always SPLIT_K); the plan sets both for decode batches whose few tiles leave SMs idle.
    if full["SPLIT_K"] not in (1, 2, 4, 8):
        raise ValueError(f"config: SPLIT_K must be 1, 2, 4 or 8, got {full['SPLIT_K']}")
    if not isinstance(full["SPLIT_MIN_UNITS"], int) or full["SPLIT_MIN_UNITS"] < 0:
        raise ValueError(f"config: SPLIT_MIN_UNITS must be an int >= 0, got {full['SPLIT_MIN_UNITS']!r}")
    if not isinstance(full["PROGRAMS"], int) or full["PROGRAMS"] < 0:
        raise ValueError(
            f"config: PROGRAMS must be an int >= 0 (0 = as many as the GPU holds), got {full['PROGRAMS']!r}"
        )
    # NARROW_M (masked layout): an m-tile holding at most that many rows runs that wide, the others
    # BLOCK_M wide, so one kernel covers a hot expert's rows in few passes over its weight tile and
    # the many experts near the mean rows in narrow ones. Pointer loads only: a TMA box is BLOCK_M rows.
    narrow = full["NARROW_M"]
    if not isinstance(narrow, int) or (narrow and (narrow < 16 or narrow & (narrow - 1) or narrow >= bm)):
        raise ValueError(f"config: NARROW_M must be 0 or a power of two >= 16 below BLOCK_M ({bm}), got {narrow!r}")
    if narrow and full["TMA"]:
        raise ValueError("config: NARROW_M needs pointer loads (TMA=False): a TMA box holds BLOCK_M rows")
    if max_block_m is not None and max_block_m % bm:
        raise ValueError(f"config: BLOCK_M ({bm}) must divide the contiguous alignment ({max_block_m})")
    return full


def get_config(
    kernel: str,
    m: int,
    n: int,
    k: int,
    device_name: str,
    *,
    masked: bool,
    override: dict | None = None,
    max_block_m: int | None = None,
) -> dict:
    if override is not None:
        cfg, source = override, "override"
    else:
        table, table_device = table_for(kernel, device_name)
        by_m = table.get(f"N={n},K={k}")
        if by_m:
            keys = sorted(by_m)
            pick = next((key for key in keys if key >= m), keys[-1])
            cfg = by_m[pick]
            source = f"table m={pick}" + ("" if table_device == device_name else f" of {table_device}")
        else:
            cfg, source = formula(m, n, k, masked=masked), "formula"
    cfg = check_config(cfg, max_block_m=max_block_m)
    if max_block_m is not None and cfg["BLOCK_M"] > max_block_m:
        cfg["BLOCK_M"] = max_block_m
    if ENV.print_config:
        tag = (kernel, m, n, k, source)
        if tag not in _printed:
            _printed.add(tag)
            print(f"[moe_backend] {kernel} m={m} N={n} K={k} on {device_name}: {source} -> {cfg}", flush=True)
    return cfg
