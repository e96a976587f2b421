"""Tensors of a DeepSeek-V3-format FP8 checkpoint, and a transformers model built from them.

A weight source is a checkpoint folder (safetensors shards with `model.safetensors.index.json`, or
one `model.safetensors`) or a callable `source(prefix) -> iterable of (full name, tensor)` yielding
at least the tensors whose names start with `prefix` (in-memory models: nothing touches a disk).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator, Mapping, Union

import torch

from moe_backend.quant import FP8_DTYPE, dequantize_fp8_blockwise

__all__ = ["WeightSource", "read_config", "tensors_under", "stack_fp8_experts", "load_model"]

WeightSource = Union[str, os.PathLike, Callable[[str], Iterable[tuple[str, torch.Tensor]]]]

_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _check_source(name: str, source: object) -> None:
    if not (isinstance(source, (str, os.PathLike)) or callable(source)):
        raise TypeError(
            f"{name}: expected a checkpoint folder path or a callable prefix -> (name, tensor) "
            f"pairs, got {type(source).__name__}"
        )


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The folder's `config.json` as a dict."""
    file = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(file):
        raise ValueError(f"path: no config.json in {os.fspath(path)!r}")
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def _weight_map(path: str) -> dict[str, str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return json.load(f)["weight_map"]
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise ValueError(f"path: {path!r} has neither model.safetensors.index.json nor model.safetensors")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {name: "model.safetensors" for name in f.keys()}


def tensors_under(source: WeightSource, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Yields `(full name, tensor)` for every tensor of `source` whose name starts with `prefix`."""
    _check_source("source", source)
    if callable(source):
        for name, tensor in source(prefix):
            if name.startswith(prefix):
                yield name, tensor
        return
    try:
        from safetensors import safe_open
    except ImportError as exc:
        raise ImportError("reading a checkpoint needs safetensors: pip install safetensors") from exc
    path = os.fspath(source)
    by_shard: dict[str, list[str]] = defaultdict(list)
    for name, shard in _weight_map(path).items():
        if name.startswith(prefix):
            by_shard[shard].append(name)
    for shard, names in sorted(by_shard.items()):
        with safe_open(os.path.join(path, shard), framework="pt") as f:
            for name in names:
                yield name, f.get_tensor(name)


def stack_fp8_experts(
    tensors: Mapping[str, torch.Tensor], num_experts: int, device=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One MoE block's FP8 routed experts (names relative to the block: `experts.{e}.up_proj.weight`,
    `...weight_scale_inv`) stacked as the kernels read them: w13_fp8 `[E, 2I, H]` (gate rows, then
    up), w13_scale_inv `[E, 2I/128, H/128]`, w2_fp8 `[E, H, I]`, w2_scale_inv `[E, H/128, I/128]`."""
    missing = [
        f"experts.{e}.{p}.{k}"
        for e in range(num_experts)
        for p in ("gate_proj", "up_proj", "down_proj")
        for k in ("weight", "weight_scale_inv")
        if f"experts.{e}.{p}.{k}" not in tensors
    ]
    if missing:
        raise ValueError(f"tensors: {len(missing)} routed-expert tensor(s) missing, e.g. {missing[:3]}")
    not_fp8 = [
        n for n, t in tensors.items() if n.startswith("experts.") and n.endswith(".weight") and t.dtype != FP8_DTYPE
    ]
    if not_fp8:
        raise ValueError(
            f"tensors: routed experts must be FP8 e4m3 with weight_scale_inv, got "
            f"{tensors[not_fp8[0]].dtype} for {not_fp8[0]}"
        )

    def get(e: int, proj: str, kind: str) -> torch.Tensor:
        t = tensors[f"experts.{e}.{proj}.{kind}"]
        return t.to(device) if device is not None else t

    inter = tensors["experts.0.gate_proj.weight"].shape[0]
    if inter % 128:
        # gate and up share w13's scale rows only when each fills whole 128-row blocks
        raise ValueError(f"tensors: moe_intermediate_size ({inter}) must be a multiple of 128")
    w13 = torch.stack(
        [torch.cat([get(e, "gate_proj", "weight"), get(e, "up_proj", "weight")]) for e in range(num_experts)]
    )
    w13_scale = torch.stack(
        [
            torch.cat([get(e, "gate_proj", "weight_scale_inv"), get(e, "up_proj", "weight_scale_inv")])
            for e in range(num_experts)
        ]
    )
    w2 = torch.stack([get(e, "down_proj", "weight") for e in range(num_experts)])
    w2_scale = torch.stack([get(e, "down_proj", "weight_scale_inv") for e in range(num_experts)])
    return w13, w13_scale.float(), w2, w2_scale.float()


def hf_config(config: Mapping[str, Any]):
    """A transformers config object for a `config.json` dict, without its quantization_config
    (transformers' own FP8 path is not what is compared; the experts are dequantized here)."""
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k not in ("quantization_config", "model_type")}
    if "model_type" not in config:
        raise ValueError("config: no model_type")
    return AutoConfig.for_model(config["model_type"], **fields)


def load_model(
    source: WeightSource,
    config: Mapping[str, Any] | None = None,
    *,
    device="cpu",
    dtype: torch.dtype = torch.bfloat16,
    attn_implementation: str | None = None,
):
    """A transformers causal LM of the checkpoint's architecture (DeepSeek-V3 or Qwen3-MoE) holding
    every checkpoint tensor; FP8 weights (the routed experts) are dequantized to `dtype`, so
    transformers' own experts compute them. config: the `config.json` dict (default: the folder's).
    The multi-token-prediction layers the released checkpoints ship after the decoder layers
    (`model.layers.{num_hidden_layers + i}.*`, i < num_nextn_predict_layers) and the names the
    model class tells transformers to ignore are skipped, as transformers' own loading skips them.
    Raises ValueError naming any missing, extra or mis-shaped tensor."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        raise ImportError("load_model needs transformers: pip install 'transformers>=4.57'") from exc
    _check_source("source", source)
    if config is None:
        if callable(source):
            raise ValueError("config: required when source is a callable (no config.json to read)")
        config = read_config(source)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(hf_config(config), dtype=dtype, **kwargs)
        except TypeError:  # transformers before 4.56 names it torch_dtype
            model = AutoModelForCausalLM.from_config(hf_config(config), torch_dtype=dtype, **kwargs)
    model.eval()
    state = {**dict(model.named_parameters()), **{n: b for n, b in model.named_buffers() if n in model.state_dict()}}
    loaded: set[str] = set()
    placed: set[tuple[int, int, str]] = set()  # (layer, expert, projection)
    problems: list[str] = []
    pending: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)  # module -> FP8 weight / its scales
    skip = _skipped_names(model, config)

    def place(name: str, tensor: torch.Tensor) -> None:
        match = _EXPERT.match(name)
        if match:
            if _place_expert(model, int(match[1]), int(match[2]), match[3], tensor, problems):
                placed.add((int(match[1]), int(match[2]), match[3]))
            return
        target = state.get(name)
        if target is None:
            problems.append(f"extra: {name}")
        elif tuple(target.shape) != tuple(tensor.shape):
            problems.append(f"shape: {name} is {list(tensor.shape)}, the model expects {list(target.shape)}")
        else:
            target.copy_(tensor)
            loaded.add(name)

    with torch.no_grad():
        for name, tensor in tensors_under(source):
            if skip(name):
                continue
            # Any FP8 weight (routed experts here; every linear in the released checkpoints) is
            # dequantized with its 128x128 block scales once both have arrived.
            if name.endswith(".weight_scale_inv") or (name.endswith(".weight") and tensor.dtype == FP8_DTYPE):
                module, kind = name.rsplit(".", 1)
                entry = pending[module]
                entry[kind] = tensor
                if len(entry) == 2:
                    del pending[module]
                    place(
                        module + ".weight",
                        dequantize_fp8_blockwise(entry["weight"].to(device), entry["weight_scale_inv"].to(device)),
                    )
                continue
            place(name, tensor)
    for module, entry in pending.items():
        problems.append(f"missing: {module}.weight_scale_inv" if "weight" in entry else f"missing: {module}.weight")
    for prefix, experts in _expert_modules(model):
        layer = int(prefix.split(".")[2])
        absent = [
            (e, p)
            for e in range(_num_experts(experts))
            for p in ("gate_proj", "up_proj", "down_proj")
            if (layer, e, p) not in placed
        ]
        problems += [f"missing: {prefix}.{e}.{p}.weight" for e, p in absent]
        if not absent:
            loaded.update(f"{prefix}.{n}" for n, _ in experts.named_parameters())
    problems += [f"missing: {n}" for n in state if n not in loaded]
    if problems:
        raise ValueError(f"load_model: {len(problems)} problem(s):\n  " + "\n  ".join(problems[:40]))
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def _skipped_names(model, config: Mapping[str, Any]) -> Callable[[str], bool]:
    """Whether a checkpoint name is one the model does not hold by design: an MTP layer, or a
    pattern of the model class's `_keys_to_ignore_on_load_unexpected`."""
    first_mtp = int(config.get("num_hidden_layers", 0))
    mtp_layers = range(first_mtp, first_mtp + int(config.get("num_nextn_predict_layers", 0) or 0))
    patterns = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    layer_of = re.compile(r"^model\.layers\.(\d+)\.")

    def skip(name: str) -> bool:
        match = layer_of.match(name)
        return bool(match and int(match[1]) in mtp_layers) or any(p.search(name) for p in patterns)

    return skip


def _expert_modules(model) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every decoder layer's routed experts (`model.layers.{i}.mlp.experts`)."""
    return [(n, m) for n, m in model.named_modules() if re.fullmatch(r"model\.layers\.\d+\.mlp\.experts", n)]


def _num_experts(experts: torch.nn.Module) -> int:
    return experts.gate_up_proj.shape[0] if hasattr(experts, "gate_up_proj") else len(experts)


def _place_expert(model, layer: int, expert: int, proj: str, weight: torch.Tensor, problems: list[str]) -> bool:
    """Copies one expert projection into transformers' experts: the fused `[E, 2I, H]` /
    `[E, H, I]` parameters (transformers 5) or a ModuleList of MLPs (4.x). False (with the
    problem listed) when it has no place."""
    prefix = f"model.layers.{layer}.mlp.experts"
    try:
        experts = model.get_submodule(prefix)
    except AttributeError:
        problems.append(f"extra: {prefix}.{expert}.{proj}.weight (layer {layer} has no routed experts)")
        return False
    if expert >= _num_experts(experts):
        problems.append(f"extra: {prefix}.{expert}.{proj}.weight (the model has {_num_experts(experts)} experts)")
        return False
    if hasattr(experts, "gate_up_proj"):
        inter = experts.down_proj.shape[-1]
        target = {
            "gate_proj": experts.gate_up_proj[expert, :inter],
            "up_proj": experts.gate_up_proj[expert, inter:],
            "down_proj": experts.down_proj[expert],
        }[proj]
    else:
        target = getattr(experts[expert], proj).weight
    if tuple(target.shape) != tuple(weight.shape):
        problems.append(
            f"shape: {prefix}.{expert}.{proj}.weight is {list(weight.shape)}, the model expects {list(target.shape)}"
        )
        return False
    target.copy_(weight)
    return True
