"""`python -m moe_backend demo`: one DeepSeek-V3 MoE layer on random or checkpoint weights, timed and
checked against the reference, with what actually ran (the policy's choice, each GEMM's provider).

On a GPU the default layer has DeepSeek-V3's full dimensions. On CPU every GEMM runs on the torch
reference, where a full-size layer costs minutes of weight generation alone, so the default there
is `--size reduced`: DeepSeek-V3's router (256 experts in 8 groups, top-4 groups, top-8, one shared
expert) over a smaller expert MLP.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
from collections import Counter
from typing import Iterator

import torch

from moe_backend.config import MoEConfig
from moe_backend.dispatch.policy import Policy
from moe_backend.env import ENV

__all__ = ["REDUCED_CONFIG", "checkpoint_moe_layers", "run", "ProviderTrace"]

# DeepSeek-V3's routing with the expert MLP's dimensions cut to 512 x 128 (from 7168 x 2048), so
# that all 256 experts are generated and run on a CPU in seconds.
REDUCED_CONFIG = MoEConfig(hidden_size=512, moe_intermediate_size=128)
FULL_CONFIG = MoEConfig()
_NEEDS_SAFETENSORS = (
    "argument --checkpoint: reading a checkpoint needs safetensors "
    "(pip install safetensors, or this package's [checkpoint] extra)"
)
# A CPU holds only an expert-parallel slice of a layer whose routed experts exceed this many bytes.
CPU_EXPERT_BYTES = 2**32

# Where each grouped-GEMM provider lives: `moe_backend.ops` looks these functions up at call time.
REFERENCE = "reference (torch)"
_PROVIDER_MODULES = {
    REFERENCE: ("moe_backend.reference",),
    "Triton (ours)": ("moe_backend.kernels.grouped_gemm_contiguous", "moe_backend.kernels.grouped_gemm_masked"),
    "CUDA C++ (ours)": ("moe_backend.cuda.grouped_gemm_contiguous", "moe_backend.cuda.grouped_gemm_masked"),
    "DeepGEMM": ("moe_backend.providers.deepgemm",),
}
_GEMMS = ("grouped_gemm_contiguous", "grouped_gemm_masked")


_PLAN_PROVIDER = {"reference": REFERENCE, "triton": "Triton (ours)", "cuda": "CUDA C++ (ours)", "deepgemm": "DeepGEMM"}


class ProviderTrace:
    """Records, while active, the plan each batch executed and the provider of every grouped GEMM
    that ran: the plans as `moe_backend.experts` executes them, and the GEMMs that go through the
    providers' public functions (wrapped here); what it reports is what executed.

    labels: `data_ptr()` of a weight tensor -> a name for the GEMMs on it (routed / shared expert).
    gpu: also wrap the GPU providers (imported here; on CPU only the reference can run).
    """

    def __init__(self, labels: dict[int, str], gpu: bool) -> None:
        self.labels = labels
        self.gpu = gpu
        self.plans: list = []  # the Plans executed (moe_backend.dispatch.plan)
        self.gemms: Counter[tuple[str, str, str]] = Counter()  # (label, op, provider) -> calls
        self._depth = 0  # a provider may call another GEMM inside: only the outer call is counted

    def _wrap(self, provider: str, op: str, fn):
        def traced(*args, **kwargs):
            weight = args[2] if len(args) > 2 else kwargs.get("b_fp8")
            if self._depth == 0:
                label = self.labels.get(weight.data_ptr(), "other") if isinstance(weight, torch.Tensor) else "other"
                self.gemms[(label, op, provider)] += 1
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return traced

    @contextlib.contextmanager
    def active(self) -> Iterator["ProviderTrace"]:
        from moe_backend import ops
        from moe_backend.experts import recorded_plans

        patched: list[tuple[object, str, object]] = []
        for provider, modules in _PROVIDER_MODULES.items():
            if provider != REFERENCE and not self.gpu:
                continue
            for module_name in modules:
                try:
                    module = importlib.import_module(module_name)
                except ImportError:
                    continue  # a provider that cannot import cannot run either
                for op in _GEMMS:
                    if hasattr(module, op):
                        patched.append((module, op, getattr(module, op)))
                        setattr(module, op, self._wrap(provider, op, getattr(module, op)))
        # ops caches the Triton functions it looked up; clear it so the wrapped ones are found.
        ops._kernel.cache_clear()
        try:
            with recorded_plans() as plans:
                yield self
            self.plans = list(plans)
            for plan in self.plans:
                # Our kernels are launched by the plan's executor, not through the wrapped functions.
                for gemm in (plan.gemm1, plan.gemm2):
                    if gemm.provider in ("triton", "cuda"):
                        self.gemms[
                            ("routed experts", f"grouped_gemm_{plan.layout}", _PLAN_PROVIDER[gemm.provider])
                        ] += 1
        finally:
            for owner, name, original in reversed(patched):
                setattr(owner, name, original)
            ops._kernel.cache_clear()

    def describe(self) -> list[str]:
        lines = []
        if not self.plans:
            lines.append("policy: not consulted (an empty batch returns before routing)")
        for plan in self.plans:
            lines.append(
                f"policy: {plan.phase} batch of {plan.num_tokens} tokens -> kernel {plan.kernel!r} "
                f"({plan.layout} layout, GEMM1 on {_PLAN_PROVIDER[plan.gemm1.provider]}, "
                f"GEMM2 on {_PLAN_PROVIDER[plan.gemm2.provider]})"
            )
            lines.append(f"plan:   {plan.describe()}")
        if not self.gemms:
            lines.append("ran:    no grouped GEMM")
        for (label, op, provider), calls in sorted(self.gemms.items()):
            lines.append(f"ran:    {label}: {op} x{calls} on {provider}")
        return lines


def checkpoint_moe_layers(path: str) -> list[int]:
    """The layer indices of a DeepSeek-V3-format checkpoint folder that hold a MoE router
    (`model.layers.{L}.mlp.gate.weight`), from its index file or its single safetensors file."""
    index_file = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_file):
        with open(index_file) as f:
            names = list(json.load(f).get("weight_map", {}))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        from safetensors import safe_open

        with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
            names = list(f.keys())
    else:
        raise ValueError(f"{path!r} has neither model.safetensors.index.json nor model.safetensors")
    layers = set()
    for name in names:
        parts = name.split(".")
        if (
            len(parts) == 6
            and parts[:2] == ["model", "layers"]
            and parts[3:] == ["mlp", "gate", "weight"]
            and parts[2].isdigit()
        ):
            layers.add(int(parts[2]))
    return sorted(layers)


def _check_checkpoint(args: argparse.Namespace, parser: argparse.ArgumentParser) -> MoEConfig:
    """The checkpoint's config, and --layer resolved to one of its MoE layers (parser.error otherwise)."""
    path = args.checkpoint
    if not os.path.isdir(path):
        parser.error(
            f"argument --checkpoint: {path!r} is not a folder (expected a DeepSeek-V3-format "
            f"checkpoint: config.json + safetensors)"
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        parser.error(f"argument --checkpoint: {path!r} has no config.json")
    try:
        config = MoEConfig.from_hf_config(path)
        layers = checkpoint_moe_layers(path)
    except ImportError:
        parser.error(_NEEDS_SAFETENSORS)
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        parser.error(f"argument --checkpoint: {path!r}: {exc}")
    if not layers:
        parser.error(f"argument --checkpoint: {path!r} has no MoE layer (no model.layers.L.mlp.gate.weight)")
    try:
        args.layer = moe_layer(layers, args.layer)
    except ValueError as exc:
        parser.error(f"argument --layer: {exc}")
    return config


def moe_layer(layers: list[int], layer: int | None) -> int:
    """`layer` checked against a checkpoint's MoE layers (`checkpoint_moe_layers`); None: the first."""
    from moe_backend._cli import ranges

    if layer is None:
        return layers[0]
    if layer not in layers:
        raise ValueError(f"{layer} is not a MoE layer of this checkpoint; choose one of {ranges(layers)}")
    return layer


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from moe_backend import reference
    from moe_backend._progress import progress
    from moe_backend.layers import DeepseekV3MoE
    from moe_backend.layers.router import noaux_tc_route
    from moe_backend.testing import random_moe_weights

    setup_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if gpu else "cpu")
    if args.checkpoint is not None:
        if args.size is not None:
            parser.error("argument --size: not with --checkpoint (the checkpoint's config.json sets the dimensions)")
        config = _check_checkpoint(args, parser)
        what = f"checkpoint {args.checkpoint}, layer {args.layer}"
    else:
        if args.layer is not None:
            parser.error("argument --layer: only with --checkpoint (random weights make a single layer)")
        size = args.size or ("full" if gpu else "reduced")
        config = FULL_CONFIG if size == "full" else REDUCED_CONFIG
        what = f"random weights, {size} size" + (
            "" if gpu or size == "full" else " (on CPU; --size full for DeepSeek-V3's dimensions)"
        )
    num_experts = config.n_routed_experts
    expert_bytes = 3 * config.hidden_size * config.moe_intermediate_size * num_experts
    ep_size = args.ep_size or (1 if gpu or expert_bytes < CPU_EXPERT_BYTES else 8)
    if num_experts % ep_size:
        divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        parser.error(
            f"argument --ep-size: {ep_size} does not divide the layer's {num_experts} experts; "
            f"choose one of {', '.join(map(str, divisors))}"
        )
    per_rank = num_experts // ep_size

    if gpu:
        print(f"device: cuda ({torch.cuda.get_device_name()})")
    else:
        why = "--cpu" if torch.cuda.is_available() else "no GPU"
        cuda_only = Policy.from_env().cuda_only_keys()
        if cuda_only:
            named = ", ".join(f"{key}={name!r}" for key, name in cuda_only)
            parser.error(
                f"MOE_BACKEND_POLICY names kernels that run on CUDA tensors only ({named}), and this demo "
                f"runs on CPU ({why}); name 'contiguous' or 'masked' there, or unset MOE_BACKEND_POLICY"
            )
        print(f"device: cpu ({why}: every GEMM runs on the torch reference)")
    print(
        f"layer:  {what}: hidden={config.hidden_size} intermediate={config.moe_intermediate_size} "
        f"experts={num_experts} top-{config.num_experts_per_tok} of {config.topk_group}/{config.n_group} "
        f"groups; this process holds experts [0, {per_rank}) (EP slice 1 of {ep_size}) + the shared expert"
    )
    layer = DeepseekV3MoE(config, expert_range=(0, per_rank), device=device)
    if args.checkpoint is not None:
        try:
            layer.load_from_checkpoint(args.checkpoint, args.layer)
        except ImportError:
            parser.error(_NEEDS_SAFETENSORS)
        except ValueError as exc:
            parser.error(f"argument --checkpoint: layer {args.layer} does not load: {exc}")
    else:
        names = 2 + per_rank * 6 + 6
        with progress(total=names, desc="generating random FP8 weights", unit="tensor") as bar:

            def counted():
                for item in random_moe_weights(config, seed=args.seed, experts=range(per_rank), device=device):
                    bar.update(1)
                    yield item

            layer.load_weights(counted())
    setup = time.perf_counter() - setup_start

    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    x = torch.randn(args.tokens, config.hidden_size, generator=gen, device=device).to(torch.bfloat16)
    labels = {layer.w13_fp8.data_ptr(): "routed experts", layer.w2_fp8.data_ptr(): "routed experts"}
    if layer.with_shared_experts:
        labels.update(
            {layer.shared_w13_fp8.data_ptr(): "shared expert", layer.shared_w2_fp8.data_ptr(): "shared expert"}
        )
    trace = ProviderTrace(labels, gpu=gpu)
    with trace.active():
        out = layer(x)  # also the warm-up (JIT compilation on a GPU)
    if gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.reps):
        out = layer(x)
    if gpu:
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / args.reps

    # The oracle: the reference experts + shared expert, from the same router output.
    topk_weights, topk_ids = noaux_tc_route(x, layer.gate_weight, layer.e_score_correction_bias, config)
    ref = reference.routed_experts(
        x,
        layer.w13_fp8,
        layer.w13_scale_inv,
        layer.w2_fp8,
        layer.w2_scale_inv,
        topk_weights,
        topk_ids,
        ue8m0=config.ue8m0_scales,
    ).float()
    ref += _shared_reference(layer, x)
    err = ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    local = ((topk_ids >= 0) & (topk_ids < per_rank)).sum().item()
    print(f"tokens: {args.tokens}; routed (token, expert) pairs on this slice: {local}/{topk_ids.numel()}")
    if ENV.shadow:
        # The shadow's runs go through the same executor: they are in the lines below and the time.
        print(
            f"shadow: MOE_BACKEND_SHADOW={ENV.shadow!r} is on; the plans, GEMM calls and time below "
            f"include the shadow backend's sampled runs"
        )
    for line in trace.describe():
        print(line)
    print(
        f"set-up (weights): {setup:.1f} s   time per forward: {elapsed * 1e3:.3f} ms   "
        f"relative error vs reference: {err:.2e}"
    )
    if err >= 1e-2:
        print("FAILED: the layer's output differs from the reference by more than 1e-2", file=sys.stderr)
        return 1
    return 0


def _shared_reference(layer, x: torch.Tensor) -> torch.Tensor:
    from moe_backend import reference

    if not layer.with_shared_experts:
        return torch.zeros_like(x, dtype=torch.float32)
    ids = torch.zeros(x.shape[0], 1, dtype=torch.int32, device=x.device)
    ones = torch.ones(x.shape[0], 1, dtype=torch.float32, device=x.device)
    return reference.routed_experts(
        x,
        layer.shared_w13_fp8,
        layer.shared_w13_scale_inv,
        layer.shared_w2_fp8,
        layer.shared_w2_scale_inv,
        ones,
        ids,
        ue8m0=layer.config.ue8m0_scales,
    ).float()
