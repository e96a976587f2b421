"""`phasemoe` is a valid --moe-backend / KernelConfig value with the plugin, and only with it."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

NAME = "phasemoe"


def test_parser_accepts_phasemoe(on):
    assert on["parser"][NAME] == {"ok": NAME}
    assert on["parser"]["PhaseMoE"] == {"ok": NAME}  # vLLM lower-cases the flag's value
    assert on["parser_kernel_config_json"] == {"ok": NAME}


def test_parser_rejects_misspelling(on):
    assert on["parser"]["phasemo"] == {"error": "SystemExit: 2"}


def test_parser_choices_only_gain_phasemoe(on, off):
    assert sorted(on["parser_choices"]) == sorted(off["parser_choices"] + [NAME])
    assert on["parser"]["triton"] == off["parser"]["triton"] == {"ok": "triton"}


def test_kernel_config_accepts_phasemoe_with_plugin(on):
    assert on["kernel_config"][NAME] == {"ok": NAME}
    assert on["kernel_config"]["PhaseMoE"] == {"ok": NAME}
    assert on["vllm_config"] == {"ok": NAME}
    assert on["pickle"] == {"ok": NAME}  # engine-core and worker processes get pickled configs
    assert f"'{NAME}'" in on["speculative_annotation"]
    assert "ValidationError" in on["kernel_config"]["phasemo"]["error"]
    # docs/vllm.md: `--kernel-config '{"moe_backend": "phasemoe"}'` is the same as the flag.
    assert on["parser_kernel_config_json"] == {"ok": NAME}


def test_phasemoe_invalid_without_plugin(off):
    assert NAME not in off["literal"]
    assert off["parser"][NAME] == {"error": "SystemExit: 2"}
    assert off["parser_kernel_config_json"] == {"error": "SystemExit: 2"}
    assert "ValidationError" in off["kernel_config"][NAME]["error"]
    assert "ValidationError" in off["vllm_config"]["error"]
    assert f"'{NAME}'" not in off["speculative_annotation"]


def test_literal_keeps_builtin_order(on, off):
    assert on["literal"] == off["literal"] + [NAME]


ENGINE_CONFIG = """
import os, sys
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())  # loads the plugins, as `vllm serve`
args = parser.parse_args(["--model", sys.argv[1], "--moe-backend", "phasemoe",
                          "--skip-tokenizer-init", "--max-model-len", "256"])
config = AsyncEngineArgs.from_cli_args(args).create_engine_config()
print("RESULT", config.kernel_config.moe_backend, type(config.quant_config).__name__)
"""


def test_engine_config_from_the_command_line_carries_phasemoe(tmp_path):
    """`vllm serve <DeepSeek-V3 FP8> --moe-backend phasemoe` up to the engine's VllmConfig, on a
    tiny DeepSeek-V3-format FP8 checkpoint (the model itself needs a GPU: FP8 linear layers)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[3]
    checkpoint = tmp_path / "tiny-dsv3"
    subprocess.run(
        [
            sys.executable,
            str(repo / "examples" / "make_tiny_checkpoint.py"),
            str(checkpoint),
            "--layers",
            "2",
            "--shards",
            "1",
        ],
        check=True,
        capture_output=True,
    )
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu")
    env.pop("VLLM_PLUGINS", None)
    proc = subprocess.run(
        [sys.executable, "-c", ENGINE_CONFIG, str(checkpoint)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-3:] == ["RESULT", NAME, "Fp8Config"]


LLM_CONSTRUCTOR = """
import os, sys
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
import vllm.entrypoints.llm as llm_module
from vllm import LLM

class Built(Exception):
    pass

def from_engine_args(engine_args, usage_context=None, **_):
    # Stop where LLM hands its arguments to the engine (the model itself needs a GPU).
    config = engine_args.create_engine_config()
    print("RESULT", config.kernel_config.moe_backend, type(config.quant_config).__name__)
    raise Built

llm_module.LLMEngine.from_engine_args = from_engine_args
try:
    LLM(sys.argv[1], moe_backend="phasemoe", skip_tokenizer_init=True, max_model_len=256)
except Built:
    pass
"""


def test_llm_constructor_carries_phasemoe(tmp_path):
    """docs/vllm.md's `LLM(..., moe_backend="phasemoe")`: the offline API up to the engine's
    VllmConfig, without a CLI parser loading the plugins first."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[3]
    checkpoint = tmp_path / "tiny-dsv3"
    subprocess.run(
        [
            sys.executable,
            str(repo / "examples" / "make_tiny_checkpoint.py"),
            str(checkpoint),
            "--layers",
            "2",
            "--shards",
            "1",
        ],
        check=True,
        capture_output=True,
    )
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu")
    env.pop("VLLM_PLUGINS", None)
    proc = subprocess.run(
        [sys.executable, "-c", LLM_CONSTRUCTOR, str(checkpoint)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-3:] == ["RESULT", NAME, "Fp8Config"]


def test_ab_peers_are_the_kernels_docs_name(off):
    """docs/vllm.md's A/B section: `triton` and `deep_gemm` are these vLLM kernels, and the
    batched format maps them to their batched twins."""
    assert off["map"]["triton"] == {"ok": "TRITON"} and off["map"]["deep_gemm"] == {"ok": "DEEPGEMM"}
    assert off["kernel_cls"]["TRITON"]["ok"][-1].endswith(".TritonExperts")
    assert off["kernel_cls"]["DEEPGEMM"]["ok"][-1].endswith(".TritonOrDeepGemmExperts")
    # On CPU vLLM refuses both, naming the backend the batched format selected.
    assert "BATCHED_TRITON" in off["select_batched"]["triton"]["error"]
    assert "BATCHED_DEEPGEMM" in off["select_batched"]["deep_gemm"]["error"]
