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
#include "stream_k.cuh"

namespace phasemoe {

template <int kN, int kK, int kBlockN, int kStages, int kGroupM, int kCluster, int kMcastA, int kMaskedMaxM,
          int kGatherA = 0, int kSiluQuant = 0, int kDirectRows = 0, int kStreamK = 0, int kSkipHalves = 0,
          int kARegs = 0>
struct GroupedGemmContiguous {
  using T = KernelTraits<kN, kK, kBlockN, kStages, kGroupM, kCluster, kMcastA, kMaskedMaxM, kGatherA, kSiluQuant,
                         kDirectRows, kStreamK, kARegs>;
  using Scheduler = TileScheduler<kN, kBlockN, kGroupM, kCluster, kMcastA, kMaskedMaxM>;
  using SkScheduler =
      StreamKScheduler<kN, kBlockN, kGroupM, kCluster, kMcastA, kMaskedMaxM, T::kKBlocks, T::kScaleChunk>;
  using Workspace = StreamKWorkspace<T::kAccRegs>;
  // The walk of live tile pairs that may span two experts deals whole units only (a cut unit left
  // rows unwritten on the GPU; launch.py refuses the pair first). The mixed pairs, one expert per
  // unit, take stream-K.
  static_assert(!(kStreamK && Scheduler::kPairedLive), "stream-K with CTA pairs sharing B on the masked layout");
  // kSkipHalves: a consumer warpgroup skips the MMAs of a tile it stores nothing of
  // (half_is_padding); the stream-K walk deals pieces and keeps every MMA.
  static_assert(!(kStreamK && kSkipHalves), "skipped padding halves with stream-K");
  static_assert(kSkipHalves < 2 || (T::kParts == 2 && !kSiluQuant && !kDirectRows && kN % 2 == 0),
                "split halves: 256-wide bf16 tiles without direct rows, N even");
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
    int32_t* direct;  // kDirectRows: 2 slots of kDirectSlotWords (a tile's (token, weight bits) pairs)
  };

  // Gathered A: where the token rows come from (a_rows[layout row], -1 for padding; the rows of A).
  struct GatherSource {
    const int64_t* __restrict__ a_rows;
    const uint8_t* __restrict__ a;
  };

  // kDirectRows: per layout row, the token it is stored into (-1: none) and its weight's bits, an
  // int32 pair; the layer's output [T, N].
  struct DirectArgs {
    const int32_t* __restrict__ pairs;
    uint16_t* __restrict__ out;
  };

  // The producer warpgroup: the TMA lane and the scale warp (and, for gathered A, warps 2 and 3)
  // walk the same live tiles through the ring, each filling its part of every stage once the
  // consumers have released it.
  __device__ __forceinline__ static void produce(const Smem& s, const sm90::TmaDescriptor& tmap_a,
                                                 const sm90::TmaDescriptor& tmap_b, const float* __restrict__ a_scale,
                                                 const float* __restrict__ b_scale, const Ids& expert_ids, int m,
                                                 const int* live, uint32_t rank, int lane,
                                                 const GatherSource& gather = {nullptr, nullptr},
                                                 const DirectArgs& direct = {nullptr, nullptr}) {
    sm90::setmaxnreg_dec<kProducerRegs>();
    const int producer_warp = threadIdx.x / 32 - kNumConsumerWarpgroups * 4;
    int owned = 0;     // kStreamK: the pieces walked so far that the CTA stores (not kPartial)
    int first_kb = 0;  // kStreamK: the first K block of the piece being walked
    auto for_each_stage = [&](auto&& fill) {
      // kStreamK: whole units, then this cluster's pieces of the pool. A loop of its own: one walk
      // shared with the whole-unit kernels changed their PTX.
      if constexpr (kStreamK) {
        SkScheduler sched(m, live);
        RingPos pos;
        int m_unit, n_unit;
        Segment seg;
        while (sched.next_segment(m_unit, n_unit, seg)) {
          bool live_pair;
          const TileRole role = tile_role<kCluster, kMcastA, Scheduler::kNumNTiles, Scheduler::kPairedLive>(
              load_tile_ids<kCluster, kMcastA, Scheduler::kPairedLive>(expert_ids, m, m_unit), m_unit, n_unit, rank,
              live_pair);
          if (!live_pair) continue;
          first_kb = seg.kb_begin;
#pragma unroll 1
          for (int kb = seg.kb_begin; kb < seg.kb_begin + seg.kb_count; ++kb) {
            sm90::mbar_wait(&s.empty[pos.stage], pos.phase ^ 1);
            fill(role, kb, pos);
            Loop::advance(pos);
          }
          if (seg.kind() != Segment::kPartial) ++owned;
        }
        return;
      }
      Scheduler sched(m, live);
      RingPos pos;
      int m_unit, n_unit;
      while (sched.next_tile(m_unit, n_unit)) {
        bool live_pair;
        const TileRole role = tile_role<kCluster, kMcastA, Scheduler::kNumNTiles, Scheduler::kPairedLive>(
            load_tile_ids<kCluster, kMcastA, Scheduler::kPairedLive>(expert_ids, m, m_unit), m_unit, n_unit, rank,
            live_pair);
        if (!live_pair) continue;
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
        // Direct rows: the slots alternate by stored tile (kStreamK: by the pieces this CTA stores,
        // the slot given here; else load_scales counts whole tiles).
        int32_t* slots = kStreamK ? s.direct + (owned & 1) * T::kDirectSlotWords : s.direct;
        Loop::load_scales(s.a_scales, s.b_scales, s.full, a_scale, b_scale, role, kb, pos, m, lane, gather.a_rows,
                          {direct.pairs, slots});
      });
    } else if (kGatherA && producer_warp >= 2) {
      // Warps 2 and 3: the tile's A rows, their token rows looked up once per tile (kStreamK: per
      // piece). (Lanes 1-31 of warp 0 take no branch.)
      const int t = (producer_warp - 2) * 32 + lane;
      int src[2] = {-1, -1};  // token rows fit 32 bits; the producer's 40 registers are few
      for_each_stage([&](const TileRole& role, int kb, const RingPos& pos) {
        if (kb == (kStreamK ? first_kb : 0)) {
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const int row = role.m_tile * kBlockM + t + T::kGatherThreads * i;
            src[i] = row < m ? static_cast<int>(__ldg(gather.a_rows + row)) : -1;
          }
        }
        Loop::load_a_rows(s.a, s.full, gather.a, src, kb, pos.stage, t);
      });
    }
  }

  // A tile's first MMA unit, then the previous tile's deferred store, and a cleared sum.
  __device__ __forceinline__ static void start_tile(float (&acc)[T::kPartRegs], float (&scales)[2][T::kScaleBands][2],
                                                    typename Loop::AFrag& a_frag, float (&result)[T::kAccRegs],
                                                    const typename Loop::SmemView& sv, RingPos& issue, int row_in_tile,
                                                    const typename Epi::PendingStore& prev, uint16_t* __restrict__ out,
                                                    float* __restrict__ act_scale,
                                                    const typename Epi::DirectRows& direct = {nullptr, nullptr}) {
    Loop::template issue_part<0>(acc, scales[0], a_frag, sv, issue, row_in_tile);
    if (prev.valid) Epi::store_pending(result, out, prev, act_scale, direct);
    Loop::clear(result);
  }

  // kDirectRows: the staged slot of the last tile whose K blocks `retired` completed (the tile
  // the deferred store writes), and where its direct rows go; other kernels: none.
  __device__ __forceinline__ static typename Epi::DirectRows direct_rows(const Smem& s, const RingPos& retired,
                                                                         const DirectArgs& direct) {
    if constexpr (!kDirectRows) return {nullptr, nullptr};
    const int tile = static_cast<int>(retired.count / T::kKBlocks) - 1;
    return {s.direct + (tile & 1) * T::kDirectSlotWords, direct.out};
  }

  // The warpgroup index, broadcast from lane 0: the compiler then knows it is warp-uniform and
  // keeps what derives from it (the consumers' A descriptors, barrier ids) in uniform registers.
  __device__ __forceinline__ static int uniform_warpgroup() {
    return __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x / 128), 0);
  }

  // What a consumer warpgroup reads of the shared memory, with the stage-0 descriptors of its A
  // rows and of B (loop-invariant).
  __device__ __forceinline__ static typename Loop::SmemView consumer_view(const Smem& s, int warpgroup) {
    const uint64_t desc_a0 = sm90::smem_desc_kmajor_sw128(s.a + warpgroup * 64 * kBlockK);
    const uint64_t desc_b0 = sm90::smem_desc_kmajor_sw128(s.b);
    typename Loop::SmemView sv{s.full, s.empty, s.b_scales, s.a_scales, desc_a0, desc_b0};
    if constexpr (T::kARegs) sv.a_frag_addr0 = Loop::a_frag_addr(s.a, warpgroup, static_cast<int>(threadIdx.x % 32));
    return sv;
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
    return Smem{smem,
                smem + kStages * T::kABytes,
                a_scales,
                a_scales + T::kAScaleArea / sizeof(float),
                full,
                full + kStages,
                reinterpret_cast<int32_t*>(full + 2 * kStages)};
  }

  // Thread 0 initializes the ring's barriers (the consumers' arrivals come from every CTA of the
  // cluster: a peer may multicast into a stage), then the whole CTA (cluster) waits for them.
  __device__ __forceinline__ static void init_barriers(const Smem& s) {
    if (threadIdx.x == 0) {
      for (int i = 0; i < kStages; ++i) {
        sm90::mbar_init(&s.full[i], T::kFullArrivals);                        // producer warps
        sm90::mbar_init(&s.empty[i], kCluster * kNumConsumerWarpgroups * 4);  // consumer warps (all CTAs)
      }
      sm90::fence_barrier_init();
    }
    if constexpr (kCluster > 1) {
      sm90::cluster_sync();  // the peer's barriers exist before anything multicasts or arrives on them
    } else {
      __syncthreads();
    }
  }

  // Stay resident until the cluster's peer is done: it arrives on our barriers and multicasts
  // into our shared memory until its last K block.
  __device__ __forceinline__ static void leave_cluster() {
    if constexpr (kCluster > 1) {
      __syncwarp();  // the TMA warp's lanes reconverge before the .aligned cluster barrier
      sm90::cluster_sync();
    }
  }

  // kStreamK: the consumers' walk over whole units and this cluster's pieces of the pool
  // (scheduler.cuh, StreamKPool). As the loop in run(), but a piece of a unit holding its later
  // chunks leaves its sum in the workspace instead of storing it, and the unit's owner adds those
  // sums to its own before the store. A loop of its own, so the kernels dealing whole units keep
  // the binary the benchmark tables measured.
  __device__ __forceinline__ static void consume_stream_k(const Smem& s, int warpgroup, int lane, uint32_t rank,
                                                          const Ids& expert_ids, int m, const int* live,
                                                          uint16_t* __restrict__ out, float* __restrict__ act_scale,
                                                          const DirectArgs& direct, const Workspace& ws) {
    sm90::setmaxnreg_inc<kConsumerRegs>();
    const int row_in_tile = Loop::row_in_tile(warpgroup, lane);
    const typename Loop::SmemView sv = consumer_view(s, warpgroup);
    float acc[T::kPartRegs];
    float acc_odd[T::kOddRegs];
    float result[T::kAccRegs];
    Loop::clear(acc);
    SkScheduler sched(m, live);
    RingPos pos;
    typename Epi::PendingStore prev{0, 0, false, false, false};
    int owned = 0;  // the pieces stored so far (the pending one included): direct rows' slot parity
    int next_m_unit, next_n_unit;
    Segment next_seg;  // the consumers keep its K block count and its tag
    const int zero = opaque_zero(m);
    TileIds next_ids{-1, -1};
    bool more = sched.next_segment(next_m_unit, next_n_unit, next_seg);
    if (more) next_ids = load_tile_ids<kCluster, kMcastA, Scheduler::kPairedLive>(expert_ids, m, next_m_unit, zero);
    while (more) {
      const int m_unit = next_m_unit, n_unit = next_n_unit;
      // Broadcast from lane 0: a trip count the compiler knows to be warp-uniform keeps the K loop's
      // descriptors in uniform registers.
      const int num_kb = __shfl_sync(0xffffffffu, next_seg.kb_count, 0);
      const Segment seg{0, 0, next_seg.tag};
      const TileIds ids = warp_uniform(next_ids);
      more = sched.next_segment(next_m_unit, next_n_unit, next_seg);
      if (more) next_ids = load_tile_ids<kCluster, kMcastA, Scheduler::kPairedLive>(expert_ids, m, next_m_unit, zero);
      bool live_pair;
      const TileRole role = tile_role<kCluster, kMcastA, Scheduler::kNumNTiles, Scheduler::kPairedLive>(
          ids, m_unit, n_unit, rank, live_pair);
      // Every cluster on a unit reads the same ids, so owner and helpers skip a dead unit alike.
      if (!live_pair) continue;
      const typename Epi::TileRows rows =
          Epi::template load_rows<Scheduler::kPairedLive>(role, m_unit, rank, row_in_tile, expert_ids, m);
      RingPos issue = pos;
      float scales[2][T::kScaleBands][2];
      typename Loop::AFrag a_frag;
      start_tile(acc, scales, a_frag, result, sv, issue, row_in_tile, prev, out, act_scale,
                 owned_rows(s, owned, direct));
      Loop::k_loop_blocks(acc, acc_odd, result, sv, issue, pos, row_in_tile, lane, scales, a_frag, num_kb);
      if (seg.kind() == Segment::kPartial) {  // a later piece of a cut unit: its owner stores the sum
        ws.store(result);
        prev = typename Epi::PendingStore{0, 0, false, false, false};
        continue;
      }
      if (seg.kind() == Segment::kFinish) sched.for_each_helper(seg, rank, [&](int cta) { ws.add(result, cta); });
      prev = typename Epi::PendingStore{rows.row0, rows.n_base, role.live && rows.id0 == role.expert,
                                        role.live && rows.id1 == role.expert, true};
      ++owned;
    }
    if (prev.valid) Epi::store_pending(result, out, prev, act_scale, owned_rows(s, owned, direct));
  }

  // kSkipHalves: whether `warpgroup` stores nothing of the tile `role` walks: the tile is dead (a
  // pair's CTA past N, or beside its partner's rows) or the warpgroup's 64 rows are all padding.
  // Valid rows lead every segment (the masked layout's rows below masked_m[e]; a contiguous
  // segment's rows, then its padding), so the half's first row tells. Every thread of the
  // warpgroup reads the same row; lane 0's answer makes it warp-uniform for the branch.
  __device__ __forceinline__ static bool half_is_padding(const TileRole& role, int warpgroup, const Ids& expert_ids,
                                                         int m) {
    const int row = role.m_tile * kBlockM + warpgroup * (kBlockM / kNumConsumerWarpgroups);
    const bool padding = !role.live || row >= m || expert_ids(row) != role.expert;
    return __shfl_sync(0xffffffffu, static_cast<int>(padding), 0) != 0;
  }

  // kSkipHalves = 2: a tile whose rows all lie in its first 64, split by N: warpgroup w computes
  // and stores part w (128 columns) of rows 0-63, right after its K loop (nothing is deferred),
  // in the registers of the tile loop's unit accumulator and sum. `sv` is this warpgroup's view.
  __device__ __forceinline__ static void split_tile(float (&acc)[T::kPartRegs], float (&result)[T::kAccRegs],
                                                    const typename Loop::SmemView& sv, const TileRole& role, int m_unit,
                                                    uint32_t rank, int warpgroup, int lane, const Ids& expert_ids,
                                                    int m, uint16_t* __restrict__ out, RingPos& pos) {
    const int row_in_tile = Loop::row_in_tile(0, lane);  // a row of the first half, whichever warpgroup
    const typename Epi::TileRows rows =
        Epi::template load_rows<Scheduler::kPairedLive>(role, m_unit, rank, row_in_tile, expert_ids, m);
    Loop::clear(result);
    Loop::split_k_loop(acc, result, sv, pos, row_in_tile, lane, warpgroup);
    Epi::template store_part<T::kPartChunks>(result, out, rows.row0, rows.n_base + warpgroup * T::kPartN,
                                             role.live && rows.id0 == role.expert, role.live && rows.id1 == role.expert,
                                             lane % 4);
  }

  // kStreamK with kDirectRows: the slot of the pending store, the `owned`-th piece this CTA stores
  // (the scale warp staged its pairs by the same count); other kernels: none.
  __device__ __forceinline__ static typename Epi::DirectRows owned_rows(const Smem& s, int owned,
                                                                        const DirectArgs& direct) {
    if constexpr (!kDirectRows) return {nullptr, nullptr};
    return {s.direct + ((owned - 1) & 1) * T::kDirectSlotWords, direct.out};
  }

  __device__ __forceinline__ static void run(const sm90::TmaDescriptor& tmap_a, const sm90::TmaDescriptor& tmap_b,
                                             const float* __restrict__ a_scale, const float* __restrict__ b_scale,
                                             const int32_t* __restrict__ row_ids, uint16_t* __restrict__ out, int m,
                                             const GatherSource& gather = {nullptr, nullptr},
                                             float* __restrict__ act_scale = nullptr,
                                             const DirectArgs& direct = {nullptr, nullptr},
                                             const Workspace& stream_k = {nullptr}) {
    const Ids expert_ids{row_ids};
    const Smem s = carve_smem();
    const int warpgroup = uniform_warpgroup();
    const int lane = threadIdx.x % 32;
    const uint32_t rank = kCluster == 1 ? 0u : sm90::cluster_ctarank();
    const int* live = nullptr;  // the masked layout's live tiles (scheduler.cuh, LiveTiles)
    if constexpr (Scheduler::kMixedLive) {
      live = LiveMixedUnits<kMaskedMaxM, Scheduler::kNumNTiles>::build(row_ids, m / kMaskedMaxM);
    } else if constexpr (Scheduler::kDense) {
      live = LiveTiles<kMaskedMaxM>::build(row_ids, m / kMaskedMaxM);
    }
    init_barriers(s);
    if (warpgroup == kNumConsumerWarpgroups) {
      produce(s, tmap_a, tmap_b, a_scale, b_scale, expert_ids, m, live, rank, lane, gather, direct);
    } else if constexpr (kStreamK) {
      consume_stream_k(s, warpgroup, lane, rank, expert_ids, m, live, out, act_scale, direct, stream_k);
    } else {
      // The consumers, kept in run(): moved into a function of its own, this loop compiles to PTX
      // with other register numbering than the binary the benchmark tables measured.
      sm90::setmaxnreg_inc<kConsumerRegs>();
      const int row_in_tile = Loop::row_in_tile(warpgroup, lane);
      const typename Loop::SmemView sv = consumer_view(s, warpgroup);
      float acc[T::kPartRegs];     // the even MMA units, unscaled
      float acc_odd[T::kOddRegs];  // the odd ones (two units in flight)
      float result[T::kAccRegs];   // promoted fp32 sum over K blocks
      Loop::clear(acc);
      Scheduler sched(m, live);
      RingPos pos;  // the K block to retire next
      typename Epi::PendingStore prev{0, 0, false, false, false};
      int next_m_unit, next_n_unit;
      const int zero = opaque_zero(m);
      TileIds next_ids{-1, -1};
      bool more = next_tile_ahead<kCluster, kMcastA>(sched, next_m_unit, next_n_unit, next_ids, expert_ids, m, zero);
      while (more) {
        const int m_unit = next_m_unit, n_unit = next_n_unit;
        const TileIds ids = warp_uniform(next_ids);
        more = next_tile_ahead<kCluster, kMcastA>(sched, next_m_unit, next_n_unit, next_ids, expert_ids, m, zero);
        bool live_pair;
        const TileRole role = tile_role<kCluster, kMcastA, Scheduler::kNumNTiles, Scheduler::kPairedLive>(
            ids, m_unit, n_unit, rank, live_pair);
        if (!live_pair) continue;
        // The epilogue's row guards, loaded now: their latency hides behind the K loop.
        const typename Epi::TileRows rows =
            Epi::template load_rows<Scheduler::kPairedLive>(role, m_unit, rank, row_in_tile, expert_ids, m);
        // kSkipHalves = 1: this warpgroup's half is padding; 2: the tile's second half is, and the
        // tile is split by N between the warpgroups (both skip when its first half is padding too).
        if constexpr (kSkipHalves > 0) {
          if (half_is_padding(role, kSkipHalves == 1 ? warpgroup : 1, expert_ids, m)) {
            // The previous tile's store first; the slot of direct rows follows the retired K blocks,
            // as in the K loop. Then the stages released as they land, or the split tile.
            if (prev.valid) Epi::store_pending(result, out, prev, act_scale, direct_rows(s, pos, direct));
            prev = typename Epi::PendingStore{0, 0, false, false, false};
            if constexpr (kSkipHalves == 2) {
              if (!half_is_padding(role, 0, expert_ids, m)) {
                split_tile(acc, result, sv, role, m_unit, rank, warpgroup, lane, expert_ids, m, out, pos);
                continue;
              }
            }
            Loop::skip_k_loop(sv, pos, lane);
            continue;
          }
        }
        RingPos issue = pos;
        float scales[2][T::kScaleBands][2];  // combined row scales of the K blocks in flight
        typename Loop::AFrag a_frag;         // kARegs: the A fragments of the K block in flight
        start_tile(acc, scales, a_frag, result, sv, issue, row_in_tile, prev, out, act_scale,
                   direct_rows(s, pos, direct));
        // Called through a closure, as in the binary the benchmark tables measured: a direct call
        // numbers the registers differently (lab/check_ptx.py compares the PTX).
        [&] { Loop::k_loop(acc, acc_odd, result, sv, issue, pos, row_in_tile, lane, scales, a_frag); }();
        prev = typename Epi::PendingStore{rows.row0, rows.n_base, role.live && rows.id0 == role.expert,
                                          role.live && rows.id1 == role.expert, true};
      }
      if (prev.valid) Epi::store_pending(result, out, prev, act_scale, direct_rows(s, pos, direct));
    }
    leave_cluster();
  }
};

}  // namespace phasemoe
