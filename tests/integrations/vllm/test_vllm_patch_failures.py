"""A vLLM whose private oracle functions differ from the tested release must never lose its own FP8
MoE backends to our plugin: the import hook's failures are logged, and on an unsupported release
only `map_fp8_backend` is touched. Needs no vLLM: the oracle here is a stand-in module."""

from __future__ import annotations

import logging
import types

import pytest

from moe_backend_integrations.vllm import _patches


def _oracle(**functions) -> types.ModuleType:
    oracle = types.ModuleType("fake_oracle_fp8")
    for name, fn in functions.items():
        setattr(oracle, name, fn)
    return oracle


def test_unsupported_release_touches_only_the_name_mapping():
    # A later vLLM renamed convert_to_fp8_moe_kernel_format: refusing our name needs only the mapping.
    oracle = _oracle(map_fp8_backend=lambda name: f"vllm:{name}", backend_to_kernel_cls=lambda b: [b])
    _patches.patch_fp8_oracle_or_log(oracle, supported=False, version="0.34.0")
    assert oracle.map_fp8_backend("triton") == "vllm:triton"
    with pytest.raises(_patches.UnsupportedVLLMError, match="found vLLM 0.34.0"):
        oracle.map_fp8_backend("phasemoe")


def test_a_failing_patch_is_logged_not_raised(caplog):
    # The tested release's functions gone: the import of vLLM's oracle must still succeed.
    original = lambda name: f"vllm:{name}"  # noqa: E731
    oracle = _oracle(map_fp8_backend=original)
    with caplog.at_level(logging.ERROR, logger="vllm.phasemoe"):
        _patches.patch_fp8_oracle_or_log(oracle, supported=True, version="0.33.0")
    assert "could not hook vLLM 0.33.0's FP8 MoE oracle" in caplog.text
    assert oracle.map_fp8_backend is original  # vLLM's own answers untouched
    with pytest.raises(AttributeError):
        _patches.patch_fp8_oracle(oracle, supported=True, version="0.33.0")  # the error it logged
