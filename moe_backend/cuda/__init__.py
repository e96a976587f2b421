"""CUDA C++ kernels for Hopper (sm_90a), compiled at first use by `moe_backend.cuda.jit`.

Importing this package is cheap: it needs neither nvcc nor cuda-python until a kernel is built
or launched. `python -m moe_backend.cuda warmup` compiles the configs DeepSeek-V3 needs.
Ops live in modules named after them (as in `moe_backend.kernels`):
`moe_backend.cuda.grouped_gemm_contiguous.grouped_gemm_contiguous`,
`moe_backend.cuda.grouped_gemm_masked.grouped_gemm_masked`. By role: `config` (the launch
config), `heuristic` (its choice), `launch` (rendering and launching), `jit` and `driver`
(compile cache, driver API); the kernel's headers: `scheduler.cuh`, `mainloop.cuh`,
`epilogue.cuh` under `grouped_gemm_contiguous.cuh` (docs/cuda_kernel.md).
"""
