"""The Triton layout builders on the GPU at DeepSeek-V3 shapes (top-8 of 256 experts, the EP8 and
TP8 slices): bit-identical to the torch twins (run on the same GPU) and checked against the
invariants, for decode and prefill batch sizes, uniform and skewed routing, both plans, int32 and
int64 ids; captured in a CUDA graph and replayed with new routing; the layouts fed to
permute_quant / silu_mul_quant / combine with padding rows poisoned. Run on the device:
`pytest -m gpu tests/kernels/test_build_layout_gpu.py`."""

from __future__ import annotations

import pytest
import torch

from moe_backend import ops, reference
from moe_backend.kernels import build_layout
from moe_backend.reference import layouts
from tests.helpers.layout_checks import assert_same_layout, check_contiguous_layout, check_masked_layout

pytestmark = pytest.mark.gpu

GLOBAL_EXPERTS, TOPK, HIDDEN = 256, 8, 7168
SLICES = {"ep8": (32, 64), "tp8": (256, 0)}  # local experts, first local id
DECODE_TOKENS, PREFILL_TOKENS = (1, 8, 32, 128, 256), (2048, 16384)


def _topk_ids(num_tokens: int, seed: int = 0, skew: float = 0.0, dtype=torch.int64) -> torch.Tensor:
    """Top-8 of 256 per token; `skew` > 0 makes some experts hot (log-popularity added to the logits)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.rand(num_tokens, GLOBAL_EXPERTS, device="cuda", generator=gen)
    if skew:
        logits = logits + skew * torch.linspace(0, 1, GLOBAL_EXPERTS, device="cuda").roll(70)
    return logits.topk(TOPK, dim=-1).indices.to(dtype).contiguous()


def _check_both(topk_ids, num_local, start, alignment, max_m=None, slots_per_program=None, check=True):
    kernel = build_layout.build_contiguous_layout(
        topk_ids, num_local, expert_start=start, alignment=alignment, slots_per_program=slots_per_program
    )
    twin = layouts.build_contiguous_layout(
        topk_ids, num_local, expert_start=start, alignment=alignment, exact_size=False
    )
    assert_same_layout(kernel, twin)
    if check:
        check_contiguous_layout(kernel, topk_ids, num_local, start, alignment)
    kernel = build_layout.build_masked_layout(
        topk_ids, num_local, expert_start=start, max_m=max_m, slots_per_program=slots_per_program
    )
    twin = layouts.build_masked_layout(topk_ids, num_local, expert_start=start, max_m=max_m, drop_overflow=True)
    assert_same_layout(kernel, twin)
    if check:
        check_masked_layout(kernel, topk_ids, num_local, start, max_m or max(topk_ids.shape[0], 1))


@pytest.mark.parametrize("alignment", [16, 128])
@pytest.mark.parametrize("num_tokens", DECODE_TOKENS + PREFILL_TOKENS)
@pytest.mark.parametrize("name", sorted(SLICES))
def test_kernel_equals_twin(name: str, num_tokens: int, alignment: int) -> None:
    num_local, start = SLICES[name]
    for seed, skew in enumerate([0.0, 4.0]):
        topk_ids = _topk_ids(num_tokens, seed, skew)
        # The invariants loop in Python over the slots' experts: checked on the smaller batches.
        _check_both(topk_ids, num_local, start, alignment, check=num_tokens <= 2048)


@pytest.mark.parametrize("num_tokens", [32, 2048])
def test_int32_ids(num_tokens: int) -> None:
    """int32 ids (what some routers give) in both plans, skewed routing."""
    _check_both(_topk_ids(num_tokens, seed=3, skew=4.0, dtype=torch.int32), *SLICES["ep8"], 16)


@pytest.mark.parametrize("num_tokens,slots_per_program", [(128, 32), (256, 256), (2048, 512)])
def test_plans_agree(num_tokens: int, slots_per_program: int) -> None:
    """The one-launch and chunked plans give the same layout (the default plan is the other one)."""
    for name, (num_local, start) in SLICES.items():
        topk_ids = _topk_ids(num_tokens, seed=5)
        _check_both(topk_ids, num_local, start, 16, slots_per_program=slots_per_program)


def test_edge_routings() -> None:
    """All tokens on one expert (masked overflow dropped), -1 ids, no local slot, T = 0."""
    one = torch.full((3000, 1), 70, dtype=torch.int32, device="cuda")
    _check_both(one, 32, 64, 128, max_m=100)
    _check_both(one[:100], 32, 64, 16, max_m=7)
    minus = _topk_ids(300, seed=6)
    minus[::3] = -1
    _check_both(minus, 32, 64, 16)
    _check_both(_topk_ids(600, seed=7), 8, 248, 16)  # the last 8 experts (a 32-way slice)
    _check_both(torch.full((40, 8), 3, dtype=torch.int64, device="cuda"), 32, 64, 16)  # nothing local
    empty = torch.zeros(0, 8, dtype=torch.int64, device="cuda")
    _check_both(empty, 32, 64, 128)


@pytest.mark.parametrize("num_tokens", [128, 2048])
def test_cuda_graph_replay(num_tokens: int) -> None:
    """Both plans captured once (decode: one launch; prefill: chunked) and replayed with new routing."""
    num_local, start = SLICES["ep8"]
    topk_ids = _topk_ids(num_tokens)
    ops.build_contiguous_layout(topk_ids, num_local, expert_start=start, alignment=16)  # compile outside
    ops.build_masked_layout(topk_ids, num_local, expert_start=start)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        contiguous = ops.build_contiguous_layout(topk_ids, num_local, expert_start=start, alignment=16)
        masked = ops.build_masked_layout(topk_ids, num_local, expert_start=start)
    for seed in (1, 2):
        topk_ids.copy_(_topk_ids(num_tokens, seed, skew=2.0 * seed))
        graph.replay()
        assert_same_layout(
            contiguous,
            layouts.build_contiguous_layout(topk_ids, num_local, expert_start=start, alignment=16, exact_size=False),
        )
        assert_same_layout(masked, layouts.build_masked_layout(topk_ids, num_local, expert_start=start))


def test_padding_rows_never_touched_downstream() -> None:
    """permute_quant and silu_mul_quant on kernel-built layouts leave padding rows poisoned; the
    rows holding tokens equal the twins'; combine never reads the poisoned rows. EP8 prefill-sized:
    the static contiguous layout's tail is most of its rows."""
    num_local, start = SLICES["ep8"]
    num_tokens, inter = 2048, 256
    gen = torch.Generator(device="cuda").manual_seed(9)
    x = torch.randn(num_tokens, HIDDEN, device="cuda", generator=gen).bfloat16()
    topk_ids = _topk_ids(num_tokens, seed=9)
    weights = torch.rand(num_tokens, TOPK, device="cuda", generator=gen)

    def poisoned(shape, cols):
        return (
            torch.full((*shape, cols), 0x7F, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn),
            torch.full((*shape, cols // 128), float("nan"), device="cuda"),
        )

    contiguous = ops.build_contiguous_layout(topk_ids, num_local, expert_start=start, alignment=128)
    masked = ops.build_masked_layout(topk_ids, num_local, expert_start=start)
    # The contiguous layout also passes its device-side count of rows in use: the tail is not visited.
    for layout, validity in (
        (contiguous, dict(expert_ids=contiguous.expert_ids, used_rows=contiguous.expert_offsets[-1:])),
        (masked, dict(masked_m=masked.masked_m)),
    ):
        rows = tuple(layout.src_token.shape)
        real = layout.src_token >= 0
        q, s = ops.permute_quant(x, layout.src_token, out=poisoned(rows, HIDDEN), used_rows=validity.get("used_rows"))
        assert bool((q[~real].view(torch.uint8) == 0x7F).all()) and bool(s[~real].isnan().all())
        rq, rs = ops.per_token_group_quant(x)
        assert torch.equal(q[real].view(torch.uint8), rq[layout.src_token[real]].view(torch.uint8))
        h = torch.randn(*rows, 2 * inter, device="cuda", generator=gen).bfloat16()
        h[~real] = float("nan")
        a, a_s = ops.silu_mul_quant(h, out=poisoned(rows, inter), **validity)
        assert bool((a[~real].view(torch.uint8) == 0x7F).all()) and bool(a_s[~real].isnan().all())
        ra, ras = reference.silu_mul_quant(h, **validity)
        # The GPU's exp differs from torch's by an ulp (tests/kernels/test_kernels_gpu.py): scales within
        # 1e-6, a rare fp8 value on a rounding boundary the other way.
        assert torch.allclose(a_s[real], ras[real], rtol=1e-6, atol=0)
        assert (a[real].float() != ra[real].float()).float().mean() < 1e-3
        y = torch.randn(*rows, 512, device="cuda", generator=gen).bfloat16()
        y[~real] = float("nan")
        out = ops.unpermute_combine(y, layout.row_of_slot, weights)
        ref = layouts.combine(y, layout, weights)
        assert torch.isfinite(out.float()).all()
        assert float((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
