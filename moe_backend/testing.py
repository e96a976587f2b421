"""What the tests, the demo, `python -m moe_backend tune` and the benchmarks share: random weights,
grouped-GEMM input builders, routing generators and timing.

Nothing on the serving path imports this module. Triton is imported inside the timing functions
only, so the rest works on a CPU box without it.
"""

from __future__ import annotations

import math
import statistics
import subprocess
import time
from typing import Callable, Iterator

import torch

from moe_backend.config import QUANT_BLOCK, MoEConfig
from moe_backend.constants import DEEPSEEK_V3_EXPERTS, DEEPSEEK_V3_TOPK
from moe_backend.quant import FP8_DTYPE, FP8_MAX

__all__ = [
    # random weights
    "random_moe_weights",
    "random_fp8_weights",
    # grouped-GEMM inputs
    "make_masked_inputs",
    "make_contiguous_inputs",
    "random_fp8_activations",
    # routing
    "parse_routing_exponent",
    "expert_popularity",
    "random_topk",
    "expert_counts",
    "zipf_counts",
    "cap_counts",
    "routed_counts",
    "describe_counts",
    # timing
    "time_graph",
    "interleaved_us",
    "sustained_us",
    "measure_ceilings",
]

# ---------------------------------------------------------------------------------------------
# Random weights
# ---------------------------------------------------------------------------------------------

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _random_fp8_weight(rows: int, cols: int, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    # Values use about a quarter of the fp8 range; scales vary x0.5..x1.5 per 128x128 block (a
    # uniform scale would hide scale-indexing bugs), sized so activations stay of unit order.
    w_fp8 = (
        (torch.randn(rows, cols, generator=gen, device=device) * (FP8_MAX / 4)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    )
    nb, kb = -(-rows // QUANT_BLOCK), -(-cols // QUANT_BLOCK)
    base = 4.0 / (FP8_MAX * math.sqrt(cols))
    scale = base * (0.5 + torch.rand(nb, kb, generator=gen, device=device))
    return w_fp8, scale


def random_moe_weights(
    config: MoEConfig,
    *,
    seed: int = 0,
    fp8: bool = True,
    experts: range | None = None,
    with_shared_experts: bool = True,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[str, torch.Tensor]]:
    """Random DeepSeek-V3 MoE weights under Hugging Face names, as `(name, tensor)` with names
    relative to the MoE block (`gate.weight`, `experts.3.up_proj.weight`, ...). fp8=False yields
    bf16 weights instead (the layer quantizes them on load). `experts` limits the routed experts
    generated (an expert-parallel slice); each expert's values depend only on (seed, expert), so
    slices agree with the full set."""
    hidden, inter = config.hidden_size, config.moe_intermediate_size
    gen = torch.Generator(device=device).manual_seed(seed)
    yield (
        "gate.weight",
        (torch.randn(config.n_routed_experts, hidden, generator=gen, device=device) / math.sqrt(hidden)).to(
            torch.bfloat16
        ),
    )
    yield "gate.e_score_correction_bias", 0.1 * torch.rand(config.n_routed_experts, generator=gen, device=device)
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    for i in experts if experts is not None else range(config.n_routed_experts):
        gen.manual_seed(seed * 1_000_003 + i + 1)
        for proj in _PROJECTIONS:
            yield from _projection(f"experts.{i}.{proj}", *shapes[proj], fp8, gen, device)
    if with_shared_experts and config.n_shared_experts:
        gen.manual_seed(seed * 1_000_003 + config.n_routed_experts + 1)
        shared = inter * config.n_shared_experts
        shared_shapes = {"gate_proj": (shared, hidden), "up_proj": (shared, hidden), "down_proj": (hidden, shared)}
        for proj in _PROJECTIONS:
            yield from _projection(f"shared_experts.{proj}", *shared_shapes[proj], fp8, gen, device)


def _projection(name: str, rows: int, cols: int, fp8: bool, gen, device):
    if fp8:
        w_fp8, scale = _random_fp8_weight(rows, cols, gen, device)
        yield f"{name}.weight", w_fp8
        yield f"{name}.weight_scale_inv", scale
    else:
        yield (
            f"{name}.weight",
            (torch.randn(rows, cols, generator=gen, device=device) / math.sqrt(cols)).to(torch.bfloat16),
        )


def random_fp8_weights(
    num_experts: int, n: int, k: int, device: torch.device | str = "cuda"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(b_fp8 `[E, N, K]`, b_scale f32 `[E, ceil(N/128), K/128]`): one grouped GEMM's weights,
    quantized with 128x128 block scales one expert at a time (an fp32 `[E, N, K]` would not fit)."""
    from moe_backend.quant import quantize_fp8_blockwise

    b = torch.empty(num_experts, n, k, dtype=FP8_DTYPE, device=device)
    bs = torch.empty(num_experts, -(-n // QUANT_BLOCK), k // QUANT_BLOCK, dtype=torch.float32, device=device)
    for i in range(num_experts):
        b[i], bs[i] = quantize_fp8_blockwise(torch.randn(n, k, device=device) * 0.05)
    return b, bs


# ---------------------------------------------------------------------------------------------
# Grouped-GEMM inputs
# ---------------------------------------------------------------------------------------------


def _per_expert(e: int, m) -> torch.Tensor:
    """int64 `[E]` rows per expert: `m` for each (an int), or `m` itself (per-expert counts)."""
    if isinstance(m, torch.Tensor):
        if m.shape != (e,):
            raise ValueError(f"m: expected an int or counts of shape [{e}], got shape {list(m.shape)}")
        return m.to(torch.int64).cpu()
    return torch.full((e,), int(m), dtype=torch.int64)


def make_masked_inputs(e: int, m, n: int, k: int, weights=None, device: torch.device | str = "cuda"):
    """(a_fp8 `[E, max_m, K]`, a_scale, b_fp8, b_scale, masked_m int32 `[E]`): the masked layout of
    m rows per expert (an int, or per-expert counts `[E]`; max_m the largest, at least 1);
    `weights` reuses a `random_fp8_weights` pair."""
    from moe_backend.quant import quantize_fp8_per_token_group

    counts = _per_expert(e, m)
    max_m = max(1, int(counts.max()))
    b, bs = weights if weights is not None else random_fp8_weights(e, n, k, device)
    a, a_s = quantize_fp8_per_token_group(torch.randn(e, max_m, k, device=device, dtype=torch.bfloat16))
    return a, a_s, b, bs, counts.to(torch.int32).to(device)


def random_fp8_activations(e: int, rows: int, k: int, device: torch.device | str = "cuda", experts_per_draw: int = 16):
    """(a_fp8 `[E, rows, K]`, a_scale fp32 `[E, rows, K/128]`): random bf16 activations quantized
    per 128-group, drawn `experts_per_draw` experts at a time, so the bf16 draw and the quant's fp32
    temporaries stay small beside the result (a hot expert's rows times every expert: TP8 w13 at
    4096 rows is 7.5 GB of FP8 and would need 45 GB more drawn at once)."""
    from moe_backend.quant import quantize_fp8_per_token_group

    a = torch.empty(e, rows, k, device=device, dtype=torch.float8_e4m3fn)
    a_s = torch.empty(e, rows, k // 128, device=device, dtype=torch.float32)
    for lo in range(0, e, experts_per_draw):
        hi = min(e, lo + experts_per_draw)
        a[lo:hi], a_s[lo:hi] = quantize_fp8_per_token_group(
            torch.randn(hi - lo, rows, k, device=device, dtype=torch.bfloat16)
        )
    return a, a_s


def make_contiguous_inputs(e: int, m, n: int, k: int, alignment: int, weights=None, device="cuda"):
    """(a_fp8 `[rows, K]`, a_scale, b_fp8, b_scale, expert id per row int32 `[rows]`): the
    contiguous layout of m rows per expert (an int, or per-expert counts `[E]`), each expert's
    segment padded to `alignment` (padding rows -1)."""
    from moe_backend.quant import quantize_fp8_per_token_group

    counts = _per_expert(e, m)
    b, bs = weights if weights is not None else random_fp8_weights(e, n, k, device)
    segments = (counts + alignment - 1) // alignment * alignment
    ids = torch.full((int(segments.sum()),), -1, dtype=torch.int32)
    start = 0
    for expert, (rows, seg) in enumerate(zip(counts.tolist(), segments.tolist())):
        ids[start : start + rows] = expert
        start += seg
    a, a_s = quantize_fp8_per_token_group(torch.randn(ids.numel(), k, device=device, dtype=torch.bfloat16))
    return a, a_s, b, bs, ids.to(device)


# ---------------------------------------------------------------------------------------------
# Routing: uniform and imbalanced (Zipf-like expert popularity)
# ---------------------------------------------------------------------------------------------
# Real routing is imbalanced: a few experts are hot, some idle. `zipf:A` draws each token's top-k
# experts without replacement from a popularity that falls as 1 / rank^A over a seeded random
# permutation of the experts (A = 0 is uniform; BENCHMARKING.md asks for 0.6-1.2). The same seed
# gives the same routing, so every contender of one benchmark cell sees the same row counts.

MAX_ZIPF_EXPONENT = 4.0


def parse_routing_exponent(spec: str) -> float:
    """`uniform` -> 0.0, `zipf:A` -> A (0 <= A <= 4)."""
    if spec == "uniform":
        return 0.0
    if isinstance(spec, str) and spec.startswith("zipf:"):
        try:
            a = float(spec[5:])
        except ValueError:
            a = -1.0
        if 0.0 <= a <= MAX_ZIPF_EXPONENT:
            return a
    raise ValueError(f"routing: expected 'uniform' or 'zipf:A' with 0 <= A <= 4, got {spec!r}")


def expert_popularity(num_experts: int, exponent: float, seed: int = 0) -> torch.Tensor:
    """f32 `[E]` summing to 1: 1 / rank^exponent, ranks assigned to experts by a seeded permutation."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randperm(num_experts, generator=g).float() + 1.0
    p = ranks.pow(-exponent)
    return p / p.sum()


def random_topk(
    num_tokens: int,
    num_experts: int,
    topk: int,
    exponent: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights f32 `[T, k]` summing to 1 per token, topk_ids int32 `[T, k]`, distinct per
    token), drawn on the CPU from `expert_popularity` and moved to `device`."""
    g = torch.Generator().manual_seed(seed + 1)
    p = expert_popularity(num_experts, exponent, seed)
    ids = torch.multinomial(p.expand(max(num_tokens, 1), -1), topk, replacement=False, generator=g)
    ids = ids[:num_tokens]
    w = torch.rand(num_tokens, topk, generator=g) + 0.1
    w = w / w.sum(-1, keepdim=True)
    return w.float().to(device), ids.to(torch.int32).to(device)


def expert_counts(topk_ids: torch.Tensor, num_experts: int, expert_start: int = 0) -> torch.Tensor:
    """int64 `[E]`: rows each of experts `[expert_start, expert_start + E)` receives."""
    local = topk_ids.reshape(-1).long().cpu() - expert_start
    local = local[(local >= 0) & (local < num_experts)]
    return torch.bincount(local, minlength=num_experts)


def zipf_counts(num_experts: int, total_rows: int, exponent: float, seed: int = 0) -> torch.Tensor:
    """int64 `[E]` rows per expert summing to `total_rows`, proportional to `expert_popularity`
    (largest remainders get the rounding), for GEMM benchmarks that take counts rather than tokens."""
    p = expert_popularity(num_experts, exponent, seed).double() * total_rows
    counts = p.floor().long()
    rest = total_rows - int(counts.sum())
    if rest:
        counts[torch.argsort(p - counts, descending=True)[:rest]] += 1
    return counts


def cap_counts(counts: torch.Tensor, cap: int) -> torch.Tensor:
    """Counts with none above `cap` (an expert gets at most one row per token under top-k routing),
    the excess handed to the experts below the cap in proportion to their counts, the total kept."""
    counts = counts.clone()
    total = int(counts.sum())
    if cap * counts.numel() < total:
        raise ValueError(f"cap: {counts.numel()} experts of at most {cap} rows cannot hold {total}")
    while int(counts.max()) > cap:
        excess = int((counts - cap).clamp_min(0).sum())
        counts.clamp_(max=cap)
        room = (cap - counts).double() * (counts > 0).double().clamp_min(1e-3)
        share = (room / room.sum() * excess).floor().long().clamp(max=cap - counts)
        counts += share
        rest = total - int(counts.sum())
        for x in torch.argsort(room - share.double(), descending=True).tolist():  # largest room first
            if rest and counts[x] < cap:
                counts[x] += 1
                rest -= 1
    return counts


def routed_counts(num_experts: int, mean_rows: int, routing: str = "uniform", *, seed: int = 0) -> torch.Tensor:
    """int64 `[E]` rows per expert averaging `mean_rows` under `routing` (`uniform` or `zipf:A`),
    none above the tokens of such a DeepSeek-V3 batch (mean_rows * 256 / 8: one row per token)."""
    exponent = parse_routing_exponent(routing)
    if exponent == 0.0:
        return torch.full((num_experts,), mean_rows, dtype=torch.int64)
    counts = zipf_counts(num_experts, mean_rows * num_experts, exponent, seed=seed)
    return cap_counts(counts, mean_rows * DEEPSEEK_V3_EXPERTS // DEEPSEEK_V3_TOPK)


def describe_counts(counts: torch.Tensor) -> str:
    """`max/mean 5.1x, idle 12` for a row-count vector."""
    counts = counts.double()
    mean = float(counts.mean()) if counts.numel() else 0.0
    peak = float(counts.max()) if counts.numel() else 0.0
    idle = int((counts == 0).sum())
    return f"max/mean {peak / mean if mean else 0.0:.1f}x, idle {idle}"


# ---------------------------------------------------------------------------------------------
# Timing (CUDA)
# ---------------------------------------------------------------------------------------------


def capture_graph(fn: Callable[[], object]) -> tuple[Callable[[], None], object]:
    """`fn` captured in a CUDA graph after one call outside the capture (compile, warm-up):
    (the graph's replay, what the captured call returned; written by each replay)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn()
    return graph.replay, static_out


def time_graph(
    fn: Callable[[], object],
    *,
    warmup_ms: int = 5,
    rep_ms: int = 30,
    on_output: Callable[[object], None] | None = None,
) -> float:
    """Median µs of one call of `fn`, replayed from a CUDA graph (do_bench flushes L2 between reps).
    `on_output` sees what the captured call returned, after the first replay wrote it."""
    import triton

    replay, static_out = capture_graph(fn)
    replay()
    torch.cuda.synchronize()
    if on_output is not None:
        on_output(static_out)
    return 1e3 * triton.testing.do_bench(replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def interleaved_us(
    fns: dict[str, Callable[[], object]], rounds: int = 3, warmup_ms: int = 10, rep_ms: int = 50
) -> dict[str, dict[str, float]]:
    """Side-by-side timing fair to every contender: rounds of A B C A B C ..., so clock and
    temperature drift lands on all alike (timed one after another, the first ran on a cooler chip).
    {name: {"us": median over rounds, "lo": fastest round, "hi": slowest round}}, each round a
    `triton.testing.do_bench` median, in µs."""
    import triton

    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(1e3 * triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    out = {}
    for name, xs in samples.items():
        xs = sorted(xs)
        out[name] = {"us": xs[len(xs) // 2], "lo": xs[0], "hi": xs[-1]}
    return out


def sustained_us(fn: Callable[[], object], seconds: float = 2.0) -> dict:
    """Calls fn back to back for `seconds` (no L2 flush, no pauses: the steady state of a long
    prefill) while nvidia-smi samples every 50 ms: {"us": per call, "mhz": median SM clock,
    "watts": median board power, "throttle": the throttle-reason masks seen}. An FP8 GEMM can hold
    the board at its power cap with the SM clock lowered (mask 0x4: software power cap); in that
    regime the faster kernel is the one that spends less energy per GEMM."""
    fn()
    torch.cuda.synchronize()
    smi = subprocess.Popen(
        [
            "nvidia-smi",
            "--query-gpu=clocks.sm,power.draw,clocks_throttle_reasons.active",
            "--format=csv,noheader,nounits",
            "-lms",
            "50",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.3)
    start, calls = time.perf_counter(), 0
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ev0.record()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            fn()
        calls += 10
        torch.cuda.synchronize()
    ev1.record()
    torch.cuda.synchronize()
    smi.terminate()
    rows = [r.split(", ") for r in smi.communicate()[0].strip().splitlines() if r.count(",") == 2]
    rows = rows[len(rows) // 4 :] or rows  # drop the ramp
    return {
        "us": 1e3 * ev0.elapsed_time(ev1) / calls,
        "mhz": statistics.median(float(r[0]) for r in rows) if rows else float("nan"),
        "watts": statistics.median(float(r[1]) for r in rows) if rows else float("nan"),
        "throttle": sorted({r[2] for r in rows}),
    }


def measure_ceilings() -> dict:
    """The ceilings a floor is computed from, measured in the same run: read and copy bandwidth
    over 2 GB (TB/s; copy counts bytes read plus written) and the dense FP8 `_scaled_mm` rate."""
    import triton

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, warmup=20, rep=200, return_mode="median")

    def bandwidth() -> tuple[float, float]:
        # In a function of its own so the 2 GB buffers are freed when it returns.
        x = torch.randn(2 * 1024**3 // 2, device="cuda", dtype=torch.bfloat16)
        y = torch.empty_like(x)
        nbytes = x.numel() * 2
        return nbytes / bench(lambda: x.sum()) / 1e9, 2 * nbytes / bench(lambda: y.copy_(x)) / 1e9

    def fp8_rate(n: int = 8192) -> float:
        a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
        one = torch.ones((), device="cuda")
        ms = bench(lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
        return 2 * n**3 / ms / 1e9

    read_tbs, copy_tbs = bandwidth()
    fp8_tflops = fp8_rate()
    torch.cuda.empty_cache()
    return dict(read_tbs=read_tbs, copy_tbs=copy_tbs, fp8_tflops=fp8_tflops)
