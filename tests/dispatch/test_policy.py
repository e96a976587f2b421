import json

import pytest

from moe_backend.dispatch import KERNELS, Policy


def test_defaults_by_phase_and_size():
    p = Policy()
    assert p.choose(4096, "prefill").layout == "contiguous"
    assert p.choose(1, "decode").name == "contiguous"
    assert p.choose(8).name == "contiguous"  # no phase: small batches are decode
    assert p.choose(100_000).name == "contiguous"
    assert p.masked_kernel == "masked" and KERNELS[p.masked_kernel].layout == "masked"


def test_from_env_json_and_file(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_BACKEND_POLICY", json.dumps({"decode_kernel": "triton", "decode_max_tokens": 64}))
    p = Policy.from_env(device_name=None)
    assert p.choose(64).name == "triton" and p.choose(65).name == "contiguous"
    path = tmp_path / "policy.json"
    path.write_text(
        json.dumps({"prefill_kernel": "reference", "devices": {"NVIDIA H100 80GB HBM3": {"decode_kernel": "triton"}}})
    )
    monkeypatch.setenv("MOE_BACKEND_POLICY", str(path))
    assert Policy.from_env(device_name="NVIDIA H200").decode_kernel == "contiguous"
    assert Policy.from_env(device_name="NVIDIA H100 80GB HBM3").decode_kernel == "triton"
    assert Policy.from_env(device_name="NVIDIA H200").prefill_kernel == "reference"


def test_a_machine_without_a_gpu_reads_the_cpu_section(monkeypatch):
    """`compare --emit-policy` writes devices["cpu"] there; the layer must then run it."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("for machines without a GPU")
    policy = {"devices": {"cpu": {"decode_kernel": "masked"}, "NVIDIA H200": {"decode_kernel": "triton"}}}
    monkeypatch.setenv("MOE_BACKEND_POLICY", json.dumps(policy))
    assert Policy.from_env().decode_kernel == "masked"


def test_from_env_reads_the_current_gpus_section(monkeypatch):
    """Without a device name, the policy's devices section is the current GPU's, per device index
    (a process driving an H100 and an H200 gets each one's)."""
    import torch

    from moe_backend.dispatch import policy as policy_module
    from moe_backend.kernels import _launch_utils

    names = {0: "NVIDIA H100 80GB HBM3", 1: "NVIDIA H200"}
    current = {"index": 0}
    monkeypatch.setattr(policy_module, "_cuda_present", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["index"])
    monkeypatch.setattr(_launch_utils, "_cuda_name", lambda index: names[index])
    monkeypatch.setenv("MOE_BACKEND_POLICY", json.dumps({"devices": {"NVIDIA H200": {"decode_kernel": "triton"}}}))
    assert Policy.from_env().decode_kernel == "contiguous"
    current["index"] = 1
    assert Policy.from_env().decode_kernel == "triton"
    current["index"] = 0
    assert Policy.from_env().decode_kernel == "contiguous"


@pytest.mark.parametrize(
    "config, key",
    [
        ({"decode_kernal": "masked"}, "decode_kernal"),
        ({"decode_kernel": "fast"}, "decode_kernel"),
        ({"masked_kernel": "triton"}, "masked_kernel"),  # a contiguous-layout kernel
        ({"decode_max_tokens": -1}, "decode_max_tokens"),
        ({"devices": {"H100": {"prefill_kernel": "nope"}}}, "devices.H100"),
        ({"devices": []}, "devices"),
    ],
)
def test_invalid_config_names_the_key(config, key, monkeypatch):
    with pytest.raises(ValueError, match=key):
        Policy.from_dict(config)
    monkeypatch.setenv("MOE_BACKEND_POLICY", json.dumps(config))
    with pytest.raises(ValueError, match=key):
        Policy.from_env(device_name=None)


def test_invalid_env_value(monkeypatch):
    monkeypatch.setenv("MOE_BACKEND_POLICY", "{not json")
    with pytest.raises(ValueError, match="MOE_BACKEND_POLICY"):
        Policy.from_env(device_name=None)
    monkeypatch.setenv("MOE_BACKEND_POLICY", "/no/such/file.json")
    with pytest.raises(ValueError, match="MOE_BACKEND_POLICY"):
        Policy.from_env(device_name=None)
    with pytest.raises(ValueError, match="phase"):
        Policy().choose(3, "warmup")


@pytest.mark.parametrize(
    "value, on", [("1", True), ("true", True), ("ON", True), ("0", False), ("", False), ("no", False)]
)
def test_print_policy_switch_has_one_truthiness_rule(value, on, monkeypatch):
    monkeypatch.setenv("MOE_BACKEND_POLICY", "")
    monkeypatch.setenv("MOE_BACKEND_PRINT_POLICY", value)
    assert Policy.from_env(device_name=None).print_plan is on
