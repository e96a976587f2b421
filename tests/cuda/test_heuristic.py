"""The config the CUDA grouped GEMM runs (CPU only): `ContiguousConfig`'s checks and defaults,
the contiguous formula on the DeepSeek-V3 cells, and the masked decode configs."""

from __future__ import annotations

import pytest
import torch

from moe_backend.cuda import config as cfgmod
from moe_backend.cuda.config import BLOCK_N_CHOICES, ContiguousConfig, max_stages
from moe_backend.cuda.heuristic import GROUP_M, HEURISTIC_BLOCK_N, select_config, select_masked_config
from moe_backend.cuda.launch import kernel_spec


def test_every_tile_fits_shared_memory_and_defaults_to_a_full_ring():
    for bn in BLOCK_N_CHOICES:
        stages = max_stages(bn)
        cfg = ContiguousConfig(bn)
        assert cfg.num_stages == stages >= 4 and cfg.smem_bytes <= cfgmod.SMEM_LIMIT
        with pytest.raises(ValueError, match="config.num_stages"):
            ContiguousConfig(bn, stages + 1)
    assert (max_stages(64), max_stages(128), max_stages(192), max_stages(256)) == (6, 6, 5, 4)


@pytest.mark.parametrize(
    "field,value", [("block_n", 96), ("num_stages", 1), ("group_m", 0), ("cluster", 4), ("multicast", "c")]
)
def test_config_fields_are_checked(field, value):
    args = {"block_n": 128, field: value}
    with pytest.raises(ValueError, match=f"config.{field}"):
        ContiguousConfig(**args)


def test_config_override_wins():
    cfg = ContiguousConfig(64, 3)
    assert select_config(10_000, 4096, 132, override=cfg) is cfg


def test_heuristic_on_the_deepseek_cells():
    # 256-wide tiles where K is long, CTA pairs sharing B once there are 8 M tiles to pair
    for m, n, k in [(32 * 512, 4096, 7168), (32 * 4096, 7168, 2048), (256 * 512, 512, 7168)]:
        cfg = select_config(m, n, 132, k=k)
        assert (cfg.block_n, cfg.cluster, cfg.multicast, cfg.num_stages) == (256, 2, "b", 4), cfg
    cfg = select_config(256 * 512, 7168, 132, k=None)  # unknown K: 128
    assert (cfg.block_n, cfg.cluster) == (128, 2), cfg
    for m in (256 * 64, 256 * 512):  # two K blocks (TP8 w2): 192-wide tiles in pairs from 64 rows per expert
        cfg = select_config(m, 7168, 132, k=256)
        assert (cfg.block_n, cfg.cluster, cfg.num_stages) == (192, 2, 5), cfg
    assert select_config(256 * 512, 7168, 132, k=2048).block_n == 256  # long K: never 192
    # M tiles swept together: the default on the EP8 cells; only the pair's own where N has two
    # tiles (TP8 w13, N = 512) or K two blocks (TP8 w2, K = 256)
    assert select_config(32 * 512, 4096, 132, k=7168).group_m == GROUP_M == 8
    assert select_config(32 * 4096, 7168, 132, k=2048).group_m == 8
    assert select_config(256 * 512, 512, 132, k=7168).group_m == 2
    assert select_config(256 * 512, 7168, 132, k=256).group_m == 2
    assert select_config(256 * 512, 7168, 132, k=None).group_m == 8  # K unknown: the default
    small = select_config(128, 4096, 132, k=7168)  # one M tile: 64-wide tiles give every SM work
    assert (small.block_n, small.cluster) == (64, 1), small


@pytest.mark.parametrize(
    "m,n", [(128, 4096), (32 * 512, 4096), (32 * 4096, 7168), (256 * 512, 512), (1, 7168), (5 * 128, 256)]
)
@pytest.mark.parametrize("k", [256, 7168])
def test_heuristic_fills_the_machine(m, n, k):
    cfg = select_config(m, n, num_sms=132, k=k)
    assert cfg.block_n in HEURISTIC_BLOCK_N
    tiles = -(-m // 128) * -(-n // cfg.block_n)
    # Never fewer tiles than the smallest choice would give while SMs sit idle in a single wave.
    smallest = min(HEURISTIC_BLOCK_N)
    if tiles < 132:
        assert cfg.block_n == smallest or -(-m // 128) * -(-n // smallest) <= tiles


def test_config_choice_printed_once(capsys):
    select_config(4096, 4096, 132, verbose=True)
    select_config(4096, 4096, 132, verbose=True)
    assert capsys.readouterr().out.count("grouped_gemm_contiguous m=4096 N=4096") == 1


@pytest.mark.parametrize("n,k", [(7168, 256), (4096, 7168), (512, 7168), (7168, 2048)])
def test_masked_decode_configs_walk_m_tile_major(n, k):
    """The masked configs walk the dense list of live units (scheduler.cuh, kDenseMaskedWalk:
    group_m 1, one M tile per unit)."""
    cfg = select_masked_config(n, k)
    assert cfg.group_m == 1 and (cfg.cluster == 1 or cfg.multicast in ("a", "mixed"))


def test_masked_configs_per_shape():
    wide, narrow, short_k = (
        select_masked_config(7168, 2048),
        select_masked_config(512, 7168),
        select_masked_config(7168, 256),
    )
    assert (wide.block_n, wide.cluster, wide.multicast, wide.group_m) == (192, 2, "mixed", 1)
    assert select_masked_config(4096, 7168) == ContiguousConfig(
        256, num_stages=3, group_m=1, cluster=2, multicast="mixed"
    )
    assert (narrow.block_n, narrow.cluster, narrow.multicast) == (256, 2, "a")
    assert (short_k.block_n, short_k.cluster) == (64, 1)


@pytest.mark.parametrize("gpu", ["NVIDIA H100 80GB HBM3", "NVIDIA H100 NVL"])
def test_masked_wide_pairs_on_the_h100(gpu):
    """On an H100 the masked GEMMs with long K (EP8's, TP8's w13) take 256-wide pairs with 3 stages:
    mixed pairs for EP8's wide GEMMs (EP8 w2 too, 192-wide elsewhere), A-sharing ones for TP8's w13
    (N = 512); the H200, an unnamed GPU and the short-K shape keep their configs."""
    wide = select_masked_config(7168, 2048, gpu)
    assert (wide.block_n, wide.num_stages, wide.cluster, wide.multicast, wide.group_m) == (256, 3, 2, "mixed", 1)
    assert select_masked_config(4096, 7168, gpu) == wide
    for other in ("NVIDIA H200", None):
        assert select_masked_config(7168, 2048, other) == select_masked_config(7168, 2048)
        assert select_masked_config(7168, 2048, other).block_n == 192
        assert select_masked_config(4096, 7168, other) == wide
    assert select_masked_config(512, 7168, gpu) == ContiguousConfig(
        256, num_stages=3, group_m=1, cluster=2, multicast="a"
    )
    assert select_masked_config(512, 7168, "NVIDIA H200") == select_masked_config(512, 7168)
    assert select_masked_config(512, 7168, "NVIDIA H200").num_stages != 3
    assert select_masked_config(7168, 256, gpu) == select_masked_config(7168, 256)


@pytest.mark.parametrize("gpu", ["NVIDIA H100 80GB HBM3", "NVIDIA H100 NVL"])
def test_short_k_ring_on_the_h100(gpu):
    """On an H100 the short-K GEMM (TP8 w2, two K blocks) runs its 192-wide pairs on a 3-stage ring,
    each pair walking its own M tiles; the H200 and an unnamed GPU keep the full ring, and the
    long-K GEMMs keep their configs on every GPU."""
    for m in (256 * 64, 256 * 512):
        cfg = select_config(m, 7168, 132, k=256, device_name=gpu)
        assert (cfg.block_n, cfg.cluster, cfg.multicast, cfg.num_stages, cfg.group_m) == (192, 2, "b", 3, 1), cfg
        for other in ("NVIDIA H200", None):
            assert select_config(m, 7168, 132, k=256, device_name=other) == select_config(m, 7168, 132, k=256)
            assert select_config(m, 7168, 132, k=256, device_name=other).num_stages == 5
    for m, n, k in [(32 * 512, 4096, 7168), (32 * 4096, 7168, 2048), (256 * 512, 512, 7168)]:
        assert select_config(m, n, 132, k=k, device_name=gpu) == select_config(m, n, 132, k=k)


def test_the_plan_passes_the_gpu_to_the_contiguous_config(monkeypatch):
    from moe_backend.cuda import grouped_gemm_contiguous
    from moe_backend.dispatch import gemm_choice
    from moe_backend.kernels import _launch_utils

    monkeypatch.setattr(grouped_gemm_contiguous, "_num_sms", lambda index: 132)

    monkeypatch.setattr(_launch_utils, "device_name", lambda device: "NVIDIA H100 80GB HBM3")
    cfg = gemm_choice._cuda_config("contiguous", 256 * 512, 7168, 256, torch.device("cuda", 0))
    assert (cfg.num_stages, cfg.group_m) == (3, 1)
    monkeypatch.setattr(_launch_utils, "device_name", lambda device: "NVIDIA H200")
    assert gemm_choice._cuda_config("contiguous", 256 * 512, 7168, 256, torch.device("cuda", 0)).num_stages == 5


def test_the_plan_passes_the_gpu_to_the_masked_config(monkeypatch):
    from moe_backend.dispatch import gemm_choice
    from moe_backend.kernels import _launch_utils

    monkeypatch.setattr(_launch_utils, "device_name", lambda device: "NVIDIA H100 80GB HBM3")
    cfg = gemm_choice._cuda_config("masked", 128, 7168, 2048, torch.device("cuda", 0))
    assert cfg.block_n == 256 and cfg.num_stages == 3
    monkeypatch.setattr(_launch_utils, "device_name", lambda device: "NVIDIA H200")
    assert gemm_choice._cuda_config("masked", 128, 7168, 2048, torch.device("cuda", 0)).block_n == 192


def test_masked_max_m_is_checked_and_keys_the_kernel():
    cfg = ContiguousConfig(128)
    with pytest.raises(ValueError, match="masked_max_m"):
        kernel_spec(7168, 2048, cfg, masked_max_m=100)
    names = {kernel_spec(7168, 2048, cfg, masked_max_m=mm).kernel_name for mm in (0, 128, 256)}
    assert len(names) == 3


def test_every_field_keys_the_kernel():
    base = ContiguousConfig(128)
    variants = [
        ContiguousConfig(256),
        ContiguousConfig(128, 4),
        ContiguousConfig(128, group_m=1),
        ContiguousConfig(128, cluster=2),
        ContiguousConfig(128, cluster=2, multicast="a"),
    ]
    names = {kernel_spec(7168, 2048, c).kernel_name for c in [base, *variants]}
    assert len(names) == 1 + len(variants)
