"""`python -m moe_backend compare` on CPU: the reference against a deliberately wrong backend that
exists only here; the report must flag it, the winners and the emitted policy must ignore it."""

import json
import os
import subprocess
import sys

import pytest
import torch

from moe_backend.__main__ import main
from moe_backend.ab import backends
from moe_backend.ab.backends import get_backend, register_backend, unregister_backend
from moe_backend.dispatch.policy import Policy

PERTURBATION = 0.05  # 5x the layer tolerance (1e-2): a wrong kernel, not FP8 rounding


@pytest.fixture
def perturbed():
    def fn(x, w13, w13_s, w2, w2_s, topk_weights, topk_ids, **kwargs):
        kwargs.pop("phase", None)
        kwargs.pop("expected_m", None)
        from moe_backend import reference

        y = reference.routed_experts(x, w13, w13_s, w2, w2_s, topk_weights, topk_ids, **kwargs).float()
        return (y * (1 + PERTURBATION)).to(torch.bfloat16)

    register_backend("perturbed", fn, description="reference output scaled by 1.05 (test only)")
    yield "perturbed"
    unregister_backend("perturbed")


def test_compare_flags_a_perturbed_backend(tmp_path, perturbed, monkeypatch):
    out, policy_file = tmp_path / "report", tmp_path / "policy.json"
    rc = main(
        [
            "compare",
            "--cpu",
            "--backends",
            f"reference,{perturbed},triton,deepgemm",
            "--slice",
            "ep8,tp8",
            "--tokens",
            "16,40",
            "--out",
            str(out),
            "--emit-policy",
            str(policy_file),
        ]
    )
    assert rc == 0
    report = (out / "report.md").read_text()
    assert f"**DIVERGES: {perturbed}**" in report
    assert "DIVERGES: reference" not in report and "DIVERGES: triton" not in report
    assert "**skipped**: needs a CUDA GPU" in report  # deepgemm on CPU
    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    assert {r["slice"] for r in rows} == {"ep8-small", "tp8-small"}
    bad = [r for r in rows if r["backend"] == perturbed]
    assert len(bad) == 4 and all(r["diverges"] for r in bad)
    # A 5% scaling shows as ~5% relative error; argmax is scale-free, so it still agrees.
    assert all(0.8 * PERTURBATION < r["rel_err"] < 1.2 * PERTURBATION for r in bad)
    assert all(r["argmax_agreement"] > 0.9 for r in bad)
    good = [r for r in rows if r["backend"] in ("reference", "triton")]
    assert len(good) == 8 and all(not r["diverges"] and r["rel_err"] <= 1e-2 for r in good)
    winners_table = report.split("## Winners")[1].split("\n## ")[0]
    assert perturbed not in winners_table
    assert "**reference**" in winners_table or "**triton**" in winners_table
    for png in ("latency_ep8-small.png", "latency_tp8-small.png", "error.png"):
        assert (out / png).stat().st_size > 1000
        assert f"]({png})" in report

    data = json.loads(policy_file.read_text())
    policy = Policy.from_dict(data, device_name="cpu")
    assert policy.decode_kernel in ("reference", "triton")  # CPU timings pick one of the valid kernels
    if policy.decode_max_tokens < 40:  # CPU timings decide the boundary; past it, a kernel that ran
        assert policy.prefill_kernel in ("reference", "triton")
    else:  # no cell above the boundary: prefill keeps the default
        assert policy.prefill_kernel == Policy().prefill_kernel
    monkeypatch.setenv("MOE_BACKEND_POLICY", str(policy_file))
    assert Policy.from_env(device_name="cpu") == policy  # accepted as is through the env var


def test_emit_policy_merges_devices(tmp_path):
    from moe_backend.ab.winners import write_policy

    path = tmp_path / "p.json"
    write_policy(
        str(path), "GPU A", {"prefill_kernel": "contiguous", "decode_kernel": "triton", "decode_max_tokens": 64}
    )
    write_policy(
        str(path), "GPU B", {"prefill_kernel": "triton_contiguous", "decode_kernel": "masked", "decode_max_tokens": 128}
    )
    data = json.loads(path.read_text())
    assert Policy.from_dict(data, "GPU A").decode_kernel == "triton"
    assert Policy.from_dict(data, "GPU B").decode_max_tokens == 128
    with pytest.raises(ValueError, match="decode_kernel"):
        write_policy(str(path), "GPU C", {"decode_kernel": "fastest"})  # no such kernel
    path.write_text("not json")
    with pytest.raises(ValueError, match="not JSON"):
        write_policy(str(path), "GPU A", {})


def test_emit_policy_without_evidence_leaves_the_file_as_it_was(tmp_path, capsys):
    """No cell run (--time-budget 0): no section is emitted, the calibration stays, exit status 1."""
    policy_file = tmp_path / "policy.json"
    calibrated = {"devices": {"cpu": {"prefill_kernel": "masked", "decode_kernel": "masked", "decode_max_tokens": 0}}}
    policy_file.write_text(json.dumps(calibrated))
    args = ["compare", "--cpu", "--tokens", "1,8", "--backends", "masked,reference", "--time-budget", "0"]
    rc = main([*args, "--out", str(tmp_path / "r"), "--emit-policy", str(policy_file)])
    assert rc == 1
    assert "no policy kernel has a valid time in any cell" in capsys.readouterr().err
    assert json.loads(policy_file.read_text()) == calibrated


def test_compare_refuses_layer_without_checkpoint(tmp_path, capsys):
    assert main(["compare", "--cpu", "--tokens", "1", "--layer", "3", "--out", str(tmp_path / "r")]) == 2
    assert "--layer picks a layer of a --checkpoint" in capsys.readouterr().err


def test_compare_refuses_an_out_folder_it_cannot_create(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    rc = main(["compare", "--cpu", "--tokens", "1", "--out", str(tmp_path / "a_file" / "sub")])
    assert rc == 2 and "--out: cannot create folder" in capsys.readouterr().err


def test_compare_on_a_checkpoint_layer(tmp_path, capsys):
    proc = subprocess.run(
        [sys.executable, "examples/make_tiny_checkpoint.py", str(tmp_path / "ckpt")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    # Mistakes found before the sweep, as an argument error (the tiny checkpoint's MoE layers are 1-2).
    ckpt = ["compare", "--cpu", "--checkpoint", str(tmp_path / "ckpt"), "--tokens", "4", "--slice", "ep2"]
    assert main([*ckpt, "--layer", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--layer: 0 is not a MoE layer of this checkpoint; choose one of 1..2" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert main([*ckpt, "--out", str(tmp_path / "a_file")]) == 2
    assert "--out: " in capsys.readouterr().err and not (tmp_path / "x").exists()
    (tmp_path / "policy.txt").write_text("not json")
    assert main([*ckpt, "--out", str(tmp_path / "x"), "--emit-policy", str(tmp_path / "policy.txt")]) == 2
    assert "not JSON" in capsys.readouterr().err and not (tmp_path / "x").exists()
    rc = main(
        [
            "compare",
            "--cpu",
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--slice",
            "ep2,tp2",
            "--backends",
            "reference,phasemoe",
            "--tokens",
            "24",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    assert rc == 0
    result = json.loads((tmp_path / "r" / "results.json").read_text())
    assert result["meta"]["routing"] == "router"
    shapes = {s["name"]: (s["local_experts"], s["intermediate"]) for s in result["meta"]["slices"]}
    assert shapes == {"ep2": (8, 256), "tp2": (16, 128)}
    assert all(not r["diverges"] for r in result["rows"]), result["rows"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backends", "nope"], "unknown name 'nope'"),
        (["--slice", "ep7"], "must divide"),
        (["--slice", "tp32"], "multiple of 128"),
        (["--routing", "zipf:9"], "0 <= A <= 4"),
        (["--routing", "router"], "needs --checkpoint"),
        (["--checkpoint", "/no/such/folder"], "--checkpoint: '/no/such/folder' is not a checkpoint folder"),
        (["--backends", ","], "expected backend names"),
        (["--time-budget", "-5"], "--time-budget"),
        (["--size", "small", "--checkpoint", "any-folder"], "give one or the other"),
    ],
)
def test_compare_bad_arguments(tmp_path, capsys, args, message):
    assert main(["compare", "--cpu", "--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_backend_registry():
    assert {"phasemoe", "deepgemm", "reference", "triton", "masked", "cuda_contiguous"} <= set(backends.backend_names())
    with pytest.raises(ValueError, match="built-in"):
        register_backend("triton", lambda *a, **k: None)
    with pytest.raises(TypeError, match="callable"):
        register_backend("x", 3)
    with pytest.raises(ValueError, match="without ':'"):
        register_backend("a:b", lambda *a, **k: None)
    register_backend("tmp", lambda *a, **k: None)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_backend("tmp", lambda *a, **k: None)
        assert get_backend("tmp").builtin is False
    finally:
        unregister_backend("tmp")
    with pytest.raises(ValueError, match="not a registered"):
        unregister_backend("tmp")
    # The peer without its package says how to install it.
    if not __import__("importlib").util.find_spec("deep_gemm"):
        assert "pip install -e '<moe-backend clone>[deepgemm]'" in get_backend("deepgemm").unavailable(
            torch.device("cuda")
        )
    assert get_backend("deepgemm").unavailable("cpu").startswith("needs a CUDA GPU")
    assert get_backend("reference").unavailable("cpu") is None
    assert get_backend("deepgemm").choice(4096, None).name == "deepgemm_contiguous"
    assert get_backend("deepgemm").choice(8, None).name == "deepgemm_masked"


def test_compare_cli_subprocess_prints_skips(tmp_path):
    """The real entry point (progress bar on stderr, skipped peers on stdout)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_backend",
            "compare",
            "--backends",
            "reference,deepgemm",
            "--slice",
            "tp8",
            "--tokens",
            "4",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "skipped deepgemm" in proc.stdout and "compare" in proc.stderr


def test_time_budget_reports_what_was_not_run(tmp_path):
    rc = main(
        [
            "compare",
            "--cpu",
            "--backends",
            "reference",
            "--slice",
            "ep8,tp8",
            "--tokens",
            "16,32",
            "--time-budget",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["rows"] == []
    # Token counts outermost: a budget cuts the largest batches of every slice, not a whole slice.
    assert result["meta"]["not_run"] == ["ep8-small/16", "tp8-small/16", "ep8-small/32", "tp8-small/32"]
    assert "**incomplete**" in (tmp_path / "report.md").read_text()
