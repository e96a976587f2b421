"""The non-finite policy on the GPU (docs/reliability.md): with MOE_BACKEND_CHECK_FINITE=1 the
layer names NaN/Inf and overflowing inputs; without it (no host sync) a bad row leaves every other
row as it was and the quantizers produce no NaN for it."""

from __future__ import annotations

import math

import pytest
import torch

from moe_backend.dispatch import Policy
from moe_backend.layers import DeepseekV3MoE
from moe_backend.testing import random_moe_weights
from tests.helpers.configs import SMALL_V3
from tests.helpers.naive import rel_err

pytestmark = pytest.mark.gpu

CONFIG = SMALL_V3
# Other rows with and without a bad row: the same kernels and tiles (same token count), so only a
# different row order inside an expert's segment could change a sum's order.
OTHER_ROWS = 1e-3


@pytest.fixture(scope="module")
def layer():
    m = DeepseekV3MoE(CONFIG, device="cuda")
    m.load_weights(random_moe_weights(CONFIG, seed=0, device="cuda"))
    return m


@pytest.mark.parametrize("bad", ["nan", "inf", "overflow"])
def test_checked_path_names_the_input(layer, bad, monkeypatch):
    monkeypatch.setenv("MOE_BACKEND_CHECK_FINITE", "1")
    x = torch.randn(7, CONFIG.hidden_size, device="cuda").bfloat16()
    if bad == "overflow":
        x[4] *= 1e25
        match = r"hidden_states: 1 row\(s\) \[4\] overflow"
    else:
        x[4, 11] = math.nan if bad == "nan" else math.inf
        match = r"hidden_states: holds NaN/Inf values in 1 row\(s\) \[4\]"
    with pytest.raises(ValueError, match=match):
        layer(x)


@pytest.mark.parametrize("kernel", ["contiguous", "masked", "triton"])
@pytest.mark.parametrize("bad", ["nan", "overflow"])
def test_unchecked_bad_row_leaves_other_rows(layer, kernel, bad, monkeypatch):
    monkeypatch.delenv("MOE_BACKEND_CHECK_FINITE", raising=False)
    layer.policy = (
        Policy(prefill_kernel=kernel, decode_max_tokens=0)
        if kernel == "contiguous"
        else Policy(decode_kernel=kernel, decode_max_tokens=1 << 20)
    )
    x = torch.randn(40, CONFIG.hidden_size, device="cuda").bfloat16()
    clean = layer(x)
    x_bad = x.clone()
    if bad == "nan":
        x_bad[17, 3] = math.nan
    else:
        x_bad[17] *= 1e30
    mixed = layer(x_bad)
    keep = torch.arange(40, device="cuda") != 17
    assert torch.isfinite(mixed[keep].float()).all()
    assert rel_err(mixed[keep].cpu(), clean[keep].cpu()) < OTHER_ROWS
