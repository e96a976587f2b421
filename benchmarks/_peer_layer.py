"""The peers' two GEMMs at a real routing, for the layer benchmark.

The same `topk_ids` the layer gets is turned into each peer's own layout beforehand (not timed):
vLLM's sorted token ids padded per expert to the config's BLOCK_SIZE_M, DeepGEMM's contiguous
segments padded to its M alignment, DeepGEMM's masked `[E, max_m]` rows. Every layout holds exactly
the per-expert row counts of the routing, so each peer does the layer's work and no other.

The pure helpers (`local_slots`, `vllm_alignment`, `contiguous_rows`, `masked_rows`,
`layer_floor`) run on the CPU and are tested in CI; `LayerPeers` launches the peers on the GPU.
"""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

from benchmarks import _peers
from moe_backend.constants import QUANT_BLOCK as GROUP

__all__ = [
    "local_slots",
    "vllm_alignment",
    "contiguous_rows",
    "masked_rows",
    "layer_floor",
    "VllmRoutedMoE",
    "LayerPeers",
    "PeerTime",
    "best_two_gemms",
    "dg_contig_two_gemms",
    "GEMMS",
    "PEERS",
    "PEER_RELERR_MAX",
]

GEMMS = ("w13", "w2")
PEERS = ("vllm", "dg_contig", "dg_masked")
# A peer GEMM counts only if its output matches the fp32 dequantized reference: one FP8 GEMM with a
# bf16 output measures ~2e-3 (BENCHMARKING.md), so twice that.
PEER_RELERR_MAX = 4e-3
# DeepGEMM 0.1.5's masked kernel returns wrong rows for max_m below a multiple of 64 (docs/benchmarks.md).
DG_MASKED_ROWS = 64


def local_slots(topk_ids: torch.Tensor, num_experts: int, expert_start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot int64 `[R]`, expert int64 `[R]`) on the CPU: the (token, j) pairs routed to experts
    `[expert_start, expert_start + E)`, slot = token * k + j, expert local; grouped by expert, in
    slot order within an expert (the order every layout below keeps)."""
    ids = topk_ids.reshape(-1).long().cpu() - expert_start
    slot = torch.nonzero((ids >= 0) & (ids < num_experts)).squeeze(1)
    expert = ids[slot]
    order = torch.sort(expert, stable=True).indices
    return slot[order], expert[order]


def _rank_in_expert(expert: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Position of each (expert-grouped) row within its expert's rows."""
    first = torch.cumsum(counts, 0) - counts
    return torch.arange(expert.numel()) - first[expert]


def _padded_segments(counts: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment lengths, segment starts): each expert's rows padded up to `multiple`, empty experts 0."""
    padded = (counts + multiple - 1) // multiple * multiple
    return padded, torch.cumsum(padded, 0) - padded


def vllm_alignment(
    slot: torch.Tensor, expert: torch.Tensor, num_experts: int, num_slots: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """vLLM's token alignment rebuilt on the CPU: (sorted_token_ids int32 `[P]`, expert id per
    block_m block int32 `[P / block_m]`, P). Each expert's slots, padded with `num_slots` (an
    invalid slot the kernel masks) to a multiple of block_m; experts without rows get no block."""
    counts = torch.bincount(expert, minlength=num_experts)
    padded, start = _padded_segments(counts, block_m)
    total = int(padded.sum())
    sorted_ids = torch.full((total,), num_slots, dtype=torch.int32)
    sorted_ids[start[expert] + _rank_in_expert(expert, counts)] = slot.int()
    block_expert = torch.repeat_interleave(torch.arange(num_experts, dtype=torch.int32), padded // block_m)
    return sorted_ids, block_expert, total


def contiguous_rows(expert: torch.Tensor, num_experts: int, alignment: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepGEMM's contiguous layout: (row of each local row int64 `[R]`, grouped_layout int32 `[M]`:
    the expert of each row, -1 on the padding that rounds each expert's segment up to `alignment`)."""
    counts = torch.bincount(expert, minlength=num_experts)
    padded, start = _padded_segments(counts, alignment)
    row = start[expert] + _rank_in_expert(expert, counts)
    grouped_layout = torch.full((int(padded.sum()),), -1, dtype=torch.int32)
    grouped_layout[row] = expert.int()
    return row, grouped_layout


def masked_rows(
    expert: torch.Tensor, num_experts: int, multiple: int = DG_MASKED_ROWS
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The masked layout sized for this batch: (row within its expert int64 `[R]`, masked_m int32
    `[E]`, max_m = the largest count rounded up to `multiple`, at least `multiple`)."""
    counts = torch.bincount(expert, minlength=num_experts)
    peak = int(counts.max()) if counts.numel() else 0
    max_m = max(1, -(-peak // multiple)) * multiple
    return _rank_in_expert(expert, counts), counts.int(), max_m


def layer_floor(
    counts: torch.Tensor, tokens: int, topk: int, hidden: int, inter: int, read_tbs: float, fp8_tflops: float
) -> dict:
    """The layer's floor for one routing: the bytes that must move once over the read bandwidth,
    or the FLOPs over the FP8 ceiling where that is larger.

    bytes = the FP8 weights and block scales of every expert with >= 1 row (w13 `[2I, H]`, w2
    `[H, I]`) + x bf16 `[T, H]` read + the output bf16 `[T, H]` written + the routing (int32 ids,
    f32 weights) + the FP8 intermediate `[R, I]` with its scales written once and read once.
    FLOPs = 2 R (2I) H + 2 R H I for R routed (local) rows."""
    counts = counts.long()
    rows, touched = int(counts.sum()), int((counts > 0).sum())
    scale_bytes = lambda n, k: 4 * -(-n // GROUP) * -(-k // GROUP)  # noqa: E731
    w13 = 2 * inter * hidden + scale_bytes(2 * inter, hidden)
    w2 = hidden * inter + scale_bytes(hidden, inter)
    weights = touched * (w13 + w2)
    activations = 2 * tokens * hidden * 2 + tokens * topk * 8
    intermediate = 2 * rows * (inter + 4 * -(-inter // GROUP))
    nbytes = weights + activations + intermediate
    flops = 6.0 * rows * hidden * inter
    mem_us = nbytes / (read_tbs * 1e12) * 1e6
    flop_us = flops / (fp8_tflops * 1e12) * 1e6
    return dict(
        bytes=nbytes,
        weight_bytes=weights,
        flops=flops,
        touched_experts=touched,
        rows=rows,
        us=max(mem_us, flop_us),
        bound="memory" if mem_us >= flop_us else "compute",
    )


def prefill_bound(counts: torch.Tensor, tokens: int, topk: int, hidden: int, copy_tbs: float) -> dict:
    """What any layer built around two per-expert GEMMs adds to them at least, at the copy bandwidth
    (bytes read plus written) measured in the same run: the token quant (x bf16 `[T, H]` read, FP8
    and its 1x128 scales written; the peers' GEMM1 is handed FP8 rows) and the weighted combine (the
    GEMM2 rows bf16 `[R, H]` and their token slots and weights read, the output bf16 `[T, H]` written).

    Left out as if fused away: the row gather (GEMM1 loading token rows itself) and the SiLU*up quant
    (in GEMM1's epilogue). The combine stays: a token's k rows come from k experts' tiles, finished
    at unrelated times, so summing them in GEMM2's epilogue (atomics into the output) moves at least
    the bytes the separate pass does once the output does not fit in L2."""
    rows = int(counts.long().sum())
    quant = tokens * hidden * 2 + tokens * hidden + 4 * tokens * -(-hidden // GROUP)
    combine = rows * hidden * 2 + rows * 8 + tokens * hidden * 2
    nbytes = quant + combine
    return dict(bytes=nbytes, quant_bytes=quant, combine_bytes=combine, us=nbytes / (copy_tbs * 1e12) * 1e6)


class VllmRoutedMoE(_peers.VllmMoE):
    """vLLM's `fused_moe_kernel` on real routing: `_peers.VllmMoE`'s launcher with the alignment
    built from the routed slots (only local experts' slots: the EP rank's share of the work).
    w13: A is x `[T, H]` (top_k = k, C row = slot); w2: A is the intermediate by slot `[T*k, I]`."""

    def __init__(
        self,
        kernel,
        slot: torch.Tensor,
        expert: torch.Tensor,
        num_experts: int,
        num_slots: int,
        topk: int,
        gemm: str,
        device: torch.device | str = "cuda",
    ):
        self.kernel, self.e, self.topk, self.gemm, self.device = kernel, num_experts, topk, gemm, device
        self.slots, self.tokens = num_slots, num_slots // topk
        self.rows = None  # counts vary per expert: see `slot` / `expert`
        self._slot, self._expert = slot, expert
        self._align: dict = {}

    def alignment(self, block_m: int):
        if block_m not in self._align:
            sorted_ids, block_expert, total = vllm_alignment(self._slot, self._expert, self.e, self.slots, block_m)
            post = torch.tensor([total], dtype=torch.int32, device=self.device)
            self._align[block_m] = (sorted_ids.to(self.device), block_expert.to(self.device), post)
        return self._align[block_m]


@dataclass
class PeerTime:
    us: float | None = None
    relerr: float | None = None
    detail: str = ""  # vLLM: the winning config; DeepGEMM masked: max_m; or why it did not run
    screened: dict = field(default_factory=dict)  # vLLM: every tuned config's short-run µs


def _config_tag(cfg: dict) -> str:
    return (
        f"M{cfg['BLOCK_SIZE_M']} N{cfg['BLOCK_SIZE_N']} K{cfg['BLOCK_SIZE_K']} G{cfg['GROUP_SIZE_M']} "
        f"w{cfg['num_warps']} s{cfg['num_stages']}"
    )


def _quantized_rows(rows: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from moe_backend.quant import quantize_fp8_per_token_group

    return quantize_fp8_per_token_group(torch.randn(rows, k, device=device, dtype=torch.bfloat16), GROUP)


def _scatter_rows(
    rows: int, index: torch.Tensor, a_fp8: torch.Tensor, a_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 `[rows, K]`, f32 scales `[rows, K/128]`) holding `a_fp8[i]` at row `index[i]`; the
    other rows zero with scale 1 (padding the peer masks or never reads)."""
    out = torch.zeros(rows, a_fp8.shape[1], dtype=a_fp8.dtype, device=a_fp8.device)
    out_scale = torch.ones(rows, a_scale.shape[1], dtype=torch.float32, device=a_fp8.device)
    out.view(torch.uint8)[index] = a_fp8.view(torch.uint8)  # byte view: index_put on fp8 types
    out_scale[index] = a_scale
    return out, out_scale


class LayerPeers:
    """Both GEMMs of every peer at one routing, each on operands laid out for it beforehand.

    GEMM1 (w13) multiplies the quantized tokens, GEMM2 (w2) a random FP8 intermediate with one row
    per routed (local) slot; all layouts hold the same rows, so their outputs are checked against
    one fp32 reference on the hottest expert and one other."""

    def __init__(
        self,
        x_fp8: torch.Tensor,
        x_scale: torch.Tensor,
        topk_ids: torch.Tensor,
        weights: dict,
        peers: dict,
        log,
        masked_budget_bytes: float = 16 * 2**30,
    ):
        self.weights, self.peers, self.log = weights, peers, log
        self.num_experts, _, self.hidden = weights["w13"][0].shape
        self.inter = weights["w2"][0].shape[2]
        self.tokens, self.topk = topk_ids.shape
        self.slot, self.expert = local_slots(topk_ids, self.num_experts)
        self.counts = torch.bincount(self.expert, minlength=self.num_experts)
        self.rows = int(self.slot.numel())
        self.masked_budget_bytes = masked_budget_bytes
        self.device = x_fp8.device
        slot_d, token_d = self.slot.to(self.device), (self.slot // self.topk).to(self.device)
        act_fp8, act_scale = _quantized_rows(max(self.rows, 1), self.inter, self.device)
        act_fp8, act_scale = act_fp8[: self.rows], act_scale[: self.rows]
        # Operand rows per local row, expert-grouped (the order every layout keeps).
        self.a_rows = {
            "w13": (x_fp8.index_select(0, token_d), x_scale.index_select(0, token_d)),
            "w2": (act_fp8, act_scale),
        }
        self.x = (x_fp8, x_scale)
        self._slot_d = slot_d
        busy = torch.argsort(self.counts, descending=True)
        touched = [int(e) for e in busy if self.counts[e] > 0]
        self.check_experts = sorted({touched[0], touched[len(touched) // 2]}) if touched else []
        self._ref: dict = {}
        # (peer, gemm) -> the call each peer's figure timed (its fastest config): timed again in
        # interleaved rounds beside the layer (bench_layer --rounds).
        self.final_fns: dict = {}

    # -- correctness ------------------------------------------------------------------------------
    def _reference(self, gemm: str, e: int) -> torch.Tensor:
        """fp32 `[count_e, N]`: expert e's rows of this GEMM from dequantized operands."""
        if (gemm, e) not in self._ref:
            from moe_backend.quant import dequantize_fp8_blockwise, dequantize_fp8_per_token_group

            rows = self._expert_rows(e)
            a, a_s = self.a_rows[gemm]
            w, w_s = self.weights[gemm]
            self._ref[(gemm, e)] = (
                dequantize_fp8_per_token_group(a[rows], a_s[rows], GROUP)
                @ dequantize_fp8_blockwise(w[e], w_s[e], GROUP).t()
            )
        return self._ref[(gemm, e)]

    def _relerr(self, gemm: str, rows_of: Callable[[int], torch.Tensor]) -> float:
        num = den = 0.0
        for e in self.check_experts:
            ref = self._reference(gemm, e)
            num += float((rows_of(e).float() - ref).pow(2).sum())
            den += float(ref.pow(2).sum())
        return math.sqrt(num / max(den, 1e-30))

    def _expert_rows(self, e: int) -> slice:
        return slice(int(self.counts[:e].sum()), int(self.counts[: e + 1].sum()))

    # -- the peers --------------------------------------------------------------------------------
    def time_all(self, bench: Callable[..., float]) -> dict:
        """{peer: {gemm: PeerTime}} for every peer loaded; `bench(fn, warmup_ms, rep_ms)` -> µs."""
        out = {}
        runners = {"vllm": self._vllm, "dg_contig": self._dg_contig, "dg_masked": self._dg_masked}
        for name in PEERS:
            if not self._loaded(name):
                continue
            out[name] = {}
            for gemm in GEMMS:
                if self.rows == 0:
                    out[name][gemm] = PeerTime(detail="no local rows")
                    continue
                try:
                    out[name][gemm] = runners[name](gemm, bench)
                except Exception as exc:  # a peer that fails to run is reported, the run goes on
                    print(f"[{name} {gemm}] {traceback.format_exc(limit=3)}", file=self.log, flush=True)
                    out[name][gemm] = PeerTime(detail=f"{type(exc).__name__}: {str(exc)[:120]}")
                torch.cuda.empty_cache()
        return out

    def _loaded(self, name: str) -> bool:
        return self.peers.get("vllm" if name == "vllm" else "dg") is not None

    def _vllm(self, gemm: str, bench) -> PeerTime:
        w, w_s = self.weights[gemm]
        n = w.shape[1]
        moe = VllmRoutedMoE(
            self.peers["vllm"],
            self.slot,
            self.expert,
            self.num_experts,
            self.tokens * self.topk,
            self.topk,
            gemm,
            self.device,
        )
        if gemm == "w13":
            a, a_s = self.x
        else:  # the intermediate indexed by slot; rows of other ranks' slots are never read
            a, a_s = _scatter_rows(moe.slots, self._slot_d, *self.a_rows["w2"])
        c = torch.empty(moe.slots, n, dtype=torch.bfloat16, device=self.device)
        # Screen every tuned config with short timings, then time the fastest one in full.
        screened = {}
        for cfg in self.peers["vllm_cfgs"]:
            try:
                screened[_config_tag(cfg)] = (bench(lambda: moe(a, a_s, w, w_s, c, cfg), 2, 10), cfg)
            except Exception as exc:
                print(f"[vllm {gemm}] {cfg}: {type(exc).__name__}: {str(exc)[:160]}", file=self.log, flush=True)
        if not screened:
            return PeerTime(detail="no config ran")
        tag, (_, cfg) = min(screened.items(), key=lambda kv: kv[1][0])
        self.final_fns[("vllm", gemm)] = lambda: moe(a, a_s, w, w_s, c, cfg)
        us = bench(self.final_fns[("vllm", gemm)], 10, 50)
        c.fill_(float("nan"))
        moe(a, a_s, w, w_s, c, cfg)
        relerr = self._relerr(gemm, lambda e: c[self._slot_d[self._expert_rows(e)]])
        return PeerTime(us, relerr, tag, {t: v[0] for t, v in screened.items()})

    def _dg_contig(self, gemm: str, bench) -> PeerTime:
        dg = self.peers["dg"]
        w = self.weights[gemm][0]
        n, k = w.shape[1], w.shape[2]
        row, grouped_layout = contiguous_rows(
            self.expert, self.num_experts, int(dg.get_mk_alignment_for_contiguous_layout())
        )
        m = grouped_layout.numel()
        row_d = row.to(self.device)
        a, a_s = _scatter_rows(m, row_d, *self.a_rows[gemm])
        sfa = dg.transform_sf_into_required_layout(a_s, m, k, (1, GROUP, GROUP), None, True)
        layout_d = grouped_layout.to(self.device)
        out = torch.empty(m, n, dtype=torch.bfloat16, device=self.device)
        b = (w, self.peers["dg_sfb"][gemm])
        fn = lambda: dg.m_grouped_fp8_gemm_nt_contiguous((a, sfa), b, out, layout_d)  # noqa: E731
        self.final_fns[("dg_contig", gemm)] = fn
        us = bench(fn, 10, 50)
        out.fill_(float("nan"))
        fn()
        return PeerTime(us, self._relerr(gemm, lambda e: out[row_d[self._expert_rows(e)]]), f"M={m}")

    def _dg_masked(self, gemm: str, bench) -> PeerTime:
        dg = self.peers["dg"]
        w = self.weights[gemm][0]
        n, k = w.shape[1], w.shape[2]
        rank, masked_m, max_m = masked_rows(self.expert, self.num_experts)
        e = self.num_experts
        need = e * max_m * (k + 4 * k // GROUP + 2 * n)
        if need > self.masked_budget_bytes:
            return PeerTime(detail=f"max_m {max_m}: {need / 2**30:.0f} GiB of buffers, skipped")
        a, a_s = _scatter_rows(e * max_m, (self.expert * max_m + rank).to(self.device), *self.a_rows[gemm])
        a, a_s = a.view(e, max_m, k), a_s.view(e, max_m, k // GROUP)
        sfa = dg.transform_sf_into_required_layout(a_s, max_m, k, (1, GROUP, GROUP), e, True)
        masked_d = masked_m.to(self.device)
        expected_m = max(1, -(-self.rows // e))  # the typical rows per expert, a tile-choice hint
        out = torch.empty(e, max_m, n, dtype=torch.bfloat16, device=self.device)
        b = (w, self.peers["dg_sfb"][gemm])
        fn = lambda: dg.m_grouped_fp8_fp4_gemm_nt_masked((a, sfa), b, out, masked_d, expected_m)  # noqa: E731
        self.final_fns[("dg_masked", gemm)] = fn
        us = bench(fn, 10, 50)
        out.fill_(float("nan"))
        fn()
        relerr = self._relerr(gemm, lambda x: out[x, : int(self.counts[x])])
        return PeerTime(us, relerr, f"max_m={max_m} expected_m={expected_m}")


def best_two_gemms(times: dict) -> dict:
    """The faster passing peer per GEMM: {"us": GEMM1 + GEMM2, "which": "vllm + dg_masked", per GEMM
    entries}, or us None when some GEMM has no passing peer."""
    best = {}
    for gemm in GEMMS:
        ok = [
            (t.us, name)
            for name, per in times.items()
            for g, t in per.items()
            if g == gemm and t.us is not None and t.relerr is not None and t.relerr <= PEER_RELERR_MAX
        ]
        best[gemm] = min(ok) if ok else None
    if any(b is None for b in best.values()):
        return dict(us=None, which="–", **{g: best[g] for g in GEMMS})
    names = [best[g][1] for g in GEMMS]
    return dict(
        us=sum(best[g][0] for g in GEMMS),
        which=names[0] if len(set(names)) == 1 else " + ".join(names),
        **{g: best[g] for g in GEMMS},
    )


def dg_contig_two_gemms(times: dict) -> float | None:
    """DeepGEMM's two contiguous GEMMs (the prefill target), when both ran and passed."""
    per = times.get("dg_contig", {})
    ts = [per.get(g) for g in GEMMS]
    if any(t is None or t.us is None or t.relerr is None or t.relerr > PEER_RELERR_MAX for t in ts):
        return None
    return sum(t.us for t in ts)
