"""vLLM plugin: `vllm serve <DeepSeek-V3 FP8> --moe-backend phasemoe`.

vLLM loads `register` (entry point group `vllm.general_plugins`, name `phasemoe`) in every process
it starts, before it builds its argument parser and before it builds the model. Importing this
package costs nothing: `register` imports vLLM's config classes (already loaded by then) and leaves
the FP8 MoE oracle alone until vLLM imports it. Every private symbol touched is listed in
`PATCHES.md` beside this file.
"""

from __future__ import annotations

from moe_backend.constants import BACKEND_NAME

__all__ = ["register", "BACKEND_NAME", "SUPPORTED_VLLM"]

# BACKEND_NAME: the value of `--moe-backend` / `KernelConfig.moe_backend`.
# The patched symbols are private to vLLM: only this release line was read and tested.
SUPPORTED_VLLM = "0.33."


def register() -> None:
    """Make `phasemoe` a valid MoE backend in this process. Idempotent."""
    from moe_backend_integrations.vllm import _patches

    _patches.install()
