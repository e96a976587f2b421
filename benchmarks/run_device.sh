#!/usr/bin/env bash
# On the GPU machine (repo root): GPU tests, tuning and/or the side-by-side benchmark in one call.
#   bash benchmarks/run_device.sh [test] [tune] [bench] [layer]
# Peers travel in ignored folders: .whl/ (sgl-deep-gemm 0.1.5 + apache-tvm-ffi wheels) and
# .peer/ (vLLM's fused_moe.py and its tuned JSONs). Logs and tables go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, torch.version.cuda)"
for step in "$@"; do
  t0=$(date +%s)
  case $step in
    test)  timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q tests/gpu/test_kernels_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/test_gpu.log" | tail -25 ;;
    tune*) # tune, or tune1/tune2: extra arguments from TUNE_ARGS, TUNE1_ARGS, TUNE2_ARGS
           var="$(echo "$step" | tr a-z A-Z)_ARGS"
           timeout ${TUNE_TIMEOUT:-400} python3 -c "import sys; from moe_backend.tune import main; raise SystemExit(main(['--out-dir', '$OUT', '--log', '$OUT/$step.log'] + sys.argv[1:]))" ${!var:-} 2>"/tmp/$step.progress" | tail -5
           tail -c 300 "/tmp/$step.progress" | tr '\r' '\n' | tail -2
           cp "$OUT"/grouped_gemm_*.json moe_backend/kernels/configs/ 2>/dev/null ;;  # later steps use them
    bench) timeout ${BENCH_TIMEOUT:-560} python3 benchmarks/bench_grouped_gemm.py --json "$OUT/bench.json" --md "$OUT/benchmarks.md" --log "$OUT/bench.log" ${BENCH_ARGS:-} 2>&1 | grep -v "^|" ;;
    layer) timeout ${LAYER_TIMEOUT:-200} python3 benchmarks/bench_layer.py --json "$OUT/layer.json" 2>&1 | tee "$OUT/layer.log" | tail -20 ;;
  esac
  echo "== $step: $(( $(date +%s) - t0 ))s"
done
