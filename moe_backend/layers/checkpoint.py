"""Reading one MoE layer's tensors from a Hugging Face safetensors checkpoint folder, shard by
shard, with errors that name the index or shard file and the tensor."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch

from moe_backend._progress import progress

__all__ = ["read_checkpoint_layer"]


def read_checkpoint_layer(path: str, layer_idx: int, wanted) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of layer `layer_idx`'s MoE tensors (`model.layers.{L}.mlp.*`) that `wanted(name
    relative to the block)` accepts, shard by shard, from a safetensors checkpoint folder (sharded
    with `model.safetensors.index.json`, or one `model.safetensors`). Errors name the file and tensor."""
    try:
        from safetensors import safe_open
    except ImportError as exc:
        raise ImportError("load_from_checkpoint needs safetensors: pip install safetensors") from exc
    if not os.path.isdir(path):
        raise ValueError(f"path: {path!r} is not a checkpoint folder")
    index_file = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_file):
        weight_map = _read_weight_map(index_file)
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        with _open_shard(safe_open, path, "model.safetensors") as f:
            weight_map = {name: "model.safetensors" for name in f.keys()}
    else:
        raise ValueError(f"path: {path!r} has neither model.safetensors.index.json nor model.safetensors")
    prefix = f"model.layers.{layer_idx}.mlp."
    if prefix + "gate.weight" not in weight_map:
        raise ValueError(
            f"layer_idx: the checkpoint has no MoE router {prefix}gate.weight "
            f"(layer {layer_idx} is dense, or out of range)"
        )
    by_shard: dict[str, list[str]] = defaultdict(list)
    for name, shard in weight_map.items():
        if name.startswith(prefix) and wanted(name[len(prefix) :]):
            by_shard[shard].append(name)
    total = sum(len(v) for v in by_shard.values())
    with progress(total=total, desc=f"loading layer {layer_idx}", unit="tensor") as bar:
        for shard, names in sorted(by_shard.items()):
            shard_path = os.path.join(path, shard)
            with _open_shard(safe_open, path, shard) as f:
                present = set(f.keys())
                absent = [n for n in names if n not in present]
                if absent:
                    raise ValueError(
                        f"{shard_path}: the index maps {len(absent)} tensor(s) to this shard "
                        f"but it lacks them: {', '.join(absent[:5])}"
                        f"{', ...' if len(absent) > 5 else ''}"
                    )
                for name in names:
                    try:
                        tensor = f.get_tensor(name)
                    except Exception as exc:  # safetensors raises its own error type for bad data
                        raise ValueError(
                            f"{shard_path}: tensor {name} cannot be read (truncated or corrupt shard?): {exc}"
                        ) from exc
                    yield name, tensor
                    bar.update(1)


def _read_weight_map(index_file: str) -> dict[str, str]:
    try:
        with open(index_file, encoding="utf-8") as f:
            index = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{index_file}: not valid JSON: {exc}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ValueError(f'{index_file}: expected an object with a "weight_map" of tensor name -> shard file name')
    for shard in set(weight_map.values()):
        # A shard name is a file inside the checkpoint folder, never a path out of it.
        if os.path.isabs(shard) or os.path.normpath(shard).startswith(".."):
            raise ValueError(f"{index_file}: shard {shard!r} is not a file name inside the checkpoint")
    return weight_map


@contextmanager
def _open_shard(safe_open, folder: str, shard: str):
    shard_path = os.path.join(folder, shard)
    if not os.path.isfile(shard_path):
        raise ValueError(f"{shard_path}: shard file is missing (named by the checkpoint index)")
    try:
        handle = safe_open(shard_path, framework="pt")
    except Exception as exc:  # a corrupt or truncated header: safetensors' own error type
        raise ValueError(
            f"{shard_path}: not a readable safetensors file (truncated or corrupt header?): {exc}"
        ) from exc
    with handle as f:
        yield f
