"""`python -m moe_backend compare`: every available backend on the same inputs, one report.

For each slice (EP8 / TP8 of DeepSeek-V3, a config.json, or a real checkpoint layer) and token
count, the backends run on identical FP8 activations, weights and routing; each is timed (rounds
interleaved across backends, so clock drift lands on all alike) and checked against the torch
reference. Writes `report.md`, `results.json` and PNG plots into `--out`; `--emit-policy` writes
the winners as a policy file for `MOE_BACKEND_POLICY`.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from moe_backend.ab.backends import backend_names, get_backend
from moe_backend.ab.routing import parse_routing
from moe_backend.ab.slices import parse_slices
from moe_backend.ab.sweep import LAYER_TOLERANCE, CompareSettings, run_compare

__all__ = ["CompareSettings", "run_compare", "add_compare_parser", "cmd_compare", "LAYER_TOLERANCE"]

GPU_TOKENS = (1, 8, 32, 128, 256, 2048, 8192, 16384)
CPU_TOKENS = (1, 8, 64)


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
    p.add_argument("--layer", type=int, default=None, help="the checkpoint's MoE layer (default: its first)")
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
    if args.size == "small" and args.checkpoint:
        raise ValueError("--size small shrinks the layer's shapes, a --checkpoint fixes them: give one or the other")
    small = args.size == "small" or (args.size == "auto" and device.type == "cpu" and not args.checkpoint)
    if args.checkpoint and not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        raise ValueError(
            f"--checkpoint: {args.checkpoint!r} is not a checkpoint folder (expected config.json + safetensors)"
        )
    base = MoEConfig.from_hf_config(args.checkpoint) if args.checkpoint else MoEConfig()
    names = backend_names() if args.backends == "all" else [n.strip() for n in args.backends.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--backends: expected backend names, e.g. phasemoe,triton, got {args.backends!r}")
    for name in names:
        get_backend(name)  # unknown names fail here, before any work
    routing = parse_routing(args.routing or ("router" if args.checkpoint else "uniform"))
    if routing.kind == "router" and not args.checkpoint:
        raise ValueError("--routing router needs --checkpoint")
    if args.layer is not None and not args.checkpoint:
        raise ValueError("--layer picks a layer of a --checkpoint; without one the layer is random")
    if args.rounds < 0 or not 0 < args.tolerance:
        raise ValueError("--rounds must be >= 0 and --tolerance > 0")
    if args.time_budget is not None and not args.time_budget >= 0:
        raise ValueError(f"--time-budget: expected seconds >= 0, got {args.time_budget}")
    tokens = args.tokens or list(CPU_TOKENS if small else GPU_TOKENS)
    layer = _checkpoint_layer(args.checkpoint, args.layer) if args.checkpoint else None
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
        layer=layer,
        time_budget_s=args.time_budget,
        meta={"command": _command(args)},
    )


def _checkpoint_layer(path: str, layer: int | None) -> int:
    """--layer resolved against the checkpoint's MoE layers (default: the first)."""
    from moe_backend.demo import checkpoint_moe_layers, moe_layer

    layers = checkpoint_moe_layers(path)
    if not layers:
        raise ValueError(f"--checkpoint: {path!r} has no MoE layer (no model.layers.L.mlp.gate.weight)")
    try:
        return moe_layer(layers, layer)
    except ValueError as exc:
        raise ValueError(f"--layer: {exc}") from None


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
    from moe_backend._json_file import json_safe, write_json
    from moe_backend.ab.report import write_compare_report
    from moe_backend.ab.winners import existing_policy, policy_section, write_policy

    try:
        settings = settings_from_args(args)
        # Where the results go, checked before the sweep rather than found wrong after it.
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise ValueError(f"--out: {args.out!r} exists and is not a folder")
        if args.emit_policy:
            existing_policy(args.emit_policy)
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"--out: cannot create folder {args.out!r} ({exc.strerror})") from None
        result = run_compare(settings)
    except ValueError as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    write_json(os.path.join(args.out, "results.json"), json_safe(result), sort_keys=False)
    paths = write_compare_report(result, args.out)
    for name, reason in result["skipped"].items():
        print(f"skipped {name}: {reason}")
    print("wrote " + ", ".join(paths))
    status = 0
    if args.emit_policy:
        section = policy_section(result["rows"], settings.tolerance)
        if section is None:
            print(
                f"compare: --emit-policy: no policy kernel has a valid time in any cell (skipped, not run or "
                f"diverging), so {args.emit_policy} is left as it was",
                file=sys.stderr,
            )
            status = 1
        else:
            write_policy(args.emit_policy, result["meta"]["device"], section)
            print(f"wrote {args.emit_policy}: devices[{result['meta']['device']!r}] = {section}")
    diverging = sorted({r["backend"] for r in result["rows"] if r.get("diverges")})
    if diverging:
        print(f"DIVERGENT (relative error > {settings.tolerance:g} vs the reference): {', '.join(diverging)}")
    return status
