"""The sweep behind `python -m moe_backend compare`: every backend on the same inputs, per cell.

For each slice and token count the backends run on identical FP8 activations, weights and routing;
each is timed (rounds interleaved across backends, so clock drift lands on all alike) and checked
against the torch reference. `run_compare` returns the rows; `moe_backend.ab.compare` is the
command line that writes them out.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from moe_backend.ab.backends import Backend, get_backend
from moe_backend.ab.divergence import as_floats, cell_tolerance, divergence
from moe_backend.ab.measure import measure_ceilings, moe_work, time_us
from moe_backend.ab.routing import RoutingSpec, make_routing
from moe_backend.ab.slices import SliceSpec, checkpoint_slice_weights, random_slice_weights

__all__ = ["CompareSettings", "run_compare", "LAYER_TOLERANCE"]

# A layer against the reference may differ by FP8 rounding of intermediate activations and bf16
# output rounding: the project's tolerance for that is a relative error of 1e-2 (tests/helpers/tolerances.py).
LAYER_TOLERANCE = 1e-2
MASKED_MEMORY_FRACTION = 0.3


@dataclass
class CompareSettings:
    backends: list[str]
    slices: list[SliceSpec]
    tokens: list[int]
    routing: RoutingSpec
    device: torch.device
    seed: int = 0
    rounds: int = 1
    tolerance: float = LAYER_TOLERANCE
    checkpoint: str | None = None
    layer: int | None = None
    progress: bool = True
    time_budget_s: float | None = None  # no new cell starts after this long; the report says what was left
    meta: dict = field(default_factory=dict)


def _resolve(names: list[str], device: torch.device) -> tuple[list[Backend], dict[str, str]]:
    runnable, skipped = [], {}
    for name in names:
        backend = get_backend(name)
        reason = backend.unavailable(device)
        if reason is None:
            runnable.append(backend)
        else:
            skipped[name] = reason
    return runnable, skipped


def _checkpoint_layer(settings: CompareSettings):
    """The checkpoint's layer, holding as many experts as the widest slice needs (router kept)."""
    from moe_backend.config import MoEConfig
    from moe_backend.layers import DeepseekV3MoE

    config = MoEConfig.from_hf_config(settings.checkpoint)
    local = max(s.local_experts for s in settings.slices)
    layer = DeepseekV3MoE(config, expert_range=(0, local), with_shared_experts=False, device=settings.device)
    layer.load_from_checkpoint(settings.checkpoint, settings.layer)
    return layer


def _routing(settings: CompareSettings, s: SliceSpec, x: torch.Tensor, layer, seed: int):
    if settings.routing.kind == "router":
        from moe_backend.layers.router import noaux_tc_route

        if layer is None:
            raise ValueError("routing 'router' needs --checkpoint (the router's weights)")
        weights, ids = noaux_tc_route(x, layer.gate_weight, layer.e_score_correction_bias, layer.config)
        return weights.float(), ids
    return make_routing(settings.routing, x.shape[0], s.num_experts, s.topk, seed=seed, device=x.device)


def run_compare(settings: CompareSettings) -> dict:
    """Runs the sweep; returns {"meta": ..., "skipped": {backend: reason}, "rows": [...]}, one row
    per (slice, tokens, backend) with time, throughput, floor and divergence from the reference."""
    from moe_backend import ops, reference
    from moe_backend._progress import progress
    from moe_backend.dispatch.policy import Policy

    device = settings.device
    # Cells are labelled prefill/decode as the active policy would see them without an engine's phase.
    active_policy = Policy.from_env(_device_name(device))
    backends, skipped = _resolve(settings.backends, device)
    ceilings = measure_ceilings(device)
    layer = _checkpoint_layer(settings) if settings.checkpoint else None
    rows: list[dict] = []
    not_run: list[str] = []
    started = time.monotonic()
    total = len(settings.slices) * len(settings.tokens) * max(1, len(backends))
    if layer is not None:
        slice_weights = [
            checkpoint_slice_weights(s, layer.w13_fp8, layer.w13_scale_inv, layer.w2_fp8, layer.w2_scale_inv)
            for s in settings.slices
        ]
    else:
        slice_weights = [
            random_slice_weights(s, device, seed=settings.seed + 1000 * si) for si, s in enumerate(settings.slices)
        ]
    with progress(total=total, desc="compare", unit="cell", enabled=settings.progress) as bar:
        # Token counts outermost: a time budget that runs out cuts the largest batches of every
        # slice rather than a whole slice.
        for tokens in settings.tokens:
            for si, (s, weights) in enumerate(zip(settings.slices, slice_weights)):
                if settings.time_budget_s is not None and time.monotonic() - started > settings.time_budget_s:
                    not_run.append(f"{s.name}/{tokens}")
                    continue
                seed = settings.seed + 7919 * tokens + 1000 * si
                gen = torch.Generator(device=device).manual_seed(seed)
                x = torch.randn(tokens, s.hidden, generator=gen, device=device).to(torch.bfloat16)
                topk_weights, topk_ids = _routing(settings, s, x, layer, seed)
                x_fp8, x_scale = ops.per_token_group_quant(x, 128)
                phase = active_policy.phase_of(tokens)
                local = (topk_ids >= 0) & (topk_ids < s.local_experts)
                pairs = int(local.sum())
                active = int(torch.unique(topk_ids[local]).numel())
                flops, nbytes = moe_work(pairs, active, tokens, s.hidden, s.intermediate)
                floor_us = None
                if ceilings:
                    floor_us = max(
                        nbytes / (ceilings["copy_gbs"] * 1e3),
                        flops / (ceilings["fp8_tflops"] * 1e6) if "fp8_tflops" in ceilings else 0.0,
                    )
                oracle = reference.routed_experts(x_fp8, *weights, topk_weights, topk_ids, x_scale=x_scale)
                expected_m = max(1, -(-tokens * s.topk // s.num_experts))
                cell = dict(slice=s.name, tokens=tokens, phase=phase, pairs=pairs, active_experts=active)
                calls, results = {}, {}
                for b in backends:

                    def call(b=b, used_rows=None):
                        return b.routed(
                            x_fp8, *weights, topk_weights, topk_ids, x_scale=x_scale, phase=phase,
                            expected_m=expected_m, used_rows=used_rows,
                        )  # fmt: skip

                    choice = b.choice(tokens, phase)
                    row = dict(cell, backend=b.name, kernel=choice.name if choice else None)
                    too_big = _masked_buffers_too_big(choice, s, tokens, device)
                    if too_big:
                        row["skipped"] = too_big
                        results[b.name] = row
                        continue
                    try:
                        # A peer GEMM that walks every row it is given runs on the rows in use,
                        # read here, outside the timed calls (as shadow mode reads them, sync-free).
                        plan = b.plan(
                            x_fp8, weights[0], topk_ids, phase=phase, expected_m=expected_m, quantized_input=True
                        )
                        in_use = b.rows_in_use(plan, topk_ids)
                        if in_use is not None:
                            call = functools.partial(call, used_rows=int(in_use.item()))
                        row.update(as_floats(divergence(call(), oracle)))
                        calls[b.name] = call
                    except Exception as exc:  # noqa: BLE001 - one backend failing a shape is a finding, not fatal
                        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    results[b.name] = row
                times: dict[str, list[float]] = {name: [] for name in calls}
                for _ in range(settings.rounds):
                    for name, call in calls.items():
                        # CPU: the divergence call above was the warm-up; one timed call is enough there.
                        times[name].append(
                            time_us(call, device, reps=1, warmup=False)
                            if device.type == "cpu"
                            else time_us(call, device)
                        )
                for b in backends:
                    row = results[b.name]
                    if b.name in times:
                        us = statistics.median(times[b.name])
                        row.update(
                            time_us=us,
                            tflops=flops / us / 1e6,
                            gbps=nbytes / us / 1e3,
                            floor_pct=100.0 * floor_us / us if floor_us else None,
                        )
                        row["diverges"] = not row["rel_err"] <= cell_tolerance(settings.tolerance, pairs)
                    rows.append(row)
                    bar.update(1)
                del oracle, calls
    del slice_weights
    rows.sort(key=lambda r: [s.name for s in settings.slices].index(r["slice"]))  # stable: tokens stay in order
    meta = dict(
        settings.meta,
        device=_device_name(device),
        ceilings=ceilings,
        routing=str(settings.routing),
        seed=settings.seed,
        rounds=settings.rounds,
        tolerance=settings.tolerance,
        slices=[vars(s) for s in settings.slices],
        tokens=list(settings.tokens),
        backends=[b.name for b in backends],
        descriptions={b.name: b.description for b in backends},
        policy=active_policy.to_dict(),
        versions=_versions(),
        checkpoint=settings.checkpoint,
        layer=settings.layer,
        not_run=not_run,
        elapsed_s=round(time.monotonic() - started, 1),
    )
    return {"meta": meta, "skipped": skipped, "rows": rows}


def _masked_buffers_too_big(choice, s: SliceSpec, tokens: int, device: torch.device) -> str | None:
    """The masked layout is sized from shapes alone: E x T rows (a token may visit any expert), so
    at prefill sizes on TP8 its buffers outgrow the GPU. Such cells are skipped, with the size."""
    if choice is None or choice.layout != "masked" or device.type != "cuda":
        return None
    # Per row: fp8 activations (H), GEMM1 output bf16 (2 * 2I), activation fp8 (I), output bf16 (2H).
    need = s.local_experts * tokens * (3 * s.hidden + 5 * s.intermediate)
    limit = MASKED_MEMORY_FRACTION * torch.cuda.get_device_properties(device).total_memory
    if need <= limit:
        return None
    return (
        f"the masked layout needs ~{need / 2**30:.0f} GiB here ({s.local_experts} experts x {tokens} rows), "
        f"over {MASKED_MEMORY_FRACTION:.0%} of the GPU's memory"
    )


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _version(module: str, dist: str | None = None) -> str | None:
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.metadata.version(dist or module)
    except importlib.metadata.PackageNotFoundError:
        return "present"


def _versions() -> dict[str, str]:
    from moe_backend import __version__

    return {
        "moe-backend": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "triton": _version("triton") or "not installed",
        "deep_gemm": _version("deep_gemm", "sgl-deep-gemm") or "not installed",
    }
