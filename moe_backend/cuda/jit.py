"""Compile-on-first-use for the CUDA C++ kernels: nvcc -> cubin, cached on disk (loading and
launching through the CUDA driver API: `moe_backend.cuda.driver`).

Cache entry = `<cache>/<family>/<key>.cubin` plus a sidecar `<key>.json` (sha256 and size of the
cubin, the nvcc command, ptxas's register/spill report). The key is the sha256 of everything that
changes the binary: the rendered source, every header in this package, the template constants,
the target arch, the nvcc version string and the flags. A build happens in a private temp dir
under a per-key file lock (fcntl), so concurrent processes compile once; the cubin is published
with an atomic `os.replace`, then the sidecar. An entry whose sidecar is missing or disagrees
with the cubin (truncated or corrupt file) is rebuilt. A cache directory that cannot be written
(read-only, full, not a directory) is replaced, for the rest of the process, by a fresh temporary
one, with a warning naming both; valid entries already in a read-only cache are still used.

Switches (one `MOE_BACKEND_*` table in the README):
  MOE_BACKEND_CACHE_DIR      cache root (default ~/.cache/moe_backend/jit)
  MOE_BACKEND_JIT_VERBOSE=1  print each nvcc command, its time and ptxas's report to stderr
  MOE_BACKEND_JIT_DEBUG=1    build with -lineinfo and -DPHASEMOE_DEBUG: pipeline waits trap
                             after 5 s with a message instead of hanging (separate cache keys)
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

from moe_backend.env import ENV

__all__ = ["KernelSpec", "JITError", "compile_cubin", "warmup", "cache_dir", "find_nvcc", "find_cuobjdump"]

SOURCE_DIR = Path(__file__).resolve().parent
DEFAULT_ARCH = "sm_90a"
# -O3 and C++17 for `if constexpr`; ptxas -v reports registers, stack frame and spills, which
# the sidecar keeps (tests assert 0 spill bytes without a GPU).
BASE_FLAGS = ("-std=c++17", "-O3", "--expt-relaxed-constexpr", "-Xptxas=-v")
# Last resort when neither CUDA_HOME nor PATH names a toolkit.
DEFAULT_NVCC = ("/usr/local/cuda/bin/nvcc",)
# The cache layout version: bump it when the entry format changes.
_CACHE_FORMAT = 1


class JITError(RuntimeError):
    """nvcc or cuda-python missing, a compile error, or a driver-API failure (message says which)."""


@dataclass(frozen=True)
class KernelSpec:
    """One compiled kernel: a rendered .cu source, the extern "C" symbol it defines, and the
    constants it was rendered with (they are part of the key even though the source holds them,
    so a key can be read back from the sidecar)."""

    family: str  # cache sub-directory, e.g. "grouped_gemm_contiguous"
    kernel_name: str  # extern "C" __global__ symbol in `source`
    source: str  # the rendered translation unit
    constants: Mapping[str, int] = field(default_factory=dict)
    arch: str = DEFAULT_ARCH
    flags: tuple[str, ...] = ()  # extra nvcc flags beyond BASE_FLAGS
    include_dirs: tuple[Path, ...] = (SOURCE_DIR,)

    def gencode(self) -> str:
        # The -gencode spelling: `-arch=sm_90a` also runs a plain sm_90 pass that rejects wgmma
        # and setmaxnreg on some nvcc releases.
        num = self.arch.removeprefix("sm_")
        return f"-gencode=arch=compute_{num},code=sm_{num}"

    def nvcc_flags(self) -> tuple[str, ...]:
        return (*BASE_FLAGS, self.gencode(), *(f"-I{d}" for d in self.include_dirs), *self.flags, *env_flags())


def env_flags() -> tuple[str, ...]:
    """Flags the environment adds (part of the cache key like any other flag)."""
    if ENV.jit_debug:
        return ("-lineinfo", "-DPHASEMOE_DEBUG=1")
    return ()


# ------------------------------------------------------------------------------------------
# Toolchain


def find_nvcc() -> str:
    """nvcc from $CUDA_HOME/bin, then $PATH, then /usr/local/cuda/bin; JITError if none."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "bin" / "nvcc")
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(Path(on_path))
    candidates += [Path(p) for p in DEFAULT_NVCC]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise JITError(
        "nvcc not found: the CUDA kernels are compiled at first use and need the CUDA "
        "toolkit (12.3+ for sm_90a). Set CUDA_HOME or put nvcc on PATH."
    )


def find_cuobjdump() -> str | None:
    """cuobjdump beside nvcc, on PATH, or the copy Triton's wheel ships; None if none."""
    try:
        beside = Path(find_nvcc()).resolve().parent / "cuobjdump"
        if beside.is_file():
            return str(beside)
    except JITError:
        pass
    on_path = shutil.which("cuobjdump")
    if on_path:
        return on_path
    try:
        import triton  # noqa: PLC0415 - optional, only for its bundled binutils

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.is_file():
            return str(bundled)
    except ImportError:
        return None
    return None


@lru_cache(maxsize=None)
def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise JITError(f"{nvcc} --version failed: {out.stderr.strip()}")
    return out.stdout.strip()


def cache_dir() -> Path:
    return ENV.cache_dir


def _verbose() -> bool:
    return ENV.jit_verbose


# ------------------------------------------------------------------------------------------
# Cache key and entries


def _headers(include_dirs: Iterable[Path]) -> list[Path]:
    return sorted(p for d in include_dirs for p in Path(d).glob("*.cuh"))


def cache_key(spec: KernelSpec, compiler_id: str) -> str:
    """sha256 over source, every header the include dirs hold, constants, arch, flags and the
    compiler's identity (nvcc's version text). Hashing all headers, not just the included ones,
    can only cause a spurious rebuild, never a stale binary."""
    h = hashlib.sha256()

    def put(tag: str, data: str | bytes) -> None:
        data = data.encode() if isinstance(data, str) else data
        h.update(f"{tag}:{len(data)}:".encode())
        h.update(data)

    put("format", str(_CACHE_FORMAT))
    put("kernel", spec.kernel_name)
    put("source", spec.source)
    for path in _headers(spec.include_dirs):
        put(f"header:{path.name}", path.read_bytes())
    put("constants", json.dumps(dict(spec.constants), sort_keys=True))
    put("arch", spec.arch)
    # Flags without the -I paths: where the package is installed does not change the binary
    # (the headers' bytes are hashed above).
    put("flags", "\0".join((*BASE_FLAGS, spec.gencode(), *spec.flags, *env_flags())))
    put("compiler", compiler_id)
    return h.hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    cubin: Path
    meta: Path

    def read_meta(self) -> dict | None:
        try:
            return json.loads(self.meta.read_text())
        except (OSError, ValueError):
            return None

    def is_valid(self, key: str) -> bool:
        """True when the sidecar names this key and the cubin's size and sha256 match it."""
        meta = self.read_meta()
        if not meta or meta.get("key") != key or meta.get("format") != _CACHE_FORMAT:
            return False
        try:
            data = self.cubin.read_bytes()
        except OSError:
            return False
        return len(data) == meta.get("size") and hashlib.sha256(data).hexdigest() == meta.get("sha256")


def _entry(spec: KernelSpec, key: str, root: Path | None = None) -> CacheEntry:
    d = (root or _writable_root()) / spec.family
    return CacheEntry(d / f"{key}.cubin", d / f"{key}.json")


# Write failures that mean "this directory cannot hold the cache" (as opposed to a compile error).
_UNWRITABLE = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.EFBIG,
}
_fallback_roots: dict[Path, Path] = {}  # configured cache dir -> this process's temporary stand-in


def _writable_root() -> Path:
    configured = cache_dir()
    return _fallback_roots.get(configured, configured)


def _fall_back(configured: Path, exc: OSError) -> Path:
    if configured not in _fallback_roots:
        tmp = Path(tempfile.mkdtemp(prefix="moe_backend-jit-"))
        _fallback_roots[configured] = tmp
        warnings.warn(
            f"moe_backend JIT cache {configured} cannot be written ({exc.strerror or exc}); "
            f"compiling into the temporary directory {tmp} for this process (set "
            f"MOE_BACKEND_CACHE_DIR to a writable directory to keep the kernels)",
            RuntimeWarning,
            stacklevel=3,
        )
    return _fallback_roots[configured]


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# A compiler takes (source file, cubin path to write, spec) and returns its log text. The
# default runs nvcc; tests pass a fake one to exercise the cache without a toolkit.
Compiler = Callable[[Path, Path, KernelSpec], str]


def nvcc_compiler(src: Path, cubin: Path, spec: KernelSpec) -> str:
    nvcc = find_nvcc()
    cmd = [nvcc, *spec.nvcc_flags(), "-cubin", "-o", str(cubin), str(src)]
    if _verbose():
        print(f"[moe_backend.jit] {' '.join(cmd)}", file=sys.stderr, flush=True)
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise JITError(f"nvcc failed for {spec.kernel_name} ({spec.family}, {dict(spec.constants)}):\n{log}")
    if _verbose():
        print(
            f"[moe_backend.jit] {spec.kernel_name}: {time.monotonic() - start:.1f}s\n{log}", file=sys.stderr, flush=True
        )
    return log


def _compiler_id(compiler: Compiler | None) -> str:
    if compiler is None:
        return nvcc_version(find_nvcc())
    # A custom compiler names itself (part of the key); else its qualified name stands in.
    ident = getattr(compiler, "compiler_id", None)
    return ident or getattr(compiler, "__qualname__", type(compiler).__qualname__)


def compile_cubin(spec: KernelSpec, compiler: Compiler | None = None) -> Path:
    """Path of a valid cached cubin for `spec`, compiling it (once across processes) if needed."""
    compiler_id = _compiler_id(compiler)
    key = cache_key(spec, compiler_id)
    configured = cache_dir()
    root = _writable_root()
    entry = _entry(spec, key, configured)
    if entry.is_valid(key):  # also serves a read-only cache that already holds the kernel
        return entry.cubin
    try:
        return _build(spec, key, compiler, compiler_id, root)
    except OSError as exc:
        if exc.errno not in _UNWRITABLE or root != configured:
            raise
        return _build(spec, key, compiler, compiler_id, _fall_back(configured, exc))


def _build(spec: KernelSpec, key: str, compiler: Compiler | None, compiler_id: str, root: Path) -> Path:
    entry = _entry(spec, key, root)
    if entry.is_valid(key):
        return entry.cubin
    with _file_lock(entry.cubin.with_suffix(".lock")):
        if entry.is_valid(key):  # another process built it while we waited
            return entry.cubin
        if entry.cubin.exists() or entry.meta.exists():
            print(f"[moe_backend.jit] rebuilding invalid cache entry {entry.cubin}", file=sys.stderr)
        tmp_root = root / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"{key[:16]}-", dir=tmp_root) as tmp:
            src = Path(tmp) / f"{spec.kernel_name}.cu"
            src.write_text(spec.source)
            out = Path(tmp) / "kernel.cubin"
            start = time.monotonic()
            log = (compiler or nvcc_compiler)(src, out, spec)
            seconds = time.monotonic() - start
            data = out.read_bytes() if out.exists() else b""
            if not data:
                raise JITError(f"compiler produced no cubin for {spec.kernel_name}")
            meta = {
                "format": _CACHE_FORMAT,
                "key": key,
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "family": spec.family,
                "kernel_name": spec.kernel_name,
                "constants": dict(spec.constants),
                "arch": spec.arch,
                "flags": list(spec.nvcc_flags()),
                "compiler": compiler_id,
                "compile_seconds": round(seconds, 3),
                "log": log,
            }
            meta_tmp = Path(tmp) / "kernel.json"
            meta_tmp.write_text(json.dumps(meta, indent=1))
            entry.cubin.parent.mkdir(parents=True, exist_ok=True)
            # cubin first, sidecar last: a reader trusts the cubin only once a sidecar vouches for
            # its exact bytes, so a crash between the two renames leaves an entry that is rebuilt.
            os.replace(out, entry.cubin)
            os.replace(meta_tmp, entry.meta)
    return entry.cubin


def entry_meta(spec: KernelSpec, compiler: Compiler | None = None) -> dict | None:
    """The sidecar of `spec`'s cache entry (compile time, ptxas report), or None if not built."""
    key = cache_key(spec, _compiler_id(compiler))
    configured = _entry(spec, key, cache_dir())
    return configured.read_meta() if configured.meta.exists() else _entry(spec, key).read_meta()


def warmup(specs: Iterable[KernelSpec], progress: bool = True) -> list[Path]:
    """Compiles (or finds cached) every spec, with a progress bar; returns the cubin paths."""
    from moe_backend._progress import progress as bar_ctx  # noqa: PLC0415

    specs = list(specs)
    paths = []
    with bar_ctx(len(specs), "moe_backend JIT warm-up", unit="kernel", enabled=progress) as bar:
        for spec in specs:
            paths.append(compile_cubin(spec))
            bar.update(1)
    return paths
