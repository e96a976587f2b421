"""`phasemoe` is a valid --moe-backend / KernelConfig value with the plugin, and only with it."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

NAME = "phasemoe"


@pytest.fixture(scope="module")
def on(probe):
    return probe()


@pytest.fixture(scope="module")
def off(probe):
    return probe(vllm_plugins="")


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


def test_phasemoe_invalid_without_plugin(off):
    assert NAME not in off["literal"]
    assert off["parser"][NAME] == {"error": "SystemExit: 2"}
    assert off["parser_kernel_config_json"] == {"error": "SystemExit: 2"}
    assert "ValidationError" in off["kernel_config"][NAME]["error"]
    assert "ValidationError" in off["vllm_config"]["error"]
    assert f"'{NAME}'" not in off["speculative_annotation"]


def test_literal_keeps_builtin_order(on, off):
    assert on["literal"] == off["literal"] + [NAME]
