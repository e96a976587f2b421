#!/usr/bin/env bash
# SGLang plugin tests (CPU): create/update the SGLang venv, install moe-backend into it, run
# tests/integrations/sglang. Idempotent; a fresh machine takes ~5 min (sglang pulls ~11 GB,
# torch 2.14.1 comes from the local wheel mirror), a warm one ~1 min.
#   MOE_BACKEND_SGLANG_VENV  venv to use (default /work/venvs/sglang)
#   PYTHON       interpreter that creates it (default python3, 3.10+)
# Extra arguments go to pytest.
set -euo pipefail

SGLANG_VERSION=0.5.23  # keep in step with integrations/sglang/__init__.py (SGLANG_VERSION)
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MOE_BACKEND_SGLANG_VENV:-/work/venvs/sglang}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('sglang') != '$SGLANG_VERSION')" 2>/dev/null; then
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "sglang==$SGLANG_VERSION"
fi
"$VENV/bin/python" -c "import pytest" 2>/dev/null \
    || "$VENV/bin/pip" install --quiet --disable-pip-version-check pytest
# --no-deps: sglang already pins the torch we test with.
"$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps -e "$REPO"

# This recipe creates no dependency conflict: whatever pip check reports is listed (not fatal).
if conflicts=$("$VENV/bin/pip" check 2>&1); then
    echo "[sglang] pip check: no conflicts (none expected)" >&2
else
    echo "[sglang] pip check: conflicts NOT expected from this recipe:" >&2
    sed 's/^/  /' <<<"$conflicts" >&2
fi

cd "$REPO"
"$VENV/bin/python" -c "import sglang, moe_backend_integrations.sglang as p; print('sglang', sglang.__version__, '| plugin pinned to', p.SGLANG_VERSION)"
exec "$VENV/bin/python" -m pytest tests/integrations/sglang -q "$@"
