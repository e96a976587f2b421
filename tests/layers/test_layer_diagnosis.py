"""tests/helpers/layer_diagnosis.py names the stage of a layer call that diverges from the
reference: nothing on a correct call, the routed experts when their executor corrupts a row, the
output alone when only the returned tensor is off. CPU, the property test's small layer."""

import pytest
import torch

from moe_backend import MoEConfig
from moe_backend import experts as experts_path
from moe_backend.layers import DeepseekV3MoE
from moe_backend.testing import random_moe_weights
from tests.helpers.layer_diagnosis import diagnose_layer_call

BOUND = 1e-2  # the property's layer bound at these sizes is 2e-2; bf16 output rounding is ~2e-3


@pytest.fixture
def layer_and_x():
    config = MoEConfig(
        hidden_size=128, moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=4, n_group=2, topk_group=1
    )
    layer = DeepseekV3MoE(config)
    layer.load_weights(random_moe_weights(config, seed=8))
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(3)).bfloat16()
    return layer, x


def test_a_correct_call_has_no_diverging_stage(layer_and_x):
    layer, x = layer_and_x
    diagnosis = diagnose_layer_call(layer, x, layer(x))
    assert diagnosis.stages_over(BOUND) == [], str(diagnosis)
    assert diagnosis.ids_equal and diagnosis.x_scale_equal and diagnosis.x_fp8_rows_differing == [0, 0, 0]
    assert max(diagnosis.output) < BOUND and diagnosis.shared is not None


def test_a_corrupted_output_row_is_the_output_stage_alone(layer_and_x):
    layer, x = layer_and_x
    out = layer(x)
    out[0] *= 1.05
    diagnosis = diagnose_layer_call(layer, x, out)
    assert diagnosis.stages_over(BOUND) == ["output"], str(diagnosis)
    assert diagnosis.output[0] > 0.04 and max(diagnosis.output[1:]) < BOUND


def test_a_corrupting_executor_is_the_routed_stage(layer_and_x, monkeypatch):
    layer, x = layer_and_x
    run_plan = experts_path.run_plan

    def off_by_five_percent(*args, **kwargs):
        y = run_plan(*args, **kwargs)
        y[0] *= 1.05
        return y

    monkeypatch.setattr(experts_path, "run_plan", off_by_five_percent)
    diagnosis = diagnose_layer_call(layer, x, layer(x))
    assert diagnosis.stages_over(BOUND) == ["routed", "routed_eager", "output"], str(diagnosis)
    assert diagnosis.routed[0] > 0.04 and max(diagnosis.routed[1:]) < BOUND
