"""The entry point is found and run by vLLM's own loader, honours VLLM_PLUGINS, and loads lazily."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

NAME = "phasemoe"


def test_entry_point_is_declared():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ours = [ep for ep in eps if ep.name == NAME]
    assert len(ours) == 1, [ep.name for ep in eps]
    assert ours[0].value == "moe_backend_integrations.vllm:register"
    assert ours[0].dist is not None and ours[0].dist.name == "moe-backend"


@pytest.mark.parametrize(
    ("vllm_plugins", "loaded"),
    [
        (None, True),  # unset: every plugin
        (NAME, True),
        (f"lora_filesystem_resolver,{NAME}", True),
        ("", False),  # an allow-list matching nothing
        ("lora_filesystem_resolver", False),  # another plugin only
    ],
)
def test_vllm_loader_honours_vllm_plugins(probe, vllm_plugins, loaded):
    report = probe("--quick", vllm_plugins=vllm_plugins)
    assert report["installed"] is loaded
    assert (NAME in report["literal"]) is loaded


def test_loading_is_lazy(probe):
    report = probe("--quick")
    assert report["installed"]
    # The oracle (and its kernels) and our experts wait until vLLM builds an FP8 MoE layer.
    assert not report["oracle_imported"]
    assert not report["experts_imported"]


def test_import_is_light():
    code = (
        "import sys, moe_backend_integrations.vllm as p; "
        "print(callable(p.register), 'vllm' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False", "False"]


def test_register_is_idempotent():
    code = """
import os, typing
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
from vllm.plugins import load_general_plugins
import moe_backend_integrations.vllm as plugin
plugin.register(); load_general_plugins(); plugin.register()
from vllm.model_executor.layers.fused_moe.oracle import fp8 as oracle
from moe_backend_integrations.vllm import _patches
_patches.patch_fp8_oracle(oracle)
from vllm.config.kernel import KernelConfig
values = typing.get_args(KernelConfig.__dataclass_fields__["moe_backend"].type)
print(values.count("phasemoe"), [m.name for m in oracle.Fp8MoeBackend].count("PHASEMOE"),
      oracle.map_fp8_backend.__wrapped__.__name__ == "map_fp8_backend",
      hasattr(oracle.map_fp8_backend.__wrapped__, "__wrapped__"))
import importlib
oracle = importlib.reload(oracle)  # fresh functions and Enum: patched again by the import hook
print(oracle.map_fp8_backend("phasemoe").name)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-5:] == ["1", "1", "True", "False", "PHASEMOE"]
