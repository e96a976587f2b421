import json

import pytest

from moe_backend import MoEConfig

DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "hidden_size": 7168,
    "moe_intermediate_size": 2048,
    "n_routed_experts": 256,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "n_shared_experts": 1,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
}


def test_reads_deepseek_v3(tmp_path):
    cfg = MoEConfig.from_hf_config(DEEPSEEK_V3)
    assert (cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts) == (7168, 2048, 256)
    assert (cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group) == (8, 8, 4)
    assert cfg.routed_scaling_factor == 2.5 and cfg.norm_topk_prob and not cfg.ue8m0_scales
    path = tmp_path / "config.json"
    path.write_text(json.dumps(DEEPSEEK_V3))
    assert MoEConfig.from_hf_config(path) == cfg
    assert MoEConfig.from_hf_config(str(tmp_path)) == cfg  # a checkpoint folder


def test_reads_ue8m0_scale_fmt():
    hf = json.loads(json.dumps(DEEPSEEK_V3))
    hf["quantization_config"]["scale_fmt"] = "ue8m0"
    assert MoEConfig.from_hf_config(hf).ue8m0_scales


@pytest.mark.parametrize(
    "path, value, field",
    [
        (("scoring_func",), "softmax", "scoring_func"),
        (("topk_method",), "greedy", "topk_method"),
        (("quantization_config", "fmt"), "e5m2", "quantization_config.fmt"),
        (("quantization_config", "weight_block_size"), [64, 64], "weight_block_size"),
        (("quantization_config", "scale_fmt"), "e8m0fnu", "quantization_config.scale_fmt"),
        (("quantization_config", "quant_method"), "awq", "quantization_config.quant_method"),
        (("hidden_size",), 7000, "hidden_size"),
        (("topk_group",), 9, "topk_group"),
        (("n_group",), 7, "n_group"),
    ],
)
def test_unsupported_values_name_the_field(path, value, field):
    hf = json.loads(json.dumps(DEEPSEEK_V3))
    node = hf
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        MoEConfig.from_hf_config(hf)


def test_bad_argument_types(tmp_path):
    with pytest.raises(TypeError, match="cfg"):
        MoEConfig.from_hf_config(42)
    with pytest.raises(ValueError, match="cfg"):
        MoEConfig.from_hf_config(tmp_path / "missing.json")
