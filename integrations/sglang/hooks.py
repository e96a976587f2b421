"""The three AROUND hooks on SGLang's `Fp8MoEMethod` (see PATCHES.md for why they exist).

SGLang 0.5.23's `Fp8MoEMethod.create_moe_runner` builds a `MoeRunner` only for a fixed list of
built-in backend names, and its `apply` builds quant info only for those; a registered runner
core is never reached from the FP8 path on its own. For `--moe-runner-backend phasemoe` and a
block-FP8 layer the hooks build our runner and hand it the layer's weights. On CPU,
`process_weights_after_loading_block_quant` repacks the experts for AMX (or asserts AMX is
there); our runner reads the checkpoint layout, so for phasemoe that repack is skipped. Every
other case falls through to the original methods untouched.
"""

from __future__ import annotations

import logging
from types import ModuleType

from moe_backend_integrations.sglang import BACKEND_NAME

__all__ = ["install_fp8_hooks", "check_fp8_layer_supported"]

logger = logging.getLogger(__name__)

_CREATE_TARGET = "sglang.srt.layers.quantization.fp8.Fp8MoEMethod.create_moe_runner"
_APPLY_TARGET = "sglang.srt.layers.quantization.fp8.Fp8MoEMethod.apply"
_PROCESS_TARGET = "sglang.srt.layers.quantization.fp8.Fp8MoEMethod.process_weights_after_loading_block_quant"
_installed = False


def install_fp8_hooks(fp8: ModuleType) -> None:
    """Registers and applies the hooks; raises unless SGLang reports them applied."""
    global _installed
    if _installed:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookSource, HookType

    if not hasattr(fp8, "Fp8MoEMethod"):
        raise RuntimeError(f"{fp8.__name__} has no Fp8MoEMethod (not sglang 0.5.23?)")
    source = HookSource(plugin_name=BACKEND_NAME, dist_name="moe-backend")
    HookRegistry.register(_CREATE_TARGET, _around_create_moe_runner, HookType.AROUND, source=source)
    HookRegistry.register(_APPLY_TARGET, _around_apply, HookType.AROUND, source=source)
    HookRegistry.register(_PROCESS_TARGET, _around_process_block_quant, HookType.AROUND, source=source)
    # Idempotent: targets already patched (by an earlier call or by load_plugins) are skipped.
    HookRegistry.apply_hooks()
    patched = getattr(HookRegistry, "_patched", set())
    missing = [t for t in (_CREATE_TARGET, _APPLY_TARGET, _PROCESS_TARGET) if t not in patched]
    if missing:
        raise RuntimeError(f"SGLang's HookRegistry did not apply {missing} (see its log above)")
    _installed = True


def _is_ours(backend) -> bool:
    return backend is not None and getattr(backend, "value", None) == BACKEND_NAME


def check_fp8_layer_supported(method, moe_runner_config) -> None:
    """Raises ValueError naming the fix for every FP8 MoE layer phasemoe cannot serve."""
    from sglang.srt.layers import deep_gemm_wrapper
    from sglang.srt.layers.moe.utils import get_moe_a2a_backend

    problems = []
    if getattr(method, "use_mxfp8", False) or getattr(method, "is_fp4_expert", False):
        problems.append("MXFP8/FP4 experts (phasemoe serves FP8 e4m3 weights with 128x128 block scales)")
    elif not method.block_quant or list(method.weight_block_size or []) != [128, 128]:
        problems.append(
            f"weight_block_size={method.weight_block_size} (phasemoe needs block-FP8 "
            f"with 128x128 blocks, as in DeepSeek-V3's checkpoint)"
        )
    cfg = moe_runner_config
    if cfg.activation != "silu" or not cfg.is_gated:
        problems.append(f"activation={cfg.activation!r}, is_gated={cfg.is_gated} (needs gated silu)")
    for name in ("gemm1_alpha", "gemm1_clamp_limit", "swiglu_limit"):
        if getattr(cfg, name, None) is not None:
            problems.append(f"{name}={getattr(cfg, name)} (not supported)")
    if cfg.apply_router_weight_on_input:
        problems.append("apply_router_weight_on_input=True (not supported)")
    a2a = get_moe_a2a_backend()
    if a2a.is_deepep():
        if not deep_gemm_wrapper.ENABLE_JIT_DEEPGEMM:
            problems.append(
                "--moe-a2a-backend deepep with SGLang's DeepGEMM JIT off: SGLang 0.5.23 "
                "routes FP8 DeepEP layers to the MoE runner only when it is on "
                "(SGLANG_ENABLE_JIT_DEEPGEMM=1 and sgl-deep-gemm installed)"
            )
        if deep_gemm_wrapper.DEEPGEMM_SCALE_UE8M0:
            problems.append("DeepEP with UE8M0-packed activation scales (Blackwell) is not supported")
    elif not a2a.is_none():
        problems.append(
            f"--moe-a2a-backend {a2a.value} (phasemoe supports none (TP) and deepep; "
            f"deepep_v2 dispatches into DeepGEMM's own layout)"
        )
    if problems:
        raise ValueError(
            f"--moe-runner-backend {BACKEND_NAME} cannot serve MoE layer "
            f"{getattr(cfg, 'layer_id', None)}: " + "; ".join(problems)
        )


def _around_create_moe_runner(original, self, layer, moe_runner_config, *args, **kwargs):
    from sglang.srt.layers.moe.utils import get_moe_runner_backend

    result = original(self, layer, moe_runner_config, *args, **kwargs)
    backend = get_moe_runner_backend()
    if not _is_ours(backend):
        return result
    from sglang.srt.layers.moe.moe_runner.runner import MoeRunner

    from moe_backend_integrations.sglang import check

    check()
    check_fp8_layer_supported(self, moe_runner_config)
    # The original stored the config and left runner=None for an unknown name; finish its job.
    self.runner = MoeRunner(backend, moe_runner_config)
    self._owns_moe_runner = True
    return result


def _around_apply(original, self, layer, dispatch_output, *args, **kwargs):
    runner = getattr(self, "runner", None)
    if runner is None or not _is_ours(runner.runner_backend):
        return original(self, layer, dispatch_output, *args, **kwargs)
    from moe_backend_integrations.sglang.core import PhaseMoeQuantInfo

    quant_info = PhaseMoeQuantInfo(
        w13_fp8=layer.w13_weight,
        w13_scale_inv=layer.w13_weight_scale_inv,
        w2_fp8=layer.w2_weight,
        w2_scale_inv=layer.w2_weight_scale_inv,
        ue8m0=getattr(self.quant_config, "scale_fmt", None) == "ue8m0",
    )
    return runner.run(dispatch_output, quant_info)


def _around_process_block_quant(original, self, layer, *args, **kwargs):
    import sglang.srt.layers.quantization.fp8 as fp8
    from sglang.srt.layers.moe.utils import get_moe_runner_backend

    # fp8._is_cpu: the flag the original's AMX branch tests (set at import from the CPU engine).
    if getattr(fp8, "_is_cpu", False) and _is_ours(get_moe_runner_backend()):
        return None  # our runner reads the checkpoint layout: no AMX repack (nor AMX needed)
    return original(self, layer, *args, **kwargs)
