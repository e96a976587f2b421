#!/usr/bin/env bash
# usage: .ci/install_torch.sh VENV
# Installs torch into VENV, the build this machine needs, and says which and why:
# - an NVIDIA GPU (nvidia-smi lists one, or the driver's /proc entry): PyPI's torch, the CUDA build;
# - no GPU: a CPU build: a local `torch-*+cpu` wheel for this Python from a PIP_FIND_LINKS folder
#   or pip's configured find-links (its dependencies from PyPI), else the PyTorch CPU index; only if that index cannot be reached,
#   PyPI's CUDA build, announced first (it runs on CPU too, but is ~5.7 GB).
# MOE_BACKEND_TORCH=cpu|cuda overrides the detection (default auto). Used by ./dev and .ci/wheel_check.sh.
set -euo pipefail
VENV=${1:?usage: $0 VENV}
CPU_INDEX=https://download.pytorch.org/whl/cpu
PIP=("$VENV/bin/pip" install --quiet --disable-pip-version-check)
say() { echo "[torch] $*" >&2; }

nvidia_gpu() {  # prints the GPU when there is one
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    nvidia-smi -L | head -1
  elif compgen -G "/proc/driver/nvidia/gpus/*" >/dev/null; then
    echo "an NVIDIA GPU (/proc/driver/nvidia/gpus)"
  else
    return 1
  fi
}

local_cpu_torch() {  # prints "VERSION FOLDER" of a local CPU wheel for this interpreter and machine
  local tag dir wheel
  tag=$("$VENV/bin/python" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
  for dir in ${PIP_FIND_LINKS:-} $("$VENV/bin/pip" config get global.find-links 2>/dev/null || true); do
    [ -d "$dir" ] || continue
    for wheel in "$dir"/torch-*+cpu-"$tag"-"$tag"-*linux*_"$(uname -m)".whl; do
      [ -f "$wheel" ] || continue
      wheel=${wheel##*/torch-}
      echo "${wheel%%-*} $dir"
      return 0
    done
  done
  return 1
}

want=${MOE_BACKEND_TORCH:-auto}
gpu=""
case "$want" in
  auto) if gpu=$(nvidia_gpu); then want=cuda; else want=cpu; fi ;;
  cpu|cuda) ;;
  *) say "MOE_BACKEND_TORCH must be auto, cpu or cuda, got '$want'"; exit 2 ;;
esac
if [ "$want" = cuda ]; then
  say "${gpu:+NVIDIA GPU found ($gpu)}${gpu:-MOE_BACKEND_TORCH=cuda}: installing PyPI's torch, the CUDA build (several GB with its nvidia-* packages)"
  "${PIP[@]}" torch
elif found=$(local_cpu_torch); then
  # Only the torch wheel is local; its dependencies (filelock, sympy, ...) come from PyPI.
  version=${found%% *}
  say "no NVIDIA GPU: installing the CPU build torch==$version from the local wheel in ${found#* } (its dependencies from PyPI)"
  "${PIP[@]}" "torch==$version"
else
  say "no NVIDIA GPU: installing a CPU build of torch from the PyTorch CPU index ($CPU_INDEX, ~200 MB)"
  if ! "${PIP[@]}" --retries 1 --timeout 30 torch --index-url "$CPU_INDEX" --extra-index-url https://pypi.org/simple; then
    say "the PyTorch CPU index could not be reached. Falling back to PyPI's torch, which on Linux is the"
    say "CUDA build (~5.7 GB with its nvidia-* packages; it runs on CPU too). To avoid that download, stop"
    say "now (Ctrl-C) and put a CPU torch wheel in a folder named by PIP_FIND_LINKS, or install one into $VENV."
    say "(MOE_BACKEND_TORCH=cuda skips the CPU index and this message.)"
    "${PIP[@]}" torch
  fi
fi
"$VENV/bin/python" -W ignore -c "import torch; print('[torch] installed torch', torch.__version__, '| CUDA', torch.version.cuda or 'none')" >&2
