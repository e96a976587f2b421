"""`python -m moe_backend compare`: every available backend on the same inputs, one report.

For each slice (EP8 / TP8 of DeepSeek-V3, a config.json, or a real checkpoint layer) and token
count, the backends run on identical FP8 activations, weights and routing; each is timed (rounds
interleaved across backends, so clock drift lands on all alike) and checked against the torch
reference. Writes `report.md`, `results.json` and PNG plots into `--out`; `--emit-policy` writes
the winners as a policy file for `MOE_BACKEND_POLICY`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from moe_backend.ab.backends import Backend, backend_names, get_backend
from moe_backend.ab.divergence import as_floats, cell_tolerance, divergence
from moe_backend.ab.measure import measure_ceilings, moe_work, time_us
from moe_backend.ab.routing import RoutingSpec, make_routing, parse_routing
from moe_backend.ab.slices import SliceSpec, checkpoint_slice_weights, parse_slices, random_slice_weights

__all__ = ["CompareSettings", "run_compare", "add_compare_parser", "cmd_compare", "LAYER_TOLERANCE"]

# A layer against the reference may differ by FP8 rounding of intermediate activations and bf16
# output rounding: the project's tolerance for that is a relative error of 1e-2 (tests/helpers/tolerances.py).
LAYER_TOLERANCE = 1e-2
GPU_TOKENS = (1, 8, 32, 128, 256, 2048, 8192, 16384)
CPU_TOKENS = (1, 8, 64)
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

                    def call(b=b):
                        return b.routed(
                            x_fp8, *weights, topk_weights, topk_ids, x_scale=x_scale, phase=phase, expected_m=expected_m
                        )

                    choice = b.choice(tokens, phase)
                    row = dict(cell, backend=b.name, kernel=choice.name if choice else None)
                    too_big = _masked_buffers_too_big(choice, s, tokens, device)
                    if too_big:
                        row["skipped"] = too_big
                        results[b.name] = row
                        continue
                    try:
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
                        us = sorted(times[b.name])[len(times[b.name]) // 2]
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


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: expected comma-separated ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{what}: expected positive ints, got {text!r}")
    return values


def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compare",
        help="time and check every available MoE backend on the same inputs; Markdown report + plots (+ a policy file)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument(
        "--backends",
        default="all",
        help=f"comma-separated names, or 'all' (default). Names: {', '.join(backend_names())}",
    )
    p.add_argument(
        "--slice", default="ep8,tp8", help="epN, tpN, full, or a config.json path (comma-separated; default ep8,tp8)"
    )
    p.add_argument(
        "--size",
        choices=("auto", "small", "full"),
        default="auto",
        help="small: CPU-sized slices (H 256, experts/16, I/8); auto (default): small on CPU, full on GPU",
    )
    p.add_argument("--checkpoint", help="a DeepSeek-V3-format FP8 checkpoint folder: its layer's real weights")
    p.add_argument("--layer", type=int, default=3, help="the checkpoint's MoE layer (default 3)")
    p.add_argument(
        "--tokens",
        type=lambda t: _int_list(t, "--tokens"),
        help=f"token counts (default GPU {','.join(map(str, GPU_TOKENS))}; CPU {','.join(map(str, CPU_TOKENS))})",
    )
    p.add_argument(
        "--routing",
        help="uniform (default), zipf:A, a file of top-k ids (.pt/.npy/.json), or router "
        "(the checkpoint's gate; default with --checkpoint)",
    )
    p.add_argument("--rounds", type=int, default=0, help="timing rounds per cell, interleaved (default GPU 3, CPU 1)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=LAYER_TOLERANCE,
        help=f"relative error vs the reference above which a backend is flagged (default {LAYER_TOLERANCE:g})",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="compare-report", help="output folder (report.md, results.json, *.png)")
    p.add_argument(
        "--emit-policy",
        metavar="FILE",
        help="write the winners as a MOE_BACKEND_POLICY file (merged into FILE's 'devices' if it exists)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start no new cell after this long; the report lists the cells not run",
    )
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.set_defaults(ab_command=cmd_compare)
    return p


def settings_from_args(args: argparse.Namespace) -> CompareSettings:
    from moe_backend.config import MoEConfig

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    small = args.size == "small" or (args.size == "auto" and device.type == "cpu" and not args.checkpoint)
    base = MoEConfig.from_hf_config(args.checkpoint) if args.checkpoint else MoEConfig()
    names = backend_names() if args.backends == "all" else [n.strip() for n in args.backends.split(",") if n.strip()]
    for name in names:
        get_backend(name)  # unknown names fail here, before any work
    routing = parse_routing(args.routing or ("router" if args.checkpoint else "uniform"))
    if routing.kind == "router" and not args.checkpoint:
        raise ValueError("--routing router needs --checkpoint")
    if args.rounds < 0 or not 0 < args.tolerance:
        raise ValueError("--rounds must be >= 0 and --tolerance > 0")
    tokens = args.tokens or list(CPU_TOKENS if small else GPU_TOKENS)
    return CompareSettings(
        backends=names,
        slices=parse_slices(args.slice, base, small=small),
        tokens=tokens,
        routing=routing,
        device=device,
        seed=args.seed,
        rounds=args.rounds or (3 if device.type == "cuda" else 1),
        tolerance=args.tolerance,
        checkpoint=args.checkpoint,
        layer=args.layer if args.checkpoint else None,
        time_budget_s=args.time_budget,
        meta={"command": _command(args)},
    )


def _command(args: argparse.Namespace) -> str:
    """The run as a command line with every setting spelled out (the report's reproduction line)."""
    parts = ["python -m moe_backend compare"]
    for key in (
        "backends",
        "slice",
        "size",
        "checkpoint",
        "layer",
        "tokens",
        "routing",
        "rounds",
        "tolerance",
        "seed",
        "time_budget",
    ):
        value = getattr(args, key, None)
        if value is None or (key == "layer" and not args.checkpoint) or (key == "rounds" and not value):
            continue
        if isinstance(value, list):
            value = ",".join(map(str, value))
        parts.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(parts + (["--cpu"] if args.cpu else []))


def cmd_compare(args: argparse.Namespace) -> int:
    from moe_backend.ab.report import write_compare_report
    from moe_backend.ab.winners import policy_section, write_policy

    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    result = run_compare(settings)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    paths = write_compare_report(result, args.out)
    for name, reason in result["skipped"].items():
        print(f"skipped {name}: {reason}")
    print("wrote " + ", ".join(paths))
    if args.emit_policy:
        section = policy_section(result["rows"], settings.tolerance)
        write_policy(args.emit_policy, result["meta"]["device"], section)
        print(f"wrote {args.emit_policy}: devices[{result['meta']['device']!r}] = {section}")
    diverging = sorted({r["backend"] for r in result["rows"] if r.get("diverges")})
    if diverging:
        print(f"DIVERGENT (relative error > {settings.tolerance:g} vs the reference): {', '.join(diverging)}")
    return 0
