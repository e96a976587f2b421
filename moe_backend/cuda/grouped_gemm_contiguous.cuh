// Contiguous-layout FP8 grouped GEMM for sm_90a (DeepSeek-V3 MoE prefill; decode on the masked
// layout read as a contiguous one).
//
//   out[m, n] = sum_kb a_scale[m, kb] * b_scale[e, n / 128, kb] * sum_{k in kb} A[m, k] * B[e, n, k]
//   with e = expert_ids[m]; rows with expert id -1 (segment padding) are not written.
//
// A      e4m3 [M, K] row-major (K-major), a_scale fp32 [M, K/128]
// B      e4m3 [E, N, K] (K-major),        b_scale fp32 [E, ceil(N/128), K/128]
// out    bf16 [M, N] row-major
// Precondition (as DeepGEMM's contiguous layout): each expert's segment starts on a multiple of
// 128 rows, so a 128-row M tile never holds two experts; a tile whose first row is padding is
// skipped whole.
//
// One CTA per SM, persistent: warpgroup 2 produces (mainloop.cuh), warpgroups 0 and 1 consume
// and store (mainloop.cuh, epilogue.cuh); both walk the same tiles (scheduler.cuh).
#pragma once
#include <cstdint>

#include "epilogue.cuh"
#include "kernel_traits.cuh"
#include "mainloop.cuh"
#include "scheduler.cuh"
#include "sm90_ptx.cuh"

namespace phasemoe {

template <int kN, int kK, int kBlockN, int kStages, int kGroupM, int kCluster, int kMcastA, int kMaskedMaxM>
struct GroupedGemmContiguous {
  using T = KernelTraits<kN, kK, kBlockN, kStages, kGroupM, kCluster, kMcastA, kMaskedMaxM>;
  using Scheduler = TileScheduler<kN, kBlockN, kGroupM, kCluster, kMcastA, kMaskedMaxM>;
  using Loop = Mainloop<T>;
  using Epi = Epilogue<T>;
  using Ids = RowIds<kMaskedMaxM>;
  static constexpr uint32_t kSmemBytes = T::kSmemBytes;

  // Where each part of the dynamic shared memory lives (layout: KernelTraits::kSmemBytes).
  struct Smem {
    uint8_t* a;       // kStages x [128 x 128] e4m3
    uint8_t* b;       // kStages x [BLOCK_N x 128] e4m3
    float* a_scales;  // kAScaleSlots x [128 x kAScalePitch]
    float* b_scales;  // kStages x kScaleStageFloats
    uint64_t* full;   // kStages mbarriers: the stage is loaded
    uint64_t* empty;  // kStages mbarriers: the stage is released by every consumer warp
  };

  // The producer warpgroup: the TMA lane and the scale warp walk the same live tiles through the
  // ring, each filling its part of every stage once the consumers have released it.
  __device__ __forceinline__ static void produce(const Smem& s, const sm90::TmaDescriptor& tmap_a,
                                                 const sm90::TmaDescriptor& tmap_b, const float* __restrict__ a_scale,
                                                 const float* __restrict__ b_scale, const Ids& expert_ids, int m,
                                                 uint32_t rank, int lane) {
    const int producer_warp = threadIdx.x / 32 - kNumConsumerWarpgroups * 4;
    auto for_each_stage = [&](auto&& fill) {
      Scheduler sched(m);
      RingPos pos;
      int m_unit, n_unit;
      while (sched.next_tile(m_unit, n_unit)) {
        bool live_pair;
        const TileRole role = tile_role<kCluster, kMcastA, Scheduler::kNumNTiles>(
            load_tile_ids<kCluster, kMcastA>(expert_ids, m, m_unit), m_unit, n_unit, rank, live_pair);
        if (!live_pair) {
          sched.skip_dead_rest(m_unit);
          continue;
        }
#pragma unroll 1
        for (int kb = 0; kb < T::kKBlocks; ++kb) {
          sm90::mbar_wait(&s.empty[pos.stage], pos.phase ^ 1);
          fill(role, kb, pos);
          Loop::advance(pos);
        }
      }
    };
    if (producer_warp == 0 && lane == 0) {
      sm90::tma_prefetch_descriptor(&tmap_a);
      sm90::tma_prefetch_descriptor(&tmap_b);
      for_each_stage([&](const TileRole& role, int kb, const RingPos& pos) {
        Loop::load_tiles(s.a, s.b, s.full, tmap_a, tmap_b, role, kb, pos.stage, rank);
      });
    } else if (producer_warp == 1) {
      for_each_stage([&](const TileRole& role, int kb, const RingPos& pos) {
        Loop::load_scales(s.a_scales, s.b_scales, s.full, a_scale, b_scale, role, kb, pos, m, lane);
      });
    }
  }

  // The dynamic shared memory, 1024-aligned, cut into its parts (layout: KernelTraits::kSmemBytes).
  __device__ __forceinline__ static Smem carve_smem() {
    extern __shared__ uint8_t smem_raw[];
    // Aligned as an offset from the __shared__ array (not by casting a generic pointer to an
    // integer): the compiler keeps every derived address in the shared window.
    const uint32_t raw_addr = sm90::smem_addr(smem_raw);
    uint8_t* smem = smem_raw + (((raw_addr + 1023u) & ~1023u) - raw_addr);
    float* a_scales = reinterpret_cast<float*>(smem + kStages * T::kStageBytes);
    uint64_t* full =
        reinterpret_cast<uint64_t*>(smem + kStages * T::kStageBytes + T::kAScaleArea + kStages * T::kScaleStageBytes);
    return Smem{smem,          smem + kStages * T::kABytes, a_scales, a_scales + T::kAScaleArea / sizeof(float), full,
                full + kStages};
  }

  // Thread 0 initializes the ring's barriers (the consumers' arrivals come from every CTA of the
  // cluster: a peer may multicast into a stage).
  __device__ __forceinline__ static void init_barriers(const Smem& s) {
    if (threadIdx.x == 0) {
      for (int i = 0; i < kStages; ++i) {
        sm90::mbar_init(&s.full[i], T::kFullArrivals);                        // producer warps
        sm90::mbar_init(&s.empty[i], kCluster * kNumConsumerWarpgroups * 4);  // consumer warps (all CTAs)
      }
      sm90::fence_barrier_init();
    }
  }

  __device__ __forceinline__ static void run(const sm90::TmaDescriptor& tmap_a, const sm90::TmaDescriptor& tmap_b,
                                             const float* __restrict__ a_scale, const float* __restrict__ b_scale,
                                             const int32_t* __restrict__ row_ids, uint16_t* __restrict__ out, int m) {
    const Ids expert_ids{row_ids};
    const Smem s = carve_smem();
    // Broadcast from lane 0: the compiler then knows the index is warp-uniform and keeps what
    // derives from it (the consumers' A descriptors, barrier ids) in uniform registers.
    const int warpgroup = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x / 128), 0);
    const int lane = threadIdx.x % 32;
    const uint32_t rank = kCluster == 1 ? 0u : sm90::cluster_ctarank();

    init_barriers(s);
    if constexpr (kCluster > 1) {
      sm90::cluster_sync();  // the peer's barriers exist before anything multicasts or arrives on them
    } else {
      __syncthreads();
    }

    if (warpgroup == kNumConsumerWarpgroups) {
      sm90::setmaxnreg_dec<kProducerRegs>();
      produce(s, tmap_a, tmap_b, a_scale, b_scale, expert_ids, m, rank, lane);
    } else {
      sm90::setmaxnreg_inc<kConsumerRegs>();
      // Per live tile: the first MMA unit, then the previous tile's deferred store, then the rest
      // of the K loop. Kept in run(): moved into a function of its own, the loop compiles to PTX
      // with other register numbering than the binary the benchmark tables measured.
      const int warp_in_wg = (threadIdx.x / 32) % 4;
      // This thread's two accumulator rows within the 128-row tile (wgmma D layout).
      const int row_in_tile = warpgroup * 64 + warp_in_wg * 16 + lane / 4;
      // Stage-0 shared-memory descriptors of this warpgroup's A rows and of B (loop-invariant).
      const uint64_t desc_a0 = sm90::smem_desc_kmajor_sw128(s.a + warpgroup * 64 * kBlockK);
      const uint64_t desc_b0 = sm90::smem_desc_kmajor_sw128(s.b);
      float acc[T::kPartRegs];     // the even MMA units, unscaled
      float acc_odd[T::kOddRegs];  // the odd ones (two units in flight)
      float result[T::kAccRegs];   // promoted fp32 sum over K blocks
#pragma unroll
      for (int i = 0; i < T::kPartRegs; ++i) acc[i] = 0.f;

      Scheduler sched(m);
      RingPos pos;  // the K block to retire next
      const typename Loop::SmemView sv{s.full, s.empty, s.b_scales, s.a_scales, desc_a0, desc_b0};
      typename Epi::PendingStore prev{0, 0, false, false, false};
      // Same walk as the producer's, written out again on purpose: a shared "next live tile"
      // helper carrying TileRole across iterations made ptxas spill. The next unit's expert ids
      // are loaded a tile ahead (load_tile_ids).
      int next_m_unit, next_n_unit;
      bool more = sched.next_tile(next_m_unit, next_n_unit);
      // 0 (m >= 0), from the thread index: neither provably 0 nor provably warp-uniform.
      const int zero = static_cast<int>(threadIdx.x) & (m >> 31);
      TileIds next_ids{-1, -1};
      if (more) next_ids = load_tile_ids<kCluster, kMcastA>(expert_ids, m, next_m_unit, zero);
      while (more) {
        const int m_unit = next_m_unit;
        const int n_unit = next_n_unit;
        // Broadcast here, a tile after the load: the ids become warp-uniform only now.
        const TileIds ids{__shfl_sync(0xffffffffu, next_ids.e0, 0), __shfl_sync(0xffffffffu, next_ids.e1, 0)};
        more = sched.next_tile(next_m_unit, next_n_unit);
        if (more) next_ids = load_tile_ids<kCluster, kMcastA>(expert_ids, m, next_m_unit, zero);
        bool live_pair;
        const TileRole role = tile_role<kCluster, kMcastA, Scheduler::kNumNTiles>(ids, m_unit, n_unit, rank, live_pair);
        if (!live_pair) {
          // The unit fetched ahead lies before the jump: it is dead as well, or in the next expert.
          sched.skip_dead_rest(m_unit);
          continue;
        }
        const int expert = role.expert;
        // Rows this CTA stores (a dead B-shared tile computes on its partner's rows: the guards
        // below read its own rows' ids, so nothing is stored).
        const int m_tile = kMcastA ? role.m_tile : m_unit * kCluster + static_cast<int>(rank);
        const int row0 = m_tile * kBlockM + row_in_tile;
        const int row1 = row0 + 8;
        const int n_base = role.n_tile * kBlockN;
        // The epilogue's row guards, loaded now: their latency hides behind the K loop.
        const int id0 = row0 < m ? expert_ids(row0) : -1;
        const int id1 = row1 < m ? expert_ids(row1) : -1;
#ifdef PHASEMOE_DEBUG
        // A row of another expert inside the tile means a segment did not start on a 128-row
        // boundary: the layout broke the precondition and that row would silently stay unwritten.
        if (role.live && ((id0 >= 0 && id0 != expert) || (id1 >= 0 && id1 != expert))) {
          printf("phasemoe: expert segment not 128-row aligned near row %d (tile expert %d)\n", row0, expert);
          __trap();
        }
#endif
        RingPos issue = pos;
        float scales[2][T::kTileScaleBlocks][2];  // combined row scales of the K blocks in flight
        Loop::template issue_part<0>(acc, scales[0], sv, issue, row_in_tile);
        if (prev.valid) Epi::store_pending(result, out, prev);
#pragma unroll
        for (int i = 0; i < T::kAccRegs; ++i) result[i] = 0.f;
        // Called through a closure, as in the binary the benchmark tables measured: a direct call
        // numbers the registers differently (lab/check_ptx.py compares the PTX).
        [&] { Loop::k_loop(acc, acc_odd, result, sv, issue, pos, row_in_tile, lane, scales); }();
        prev = typename Epi::PendingStore{row0, n_base, role.live && id0 == expert, role.live && id1 == expert, true};
      }
      if (prev.valid) Epi::store_pending(result, out, prev);
    }
    if constexpr (kCluster > 1) {
      __syncwarp();  // the TMA warp's lanes reconverge before the .aligned cluster barrier
      // Stay resident until the peer is done: it arrives on our barriers and multicasts into
      // our shared memory until its last K block.
      sm90::cluster_sync();
    }
  }
};

}  // namespace phasemoe
