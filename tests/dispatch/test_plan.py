"""The per-batch plan: one place decides layout, providers, configs and fused steps; cached."""

import json

import pytest
import torch

from moe_backend import experts, reference
from moe_backend.dispatch import plan as plan_mod
from moe_backend.dispatch.plan import make_masked_plan, make_plan, max_contiguous_rows, thresholds
from moe_backend.dispatch.policy import KERNELS, Policy
from moe_backend.quant import quantize_fp8_blockwise

CPU = torch.device("cpu")


def _plan(policy=None, **kw):
    args = dict(num_tokens=128, topk=8, num_experts=32, num_global_experts=256, hidden=256,
                intermediate=128, device=CPU)
    args.update(kw)
    return make_plan(policy or Policy(), **args)


def test_plan_is_cached_and_static():
    a, b = _plan(), _plan()
    assert a is b  # one resolution per distinct shape
    assert a.phase == "decode" and a.layout == "contiguous" and a.kernel == "contiguous"
    assert a.expected_m == 4  # T*k / the model's 256 experts, not the 32 local ones
    assert a.num_rows == max_contiguous_rows(128 * 8, 32, a.alignment)
    assert a.gemm1.provider == a.gemm2.provider == "reference"  # CPU tensors
    assert (a.gemm1.n, a.gemm1.k, a.gemm2.n, a.gemm2.k) == (256, 256, 256, 128)


def test_phase_and_kernel_override():
    p = _plan(num_tokens=4096)
    assert p.phase == "prefill" and p.kernel == "contiguous"
    assert _plan(phase="prefill").phase == "prefill"
    assert _plan(kernel="triton_masked").layout == "masked"
    masked = _plan(Policy(decode_kernel="masked"))
    assert masked.layout == "masked" and masked.num_rows == 128  # max_m = T: never overflows
    with pytest.raises(ValueError, match="phase"):
        _plan(phase="warmup")


def test_masked_plan_follows_masked_kernel():
    p = make_masked_plan(Policy(masked_kernel="triton_masked"), num_experts=4, max_m=256, hidden=256,
                         intermediate=128, device=CPU, expected_m=9)
    assert p.kernel == "triton_masked" and p.layout == "masked" and p.num_rows == 256 and p.expected_m == 9
    assert make_masked_plan(Policy(), num_experts=4, max_m=256, hidden=256, intermediate=128,
                            device=CPU).expected_m == 256  # no hint: the bound


def test_fused_permute_quant_follows_rows_per_token():
    ratio = thresholds()["fused_permute_quant_max_rows_per_token"]
    ep = _plan(num_experts=32, num_global_experts=256)  # ~T rows: fused pays
    tp = _plan(num_experts=256, num_global_experts=256)  # 8T rows: quantize once, gather
    assert ratio == 3 and ep.fused_permute_quant and not tp.fused_permute_quant
    assert not _plan(quantized_input=True).fused_permute_quant  # nothing left to quantize


def test_thresholds_are_data_naming_their_source():
    data = json.loads(plan_mod.THRESHOLDS_FILE.read_text())
    for key in ("cuda_contiguous", "cuda_masked_min_rows", "fused_permute_quant_max_rows_per_token"):
        assert key in data and "docs/benchmarks.md" in data["meta"][key]


def test_print_plan(capsys):
    plan_mod.clear_plan_cache()
    _plan(Policy(print_plan=True), num_tokens=7)
    _plan(Policy(print_plan=True), num_tokens=7)
    out = capsys.readouterr().out
    assert out.count("[moe_backend] plan: decode T=7") == 1  # once per distinct plan
    assert "gemm1=reference" in out


@pytest.mark.parametrize("kernel", ["contiguous", "triton", "masked", "reference"])
@pytest.mark.parametrize("num_tokens, expert_start, local", [(1, 0, 8), (37, 4, 4), (200, 0, 8)])
def test_every_plan_computes_the_reference(kernel, num_tokens, expert_start, local):
    torch.manual_seed(num_tokens)
    hidden, inter, global_e = 256, 128, 8
    w13, w13_s = quantize_fp8_blockwise(torch.randn(local, 2 * inter, hidden) / hidden ** 0.5)
    w2, w2_s = quantize_fp8_blockwise(torch.randn(local, hidden, inter) / inter ** 0.5)
    x = torch.randn(num_tokens, hidden, dtype=torch.bfloat16)
    scores = torch.rand(num_tokens, global_e)
    w, ids = scores.topk(2, dim=-1)
    w = (w / w.sum(-1, keepdim=True)).float()
    ids[0, 0] = -1  # a dropped slot
    out = experts.routed_experts(x, w13, w13_s, w2, w2_s, w, ids, expert_start=expert_start,
                                 kernel=kernel, num_global_experts=global_e)
    ref = reference.routed_experts(x, w13, w13_s, w2, w2_s, w, torch.where(ids >= 0, ids - expert_start, -1))
    assert torch.equal(out, ref) or (out.float() - ref.float()).norm() <= 1e-2 * ref.float().norm()


def test_every_kernel_name_plans():
    for name in KERNELS:
        if KERNELS[name].impl in ("cuda", "deepgemm"):
            with pytest.raises(ValueError, match="CUDA"):
                _plan(kernel=name, num_tokens=3 + len(name))
        else:
            assert _plan(kernel=name, num_tokens=3 + len(name)).kernel == name


@pytest.mark.parametrize("kernel", ["contiguous", "masked", "reference"])
def test_a_batch_with_no_local_expert_gives_zeros(kernel):
    """An EP rank whose experts no token chose: every slot is another rank's (or dropped)."""
    w13, w13_s = quantize_fp8_blockwise(torch.randn(2, 256, 256) / 16)
    w2, w2_s = quantize_fp8_blockwise(torch.randn(2, 256, 128) / 16)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    ids = torch.tensor([[5, 6], [7, -1], [4, 3]])
    out = experts.routed_experts(x, w13, w13_s, w2, w2_s, torch.rand(3, 2), ids, kernel=kernel)
    assert out.shape == (3, 256) and torch.equal(out, torch.zeros_like(out))


def test_cuda_masked_layouts_we_build_are_sized_in_128_row_tiles(monkeypatch):
    """A masked layout built from top-k ids for our CUDA kernel is padded to its 128-row tiles."""
    monkeypatch.setattr(plan_mod, "gemm_provider", lambda impl, *a, **k: "cuda" if impl == "cuda" else "reference")
    monkeypatch.setattr(plan_mod, "_gemm", lambda provider, *a, **k: plan_mod.GemmPlan(provider, 1, 1))
    plan_mod.clear_plan_cache()
    try:
        assert _plan(kernel="cuda_masked", num_tokens=5).num_rows == 128
        assert _plan(kernel="triton_masked", num_tokens=5).num_rows == 5
    finally:
        plan_mod.clear_plan_cache()
