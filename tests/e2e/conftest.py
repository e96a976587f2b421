"""Whole models end to end: tiny FP8 MoE checkpoints generating in vLLM and SGLang through
`phasemoe`, against transformers' modeling with the experts of `moe_backend.reference`.

The engines run in their own venvs (`.ci/engine_e2e.sh` prepares them and says where through
MOE_BACKEND_E2E_VLLM_PYTHON, MOE_BACKEND_E2E_SGLANG_PYTHON, MOE_BACKEND_E2E_SGLANG_LIB); without
those variables every test here skips. This process (the package's venv) writes the checkpoints
and computes the reference.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Tiny models: 2 layers, hidden 256, 16 experts top-4 (DeepSeek-V3: layer 0 dense, 4 groups of 4
# experts, 2 kept, routed_scaling_factor 2.5; Qwen3-MoE: both layers MoE, softmax top-4).
MODEL_SHAPE = dict(num_layers=2, hidden_size=256, num_experts=16, top_k=4, moe_intermediate_size=256, shards=2)


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"moe_backend_example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """arch -> (checkpoint folder, config dict), written once per session on first use."""
    make = _load_example("make_tiny_checkpoint").make_tiny_checkpoint
    root = tmp_path_factory.mktemp("e2e-checkpoints")
    made: dict[str, tuple[Path, dict]] = {}

    def get(arch: str) -> tuple[Path, dict]:
        if arch not in made:
            folder = root / arch
            made[arch] = folder, make(str(folder), arch=arch, seed=0, **MODEL_SHAPE)
        return made[arch]

    return get
