#!/usr/bin/env bash
# One device call for closing checks under a wall-clock budget (BUDGET_S, default 420): the
# real-size end-to-end model through transformers, the GPU property profile, the CUDA kernel's GPU
# tests and the quantizer/combine GPU tests, in that order; a step starts only with time left and
# gets at most what is left. Logs are tarred into $OUT/check.tgz (a call returns at most 8 files).
set -uo pipefail
OUT=${OUT:-/tmp/out}; F="$OUT/check"; mkdir -p "$F"
source benchmarks/_device_env.sh
START=$(date +%s); BUDGET=${BUDGET_S:-420}
step() {  # step NAME MAX_SECONDS COMMAND...
  local name=$1 max=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < 30 )); then echo "== $name: skipped (budget)"; return; fi
  local t0=$(date +%s)
  timeout $(( max < left ? max : left )) "$@" > "$F/$name.log" 2>&1
  echo "== $name: rc $? in $(( $(date +%s) - t0 ))s"; tail -n "${TAIL:-6}" "$F/$name.log"
}
TAIL=14 step e2e 200 env MOE_BACKEND_PRINT_POLICY=1 python3 -m examples.generate_deepseek_v3 --size real --device cuda \
  --check --batch 4 --prompt-len 128 --new-tokens 16 --json "$F/e2e_transformers.json"
step properties 130 env MOE_BACKEND_HYPOTHESIS_PROFILE=gpu python3 -m pytest -q -s -p no:cacheprovider \
  tests/test_properties.py
step cudatest 110 python3 -m pytest -q -p no:cacheprovider -m gpu tests/cuda
step quanttests 80 python3 -m pytest -q -p no:cacheprovider -m gpu tests -k "quant or combine"
tar czf "$OUT/check.tgz" -C "$OUT" check
