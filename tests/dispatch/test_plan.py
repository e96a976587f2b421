"""The per-batch plan: one place decides layout, providers, configs and fused steps; cached."""

import json
import os
import subprocess
import sys

import pytest
import torch

from moe_backend import experts, plan_execution, reference
from moe_backend.dispatch import gemm_choice
from moe_backend.dispatch import plan as plan_mod
from moe_backend.dispatch.plan import make_masked_plan, make_plan, max_contiguous_rows, thresholds
from moe_backend.dispatch.policy import KERNELS, Policy
from moe_backend.quant import quantize_fp8_blockwise

CPU = torch.device("cpu")


def _plan(policy=None, **kw):
    args = dict(
        num_tokens=128, topk=8, num_experts=32, num_global_experts=256, hidden=256, intermediate=128, device=CPU
    )
    args.update(kw)
    return make_plan(policy or Policy(), **args)


@pytest.fixture
def cuda_gemm_plans(monkeypatch):
    """Plans made as on a Hopper GPU whose GEMMs all go to our CUDA kernel (default configs), the
    plan cache cleared before and after."""
    monkeypatch.setattr(plan_mod, "gemm_provider", lambda impl, *a, **k: "cuda" if impl != "reference" else impl)
    monkeypatch.setattr(
        plan_mod, "gemm_plan", lambda provider, layout, m, rows, n, k, dev: plan_mod.GemmPlan(provider, n, k)
    )
    plan_mod.clear_plan_cache()
    yield
    plan_mod.clear_plan_cache()


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
    p = make_masked_plan(
        Policy(masked_kernel="triton_masked"),
        num_experts=4,
        max_m=256,
        hidden=256,
        intermediate=128,
        device=CPU,
        expected_m=9,
    )
    assert p.kernel == "triton_masked" and p.layout == "masked" and p.num_rows == 256 and p.expected_m == 9
    assert (
        make_masked_plan(Policy(), num_experts=4, max_m=256, hidden=256, intermediate=128, device=CPU).expected_m == 256
    )  # no hint: the bound


@pytest.mark.parametrize(
    "policy, kw, named",
    [
        (Policy(decode_kernel="cuda_masked"), {}, "policy key 'decode_kernel' ('cuda_masked')"),
        (Policy(prefill_kernel="deepgemm_contiguous"), {"num_tokens": 4096}, "policy key 'prefill_kernel'"),
        (Policy(), {"kernel": "cuda_contiguous"}, "kernel='cuda_contiguous'"),
    ],
)
def test_a_cuda_only_kernel_on_cpu_names_where_it_was_chosen(policy, kw, named):
    with pytest.raises(ValueError, match="runs on CUDA tensors only") as info:
        _plan(policy, **kw)
    assert named in str(info.value) and "MOE_BACKEND_POLICY" in str(info.value)
    with pytest.raises(ValueError, match="policy key 'masked_kernel' \\('deepgemm_masked'\\) runs on CUDA"):
        make_masked_plan(
            Policy(masked_kernel="deepgemm_masked"), num_experts=4, max_m=8, hidden=256, intermediate=128, device=CPU
        )
    assert Policy(decode_kernel="cuda_masked", masked_kernel="deepgemm_masked").cuda_only_keys() == [
        ("decode_kernel", "cuda_masked"),
        ("masked_kernel", "deepgemm_masked"),
    ]
    assert Policy().cuda_only_keys() == []


def test_fused_permute_quant_follows_rows_per_token():
    ratio = thresholds()["fused_permute_quant_max_rows_per_token"]
    ep = _plan(num_experts=32, num_global_experts=256)  # ~T rows: fused pays
    # 8 rows per token and little padding (8 experts): quantize each token once, then gather.
    dense = _plan(num_tokens=4096, num_experts=8, num_global_experts=8)
    # 8 rows per token, the static bound mostly padding: neither path touches the padding.
    padded = _plan(num_experts=256, num_global_experts=256)
    assert ratio == 3 and ep.fused_permute_quant and not dense.fused_permute_quant and not padded.fused_permute_quant
    assert not _plan(quantized_input=True).fused_permute_quant  # nothing left to quantize


def test_thresholds_are_data_naming_their_source():
    data = json.loads(gemm_choice.THRESHOLDS_FILE.read_text())
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
    w13, w13_s = quantize_fp8_blockwise(torch.randn(local, 2 * inter, hidden) / hidden**0.5)
    w2, w2_s = quantize_fp8_blockwise(torch.randn(local, hidden, inter) / inter**0.5)
    x = torch.randn(num_tokens, hidden, dtype=torch.bfloat16)
    scores = torch.rand(num_tokens, global_e)
    w, ids = scores.topk(2, dim=-1)
    w = (w / w.sum(-1, keepdim=True)).float()
    ids[0, 0] = -1  # a dropped slot
    out = experts.routed_experts(
        x, w13, w13_s, w2, w2_s, w, ids, expert_start=expert_start, kernel=kernel, num_global_experts=global_e
    )
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
    monkeypatch.setattr(plan_mod, "gemm_plan", lambda provider, *a, **k: plan_mod.GemmPlan(provider, 1, 1))
    monkeypatch.setattr(plan_mod, "dependent_launch_pays", lambda phase, device: False)
    cuda = torch.device("cuda", 0)
    plan_mod.clear_plan_cache()
    try:
        assert _plan(kernel="cuda_masked", num_tokens=5, device=cuda).num_rows == 128
        assert _plan(kernel="triton_masked", num_tokens=5, device=cuda).num_rows == 5
    finally:
        plan_mod.clear_plan_cache()


def test_gemm1_gathers_its_rows_where_its_triton_config_allows(monkeypatch):
    """Triton GEMM1 without TMA reads the token rows through src_token (no permute, nothing fused
    into one); a TMA config, another provider or the masked layout permutes as before."""
    tma = {"n": False}

    def fake_gemm(provider, layout, expected_m, rows_hint, n, k, device):
        cfg = dict(BLOCK_M=16, BLOCK_N=128, num_warps=4, num_stages=3, TMA=tma["n"])
        return plan_mod.GemmPlan(provider, n, k, tuple(sorted(cfg.items())) if provider == "triton" else None)

    monkeypatch.setattr(plan_mod, "gemm_provider", lambda impl, *a, **k: "triton" if impl != "reference" else impl)
    monkeypatch.setattr(plan_mod, "gemm_plan", fake_gemm)
    plan_mod.clear_plan_cache()
    try:
        gathers = _plan(kernel="triton")
        assert gathers.gather_a and not gathers.fused_permute_quant and "gather_a=True" in gathers.describe()
        assert not _plan(kernel="triton_masked").gather_a
        assert not _plan(kernel="reference").gather_a
        tma["n"] = True
        plan_mod.clear_plan_cache()
        assert not _plan(kernel="triton").gather_a
    finally:
        plan_mod.clear_plan_cache()


def test_a_narrow_tile_stays_on_the_masked_layout(monkeypatch):
    """A masked-table entry with NARROW_M keeps it on the masked layout; where that table serves
    the contiguous layout at decode (whose walk reads no NARROW_M, and where the narrow entry was
    not timed) the nearest entry tuned without one runs instead, the largest bucket below first;
    with none, the narrow entry's tile runs BLOCK_M wide."""
    from moe_backend.kernels import _gemm_config

    narrow = dict(BLOCK_M=32, BLOCK_N=128, SWAP_AB=True, NARROW_M=16, num_warps=4, num_stages=4)
    small = dict(BLOCK_M=16, BLOCK_N=128, K_UNROLL=2, SWAP_AB=True, num_warps=4, num_stages=3)
    large = dict(BLOCK_M=64, BLOCK_N=128, SWAP_AB=False, num_warps=4, num_stages=4)
    tables = {"grouped_gemm_masked": {"N=4096,K=7168": {4: small, 16: narrow, 64: large}}}
    monkeypatch.setattr(_gemm_config, "load_table", lambda kernel, device: tables.get(kernel, {}))
    cpu = torch.device("cpu")
    assert dict(gemm_choice._triton_config("masked", 16, 4096, 7168, cpu))["NARROW_M"] == 16
    for rows in (8, 16):
        contiguous = dict(gemm_choice._triton_config("contiguous", rows, 4096, 7168, cpu))
        assert contiguous["NARROW_M"] == 0
        assert (contiguous["BLOCK_M"], contiguous["K_UNROLL"], contiguous["num_stages"]) == (16, 2, 3)
    # no plain bucket below: the smallest above
    tables["grouped_gemm_masked"]["N=4096,K=7168"] = {16: narrow, 64: large}
    assert dict(gemm_choice._triton_config("contiguous", 16, 4096, 7168, cpu))["BLOCK_M"] == 64
    # every entry narrow: its tile, BLOCK_M wide
    tables["grouped_gemm_masked"]["N=4096,K=7168"] = {16: narrow}
    contiguous = dict(gemm_choice._triton_config("contiguous", 16, 4096, 7168, cpu))
    assert contiguous["NARROW_M"] == 0 and contiguous["BLOCK_M"] == 32


def test_cuda_gemm1_gathers_token_rows_where_the_layout_holds_several_per_token(cuda_gemm_plans):
    """Our CUDA GEMM1 reads the token rows through src_token where the layout holds at least
    `cuda_gather_a.min_rows_per_token` rows per token (TP8: all k slots local), and keeps the
    gathered copy (fused permute+quant) at about one row per token (EP8)."""
    need = thresholds()["cuda_gather_a"]["min_rows_per_token"]
    assert 1 < need <= 8
    tp8 = _plan(num_tokens=4096, num_experts=256, phase="prefill")  # 8 local rows per token
    assert tp8.gemm1.provider == "cuda" and tp8.gather_a and not tp8.fused_permute_quant
    ep8 = _plan(num_tokens=4096, num_experts=32, phase="prefill")  # about one local row per token
    assert ep8.gemm1.provider == "cuda" and not ep8.gather_a
    assert gemm_choice.cuda_gathers_rows(100, need * 100) and not gemm_choice.cuda_gathers_rows(100, need * 100 - 1)


def test_cuda_gemm1_stores_silu_quant_where_its_tiles_hold_whole_groups(cuda_gemm_plans, monkeypatch):
    """Our CUDA GEMM1 stores SiLU*up quant itself (no bf16 h, no kernel between the GEMMs) on the
    contiguous layout when I is a multiple of 128; the Triton GEMM1 and the
    masked layout keep the separate kernel; the JSON switch turns it off."""
    for local in (256, 32):
        plan = _plan(num_tokens=4096, num_experts=local, phase="prefill")
        assert plan.gemm1.provider == "cuda" and plan.silu_in_gemm1 and "silu_in_gemm1=True" in plan.describe()
    assert not gemm_choice.cuda_silu_in_gemm1(plan_mod.GemmPlan("cuda", 2 * 192, 7168))  # I = 192
    assert not gemm_choice.cuda_silu_in_gemm1(plan_mod.GemmPlan("triton", 512, 7168))
    off = {**thresholds(), "cuda_silu_in_gemm1": {"enabled": False}}
    monkeypatch.setattr(gemm_choice, "thresholds", lambda: off)
    assert not gemm_choice.cuda_silu_in_gemm1(plan_mod.GemmPlan("cuda", 512, 7168))


def test_stream_k_reaches_the_cuda_gemms_the_json_names(cuda_gemm_plans, monkeypatch):
    """dispatch_thresholds.json `cuda_stream_k` turns stream-K on per GEMM for our CUDA kernel on
    the contiguous layout from its `min_tokens`, GEMM1 gathering token rows (TP8) and GEMM2
    storing direct rows (EP8 from `cuda_direct_rows.min_tokens`) included."""
    from moe_backend.cuda.config import ContiguousConfig

    monkeypatch.setattr(
        plan_mod,
        "gemm_plan",
        lambda provider, layout, m, rows, n, k, dev: plan_mod.GemmPlan(
            provider, n, k, ContiguousConfig(256, cluster=2)
        ),
    )
    off = {**thresholds(), "cuda_stream_k": {"gemm1": False, "gemm2": False, "min_tokens": 0}}
    monkeypatch.setattr(gemm_choice, "thresholds", lambda: off)
    shipped = _plan(num_tokens=4096, num_experts=32, hidden=7168, intermediate=2048, phase="prefill")
    assert not shipped.gemm1.config.stream_k and not shipped.gemm2.config.stream_k
    on = {**thresholds(), "cuda_stream_k": {"gemm1": True, "gemm2": True, "min_tokens": 4096}}
    monkeypatch.setattr(gemm_choice, "thresholds", lambda: on)
    monkeypatch.setattr(plan_mod, "thresholds", lambda: on)
    plan_mod.clear_plan_cache()
    ep8 = _plan(num_tokens=4096, num_experts=32, hidden=7168, intermediate=2048, phase="prefill")
    assert ep8.gemm1.config.stream_k and ep8.gemm2.config.stream_k and not ep8.direct_rows
    fewer = _plan(num_tokens=2048, num_experts=32, hidden=7168, intermediate=2048, phase="prefill")
    assert not fewer.gemm1.config.stream_k and not fewer.gemm2.config.stream_k  # below min_tokens
    direct = _plan(num_tokens=16384, num_experts=32, hidden=7168, intermediate=2048, phase="prefill")
    assert direct.direct_rows and direct.gemm1.config.stream_k and direct.gemm2.config.stream_k
    # direct rows need pieces of at least as many K blocks as stages: K = 1024 gives chunks of 8
    deep = plan_mod.GemmPlan("cuda", 7168, 1024, ContiguousConfig(64, 6))
    assert gemm_choice.with_stream_k(deep, "gemm2", 8192, direct_rows=True).config.stream_k
    shallow = plan_mod.GemmPlan("cuda", 7168, 512, ContiguousConfig(64, 6))  # chunks of 4 < 6 stages
    assert gemm_choice.with_stream_k(shallow, "gemm2", 8192, direct_rows=True) is shallow
    assert gemm_choice.with_stream_k(shallow, "gemm2", 8192).config.stream_k
    tp8 = _plan(num_tokens=4096, num_experts=256, hidden=7168, intermediate=256, phase="prefill")
    assert tp8.gather_a and tp8.gemm1.config.stream_k and tp8.gemm2.config.stream_k
    only1 = {**thresholds(), "cuda_stream_k": {"gemm1": True, "gemm2": False, "min_tokens": 4096}}
    monkeypatch.setattr(gemm_choice, "thresholds", lambda: only1)
    plan_mod.clear_plan_cache()
    ep8 = _plan(num_tokens=4096, num_experts=32, hidden=7168, intermediate=2048, phase="prefill")
    assert ep8.gemm1.config.stream_k and not ep8.gemm2.config.stream_k
    # K = 384: three K blocks, chunks of one, shorter than the K loop's chains: never.
    g = plan_mod.GemmPlan("cuda", 512, 384, ContiguousConfig(128))
    assert gemm_choice.with_stream_k(g, "gemm2", 8192) is g
    assert gemm_choice.with_stream_k(plan_mod.GemmPlan("triton", 512, 7168, ()), "gemm2", 8192).config == ()


def test_padding_halves_reach_the_cuda_gemms_the_json_names(cuda_gemm_plans, monkeypatch):
    """dispatch_thresholds.json `cuda_skip_padding_halves` has our CUDA contiguous GEMMs skip the
    MMAs of tiles' all-padding halves (off as shipped), on single CTAs where `single_ctas` says so;
    never with stream-K, on the masked layout's configs or on other providers."""
    from moe_backend.cuda.config import ContiguousConfig

    monkeypatch.setattr(
        plan_mod,
        "gemm_plan",
        lambda provider, layout, m, rows, n, k, dev: plan_mod.GemmPlan(
            provider, n, k, ContiguousConfig(256, cluster=2)
        ),
    )
    assert not thresholds()["cuda_skip_padding_halves"]["enabled"]
    shipped = _plan(num_tokens=8192, num_experts=32, hidden=7168, intermediate=2048, phase="prefill")
    assert not shipped.gemm1.config.skip_padding_halves and not shipped.gemm2.config.skip_padding_halves
    for single in (False, True):
        on = {**thresholds(), "cuda_skip_padding_halves": {"enabled": True, "single_ctas": single}}
        monkeypatch.setattr(gemm_choice, "thresholds", lambda on=on: on)
        monkeypatch.setattr(plan_mod, "thresholds", lambda on=on: on)
        plan_mod.clear_plan_cache()
        for local, inter in ((32, 2048), (256, 256)):  # EP8 (direct rows) and TP8 (gathered rows)
            plan = _plan(num_tokens=8192, num_experts=local, hidden=7168, intermediate=inter, phase="prefill")
            for g in (plan.gemm1, plan.gemm2):
                assert g.config.skip_padding_halves and g.config.cluster == (1 if single else 2)
        assert f"gemm2=cuda n256{'' if single else ' pairs'} skip_padding_halves" in plan.describe()
        with_sk = plan_mod.GemmPlan("cuda", 512, 7168, ContiguousConfig(256, cluster=2, stream_k=True))
        assert gemm_choice.with_padding_halves(with_sk) is with_sk
        triton = plan_mod.GemmPlan("triton", 512, 7168, ())
        assert gemm_choice.with_padding_halves(triton) is triton


def test_token_bucket_rounds_up_to_few_sizes():
    from moe_backend.dispatch.plan import token_bucket

    assert [token_bucket(t, 2048) for t in (1, 2, 3, 5, 100, 256, 257, 300, 2047, 2048)] == [
        1,
        2,
        4,
        8,
        128,
        256,
        512,
        512,
        2048,
        2048,
    ]
    assert token_bucket(2049, 2048) == 0 and token_bucket(0, 2048) == 0  # past the limit / empty: no graph
    assert token_bucket(5, 0) == 0  # graphs off
    assert token_bucket(290, 300) == 300  # never past the limit (the static buffers' size)
    assert len({token_bucket(t, 2048) for t in range(1, 2049)}) == 9 + 7  # powers of two, then steps of 256


def test_cpu_plans_carry_no_graph():
    plan = make_plan(
        Policy(),
        num_tokens=8,
        topk=2,
        num_experts=4,
        num_global_experts=4,
        hidden=256,
        intermediate=128,
        device=torch.device("cpu"),
    )
    assert plan.graph_plan is None


@pytest.mark.parametrize("value, error", [(-1, ValueError), (True, TypeError), ("8", TypeError), (1.5, TypeError)])
def test_graph_max_tokens_is_checked(value, error):
    with pytest.raises(error, match="graph_max_tokens"):
        Policy(graph_max_tokens=value)


@pytest.mark.parametrize("kernel", ["contiguous", "masked"])
def test_plan_log_has_one_line_per_executed_plan(kernel, monkeypatch, tmp_path):
    """MOE_BACKEND_PLAN_LOG (tests/e2e count an engine's plans with it): every execution appends a
    line, cached plans included; without it nothing is written."""
    log = tmp_path / "plans.log"
    w13, w13_s = quantize_fp8_blockwise(torch.randn(2, 256, 256) / 16)
    w2, w2_s = quantize_fp8_blockwise(torch.randn(2, 256, 128) / 16)
    ids = torch.tensor([[0, 1], [1, -1], [0, 1]])

    def run(num_tokens):
        x = torch.randn(num_tokens, 256, dtype=torch.bfloat16)
        experts.routed_experts(x, w13, w13_s, w2, w2_s, torch.rand(num_tokens, 2), ids[:num_tokens], kernel=kernel)

    monkeypatch.setattr(plan_execution, "_PLAN_LOG", None)
    run(3)
    assert not log.exists()
    monkeypatch.setattr(plan_execution, "_PLAN_LOG", str(log))
    for num_tokens in (3, 1, 1):
        run(num_tokens)
    lines = log.read_text().splitlines()
    assert [line.split()[2:] for line in lines] == [["T=3", kernel], ["T=1", kernel], ["T=1", kernel]]
    assert {line.split()[0] for line in lines} == {str(os.getpid())}


def test_plan_log_path_comes_from_the_environment(tmp_path):
    env = dict(os.environ, MOE_BACKEND_PLAN_LOG=str(tmp_path / "p.log"))
    code = "import moe_backend.plan_execution as e; print(e._PLAN_LOG)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(tmp_path / "p.log")


def test_few_active_experts_split_k_to_fill_the_gpu(monkeypatch):
    """The Triton GEMMs of a decode batch whose expected work units (active local experts x tiles)
    number fewer than `split_k.min_units` may split K: SPLIT_K = the most slices K allows (powers of
    two up to max_split, each of >= min_k_blocks 128-wide blocks), SPLIT_MIN_UNITS = min_units for
    the kernel's device-side cut; larger batches, other providers and the masked layout do not."""

    def fake_gemm(provider, layout, expected_m, rows_hint, n, k, device):
        cfg = dict(BLOCK_M=16, BLOCK_N=128, num_warps=4, num_stages=3)
        return plan_mod.GemmPlan(provider, n, k, tuple(sorted(cfg.items())) if provider == "triton" else None)

    monkeypatch.setattr(plan_mod, "gemm_provider", lambda impl, *a, **k: "triton" if impl != "reference" else impl)
    monkeypatch.setattr(plan_mod, "gemm_plan", fake_gemm)
    t = thresholds()["split_k"]
    assert t["max_split"] in (2, 4, 8) and t["min_units"] > 0 and t["min_k_blocks"] >= 1
    ep8 = dict(num_experts=32, hidden=7168, intermediate=2048)
    tp8 = dict(num_experts=256, hidden=7168, intermediate=256)
    plan_mod.clear_plan_cache()
    try:
        for shape, tokens in ((ep8, 1), (ep8, 2), (ep8, 4), (ep8, 8), (tp8, 1), (tp8, 2), (tp8, 8), (ep8, 2048)):
            plan = _plan(kernel="triton", num_tokens=tokens, **shape)
            active = min(shape["num_experts"], -(-tokens * 8 * shape["num_experts"] // 256))
            for g in (plan.gemm1, plan.gemm2):
                units = active * -(-plan.expected_m // 16) * -(-g.n // 128)
                narrow = units <= t["narrow_max_units"]
                most = 1
                while (
                    most * 2 <= t["narrow_max_split" if narrow else "max_split"]
                    and (g.k // 128) % (most * 2) == 0
                    and g.k // 128 // (most * 2) >= t["min_k_blocks"]
                ):
                    most *= 2
                want = most if units < t["min_units"] else 1
                assert g.split_k == want, (shape, tokens, g)
                if want > 1:
                    bn = t["narrow_block_n"] if narrow else 128
                    assert g.triton_config["BLOCK_N"] == bn, (shape, tokens, g)
                    assert g.triton_config["SPLIT_MIN_UNITS"] == t["min_units"] * 128 // bn, (shape, tokens, g)
        one = _plan(kernel="triton", num_tokens=1, **tp8)
        assert one.gemm1.split_k > 1 and f"split_k={one.gemm1.split_k}" in one.describe()
        assert one.gemm1.triton_config["BLOCK_N"] == t["narrow_block_n"], "T = 1: 32 units, narrow n-tiles"
        assert one.gemm2.split_k == 1, "K = 256: two blocks, not split"
        assert _plan(kernel="triton", num_tokens=1, **ep8).gemm2.split_k > 1
        assert _plan(kernel="triton", num_tokens=2048, **ep8).gemm1.split_k == 1
        assert _plan(kernel="triton_masked", num_tokens=1, **tp8).gemm1.split_k == 1
        assert _plan(kernel="reference", num_tokens=1, **tp8).gemm1.split_k == 1
    finally:
        plan_mod.clear_plan_cache()


def test_gemm2_computes_its_activations_at_small_decode_batches(monkeypatch):
    """`Plan.silu_in_gemm2` (GEMM2 computes SiLU*up quant from GEMM1's output, no kernel between
    them): a decode batch up to `silu_in_gemm2.max_tokens` on the contiguous layout with a Triton
    GEMM2 without TMA and a K of at most `max_k_blocks` blocks; not above either, not at prefill, not
    on the masked layout, TMA or other providers."""

    def fake_gemm(provider, layout, expected_m, rows_hint, n, k, device):
        cfg = dict(BLOCK_M=16, BLOCK_N=128, num_warps=4, num_stages=3, TMA=expected_m > 64)
        return plan_mod.GemmPlan(provider, n, k, tuple(sorted(cfg.items())) if provider == "triton" else None)

    monkeypatch.setattr(plan_mod, "gemm_provider", lambda impl, *a, **k: "triton" if impl != "reference" else impl)
    monkeypatch.setattr(plan_mod, "gemm_plan", fake_gemm)
    t = thresholds()["silu_in_gemm2"]
    most = t["max_tokens"]
    assert 1 <= most <= 256 and t["max_k_blocks"] >= 1
    tp8 = dict(num_experts=256, hidden=7168, intermediate=128 * t["max_k_blocks"])
    long_k = dict(num_experts=32, hidden=7168, intermediate=128 * (t["max_k_blocks"] + 1))
    plan_mod.clear_plan_cache()
    try:
        one = _plan(kernel="triton", num_tokens=1, **tp8)
        assert one.silu_in_gemm2 and "silu_in_gemm2=True" in one.describe()
        assert _plan(kernel="triton", num_tokens=most, **tp8).silu_in_gemm2
        assert not _plan(kernel="triton", num_tokens=most + 1, **tp8).silu_in_gemm2
        assert not _plan(kernel="triton", num_tokens=1, **long_k).silu_in_gemm2, "GEMM2's K too long"
        assert not _plan(kernel="triton", num_tokens=1, phase="prefill", **tp8).silu_in_gemm2
        assert not _plan(kernel="triton_masked", num_tokens=1, **tp8).silu_in_gemm2
        assert not _plan(kernel="reference", num_tokens=1, **tp8).silu_in_gemm2
        assert "silu_in_gemm2" not in _plan(kernel="reference", num_tokens=1, **tp8).describe()
    finally:
        plan_mod.clear_plan_cache()


def test_a_plan_fusing_silu_into_a_non_triton_gemm2_is_refused():
    """The executor refuses `silu_in_gemm2` on a GEMM2 that cannot compute its A (the reference
    provider here) with a ValueError naming it, instead of feeding GEMM1's output as FP8 rows."""
    import dataclasses

    from moe_backend.plan_execution import run_plan
    from moe_backend.testing import random_fp8_weights, random_topk

    plan = _plan(num_tokens=2)
    assert plan.gemm2.provider == "reference" and not plan.silu_in_gemm2
    w13, w13_s = random_fp8_weights(32, 256, 256, device="cpu")
    w2, w2_s = random_fp8_weights(32, 256, 128, device="cpu")
    topk_w, topk_ids = random_topk(2, 256, 8)
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    args = (x, None, w13, w13_s, w2, w2_s, topk_w, topk_ids, 0, False)
    assert run_plan(plan, *args).shape == (2, 256)
    with pytest.raises(ValueError, match="silu_a"):
        run_plan(dataclasses.replace(plan, silu_in_gemm2=True), *args)


def test_decode_kernels_launch_as_dependents_on_hopper(monkeypatch):
    """`Plan.dependent_launch`: on a CUDA device of compute capability >= `dependent_launch.
    min_capability` for the phases listed (dispatch_thresholds.json); never on CPU, at prefill or on
    an older GPU. The rule reads the device's capability, faked here."""
    t = thresholds()["dependent_launch"]
    assert t["phases"] == ["decode"] and t["min_capability"] == 9
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert gemm_choice.dependent_launch_pays("decode", cuda)
    assert not gemm_choice.dependent_launch_pays("prefill", cuda)
    assert not gemm_choice.dependent_launch_pays("decode", CPU)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not gemm_choice.dependent_launch_pays("decode", cuda)
    plan = _plan(num_tokens=1)
    assert not plan.dependent_launch and "dependent_launch" not in plan.describe()


def test_dependent_launches_are_scoped_to_the_plan_block():
    """The launch options a kernel launcher adds: the kernel's `PDL` constexpr always, Triton's
    `launch_pdl` only inside `dependent_launches(True)` (this thread), restored on exit."""
    pytest.importorskip("triton")
    from moe_backend.kernels._dependent_launch import dependent_launches, launch_options

    assert launch_options() == {"PDL": False}
    with dependent_launches(True):
        assert launch_options() == {"PDL": True, "launch_pdl": True}
        with dependent_launches(False):
            assert launch_options() == {"PDL": False}
        assert launch_options()["PDL"]
    assert launch_options() == {"PDL": False}


def test_plans_launching_dependently_keep_the_silu_kernel_apart(monkeypatch):
    """With dependent launch the SiLU*up quant kernel between the GEMMs stays (its launch gap is
    hidden, and it was faster than GEMM2 computing its activations): `silu_in_gemm2` only without."""

    def fake_gemm(provider, layout, expected_m, rows_hint, n, k, device):
        cfg = dict(BLOCK_M=16, BLOCK_N=128, num_warps=4, num_stages=3)
        return plan_mod.GemmPlan(provider, n, k, tuple(sorted(cfg.items())) if provider == "triton" else None)

    monkeypatch.setattr(plan_mod, "gemm_provider", lambda impl, *a, **k: "triton" if impl != "reference" else impl)
    monkeypatch.setattr(plan_mod, "gemm_plan", fake_gemm)
    tp8 = dict(num_experts=256, hidden=7168, intermediate=256)
    plan_mod.clear_plan_cache()
    try:
        assert _plan(kernel="triton", num_tokens=1, **tp8).silu_in_gemm2
        monkeypatch.setattr(plan_mod, "dependent_launch_pays", lambda phase, device: phase == "decode")
        plan_mod.clear_plan_cache()
        plan = _plan(kernel="triton", num_tokens=1, **tp8)
        assert plan.dependent_launch and not plan.silu_in_gemm2, plan.describe()
        assert "dependent_launch=True" in plan.describe()
        assert not _plan(kernel="triton", num_tokens=1, phase="prefill", **tp8).dependent_launch
    finally:
        plan_mod.clear_plan_cache()


def test_deepgemm_contiguous_plans_read_their_rows_on_the_host(monkeypatch):
    """DeepGEMM's contiguous GEMM walks every block it is given, so its plans (and their graphs'
    plans) run on the rows in use, read on the host; its masked plans and ours do not."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(
        plan_mod, "gemm_provider", lambda impl, *a, **k: impl if impl in ("deepgemm", "triton") else "reference"
    )
    triton_cfg = tuple(sorted(dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, TMA=True).items()))
    monkeypatch.setattr(
        plan_mod,
        "gemm_plan",
        lambda provider, layout, m, rows, n, k, device: plan_mod.GemmPlan(
            provider, n, k, triton_cfg if provider == "triton" else None
        ),
    )
    monkeypatch.setattr(plan_mod, "segment_alignment", lambda gemms: 128)
    monkeypatch.setattr(plan_mod, "dependent_launch_pays", lambda phase, device: False)
    monkeypatch.setattr(plan_mod, "fused_permute_quant_pays", lambda *a: False)
    plan_mod.clear_plan_cache()
    try:
        dg = _plan(kernel="deepgemm_contiguous", num_tokens=1024, device=cuda)
        assert dg.rows_on_host and dg.graph_plan.rows_on_host and "rows_on_host=True" in dg.describe()
        masked = _plan(kernel="deepgemm_masked", num_tokens=64, device=cuda)
        assert not masked.rows_on_host and masked.graph_plan is not None
        ours = _plan(kernel="triton", num_tokens=1024, device=cuda)
        assert not ours.rows_on_host and ours.graph_plan is not None
    finally:
        plan_mod.clear_plan_cache()


def _rows_given_to_gemms(monkeypatch) -> list[int]:
    rows = []
    original = plan_execution.run_contiguous_gemm

    def recording(g, a_fp8, a_scale, b_fp8, b_scale, expert_ids, out, *args, **kwargs):
        assert a_fp8.shape[0] == a_scale.shape[0] == expert_ids.shape[0] == out.shape[-2]
        rows.append(a_fp8.shape[0])
        return original(g, a_fp8, a_scale, b_fp8, b_scale, expert_ids, out, *args, **kwargs)

    monkeypatch.setattr(plan_execution, "run_contiguous_gemm", recording)
    return rows


def test_a_plan_reading_rows_on_the_host_gives_its_gemms_the_rows_in_use(monkeypatch):
    """The rows in use, read with a host sync or passed by the caller (`layout_rows_in_use`), cut
    every GEMM operand; the output equals the plan run over the static bound, bit for bit."""
    torch.manual_seed(3)
    w13, w13_s = quantize_fp8_blockwise(torch.randn(8, 256, 256) / 16)
    w2, w2_s = quantize_fp8_blockwise(torch.randn(8, 256, 128) / 16)
    x = torch.randn(37, 256, dtype=torch.bfloat16)
    weights, ids = torch.rand(37, 2).softmax(-1), torch.randint(0, 32, (37, 2))  # an EP slice: ids 8-15 local
    plan = _plan(num_tokens=37, topk=2, num_experts=8, num_global_experts=32, kernel="contiguous")
    host = plan_mod.replace(plan, rows_on_host=True)
    operands = (x, None, w13, w13_s, w2, w2_s, weights, ids, 8, False)
    rows = _rows_given_to_gemms(monkeypatch)
    served = plan_execution.run_plan(plan, *operands)
    assert rows == [plan.num_rows] * 2
    used = int(experts.layout_rows_in_use(host, ids, expert_start=8))
    assert 0 < used < plan.num_rows and used % plan.alignment == 0
    rows.clear()
    assert torch.equal(plan_execution.run_plan(host, *operands), served)  # read with a host sync
    assert torch.equal(plan_execution.run_plan(host, *operands, used_rows=used), served)  # read earlier
    assert rows == [used] * 4
    rows.clear()
    plan_execution.run_plan(host, *operands, used_rows=10**9)  # past the bound: cut to it, nothing read past
    assert rows == [plan.num_rows] * 2


def test_used_rows_is_checked():
    w13, w13_s = quantize_fp8_blockwise(torch.randn(2, 256, 256) / 16)
    w2, w2_s = quantize_fp8_blockwise(torch.randn(2, 256, 128) / 16)
    x, ids = torch.randn(3, 256, dtype=torch.bfloat16), torch.tensor([[0, 1], [1, 0], [0, 1]])
    for bad, error in [(-1, ValueError), (2.5, TypeError)]:
        with pytest.raises(error, match="used_rows"):
            experts.routed_experts(x, w13, w13_s, w2, w2_s, torch.rand(3, 2), ids, used_rows=bad)


def test_rows_buckets_cover_the_rows_in_use_in_few_aligned_steps():
    plan = _plan(num_tokens=4096, kernel="contiguous")
    plan = plan_mod.replace(plan, alignment=128, num_rows=40000)
    buckets = {plan_mod.rows_bucket(r, plan) for r in range(1, 40001)}
    for rows in (1, 127, 128, 5632, 5633, 20000, 39999, 40000):
        b = plan_mod.rows_bucket(rows, plan)
        assert rows <= b <= plan.num_rows and (b % 128 == 0 or b == plan.num_rows)
        assert b - rows < max(128, rows / 16)  # at most one step past the rows in use
    assert len(buckets) < 120  # a few graphs per batch size, not one per routing


def test_only_the_cuda_gemm_stores_silu_quant():
    """A plan whose GEMM1 is not our CUDA kernel cannot ask it for SiLU*up quant: a clear error
    before any launch (the executor passes act_scale only for `Plan.silu_in_gemm1`)."""
    a = torch.zeros(4, 128)
    with pytest.raises(ValueError, match="act_scale: only our CUDA GEMM"):
        plan_execution.run_contiguous_gemm(
            plan_mod.GemmPlan("triton", 256, 128), a, a, a, a, a, a, 1, act_scale=torch.zeros(4, 1)
        )


def test_the_branch_on_absent_slots_where_most_are_not_local(monkeypatch):
    """The plan picks the combine's form from the share of experts this rank holds (the kernel gives
    the same bytes either way: the interpreter and GPU combine tests), and the executor hands it on."""
    share = thresholds()["combine_branch"]["max_local_share"]
    assert 0 < share < 1
    ep = _plan(num_experts=32, num_global_experts=256)
    assert ep.combine_branch and "combine_branch=True" in ep.describe()
    tp = _plan(num_experts=256, num_global_experts=256)
    assert not tp.combine_branch and "combine_branch" not in tp.describe()
    assert _plan(num_experts=int(share * 256), num_global_experts=256).combine_branch
    assert not _plan(num_experts=int(share * 256) + 1, num_global_experts=256).combine_branch
    assert not _plan(num_experts=32, num_global_experts=0).combine_branch  # global count unknown
    masked = make_masked_plan(Policy(), num_experts=4, max_m=64, hidden=256, intermediate=128, device=CPU)
    assert not masked.combine_branch

    seen = []
    real = plan_execution.ops.unpermute_combine

    def recording(*args, **kwargs):
        seen.append(kwargs.get("branch_on_slots"))
        return real(*args, **kwargs)

    monkeypatch.setattr(plan_execution.ops, "unpermute_combine", recording)
    w13, w13_s = quantize_fp8_blockwise(torch.randn(2, 256, 256) / 16)
    w2, w2_s = quantize_fp8_blockwise(torch.randn(2, 256, 128) / 16)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    ids_of = {8: torch.tensor([[0, 6], [7, 1], [4, 3]]), 2: torch.tensor([[0, 1], [1, 0], [0, 1]])}
    for kernel in ("contiguous", "masked"):
        for global_e, want in ((8, True), (2, False)):
            seen.clear()
            experts.routed_experts(
                x, w13, w13_s, w2, w2_s, torch.rand(3, 2), ids_of[global_e], kernel=kernel,
                num_global_experts=global_e,
            )  # fmt: skip
            assert seen == [want], (kernel, global_e)


def test_cuda_gemm2_stores_single_slot_rows_where_the_rank_holds_few_experts(cuda_gemm_plans, monkeypatch):
    """Our CUDA GEMM2 stores single-slot tokens' rows into the output (`Plan.direct_rows`) on the
    contiguous layout of an expert-parallel slice whose K spans enough blocks; not at TP (every
    slot local: no token has a single one), not on the Triton GEMM2, not with a short K, not when
    the global count is unknown, and not once the JSON switch is off."""
    share = thresholds()["cuda_direct_rows"]["max_local_share"]
    assert 0 < share < 1
    ep8 = _plan(num_tokens=16384, num_experts=32, intermediate=2048, phase="prefill")
    assert ep8.gemm2.provider == "cuda" and ep8.direct_rows and "direct_rows=True" in ep8.describe()
    assert not _plan(num_tokens=2048, num_experts=32, intermediate=2048, phase="prefill").direct_rows  # few tokens
    assert not _plan(num_tokens=16384, num_experts=256, intermediate=2048, phase="prefill").direct_rows
    assert not _plan(num_tokens=16384, num_experts=32, intermediate=256, phase="prefill").direct_rows  # K = 256
    assert not _plan(num_tokens=16384, num_experts=32, num_global_experts=0, intermediate=2048).direct_rows
    assert not gemm_choice.cuda_direct_rows(plan_mod.GemmPlan("triton", 7168, 2048), 16384, 32, 256)
    assert gemm_choice.cuda_direct_rows(plan_mod.GemmPlan("cuda", 7168, 2048), 16384, 32, 256)
    start = thresholds()["cuda_direct_rows"]["min_tokens"]
    assert not gemm_choice.cuda_direct_rows(plan_mod.GemmPlan("cuda", 7168, 2048), start - 1, 32, 256)
    off = {**thresholds(), "cuda_direct_rows": {**thresholds()["cuda_direct_rows"], "enabled": False}}
    monkeypatch.setattr(gemm_choice, "thresholds", lambda: off)
    assert not gemm_choice.cuda_direct_rows(plan_mod.GemmPlan("cuda", 7168, 2048), 16384, 32, 256)


def test_only_the_cuda_gemm_stores_direct_rows():
    """A plan whose GEMM2 is not our CUDA kernel cannot ask it to store rows into the output."""
    a = torch.zeros(4, 128)
    with pytest.raises(ValueError, match="direct: only our CUDA GEMM"):
        plan_execution.run_contiguous_gemm(
            plan_mod.GemmPlan("triton", 256, 128), a, a, a, a, a, a, 1, direct=(torch.zeros(4, 2), a)
        )


def test_combine_skipping_single_slot_tokens_on_the_reference_path():
    """ops.unpermute_combine(skip_single=True) on CPU (the reference): tokens with one local slot
    keep what `out` holds, the others get the combine; `out` is required."""
    from moe_backend import ops

    gen = torch.Generator().manual_seed(3)
    rows = torch.tensor([[0, -1, -1], [1, 2, -1], [-1, -1, -1], [-1, 3, -1]])
    weights = torch.rand(4, 3, generator=gen)
    y = torch.randn(4, 16, generator=gen).bfloat16()
    full = ops.unpermute_combine(y, rows, weights)
    out = torch.full((4, 16), 5.0, dtype=torch.bfloat16)
    ops.unpermute_combine(y, rows, weights, out, skip_single=True)
    assert (out[[0, 3]] == 5.0).all() and torch.equal(out[[1, 2]], full[[1, 2]])
    with pytest.raises(ValueError, match="out: skip_single"):
        ops.unpermute_combine(y, rows, weights, skip_single=True)


def test_an_unknown_global_expert_count_spreads_the_rows_over_the_local_experts():
    """`num_global_experts=0` (the count unknown, as for `slots` and the combine branch): the local
    experts stand for it, so 128 tokens x top-8 over 32 experts expect 32 rows each, not 1024."""
    plan_mod.clear_plan_cache()
    unknown = _plan(num_experts=32, num_global_experts=0)
    assert unknown.expected_m == _plan(num_experts=32, num_global_experts=32).expected_m == 32


def test_a_masked_layout_the_plan_builds_is_sized_for_the_cuda_kernel_before_it_is_chosen(monkeypatch):
    """Our CUDA masked kernel needs max_m in whole 128-row tiles. A layout the plan builds itself
    (max_m = tokens) is rounded up for it, so 130 tokens can run it (on 256 rows); an engine's
    layout keeps its max_m, and with it a provider that takes any."""
    seen = []

    def provider(impl, layout, n, k, expected_m, device, max_m=0, num_experts=0):
        seen.append(max_m)
        return "cuda" if max_m % 128 == 0 else "triton"

    monkeypatch.setattr(plan_mod, "gemm_provider", provider)
    monkeypatch.setattr(
        plan_mod, "gemm_plan", lambda provider, layout, m, rows, n, k, dev: plan_mod.GemmPlan(provider, n, k)
    )
    plan_mod.clear_plan_cache()
    try:
        built = _plan(kernel="masked", num_tokens=130)
        assert built.num_rows == 256 and built.gemm1.provider == built.gemm2.provider == "cuda"
        assert seen == [256, 256]
        seen.clear()
        engines = make_masked_plan(
            Policy(), num_experts=32, max_m=130, expected_m=33, hidden=256, intermediate=128, device=CPU
        )
        assert engines.num_rows == 130 and engines.gemm1.provider == "triton" and seen == [130, 130]
    finally:
        plan_mod.clear_plan_cache()
