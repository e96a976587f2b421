#!/usr/bin/env bash
# One device call for closing checks under a wall-clock budget (BUDGET_S, default 420): the steps
# named in CHECK_STEPS run in that order (default: e2e properties cudatest quanttests; others:
# graphtests kerneltests othertests layer profile abshadow sweep combinesweep permutequant
# tunerouted usetuned smallbatch tokensweep prefillgather gathera streamk aregs aregslayer streamklayer pairsb skiphalves maskedwalk
# routed copybw launchgaps maskedhot pairing steady drift decodetrace layoutscan); a step starts only with at least 30 s left and gets at
# most min(its own limit, what is left). With GATE=1 a failing `graphtests` step stops the run
# (nothing after it is worth timing). Logs, the layer
# benchmark's JSON and docs section, the sweeps' JSON and re-tuned tables are tarred into
# $OUT/check.tgz (a call returns at most 8 files).
#   CHECK_STEPS="graphtests kerneltests layer abshadow" BUDGET_S=560 bash benchmarks/device_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; F="$OUT/check"; mkdir -p "$F"
source benchmarks/_device_env.sh
START=$(date +%s); BUDGET=${BUDGET_S:-420}
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
step() {  # step NAME MAX_SECONDS COMMAND...
  local name=$1 max=$2; shift 2
  local left_s; left_s=$(left)
  if (( left_s < 30 )); then echo "== $name: skipped (budget)"; return 0; fi
  local t0=$(date +%s) rc
  timeout $(( max < left_s ? max : left_s )) "$@" > "$F/$name.log" 2>&1; rc=$?
  echo "== $name: rc $rc in $(( $(date +%s) - t0 ))s"; tail -n "${TAIL:-6}" "$F/$name.log"
  return $rc
}
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, torch.version.cuda)"
for name in ${CHECK_STEPS:-e2e properties cudatest quanttests}; do
  case $name in
    e2e) # 3 real-size layers where they fit, else 2 (docs/transformers.md)
           E2E_LAYERS=$(python3 -c "import torch; from examples.generate_deepseek_v3 import real_layers_that_fit as fit; \
print(fit(torch.cuda.get_device_properties(0).total_memory))")
           TAIL=14 step e2e 200 env MOE_BACKEND_PRINT_POLICY=1 python3 -m examples.generate_deepseek_v3 --size real \
           --layers "$E2E_LAYERS" --device cuda --check --batch 4 --prompt-len 128 --new-tokens 16 \
           --json "$F/e2e_transformers.json" ;;
    properties) # the property-like history first, in the same session (a failure names the diverging stage)
           git log -1 --format="code %h" 2>/dev/null; ls moe_backend/kernels/configs/
           step properties 160 env MOE_BACKEND_HYPOTHESIS_PROFILE=gpu python3 -m pytest -q -s -p no:cacheprovider \
           tests/layers/test_layer_history_gpu.py tests/test_properties.py ;;
    cudatest) step cudatest "${CUDATEST_MAX_S:-110}" python3 -m pytest -q -p no:cacheprovider -m gpu ${CUDATEST_PATHS:-tests/cuda} ;;
    quanttests) step quanttests 80 python3 -m pytest -q -p no:cacheprovider -m gpu tests -k "quant or combine" ;;
    graphtests) step graphtests 90 python3 -m pytest -q -p no:cacheprovider tests/layers/test_layer_graphs.py \
           || { [[ ${GATE:-0} == 1 ]] && { echo "graph tests failed: stopping"; break; }; } ;;
    kerneltests) # the kernels', the layer's, the policy's and shadow mode's GPU tests (not tests/cuda, not e2e), in
           # 4 processes sharing the GPU (one took over 200 s; xdist is in the device image)
           TAIL=4 step kerneltests 200 python3 -m pytest -q -n 4 -p no:cacheprovider -m gpu tests/kernels tests/dispatch \
           tests/layers/test_layer_gpu.py tests/layers/test_nonfinite_gpu.py tests/ab/test_shadow_gpu.py ;;
    othertests) # the GPU tests outside kerneltests, graphtests and cudatest: engines' GPU paths, no-growth, generate
           TAIL=4 step othertests 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/integrations \
           tests/test_no_growth_gpu.py ;;
    layer) cp docs/benchmarks.md "$F/benchmarks.layer.md"
           TAIL=40 step layer "${LAYER_MAX_S:-420}" python3 -m benchmarks.bench_layer --json "$F/layer.json" \
           --md "$F/benchmarks.layer.md" --log "$F/layer.detail.log" --budget-s "${LAYER_BUDGET_S:-330}" ${LAYER_ARGS:-} ;;
    profile) TAIL=60 step profile 60 python3 -m benchmarks.profile_layer ${PROFILE_ARGS:-} ;;
    abshadow) TAIL=12 step abshadow "${SHADOW_MAX_S:-150}" bash -c 'for b in triton $(python3 -c "import deep_gemm" \
           2>/dev/null && echo deepgemm); do python3 -m benchmarks.bench_shadow_overhead --backend $b '"${SHADOW_ARGS:-}"'; done' ;;
    sweep) TAIL=40 step sweep 130 python3 -m lab.sweep_quant_gather --json "$F/sweep_quant_gather.json" ;;
    combinesweep) TAIL=24 step combinesweep 150 python3 -m lab.sweep_combine --json "$F/sweep_combine.json" ;;
    permutequant) TAIL=12 step permutequant 120 python3 -m lab.sweep_permute_quant --json "$F/sweep_permute_quant.json" ;;
    launchgaps) TAIL=30 step launchgaps 240 python3 -m lab.prefill_launch_gaps --json "$F/launch_gaps.json" \
             ${GAPS_ARGS:---cells ep8:8192,ep8:16384 --stages 1,2,3} ;;
    maskedhot) TAIL=16 step maskedhot 240 python3 -m lab.sweep_masked_hot --json "$F/masked_hot.json" ${HOT_ARGS:-} ;;
    copybw) TAIL=12 step copybw 90 python3 -m lab.copy_bandwidth --json "$F/copy_bandwidth.json" ;;
    pairing) TAIL=30 step pairing 240 python3 -m lab.prefill_pairing ${PAIRING_ARGS:---rounds 5} ;;
    steady) TAIL=20 step steady 240 python3 -m lab.prefill_steady ${STEADY_ARGS:---rounds 7} ;;
    drift) TAIL=80 step drift 240 python3 -m lab.prefill_drift ${DRIFT_ARGS:---rounds 6} ;;
    layoutscan) TAIL=40 step layoutscan 150 python3 -m lab.layout_scan ${LAYOUTSCAN_ARGS:-} ;;
    decodetrace) TAIL=60 step decodetrace 120 python3 -m lab.decode_trace --json "$F/decode_trace.json" ;;
    tunerouted) # the masked kernel's EP8 decode table re-tuned under uniform and Zipf counts (TUNE_ARGS to widen)
           TAIL=8 step tunerouted 560 python3 -m moe_backend tune --routing uniform,zipf:0.6 --out-dir "$F/tuned" \
           --log "$F/tune.log" ${TUNE_ARGS:---kernels grouped_gemm_masked --slices ep8} ;;
    usetuned) # the tables tunerouted wrote replace the package's for the steps after it (routed, layer, ...)
           ls "$F/tuned"/*.json > /dev/null 2>&1 && cp -v "$F/tuned"/*.json moe_backend/kernels/configs/ \
             || echo "== usetuned: no tuned tables in $F/tuned" ;;
    smallbatch) TAIL=30 step smallbatch 200 python3 -m lab.sweep_small_batch ${SMALLBATCH_ARGS:-} ;;
    tokensweep) TAIL=30 step tokensweep 170 python3 -m lab.sweep_token_gemv --json "$F/token_gemv.json" ;;
    prefillgather) TAIL=40 step prefillgather 150 python3 -m lab.prefill_gather_a ;;
    gathera) # the CUDA GEMM1 reading token rows through src_token and storing SiLU*up quant: its GPU tests (debug build: a hang
           # traps), then the prefill pipeline with and without it, same run (lab.prefill_gather_a)
           step gathertests 90 env MOE_BACKEND_JIT_DEBUG=1 python3 -m pytest -q -x -p no:cacheprovider \
             tests/cuda/test_cuda_gemm_gpu.py -k "gather or silu" \
           && TAIL=40 step gatherlab 200 python3 -m lab.prefill_gather_a ${GATHERA_ARGS:---tokens 2048,16384} ;;
    streamk) # the CUDA GEMM's stream-K: its GPU tests in a debug build (a hang traps), 4 processes sharing the GPU
           # (about 40 kernels to build on a cold cache; 8 ran an 80 GB H100 out of memory), then GEMM1 with it
           # beside the plan's and DeepGEMM's
           step sktests "${SKTESTS_MAX_S:-300}" env MOE_BACKEND_JIT_DEBUG=1 python3 -m pytest -q -x -n 4 -p no:cacheprovider \
             tests/cuda/test_cuda_gemm_gpu.py tests/cuda/test_cuda_masked_gpu.py -k "stream_k" \
           && TAIL=20 step skgemm1 150 python3 -m lab.gemm1_epilogue --silu-only --stream-k \
             ${SKGEMM1_ARGS:---cells ep8:8192:uniform,ep8:16384:uniform,ep8:8192:zipf:0.6 --rounds 5} ;;
    aregs) # 256-wide tiles with each K block's A fragments in registers: the GPU tests against A from shared memory
           # (debug build: a hang traps), GEMM1 with the SiLU*up quant epilogue beside the plan's and DeepGEMM's, then
           # plain GEMMs at prefill sizes (w13, w2) beside the plan's and DeepGEMM's
           step aregtests "${AREGS_TESTS_MAX_S:-200}" env MOE_BACKEND_JIT_DEBUG=1 python3 -m pytest -q -x -n 4 \
             -p no:cacheprovider tests/cuda/test_cuda_gemm_gpu.py -k "a_fragments" \
           && TAIL=20 step aregsgemm1 150 python3 -m lab.gemm1_epilogue --silu-only --a-regs \
             ${AREGS_GEMM1_ARGS:---cells ep8:8192:uniform,ep8:16384:uniform,ep8:8192:zipf:0.6 --rounds 5} \
           && TAIL=20 step aregsplain 200 python3 -m lab.prefill_tile_width --no-defaults --variants n256c2br \
             ${AREGS_PLAIN_ARGS:---cells ep8:8192:uniform,ep8:16384:uniform,ep8:2048:fixed,ep8:4096:fixed --rounds 5} ;;
    aregslayer) # the prefill pipeline with A fragments in registers on GEMM1 / GEMM2 / both beside the policy's plan
           TAIL=30 step arlayer 240 python3 -m lab.prefill_gather_a --only ar1,ar2,ar12 \
             ${ARLAYER_ARGS:---slices ep8 --tokens 8192,16384 --routing 0,0.6 --rounds 5} ;;
    streamklayer) # the prefill pipeline with stream-K on GEMM1 / GEMM2 / both beside the policy's plan, same run
           TAIL=30 step sklayer 240 python3 -m lab.prefill_gather_a --only sk1,sk2,sk12 \
             ${SKLAYER_ARGS:---slices ep8 --tokens 8192,16384 --routing 0,0.6 --rounds 5} ;;
    pairsb) # the CUDA masked GEMM in CTA pairs sharing B over consecutive live tiles: its GPU tests (debug build: a
           # hang traps), then the hot-expert sweep with those pairs among the contenders, beside DeepGEMM's masked GEMM
           step pairsbtests "${PAIRSB_MAX_S:-150}" env MOE_BACKEND_JIT_DEBUG=1 python3 -m pytest -q -x -n 4 -p no:cacheprovider \
             tests/cuda/test_cuda_masked_gpu.py -k "pairs_sharing_b" \
           && TAIL=16 step maskedhot 240 python3 -m lab.sweep_masked_hot --json "$F/masked_hot.json" \
             ${HOT_ARGS:---gemms w13,w2 --routings uniform,zipf:0.9,zipf:1.2 --rounds 5} ;;
    skiphalves) # warpgroups skipping the MMAs of their all-padding halves: the GPU tests (debug build: a hang traps;
           # 3 processes: more ran an 80 GB H100 out of memory on the masked tests), the hot-expert sweep with the `:h`
           # contenders beside the shipped configs and DeepGEMM's masked GEMM, then the prefill pipeline with the skip
           step shtests "${SHTESTS_MAX_S:-200}" env MOE_BACKEND_JIT_DEBUG=1 python3 -m pytest -q -x -n 3 -p no:cacheprovider \
             tests/cuda/test_cuda_gemm_gpu.py tests/cuda/test_cuda_masked_gpu.py -k "halves" \
           && TAIL=24 step shmasked 240 python3 -m lab.sweep_masked_hot --json "$F/masked_hot_skip.json" \
             ${SHMASKED_ARGS:---gemms w13,w2 --routings uniform,zipf:0.9,zipf:1.2 --rounds 5 --configs c2m:256:s3,c2m:256:s3:h,c2m:256:s3:h2,c2m:192,c2m:192:h} \
           && TAIL=30 step shlayer 240 python3 -m lab.prefill_gather_a --only sh12,sh12c1,c1 \
             ${SHLAYER_ARGS:---slices ep8,tp8 --tokens 8192,16384 --routing 0,0.6 --rounds 3} ;;
    maskedwalk) # the CUDA masked GEMM's live-tile walk vs the headers in OLD_CUDA (an earlier copy)
           TAIL=40 step maskedwalk "${MASKEDWALK_MAX_S:-240}" python3 -m lab.masked_walk_before_after \
             --old "${OLD_CUDA:-.old_cuda}" ${MASKEDWALK_ARGS:-} ;;
    routed) # bench_grouped_gemm under routed counts with our CUDA masked kernel, masked contenders interleaved
           TAIL=30 step routed "${ROUTED_MAX_S:-300}" python3 -m benchmarks.bench_grouped_gemm --json "$F/routed.json" \
             --md "$F/routed.md" --log "$F/routed.detail.log" --routings ${ROUTINGS:-uniform,zipf:0.6,zipf:0.9,zipf:1.2} \
             --cuda-masked --rounds 3 --budget-s "${ROUTED_BUDGET:-240}" ${ROUTED_ARGS:---slices ep8 --ep8-rows 128 --vllm-configs 3} ;;
    *) echo "== $name: unknown step" ;;
  esac
done
echo "== total $(( $(date +%s) - START ))s"
tar czf "$OUT/check.tgz" -C "$OUT" check
