"""Triton kernels, one op per file: `<op>.py` holds the kernel, its launcher and its config choice.

Nothing here is imported at package import time: `moe_backend.ops` loads a kernel module on the
first CUDA call, so CPU-only installs never need Triton.
"""
