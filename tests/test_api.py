"""Pins the public API other code relies on (engine plugins, users' scripts)."""

import inspect

import moe_backend
from moe_backend import dispatch, layers, ops, quant, reference


def test_public_names():
    assert {"MoEConfig", "ENGINE_NAME", "__version__"} <= set(moe_backend.__all__)
    assert moe_backend.ENGINE_NAME == "phasemoe"
    assert callable(moe_backend.MoEConfig.from_hf_config)
    assert {"DeepseekV3MoE"} <= set(layers.__all__)
    for name in (
        "quantize_fp8_blockwise",
        "quantize_fp8_per_token_group",
        "dequantize_fp8_blockwise",
        "dequantize_fp8_per_token_group",
    ):
        assert name in quant.__all__
    for name in ("grouped_gemm_contiguous", "grouped_gemm_masked", "silu_mul_quant", "routed_experts"):
        assert name in reference.__all__
    for name in ("build_contiguous_layout", "build_masked_layout", "permute", "permute_quant", "unpermute_combine"):
        assert name in reference.__all__
    # dispatch: the layouts' data format and the policy; the builders are ops' (kernels) and the reference's (twins)
    assert set(dispatch.__all__) == {
        "ContiguousLayout",
        "MaskedLayout",
        "max_contiguous_rows",
        "Policy",
        "KernelChoice",
        "KERNELS",
    }
    for name in ("build_contiguous_layout", "build_masked_layout", "permute_quant", "unpermute_combine"):
        assert name in ops.__all__


def test_signatures():
    sig = inspect.signature(layers.DeepseekV3MoE.load_weights)
    assert list(sig.parameters) == ["self", "weights", "prefix"]
    sig = inspect.signature(layers.DeepseekV3MoE.load_from_checkpoint)
    assert list(sig.parameters) == ["self", "path", "layer_idx"]
    sig = inspect.signature(quant.quantize_fp8_blockwise)
    assert list(sig.parameters) == ["w", "block", "ue8m0"]
    sig = inspect.signature(quant.quantize_fp8_per_token_group)
    assert list(sig.parameters) == ["x", "group", "ue8m0"]
    for fn in (reference.grouped_gemm_contiguous, reference.grouped_gemm_masked):
        assert list(inspect.signature(fn).parameters)[:4] == ["a_fp8", "a_scale", "b_fp8", "b_scale"]
    # the ops front door mirrors the reference
    for name in ("grouped_gemm_contiguous", "grouped_gemm_masked"):
        ref_params = list(inspect.signature(getattr(reference, name)).parameters)
        assert list(inspect.signature(getattr(ops, name)).parameters)[: len(ref_params)] == ref_params


def test_import_is_light():
    import subprocess
    import sys

    code = (
        "import sys, moe_backend; "
        "print(sorted(m for m in ('triton', 'safetensors', 'vllm', 'sglang') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
