"""The shipped kernel through nvcc (no GPU needed): every config the heuristics pick for the
DeepSeek-V3 cells and odd shapes compiles for sm_90a without local memory or serialized wgmma,
its SASS holds the Hopper instructions it is written for, the generated wgmma header is
current, and the warm-up command builds what the heuristics pick. Skips without a toolkit."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from dataclasses import dataclass

import pytest

from moe_backend.cuda import _gen_wgmma, jit
from moe_backend.cuda.config import ContiguousConfig
from moe_backend.cuda.heuristic import select_config, select_masked_config
from moe_backend.cuda.launch import kernel_spec

try:
    jit.find_nvcc()
    HAVE_NVCC = True
except jit.JITError:
    HAVE_NVCC = False
needs_nvcc = pytest.mark.skipif(not HAVE_NVCC, reason="nvcc not found (CUDA toolkit)")
CUOBJDUMP = jit.find_cuobjdump()


@dataclass(frozen=True)
class CompileCase:
    name: str
    n: int
    k: int
    config: ContiguousConfig | None = None  # None: what the contiguous heuristic picks for `rows`
    rows: int = 32 * 512
    masked_max_m: int = 0  # > 0: the masked layout, the kernel reading masked_m (RowIds)
    gather_a: bool = False  # A's rows read through a per-row index by the producer's cp.asyncs
    silu_quant: int = 0  # GEMM1 storing FP8 silu(gate) * up (2: UE8M0 scales)
    direct_rows: bool = False  # GEMM2 storing single-slot tokens' rows into the layer's output


COMPILE_CASES = [
    CompileCase("ep8-w13", 4096, 7168),
    CompileCase("ep8-w2", 7168, 2048, rows=32 * 4096),
    CompileCase("tp8-w13", 512, 7168, rows=256 * 512),
    CompileCase("tp8-w2-k256", 7168, 256, rows=256 * 512),
    # the H100's TP8 w2 config: 192-wide pairs on a 3-stage ring, each pair walking its own M tiles
    CompileCase(
        "tp8-w2-k256-h100", 7168, 256, select_config(256 * 512, 7168, 132, k=256, device_name="NVIDIA H100 80GB HBM3")
    ),
    CompileCase("few-rows-bn64", 4096, 7168, rows=128),
    # every N tile alone and in B-sharing pairs; odd N (scalar epilogue, partial scale block)
    *[
        CompileCase(f"bn{bn}-cluster{cl}", 7168, 2048, ContiguousConfig(bn, cluster=cl))
        for bn in (64, 128, 192, 256)
        for cl in (1, 2)
    ],
    # 192-wide tiles where N is not a multiple of 192 (odd tiles start 64 columns into a scale block)
    CompileCase("ep8-w13-bn192-pairs", 4096, 7168, ContiguousConfig(192, cluster=2)),
    CompileCase("odd-n-bn192", 1001, 384, ContiguousConfig(192)),
    CompileCase("share-a-bn192", 7168, 2048, ContiguousConfig(192, cluster=2, multicast="a")),
    CompileCase("odd-n-bn128", 1001, 384, ContiguousConfig(128)),
    CompileCase("odd-n-bn256-pairs", 1001, 1152, ContiguousConfig(256, cluster=2)),
    CompileCase("share-a-bn128", 7168, 2048, ContiguousConfig(128, cluster=2, multicast="a")),
    # the masked decode configs (group_m 1: the dead-tile skip) at worst-case max_m
    *[
        CompileCase(f"masked-{n}x{k}-max{mm}", n, k, select_masked_config(n, k), masked_max_m=mm)
        for n, k in ((7168, 256), (4096, 7168), (7168, 2048), (512, 7168))
        for mm in (128, 1024)
    ],
    # the H100's masked configs (256-wide pairs, 3 stages: mixed for EP8's GEMMs, sharing A for N = 512)
    *[
        CompileCase(
            f"masked-h100-{n}x{k}", n, k, select_masked_config(n, k, "NVIDIA H100 80GB HBM3"), masked_max_m=1024
        )
        for n, k in ((4096, 7168), (7168, 2048), (512, 7168))
    ],
    # gathered A rows (prefill GEMM1 reading token rows through the layout's src_token)
    CompileCase("tp8-w13-gather", 512, 7168, rows=256 * 512, gather_a=True),
    CompileCase("ep8-w13-gather-pairs", 4096, 7168, ContiguousConfig(128, cluster=2), gather_a=True),
    CompileCase("gather-bn256", 4096, 7168, ContiguousConfig(256), gather_a=True),
    # GEMM1 with the SiLU*up quant epilogue: alone and in pairs, gathering A (TP8), UE8M0 scales
    CompileCase("ep8-w13-silu-pairs", 4096, 7168, ContiguousConfig(256, cluster=2), silu_quant=1),
    CompileCase("ep8-w13-silu", 4096, 7168, ContiguousConfig(256), silu_quant=1),
    CompileCase("tp8-w13-silu-gather", 512, 7168, ContiguousConfig(256, cluster=2), gather_a=True, silu_quant=1),
    CompileCase("silu-ue8m0", 512, 7168, ContiguousConfig(256), silu_quant=2),
    # GEMM2 of the EP8 slice storing single-slot tokens' rows into the layer's output: alone and in pairs
    CompileCase("ep8-w2-direct", 7168, 2048, ContiguousConfig(256), direct_rows=True),
    CompileCase("ep8-w2-direct-pairs", 7168, 2048, ContiguousConfig(256, cluster=2), direct_rows=True),
    CompileCase("ep8-w2-direct-bn192-pairs", 7168, 2048, ContiguousConfig(192, cluster=2), direct_rows=True),
    # stream-K: GEMM1 with the SiLU*up quant epilogue in pairs (the layer's prefill GEMM1), plain
    # GEMMs at every tile width, and K = 256 (one chunk per unit: nothing is ever cut)
    CompileCase("ep8-w13-silu-pairs-sk", 4096, 7168, ContiguousConfig(256, cluster=2, stream_k=True), silu_quant=1),
    *[
        CompileCase(f"sk-bn{bn}-cluster{cl}", 7168, 2048, ContiguousConfig(bn, cluster=cl, stream_k=True))
        for bn, cl in ((64, 1), (128, 2), (192, 2), (256, 1))
    ],
    CompileCase("sk-k256", 7168, 256, ContiguousConfig(192, cluster=2, stream_k=True)),
    # stream-K with GEMM1 gathering token rows and storing SiLU*up quant (the TP8 prefill GEMM1),
    # and with GEMM2 storing direct rows (the EP8 prefill GEMM2 from 8192 tokens)
    CompileCase(
        "sk-tp8-w13-silu-gather",
        512,
        7168,
        ContiguousConfig(256, cluster=2, stream_k=True),
        gather_a=True,
        silu_quant=1,
    ),
    CompileCase(
        "sk-ep8-w2-direct-pairs", 7168, 2048, ContiguousConfig(256, cluster=2, stream_k=True), direct_rows=True
    ),
    # stream-K on the masked layout's dense walk: 128-wide A-sharing pairs on EP8's shapes and
    # 64-wide pairs on N = 512 (with the 256-wide pairs and 4 stages N = 512 now takes, stream-K's
    # extra state spills to local memory inside the MMA loop: not a config stream-K is offered on)
    *[
        CompileCase(
            f"sk-masked-{n}x{k}-max1024",
            n,
            k,
            ContiguousConfig(bn, group_m=1, cluster=2, multicast="a", stream_k=True),
            masked_max_m=1024,
        )
        for n, k, bn in ((4096, 7168, 128), (7168, 2048, 128), (512, 7168, 64))
    ],
    # ... and the mixed pairs EP8's masked GEMMs run (256 wide with 3 stages, 192 wide)
    *[
        CompileCase(
            f"sk-masked-mixed-{n}x{k}-bn{bn}-max2048",
            n,
            k,
            ContiguousConfig(bn, num_stages=stages, group_m=1, cluster=2, multicast="mixed", stream_k=True),
            masked_max_m=2048,
        )
        for n, k, bn, stages in ((4096, 7168, 256, 3), (7168, 2048, 192, 0))
    ],
    # pairs of M tiles sharing B on the masked layout's dense walk over live pairs (hot experts)
    CompileCase(
        "masked-pairs-b-bn192-max2048", 4096, 7168, ContiguousConfig(192, group_m=1, cluster=2), masked_max_m=2048
    ),
    # consumer warpgroups skipping the MMAs of their padding halves: the masked configs (mixed pairs
    # 256 and 192 wide, A-sharing pairs on N = 512, single 64-wide CTAs at K = 256) and the
    # layer's prefill kernels (SiLU*up quant in pairs gathering A, direct rows in pairs)
    *[
        CompileCase(
            f"skip-halves-masked-{n}x{k}-bn{cfg.block_n}",
            n,
            k,
            dataclasses.replace(cfg, skip_padding_halves=True),
            masked_max_m=1024,
        )
        for n, k, cfg in (
            (4096, 7168, select_masked_config(4096, 7168, "NVIDIA H100 80GB HBM3")),
            (7168, 2048, select_masked_config(7168, 2048)),
            (512, 7168, select_masked_config(512, 7168)),
            (7168, 256, select_masked_config(7168, 256)),
        )
    ],
    CompileCase(
        "skip-halves-tp8-w13-silu-gather",
        512,
        7168,
        ContiguousConfig(256, cluster=2, skip_padding_halves=True),
        gather_a=True,
        silu_quant=1,
    ),
    # ... and splitting a tile whose rows lie in its first half by N between the warpgroups
    # (256-wide bf16 tiles): the masked mixed and A-sharing pairs, contiguous pairs and single CTAs
    *[
        CompileCase(
            f"split-halves-{name}",
            n,
            k,
            dataclasses.replace(cfg, skip_padding_halves=True, split_padding_halves=True),
            masked_max_m=mm,
        )  # fmt: skip
        for name, n, k, cfg, mm in (
            ("masked-ep8-w13", 4096, 7168, select_masked_config(4096, 7168), 1024),
            ("masked-tp8-w13", 512, 7168, select_masked_config(512, 7168), 1024),
            ("pairs", 4096, 7168, ContiguousConfig(256, cluster=2), 0),
            ("single-odd-n", 1000, 2048, ContiguousConfig(256), 0),
        )
    ],
    # A fragments in registers (256-wide tiles): the layer's prefill GEMM1 in pairs (SiLU*up quant,
    # and gathering A at TP8), plain pairs and single CTAs, GEMM2 storing direct rows, stream-K
    *[
        CompileCase(f"a-regs-{name}", n, k, dataclasses.replace(cfg, a_regs=True), **extra)
        for name, n, k, cfg, extra in (
            ("ep8-w13-silu-pairs", 4096, 7168, ContiguousConfig(256, cluster=2), {"silu_quant": 1}),
            ("tp8-w13-silu-gather", 512, 7168, ContiguousConfig(256, cluster=2), {"silu_quant": 1, "gather_a": True}),
            ("pairs", 7168, 2048, ContiguousConfig(256, cluster=2), {}),
            ("single-odd-n", 1001, 1152, ContiguousConfig(256), {}),
            ("ep8-w2-direct-pairs", 7168, 2048, ContiguousConfig(256, cluster=2), {"direct_rows": True}),
            ("sk-silu-pairs", 4096, 7168, ContiguousConfig(256, cluster=2, stream_k=True), {"silu_quant": 1}),
        )
    ],
    CompileCase(
        "skip-halves-ep8-w2-direct-pairs",
        7168,
        2048,
        ContiguousConfig(256, cluster=2, skip_padding_halves=True),
        direct_rows=True,
    ),
]


def _k_loop_end(lines: list[str], first_mma: int, last_mma: int) -> int:
    """The SASS line closing the loop that holds MMAs first_mma..last_mma: the first branch after
    last_mma that jumps back to first_mma's address or before it."""
    start = int(re.search(r"/\*([0-9a-f]{4,})\*/", lines[first_mma]).group(1), 16)
    for i in range(last_mma, len(lines)):
        target = re.search(r"\bBRA 0x([0-9a-f]+)", lines[i])
        if target and int(target.group(1), 16) <= start:
            return i
    raise AssertionError("no branch back to the K loop's MMAs")


def _spec(case: CompileCase) -> jit.KernelSpec:
    cfg = case.config or select_config(case.rows, case.n, num_sms=132, k=case.k)
    return kernel_spec(
        case.n,
        case.k,
        cfg,
        masked_max_m=case.masked_max_m,
        gather_a=case.gather_a,
        silu_quant=case.silu_quant,
        direct_rows=case.direct_rows,
    )


@needs_nvcc
@pytest.mark.parametrize("case", COMPILE_CASES, ids=lambda c: c.name)
def test_kernel_compiles_for_sm90a(case, cache):
    spec = _spec(case)
    cubin = jit.compile_cubin(spec)
    assert cubin.read_bytes()[:4] == b"\x7fELF"
    meta = jit.entry_meta(spec)
    log = meta["log"]
    assert meta["compile_seconds"] < 60
    stream_k = spec.constants["STREAM_K"]
    split = spec.constants["SKIP_HALVES"] == 2
    # A fragments in registers and direct rows: a word of the tile's store is spilled once per tile
    a_regs_direct = spec.constants["A_REGS"] and spec.constants["DIRECT_ROWS"]
    # No local memory: the accumulators stay in registers. (Stream-K kernels keep more of the walk
    # live at tile boundaries, and kernels splitting tiles by N a word or two in their consumers'
    # prologue; their SASS is checked below for spills among the MMAs instead.)
    if not (stream_k or split or a_regs_direct):
        assert re.search(r"\b0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads", log), log
    # setmaxnreg honoured (C7508 says it was ignored); wgmma not serialized by ptxas.
    assert "C7508" not in log and "setmaxnreg" not in log.lower(), log
    assert "serializ" not in log.lower(), log
    if CUOBJDUMP is None:
        pytest.skip("no cuobjdump for the SASS checks")
    sass = subprocess.run([CUOBJDUMP, "--dump-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    bn = spec.constants["BLOCK_N"]
    k_blocks = spec.constants["K"] // 128
    unit_n = 128 if bn == 256 else bn  # KernelTraits::kPartN: 256-wide tiles run as two 128-wide units
    chain = min(2 if bn == 256 else 4, k_blocks)  # KernelTraits::kChainKBlocks
    # Straight-line chains: the tile's first (its first unit issued before the previous tile's
    # store), the loop's, the remainder; each K block in BLOCK_N / unit_n units, a wait each.
    units = (chain + (chain if k_blocks >= 2 * chain else 0) + k_blocks % chain) * (bn // unit_n)
    if stream_k:  # a K loop over a runtime count of whole chains: the first chain, then the loop's
        units = 2 * chain * (bn // unit_n)
    units += 1 if split else 0  # the split tiles' K loop: one 128-wide part per K block
    # 4 fp8 wgmma (k32 each) per unit.
    assert len(re.findall(rf"QGMMA\.64x{unit_n}x32\.F32\.E4M3\.E4M3", sass)) == 4 * units, sass[:2000]
    if spec.constants["A_REGS"]:  # each K block's A fragments read once: 4 ldmatrix.x4 per K block
        assert len(re.findall(r"\bLDSM\.16\.M88\.4\b", sass)) == 4 * units // 2
    if spec.constants["GATHER_A"]:  # B by TMA, A's rows by cp.async
        assert "UTMALDG.2D" not in sass and "UTMALDG.3D" in sass and "LDGSTS" in sass
    else:
        assert "UTMALDG.2D" in sass and "UTMALDG.3D" in sass  # TMA loads of A and B
    assert "USETMAXREG.DEALLOC" in sass and "USETMAXREG.TRY_ALLOC" in sass
    assert len(re.findall(r"WARPGROUP\.DEPBAR", sass)) == units  # one wait per unit
    lines = sass.splitlines()
    mma_lines = [i for i, line in enumerate(lines) if "QGMMA" in line]
    local = [i for i, line in enumerate(lines) if re.search(r"\b(LDL|STL)\b", line)]
    if split:  # none from a tile's first MMA (its epilogue and K loop) to the last
        assert not [i for i in local if mma_lines[0] < i < mma_lines[-1]], [lines[i] for i in local][:4]
    elif a_regs_direct:  # none among the K loop chain's MMAs
        loop_mmas = mma_lines[chain * 8 : 2 * chain * 8]
        assert not [i for i in local if loop_mmas[0] <= i <= loop_mmas[-1]], [lines[i] for i in local][:4]
    elif stream_k:  # none in the K loop: from its chain's first MMA to the branch back to it (a
        # spilled word of the walk, stored and reloaded once per piece, costs nothing beside it)
        loop_start = mma_lines[len(mma_lines) // 2]
        loop_end = _k_loop_end(lines, loop_start, mma_lines[-1])
        assert not [i for i in local if loop_start <= i <= loop_end], [lines[i] for i in local][:4]
    else:
        assert not local  # no local memory
    # The wgmma descriptors stay in uniform registers: a move from vector registers (R2UR) between
    # the MMAs would mean ptxas could not prove the warp converged. Kernels splitting tiles by N
    # offset each warpgroup's descriptors by its part at run time, which ptxas computes in vector
    # registers; there convergence is checked against the same kernel skipping halves instead: no
    # more divergence fallbacks for shuffles (BRA.DIV), no WARPSYNC before the MMAs.
    between = lines[mma_lines[0] : mma_lines[-1]]
    if split:
        twin = jit.compile_cubin(_spec(dataclasses.replace(case, config=dataclasses.replace(
            case.config, split_padding_halves=False))))  # fmt: skip
        twin_sass = subprocess.run([CUOBJDUMP, "--dump-sass", str(twin)], capture_output=True, text=True).stdout
        assert sass.count("BRA.DIV") <= twin_sass.count("BRA.DIV")
        assert not any("WARPSYNC" in lines[i - 1] for i in mma_lines)
    else:
        assert not any("R2UR" in line for line in between), [line for line in between if "R2UR" in line][:4]
    if spec.constants["CLUSTER"] > 1:
        # The remote stage release is a plain arrive: the only fences belong to the two cluster
        # barriers (start and exit), none per K block.
        assert sass.count("UCGABAR_ARV") == 2
        # (stream-K adds the fence before a partial sum's flag and the flag's release store)
        assert sass.count("MEMBAR.ALL.GPU") == 2 + (1 if stream_k else 0)
        assert "MULTICAST" in sass


@needs_nvcc
def test_debug_build_compiles(cache, monkeypatch):
    monkeypatch.setenv("MOE_BACKEND_JIT_DEBUG", "1")
    spec = _spec(COMPILE_CASES[0])
    meta = json.loads(jit.compile_cubin(spec).with_suffix(".json").read_text())
    assert "-DPHASEMOE_DEBUG=1" in meta["flags"]


def test_generated_wgmma_header_is_current():
    assert _gen_wgmma.HEADER.read_text() == _gen_wgmma.render(), (
        "run `python -m moe_backend.cuda._gen_wgmma` and commit wgmma_fp8.cuh"
    )


@needs_nvcc
def test_warmup_command(cache, capsys):
    from moe_backend.cuda.__main__ import main

    assert main(["warmup", "--slice", "tp8", "--rows", "512", "--masked-max-m"]) == 0
    assert "2 kernels ready" in capsys.readouterr().out
    assert len(list((cache / "grouped_gemm_contiguous").glob("*.cubin"))) == 2
    # the masked decode kernels of both TP8 GEMMs for max_m 128: two more
    assert main(["warmup", "--slice", "tp8", "--rows", "512", "--masked-max-m", "128"]) == 0
    assert len(list((cache / "grouped_gemm_contiguous").glob("*.cubin"))) == 4
    with pytest.raises(SystemExit):
        main(["warmup", "--masked-max-m", "100"])
