// Stream-K's partial sums (scheduler.cuh, StreamKPool): a CTA that computed the later K chunks of
// a unit cut between clusters leaves its fp32 sum in its own slot of a workspace and raises its
// warps' flags; the unit's owner adds every such sum to its own before the epilogue, then lowers
// the flags again, so a workspace needs zeroing only once.
#pragma once
#include <cstdint>

#include "kernel_traits.cuh"
#include "sm90_ptx.cuh"

namespace phasemoe {

// CTAs a stream-K grid may hold (the flag area's size, the same for every config, so one buffer
// serves every stream-K kernel of a device; launch.py, STREAM_K_MAX_CTAS).
constexpr int kStreamKMaxCtas = 256;
constexpr int kStreamKFlagsPerCta = 8;  // one per consumer warp

// One buffer: first int32 flags, kStreamKFlagsPerCta per CTA for kStreamKMaxCtas CTAs (zero
// between launches), then per CTA of the grid a slot of 256 consumer threads x kAccRegs floats,
// thread-interleaved in 16-byte vectors so that a warp's accesses are whole 512-byte runs. One
// pointer: the consumers keep it through the K loop, where registers are few.
template <int kAccRegs>
struct StreamKWorkspace {
  float* __restrict__ base;

  static constexpr int kConsumerThreads = 128 * kNumConsumerWarpgroups;
  static constexpr int kSlotVectors = kAccRegs / 4 * kConsumerThreads;
  static_assert(kConsumerThreads / 32 == kStreamKFlagsPerCta, "a flag per consumer warp");
  static_assert(kAccRegs % 4 == 0, "partial sums move in 16-byte vectors");

  __device__ __forceinline__ float4* slot(int cta) const {
    return reinterpret_cast<float4*>(base + kStreamKMaxCtas * kStreamKFlagsPerCta) +
           static_cast<int64_t>(cta) * kSlotVectors + threadIdx.x;
  }
  __device__ __forceinline__ int32_t* flag(int cta) const {
    return reinterpret_cast<int32_t*>(base) + cta * kStreamKFlagsPerCta + static_cast<int>(threadIdx.x) / 32;
  }

  // This thread's share of a partial sum into this CTA's slot; the warp's flag goes up once
  // every lane's stores are visible GPU-wide (each lane fences before the warp syncs).
  __device__ __forceinline__ void store(const float (&sum)[kAccRegs]) const {
    const int cta = static_cast<int>(blockIdx.x);
    float4* dst = slot(cta);
#pragma unroll
    for (int j = 0; j < kAccRegs / 4; ++j)
      __stcg(dst + j * kConsumerThreads, make_float4(sum[4 * j], sum[4 * j + 1], sum[4 * j + 2], sum[4 * j + 3]));
    __threadfence();
    __syncwarp();
    // Every lane raises the flag (the same value): a branch on the lane would leave the compiler
    // unsure that the warp is converged at the next tile's MMAs.
    sm90::st_release_gpu(flag(cta), 1);
  }

  // Adds CTA `cta`'s partial sum (the same tile, computed by the same thread index) once its
  // warp's flag is up, then lowers the flag.
  __device__ __forceinline__ void add(float (&sum)[kAccRegs], int cta) const {
    int32_t* f = flag(cta);
    sm90::flag_wait_warp(f);
    const float4* src = slot(cta);
#pragma unroll
    for (int j = 0; j < kAccRegs / 4; ++j) {
      const float4 v = __ldcg(src + j * kConsumerThreads);
      sum[4 * j] += v.x;
      sum[4 * j + 1] += v.y;
      sum[4 * j + 2] += v.z;
      sum[4 * j + 3] += v.w;
    }
    // The voted wait let the lanes go together, so every lane saw the flag up before any lowers it.
    *reinterpret_cast<volatile int32_t*>(f) = 0;
  }
};

}  // namespace phasemoe
