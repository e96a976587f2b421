"""DeepseekV3MoE on CPU against the independent naive implementation (tests/helpers/naive.py)."""

import pytest
import torch

from moe_backend.dispatch import Policy
from moe_backend.layers import DeepseekV3MoE
from moe_backend.testing import random_moe_weights
from tests.helpers.naive import moe_forward, rel_err
from tests.helpers.tolerances import LAYER_SAME_QUANT, LAYER_UNQUANTIZED


def _layer(config, seed=0, **kwargs):
    weights = dict(random_moe_weights(config, seed=seed))
    layer = DeepseekV3MoE(config, **kwargs)
    layer.load_weights(weights.items())
    return layer, weights


@pytest.mark.parametrize("tokens", [1, 2, 17, 300])
def test_layer_matches_naive(tiny_config, tokens):
    layer, weights = _layer(tiny_config, seed=tokens)
    x = torch.randn(tokens, tiny_config.hidden_size, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert rel_err(out, moe_forward(x, weights, tiny_config, quantize=True)) < LAYER_SAME_QUANT
    assert rel_err(out, moe_forward(x, weights, tiny_config, quantize=False)) < LAYER_UNQUANTIZED


@pytest.mark.parametrize("kernel", ["contiguous", "triton_contiguous", "masked", "triton", "reference"])
def test_every_policy_kernel_gives_the_same_answer_on_cpu(tiny_config, kernel):
    layer, weights = _layer(tiny_config, seed=5)
    layer.policy = Policy(prefill_kernel=kernel, decode_max_tokens=0)
    x = torch.randn(23, tiny_config.hidden_size, dtype=torch.bfloat16)
    assert rel_err(layer(x), moe_forward(x, weights, tiny_config)) < LAYER_SAME_QUANT


def test_cuda_only_kernel_refuses_cpu_tensors(tiny_config):
    layer, _ = _layer(tiny_config)
    layer.policy = Policy(prefill_kernel="cuda_contiguous", decode_max_tokens=0)
    with pytest.raises(ValueError, match="runs on CUDA tensors only"):
        layer(torch.randn(3, tiny_config.hidden_size, dtype=torch.bfloat16))


def test_batch_shapes_and_empty(tiny_config):
    layer, _ = _layer(tiny_config)
    x = torch.randn(2, 3, tiny_config.hidden_size, dtype=torch.bfloat16)
    assert torch.equal(layer(x).view(6, -1), layer(x.view(6, -1)))
    empty = layer(torch.empty(0, tiny_config.hidden_size, dtype=torch.bfloat16))
    assert empty.shape == (0, tiny_config.hidden_size) and empty.dtype == torch.bfloat16


def test_router_on_an_empty_batch(tiny_config):
    """The demo's oracle routes the batch itself: zero tokens give `[0, k]` weights and ids."""
    from moe_backend.layers.router import noaux_tc_route

    layer, _ = _layer(tiny_config)
    weights, ids = noaux_tc_route(
        torch.empty(0, tiny_config.hidden_size, dtype=torch.bfloat16),
        layer.gate_weight,
        layer.e_score_correction_bias,
        tiny_config,
    )
    k = tiny_config.num_experts_per_tok
    assert weights.shape == (0, k) and weights.dtype == torch.float32
    assert ids.shape == (0, k) and ids.dtype == torch.int32


def test_experts_with_zero_tokens(tiny_config):
    """One token uses 4 of 16 experts: 12 experts see no rows; the result still matches."""
    layer, weights = _layer(tiny_config, seed=9)
    x = torch.randn(1, tiny_config.hidden_size, dtype=torch.bfloat16)
    assert rel_err(layer(x), moe_forward(x, weights, tiny_config)) < LAYER_SAME_QUANT


def test_ep_slices_sum_to_full_layer(tiny_config):
    weights = dict(random_moe_weights(tiny_config, seed=3))
    full = DeepseekV3MoE(tiny_config)
    full.load_weights(weights.items())
    x = torch.randn(37, tiny_config.hidden_size, dtype=torch.bfloat16)
    total = torch.zeros(x.shape, dtype=torch.float32)
    for rank, start in enumerate(range(0, 16, 4)):
        part = DeepseekV3MoE(tiny_config, expert_range=(start, start + 4), with_shared_experts=rank == 0)
        part.load_weights(weights.items())  # other slices' experts are skipped, not errors
        out = part(x)
        total += out.float()
        # a slice holds only its experts: compare with the naive layer restricted to them
        want = moe_forward(x, weights, tiny_config, experts=set(range(start, start + 4)), shared=rank == 0)
        assert rel_err(out, want) < LAYER_SAME_QUANT
    # bf16 rounding of each slice (~2e-3 each) bounds the difference
    assert rel_err(total, full(x)) < 1e-2


def test_unquantized_weights_are_quantized_on_load(tiny_config):
    bf16 = dict(random_moe_weights(tiny_config, seed=4, fp8=False))
    layer = DeepseekV3MoE(tiny_config)
    layer.load_weights(bf16.items())
    assert layer.w13_fp8.dtype == torch.float8_e4m3fn
    x = torch.randn(9, tiny_config.hidden_size, dtype=torch.bfloat16)
    # against the naive layer on the weights the layer quantized itself
    from moe_backend.quant import quantize_fp8_blockwise

    fp8 = {}
    for name, t in bf16.items():
        if name.endswith("proj.weight"):
            w, s = quantize_fp8_blockwise(t)
            fp8[name], fp8[name + "_scale_inv"] = w, s
        else:
            fp8[name] = t
    assert rel_err(layer(x), moe_forward(x, fp8, tiny_config)) < LAYER_SAME_QUANT


def test_ue8m0_checkpoint(tiny_config):
    import dataclasses

    config = dataclasses.replace(tiny_config, ue8m0_scales=True)
    layer = DeepseekV3MoE(config)
    layer.load_weights(random_moe_weights(config, seed=2, fp8=False))
    mantissa, _ = torch.frexp(layer.w13_scale_inv)
    assert bool((mantissa == 0.5).all())
    x = torch.randn(5, config.hidden_size, dtype=torch.bfloat16)
    assert torch.isfinite(layer(x).float()).all()


def test_casting_a_model_keeps_the_fp8_weights_and_the_fp32_router(tiny_config):
    """model.to(torch.bfloat16) / .half() on a model holding the layer leave its data formats alone."""
    layer, _ = _layer(tiny_config)
    x = torch.randn(6, tiny_config.hidden_size, dtype=torch.bfloat16)
    want = layer(x)
    dtypes = {n: b.dtype for n, b in layer.named_buffers()}
    model = torch.nn.Sequential(layer, torch.nn.Linear(4, 4))
    model.to(torch.bfloat16)
    model.half()
    model.to("cpu", torch.float64)
    assert {n: b.dtype for n, b in layer.named_buffers()} == dtypes
    assert model[1].weight.dtype == torch.float64  # other modules are cast as asked
    assert torch.equal(layer(x), want)


def test_a_restored_state_dict_is_a_loaded_layer(tiny_config):
    layer, _ = _layer(tiny_config)
    x = torch.randn(5, tiny_config.hidden_size, dtype=torch.bfloat16)
    restored = DeepseekV3MoE(tiny_config)
    restored.load_state_dict(layer.state_dict())
    assert torch.equal(restored(x), layer(x))
    on_meta = DeepseekV3MoE(tiny_config, device="meta")
    on_meta.load_state_dict(layer.state_dict(), assign=True)
    assert torch.equal(on_meta(x), layer(x))
    partial = DeepseekV3MoE(tiny_config)
    state = layer.state_dict()
    del state["w2_fp8"]
    partial.load_state_dict(state, strict=False)
    with pytest.raises(RuntimeError, match="load_weights"):
        partial(x)  # a partial state dict is not a whole set of weights


class TestBadInput:
    def test_forward(self, tiny_config):
        layer, _ = _layer(tiny_config)
        with pytest.raises(TypeError, match="hidden_states: expected dtype bfloat16"):
            layer(torch.randn(3, tiny_config.hidden_size))
        with pytest.raises(ValueError, match="hidden_states: last dim"):
            layer(torch.randn(3, 100, dtype=torch.bfloat16))
        bad = torch.randn(3, tiny_config.hidden_size, dtype=torch.bfloat16)
        bad[1, 5] = float("nan")
        with pytest.raises(ValueError, match="hidden_states: holds NaN"):
            layer(bad)
        with pytest.raises(TypeError, match="hidden_states: expected a torch.Tensor"):
            layer([1.0, 2.0])
        if torch.cuda.is_available():
            with pytest.raises(ValueError, match="hidden_states: expected a tensor on"):
                layer(bad.cuda())
        # non-contiguous input is accepted (reshaped), and gives the contiguous answer
        x = torch.randn(tiny_config.hidden_size, 4, dtype=torch.bfloat16).t()
        assert torch.equal(layer(x), layer(x.contiguous()))

    def test_forward_before_load(self, tiny_config):
        with pytest.raises(RuntimeError, match="load_weights"):
            DeepseekV3MoE(tiny_config)(torch.randn(1, tiny_config.hidden_size, dtype=torch.bfloat16))

    def test_load_lists_every_problem(self, tiny_config):
        weights = dict(random_moe_weights(tiny_config, seed=1))
        del weights["experts.3.up_proj.weight"]
        del weights["experts.5.down_proj.weight_scale_inv"]
        weights["experts.7.gate_proj.weight"] = weights["experts.7.gate_proj.weight"][:128]
        weights["experts.99.gate_proj.weight"] = weights["experts.1.gate_proj.weight"]
        weights["shared_experts.foo.weight"] = torch.zeros(1)
        w = weights["experts.2.down_proj.weight"].clone()
        w.view(torch.uint8)[0, 0] = 0x7F  # an FP8 NaN
        weights["experts.2.down_proj.weight"] = w
        weights["gate.e_score_correction_bias"] = torch.full((16,), float("nan"))
        layer = DeepseekV3MoE(tiny_config)
        with pytest.raises(ValueError) as info:
            layer.load_weights(weights.items())
        msg = str(info.value)
        for needle in (
            "missing: experts.3.up_proj.weight",
            "missing: experts.5.down_proj.weight_scale_inv",
            "shape: experts.7.gate_proj.weight",
            "extra: experts.99.gate_proj.weight",
            "extra: shared_experts.foo.weight",
            "nan: experts.2.down_proj.weight",
            "nan: gate.e_score_correction_bias",
        ):
            assert needle in msg, (needle, msg)

    def test_prefix(self, tiny_config):
        weights = [("model.layers.3.mlp." + n, t) for n, t in random_moe_weights(tiny_config)]
        DeepseekV3MoE(tiny_config).load_weights(weights, prefix="model.layers.3.mlp.")
        with pytest.raises(ValueError, match="outside prefix"):
            DeepseekV3MoE(tiny_config).load_weights(weights, prefix="model.layers.4.mlp.")

    def test_constructor(self, tiny_config):
        with pytest.raises(ValueError, match="expert_range"):
            DeepseekV3MoE(tiny_config, expert_range=(4, 20))
        with pytest.raises(TypeError, match="config"):
            DeepseekV3MoE({"hidden_size": 256})


def test_routed_experts_bad_inputs(tiny_config):
    from moe_backend.experts import routed_experts

    layer, _ = _layer(tiny_config)
    args = (layer.w13_fp8, layer.w13_scale_inv, layer.w2_fp8, layer.w2_scale_inv)
    x = torch.randn(4, tiny_config.hidden_size, dtype=torch.bfloat16)
    ids = torch.zeros(4, 2, dtype=torch.int32)
    w = torch.ones(4, 2)
    with pytest.raises(ValueError, match="topk_ids: expected 4 rows"):
        routed_experts(x, *args, w[:3], ids[:3])
    with pytest.raises(ValueError, match="topk_weights: expected shape"):
        routed_experts(x, *args, w[:, :1], ids)
    with pytest.raises(TypeError, match="x: expected dtype"):
        routed_experts(x, *args, w, ids, x_scale=torch.ones(4, 2))
    with pytest.raises(ValueError, match="x: expected 2 dims"):
        routed_experts(x[0], *args, w, ids)
    with pytest.raises(ValueError, match="w13_fp8: K"):
        routed_experts(torch.randn(4, 128, dtype=torch.bfloat16), *args, w, ids)
    with pytest.raises(TypeError, match="w2_fp8: expected dtype"):
        routed_experts(x, *args[:2], args[2].to(torch.bfloat16), args[3], w, ids)
    with pytest.raises(ValueError, match="w13_scale_inv: expected shape"):
        routed_experts(x, args[0], args[1][:, :1], *args[2:], w, ids)
    with pytest.raises(ValueError, match="w13_fp8: dim 1 is 2\\*I = 128; I .* must be a positive multiple of 128"):
        routed_experts(x, args[0][:, :128], args[1][:, :1], args[2][:, :, :64], args[3][:, :, :1], w, ids)
    assert routed_experts(x[:0], *args, w[:0], ids[:0]).shape == (0, tiny_config.hidden_size)
