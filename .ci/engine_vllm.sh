#!/usr/bin/env bash
# vLLM plugin tests (CPU): create/update the vLLM venv, install moe-backend into it, run
# tests/integrations/vllm. Idempotent; a fresh machine takes ~4 min (torch 2.14.1 comes from the
# local wheel mirror), a warm one ~1.5 min (mostly the tests' fresh vLLM processes).
#   MOE_BACKEND_VLLM_VENV  venv to use (default /work/venvs/vllm)
#   PYTHON                 interpreter that creates it (default python3, 3.10+)
# Extra arguments go to pytest.
#
# Why not `pip install vllm==0.33.0`: it needs certifi>=2026.10.19, newer than the registry has,
# and pulls GPU-only packages. So: torch from the mirror (vLLM pins 2.14.0; 2.14.1 only warns),
# vLLM without deps, then vLLM's own Requires-Dist minus GPU-only packages and torch*, certifi
# unpinned.
set -euo pipefail

VLLM_VERSION=0.33.0  # keep in step with integrations/vllm/__init__.py (SUPPORTED_VLLM)
TORCH_VERSION=2.14.1
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MOE_BACKEND_VLLM_VENV:-/work/venvs/vllm}"
PY="${PYTHON:-python3}"
PIP=("$VENV/bin/pip" install --quiet --disable-pip-version-check)
export VLLM_TARGET_DEVICE=cpu
# vLLM requirements this recipe leaves out on purpose (name prefixes), read by both Python steps.
export GPU_ONLY_PREFIXES="flashinfer nvidia- tilelang humming quack tokenspeed-mla pynvvideocodec nvtx instanttensor fastsafetensors"
export TORCH_FAMILY="torch torchvision torchaudio torchcodec"

if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
fi
installed() {  # installed <distribution> <version>
    "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null
}
installed torch "$TORCH_VERSION" || "${PIP[@]}" "torch==$TORCH_VERSION"
installed vllm "$VLLM_VERSION" || "${PIP[@]}" --no-deps "vllm==$VLLM_VERSION"

# vLLM's runtime dependencies, once per vLLM version (the stamp is written after success).
STAMP="$VENV/.moe-backend-vllm-deps-$VLLM_VERSION"
if [ ! -f "$STAMP" ]; then
    REQS="$VENV/vllm-cpu-requirements.txt"
    "$VENV/bin/python" - > "$REQS" <<'EOF'
import importlib.metadata as md
import os
import re

GPU_ONLY_PREFIXES = tuple(os.environ["GPU_ONLY_PREFIXES"].split())
TORCH = set(os.environ["TORCH_FAMILY"].split())
for req in md.requires("vllm") or []:
    if "extra ==" in req:
        continue
    name = re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0].lower().replace("_", "-")
    if name.startswith(GPU_ONLY_PREFIXES) or name in TORCH:
        continue
    print("certifi" if name == "certifi" else req)
EOF
    echo "[vllm] pip may now print \"ERROR: pip's dependency resolver ...\" about vllm's GPU-only requirements" \
         "and its torch==2.14.0 pin: expected, this recipe leaves them out (see the top of $0)" >&2
    "${PIP[@]}" -r "$REQS"
    touch "$STAMP"
fi
"$VENV/bin/python" -c "import pytest" 2>/dev/null || "${PIP[@]}" pytest
# --no-deps: the venv's torch is the one vLLM runs with.
"${PIP[@]}" --no-deps -e "$REPO"

# pip check, sorted into what this recipe does on purpose and anything else (reported, not fatal).
# (pip check exits non-zero on any conflict; under pipefail that must not end the stage.)
{ "$VENV/bin/pip" check 2>&1 || true; } | "$VENV/bin/python" -c '
import os, re, sys
expected = tuple(os.environ["GPU_ONLY_PREFIXES"].split())
torch_family = set(os.environ["TORCH_FAMILY"].split())
lines = [line.strip() for line in sys.stdin if line.strip() and not line.startswith("No broken")]
def is_expected(line):
    m = re.match(r"vllm \S+ (?:requires|has requirement) ([A-Za-z0-9_.-]+)", line)
    return bool(m) and (m.group(1).lower().startswith(expected) or m.group(1).lower() in torch_family)
ok = [line for line in lines if is_expected(line)]
other = [line for line in lines if not is_expected(line)]
print(f"[vllm] pip check: {len(ok)} expected conflicts (GPU-only packages left out, the torch pin)"
      + ("" if not other else f"; {len(other)} NOT expected:"), file=sys.stderr)
for line in other:
    print("  " + line, file=sys.stderr)
'

cd "$REPO"
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, '| torch', torch.__version__)"
exec "$VENV/bin/python" -m pytest tests/integrations/vllm -q "$@"
