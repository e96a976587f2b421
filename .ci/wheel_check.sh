#!/usr/bin/env bash
# The package as a user installs it from a built wheel: builds the wheel (python -m build), checks
# that its package data (tuned kernel configs, CUDA sources, patch ledgers) is inside, installs it
# into a new, empty virtual environment (torch as ./dev picks it: .ci/install_torch.sh), and runs
# `python -m moe_backend info` and the demo from a folder outside the source tree, so that the
# installed wheel, not this checkout, is what runs. Called by `./dev test`.
#   PYTHON  interpreter for the virtual environments (default python3, 3.10+)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
unset PYTHONPATH  # nothing but the installed wheel may provide moe_backend
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS
say() { echo "[wheel] $*" >&2; }

say "building the wheel (python -m build --wheel) in $WORK"
"$PY" -m venv "$WORK/build-env"
"$WORK/build-env/bin/pip" install --quiet --disable-pip-version-check build
"$WORK/build-env/bin/python" -m build --wheel --outdir "$WORK/dist" "$REPO" > "$WORK/build.log" 2>&1 \
    || { cat "$WORK/build.log"; exit 1; }
WHEEL=$(ls "$WORK"/dist/moe_backend-*.whl)
say "built ${WHEEL##*/} ($((SECONDS - START)) s)"

# Every data file the package reads at run time must be in the wheel.
"$WORK/build-env/bin/python" - "$REPO" "$WHEEL" <<'PY'
import pathlib, sys, zipfile
repo, wheel = pathlib.Path(sys.argv[1]), sys.argv[2]
names = set(zipfile.ZipFile(wheel).namelist())
wanted = {f"moe_backend/{p.relative_to(repo / 'moe_backend')}" for pattern in
          ("kernels/configs/*.json", "cuda/*.cuh", "cuda/*.cu") for p in (repo / "moe_backend").glob(pattern)}
wanted |= {f"moe_backend_integrations/{e}/PATCHES.md" for e in ("vllm", "sglang")}
missing = sorted(wanted - names)
if missing:
    sys.exit(f"[wheel] package data missing from the wheel: {missing}")
print(f"[wheel] package data present: {len(wanted)} files (configs, CUDA sources, patch ledgers)", file=sys.stderr)
PY

say "installing it into a new virtual environment"
"$PY" -m venv "$WORK/venv"
bash "$REPO/.ci/install_torch.sh" "$WORK/venv"
"$WORK/venv/bin/pip" install --quiet --disable-pip-version-check "$WHEEL"

cd "$WORK"  # outside the source tree: `import moe_backend` must find the installed wheel
"$WORK/venv/bin/python" - "$REPO" <<'PY'
import pathlib, sys
import moe_backend
where = pathlib.Path(moe_backend.__file__).resolve()
if pathlib.Path(sys.argv[1]).resolve() in where.parents:
    sys.exit(f"[wheel] moe_backend was imported from the source tree ({where}), not from the wheel")
print(f"[wheel] moe_backend {moe_backend.__version__} imported from {where.parent}", file=sys.stderr)
PY
"$WORK/venv/bin/python" -m moe_backend info
"$WORK/venv/bin/python" -m moe_backend demo --reps 1
say "wheel check passed in $((SECONDS - START)) s"
