#!/usr/bin/env bash
# One device call for the closing figures: engine-glue and shadow GPU tests, the GPU property
# profile, the A/B compare report, shadow overhead, the TP8 layer cells; everything tarred into
# $OUT/final.tgz (the call returns at most 8 files).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/final"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
mkdir -p /tmp/shim && ln -sfn "$PWD/integrations" /tmp/shim/moe_backend_integrations && export PYTHONPATH="$PYTHONPATH:/tmp/shim"
F="$OUT/final"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/integrations/vllm/test_vllm_apply_gpu.py tests/ab/test_shadow_gpu.py 2>&1 | tee "$F/gputests2.log" | tail -4
MOE_BACKEND_HYPOTHESIS_PROFILE=gpu timeout 100 python3 -m pytest -q -s -p no:cacheprovider tests/test_properties.py 2>&1 | tee "$F/properties_gpu.log" | grep -E "hypothesis profile|passed|failed" | tail -3
mkdir -p "$F/compare"; timeout 210 python3 -m moe_backend compare --slice ep8,tp8 --out "$F/compare" \
  --emit-policy "$F/compare/policy.json" --time-budget 150 2>"$F/compare.progress"
grep -E "^(- \*\*|\| (ep8|tp8) \|)" "$F/compare/report.md" | head -30
timeout 90 python3 -m benchmarks.bench_shadow_overhead --backend triton 2>&1 | tee "$F/shadow_overhead.log" | tail -5
cp docs/benchmarks.md "$F/benchmarks.layer.md"
timeout 110 python3 -m benchmarks.bench_layer --slices tp8 --tokens 1,32,128,256,2048,16384 --routing uniform,zipf:0.6 \
  --budget-s 80 --json "$F/layer_tp8.json" --md "$F/benchmarks.layer.md" --log "$F/layer_tp8.log" 2>&1 | tail -16
tar czf "$OUT/final.tgz" -C "$OUT" final
