import subprocess
import sys

import pytest


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "moe_backend", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_info():
    proc = _run("info")
    assert proc.returncode == 0, proc.stderr
    for word in ("torch", "triton", "GPU", "kernels", "peers", "policy"):
        assert word in proc.stdout


def test_demo_on_tiny_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "examples/make_tiny_checkpoint.py", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    proc = _run("demo", "--checkpoint", str(tmp_path), "--layer", "1", "--tokens", "33", "--cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "relative error vs reference" in proc.stdout
    assert "loading layer 1" in proc.stderr  # the progress bar


@pytest.mark.slow
def test_demo_full_size_cpu():
    """The README's quick-start demo: DeepSeek-V3 dimensions (an EP8 slice on CPU)."""
    proc = _run("demo", "--tokens", "8", "--reps", "1", "--cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "hidden=7168" in proc.stdout


def test_bad_arguments():
    proc = _run("demo", "--tokens", "many")
    assert proc.returncode == 2 and "--tokens" in proc.stderr
    proc = _run("frobnicate")
    assert proc.returncode == 2
