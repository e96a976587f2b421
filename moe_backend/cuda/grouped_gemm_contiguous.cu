// Instantiation template: moe_backend/cuda/launch.py fills the {{...}} fields (plain text
// replacement) and the JIT compiles one cubin per (N, K, config, masked max_m).
#include "grouped_gemm_contiguous.cuh"

using Gemm = phasemoe::GroupedGemmContiguous<{{N}}, {{K}}, {{BLOCK_N}}, {{STAGES}}, {{GROUP_M}}, {{CLUSTER}}, {{MCAST_A}}, {{MASKED_MAX_M}}, {{GATHER_A}}, {{SILU_QUANT}}, {{DIRECT_ROWS}}, {{STREAM_K}}, {{SKIP_HALVES}}, {{A_REGS}}>;

extern "C" __global__ void __launch_bounds__(phasemoe::kNumThreads, 1)
{{KERNEL_NAME}}(const __grid_constant__ phasemoe::sm90::TmaDescriptor tmap_a,
                const __grid_constant__ phasemoe::sm90::TmaDescriptor tmap_b,
                const float* __restrict__ a_scale, const float* __restrict__ b_scale,
                const int32_t* __restrict__ row_ids, uint16_t* __restrict__ out, int m,
                const int32_t* __restrict__ rows_in_use, const int64_t* __restrict__ a_rows,
                const uint8_t* __restrict__ a_data, float* __restrict__ act_scale,
                const int32_t* __restrict__ direct_pairs, uint16_t* __restrict__ direct_out,
                float* __restrict__ stream_k_workspace) {
  // A layout sized by a static bound (no host sync) ends in padding rows: the device-side count
  // of rows in use, when given, keeps the scheduler off that tail.
  if (rows_in_use != nullptr) m = max(0, min(m, __ldg(rows_in_use)));
  // GATHER_A: A's rows are a_data's token rows a_rows[row] (tmap_a unused).
  // SILU_QUANT: `out` is the FP8 activation [M, N / 2] and act_scale its fp32 scales [M, N / 256].
  // DIRECT_ROWS: a layout row whose pair (token, weight bits) in direct_pairs [M, 2] names a
  // token (>= 0) goes, weighted, to that token's row of direct_out [T, N] instead of its row of out.
  // STREAM_K: flags (zero between launches), then per CTA of the grid a slot of partial sums
  // (stream_k.cuh).
  Gemm::run(tmap_a, tmap_b, a_scale, b_scale, row_ids, out, m, {a_rows, a_data}, act_scale, {direct_pairs, direct_out},
            {stream_k_workspace});
}

// The launcher sizes the launch with its own formula (ContiguousConfig.smem_bytes); this keeps
// the two in step at compile time, so a drift fails the CPU compile test, not a GPU run.
static_assert(Gemm::kSmemBytes == {{SMEM_BYTES}}, "launcher and kernel disagree on shared memory");
static_assert(phasemoe::kNumThreads == {{NUM_THREADS}} && phasemoe::kBlockM == {{BLOCK_M}} &&
                  phasemoe::kBlockK == {{BLOCK_K}},
              "launcher and kernel disagree on the block shape");
