"""The per-phase policy: which grouped-GEMM kernel serves a batch.

prefill -> the contiguous layout (tokens sorted by expert, segments padded to the M tile; large
           tiles and our CUDA GEMM pay);
decode  -> the same layout padded to the small M tile of the decode configs (rows follow T*k);
masked  -> inputs an engine hands over in the masked layout (DeepEP low-latency, vLLM batched).
The plan (`moe_backend.dispatch.plan`) turns the choice into providers and launch configs.

Configured by a JSON object (a file, or the `MOE_BACKEND_POLICY` environment variable holding
either a path or the JSON itself), with optional per-GPU overrides under `"devices"`, keyed by
`torch.cuda.get_device_name()`, so a calibration on one GPU does not leak onto another:

    {"decode_kernel": "triton", "decode_max_tokens": 256, "masked_kernel": "triton_masked",
     "graph_max_tokens": 0, "devices": {"NVIDIA H100 80GB HBM3": {"decode_kernel": "contiguous"}}}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from typing import Any, Mapping

from moe_backend.env import ENV

__all__ = ["KernelChoice", "Policy", "KERNELS", "MASKED_KERNELS", "PHASES"]

PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class KernelChoice:
    name: str  # the policy's name for it (a KERNELS key)
    layout: str  # "contiguous" | "masked"
    impl: str  # "best" | "cuda" | "triton" (ours) | "deepgemm" (optional peer) | "reference" (torch)


# Every layout is sized from shapes alone (no host sync), so every choice is CUDA-graph safe.
KERNELS: dict[str, KernelChoice] = {
    # "best": the plan picks our CUDA C++ GEMM or our Triton one per GEMM from the measured
    # crossovers (kernels/configs/dispatch_thresholds.json).
    "contiguous": KernelChoice("contiguous", "contiguous", "best"),
    "cuda_contiguous": KernelChoice("cuda_contiguous", "contiguous", "cuda"),
    "triton_contiguous": KernelChoice("triton_contiguous", "contiguous", "triton"),
    "triton": KernelChoice("triton", "contiguous", "triton"),  # the same as triton_contiguous
    "masked": KernelChoice("masked", "masked", "best"),
    "triton_masked": KernelChoice("triton_masked", "masked", "triton"),
    "cuda_masked": KernelChoice("cuda_masked", "masked", "cuda"),
    "deepgemm_contiguous": KernelChoice("deepgemm_contiguous", "contiguous", "deepgemm"),
    "deepgemm_masked": KernelChoice("deepgemm_masked", "masked", "deepgemm"),
    "reference": KernelChoice("reference", "contiguous", "reference"),
    "reference_masked": KernelChoice("reference_masked", "masked", "reference"),
}
# Implementations with no CPU fallback: a policy naming them refuses CPU tensors.
CUDA_ONLY_IMPLS = ("cuda", "deepgemm")
MASKED_KERNELS = tuple(sorted(name for name, c in KERNELS.items() if c.layout == "masked"))


@dataclass(frozen=True)
class Policy:
    prefill_kernel: str = "contiguous"
    # Tokens sorted by expert into segments padded to the GEMM's small M tile: rows follow T*k.
    decode_kernel: str = "contiguous"
    # With no phase given, batches of at most this many tokens are treated as decode.
    decode_max_tokens: int = 256
    # Inputs an engine hands over already in the masked layout (DeepEP low-latency, vLLM batched).
    masked_kernel: str = "masked"
    # Eager CUDA calls of at most this many tokens replay a CUDA graph captured once per token
    # bucket (kernel launches cost more host time than the kernels take at decode and small
    # prefill); 0 turns it off. Memory: one pool holding one call's intermediates at this size.
    graph_max_tokens: int = 2048
    # Print each new plan (MOE_BACKEND_PRINT_POLICY=1).
    print_plan: bool = False

    def __post_init__(self) -> None:
        for key in ("prefill_kernel", "decode_kernel", "masked_kernel"):
            value = getattr(self, key)
            if not isinstance(value, str):  # a list or dict would not even hash for the lookup
                raise TypeError(f"key {key!r}: expected a kernel name (string), got {type(value).__name__} {value!r}")
            if value not in KERNELS:
                raise ValueError(f"key {key!r}: unknown kernel {value!r}; choose one of {sorted(KERNELS)}")
        if self.masked_kernel not in MASKED_KERNELS:
            raise ValueError(
                f"key 'masked_kernel': {self.masked_kernel!r} does not run the masked layout; "
                f"choose one of {list(MASKED_KERNELS)}"
            )
        for key in ("decode_max_tokens", "graph_max_tokens"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"key {key!r}: expected an int >= 0, got {type(value).__name__} {value!r}")
            if value < 0:
                raise ValueError(f"key {key!r}: expected an int >= 0, got {value!r}")
        if not isinstance(self.print_plan, bool):
            raise ValueError(f"key 'print_plan': expected true or false, got {self.print_plan!r}")

    def phase_of(self, num_tokens: int, phase: str | None = None) -> str:
        if phase is None:
            return "decode" if num_tokens <= self.decode_max_tokens else "prefill"
        if phase not in PHASES:
            raise ValueError(f"phase: expected one of {PHASES} or None, got {phase!r}")
        return phase

    def choose(self, num_tokens: int, phase: str | None = None) -> KernelChoice:
        """The policy's kernel for a batch (the plan, `moe_backend.dispatch.plan`, adds the rest)."""
        phase = self.phase_of(num_tokens, phase)
        return KERNELS[self.decode_kernel if phase == "decode" else self.prefill_kernel]

    def cuda_only_keys(self) -> list[tuple[str, str]]:
        """(key, kernel) for each key naming a kernel that runs on CUDA tensors only (our CUDA C++
        GEMMs, DeepGEMM); the others fall back to the torch reference on CPU tensors."""
        keys = ("prefill_kernel", "decode_kernel", "masked_kernel")
        return [(key, getattr(self, key)) for key in keys if KERNELS[getattr(self, key)].impl in CUDA_ONLY_IMPLS]

    # ---- configuration ----
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], device_name: str | None = None) -> "Policy":
        if not isinstance(data, Mapping):
            raise ValueError(f"policy: expected a JSON object, got {type(data).__name__}")
        return cls()._updated(data, device_name, where="policy")

    def _updated(self, data: Mapping[str, Any], device_name: str | None, where: str) -> "Policy":
        allowed = {f.name for f in fields(self)}
        overrides = {}
        for key, value in data.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: keys must be strings, got {key!r}")
            if key == "devices":
                continue
            if key not in allowed:
                raise ValueError(f"{where}: unknown key {key!r}; allowed keys are {sorted(allowed | {'devices'})}")
            overrides[key] = value
        try:
            policy = replace(self, **overrides)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{where} {exc}") from None
        devices = data.get("devices", {})
        if not isinstance(devices, Mapping):
            raise ValueError(f"{where} key 'devices': expected an object keyed by GPU name")
        matched = policy
        for name, section in devices.items():
            if not isinstance(section, Mapping) or "devices" in section:
                raise ValueError(f"{where} key 'devices.{name}': expected an object of policy keys")
            # Validate every device's section, apply only the matching one.
            candidate = policy._updated(section, None, where=f"{where} key 'devices.{name}'")
            if name == device_name:
                matched = candidate
        return matched

    @classmethod
    def from_file(cls, path: str | os.PathLike, device_name: str | None = None) -> "Policy":
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"policy file {os.fspath(path)!r} is not valid JSON: {exc}") from None
        return cls.from_dict(data, device_name)

    @classmethod
    def from_env(cls, device_name: str | None = None) -> "Policy":
        """`MOE_BACKEND_POLICY`: a path to a JSON file, or the JSON object itself; unset -> defaults."""
        raw = ENV.policy
        if device_name is None:
            device_name = _current_device_name()
        return cls._from_env_value(raw, device_name, ENV.print_policy)

    @classmethod
    @lru_cache(maxsize=16)  # parse each distinct setting once
    def _from_env_value(cls, raw: str, device_name: str | None, print_plan: bool) -> "Policy":
        policy = cls._from_json_value(raw, device_name)
        return replace(policy, print_plan=True) if print_plan else policy

    @classmethod
    def _from_json_value(cls, raw: str, device_name: str | None) -> "Policy":
        if not raw:
            return cls()
        if raw.startswith("{"):
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ValueError(f"MOE_BACKEND_POLICY is not valid JSON: {exc}") from None
            return cls.from_dict(data, device_name)
        if not os.path.isfile(raw):
            raise ValueError(f"MOE_BACKEND_POLICY: {raw!r} is neither a JSON object nor a file")
        return cls.from_file(raw, device_name)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _current_device_name() -> str:
    """The current CUDA device's name (the policy's `devices` section it selects), "cpu" without
    one (the section `compare --emit-policy` writes there); per device index, so a process
    driving two GPU models reads each one's section."""
    import torch

    if not _cuda_present():
        return "cpu"
    from moe_backend.kernels._launch_utils import device_name

    return device_name(torch.device("cuda"))


@lru_cache(maxsize=1)
def _cuda_present() -> bool:
    """torch.cuda.is_available, asked once (a routed_experts call without a policy reads the policy)."""
    import torch

    return torch.cuda.is_available()
