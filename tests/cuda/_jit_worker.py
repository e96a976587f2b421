"""One process of the JIT-cache tests: waits for a common start time, then compiles one spec.

argv: mode (fake | nvcc | disk-full), counter file, include dir, start time (epoch seconds).
Prints the cubin path on the last line of stdout; warnings go to stderr.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from pathlib import Path

from moe_backend.cuda import jit

TRIVIAL = 'extern "C" __global__ void phasemoe_race(float* p) { p[threadIdx.x] += 1.0f; }\n'


def fake_compiler(counter: Path):
    def compile_(src: Path, cubin: Path, spec: jit.KernelSpec) -> str:
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # long enough that the other processes arrive mid-build
        cubin.write_bytes(b"\x7fELF raced " * 32 + spec.source.encode())
        return ""

    compile_.compiler_id = "fake-race"
    return compile_


def counting_nvcc(counter: Path):
    def compile_(src: Path, cubin: Path, spec: jit.KernelSpec) -> str:
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        return jit.nvcc_compiler(src, cubin, spec)

    compile_.compiler_id = jit.nvcc_version(jit.find_nvcc())  # the real key, as the default compiler
    return compile_


def main() -> None:
    mode, counter, inc, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
    if mode == "disk-full":
        # A full disk, for the cache directory only: every write under it fails with ENOSPC.
        root = str(jit.cache_dir())
        real_write_text = Path.write_text

        def write_text(self, *args, **kwargs):
            if str(self).startswith(root):
                raise OSError(errno.ENOSPC, "No space left on device", str(self))
            return real_write_text(self, *args, **kwargs)

        Path.write_text = write_text
    if mode == "nvcc":
        spec = jit.KernelSpec(family="race", kernel_name="phasemoe_race", source=TRIVIAL, include_dirs=())
        compiler = counting_nvcc(counter)
    else:
        spec = jit.KernelSpec(family="race", kernel_name="k", source="// raced\n", include_dirs=(inc,))
        compiler = fake_compiler(counter)
    while time.time() < go:
        time.sleep(0.01)
    print(jit.compile_cubin(spec, compiler=compiler))


if __name__ == "__main__":
    main()
