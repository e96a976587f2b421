"""vLLM's FP8 MoE oracle returns our experts for `phasemoe`; every built-in answer is unchanged."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

NAME = "phasemoe"
STANDARD = "moe_backend_integrations.vllm.experts.PhaseMoEExperts"
BATCHED = "moe_backend_integrations.vllm.experts.PhaseMoEBatchedExperts"


def test_selection_returns_our_experts(on):
    assert on["map"][NAME] == {"ok": "PHASEMOE"}
    assert on["kernel_cls"]["PHASEMOE"] == {"ok": [STANDARD, BATCHED]}
    assert on["select"][NAME] == {"ok": ["PHASEMOE", STANDARD]}
    assert on["select_batched"][NAME] == {"ok": ["PHASEMOE", BATCHED]}


@pytest.mark.parametrize("key", ["map", "kernel_cls", "select", "select_batched"])
def test_builtin_answers_unchanged(on, off, key):
    extra = {"map": NAME, "kernel_cls": "PHASEMOE", "select": NAME, "select_batched": NAME}[key]
    assert set(on[key]) == set(off[key]) | {extra}
    changed = {name: (off[key][name], on[key][name]) for name in off[key] if on[key][name] != off[key][name]}
    assert not changed
    assert len(off[key]) > 15  # every built-in name / member was asked


def test_enum_gains_one_member(on, off):
    assert on["enum_members"] == off["enum_members"] + ["PHASEMOE"]


def test_auto_never_picks_phasemoe(on, off):
    assert on["select"]["auto"] == off["select"]["auto"]
    assert "PHASEMOE" not in str(on["select"]["auto"]) + str(on["select_batched"]["auto"])


def test_unsupported_quantization_is_refused_clearly(on):
    error = on["select_per_tensor"]["error"]
    assert error.startswith("ValueError") and "PHASEMOE" in error and "quantization scheme" in error


@pytest.mark.parametrize("flags", [(), ("--import-quant-first",)])
def test_names_imported_from_the_oracle_are_rebound(probe, flags):
    # vLLM's FP8 method imports convert_to_fp8_moe_kernel_format by name, before or after the patch.
    report = probe(*flags)
    rebound = report["convert_rebound"]
    assert rebound.get("vllm.model_executor.layers.quantization.fp8") is True
    assert all(rebound.values()), rebound
    assert report["select"][NAME] == {"ok": ["PHASEMOE", STANDARD]}


def test_other_vllm_versions_are_refused_when_the_flag_is_used(probe, off):
    report = probe("--install-version", "0.34.0", vllm_plugins="")
    assert report["installed"] and NAME in report["literal"]  # the flag parses ...
    error = report["map"][NAME]["error"]  # ... and is refused clearly
    assert error.startswith("UnsupportedVLLMError") and "0.34.0" in error and "0.33" in error
    assert "UnsupportedVLLMError" in report["select"][NAME]["error"]
    assert "PHASEMOE" not in report["enum_members"]
    for key in ("map", "kernel_cls", "select"):
        assert {k: v for k, v in report[key].items() if k != NAME} == off[key]
