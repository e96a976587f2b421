"""The launcher on CPU: argument checks naming the argument, the public API, the tensor maps and
parameter bytes against the kernel's signature (sizes read from the cubin when a toolkit is
here), and the driver plumbing (launch config, load memo) with the driver calls stubbed."""

from __future__ import annotations

import ctypes
import dataclasses
import inspect
import re
import subprocess
from pathlib import Path

import pytest
import torch

from moe_backend.cuda import driver, jit, launch
from moe_backend.cuda import grouped_gemm_contiguous as ggc
from moe_backend.cuda.config import ContiguousConfig
from moe_backend.cuda.launch import kernel_spec

try:
    jit.find_nvcc()
    HAVE_NVCC = True
except jit.JITError:
    HAVE_NVCC = False
CUOBJDUMP = jit.find_cuobjdump()


def _operands(m=256, n=256, k=256, e=2, device="cpu"):
    a = torch.zeros(m, k, device=device).to(torch.float8_e4m3fn)
    a_scale = torch.ones(m, k // 128, device=device)
    b = torch.zeros(e, n, k, device=device).to(torch.float8_e4m3fn)
    b_scale = torch.ones(e, -(-n // 128), k // 128, device=device)
    ids = torch.zeros(m, dtype=torch.int32, device=device)
    return a, a_scale, b, b_scale, ids


@pytest.mark.parametrize(
    "arg,bad,exc",
    [
        ("a_fp8", lambda o: o[0].float(), TypeError),
        ("a_fp8", lambda o: o[0][:, :200], ValueError),
        ("a_scale", lambda o: o[1][:, :1], ValueError),
        ("b_fp8", lambda o: o[2][:, :, :128], ValueError),
        ("b_scale", lambda o: o[3].double(), TypeError),
        ("expert_ids", lambda o: o[4].float(), TypeError),
        ("expert_ids", lambda o: o[4][:10], ValueError),
    ],
)
def test_launcher_errors_name_the_argument(arg, bad, exc):
    ops = list(_operands())
    ops[["a_fp8", "a_scale", "b_fp8", "b_scale", "expert_ids"].index(arg)] = bad(ops)
    with pytest.raises(exc, match=arg):
        ggc.grouped_gemm_contiguous(*ops)


def test_launcher_rejects_cpu_tensors_and_bad_out():
    ops = _operands()
    with pytest.raises(ValueError, match="a_fp8: the CUDA kernel needs a CUDA tensor"):
        ggc.grouped_gemm_contiguous(*ops)
    with pytest.raises(TypeError, match="out"):
        ggc.grouped_gemm_contiguous(*ops, out=torch.empty(256, 256))


def test_public_api():
    assert set(ggc.__all__) == {"grouped_gemm_contiguous", "ContiguousConfig", "select_config", "kernel_spec"}
    from moe_backend import reference

    ref = list(inspect.signature(reference.grouped_gemm_contiguous).parameters)
    assert list(inspect.signature(ggc.grouped_gemm_contiguous).parameters)[: len(ref)] == ref


class _FakeDriver:
    """Stands in for cuda.bindings.driver: records cuTensorMapEncodeTiled's arguments."""

    class CUresult:
        CUDA_SUCCESS = 0

    class _Enum:
        def __getattr__(self, name):
            return name

    CUtensorMapDataType = CUtensorMapInterleave = CUtensorMapSwizzle = _Enum()
    CUtensorMapL2promotion = CUtensorMapFloatOOBfill = _Enum()

    def __init__(self):
        self.maps = []

    @staticmethod
    def cuuint64_t(x):
        return x

    cuuint32_t = cuuint64_t

    def cuTensorMapEncodeTiled(
        self, dtype, rank, ptr, dims, strides, box, elem_strides, interleave, swizzle, promotion, oob
    ):
        self.maps.append(
            dict(dtype=dtype, rank=rank, ptr=ptr, dims=dims, strides=strides, box=box, swizzle=swizzle, oob=oob)
        )

        class _Map:
            opaque = [len(self.maps)] * 16

        return 0, _Map()


def _kparam_sizes(cubin: Path, kernel: str) -> list[int]:
    """Parameter sizes by ordinal, read from the cubin's EIATTR_KPARAM_INFO records."""
    elf = subprocess.run([CUOBJDUMP, "-elf", str(cubin)], capture_output=True, text=True, check=True).stdout
    section = elf[elf.index(f".nv.info.{kernel}") :]
    found = {
        int(o, 16): int(sz, 16)
        for o, sz in re.findall(
            r"Ordinal\s*:\s*(0x[0-9a-f]+)\s+Offset\s*:\s*0x[0-9a-f]+\s+Size\s*:\s*(0x[0-9a-f]+)", section
        )
    }
    return [found[i] for i in range(len(found))]


def test_kernel_args_match_the_kernel_signature(cache, monkeypatch):
    """The launcher's tensor maps and parameter bytes, checked on CPU tensors with a fake driver,
    against the parameter sizes nvcc recorded in the cubin (when a toolkit is here)."""
    fake = _FakeDriver()
    monkeypatch.setattr(driver, "bindings", lambda: fake)
    launch._tma_param_for.cache_clear()  # maps are cached by their arguments: build them afresh here
    m, n, k, e = 300, 1001, 384, 3
    a, a_scale, b, b_scale, ids = _operands(m, n, k, e)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    cfg = ContiguousConfig(128, 4)
    args = launch.kernel_args(a, a_scale, b, b_scale, ids, out, cfg)
    map_a, map_b = fake.maps
    assert map_a["dims"] == [k, m] and map_a["strides"] == [k] and map_a["box"] == [128, 128]
    assert map_b["dims"] == [k, n, e] and map_b["strides"] == [k, n * k] and map_b["box"] == [128, 128, 1]
    assert map_a["swizzle"] == map_b["swizzle"] == "CU_TENSOR_MAP_SWIZZLE_128B"
    assert map_a["ptr"] == a.data_ptr() and map_b["ptr"] == b.data_ptr()
    assert [a.value for a in args[2:]] == [
        a_scale.data_ptr(),
        b_scale.data_ptr(),
        ids.data_ptr(),
        out.data_ptr(),
        m,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ]  # no row count, no gathered rows, no SiLU*up scales, no direct rows, no stream-K workspace
    rows_in_use = torch.tensor([128], dtype=torch.int32)
    with_count = launch.kernel_args(a, a_scale, b, b_scale, ids, out, cfg, rows_in_use=rows_in_use)
    assert with_count[7].value == rows_in_use.data_ptr()
    # Gathered A: token rows [T, K] behind the layout's rows; m is the layout's, A read by pointer.
    tokens = a[:7]
    src = torch.full((m,), -1, dtype=torch.int64)
    gathered = launch.kernel_args(tokens, a_scale[:7], b, b_scale, ids, out, cfg, a_rows=src)
    assert bytes(gathered[0]) == bytes(gathered[1])  # tmap_a unread: B's map keeps the prefetch valid
    assert gathered[6].value == m and gathered[8].value == src.data_ptr() and gathered[9].value == tokens.data_ptr()
    # SiLU*up quant epilogue (N = 2I): B in 128-row boxes (gate half, up half), then the scales' pointer.
    act_scale = torch.empty(m, 2, dtype=torch.float32)
    silu = launch.kernel_args(a, a_scale, b[:, :512], b_scale, ids, out, ContiguousConfig(256), act_scale=act_scale)
    assert fake.maps[-1]["box"] == [128, 128, 1] and silu[10].value == act_scale.data_ptr()
    # Direct rows: the rows' (token, weight) pairs and the layer's output, last.
    direct_pairs, layer_out = torch.empty(m, 2, dtype=torch.int32), torch.empty(7, n, dtype=torch.bfloat16)
    direct = launch.kernel_args(a, a_scale, b, b_scale, ids, out, cfg, direct=(direct_pairs, layer_out))
    assert [p.value for p in direct[-3:-1]] == [direct_pairs.data_ptr(), layer_out.data_ptr()]
    # Stream-K: the workspace, last.
    workspace = launch.stream_k_workspace(torch.device("cpu"), 4)
    sk_cfg = ContiguousConfig(128, 4, stream_k=True)
    assert launch.kernel_args(a, a_scale, b, b_scale, ids, out, sk_cfg, stream_k=workspace)[-1].value == (
        workspace.data_ptr()
    )
    assert launch.num_tiles(m, n, cfg) == 3 * 8
    pairs = launch.kernel_args(a, a_scale, b, b_scale, ids, out, ContiguousConfig(128, cluster=2, multicast="a"))
    assert fake.maps[-1]["box"] == [128, 64]  # A loaded in halves, one per CTA (B's map is the cached one)
    assert len(pairs) == len(args)
    if not HAVE_NVCC or CUOBJDUMP is None:
        pytest.skip("no nvcc/cuobjdump to read the kernel's parameter sizes")
    spec = kernel_spec(n, k, cfg)
    assert _kparam_sizes(jit.compile_cubin(spec), spec.kernel_name) == [ctypes.sizeof(p) for p in args]


def test_stream_k_launch_side():
    """Stream-K on the host: which kernels may take it (errors name config.stream_k), the chunk
    the kernel cuts at, a grid over every SM, and a workspace whose flags start at zero."""
    cfg = ContiguousConfig(256, cluster=2, stream_k=True)
    assert kernel_spec(4096, 7168, cfg).kernel_name.endswith("_sk")
    assert kernel_spec(4096, 7168, cfg).constants["STREAM_K"] == 1
    assert kernel_spec(4096, 7168, ContiguousConfig(256)).constants["STREAM_K"] == 0
    assert kernel_spec(512, 7168, ContiguousConfig(256, cluster=2, stream_k=True), gather_a=True).constants["STREAM_K"]
    assert kernel_spec(7168, 2048, ContiguousConfig(128, 6, stream_k=True), direct_rows=True).constants["STREAM_K"]
    with pytest.raises(ValueError, match="config.stream_k with direct_rows"):  # 12 K blocks: chunks of 4 < 6 stages
        kernel_spec(7168, 1536, ContiguousConfig(128, 6, stream_k=True), direct_rows=True)
    # the masked layout's dense walk and A-sharing pairs take it
    masked = ContiguousConfig(128, group_m=1, cluster=2, multicast="a", stream_k=True)
    assert kernel_spec(4096, 7168, masked, masked_max_m=1024).kernel_name.endswith("_sk")
    with pytest.raises(ValueError, match="config.stream_k"):  # 3 K blocks: chunks of 1 < chains of 2
        kernel_spec(4096, 384, cfg)
    with pytest.raises(TypeError, match="config.stream_k"):
        ContiguousConfig(128, stream_k=1)
    # K blocks per chunk: the a_scale chunk (8 / 4 / 2 / 1), 0 where it is shorter than a chain.
    assert launch.stream_k_chunk(7168, 256) == 8 and launch.stream_k_chunk(2048, 128) == 8
    assert launch.stream_k_chunk(256, 192) == 2 and launch.stream_k_chunk(384, 128) == 0
    assert launch.stream_k_chunk(768, 256) == 2 and launch.stream_k_chunk(768, 128) == 0
    # The grid: every SM in whole clusters, however few tiles (a small pool spreads over all).
    assert launch.grid_size(128, 4096, cfg, 132) == 132
    assert launch.grid_size(128, 4096, ContiguousConfig(256, cluster=2), 132) == 32  # 16 pair units
    assert launch.grid_size(128, 4096, ContiguousConfig(128, stream_k=True), 133) == 133
    cpu = torch.device("cpu")
    workspace = launch.stream_k_workspace(cpu, 6)  # the flag area first, then 6 slots of the widest tile
    flags = launch.STREAM_K_FLAG_WORDS
    assert workspace.dtype == torch.float32 and workspace.numel() == flags + 6 * 128 * 256
    assert torch.equal(workspace[:flags].view(torch.int32), torch.zeros(flags, dtype=torch.int32))
    assert launch.stream_k_workspace_for(6, 128, cpu, workspace) is workspace  # narrower tiles fit too
    assert launch.stream_k_workspace_for(3, 64, cpu, None).numel() == flags + 3 * 128 * 256
    with pytest.raises(ValueError, match="stream_k_workspace"):
        launch.stream_k_workspace_for(7, 256, cpu, workspace)  # 7 CTAs' slots do not fit
    with pytest.raises(ValueError, match="stream_k_workspace"):
        launch.stream_k_workspace_for(6, 256, cpu, workspace.double())
    with pytest.raises(ValueError, match="num_ctas"):
        launch.stream_k_workspace(cpu, launch.STREAM_K_MAX_CTAS + 1)
    # The rendered source names the kernel's template argument, and only the stream-K one sets it.
    assert (
        "GroupedGemmContiguous<4096, 7168, 256, 4, 8, 2, 0, 0, 0, 0, 0, 1, 0, 0>" in kernel_spec(4096, 7168, cfg).source
    )


def test_masked_pairs_sharing_b_tile_limit():
    """The masked layout's walk of live tile pairs packs two tile indices in one int: more M tiles
    than it can pack are refused, naming the argument; A-sharing pairs, single CTAs and the
    contiguous layout have no such limit."""
    pairs_b = ContiguousConfig(128, group_m=1, cluster=2)
    limit = launch.MAX_PAIRED_TILES * 128
    launch.check_paired_tiles(limit, pairs_b, 1024)
    with pytest.raises(ValueError, match=r"row_ids: .* at most 65535 M tiles"):
        launch.check_paired_tiles(limit + 1024, pairs_b, 1024)
    launch.check_paired_tiles(limit + 1024, ContiguousConfig(128, group_m=1, cluster=2, multicast="a"), 1024)
    launch.check_paired_tiles(limit + 1024, ContiguousConfig(128, group_m=1), 1024)
    launch.check_paired_tiles(limit + 1024, pairs_b, 0)


def test_masked_pairs_sharing_b_refuse_stream_k():
    """The walk of live tile pairs deals whole units only (a cut unit left rows unwritten on the
    GPU): stream-K with it is refused, naming the argument; stream-K stays open to the mixed pairs
    (one expert per unit), A-sharing pairs, single CTAs, group_m >= 4 (the grouped walk) and the
    contiguous layout."""
    sk_pairs_b = ContiguousConfig(128, group_m=1, cluster=2, stream_k=True)
    assert launch.paired_live_walk(sk_pairs_b, 1024)
    with pytest.raises(ValueError, match=r"config.stream_k: CTA pairs sharing B"):
        launch.check_paired_tiles(4096, sk_pairs_b, 1024)
    launch.check_paired_tiles(4096, ContiguousConfig(128, group_m=1, cluster=2, multicast="a", stream_k=True), 1024)
    launch.check_paired_tiles(4096, ContiguousConfig(128, group_m=1, stream_k=True), 1024)
    sk_mixed = ContiguousConfig(256, num_stages=3, group_m=1, cluster=2, multicast="mixed", stream_k=True)
    assert launch.paired_live_walk(sk_mixed, 1024)
    launch.check_paired_tiles(4096, sk_mixed, 1024)
    grouped = ContiguousConfig(128, group_m=4, cluster=2, stream_k=True)
    assert not launch.paired_live_walk(grouped, 1024)
    launch.check_paired_tiles(4096, grouped, 1024)
    launch.check_paired_tiles(4096, sk_pairs_b, 0)


def test_launch_passes_grid_cluster_and_param_pointers(monkeypatch):
    """CompiledKernel.launch with cuda-python's real structs and the two driver calls stubbed:
    the config carries grid, block, smem, stream and a 1x1x1 cluster; kernelParams is a void*[]
    of the parameters' addresses."""
    bindings = pytest.importorskip("cuda.bindings.driver")
    import threading

    seen = {}

    def set_attr(function, attr, value):
        seen["attr"] = (function, attr, value)
        return (bindings.CUresult.CUDA_SUCCESS,)

    def launch(config, function, params, extra):
        seen["grid"] = (config.gridDimX, config.gridDimY, config.gridDimZ)
        seen["block"] = (config.blockDimX, config.blockDimY, config.blockDimZ)
        seen["smem"], seen["stream"] = config.sharedMemBytes, int(config.hStream)
        attr = config.attrs[0]
        seen["cluster"] = (attr.id, attr.value.clusterDim.x, attr.value.clusterDim.y, attr.value.clusterDim.z)
        seen["ptrs"] = list((ctypes.c_void_p * 3).from_address(params))
        return (bindings.CUresult.CUDA_SUCCESS,)

    monkeypatch.setattr(bindings, "cuFuncSetAttribute", set_attr)
    monkeypatch.setattr(bindings, "cuLaunchKernelEx", launch)
    kernel = object.__new__(driver.CompiledKernel)
    kernel.function, kernel._smem_attr, kernel._lock = "fn", 0, threading.Lock()
    kernel._launch_configs = {}
    params = [(ctypes.c_uint64 * 16)(), ctypes.c_uint64(7), ctypes.c_int32(3)]
    kernel.launch(grid=(132, 1, 1), block=(384, 1, 1), smem=200_000, stream=0xABC, params=params)
    assert len(kernel._launch_configs) == 1  # built once per (shape, stream), reused after
    kernel.launch(grid=(132, 1, 1), block=(384, 1, 1), smem=200_000, stream=0xABC, params=params)
    assert len(kernel._launch_configs) == 1
    assert seen["grid"] == (132, 1, 1) and seen["block"] == (384, 1, 1)
    assert seen["smem"] == 200_000 and seen["stream"] == 0xABC
    assert seen["attr"][2] == 200_000
    assert seen["cluster"] == (bindings.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION, 1, 1, 1)
    assert seen["ptrs"] == [ctypes.addressof(p) for p in params]


def test_load_kernel_is_memoized_per_device(monkeypatch, tmp_path):
    """The launch path compiles/loads once per (binary, device), then only looks up a dict."""
    calls = []
    cubin = tmp_path / "k.cubin"
    cubin.write_bytes(b"\x7fELF")
    monkeypatch.setattr(driver, "compile_cubin", lambda spec: calls.append("compile") or cubin)
    monkeypatch.setattr(driver, "_ensure_context", lambda index: calls.append(f"ctx{index}"))
    monkeypatch.setattr(driver, "CompiledKernel", lambda spec, data: ("loaded", spec.kernel_name, data))
    monkeypatch.setattr(driver, "_loaded", {})
    spec = jit.KernelSpec(family="fake", kernel_name="k", source="// kernel\n", include_dirs=())
    first = driver.load_kernel(spec, 0)
    assert driver.load_kernel(spec, 0) is first
    driver.load_kernel(spec, 1)
    assert calls == ["compile", "ctx0", "compile", "ctx1"]


def test_mixed_pairs_config_and_spec(monkeypatch):
    """The mixed pairs (per unit B shared by an expert's M tile pairs, or A by N tile pairs):
    a config of CTA pairs walking one M unit per group, on the masked layout only and at 2 N tiles
    or more, each refusal naming its argument; the kernel's MCAST_A is 2, both operands load in
    half-height boxes, and the tile-index limit of the packed pairs applies."""
    for bad in ({"cluster": 1}, {"cluster": 2, "group_m": 8}):
        with pytest.raises(ValueError, match="config.multicast: 'mixed'"):
            ContiguousConfig(128, multicast="mixed", **{"group_m": 1, **bad})
    with pytest.raises(ValueError, match="config.multicast: must be 'a', 'b' or 'mixed'"):
        ContiguousConfig(128, cluster=2, multicast="c")
    mixed = ContiguousConfig(128, group_m=1, cluster=2, multicast="mixed")
    assert mixed.mixed_pairs and not mixed.shares_a
    assert not ContiguousConfig(128, group_m=1, cluster=2, multicast="b").mixed_pairs
    spec = kernel_spec(4096, 7168, mixed, masked_max_m=1024)
    assert spec.constants["MCAST_A"] == 2 and "_ma2_" in spec.kernel_name
    with pytest.raises(ValueError, match="config.multicast: 'mixed' pairs walk the masked layout only"):
        kernel_spec(4096, 7168, mixed)
    with pytest.raises(ValueError, match="at least 2 N tiles"):
        kernel_spec(128, 7168, mixed, masked_max_m=256)
    assert launch.paired_live_walk(mixed, 1024)
    with pytest.raises(ValueError, match=r"row_ids: .* at most 65535 M tiles"):
        launch.check_paired_tiles(launch.MAX_PAIRED_TILES * 128 + 1024, mixed, 1024)
    fake = _FakeDriver()
    monkeypatch.setattr(driver, "bindings", lambda: fake)
    launch._tma_param_for.cache_clear()
    a, a_scale, b, b_scale, _ = _operands(256, 512, 256, 2)
    masked_m, out = torch.empty(2, dtype=torch.int32), torch.empty(256, 512, dtype=torch.bfloat16)
    launch.kernel_args(a, a_scale, b, b_scale, masked_m, out, mixed)
    assert [mp["box"] for mp in fake.maps] == [[128, 64], [128, 64, 1]]
    # elsewhere than on the masked layout (the masked op's fallback on per-row ids) they run as
    # A-sharing pairs; other configs and the masked layout keep theirs
    assert launch.layout_config(mixed, 0) == ContiguousConfig(128, group_m=1, cluster=2, multicast="a")
    assert launch.layout_config(mixed, 1024) is mixed
    pairs_b = ContiguousConfig(128, group_m=1, cluster=2)
    assert launch.layout_config(pairs_b, 0) is pairs_b
    # the grid covers a unit per M tile and pair of N tiles (5 one-tile experts at 3 N tiles: 10 units)
    assert launch.grid_size(5 * 128, 3 * 128, mixed, 132) == 20


def test_skipped_padding_halves_config_and_spec():
    """A config whose consumer warpgroups skip the MMAs of their all-padding halves: a bool, refused
    with stream-K (its pieces keep every MMA), each refusal naming the field; the kernel gets
    SKIP_HALVES 1 and a name of its own, and the SiLU*up quant epilogue's config keeps the flag."""
    with pytest.raises(TypeError, match="config.skip_padding_halves"):
        ContiguousConfig(128, skip_padding_halves=1)
    with pytest.raises(ValueError, match="config.skip_padding_halves: not with stream_k"):
        ContiguousConfig(256, cluster=2, stream_k=True, skip_padding_halves=True)
    assert not ContiguousConfig(128).skip_padding_halves
    mixed = ContiguousConfig(256, 3, group_m=1, cluster=2, multicast="mixed", skip_padding_halves=True)
    spec = kernel_spec(4096, 7168, mixed, masked_max_m=1024)
    plain = kernel_spec(4096, 7168, dataclasses.replace(mixed, skip_padding_halves=False), masked_max_m=1024)
    assert spec.constants["SKIP_HALVES"] == 1 and plain.constants["SKIP_HALVES"] == 0
    assert spec.kernel_name == plain.kernel_name + "_sh"
    assert ", 1, 0>;" in spec.source and ", 0, 0>;" in plain.source  # the template's last two arguments
    assert launch.layout_config(mixed, 0).skip_padding_halves  # the fallback on row ids keeps it
    silu = launch.silu_config(ContiguousConfig(128, cluster=2, skip_padding_halves=True))
    assert silu == ContiguousConfig(256, cluster=2, skip_padding_halves=True)
    spec = kernel_spec(512, 7168, silu, gather_a=True, silu_quant=1)
    assert spec.constants["SKIP_HALVES"] == 1 and spec.kernel_name.endswith("_ga_sq1_sh")


def test_split_padding_halves_config_and_spec():
    """Splitting a tile whose rows lie in its first half by N between the warpgroups: a bool that
    needs skip_padding_halves and 256-wide tiles, refused (naming the field) for the SiLU*up quant
    epilogue (gate and up would part), direct rows and odd N; SKIP_HALVES 2 and a name of its own."""
    with pytest.raises(TypeError, match="config.split_padding_halves"):
        ContiguousConfig(256, skip_padding_halves=True, split_padding_halves=1)
    for bad in (dict(block_n=256), dict(block_n=128, skip_padding_halves=True)):
        with pytest.raises(ValueError, match="config.split_padding_halves: needs skip_padding_halves"):
            ContiguousConfig(split_padding_halves=True, **bad)
    split = ContiguousConfig(256, cluster=2, skip_padding_halves=True, split_padding_halves=True)
    spec = kernel_spec(4096, 7168, split)
    assert spec.constants["SKIP_HALVES"] == 2 and spec.kernel_name.endswith("_sh2")
    for kw, n in ((dict(silu_quant=1), 4096), (dict(direct_rows=True), 7168), ({}, 1001)):
        with pytest.raises(ValueError, match="config.split_padding_halves"):
            kernel_spec(n, 2048, split, **kw)


def test_a_regs_config_and_spec():
    """`a_regs` (A fragments in registers) names its kernel, reaches the template, and is refused
    where a tile has no two parts to share the fragments."""
    cfg = ContiguousConfig(256, cluster=2, a_regs=True)
    spec = kernel_spec(4096, 7168, cfg, silu_quant=1)
    assert spec.kernel_name.endswith("_ar") and spec.constants["A_REGS"] == 1
    assert "GroupedGemmContiguous<4096, 7168, 256, 4, 8, 2, 0, 0, 0, 1, 0, 0, 0, 1>" in spec.source
    assert kernel_spec(4096, 7168, ContiguousConfig(256)).constants["A_REGS"] == 0
    with pytest.raises(ValueError, match="config.a_regs: needs block_n=256"):
        ContiguousConfig(192, a_regs=True)
    with pytest.raises(TypeError, match="config.a_regs"):
        ContiguousConfig(256, a_regs=1)
