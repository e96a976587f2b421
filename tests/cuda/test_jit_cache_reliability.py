"""The JIT cache under concurrency and damage, with real processes (tests/cuda/_jit_worker.py):
several processes compiling one kernel at once publish one valid entry; a truncated or corrupt
entry is rebuilt once; an unwritable (read-only, full, not-a-directory) cache falls back to a
temporary directory with a warning. No GPU needed; the nvcc case skips without a toolkit."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_backend.cuda import jit

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORKER = HERE / "_jit_worker.py"
PROCESSES = 4

try:
    jit.find_nvcc()
    HAVE_NVCC = True
except jit.JITError:
    HAVE_NVCC = False


def _race(mode: str, cache: Path, tmp_path: Path, processes: int = PROCESSES) -> tuple[list[str], int, list[str]]:
    """Starts `processes` workers that call compile_cubin at the same instant; returns their cubin
    paths, how many compiles ran, and their stderr."""
    inc = tmp_path / "inc"
    inc.mkdir(exist_ok=True)
    counter = tmp_path / "calls"
    env = {
        **os.environ,
        "MOE_BACKEND_CACHE_DIR": str(cache),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    }
    go = time.time() + 2.0  # after every interpreter has started
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), mode, str(counter), str(inc), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(processes)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    calls = len(counter.read_text().splitlines()) if counter.exists() else 0
    return [o[0].strip().splitlines()[-1] for o in outs], calls, [o[1] for o in outs]


def _assert_valid(cubin: Path) -> None:
    meta = json.loads(cubin.with_suffix(".json").read_text())
    data = cubin.read_bytes()
    assert meta["size"] == len(data) and meta["sha256"] == hashlib.sha256(data).hexdigest()


def _leftovers(cache: Path) -> list[Path]:
    """Anything but published entries and their locks: half-written files, build dirs."""
    return [p for p in cache.rglob("*") if p.is_file() and p.suffix not in (".cubin", ".json", ".lock")]


def test_processes_compiling_at_once_publish_one_entry(tmp_path):
    cache = tmp_path / "cache"
    paths, calls, _ = _race("fake", cache, tmp_path)
    assert len(set(paths)) == 1 and calls == 1, (paths, calls)
    _assert_valid(Path(paths[0]))
    assert len(list(cache.rglob("*.cubin"))) == 1 and not _leftovers(cache)


@pytest.mark.skipif(not HAVE_NVCC, reason="nvcc not found (CUDA toolkit)")
def test_processes_compiling_at_once_with_real_nvcc(tmp_path):
    cache = tmp_path / "cache"
    paths, calls, _ = _race("nvcc", cache, tmp_path, processes=3)
    assert len(set(paths)) == 1 and calls == 1, (paths, calls)
    cubin = Path(paths[0])
    _assert_valid(cubin)
    assert cubin.read_bytes()[:4] == b"\x7fELF"


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_damaged_entry_is_rebuilt_once_by_racing_processes(tmp_path, damage):
    cache = tmp_path / "cache"
    (first,), calls, _ = _race("fake", cache, tmp_path, processes=1)
    cubin = Path(first)
    good = cubin.read_bytes()
    cubin.write_bytes(good[: len(good) // 3] if damage == "truncate" else bytes([good[0] ^ 1]) + good[1:])
    paths, calls, errs = _race("fake", cache, tmp_path)
    assert set(paths) == {first} and calls == 2  # the first build, then one rebuild
    assert cubin.read_bytes() == good
    _assert_valid(cubin)
    assert sum("rebuilding invalid cache entry" in e for e in errs) == 1


def _assert_fell_back(paths: list[str], errs: list[str], cache: Path) -> None:
    for path, err in zip(paths, errs):
        assert "cannot be written" in err and str(cache) in err, err  # the warning names both dirs
        assert not path.startswith(str(cache)) and "moe_backend-jit-" in path
        _assert_valid(Path(path))


def test_cache_path_that_is_not_a_directory_falls_back(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    cache = blocker / "cache"
    paths, _, errs = _race("fake", cache, tmp_path, processes=2)
    _assert_fell_back(paths, errs, cache)


def test_full_cache_disk_falls_back(tmp_path):
    cache = tmp_path / "cache"
    paths, _, errs = _race("disk-full", cache, tmp_path, processes=2)
    _assert_fell_back(paths, errs, cache)


def _read_only(cache: Path, on: bool) -> None:
    """Makes the cache read-only, or writable again. Root writes through permission bits, so for
    root the directories and files are made immutable (`chattr +i`), which stops root too."""
    paths = [cache, *cache.rglob("*")]
    if os.geteuid() == 0:
        done = subprocess.run(["chattr", "+i" if on else "-i", *map(str, paths)], capture_output=True)
        if done.returncode and on:
            subprocess.run(["chattr", "-i", *map(str, paths)], capture_output=True)
            pytest.skip(f"running as root, and chattr cannot make the cache immutable here: {done.stderr!r}")
        return
    for p in paths:
        p.chmod((stat.S_IRUSR | stat.S_IXUSR if p.is_dir() else stat.S_IRUSR) if on else stat.S_IRWXU)


def test_read_only_cache_falls_back_and_still_serves_its_entries(tmp_path):
    cache = tmp_path / "cache"
    (built,), _, _ = _race("fake", cache, tmp_path, processes=1)
    _read_only(cache, True)
    try:
        # A kernel the read-only cache holds is served from it, no warning.
        paths, calls, errs = _race("fake", cache, tmp_path, processes=1)
        assert paths == [built] and calls == 1 and not any("cannot be written" in e for e in errs)
        # A kernel it lacks is compiled into a temporary directory, with a warning.
        (tmp_path / "inc" / "extra.cuh").write_text("// changes the key\n")
        paths, _, errs = _race("fake", cache, tmp_path, processes=2)
        _assert_fell_back(paths, errs, cache)
    finally:
        _read_only(cache, False)


def test_fallback_in_process_warns_once(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MOE_BACKEND_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(jit, "_fallback_roots", {})

    def fake(src, cubin, spec):
        cubin.write_bytes(b"\x7fELF " + spec.source.encode())
        return ""

    fake.compiler_id = "fake-once"
    specs = [jit.KernelSpec(family="f", kernel_name="k", source=f"// {i}\n", include_dirs=()) for i in range(3)]
    with pytest.warns(RuntimeWarning, match="cannot be written") as record:
        paths = [jit.compile_cubin(s, compiler=fake) for s in specs]
    assert len(record) == 1 and len({p.parent for p in paths}) == 1
    assert jit.entry_meta(specs[0], compiler=fake)["kernel_name"] == "k"
