"""The JIT: nvcc round trip and errors, the cache's keys, atomic publish, corruption recovery and
cross-process locking with a fake compiler (no toolkit needed for those)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moe_backend.cuda import jit

try:
    jit.find_nvcc()
    HAVE_NVCC = True
except jit.JITError:
    HAVE_NVCC = False
needs_nvcc = pytest.mark.skipif(not HAVE_NVCC, reason="nvcc not found (CUDA toolkit)")
REPO = Path(__file__).resolve().parents[2]


@needs_nvcc
def test_nvcc_roundtrip_and_warmup(cache):
    spec = jit.KernelSpec(
        family="trivial",
        kernel_name="phasemoe_trivial",
        source='extern "C" __global__ void phasemoe_trivial(float* x) { x[threadIdx.x] += 1.f; }\n',
        include_dirs=(),
    )
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
    fields = dict(family="fake", kernel_name="k", source="// kernel\n", constants={"N": 128}, include_dirs=(inc,))
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
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACE_SCRIPT, str(counter), str(inc), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1
    assert len(counter.read_text().splitlines()) == 1
    spec = jit.KernelSpec(family="race", kernel_name="k", source="// raced\n", include_dirs=(inc,))
    key = jit.cache_key(spec, "slow")
    assert jit.CacheEntry(Path(paths.pop()), cache / "race" / f"{key}.json").is_valid(key)
