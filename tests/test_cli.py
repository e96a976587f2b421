"""`python -m moe_backend`: the subcommands, and a table of user mistakes, each of which must end in
exit status 2 with one line naming the argument (and what is valid) after that subcommand's usage."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_backend.__main__ import main

REPO = Path(__file__).resolve().parents[1]


def _run(*args, timeout=600, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "moe_backend", *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """The README's tiny checkpoint: 3 layers, layer 0 dense, MoE layers 1..2."""
    spec = importlib.util.spec_from_file_location("make_tiny_checkpoint", REPO / "examples/make_tiny_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path_factory.mktemp("tiny")
    module.make_tiny_checkpoint(str(path))
    return str(path)


def test_info():
    proc = _run("info")
    assert proc.returncode == 0, proc.stderr
    for word in ("torch", "triton", "GPU", "kernels", "peers", "policy"):
        assert word in proc.stdout
    # Every kernel family, with why it does not run here (this CPU machine).
    assert "reference (torch): available" in proc.stdout
    assert "Triton (ours): not here (needs a CUDA GPU" in proc.stdout
    assert "CUDA C++ grouped GEMM (ours, JIT): not here (needs a Hopper GPU, sm_90a)" in proc.stdout
    assert "DeepGEMM (optional peer provider): " in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the note is for machines without a GPU")
def test_info_on_cpu_flags_a_policy_naming_cuda_only_kernels():
    env = {**os.environ, "MOE_BACKEND_POLICY": '{"prefill_kernel": "deepgemm_contiguous"}'}
    proc = _run("info", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "prefill_kernel='deepgemm_contiguous' runs on CUDA tensors only" in proc.stdout
    assert "runs on CUDA tensors only" not in _run("info").stdout


def test_default_demo_on_cpu_is_reduced_and_says_the_reference_ran():
    """The README's quick start: on CPU a reduced layer with DeepSeek-V3's router, in seconds."""
    proc = _run("demo", "--cpu", "--reps", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reduced size" in proc.stdout and "hidden=512" in proc.stdout and "experts=256" in proc.stdout
    assert "policy: decode batch of 64 tokens -> kernel 'contiguous'" in proc.stdout
    assert "ran:    routed experts: grouped_gemm_contiguous x2 on reference (torch)" in proc.stdout
    assert "ran:    shared expert: grouped_gemm_contiguous x2 on reference (torch)" in proc.stdout


def test_demo_on_tiny_checkpoint(tiny_checkpoint):
    # No --layer: the checkpoint's first MoE layer (1), not a fixed index it may not have.
    proc = _run("demo", "--checkpoint", tiny_checkpoint, "--tokens", "33", "--cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "layer 1:" in proc.stdout and "relative error vs reference" in proc.stdout
    assert "loading layer 1" in proc.stderr  # the progress bar


@pytest.mark.parametrize(
    "tokens, phase, kernel, layout",
    [(300, "prefill", "contiguous", "contiguous"), (5, "decode", "contiguous", "contiguous")],
)
def test_demo_reports_what_ran(tiny_checkpoint, capsys, tokens, phase, kernel, layout):
    assert main(["demo", "--checkpoint", tiny_checkpoint, "--tokens", str(tokens), "--reps", "1", "--cpu"]) == 0
    out = capsys.readouterr().out
    assert f"policy: {phase} batch of {tokens} tokens -> kernel {kernel!r} ({layout} layout" in out
    assert f"ran:    routed experts: grouped_gemm_{layout} x2 on reference (torch)" in out


def test_demo_reports_the_policy_from_the_environment(tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("MOE_BACKEND_POLICY", '{"decode_kernel": "masked"}')
    assert main(["demo", "--checkpoint", tiny_checkpoint, "--tokens", "3", "--reps", "1", "--cpu"]) == 0
    out = capsys.readouterr().out
    assert "-> kernel 'masked' (masked layout, GEMM1 on reference (torch)" in out
    # On CPU the plan's providers are the reference: the trace says so.
    assert "ran:    routed experts: grouped_gemm_masked x2 on reference (torch)" in out


def test_demo_on_cpu_refuses_a_policy_naming_cuda_only_kernels(tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("MOE_BACKEND_POLICY", '{"decode_kernel": "cuda_masked"}')
    with pytest.raises(SystemExit) as info:
        main(["demo", "--checkpoint", tiny_checkpoint, "--tokens", "3", "--reps", "1", "--cpu"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "decode_kernel='cuda_masked'" in err and "runs on CPU (" in err


def test_demo_empty_batch(tiny_checkpoint, capsys):
    assert main(["demo", "--checkpoint", tiny_checkpoint, "--tokens", "0", "--cpu"]) == 0
    out = capsys.readouterr().out
    assert "tokens: 0;" in out and "ran:    no grouped GEMM" in out


def test_provider_trace_restores_what_it_wraps(tiny_config):
    """With every provider wrapped (as on a GPU), a CPU forward is traced as the reference, and
    leaving the trace puts back the original functions."""
    import torch

    from moe_backend import ops, reference
    from moe_backend.demo import _GEMMS, _PROVIDER_MODULES, ProviderTrace
    from moe_backend.layers import DeepseekV3MoE
    from moe_backend.testing import random_moe_weights

    def originals():
        found = {}
        for modules in _PROVIDER_MODULES.values():
            for name in modules:
                try:
                    module = importlib.import_module(name)
                except ImportError:
                    continue
                found.update({(name, op): getattr(module, op) for op in _GEMMS if hasattr(module, op)})
        return found

    layer = DeepseekV3MoE(tiny_config)
    layer.load_weights(random_moe_weights(tiny_config))
    before = originals()
    trace = ProviderTrace({layer.w13_fp8.data_ptr(): "routed experts"}, gpu=True)
    with trace.active():
        assert reference.grouped_gemm_masked is not before[("moe_backend.reference", "grouped_gemm_masked")]
        layer(torch.randn(5, tiny_config.hidden_size, dtype=torch.bfloat16))
    assert originals() == before
    assert ops._kernel.cache_info().currsize == 0  # no wrapped Triton function left cached
    assert dict(trace.gemms) == {
        ("routed experts", "grouped_gemm_contiguous", "reference (torch)"): 1,
        ("other", "grouped_gemm_contiguous", "reference (torch)"): 3,
    }
    assert [(p.phase, p.num_tokens, p.kernel) for p in trace.plans] == [("decode", 5, "contiguous")]


@pytest.mark.slow
def test_demo_full_size_cpu():
    """DeepSeek-V3's dimensions on CPU (an EP8 slice): minutes of weight generation, hence slow."""
    proc = _run("demo", "--size", "full", "--tokens", "8", "--reps", "1", "--cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "hidden=7168" in proc.stdout and "EP slice 1 of 8" in proc.stdout


# (argv, text the one-line error must hold: the argument's name and what is valid)
CHECKPOINT = "<tiny checkpoint>"
BAD_ARGUMENTS = [
    (["demo", "--checkpoint", CHECKPOINT, "--layer", "3"], ["argument --layer", "choose one of 1..2"]),
    (["demo", "--checkpoint", CHECKPOINT, "--layer", "0"], ["argument --layer", "choose one of 1..2"]),
    (["demo", "--layer", "-1"], ["argument --layer", ">= 0"]),
    (["demo", "--layer", "1"], ["argument --layer", "only with --checkpoint"]),
    (["demo", "--tokens", "-3"], ["argument --tokens", "0..65536"]),
    (["demo", "--tokens", "many"], ["argument --tokens", "0..65536", "'many'"]),
    (["demo", "--tokens"], ["argument --tokens", "expected one argument"]),
    (["demo", "--reps", "0"], ["argument --reps", "1..10000"]),
    (["demo", "--ep-size", "-2"], ["argument --ep-size", "1..1024"]),
    (["demo", "--ep-size", "3"], ["argument --ep-size", "does not divide", "1, 2, 4, 8, 16, 32, 64, 128, 256"]),
    (["demo", "--checkpoint", CHECKPOINT, "--ep-size", "32"], ["argument --ep-size", "1, 2, 4, 8, 16"]),
    (["demo", "--seed", "-1"], ["argument --seed", "0..2147483647"]),
    (["demo", "--threads", "-1"], ["argument --threads", "0..1024"]),
    (["demo", "--size", "huge"], ["argument --size", "'reduced', 'full'"]),
    (["demo", "--checkpoint", CHECKPOINT, "--size", "full"], ["argument --size", "not with --checkpoint"]),
    (["demo", "--checkpoint", "/no/such/folder"], ["argument --checkpoint", "is not a folder"]),
    (["demo", "--checkpoint", "<empty folder>"], ["argument --checkpoint", "no config.json"]),
    (["demo", "--token", "5"], ["unrecognized arguments: --token 5"]),  # no prefix matching
    (["demo", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["info", "--verbose"], ["unrecognized arguments: --verbose"]),
    (["tune", "--kernels", "gemm"], ["argument --kernels", "grouped_gemm_masked, grouped_gemm_contiguous"]),
    (["tune", "--slices", "ep9"], ["argument --slices", "ep8, tp8"]),
    (["tune", "--gemms", "w3"], ["argument --gemms", "w13, w2"]),
    (["tune", "--decode-rows", "0,4"], ["argument --decode-rows", "1..65536"]),
    (["tune", "--prefill-rows", "x"], ["argument --prefill-rows", "1..65536"]),
    (["tune", "--routing", "zipf:9"], ["argument --routing", "'uniform' or 'zipf:A'"]),
    (["tune", "--routing", ","], ["argument --routing", "one or more of uniform, zipf:A"]),
    (["frobnicate"], ["invalid choice: 'frobnicate'", "'info'", "'demo'", "'tune'"]),
    ([], ["the following arguments are required"]),
]


@pytest.mark.parametrize("argv, expected", BAD_ARGUMENTS, ids=[" ".join(a) or "(none)" for a, _ in BAD_ARGUMENTS])
def test_bad_argument(argv, expected, tiny_checkpoint, tmp_path, capsys):
    argv = [{CHECKPOINT: tiny_checkpoint, "<empty folder>": str(tmp_path)}.get(a, a) for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    command = argv[0] if argv and argv[0] in ("demo", "info", "tune") else None
    prog = f"python -m moe_backend {command}" if command else "python -m moe_backend"
    assert lines[0].startswith(f"usage: {prog} ")  # the subcommand's own usage
    assert lines[-1].startswith(f"{prog}: error: ")  # one line after the usage
    for text in expected:
        assert text in lines[-1], lines[-1]


def test_bad_argument_from_the_command_line():
    """The real entry point: exit status 2, the subcommand's usage, one error line, no traceback."""
    proc = _run("demo", "--tokens", "-3")
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: python -m moe_backend demo ")
    assert (
        proc.stderr.strip().splitlines()[-1]
        == "python -m moe_backend demo: error: argument --tokens: expected an integer 0..65536, got -3"
    )


def test_help_exits_zero():
    for argv in (["--help"], ["demo", "--help"], ["info", "--help"], ["tune", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0


@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["-h"], 0), (["help"], 0), (["frobnicate"], 2), ([], 2)])
def test_dev_script_usage(argv, code):
    """`./dev`'s own argument handling, which runs before it touches any virtual environment."""
    proc = subprocess.run(
        ["bash", str(REPO / "dev"), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, MOE_BACKEND_VENV="/nonexistent/venv-never-created"),
    )
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "usage: ./dev" in (proc.stdout if code == 0 else proc.stderr)
    assert not os.path.exists("/nonexistent/venv-never-created")


@pytest.mark.parametrize(
    "command, variable, value, expected",
    [
        (
            "info",
            "MOE_BACKEND_POLICY",
            '{"decode_kernel": "trition"}',
            "MOE_BACKEND_POLICY: policy key 'decode_kernel'",
        ),
        ("demo", "MOE_BACKEND_POLICY", "/no/such/policy.json", "MOE_BACKEND_POLICY: '/no/such/policy.json'"),
        ("demo", "MOE_BACKEND_SHADOW", "trition:0.01", "MOE_BACKEND_SHADOW: backend: unknown name 'trition'"),
        ("compare", "MOE_BACKEND_SHADOW", "triton:2", "MOE_BACKEND_SHADOW: the rate of 'triton:2'"),
    ],
)
def test_bad_environment_is_an_argument_error_before_any_work(command, variable, value, expected, monkeypatch, capsys):
    """A bad setting the layer reads per call stops the command at its start, as a bad flag does,
    not as a traceback at its first forward."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exc:
        main([command])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and expected in err.strip().splitlines()[-1], err


def test_demo_says_when_shadow_runs_are_in_its_report(monkeypatch, capsys):
    monkeypatch.setenv("MOE_BACKEND_SHADOW", "reference:1")
    assert main(["demo", "--tokens", "4"]) == 0
    assert "shadow: MOE_BACKEND_SHADOW='reference:1' is on" in capsys.readouterr().out
    monkeypatch.delenv("MOE_BACKEND_SHADOW")
    assert main(["demo", "--tokens", "4"]) == 0
    assert "shadow:" not in capsys.readouterr().out
