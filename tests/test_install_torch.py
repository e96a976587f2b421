"""`.ci/install_torch.sh`, the torch chooser of `./dev` and the wheel check: which pip command it
runs on which machine, with pip and python stubbed (no download) and the GPU detection faked."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "install_torch.sh"
PIP_STUB = """#!/bin/bash
echo "$*" >> "$(dirname "$0")/pip.log"
case "$*" in
  "config get"*) exit 1 ;;                     # no pip-configured find-links
  *download.pytorch.org*) exit "$CPU_INDEX_RC" ;;
esac
"""
PYTHON_STUB = """#!/bin/bash
case "$*" in *"import torch"*) exit 0 ;; esac  # the script's closing check
exec "$REAL_PYTHON" "$@"
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def machine(tmp_path):
    """Runs the script against a stub venv; returns (exit code, stderr, pip command lines)."""
    venv, fake_bin, wheels = tmp_path / "venv", tmp_path / "fakebin", tmp_path / "wheels"
    for d in (venv / "bin", fake_bin, wheels):
        d.mkdir(parents=True)
    _executable(venv / "bin" / "pip", PIP_STUB)
    _executable(venv / "bin" / "python", PYTHON_STUB)
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"

    def run(*, torch_env="auto", gpu=False, local_wheel=False, cpu_index_ok=True):
        if gpu:
            _executable(fake_bin / "nvidia-smi", '#!/bin/sh\necho "GPU 0: NVIDIA H200 (UUID: GPU-0)"\n')
        if local_wheel:
            (wheels / f"torch-2.13.0+cpu-{tag}-{tag}-manylinux_2_28_{os.uname().machine}.whl").touch()
        env = dict(
            os.environ,
            PATH=f"{fake_bin}:{os.environ['PATH']}",
            PIP_FIND_LINKS=str(wheels),
            MOE_BACKEND_TORCH=torch_env,
            REAL_PYTHON=sys.executable,
            CPU_INDEX_RC="0" if cpu_index_ok else "1",
        )
        proc = subprocess.run(["bash", str(SCRIPT), str(venv)], env=env, capture_output=True, text=True, timeout=60)
        log = venv / "bin" / "pip.log"
        pips = [line for line in log.read_text().splitlines() if line.startswith("install")] if log.exists() else []
        return proc.returncode, proc.stderr, pips

    return run


def test_gpu_machine_gets_the_cuda_build(machine):
    rc, err, pips = machine(gpu=True, local_wheel=True)
    assert rc == 0 and "NVIDIA GPU found (GPU 0: NVIDIA H200" in err
    assert pips == ["install --quiet --disable-pip-version-check torch"]


def test_cpu_machine_uses_the_local_cpu_wheel_with_deps_from_the_index(machine):
    rc, err, pips = machine(torch_env="cpu", local_wheel=True)
    assert rc == 0 and "torch==2.13.0+cpu from the local wheel" in err
    # Not --no-index: the wheel's dependencies are not in the local folder.
    assert pips == ["install --quiet --disable-pip-version-check torch==2.13.0+cpu"]


def test_cpu_machine_without_a_local_wheel_uses_the_cpu_index(machine):
    rc, err, pips = machine(torch_env="cpu")
    assert rc == 0 and "PyTorch CPU index" in err
    assert len(pips) == 1 and "--index-url https://download.pytorch.org/whl/cpu" in pips[0]


def test_unreachable_cpu_index_falls_back_loudly(machine):
    rc, err, pips = machine(torch_env="cpu", cpu_index_ok=False)
    assert rc == 0 and "could not be reached" in err and "CUDA build (~5.7 GB" in err
    assert pips[-1] == "install --quiet --disable-pip-version-check torch"


def test_bad_setting_is_refused(machine):
    rc, err, pips = machine(torch_env="rocm")
    assert rc == 2 and "MOE_BACKEND_TORCH must be auto, cpu or cuda, got 'rocm'" in err and pips == []
