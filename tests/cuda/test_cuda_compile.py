"""CPU/CI checks of the CUDA C++ path: the kernels compile for sm_90a with nvcc (and the SASS
holds the Hopper instructions they are written for), the JIT cache's keys, atomic publish,
corruption recovery and cross-process locking, the tile heuristic and the launcher's argument
checks. No GPU needed; nvcc-dependent tests skip without a toolkit."""

from __future__ import annotations

import ctypes
import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from moe_backend.cuda import _gen_wgmma, jit
from moe_backend.cuda import grouped_gemm_contiguous as ggc

try:
    jit.find_nvcc()
    HAVE_NVCC = True
except jit.JITError:
    HAVE_NVCC = False
needs_nvcc = pytest.mark.skipif(not HAVE_NVCC, reason="nvcc not found (CUDA toolkit)")
CUOBJDUMP = jit.find_cuobjdump()
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "jit-cache"
    monkeypatch.setenv("MOE_BACKEND_CACHE_DIR", str(root))
    return root


# ------------------------------------------------------------------------------------------
# The real kernel through nvcc


@dataclass(frozen=True)
class CompileCase:
    name: str
    n: int
    k: int
    block_n: int | None = None  # None: what the heuristic picks for `rows`
    rows: int = 32 * 512
    cluster: int = 1
    multicast: str = "b"
    bulk_store: bool = False  # the epilogue through shared memory + bulk copies
    two_acc: bool = False     # two block accumulators (no ping-pong token)
    part_n: int = 0           # two_acc: MMA units of this many columns (0: the whole tile)
    unit_accs: int = 2        # two_acc: MMA units in flight per warpgroup
    masked_max_m: int = 0     # > 0: the masked layout, the kernel reading masked_m (RowIds)
    group_m: int = ggc.GROUP_M  # 1: the masked op's walk (M-tile-major: an expert's dead M tiles skipped)
    split_tail: bool = False  # the last wave's units shared by all CTAs (stream-K)


COMPILE_CASES = [
    CompileCase("ep8-w13", 4096, 7168),
    CompileCase("ep8-w2", 7168, 2048),
    CompileCase("tp8-w13", 512, 7168, rows=256 * 512),
    # every generated wgmma wrapper assembles, incl. tiles that straddle scale blocks
    *[CompileCase(f"bn{bn}", 7168, 2048, block_n=bn) for bn in _gen_wgmma.BLOCK_N_CHOICES],
    CompileCase("odd-n", 1001, 256, block_n=112),  # scalar bf16 epilogue, partial scale block
    # CTA pairs sharing B (M-tile pairs) or A (N-tile pairs) through TMA multicast
    CompileCase("cluster2-share-b", 4096, 7168, block_n=192, cluster=2, multicast="b"),
    CompileCase("cluster2-share-a", 7168, 2048, block_n=128, cluster=2, multicast="a"),
    CompileCase("bulk-store", 7168, 2048, block_n=192, cluster=2, bulk_store=True),  # epilogue via bulk copies
    CompileCase("two-acc", 4096, 7168, block_n=128, cluster=2, two_acc=True),
    CompileCase("two-acc-bn64", 7168, 2048, block_n=64, two_acc=True),
    # two accumulators in 64-column parts: 256 and 192 wide (192: run-time scale block per part)
    CompileCase("two-acc-parts-bn256", 4096, 7168, block_n=256, cluster=2, two_acc=True, part_n=64),
    CompileCase("two-acc-parts-bn192-odd-n", 1001, 384, block_n=192, two_acc=True, part_n=64),
    CompileCase("one-unit-parts-bn256", 7168, 2048, block_n=256, cluster=2, two_acc=True, part_n=128, unit_accs=1),
    CompileCase("one-unit-whole-bn192", 4096, 7168, block_n=192, cluster=2, two_acc=True, unit_accs=1),
    # the split tail (stream-K on the last wave): partial sums handed over through global memory
    CompileCase("split-tail-ep8-w13", 4096, 7168, block_n=256, cluster=2, two_acc=True, part_n=128, unit_accs=1,
                split_tail=True),
    CompileCase("split-tail-ep8-w2-single", 7168, 2048, block_n=128, two_acc=True, split_tail=True),
    CompileCase("masked-128", 7168, 2048, block_n=128, cluster=2, multicast="a", two_acc=True, masked_max_m=128),
    CompileCase("masked-256-bn64", 512, 7168, block_n=64, two_acc=True, masked_max_m=256),
    # the masked op's decode configs (select_masked_config, group_m 1) at worst-case max_m
    CompileCase("masked-1024-k256-decode", 7168, 256, block_n=64, two_acc=True, masked_max_m=1024, group_m=1),
    CompileCase("masked-1024-pairs-decode", 4096, 7168, block_n=128, cluster=2, multicast="a", two_acc=True,
                masked_max_m=1024, group_m=1),
]


def _spec(case: CompileCase) -> jit.KernelSpec:
    if case.block_n is None:
        cfg = ggc.select_config(case.rows, case.n, num_sms=132, k=case.k)
    else:
        cfg = ggc.ContiguousConfig(case.block_n, ggc.max_stages(case.block_n, case.bulk_store), cluster=case.cluster,
                                   multicast=case.multicast, bulk_store=case.bulk_store,
                                   pingpong=not case.two_acc, two_acc=case.two_acc, part_n=case.part_n,
                                   unit_accs=case.unit_accs, split_tail=case.split_tail, group_m=case.group_m)
    return ggc.kernel_spec(case.n, case.k, cfg, masked_max_m=case.masked_max_m)


@needs_nvcc
@pytest.mark.parametrize("case", COMPILE_CASES, ids=lambda c: c.name)
def test_kernel_compiles_for_sm90a(case, cache):
    spec = _spec(case)
    cubin = jit.compile_cubin(spec)
    assert cubin.read_bytes()[:4] == b"\x7fELF"
    meta = jit.entry_meta(spec)
    log = meta["log"]
    print(f"{spec.kernel_name}: {meta['compile_seconds']:.2f}s, "
          + "; ".join(line.strip() for line in log.splitlines() if "Used" in line or "spill" in line))
    assert meta["compile_seconds"] < 60
    # No local memory: the accumulators stay in registers.
    assert re.search(r"\b0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads", log), log
    # setmaxnreg honoured (C7508 says it was ignored); wgmma not serialized by ptxas.
    assert "C7508" not in log and "setmaxnreg" not in log.lower(), log
    assert "serializ" not in log.lower(), log
    if CUOBJDUMP is None:
        pytest.skip("no cuobjdump for the SASS checks")
    sass = subprocess.run([CUOBJDUMP, "--dump-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    bn = spec.constants["BLOCK_N"]
    # The K loop is compiled once per column offset inside a scale block for 192/160/96 (2, 4,
    # 4 copies: compile-time scale indices), once otherwise.
    # The K loop is unrolled k_unroll times (plus one remainder copy when K/128 is odd).
    k_blocks = spec.constants["K"] // 128
    unroll = min(spec.constants["K_UNROLL"], k_blocks)
    unroll += k_blocks % unroll
    copies = {192: 2, 160: 4, 96: 4}.get(bn, 1) * unroll
    mma_n = bn
    issues = copies
    if spec.constants["TWO_ACC"]:  # straight-line chains of 2 x k_unroll K blocks: the tile's first
        chain = min(2 * spec.constants["K_UNROLL"], k_blocks)  # (block 0 issued before the epilogue),
        copies = chain + (chain if k_blocks >= 2 * chain else 0) + k_blocks % chain  # the loop's, the rest
        mma_n = spec.constants["PART_N"] or bn  # each K block in BLOCK_N / PART_N units, a wait each
        copies *= bn // mma_n
        # 192-wide tiles: the chains compiled per column offset (0, 64); the tile's first unit, issued
        # before the previous tile's epilogue, once.
        offsets = 2 if bn == 192 else 1
        issues = 1 + offsets * (copies - 1)
        copies *= offsets
    # 4 fp8 wgmma (k32 each) per 128-wide K block (per unit with parts), N = the tile (the part).
    assert len(re.findall(rf"QGMMA\.64x{mma_n}x32\.F32\.E4M3\.E4M3", sass)) == 4 * issues, sass[:2000]
    assert "UTMALDG.2D" in sass and "UTMALDG.3D" in sass          # TMA loads of A and B
    assert "USETMAXREG.DEALLOC" in sass and "USETMAXREG.TRY_ALLOC" in sass
    assert len(re.findall(r"WARPGROUP\.DEPBAR", sass)) == copies  # one wait per K block
    assert not re.search(r"\b(LDL|STL)\b", sass)                  # no local memory
    # The wgmma descriptors stay in uniform registers: a move from vector registers (R2UR) between
    # the MMAs meant ptxas could not prove the warp converged (the split tail's lane-0 flag loops
    # without a __syncwarp did that: 135 R2UR among the MMAs, 10-25% slower on the GPU).
    mma_lines = [i for i, line in enumerate(sass.splitlines()) if "QGMMA" in line]
    between = sass.splitlines()[mma_lines[0]:mma_lines[-1]]
    assert not any("R2UR" in line for line in between), [line for line in between if "R2UR" in line][:4]
    if spec.constants["CLUSTER"] > 1:
        # The remote stage release is a plain arrive: a GPU-scope release fence per arrival
        # (MEMBAR.ALL.GPU before each per-K-block arrive) made the multicast kernel slower than
        # none. The only fences left belong to the two cluster barriers (start and exit), and the
        # split tail's release of a CTA's partial sums (once per launch, not per K block).
        assert sass.count("UCGABAR_ARV") == 2
        assert sass.count("MEMBAR.ALL.GPU") == 2 + spec.constants["SPLIT_TAIL"]
        assert "MULTICAST" in sass


@needs_nvcc
def test_debug_build_compiles(cache, monkeypatch):
    monkeypatch.setenv("MOE_BACKEND_JIT_DEBUG", "1")
    spec = _spec(COMPILE_CASES[0])
    meta = json.loads(jit.compile_cubin(spec).with_suffix(".json").read_text())
    assert "-DPHASEMOE_DEBUG=1" in meta["flags"]


def test_generated_wgmma_header_is_current():
    assert _gen_wgmma.HEADER.read_text() == _gen_wgmma.render(), \
        "run `python -m moe_backend.cuda._gen_wgmma` and commit wgmma_fp8.cuh"


@needs_nvcc
def test_nvcc_roundtrip_and_warmup(cache):
    spec = jit.KernelSpec(family="trivial", kernel_name="phasemoe_trivial",
                          source='extern "C" __global__ void phasemoe_trivial(float* x) { x[threadIdx.x] += 1.f; }\n',
                          include_dirs=())
    paths = jit.warmup([spec], progress=False)
    assert paths[0].read_bytes()[:4] == b"\x7fELF"
    meta = jit.entry_meta(spec)
    assert meta["size"] == paths[0].stat().st_size
    assert "-gencode=arch=compute_90a,code=sm_90a" in meta["flags"]
    mtime = paths[0].stat().st_mtime_ns
    assert jit.compile_cubin(spec) == paths[0] and paths[0].stat().st_mtime_ns == mtime  # cached


@needs_nvcc
def test_compile_error_is_reported(cache):
    spec = jit.KernelSpec(family="trivial", kernel_name="broken", source="this is not C++\n", include_dirs=())
    with pytest.raises(jit.JITError, match="nvcc failed for broken"):
        jit.compile_cubin(spec)
    assert not list((cache / "trivial").glob("*.cubin"))


def test_missing_nvcc_message(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(jit, "DEFAULT_NVCC", (str(tmp_path / "no-cuda" / "nvcc"),))
    with pytest.raises(jit.JITError, match="nvcc not found"):
        jit.find_nvcc()


# ------------------------------------------------------------------------------------------
# The cache, with a fake compiler (no toolkit needed)


class FakeCompiler:
    """Writes a deterministic 'cubin' and counts its invocations (in a file, across processes)."""

    compiler_id = "fake-1"

    def __init__(self, counter: Path, payload: bytes = b"\x7fELF fake cubin " * 64) -> None:
        self.counter, self.payload = counter, payload

    def __call__(self, src: Path, cubin: Path, spec: jit.KernelSpec) -> str:
        with open(self.counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        cubin.write_bytes(self.payload + spec.source.encode())
        return "fake log"

    @property
    def calls(self) -> int:
        return len(self.counter.read_text().splitlines()) if self.counter.exists() else 0


def _fake_spec(tmp_path: Path, **overrides) -> jit.KernelSpec:
    inc = tmp_path / "inc"
    inc.mkdir(exist_ok=True)
    if not (inc / "common.cuh").exists():
        (inc / "common.cuh").write_text("// header v1\n")
    fields = dict(family="fake", kernel_name="k", source="// kernel\n", constants={"N": 128},
                  include_dirs=(inc,))
    fields.update(overrides)
    return jit.KernelSpec(**fields)


def test_key_covers_everything_that_changes_the_binary(tmp_path, monkeypatch):
    base = _fake_spec(tmp_path)
    key = jit.cache_key(base, "nvcc 13.0")
    assert jit.cache_key(_fake_spec(tmp_path), "nvcc 13.0") == key  # stable
    variants = {
        "source": _fake_spec(tmp_path, source="// kernel v2\n"),
        "constants": _fake_spec(tmp_path, constants={"N": 256}),
        "flags": _fake_spec(tmp_path, flags=("-lineinfo",)),
        "arch": _fake_spec(tmp_path, arch="sm_100a"),
        "kernel name": _fake_spec(tmp_path, kernel_name="k2"),
    }
    for what, spec in variants.items():
        assert jit.cache_key(spec, "nvcc 13.0") != key, what
    assert jit.cache_key(base, "nvcc 13.1") != key, "compiler version"
    monkeypatch.setenv("MOE_BACKEND_JIT_DEBUG", "1")
    assert jit.cache_key(base, "nvcc 13.0") != key, "debug build"
    monkeypatch.delenv("MOE_BACKEND_JIT_DEBUG")
    (tmp_path / "inc" / "common.cuh").write_text("// header v2\n")
    assert jit.cache_key(base, "nvcc 13.0") != key, "included header"


def test_key_ignores_install_location(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "h.cuh").write_text("// same\n")
    spec_a = _fake_spec(tmp_path, include_dirs=(a,))
    spec_b = _fake_spec(tmp_path, include_dirs=(b,))
    assert jit.cache_key(spec_a, "x") == jit.cache_key(spec_b, "x")


def test_compiles_once_then_hits(cache, tmp_path):
    fake = FakeCompiler(tmp_path / "calls")
    spec = _fake_spec(tmp_path)
    p1 = jit.compile_cubin(spec, compiler=fake)
    p2 = jit.compile_cubin(spec, compiler=fake)
    assert p1 == p2 and fake.calls == 1
    meta = json.loads(p1.with_suffix(".json").read_text())
    assert meta["size"] == p1.stat().st_size and meta["compiler"] == "fake-1"
    # atomic publish: nothing left in the build area, only the entry (+ its lock) in the family dir
    assert not any((cache / "tmp").iterdir())
    assert sorted(p.suffix for p in p1.parent.iterdir()) == [".cubin", ".json", ".lock"]


@pytest.mark.parametrize("damage", ["truncate", "flip-byte", "drop-sidecar", "garbage-sidecar", "drop-cubin"])
def test_corrupt_entry_is_detected_and_rebuilt(cache, tmp_path, damage):
    fake = FakeCompiler(tmp_path / "calls")
    spec = _fake_spec(tmp_path)
    cubin = jit.compile_cubin(spec, compiler=fake)
    good = cubin.read_bytes()
    sidecar = cubin.with_suffix(".json")
    if damage == "truncate":
        cubin.write_bytes(good[: len(good) // 2])
    elif damage == "flip-byte":
        cubin.write_bytes(good[:10] + bytes([good[10] ^ 0xFF]) + good[11:])
    elif damage == "drop-sidecar":
        sidecar.unlink()
    elif damage == "garbage-sidecar":
        sidecar.write_text("{not json")
    else:
        cubin.unlink()
    assert jit.compile_cubin(spec, compiler=fake) == cubin
    assert fake.calls == 2 and cubin.read_bytes() == good


def test_failed_compile_publishes_nothing(cache, tmp_path):
    def failing(src, cubin, spec):
        cubin.write_bytes(b"half a cubin")
        raise jit.JITError("boom")

    failing.compiler_id = "failing"
    with pytest.raises(jit.JITError, match="boom"):
        jit.compile_cubin(_fake_spec(tmp_path), compiler=failing)
    assert not list(cache.rglob("*.cubin")) and not list(cache.rglob("*.json"))

    def empty(src, cubin, spec):
        return ""

    empty.compiler_id = "empty"
    with pytest.raises(jit.JITError, match="no cubin"):
        jit.compile_cubin(_fake_spec(tmp_path), compiler=empty)


_RACE_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from moe_backend.cuda import jit

    counter, inc, go = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])

    def slow(src, cubin, spec):
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(1.0)  # long enough that the other process arrives mid-build
        cubin.write_bytes(b"\\x7fELF raced " + spec.source.encode())
        return ""
    slow.compiler_id = "slow"

    spec = jit.KernelSpec(family="race", kernel_name="k", source="// raced\\n", include_dirs=(inc,))
    while time.time() < go:
        time.sleep(0.01)
    print(jit.compile_cubin(spec, compiler=slow))
""")


def test_two_processes_compile_once(cache, tmp_path):
    inc = tmp_path / "inc"
    inc.mkdir()
    counter = tmp_path / "calls"
    env = {**os.environ, "MOE_BACKEND_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    import time
    go = time.time() + 1.5
    procs = [subprocess.Popen([sys.executable, "-c", _RACE_SCRIPT, str(counter), str(inc), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1
    assert len(counter.read_text().splitlines()) == 1
    spec = jit.KernelSpec(family="race", kernel_name="k", source="// raced\n", include_dirs=(inc,))
    key = jit.cache_key(spec, "slow")
    assert jit.CacheEntry(Path(paths.pop()), cache / "race" / f"{key}.json").is_valid(key)


# ------------------------------------------------------------------------------------------
# Heuristic and launcher checks (CPU)


@pytest.mark.parametrize("bulk", [True, False])
def test_every_choice_fits_shared_memory(bulk):
    for bn in _gen_wgmma.BLOCK_N_CHOICES:
        stages = ggc.max_stages(bn, bulk)
        cfg = ggc.ContiguousConfig(bn, stages, bulk_store=bulk)
        assert stages >= 4 and cfg.smem_bytes <= ggc.SMEM_LIMIT
        with pytest.raises(ValueError, match="config.num_stages"):
            ggc.ContiguousConfig(bn, stages + 1, bulk_store=bulk)


def test_bulk_store_needs_rows_of_16_bytes():
    cfg = ggc.ContiguousConfig(128, ggc.max_stages(128, True), bulk_store=True)
    with pytest.raises(ValueError, match="config.bulk_store"):
        ggc.kernel_spec(1001, 256, cfg)
    assert ggc.kernel_spec(1024, 256, cfg).constants["BULK_STORE"] == 1


@pytest.mark.parametrize("n,k", [(7168, 256), (4096, 7168), (512, 7168), (7168, 2048)])
def test_masked_decode_configs_walk_m_tile_major(n, k):
    """The masked op's configs meet the dead-tile skip's preconditions (TileScheduler::skip_dead_rest:
    group_m 1, one M tile per unit), as the decode compile cases above assume."""
    from moe_backend.cuda.grouped_gemm_masked import select_masked_config

    cfg = select_masked_config(n, k)
    assert cfg.group_m == 1 and (cfg.cluster == 1 or cfg.multicast == "a") and not cfg.split_tail


def test_masked_max_m_is_checked_and_keys_the_kernel():
    cfg = ggc.ContiguousConfig(128, 4, pingpong=False, two_acc=True)
    with pytest.raises(ValueError, match="masked_max_m"):
        ggc.kernel_spec(7168, 2048, cfg, masked_max_m=100)
    names = {ggc.kernel_spec(7168, 2048, cfg, masked_max_m=mm).kernel_name for mm in (0, 128, 256)}
    assert len(names) == 3


def test_two_accumulators_need_tiles_that_fit_and_no_token():
    for bn, part, accs in ((64, 0, 2), (128, 0, 2), (128, 64, 2), (192, 64, 2), (256, 64, 2), (256, 128, 1),
                           (192, 0, 1)):
        ggc.ContiguousConfig(bn, ggc.max_stages(bn), pingpong=False, two_acc=True, part_n=part, unit_accs=accs)
    with pytest.raises(ValueError, match="config.two_acc"):
        ggc.ContiguousConfig(128, 4, pingpong=True, two_acc=True)
    # two whole-tile accumulators of 192 columns do not fit the registers (3 x 96); 96-wide units are
    # not offered; two 128-wide units of 256 do not fit (128 + 2 x 64); 160 and 96 start at 4 offsets
    for bn, part in ((192, 0), (192, 96), (256, 128), (160, 64), (96, 0)):
        with pytest.raises(ValueError, match="config.part_n"):
            ggc.ContiguousConfig(bn, 4, pingpong=False, two_acc=True, part_n=part)
    with pytest.raises(ValueError, match="config.part_n"):
        ggc.ContiguousConfig(128, 4, part_n=64)  # parts without two accumulators
    with pytest.raises(ValueError, match="config.unit_accs"):
        ggc.ContiguousConfig(128, 4, pingpong=False, two_acc=True, unit_accs=3)
    with pytest.raises(ValueError, match="config.block_n"):
        ggc.ContiguousConfig(256, 4)  # no whole-tile wgmma of 256 columns


def test_parts_key_the_kernel_and_whole_tile_parts_are_the_plain_kernel():
    base = ggc.ContiguousConfig(128, 4, pingpong=False, two_acc=True)
    same = ggc.ContiguousConfig(128, 4, pingpong=False, two_acc=True, part_n=128)
    parts = ggc.ContiguousConfig(128, 4, pingpong=False, two_acc=True, part_n=64)
    names = [ggc.kernel_spec(7168, 2048, c).kernel_name for c in (base, same, parts)]
    assert names[0] == names[1] != names[2]
    assert ggc.kernel_spec(7168, 2048, parts).constants["PART_N"] == 64


@pytest.mark.parametrize("m,n", [(128, 4096), (32 * 512, 4096), (32 * 4096, 7168), (256 * 512, 512),
                                 (1, 7168), (5 * 128, 256)])
@pytest.mark.parametrize("k", [256, 7168])
def test_heuristic_fills_the_machine(m, n, k):
    cfg = ggc.select_config(m, n, num_sms=132, k=k)
    assert cfg.block_n in ggc.HEURISTIC_BLOCK_N
    tiles = -(-m // 128) * -(-n // cfg.block_n)
    # Never fewer tiles than a smaller choice would give while SMs sit idle in a single wave.
    smallest = min(_gen_wgmma.BLOCK_N_CHOICES)
    if tiles < 132:
        assert cfg.block_n == smallest or -(-m // 128) * -(-n // smallest) <= tiles


def test_heuristic_takes_the_two_accumulator_loop():
    # the issue-5 cells: 256-wide tiles in two 128-wide units where K is long, 128 whole for K = 256
    for m, n, k in [(32 * 512, 4096, 7168), (32 * 4096, 7168, 2048), (256 * 512, 512, 7168)]:
        cfg = ggc.select_config(m, n, 132, k=k)
        assert (cfg.block_n, cfg.part_n, cfg.unit_accs, cfg.two_acc, cfg.pingpong, cfg.cluster) == \
            (256, 128, 1, True, False, 2), cfg
    for k in (256, None):  # short (or unknown) K: 128 whole
        cfg = ggc.select_config(256 * 512, 7168, 132, k=k)
        assert (cfg.block_n, cfg.part_n, cfg.two_acc, cfg.pingpong, cfg.cluster) == (128, 0, True, False, 2), cfg
    # M tiles swept together: the default on the EP8 cells; only the pair's own where N has two
    # tiles (TP8 w13, N = 512) or K two blocks (TP8 w2, K = 256)
    assert ggc.select_config(32 * 512, 4096, 132, k=7168).group_m == ggc.GROUP_M == 8
    assert ggc.select_config(32 * 4096, 7168, 132, k=2048).group_m == 8
    assert ggc.select_config(256 * 512, 512, 132, k=7168).group_m == 2
    assert ggc.select_config(256 * 512, 7168, 132, k=256).group_m == 2
    assert ggc.select_config(256 * 512, 7168, 132, k=None).group_m == 8  # K unknown: the default
    small = ggc.select_config(128, 4096, 132, k=7168)  # one M tile: 64-wide tiles give every SM work
    assert (small.block_n, small.two_acc, small.cluster) == (64, True, 1), small


def test_config_override_and_validation():
    cfg = ggc.ContiguousConfig(112, 4)
    assert ggc.select_config(10_000, 4096, 132, override=cfg) is cfg
    with pytest.raises(ValueError, match="config.block_n"):
        ggc.ContiguousConfig(100, 4)
    with pytest.raises(ValueError, match="config.num_stages"):
        ggc.ContiguousConfig(192, 6)


def _operands(m=256, n=256, k=256, e=2, device="cpu"):
    a = torch.zeros(m, k, device=device).to(torch.float8_e4m3fn)
    a_scale = torch.ones(m, k // 128, device=device)
    b = torch.zeros(e, n, k, device=device).to(torch.float8_e4m3fn)
    b_scale = torch.ones(e, -(-n // 128), k // 128, device=device)
    ids = torch.zeros(m, dtype=torch.int32, device=device)
    return a, a_scale, b, b_scale, ids


@pytest.mark.parametrize("arg,bad,exc", [
    ("a_fp8", lambda o: o[0].float(), TypeError),
    ("a_fp8", lambda o: o[0][:, :200], ValueError),
    ("a_scale", lambda o: o[1][:, :1], ValueError),
    ("b_fp8", lambda o: o[2][:, :, :128], ValueError),
    ("b_scale", lambda o: o[3].double(), TypeError),
    ("expert_ids", lambda o: o[4].float(), TypeError),
    ("expert_ids", lambda o: o[4][:10], ValueError),
])
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
    assert list(inspect.signature(ggc.grouped_gemm_contiguous).parameters)[:len(ref)] == ref


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

    def cuTensorMapEncodeTiled(self, dtype, rank, ptr, dims, strides, box, elem_strides, interleave, swizzle,
                               promotion, oob):
        self.maps.append(dict(dtype=dtype, rank=rank, ptr=ptr, dims=dims, strides=strides, box=box,
                              swizzle=swizzle, oob=oob))

        class _Map:
            opaque = [len(self.maps)] * 16
        return 0, _Map()


def _kparam_sizes(cubin: Path, kernel: str) -> list[int]:
    """Parameter sizes by ordinal, read from the cubin's EIATTR_KPARAM_INFO records."""
    elf = subprocess.run([CUOBJDUMP, "-elf", str(cubin)], capture_output=True, text=True, check=True).stdout
    section = elf[elf.index(f".nv.info.{kernel}"):]
    found = {int(o, 16): int(sz, 16) for o, sz in
             re.findall(r"Ordinal\s*:\s*(0x[0-9a-f]+)\s+Offset\s*:\s*0x[0-9a-f]+\s+Size\s*:\s*(0x[0-9a-f]+)", section)}
    return [found[i] for i in range(len(found))]


def test_kernel_args_match_the_kernel_signature(cache, monkeypatch):
    """The launcher's tensor maps and parameter bytes, checked on CPU tensors with a fake driver,
    against the parameter sizes nvcc recorded in the cubin (when a toolkit is here)."""
    fake = _FakeDriver()
    monkeypatch.setattr(jit, "_driver", lambda: fake)
    ggc._tma_param_for.cache_clear()  # maps are cached by their arguments: build them afresh here
    m, n, k, e = 300, 1001, 384, 3
    a, a_scale, b, b_scale, ids = _operands(m, n, k, e)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    cfg = ggc.ContiguousConfig(112, 4)
    args = ggc.kernel_args(a, a_scale, b, b_scale, ids, out, cfg)
    map_a, map_b = fake.maps
    assert map_a["dims"] == [k, m] and map_a["strides"] == [k] and map_a["box"] == [128, 128]
    assert map_b["dims"] == [k, n, e] and map_b["strides"] == [k, n * k] and map_b["box"] == [128, 112, 1]
    assert map_a["swizzle"] == map_b["swizzle"] == "CU_TENSOR_MAP_SWIZZLE_128B"
    assert map_a["ptr"] == a.data_ptr() and map_b["ptr"] == b.data_ptr()
    assert list(args[2]) == list(args[0])  # no TMA-store epilogue: A's map again, unused
    assert [a.value for a in args[3:]] == [a_scale.data_ptr(), b_scale.data_ptr(), ids.data_ptr(),
                                           out.data_ptr(), m, 0, 0, 0]  # no split tail, no row count: nulls
    rows_in_use = torch.tensor([128], dtype=torch.int32)
    with_count = ggc.kernel_args(a, a_scale, b, b_scale, ids, out, cfg, rows_in_use=rows_in_use)
    assert with_count[-1].value == rows_in_use.data_ptr()
    assert ggc.num_tiles(m, n, cfg) == 3 * 9
    # the TMA-store epilogue's map: out [M, N] bf16 in 64 x 64 boxes, 128-byte swizzle
    n8 = 1000
    out8 = torch.empty(m, n8, dtype=torch.bfloat16)
    b8, b8_scale = b[:, :n8].contiguous(), b_scale
    tcfg = ggc.ContiguousConfig(256, 3, pingpong=False, two_acc=True, part_n=128, unit_accs=1, tma_store=True)
    ggc.kernel_args(a, a_scale, b8, b8_scale, ids, out8, tcfg)
    map_out = fake.maps[-1]
    assert map_out["dtype"] == "CU_TENSOR_MAP_DATA_TYPE_BFLOAT16" and map_out["ptr"] == out8.data_ptr()
    assert map_out["dims"] == [n8, m] and map_out["strides"] == [2 * n8] and map_out["box"] == [64, 64]
    assert map_out["swizzle"] == "CU_TENSOR_MAP_SWIZZLE_128B"
    if not HAVE_NVCC or CUOBJDUMP is None:
        pytest.skip("no nvcc/cuobjdump to read the kernel's parameter sizes")
    spec = ggc.kernel_spec(n, k, cfg)
    assert _kparam_sizes(jit.compile_cubin(spec), spec.kernel_name) == [ctypes.sizeof(p) for p in args]


def test_launch_passes_grid_cluster_and_param_pointers(monkeypatch):
    """CompiledKernel.launch with cuda-python's real structs and the two driver calls stubbed:
    the config carries grid, block, smem, stream and a 1x1x1 cluster; kernelParams is a void*[]
    of the parameters' addresses."""
    driver = pytest.importorskip("cuda.bindings.driver")
    import threading
    seen = {}

    def set_attr(function, attr, value):
        seen["attr"] = (function, attr, value)
        return (driver.CUresult.CUDA_SUCCESS,)

    def launch(config, function, params, extra):
        seen["grid"] = (config.gridDimX, config.gridDimY, config.gridDimZ)
        seen["block"] = (config.blockDimX, config.blockDimY, config.blockDimZ)
        seen["smem"], seen["stream"] = config.sharedMemBytes, int(config.hStream)
        attr = config.attrs[0]
        seen["cluster"] = (attr.id, attr.value.clusterDim.x, attr.value.clusterDim.y, attr.value.clusterDim.z)
        seen["ptrs"] = list((ctypes.c_void_p * 3).from_address(params))
        return (driver.CUresult.CUDA_SUCCESS,)

    monkeypatch.setattr(driver, "cuFuncSetAttribute", set_attr)
    monkeypatch.setattr(driver, "cuLaunchKernelEx", launch)
    kernel = object.__new__(jit.CompiledKernel)
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
    assert seen["cluster"] == (driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION, 1, 1, 1)
    assert seen["ptrs"] == [ctypes.addressof(p) for p in params]


def test_load_kernel_is_memoized_per_device(monkeypatch, tmp_path):
    """The launch path compiles/loads once per (binary, device), then only looks up a dict."""
    calls = []
    cubin = tmp_path / "k.cubin"
    cubin.write_bytes(b"\x7fELF")
    monkeypatch.setattr(jit, "compile_cubin", lambda spec: calls.append("compile") or cubin)
    monkeypatch.setattr(jit, "_ensure_context", lambda index: calls.append(f"ctx{index}"))
    monkeypatch.setattr(jit, "CompiledKernel", lambda spec, data: ("loaded", spec.kernel_name, data))
    monkeypatch.setattr(jit, "_loaded", {})
    spec = _fake_spec(tmp_path)
    first = jit.load_kernel(spec, 0)
    assert jit.load_kernel(spec, 0) is first
    jit.load_kernel(spec, 1)
    assert calls == ["compile", "ctx0", "compile", "ctx1"]


def test_config_choice_printed_once(capsys):
    ggc.select_config(4096, 4096, 132, verbose=True)
    ggc.select_config(4096, 4096, 132, verbose=True)
    assert capsys.readouterr().out.count("grouped_gemm_contiguous m=4096 N=4096") == 1


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


def test_split_tail_is_checked_and_keys_the_kernel():
    """The split tail needs the unit-chain loop, K/128 a multiple of 8 (its chunks) and the
    contiguous layout; it is a compile-time switch, so it keys the kernel."""
    with pytest.raises(ValueError, match="config.split_tail"):
        ggc.ContiguousConfig(128, 4, split_tail=True)  # one-accumulator loop
    with pytest.raises(ValueError, match="config.split_tail"):
        ggc.ContiguousConfig(128, 4, pingpong=False, two_acc=True, k_unroll=8, split_tail=True)
    cfg = ggc.ContiguousConfig(256, 4, cluster=2, pingpong=False, two_acc=True, part_n=128, unit_accs=1,
                               split_tail=True)
    with pytest.raises(ValueError, match="config.split_tail.*K=384"):
        ggc.kernel_spec(4096, 384, cfg)
    with pytest.raises(ValueError, match="config.split_tail.*masked"):
        ggc.kernel_spec(4096, 7168, cfg, masked_max_m=128)
    plain = ggc.kernel_spec(4096, 7168, dataclasses.replace(cfg, split_tail=False))
    split = ggc.kernel_spec(4096, 7168, cfg)
    assert split.constants["SPLIT_TAIL"] == 1 and plain.constants["SPLIT_TAIL"] == 0
    assert split.kernel_name != plain.kernel_name


@pytest.mark.parametrize("units,workers,k_blocks", [(1024, 66, 56), (1792, 66, 16), (4096, 66, 56), (160, 132, 56),
                                                    (8192, 66, 56), (7168, 66, 16), (50, 66, 56), (133, 132, 8),
                                                    (200, 7, 64), (66, 66, 56)])
def test_split_tail_plan_covers_every_k_block_once(units, workers, k_blocks):
    """The schedule's invariants: every K block of every unit computed exactly once; a split
    unit has one finalizer (its first K blocks) waiting for exactly the workers that hold the
    rest, all after it; a worker hands over at most one partial, at the start of its run, and
    finalizes at most one unit, at the end of it (so no worker waits on one still busy with
    its own earlier pieces); the tail takes fewer chunk-rounds than a whole unit."""
    plan = ggc.split_tail_plan(units, workers, k_blocks)
    covered = {}
    holders = {}
    for w, pieces in enumerate(plan):
        for i, (unit, kb0, count, kind, others) in enumerate(pieces):
            assert count > 0 and kb0 % ggc.SPLIT_QUANTUM == 0 and count % ggc.SPLIT_QUANTUM == 0
            for kb in range(kb0, kb0 + count):
                assert (unit, kb) not in covered, f"unit {unit} K block {kb} computed twice"
                covered[unit, kb] = w
            holders.setdefault(unit, []).append((w, kb0, kind, others))
            if kind == "contributor":  # the first piece after the round-robin whole units
                assert kb0 > 0 and all(p[3] == "whole" and p[0] < units - units % workers for p in pieces[:i])
            if kind == "finalizer":
                assert i == len(pieces) - 1 and kb0 == 0
    assert len(covered) == units * k_blocks
    for unit, hs in holders.items():
        if len(hs) == 1:
            assert hs[0][2] == "whole"
            continue
        hs.sort(key=lambda h: h[1])
        finalizer = hs[0]
        assert finalizer[2] == "finalizer" and [h[2] for h in hs[1:]] == ["contributor"] * (len(hs) - 1)
        assert [h[0] for h in hs] == list(range(finalizer[0], finalizer[0] + len(hs)))
        assert finalizer[3] == len(hs) - 1
    if any(len(hs) > 1 for hs in holders.values()):  # split: the busiest worker does less than a whole extra unit
        busiest = max(sum(count for _, _, count, _, _ in pieces) for pieces in plan)
        assert busiest < k_blocks * (units // workers + 1)


def test_split_tail_plan_needs_whole_chunks():
    with pytest.raises(ValueError, match="k_blocks"):
        ggc.split_tail_plan(100, 66, 12)
