#!/usr/bin/env bash
# On the GPU machine (repo root): GPU tests, tuning and/or the side-by-side benchmark in one call.
#   bash benchmarks/run_device.sh [test] [gputests] [demo] [cudatest] [cudabench] [maskedtest] [sweep] [tune] [bench] [layer] [permq] [ncu]
#                                 [abtests] [abcompare] [abshadow]
# Peers travel in ignored folders: .whl/ (sgl-deep-gemm 0.1.5 + apache-tvm-ffi wheels) and
# .peer/ (vLLM's fused_moe.py and its tuned JSONs). Logs and tables go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
# The engine glue imports as moe_backend_integrations (a package-dir mapping pip --target lacks).
mkdir -p /tmp/shim && ln -sfn "$PWD/integrations" /tmp/shim/moe_backend_integrations
export PYTHONPATH="$PYTHONPATH:/tmp/shim"
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, torch.version.cuda)"
for step in "$@"; do
  t0=$(date +%s)
  case $step in
    gputests) timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider tests/gpu \
                tests/integrations/vllm/test_vllm_apply_gpu.py 2>&1 | tee "$OUT/gputests.log" | tail -25 ;;
    demo)  for t in 64 4096; do timeout 120 python3 -m moe_backend demo --tokens $t 2>/dev/null | tee -a "$OUT/demo.log" | tail -2; done ;;
    cudatest) MOE_BACKEND_JIT_DEBUG=1 timeout ${CUDA_TEST_TIMEOUT:-150} python3 -m pytest -x -q -p no:cacheprovider \
                tests/cuda -m gpu 2>&1 | tee "$OUT/cudatest.log" | tail -25 ;;
    cudabench) timeout ${CUDA_BENCH_TIMEOUT:-300} python3 benchmarks/bench_cuda_gemm.py --md "$OUT/cuda_bench.md" ${CUDA_BENCH_ARGS:-} \
                2>"$OUT/cuda_bench.log" | tail -15 ;;
    maskedtest) timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider tests/cuda/test_cuda_masked_gpu.py \
                tests/gpu/test_kernels_gpu.py -k "masked or tma" 2>&1 | tee "$OUT/maskedtest.log" | tail -8 ;;
    sweep) DG_JIT_DEBUG=1 DG_PRINT_CONFIGS=1 timeout ${SWEEP_TIMEOUT:-420} python3 benchmarks/sweep_decode_cells.py \
                --log "$OUT/sweep.log" ${SWEEP_ARGS:-} > "$OUT/sweep.out" 2>&1
           grep -E "^(==|  (triton|cuda)|\|)" "$OUT/sweep.out" | tail -40 ;;
    test)  timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q tests/gpu/test_kernels_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/test_gpu.log" | tail -25 ;;
    tune*) # tune, or tune1/tune2: extra arguments from TUNE_ARGS, TUNE1_ARGS, TUNE2_ARGS
           var="$(echo "$step" | tr a-z A-Z)_ARGS"
           timeout ${TUNE_TIMEOUT:-400} python3 -c "import sys; from moe_backend.tune import main; raise SystemExit(main(['--out-dir', '$OUT', '--log', '$OUT/$step.log'] + sys.argv[1:]))" ${!var:-} 2>"/tmp/$step.progress" | tail -5
           tail -c 300 "/tmp/$step.progress" | tr '\r' '\n' | tail -2
           cp "$OUT"/grouped_gemm_*.json moe_backend/kernels/configs/ 2>/dev/null ;;  # later steps use them
    bench) timeout ${BENCH_TIMEOUT:-560} python3 benchmarks/bench_grouped_gemm.py --json "$OUT/bench.json" --md "$OUT/benchmarks.md" --log "$OUT/bench.log" ${BENCH_ARGS:-} 2>&1 | grep -v "^|" ;;
    ncu)   timeout ${NCU_TIMEOUT:-400} python3 benchmarks/ncu_compare.py --log "$OUT/ncu_compare.md" ${NCU_ARGS:-} 2>&1 | tail -12 ;;
    permq) timeout ${PERMQ_TIMEOUT:-300} python3 benchmarks/bench_permute_quant.py --md "$OUT/permute_quant.md" 2>&1 | tail -12 ;;
    abtests) timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider tests/gpu/test_shadow_gpu.py 2>&1 \
                | tee "$OUT/abtests.log" | tail -8 ;;
    abcompare) mkdir -p "$OUT/compare"; timeout ${COMPARE_TIMEOUT:-300} python3 -m moe_backend compare --slice ep8,tp8 \
                --out "$OUT/compare" --emit-policy "$OUT/compare/policy.json" --time-budget ${COMPARE_BUDGET:-200} \
                ${COMPARE_ARGS:-} 2>"$OUT/compare.progress"; tail -c 400 "$OUT/compare.progress" | tr '\r' '\n' | tail -2
               grep -E "^(- \*\*|\| (ep8|tp8) \|)" "$OUT/compare/report.md" | head -40; rm -f "$OUT/compare.progress" ;;
    abshadow) for b in triton $(python3 -c "import deep_gemm" 2>/dev/null && echo deepgemm); do timeout ${SHADOW_TIMEOUT:-120} python3 benchmarks/bench_shadow_overhead.py \
                --backend $b 2>&1 | tee -a "$OUT/shadow_overhead.log" | tail -6; done ;;
    layer) timeout ${LAYER_TIMEOUT:-200} python3 benchmarks/bench_layer.py --json "$OUT/layer.json" 2>&1 | tee "$OUT/layer.log" | tail -20 ;;
  esac
  echo "== $step: $(( $(date +%s) - t0 ))s"
done
