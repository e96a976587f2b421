// Contiguous-layout FP8 grouped GEMM for sm_90a (DeepSeek-V3 MoE prefill).
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
// Structure (one CTA per SM, persistent):
//   warpgroup 2        producer: one thread issues the TMA loads of A [128 x 128] and
//                      B [BLOCK_N x 128] into a ring of kStages shared-memory stages
//                      (128-byte swizzle), each stage completing on its `full` mbarrier.
//   warpgroups 0 and 1 consumers: rows 0-63 and 64-127 of the tile. Per 128-wide K block:
//                      4 x wgmma m64nBLOCK_Nk32 into a block accumulator, wait, release the
//                      stage (`empty` mbarrier), then promote: result += a_scale * b_scale *
//                      block accumulator in fp32 (the per-block scales cannot enter the tensor
//                      core, so each K block is summed on its own and scaled in registers).
//   Both roles walk the same tile sequence (TileScheduler), so no tile list is exchanged.
// Only N, K (and the tiling constants) are compile-time; M is a runtime argument.
#pragma once
#include <cstdint>

#include "sm90_ptx.cuh"
#include "wgmma_fp8.cuh"

#ifndef PHASEMOE_K_UNROLL
#define PHASEMOE_K_UNROLL 1  // consumer K-loop unroll factor (ContiguousConfig.k_unroll)
#endif

namespace phasemoe {

constexpr int kKLoopUnroll = PHASEMOE_K_UNROLL;  // the consumer K loop's unroll factor
constexpr int kBlockM = 128;          // 2 consumer warpgroups x 64 rows (wgmma M)
constexpr int kBlockK = 128;          // = the scale block: one promotion per stage
constexpr int kWgmmaK = 32;           // K of one fp8 wgmma
constexpr int kNumConsumerWarpgroups = 2;
constexpr int kNumThreads = 128 * (kNumConsumerWarpgroups + 1);
constexpr int kScaleBlock = 128;
// Register split after setmaxnreg: 2 x 128 x 232 + 128 x 40 = 64512 <= 65536.
constexpr int kConsumerRegs = 232;
constexpr int kProducerRegs = 40;

// Walks the tiles of one CTA (kCluster = 1) or one cluster of 2 (a unit is a pair of tiles, one
// per CTA): kMcastA = 0 pairs vertically adjacent M tiles 2i, 2i + 1 at one N tile (B shared);
// kMcastA = 1 pairs N tiles 2j, 2j + 1 at one M tile (A shared, always one expert).
template <int kN, int kBlockN, int kGroupM, int kCluster, int kMcastA>
struct TileScheduler {
  static constexpr int kNumNTiles = (kN + kBlockN - 1) / kBlockN;
  static constexpr int kNumNUnits = kMcastA ? (kNumNTiles + kCluster - 1) / kCluster : kNumNTiles;
  static constexpr int kGroupUnits = kMcastA ? kGroupM : (kGroupM / kCluster > 0 ? kGroupM / kCluster : 1);

  int num_m_units;
  int num_tiles;
  int next;
  int stride;

  __device__ __forceinline__ explicit TileScheduler(int m)
      : num_m_units(kMcastA ? (m + kBlockM - 1) / kBlockM
                            : ((m + kBlockM - 1) / kBlockM + kCluster - 1) / kCluster),
        num_tiles(num_m_units * kNumNUnits),
        next(blockIdx.x / kCluster),
        stride(gridDim.x / kCluster) {}

  // Tiles are numbered so that kGroupM consecutive M units sweep the N units together: the CTAs
  // running at one time share a few experts' weights and a few A row blocks in L2.
  __device__ __forceinline__ bool next_tile(int& m_unit, int& n_unit) {
    if (next >= num_tiles) return false;
    const int t = next;
    next += stride;
    const int per_group = kGroupUnits * kNumNUnits;
    const int group = t / per_group;
    const int first_m = group * kGroupUnits;
    const int rows_in_group = min(num_m_units - first_m, kGroupUnits);
    const int r = t - group * per_group;
    m_unit = first_m + r % rows_in_group;
    n_unit = r / rows_in_group;
    return true;
  }
};

// Which expert a CTA's tile belongs to and how its B tile is loaded. kCluster = 1: the tile's
// own expert (skip when its first row is padding). kCluster = 2, B shared (kMcastA = 0): both
// CTAs read both tiles' first ids, so they agree: skip the pair only when both are padding; when
// both tiles hold the same expert, each CTA loads half of the B tile and multicasts it to both
// (B read once from L2 for two M tiles); otherwise each loads its own B. A dead tile in a live
// pair (padding, or past M) computes on its partner's expert and stores nothing. kCluster = 2, A
// shared (kMcastA = 1): one M tile, so one expert; each CTA loads half of A for both; a CTA whose
// N tile lies past N (odd tile count) computes on its partner's B tile and stores nothing.
struct TileRole {
  int expert;       // expert whose weights are loaded (valid when live_pair)
  bool live;        // this CTA's tile has real rows: store them
  bool multicast;   // B tile shared by the pair
  int m_tile;       // this CTA's tile (a dead one: the coordinates it loads)
  int n_tile;
};

template <int kCluster, int kMcastA, int kNumNTiles>
__device__ __forceinline__ TileRole tile_role(const int32_t* __restrict__ expert_ids, int m, int m_unit,
                                              int n_unit, uint32_t rank, bool& live_pair) {
  TileRole role;
  if constexpr (kCluster == 1) {
    role.expert = expert_ids[m_unit * kBlockM];
    role.live = role.expert >= 0;
    role.multicast = false;
    role.m_tile = m_unit;
    role.n_tile = n_unit;
    live_pair = role.live;
  } else if constexpr (kMcastA) {
    role.expert = expert_ids[m_unit * kBlockM];
    const int n_tile = n_unit * kCluster + static_cast<int>(rank);
    live_pair = role.expert >= 0;
    role.live = live_pair && n_tile < kNumNTiles;
    role.multicast = true;
    role.m_tile = m_unit;
    // Past N (odd tile count: only the last pair's second tile): load the partner's B tile
    // (valid coordinates; nothing is stored).
    role.n_tile = min(n_tile, kNumNTiles - 1);
  } else {
    const int first = 2 * m_unit * kBlockM;
    const int e0 = expert_ids[first];
    const int e1 = first + kBlockM < m ? expert_ids[first + kBlockM] : -1;
    const int own = rank == 0 ? e0 : e1;
    live_pair = e0 >= 0 || e1 >= 0;
    role.live = own >= 0;
    role.expert = role.live ? own : (rank == 0 ? e1 : e0);
    role.multicast = e0 == e1;
    // A dead tile of a pair (padding or past M) loads its partner's rows: valid coordinates,
    // results never stored.
    role.m_tile = m_unit * kCluster + static_cast<int>(role.live ? rank : rank ^ 1u);
    role.n_tile = n_unit;
  }
  return role;
}

template <int kV>
struct IntC {
  static constexpr int value = kV;
};

// Calls f(IntC<i * kQuantum>) for the runtime index i in [kI, kCount): one instantiation each.
template <int kI, int kCount, int kQuantum, typename F>
__device__ __forceinline__ void dispatch_offset(int i, F& f) {
  if constexpr (kI + 1 >= kCount) {
    f(IntC<kI * kQuantum>{});
  } else {
    if (i == kI) {
      f(IntC<kI * kQuantum>{});
    } else {
      dispatch_offset<kI + 1, kCount, kQuantum>(i, f);
    }
  }
}

// kPingPong = 1: the two consumer warpgroups take turns issuing each K block's MMAs (a token
// passed through named barriers 1 and 2), so warpgroup 1 runs half a K block behind warpgroup 0
// and one's promotion overlaps the other's MMAs.
// kCluster = 2: clusters of two CTAs on M tiles 2i and 2i + 1 (same N tile); B is multicast when
// both tiles belong to one expert (TileRole). Every consumer warp releases a stage in both CTAs
// (a peer may multicast into it), so `empty` counts 2 x 8 arrivals.
template <int kN, int kK, int kBlockN, int kStages, int kGroupM, int kPingPong = 1, int kCluster = 1,
          int kMcastA = 0>
struct GroupedGemmContiguous {
  static_assert(kK % kBlockK == 0, "K must be a multiple of 128");
  static_assert(kBlockN % 16 == 0 && kBlockN >= 64 && kBlockN <= 192, "BLOCK_N: multiple of 16 in [64, 192]");
  static_assert(kStages >= 2, "need at least two pipeline stages");
  static_assert(kCluster == 1 || kCluster == 2, "clusters of 1 or 2 CTAs");
  static_assert(kMcastA == 0 || kCluster == 2, "A multicast needs a cluster of 2");

  static constexpr int kKBlocks = kK / kBlockK;
  static constexpr int kNScaleBlocks = (kN + kScaleBlock - 1) / kScaleBlock;
  static constexpr uint32_t kABytes = kBlockM * kBlockK;  // fp8
  static constexpr uint32_t kBBytes = kBlockN * kBlockK;
  // Box heights of the tensor maps: the shared operand is loaded in kCluster parts, one per CTA.
  static constexpr int kARowsPerLoad = kMcastA ? kBlockM / kCluster : kBlockM;
  static constexpr uint32_t kALoadBytes = kARowsPerLoad * kBlockK;
  static constexpr int kBRowsPerLoad = kMcastA ? kBlockN : kBlockN / kCluster;
  static constexpr uint32_t kBLoadBytes = kBRowsPerLoad * kBlockK;
  static constexpr uint32_t kStageBytes = kABytes + kBBytes;
  static constexpr int kAccRegs = kBlockN / 2;  // fp32 per thread for a 64 x BLOCK_N tile
  // N tiles that divide (or are multiples of) the 128-column scale block start on a block
  // boundary: each 8-column chunk's scale block is a compile-time index. Others (112, 160, ...)
  // straddle up to kScaleSpan blocks, chosen per chunk at run time.
  static constexpr bool kScaleAligned = (kScaleBlock % kBlockN == 0) || (kBlockN % kScaleBlock == 0);
  static constexpr int kScaleSpan = kScaleAligned ? (kBlockN + kScaleBlock - 1) / kScaleBlock
                                                  : (kBlockN + 120 - 1) / kScaleBlock + 1;
  static constexpr int kOffQuantum = (kBlockN % 128 == 0) ? 128 : (kBlockN % 64 == 0) ? 64 : (kBlockN % 32 == 0) ? 32 : 16;
  static constexpr int kNumOffsets = kScaleBlock / kOffQuantum;  // distinct n_base % 128 values
  static constexpr bool kSplitOffsets = !kScaleAligned && kNumOffsets <= 4;
  // Epilogue: groups of 4 8-column chunks are transposed inside each lane quad so every lane
  // stores 16 contiguous bytes (full 32-byte sectors); needs N % 8 == 0 (16-byte row pitch).
  static constexpr int kVecChunks = (kN % 8 == 0) ? (kBlockN / 8) / 4 * 4 : 0;
  // Ring of stages, then the barriers; +1024 to align the ring (128-byte swizzle atoms are
  // 1024 bytes: the descriptors assume 1024-aligned tiles).
  static constexpr uint32_t kSmemBytes = kStages * kStageBytes + 2 * kStages * sizeof(uint64_t) + 1024;
  static_assert(kABytes % 1024 == 0 && kBBytes % 1024 == 0 && kBLoadBytes % 1024 == 0 && kALoadBytes % 1024 == 0,
                "stage tiles must keep 1024-byte alignment");
  static_assert(kSmemBytes <= 232448, "exceeds the 227 KB of shared memory a Hopper block can opt into");

  using Scheduler = TileScheduler<kN, kBlockN, kGroupM, kCluster, kMcastA>;
  using Mma = WgmmaFp8<kBlockN>;

  // 4 x 4 transpose of 32-bit values across the 4 lanes of a quad: on return v[j] holds what
  // lane j held in v[quad_lane]. Two butterfly stages (xor 1, xor 2), 4 shuffles in all.
  __device__ __forceinline__ static void quad_transpose(uint32_t (&v)[4], int quad_lane) {
    const bool b0 = quad_lane & 1;
#pragma unroll
    for (int j1 = 0; j1 < 2; ++j1) {
      const uint32_t send = b0 ? v[2 * j1] : v[2 * j1 + 1];
      const uint32_t got = __shfl_xor_sync(0xffffffffu, send, 1);
      if (b0) v[2 * j1] = got; else v[2 * j1 + 1] = got;
    }
    const bool b1 = quad_lane & 2;
#pragma unroll
    for (int j0 = 0; j0 < 2; ++j0) {
      const uint32_t send = b1 ? v[j0] : v[2 + j0];
      const uint32_t got = __shfl_xor_sync(0xffffffffu, send, 2);
      if (b1) v[j0] = got; else v[2 + j0] = got;
    }
  }

  __device__ __forceinline__ static void run(const sm90::TmaDescriptor& tmap_a, const sm90::TmaDescriptor& tmap_b,
                                             const float* __restrict__ a_scale, const float* __restrict__ b_scale,
                                             const int32_t* __restrict__ expert_ids, uint16_t* __restrict__ out,
                                             int m) {
    extern __shared__ uint8_t smem_raw[];
    // Aligned as an offset from the __shared__ array (not by casting a generic pointer to an
    // integer): the compiler keeps every derived address in the shared window, instead of
    // rebuilding the generic address (SR_CgaCtaId, SR_SWINHI) and converting back per K block.
    const uint32_t raw_addr = sm90::smem_addr(smem_raw);
    uint8_t* smem = smem_raw + (((raw_addr + 1023u) & ~1023u) - raw_addr);
    uint8_t* smem_a = smem;                       // kStages x [128 x 128] e4m3
    uint8_t* smem_b = smem + kStages * kABytes;   // kStages x [BLOCK_N x 128] e4m3
    uint64_t* full_bar = reinterpret_cast<uint64_t*>(smem + kStages * kStageBytes);
    uint64_t* empty_bar = full_bar + kStages;

    const int warpgroup = threadIdx.x / 128;
    const int lane = threadIdx.x % 32;
    const uint32_t rank = kCluster == 1 ? 0u : sm90::cluster_ctarank();

    if (threadIdx.x == 0) {
      for (int s = 0; s < kStages; ++s) {
        sm90::mbar_init(&full_bar[s], 1);                                          // the producer's expect_tx
        sm90::mbar_init(&empty_bar[s], kCluster * kNumConsumerWarpgroups * 4);     // consumer warps (all CTAs)
      }
      sm90::fence_barrier_init();
    }
    if constexpr (kCluster > 1) {
      sm90::cluster_sync();  // the peer's barriers exist before anything multicasts or arrives on them
    } else {
      __syncthreads();
    }

    if (warpgroup == kNumConsumerWarpgroups) {
      // ------------------------------- producer -------------------------------------------
      sm90::setmaxnreg_dec<kProducerRegs>();
      if (threadIdx.x == kNumConsumerWarpgroups * 128) {
        sm90::tma_prefetch_descriptor(&tmap_a);
        sm90::tma_prefetch_descriptor(&tmap_b);
        Scheduler sched(m);
        int stage = 0;
        uint32_t phase = 0;
        int m_unit, n_unit;
        while (sched.next_tile(m_unit, n_unit)) {
          bool live_pair;
          const TileRole role = tile_role<kCluster, kMcastA, Scheduler::kNumNTiles>(expert_ids, m, m_unit, n_unit,
                                                                                    rank, live_pair);
          if (!live_pair) continue;
          const int m_tile = role.m_tile;
          const int n_tile = role.n_tile;
#pragma unroll 1
          for (int kb = 0; kb < kKBlocks; ++kb) {
            sm90::mbar_wait(&empty_bar[stage], phase ^ 1);
            // Out-of-bounds box elements (rows past M, columns past N) are zero-filled and
            // still counted in the transaction bytes.
            sm90::mbar_arrive_expect_tx(&full_bar[stage], kStageBytes);
            if constexpr (kMcastA) {
              // This CTA's half of the A tile, into both CTAs; its own whole B tile.
              sm90::tma_load_2d_multicast(smem_a + stage * kABytes + rank * kALoadBytes, &tmap_a, &full_bar[stage],
                                          kb * kBlockK, m_tile * kBlockM + static_cast<int>(rank) * kARowsPerLoad,
                                          static_cast<uint16_t>((1u << kCluster) - 1));
            } else {
              sm90::tma_load_2d(smem_a + stage * kABytes, &tmap_a, &full_bar[stage], kb * kBlockK, m_tile * kBlockM);
            }
            if constexpr (kCluster == 1 || kMcastA) {
              sm90::tma_load_3d(smem_b + stage * kBBytes, &tmap_b, &full_bar[stage], kb * kBlockK,
                                n_tile * kBlockN, role.expert);
            } else {
              if (role.multicast) {
                sm90::tma_load_3d_multicast(smem_b + stage * kBBytes + rank * kBLoadBytes, &tmap_b, &full_bar[stage],
                                            kb * kBlockK, n_tile * kBlockN + rank * kBRowsPerLoad, role.expert,
                                            static_cast<uint16_t>((1u << kCluster) - 1));
              } else {
#pragma unroll
                for (int h = 0; h < kCluster; ++h)
                  sm90::tma_load_3d(smem_b + stage * kBBytes + h * kBLoadBytes, &tmap_b, &full_bar[stage],
                                    kb * kBlockK, n_tile * kBlockN + h * kBRowsPerLoad, role.expert);
              }
            }
            if (++stage == kStages) {
              stage = 0;
              phase ^= 1;
            }
          }
        }
      }
    } else {
      // ------------------------------- consumers ------------------------------------------
      sm90::setmaxnreg_inc<kConsumerRegs>();
      const int warp_in_wg = (threadIdx.x / 32) % 4;
      // This thread's two accumulator rows within the 128-row tile (wgmma D layout).
      const int row_in_tile = warpgroup * 64 + warp_in_wg * 16 + lane / 4;
      const int quad_lane = lane % 4;
      const int col_in_chunk = 2 * quad_lane;

      // Stage-0 shared-memory descriptors of this warpgroup's A rows and of B (loop-invariant).
      const uint64_t desc_a0 = sm90::smem_desc_kmajor_sw128(smem_a + warpgroup * 64 * kBlockK);
      const uint64_t desc_b0 = sm90::smem_desc_kmajor_sw128(smem_b);
      float acc[kAccRegs];     // one K block, unscaled
      float result[kAccRegs];  // promoted fp32 sum over K blocks
#pragma unroll
      for (int i = 0; i < kAccRegs; ++i) acc[i] = 0.f;

      Scheduler sched(m);
      int stage = 0;
      uint32_t phase = 0;
      bool issued_any = false;  // ping-pong: warpgroup 0's first K block waits for no token
      int m_unit, n_unit;
      // Same walk as the producer's, written out again on purpose: a shared "next live tile"
      // helper carrying TileRole across iterations made ptxas spill at BLOCK_N = 192.
      while (sched.next_tile(m_unit, n_unit)) {
        bool live_pair;
        const TileRole role = tile_role<kCluster, kMcastA, Scheduler::kNumNTiles>(expert_ids, m, m_unit, n_unit,
                                                                                  rank, live_pair);
        if (!live_pair) continue;
        const int expert = role.expert;
        // Rows this CTA stores (a dead B-shared tile computes on its partner's rows: the guards
        // below read its own rows' ids, so nothing is stored).
        const int m_tile = kMcastA ? role.m_tile : m_unit * kCluster + static_cast<int>(rank);
        const int n_tile = role.n_tile;

        const int row0 = m_tile * kBlockM + row_in_tile;
        const int row1 = row0 + 8;
        // Rows past M read row M-1's scales (their products are never stored).
        const float* a_scale0 = a_scale + static_cast<int64_t>(min(row0, m - 1)) * kKBlocks;
        const float* a_scale1 = a_scale + static_cast<int64_t>(min(row1, m - 1)) * kKBlocks;
        const int n_base = n_tile * kBlockN;
        const int scale_block0 = n_base / kScaleBlock;
        const int n_offset = n_base % kScaleBlock;  // 0 when kScaleAligned
        const float* b_scale_e = b_scale + static_cast<int64_t>(expert) * kNScaleBlocks * kKBlocks;
        // The epilogue's row guards, loaded now: their latency hides behind the K loop.
        const int id0 = row0 < m ? expert_ids[row0] : -1;
        const int id1 = row1 < m ? expert_ids[row1] : -1;
        const float* b_scale_rows[kScaleSpan];
#pragma unroll
        for (int j = 0; j < kScaleSpan; ++j)
          b_scale_rows[j] = b_scale_e + min(scale_block0 + j, kNScaleBlocks - 1) * kKBlocks;

#pragma unroll
        for (int i = 0; i < kAccRegs; ++i) result[i] = 0.f;

        // The K loop, instantiated per column offset of the tile inside its first scale block
        // (kOff): aligned tiles have one (0); 192/160/96 have 2-4, each compiled with
        // compile-time scale indices (no per-chunk selects in the promotion); the others
        // (80/112/144/176: up to 8 offsets) pass kOff = -1 and select at run time.
        auto k_loop = [&](auto off_c) {
          constexpr int kOff = decltype(off_c)::value;
          // Scales are software-pipelined one K block ahead: block kb's were loaded during block
          // kb - 1, so a load that misses L1 never stalls the MMA issue (ptxas schedules the
          // sa * sb products between the wgmmas).
          float sa0 = __ldg(a_scale0);
          float sa1 = __ldg(a_scale1);
          float sb[kScaleSpan];
#pragma unroll
          for (int j = 0; j < kScaleSpan; ++j) sb[j] = __ldg(b_scale_rows[j]);
#pragma unroll kKLoopUnroll
          for (int kb = 0; kb < kKBlocks; ++kb) {
            const int kb_next = kb + 1 < kKBlocks ? kb + 1 : kb;
            const float sa0_next = __ldg(a_scale0 + kb_next);
            const float sa1_next = __ldg(a_scale1 + kb_next);
            float sb_next[kScaleSpan];
#pragma unroll
            for (int j = 0; j < kScaleSpan; ++j) sb_next[j] = __ldg(b_scale_rows[j] + kb_next);

            sm90::mbar_wait(&full_bar[stage], phase);
            // Stage descriptors = the stage-0 descriptors plus the stage's offset in 16-byte units
            // (the start-address field; smem offsets stay far below its 2^14 x 16 B range).
            const uint64_t desc_a = desc_a0 + static_cast<uint64_t>((stage * kABytes) >> 4);
            const uint64_t desc_b = desc_b0 + static_cast<uint64_t>((stage * kBBytes) >> 4);
#pragma unroll
            for (int i = 0; i < kAccRegs; ++i) sm90::fence_operand(acc[i]);
            if constexpr (kPingPong) {
              // Token: warpgroup 1 issues K block i after warpgroup 0 did; warpgroup 0 issues
              // K block i+1 after warpgroup 1 issued K block i.
              if (warpgroup == 0) {
                if (issued_any) sm90::named_bar_sync(2, 256);
              } else {
                sm90::named_bar_sync(1, 256);
              }
            }
            sm90::wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < kBlockK / kWgmmaK; ++kk) {
              // +2 per step: 32 bytes of K in the descriptor's 16-byte units.
              Mma::mma(acc, desc_a + 2 * kk, desc_b + 2 * kk, kk == 0 ? 0u : 1u);
            }
            sm90::wgmma_commit();
            if constexpr (kPingPong) {
              sm90::named_bar_arrive(warpgroup == 0 ? 1 : 2, 256);
              issued_any = true;
            }
#pragma unroll
            for (int i = 0; i < kAccRegs; ++i) sm90::fence_operand(acc[i]);
            sm90::wgmma_wait<0>();
#pragma unroll
            for (int i = 0; i < kAccRegs; ++i) sm90::fence_operand(acc[i]);
            // The stage's bytes are consumed once this warp's MMAs completed: hand it back (in
            // every CTA of the cluster: a peer's producer may multicast into this stage).
            if constexpr (kCluster == 1) {
              if (lane == 0) sm90::mbar_arrive(&empty_bar[stage]);
            } else {
              if (lane < kCluster) sm90::mbar_arrive_cluster(&empty_bar[stage], static_cast<uint32_t>(lane));
            }
            if (++stage == kStages) {
              stage = 0;
              phase ^= 1;
            }

#pragma unroll
            for (int c = 0; c < kBlockN / 8; ++c) {
              float sbc;
              if constexpr (kOff >= 0) {
                sbc = sb[(kOff + 8 * c) / kScaleBlock];  // compile-time index
              } else {
                const int col = n_offset + 8 * c;  // an 8-column chunk never straddles a scale block
                sbc = sb[0];
#pragma unroll
                for (int j = 1; j < kScaleSpan; ++j) sbc = col >= j * kScaleBlock ? sb[j] : sbc;
              }
              const float s0 = sa0 * sbc;
              const float s1 = sa1 * sbc;
              result[4 * c + 0] = fmaf(s0, acc[4 * c + 0], result[4 * c + 0]);
              result[4 * c + 1] = fmaf(s0, acc[4 * c + 1], result[4 * c + 1]);
              result[4 * c + 2] = fmaf(s1, acc[4 * c + 2], result[4 * c + 2]);
              result[4 * c + 3] = fmaf(s1, acc[4 * c + 3], result[4 * c + 3]);
            }
            sa0 = sa0_next;
            sa1 = sa1_next;
#pragma unroll
            for (int j = 0; j < kScaleSpan; ++j) sb[j] = sb_next[j];
          }
        };
        if constexpr (kScaleAligned) {
          k_loop(IntC<0>{});
        } else if constexpr (kSplitOffsets) {
          dispatch_offset<0, kNumOffsets, kOffQuantum>(n_offset / kOffQuantum, k_loop);
        } else {
          k_loop(IntC<-1>{});
        }

        // Epilogue: bf16 straight from registers. Rows of another expert id (padding), rows past
        // M and dead tiles of a cluster pair are left untouched; columns past N are dropped.
        const bool store0 = role.live && id0 == expert;
        const bool store1 = role.live && id1 == expert;
#ifdef PHASEMOE_DEBUG
        // A row of another expert inside the tile means a segment did not start on a 128-row
        // boundary: the layout broke the precondition and that row would silently stay unwritten.
        if (role.live && ((id0 >= 0 && id0 != expert) || (id1 >= 0 && id1 != expert))) {
          printf("phasemoe: expert segment not 128-row aligned near row %d (tile expert %d)\n", row0, expert);
          __trap();
        }
#endif
        uint16_t* out0 = out + static_cast<int64_t>(row0) * kN;
        uint16_t* out1 = out + static_cast<int64_t>(row1) * kN;
        // Vectorized part: after the quad transpose, lane q holds 8 columns of chunk g + q.
#pragma unroll
        for (int g = 0; g < kVecChunks; g += 4) {
          uint32_t v0[4], v1[4];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            v0[j] = sm90::pack_bf16x2(result[4 * (g + j) + 0], result[4 * (g + j) + 1]);
            v1[j] = sm90::pack_bf16x2(result[4 * (g + j) + 2], result[4 * (g + j) + 3]);
          }
          quad_transpose(v0, quad_lane);
          quad_transpose(v1, quad_lane);
          const int col = n_base + 8 * (g + quad_lane);
          if (col < kN) {  // N % 8 == 0: the 8 columns are all in or all out
            if (store0) *reinterpret_cast<uint4*>(out0 + col) = make_uint4(v0[0], v0[1], v0[2], v0[3]);
            if (store1) *reinterpret_cast<uint4*>(out1 + col) = make_uint4(v1[0], v1[1], v1[2], v1[3]);
          }
        }
#pragma unroll
        for (int c = kVecChunks; c < kBlockN / 8; ++c) {
          const int col = n_base + 8 * c + col_in_chunk;
          if constexpr (kN % 2 == 0) {
            if (col < kN) {  // N even: col + 1 < N too, and the pair is 4-byte aligned
              if (store0)
                *reinterpret_cast<uint32_t*>(out0 + col) = sm90::pack_bf16x2(result[4 * c], result[4 * c + 1]);
              if (store1)
                *reinterpret_cast<uint32_t*>(out1 + col) = sm90::pack_bf16x2(result[4 * c + 2], result[4 * c + 3]);
            }
          } else {
            if (col < kN) {
              if (store0) out0[col] = sm90::to_bf16(result[4 * c]);
              if (store1) out1[col] = sm90::to_bf16(result[4 * c + 2]);
            }
            if (col + 1 < kN) {
              if (store0) out0[col + 1] = sm90::to_bf16(result[4 * c + 1]);
              if (store1) out1[col + 1] = sm90::to_bf16(result[4 * c + 3]);
            }
          }
        }
      }
      // Consume warpgroup 1's last token so no barrier arrival is left pending at exit.
      if constexpr (kPingPong) {
        if (warpgroup == 0 && issued_any) sm90::named_bar_sync(2, 256);
      }
    }
    if constexpr (kCluster > 1) {
      __syncwarp();  // the producer warp's lanes reconverge before the .aligned cluster barrier
      // Stay resident until the peer is done: it arrives on our barriers and multicasts into
      // our shared memory until its last K block.
      sm90::cluster_sync();
    }
  }
};

}  // namespace phasemoe
