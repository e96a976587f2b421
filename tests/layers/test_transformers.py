"""Our layer against Hugging Face transformers' own DeepseekV3MoE on a tiny config (if installed)."""

import pytest
import torch

from moe_backend.layers import DeepseekV3MoE
from moe_backend.quant import dequantize_fp8_blockwise
from moe_backend.testing import random_moe_weights
from tests.helpers.naive import rel_err
from tests.helpers.tolerances import LAYER_UNQUANTIZED

modeling = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
DeepseekV3Config = pytest.importorskip("transformers").DeepseekV3Config


def test_matches_transformers_deepseek_v3_moe(tiny_config):
    c = tiny_config
    hf_config = DeepseekV3Config(
        hidden_size=c.hidden_size,
        moe_intermediate_size=c.moe_intermediate_size,
        n_routed_experts=c.n_routed_experts,
        num_experts_per_tok=c.num_experts_per_tok,
        n_group=c.n_group,
        topk_group=c.topk_group,
        routed_scaling_factor=c.routed_scaling_factor,
        norm_topk_prob=True,
        n_shared_experts=c.n_shared_experts,
        num_hidden_layers=1,
        vocab_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        q_lora_rank=64,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=32,
        v_head_dim=32,
    )
    weights = dict(random_moe_weights(c, seed=11))
    ours = DeepseekV3MoE(c)
    ours.load_weights(weights.items())

    def deq(prefix):
        return dequantize_fp8_blockwise(weights[prefix + ".weight"], weights[prefix + ".weight_scale_inv"])

    theirs = modeling.DeepseekV3MoE(hf_config).float().eval()
    with torch.no_grad():
        theirs.gate.weight.copy_(weights["gate.weight"].float())
        theirs.gate.e_score_correction_bias.copy_(weights["gate.e_score_correction_bias"])
        for e in range(c.n_routed_experts):
            theirs.experts.gate_up_proj[e].copy_(
                torch.cat([deq(f"experts.{e}.gate_proj"), deq(f"experts.{e}.up_proj")])
            )
            theirs.experts.down_proj[e].copy_(deq(f"experts.{e}.down_proj"))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            getattr(theirs.shared_experts, proj).weight.copy_(deq(f"shared_experts.{proj}"))

    x = torch.randn(1, 29, c.hidden_size, dtype=torch.bfloat16)
    with torch.no_grad():
        want = theirs(x.float())
    got = ours(x)
    # transformers runs unquantized activations in fp32: the FP8 activation rounding is the gap.
    assert rel_err(got, want) < LAYER_UNQUANTIZED
    # and the routing agrees exactly
    from moe_backend.layers.router import noaux_tc_route

    _, hf_w, hf_ids = theirs.gate(x.float())
    w, ids = noaux_tc_route(x.view(-1, c.hidden_size), ours.gate_weight, ours.e_score_correction_bias, c)
    assert torch.equal(ids.sort(-1).values.long(), hf_ids.sort(-1).values)
    assert torch.allclose(w.sort(-1).values, hf_w.sort(-1).values, rtol=1e-6)
