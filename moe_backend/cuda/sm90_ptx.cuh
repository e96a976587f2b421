// Thin inline-PTX wrappers for the Hopper (sm_90a) features the kernel uses: mbarriers, TMA
// bulk tensor loads, wgmma fences and shared-memory descriptors, setmaxnreg. Plain PTX rather
// than CUTLASS/CuTe keeps the JIT free of a multi-MB header tree (compile time, cache key) and
// keeps every instruction the kernel issues visible in one file.
#pragma once
#include <cstdint>
#ifdef PHASEMOE_DEBUG
#include <cstdio>
#endif

namespace phasemoe::sm90 {

// Same size and alignment as the driver's CUtensorMap (built on the host by
// cuTensorMapEncodeTiled, passed by value as a __grid_constant__ kernel parameter). Declared
// here so the device code needs no driver header.
struct alignas(64) TmaDescriptor {
  uint64_t opaque[16];
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---------------------------------------------------------------------------------------------
// mbarriers of this CTA (the arrive on a peer CTA's barrier is under Clusters)
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(arrivals) : "memory");
}

// Makes the initialized barriers visible to the async proxy (TMA completes on them).
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// Orders this thread's view of shared memory written through the generic proxy (cp.async, seen
// complete through an mbarrier) before its later async-proxy reads of it (wgmma operands).
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// One arrival plus the number of bytes the TMA loads of this phase will deliver.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}

// Spins until the phase with the given parity has completed. A freshly initialized barrier
// counts its (virtual) preceding phase, parity 1, as complete: producers start waiting on 1.
// Debug builds (MOE_BACKEND_JIT_DEBUG=1 defines PHASEMOE_DEBUG) trap after 5 s instead of
// hanging, naming the barrier: a pipeline bug then fails a test instead of eating device time.
__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// A 4-byte global store under a predicate, without a branch around it.
__device__ __forceinline__ void st_global_b32_if(void* p, uint32_t v, bool pred) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %2, 0;\n@p st.global.b32 [%0], %1;\n}\n" ::"l"(p), "r"(v),
               "r"(static_cast<uint32_t>(pred))
               : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
#ifdef PHASEMOE_DEBUG
  const uint64_t start = global_timer_ns();
#endif
  do {
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
#ifdef PHASEMOE_DEBUG
    if (!done && global_timer_ns() - start > 5000000000ull) {
      printf("phasemoe: mbarrier wait timed out: block %d thread %d smem 0x%x parity %u\n", blockIdx.x, threadIdx.x,
             smem_addr(bar), parity);
      __trap();
    }
#endif
  } while (!done);
}

// ---------------------------------------------------------------------------------------------
// TMA (bulk tensor copies global -> shared, completing on an mbarrier)
__device__ __forceinline__ void tma_prefetch_descriptor(const TmaDescriptor* desc) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(desc)) : "memory");
}

__device__ __forceinline__ void tma_load_2d(void* dst, const TmaDescriptor* desc, uint64_t* bar, int32_t c0,
                                            int32_t c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(desc)), "r"(smem_addr(bar)), "r"(c0), "r"(c1)
      : "memory");
}

__device__ __forceinline__ void tma_load_3d(void* dst, const TmaDescriptor* desc, uint64_t* bar, int32_t c0, int32_t c1,
                                            int32_t c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5}], [%2];" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(desc)), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

// 2-D multicast (clusters): as tma_load_3d_multicast below.
__device__ __forceinline__ void tma_load_2d_multicast(void* dst, const TmaDescriptor* desc, uint64_t* bar, int32_t c0,
                                                      int32_t c1, uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%3, %4}], [%2], %5;" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(desc)), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "h"(cta_mask)
      : "memory");
}

// Multicast variant (clusters): the box lands at the same shared-memory offset in every CTA of
// `cta_mask`, and each destination's mbarrier at `bar`'s offset receives the complete_tx bytes.
__device__ __forceinline__ void tma_load_3d_multicast(void* dst, const TmaDescriptor* desc, uint64_t* bar, int32_t c0,
                                                      int32_t c1, int32_t c2, uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%3, %4, %5}], [%2], %6;" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(desc)), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2), "h"(cta_mask)
      : "memory");
}

// ---------------------------------------------------------------------------------------------
// cp.async (Ampere-style asynchronous copies) completing on an mbarrier: the producer warp stages
// the per-K-block scales with them, so no thread waits for their global-memory latency.

// 4 bytes global -> shared; src_bytes = 0 writes a zero without reading (rows past M).
__device__ __forceinline__ void cp_async_4(void* dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem_addr(dst)),
               "l"(reinterpret_cast<uint64_t>(src)), "r"(src_bytes)
               : "memory");
}

// 8 bytes global -> shared (both 8-byte aligned); src_bytes = 0 writes zeros without reading.
__device__ __forceinline__ void cp_async_8(void* dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(smem_addr(dst)),
               "l"(reinterpret_cast<uint64_t>(src)), "r"(src_bytes)
               : "memory");
}

// 16 bytes global -> shared (both 16-byte aligned); src_bytes = 0 writes zeros without reading.
// `.cg`: the copy bypasses L1 (the scale chunks are read once per tile).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)),
               "l"(reinterpret_cast<uint64_t>(src)), "r"(src_bytes)
               : "memory");
}

// One arrival on `bar`, made when every cp.async this thread issued before has landed. `.noinc`:
// the arrival counts against the barrier's expected count (set at init), like a plain arrive.
__device__ __forceinline__ void cp_async_mbar_arrive_noinc(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// ---------------------------------------------------------------------------------------------
// Flags in global memory between CTAs (stream-K's partial sums)
__device__ __forceinline__ void st_release_gpu(int32_t* p, int32_t v) {
  asm volatile("st.release.gpu.global.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ int32_t ld_acquire_gpu(const int32_t* p) {
  int32_t v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Every lane of the warp spins until *flag is nonzero (each lane's load an acquire: what the
// setter wrote before its release is visible to it after). The exit is voted, so the warp leaves
// converged and the compiler can keep proving the code after it warp-uniform. Debug builds trap
// after 5 s, as mbar_wait does.
__device__ __forceinline__ void flag_wait_warp(const int32_t* flag) {
#ifdef PHASEMOE_DEBUG
  const uint64_t start = global_timer_ns();
#endif
  while (!__all_sync(0xffffffffu, ld_acquire_gpu(flag) != 0)) {
#ifdef PHASEMOE_DEBUG
    if (global_timer_ns() - start > 5000000000ull) {
      printf("phasemoe: stream-K flag wait timed out: block %d thread %d\n", blockIdx.x, threadIdx.x);
      __trap();
    }
#endif
  }
}

// ---------------------------------------------------------------------------------------------
// Clusters
__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}

// Every thread of every CTA in the cluster: release own writes, acquire the others'.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// Arrive on the mbarrier at `bar`'s offset in CTA `cta` of the cluster (may be this CTA).
// Default (CTA-scope) release semantics: the only thing the arrival publishes is "this stage's
// shared memory has been read", and the wgmma wait before it already completed those reads.
// `.release.cluster` would compile to a GPU-wide fence per arrival, draining every outstanding
// memory operation of the warp each K block.
__device__ __forceinline__ void mbar_arrive_cluster(uint64_t* bar, uint32_t cta) {
  asm volatile(
      "{\n.reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}" ::"r"(smem_addr(bar)),
      "r"(cta)
      : "memory");
}

// ---------------------------------------------------------------------------------------------
// wgmma
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}

// Four 8 x 16-byte matrices from shared memory: lane l gives the address of row l % 8 of matrix
// l / 8, and r[j] receives matrix j's row l / 4, bytes 4 * (l % 4) + 0..3.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// Pins an A-fragment register like an accumulator (below): it must hold still while an async
// wgmma reads it.
__device__ __forceinline__ void fence_operand(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }

// Pins an accumulator register in place around the async wgmma window, so the compiler neither
// reads it early nor moves writes across the fence/wait.
__device__ __forceinline__ void fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// Shared-memory matrix descriptor for a K-major tile whose rows are exactly 128 bytes (128 fp8)
// and were written by TMA with 128-byte swizzle; the tile must start on a 1024-byte boundary.
// Fields: start address >> 4 (bits 0-13), leading byte offset >> 4 (16-29; unused when one
// wgmma's K slice, 32 bytes, lies inside the 128-byte swizzle row), stride byte offset >> 4
// (32-45; 8 rows x 128 B = 1024 B between 8-row core matrices), base offset (49-51; 0 for
// 1024-aligned tiles), layout (62-63; 1 = 128-byte swizzle). Stepping K by 32 bytes adds 2 to
// the start field: the hardware applies the swizzle to the computed address.
__device__ __forceinline__ uint64_t smem_desc_kmajor_sw128(const void* tile) {
  const uint64_t start = (smem_addr(tile) & 0x3FFFFu) >> 4;
  return start | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}

// ---------------------------------------------------------------------------------------------
// Register reallocation between warpgroups (needs a register cap at entry: __launch_bounds__
// with min-blocks 1, and one role per branch of a single if/else).
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegs));
}

// ---------------------------------------------------------------------------------------------
// bf16 packing (round to nearest even, as torch's .to(bfloat16)); lo lands at the lower address.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  uint32_t packed;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(hi), "f"(lo));
  return packed;
}

__device__ __forceinline__ uint16_t to_bf16(float x) {
  uint16_t h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
  return h;
}

// 2^x by the MUFU approximation (as __expf uses it), with subnormal results flushed to zero: the
// non-flushing form costs a compare and two multiplies more per call, and a caller adding the
// result to 1 cannot tell the two apart.
__device__ __forceinline__ float ex2_approx_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Two fp32 values (already scaled into the e4m3 range) to e4m3, round to nearest even, saturating
// at +-448; lo in the low byte (the lower address). The upper 16 bits are zero.
__device__ __forceinline__ uint32_t pack_e4m3x2(float lo, float hi) {
  uint16_t packed;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(packed) : "f"(hi), "f"(lo));
  return packed;
}

}  // namespace phasemoe::sm90
