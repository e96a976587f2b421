#!/usr/bin/env bash
# On the GPU machine (repo root): GPU tests, tuning and/or the side-by-side benchmark in one call.
#   bash benchmarks/run_device.sh [test] [gputests] [demo] [cudatest] [cudabench] [maskedtest] [walktest] [sweep] [tune] [bench] [routed] [layer] [graphtests] [profile] [permq] [quantgather] [layout] [ncu]
#                                 [abtests] [abcompare] [abshadow] [properties] [e2e] [policytest]
# Peers travel in ignored folders: .whl/ (sgl-deep-gemm 0.1.5 + apache-tvm-ffi wheels) and
# .peer/ (vLLM's fused_moe.py and its tuned JSONs). Logs and tables go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/_device_env.sh
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, torch.version.cuda)"
for step in "$@"; do
  t0=$(date +%s)
  case $step in
    gputests) # every test marked gpu outside tests/cuda (the cudatest step's)
           timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider -m gpu tests --ignore=tests/cuda \
                2>&1 | tee "$OUT/gputests.log" | tail -25 ;;
    demo)  for t in 64 4096; do timeout 120 python3 -m moe_backend demo --tokens $t 2>/dev/null | tee -a "$OUT/demo.log" | tail -2; done ;;
    cudatest) MOE_BACKEND_JIT_DEBUG=1 timeout ${CUDA_TEST_TIMEOUT:-150} python3 -m pytest -x -q -p no:cacheprovider \
                tests/cuda -m gpu 2>&1 | tee "$OUT/cudatest.log" | tail -25 ;;
    cudabench) timeout ${CUDA_BENCH_TIMEOUT:-300} python3 -m benchmarks.bench_cuda_gemm --md "$OUT/cuda_bench.md" ${CUDA_BENCH_ARGS:-} \
                2>"$OUT/cuda_bench.log" | tail -15 ;;
    maskedtest) timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider tests/cuda/test_cuda_masked_gpu.py \
                tests/kernels/test_kernels_gpu.py -k "masked or tma" 2>&1 | tee "$OUT/maskedtest.log" | tail -8 ;;
    walktest) # the grouped GEMMs' walks over the rows present: Triton (both layouts) and the CUDA masked kernel
           timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_kernels_gpu.py \
                tests/cuda/test_cuda_masked_gpu.py 2>&1 | tee "$OUT/walktest.log" | tail -15 ;;
    sweep) DG_JIT_DEBUG=1 DG_PRINT_CONFIGS=1 timeout ${SWEEP_TIMEOUT:-420} python3 -m lab.sweep_decode_cells \
                --log "$OUT/sweep.log" ${SWEEP_ARGS:-} > "$OUT/sweep.out" 2>&1
           grep -E "^(==|  (triton|cuda)|\|)" "$OUT/sweep.out" | tail -40 ;;
    test)  timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q tests/kernels/test_kernels_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/test_gpu.log" | tail -25 ;;
    tune*) # tune, or tune1/tune2: extra arguments from TUNE_ARGS, TUNE1_ARGS, TUNE2_ARGS
           var="$(echo "$step" | tr a-z A-Z)_ARGS"
           timeout ${TUNE_TIMEOUT:-400} python3 -c "import sys; from moe_backend.tune import main; raise SystemExit(main(['--out-dir', '$OUT', '--log', '$OUT/$step.log'] + sys.argv[1:]))" ${!var:-} 2>"/tmp/$step.progress" | tail -5
           tail -c 300 "/tmp/$step.progress" | tr '\r' '\n' | tail -2
           cp "$OUT"/grouped_gemm_*.json moe_backend/kernels/configs/ 2>/dev/null ;;  # later steps use them
    bench) timeout ${BENCH_TIMEOUT:-560} python3 -m benchmarks.bench_grouped_gemm --json "$OUT/bench.json" --md "$OUT/benchmarks.md" --log "$OUT/bench.log" ${BENCH_ARGS:---rounds 5} 2>&1 | grep -v "^|" ;;
    routed) # imbalanced routing, masked max_m 128-1024 at fixed total rows (our CUDA masked kernel too; the masked
            # contenders timed again in interleaved rounds); peers at the same counts
           timeout ${ROUTED_TIMEOUT:-420} python3 -m benchmarks.bench_grouped_gemm --json "$OUT/routed.json" --md "$OUT/routed.md" \
             --log "$OUT/routed.log" --routings ${ROUTINGS:-uniform,zipf:0.6,zipf:0.9,zipf:1.2} --cuda-masked --rounds 3 \
             --budget-s ${ROUTED_BUDGET:-330} ${ROUTED_ARGS:---slices ep8,tp8 --ep8-rows 128 --tp8-rows 16 --vllm-configs 3} \
             2>&1 | grep -v "^|---" ;;
    ncu)   timeout ${NCU_TIMEOUT:-400} python3 -m lab.ncu_compare --log "$OUT/ncu_compare.md" ${NCU_ARGS:-} 2>&1 | tail -12 ;;
    permq) timeout ${PERMQ_TIMEOUT:-300} python3 -m benchmarks.bench_permute_quant --md "$OUT/permute_quant.md" 2>&1 | tail -12 ;;
    quantgather) # the flat-item quant and the permute_rows gather: GPU tests, then the lab sweep (< 2 min)
           timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider tests/kernels/test_group_quant_gpu.py \
                tests/kernels/test_permute_rows_gpu.py 2>&1 | tee "$OUT/quantgather_tests.log" | tail -8
           timeout ${QUANTGATHER_TIMEOUT:-240} python3 -m lab.sweep_quant_gather --json "$OUT/sweep_quant_gather.json" \
                2>&1 | tee "$OUT/sweep_quant_gather.log" | tail -40 ;;
    profile) timeout ${PROFILE_TIMEOUT:-200} python3 -m benchmarks.profile_layer ${PROFILE_ARGS:-} 2>&1 | tee "$OUT/profile.log" | tail -60 ;;
    layer) cp docs/benchmarks.md "$OUT/benchmarks.layer.md"  # the docs with the layer section replaced
           timeout ${LAYER_TIMEOUT:-540} python3 -m benchmarks.bench_layer --json "$OUT/layer.json" \
                --md "$OUT/benchmarks.layer.md" --log "$OUT/layer.log" ${LAYER_ARGS:-} 2>&1 | tee "$OUT/layer.out" | tail -45 ;;
    properties) MOE_BACKEND_HYPOTHESIS_PROFILE=gpu timeout ${PROPERTIES_TIMEOUT:-200} python3 -m pytest -q -s -p no:cacheprovider \
                tests/test_properties.py 2>&1 | tee "$OUT/properties_gpu.log" | grep -E "hypothesis profile|passed|failed|Falsifying" | tail -6 ;;
    e2e)   # issue 25: a real-size DeepSeek-V3 model through transformers, our layers vs transformers' experts
           MOE_BACKEND_PRINT_POLICY=1 timeout ${E2E_TIMEOUT:-300} python3 -m examples.generate_deepseek_v3 --size real \
             --device cuda --check --json "$OUT/e2e_transformers.json" 2>&1 | tee "$OUT/e2e_transformers.log" | tail -40 ;;
    policytest) # issue 22: the policy's decode layout vs the other one with a hot expert (prints the times)
           timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -s -p no:cacheprovider tests/dispatch/test_policy_hot_expert_gpu.py \
                2>&1 | tee "$OUT/policytest.log" | grep -E "hot expert|passed|failed|Error" | tail -12 ;;
    graphtests) timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider tests/layers/test_layer_graphs.py \
                2>&1 | tee "$OUT/graphtests.log" | tail -25 ;;
    layout) timeout ${LAYOUT_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider tests/kernels/test_build_layout_gpu.py \
                tests/kernels/test_permute_quant_gpu.py tests/kernels/test_build_layout.py 2>&1 | tee "$OUT/layout_tests.log" | tail -15
            timeout ${LAYOUT_BENCH_TIMEOUT:-240} python3 -m benchmarks.bench_build_layout --md "$OUT/build_layout.md" 2>&1 | tail -20 ;;
    abtests) timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider tests/ab/test_shadow_gpu.py 2>&1 \
                | tee "$OUT/abtests.log" | tail -8 ;;
    abcompare) mkdir -p "$OUT/compare"; timeout ${COMPARE_TIMEOUT:-420} python3 -m moe_backend compare --slice ep8,tp8 \
                --out "$OUT/compare" --emit-policy "$OUT/compare/policy.json" --time-budget ${COMPARE_BUDGET:-330} \
                ${COMPARE_ARGS:-} 2>"$OUT/compare.progress"; tail -c 400 "$OUT/compare.progress" | tr '\r' '\n' | tail -2
               grep -E "^(- \*\*|\| (ep8|tp8) \|)" "$OUT/compare/report.md" | head -40; rm -f "$OUT/compare.progress"
               # one archive: a call returns at most 8 files, and the report comes with its plots
               tar czf "$OUT/compare.tgz" -C "$OUT" compare && rm -rf "$OUT/compare" ;;
    abshadow) timeout 60 python3 -m benchmarks.bench_shadow_hook 2>&1 | tee -a "$OUT/shadow_overhead.log" | tail -4
              for b in triton $(python3 -c "import deep_gemm" 2>/dev/null && echo deepgemm); do timeout ${SHADOW_TIMEOUT:-120} python3 -m benchmarks.bench_shadow_overhead \
                --backend $b ${SHADOW_ARGS:-} 2>&1 | tee -a "$OUT/shadow_overhead.log" | tail -6; done ;;
  esac
  echo "== $step: $(( $(date +%s) - t0 ))s"
done
