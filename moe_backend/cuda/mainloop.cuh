// The pipeline through the ring of shared-memory stages. Producer side: one lane issues the TMA
// loads of a K block's A [128 x 128] and B [BLOCK_N x 128] tiles (128-byte swizzle), a second
// warp copies its scales next to them (cp.async); both complete on the stage's `full` mbarrier.
// Consumer side (warpgroups 0 and 1: rows 0-63 and 64-127): per K block and MMA unit, 4 x wgmma
// m64nPART_Nk32 into a unit accumulator, then the promotion result += a_scale * b_scale * unit in
// fp32 (the per-block scales cannot enter the tensor core, so each K block is summed on its own
// and scaled in registers), then the stage goes back to the producer (`empty` mbarrier).
#pragma once
#include <cstdint>

#include "kernel_traits.cuh"
#include "scheduler.cuh"
#include "sm90_ptx.cuh"
#include "wgmma_fp8.cuh"

namespace phasemoe {

// A position in the ring of stages: the stage, its barrier phase, and how many K blocks came
// before it on this CTA (which a_scale chunk slot holds its scales).
struct RingPos {
  int stage = 0;
  uint32_t phase = 0;
  uint32_t count = 0;
};

// kDirectRows: the precomputed (destination token or -1, weight bits) pair of every layout row, and
// the shared-memory slots the scale warp stages a tile's pairs in.
struct DirectSource {
  const int32_t* __restrict__ pairs;
  int32_t* slots;
};

template <typename T>
struct Mainloop {
  using PartMma = WgmmaFp8<T::kPartN>;
  using PartMmaRs = WgmmaFp8Rs<T::kPartN>;
  using AFrag = uint32_t[T::kAFragRegs];  // kARegs: a K block's A fragments (else unused)

  // Zeroes an accumulator (unrolled: it stays in registers).
  template <int kRegs>
  __device__ __forceinline__ static void clear(float (&regs)[kRegs]) {
#pragma unroll
    for (int i = 0; i < kRegs; ++i) regs[i] = 0.f;
  }

  __device__ __forceinline__ static void advance(RingPos& pos) {
    ++pos.count;
    if (++pos.stage == T::kStages) {
      pos.stage = 0;
      pos.phase ^= 1;
    }
  }

  // ---- producer ----------------------------------------------------------------------------

  // The first row of B (an N index) of part `h` of N tile `n_tile`: parts follow each other, or
  // (kSiluQuant) part 0 is gate block n_tile and part 1 the up block I/128 blocks further.
  __device__ __forceinline__ static int b_row(int n_tile, int h) {
    if constexpr (T::kSiluQuant) return h * T::kActCols + n_tile * T::kBRowsPerLoad;
    return n_tile * T::kBlockN + h * T::kBRowsPerLoad;
  }

  // The TMA lane: A and B tiles of K block `kb` into `stage`. Out-of-bounds box elements (rows
  // past M, columns past N) are zero-filled and still counted in the transaction bytes.
  __device__ __forceinline__ static void load_tiles(uint8_t* smem_a, uint8_t* smem_b, uint64_t* full_bar,
                                                    const sm90::TmaDescriptor& tmap_a,
                                                    const sm90::TmaDescriptor& tmap_b, const TileRole& role, int kb,
                                                    int stage, uint32_t rank) {
    const int m_tile = role.m_tile;
    const int n_tile = role.n_tile;
    sm90::mbar_arrive_expect_tx(&full_bar[stage], T::kTmaStageBytes);
    if constexpr (T::kMcastA == 2) {
      // Mixed pairs: this CTA's half of the shared operand into both CTAs, the other operand
      // whole into its own (both in half-height boxes).
      const uint16_t both = static_cast<uint16_t>((1u << T::kCluster) - 1);
      uint8_t* a_stage = smem_a + stage * T::kABytes;
      uint8_t* b_stage = smem_b + stage * T::kBBytes;
      const int a_row = m_tile * kBlockM;
      if (role.share_a) {
        sm90::tma_load_2d_multicast(a_stage + rank * T::kALoadBytes, &tmap_a, &full_bar[stage], kb * kBlockK,
                                    a_row + static_cast<int>(rank) * T::kARowsPerLoad, both);
#pragma unroll
        for (int h = 0; h < T::kBLoads; ++h)
          sm90::tma_load_3d(b_stage + h * T::kBLoadBytes, &tmap_b, &full_bar[stage], kb * kBlockK, b_row(n_tile, h),
                            role.expert);
      } else {
#pragma unroll
        for (int h = 0; h < kBlockM / T::kARowsPerLoad; ++h)
          sm90::tma_load_2d(a_stage + h * T::kALoadBytes, &tmap_a, &full_bar[stage], kb * kBlockK,
                            a_row + h * T::kARowsPerLoad);
        sm90::tma_load_3d_multicast(b_stage + rank * T::kBLoadBytes, &tmap_b, &full_bar[stage], kb * kBlockK,
                                    b_row(n_tile, static_cast<int>(rank)), role.expert, both);
      }
      return;
    }
    if constexpr (T::kGatherA) {
      // A comes from the A-row warps (load_a_rows).
    } else if constexpr (T::kMcastA) {
      // This CTA's half of the A tile, into both CTAs; its own whole B tile.
      sm90::tma_load_2d_multicast(smem_a + stage * T::kABytes + rank * T::kALoadBytes, &tmap_a, &full_bar[stage],
                                  kb * kBlockK, m_tile * kBlockM + static_cast<int>(rank) * T::kARowsPerLoad,
                                  static_cast<uint16_t>((1u << T::kCluster) - 1));
    } else {
      sm90::tma_load_2d(smem_a + stage * T::kABytes, &tmap_a, &full_bar[stage], kb * kBlockK, m_tile * kBlockM);
    }
    if constexpr ((T::kCluster == 1 && !T::kSiluQuant) || T::kMcastA) {
      sm90::tma_load_3d(smem_b + stage * T::kBBytes, &tmap_b, &full_bar[stage], kb * kBlockK, n_tile * T::kBlockN,
                        role.expert);
    } else {
      if (T::kCluster > 1 && role.multicast) {
        sm90::tma_load_3d_multicast(smem_b + stage * T::kBBytes + rank * T::kBLoadBytes, &tmap_b, &full_bar[stage],
                                    kb * kBlockK, b_row(n_tile, static_cast<int>(rank)), role.expert,
                                    static_cast<uint16_t>((1u << T::kCluster) - 1));
      } else {
#pragma unroll
        for (int h = 0; h < T::kBLoads; ++h)
          sm90::tma_load_3d(smem_b + stage * T::kBBytes + h * T::kBLoadBytes, &tmap_b, &full_bar[stage], kb * kBlockK,
                            b_row(n_tile, h), role.expert);
      }
    }
  }

  // Gathered A (kGatherA): thread t of the producer's warps 2 and 3 copies rows t and t + 64 of
  // the tile's K block `kb`, from the token rows src[0], src[1] (-1: padding or past M, zero
  // filled), in 16-byte cp.asyncs placed as the 128-byte swizzle of a TMA box would place them
  // (chunk c of row r at r * 128 + (c ^ r % 8) * 16, the layout the consumers' descriptors read).
  __device__ __forceinline__ static void load_a_rows(uint8_t* smem_a, uint64_t* full_bar, const uint8_t* __restrict__ a,
                                                     const int (&src)[2], int kb, int stage, int t) {
    uint8_t* tile = smem_a + stage * T::kABytes;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = t + T::kGatherThreads * i;
      const uint8_t* row = a + static_cast<int64_t>(src[i] >= 0 ? src[i] : 0) * T::kK + kb * kBlockK;
      const uint32_t bytes = src[i] >= 0 ? 16u : 0u;
#pragma unroll
      for (int c = 0; c < kBlockK / 16; ++c)
        sm90::cp_async_16(tile + r * kBlockK + ((c ^ (r & 7)) << 4), row + 16 * c, bytes);
    }
    sm90::cp_async_mbar_arrive_noinc(&full_bar[stage]);
  }

  // The scale warp: at the first K block of a chunk, the chunk's a_scale of the tile's rows
  // (lane + 32 i; rows past M are zero-filled and read from a valid address, their products are
  // never stored); every K block, lanes < kScaleBands copy one b_scale each. A warp of its
  // own keeps the TMA issue from queueing behind the cp.asyncs while the epilogue's stores fill
  // the memory pipe.
  __device__ __forceinline__ static void load_scales(float* smem_a_scales, float* smem_scales, uint64_t* full_bar,
                                                     const float* __restrict__ a_scale,
                                                     const float* __restrict__ b_scale, const TileRole& role, int kb,
                                                     const RingPos& pos, int m, int lane,
                                                     const int64_t* __restrict__ a_rows = nullptr,
                                                     const DirectSource& direct = {nullptr, nullptr}) {
    const int stage = pos.stage;
    if constexpr (T::kDirectRows) {
      if (kb == 0) {  // the tile's rows' pairs, into the slot of its parity (kStreamK: given)
        int32_t* slot =
            T::kStreamK ? direct.slots : direct.slots + ((pos.count / T::kKBlocks) & 1) * T::kDirectSlotWords;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = lane + 32 * i;
          const int row = role.m_tile * kBlockM + r;
          const int64_t src = row < m ? row : 0;  // rows past M: zero-filled, never stored
          sm90::cp_async_8(slot + 2 * r, direct.pairs + 2 * src, row < m ? 8u : 0u);
        }
      }
    }
    if (kb % T::kScaleChunk == 0) {
      float* slot = smem_a_scales + ((pos.count / T::kScaleChunk) % T::kAScaleSlots) * T::kAScaleSlotFloats;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = role.m_tile * kBlockM + lane + 32 * i;
        bool valid = row < m;
        int64_t src_row = valid ? row : 0;
        if constexpr (T::kGatherA) {  // the token row behind the layout row (-1: padding)
          const int64_t token = valid ? __ldg(a_rows + row) : -1;
          valid = token >= 0;
          src_row = valid ? token : 0;
        }
        const float* src = a_scale + src_row * T::kKBlocks + kb;
        float* dst = slot + (lane + 32 * i) * T::kAScalePitch;
        if constexpr (T::kScaleChunk >= 4) {
#pragma unroll
          for (int c = 0; c < T::kScaleChunk / 4; ++c) sm90::cp_async_16(dst + 4 * c, src + 4 * c, valid ? 16u : 0u);
        } else {
#pragma unroll
          for (int c = 0; c < T::kScaleChunk; ++c) sm90::cp_async_4(dst + c, src + c, valid ? 4u : 0u);
        }
      }
    }
    if (lane < T::kScaleBands) {
      const int block = T::kSiluQuant ? lane * T::kActGroups + role.n_tile
                                      : min((role.n_tile * T::kBlockN + lane * T::kScaleBandCols) / kScaleBlock,
                                            T::kNScaleBlocks - 1);
      sm90::cp_async_4(smem_scales + stage * T::kScaleStageFloats + lane,
                       b_scale + (static_cast<int64_t>(role.expert) * T::kNScaleBlocks + block) * T::kKBlocks + kb, 4u);
    }
    sm90::cp_async_mbar_arrive_noinc(&full_bar[stage]);
  }

  // ---- consumers ---------------------------------------------------------------------------

  // This thread's first accumulator row within the 128-row tile (wgmma D layout; the second is 8
  // rows below).
  __device__ __forceinline__ static int row_in_tile(int warpgroup, int lane) {
    const int warp_in_wg = (threadIdx.x / 32) % 4;
    return warpgroup * 64 + warp_in_wg * 16 + lane / 4;
  }

  // What the consumer loop works with: shared-memory operands of this warpgroup.
  struct SmemView {
    uint64_t* full_bar;
    uint64_t* empty_bar;
    const float* b_scales;  // per stage: the N tile's b_scale values
    const float* a_scales;  // a_scale chunk slots
    uint64_t desc_a0;       // stage-0 descriptors of this warpgroup's A rows and of B
    uint64_t desc_b0;
    // kARegs: the stage-0 shared address this lane gives ldmatrix for the first k32 step (its row
    // of the A tile, the swizzled 16-byte chunk in bits 4-6; load_a_frags).
    uint32_t a_frag_addr0 = 0;
  };

  // kARegs: a_frag_addr0 of this lane. ldmatrix matrix j = lane / 8 covers rows 8 * (j % 2) + 0..7
  // of the warp's 16 and 16-byte K chunk j / 2 of the k32 step (the fragment order of
  // WgmmaFp8Rs); the 128-byte swizzle puts chunk c of row r at (c ^ r % 8) * 16, and r % 8 =
  // lane % 8 here.
  __device__ __forceinline__ static uint32_t a_frag_addr(const uint8_t* smem_a, int warpgroup, int lane) {
    const int warp_in_wg = (threadIdx.x / 32) % 4;
    const int matrix = lane / 8;
    const int row = warpgroup * 64 + warp_in_wg * 16 + 8 * (matrix % 2) + lane % 8;
    return sm90::smem_addr(smem_a + row * kBlockK) | static_cast<uint32_t>(((matrix / 2) ^ (lane % 8)) << 4);
  }

  // kARegs: the A fragments of this warpgroup's rows for the K block in `stage`, 4 k32 steps. A
  // step moves 32 bytes, 2 chunks: XOR-ing 2 * step into the swizzled chunk (bits 4-6) gives
  // chunk 2 * step + j / 2 of the row; the stage offset is a multiple of 1024 and leaves those bits.
  __device__ __forceinline__ static void load_a_frags(AFrag& a_frag, const SmemView& sv, int stage) {
    const uint32_t addr = sv.a_frag_addr0 + static_cast<uint32_t>(stage) * T::kABytes;
#pragma unroll
    for (int kk = 0; kk < kBlockK / kWgmmaK; ++kk)
      sm90::ldmatrix_x4(*reinterpret_cast<uint32_t (*)[4]>(&a_frag[4 * kk]), addr ^ static_cast<uint32_t>(kk << 5));
  }

  // Releases `stage` in every CTA of the cluster (a peer's producer may multicast into it).
  __device__ __forceinline__ static void release_stage(uint64_t* empty_bar, int stage, int lane) {
    if constexpr (T::kCluster == 1) {
      if (lane == 0) sm90::mbar_arrive(&empty_bar[stage]);
    } else {
      if (lane < T::kCluster) sm90::mbar_arrive_cluster(&empty_bar[stage], static_cast<uint32_t>(lane));
    }
  }

  // This thread's two rows' a_scale for the K block at `pos` (staged by the producer's scale warp).
  __device__ __forceinline__ static void read_a_scales(const float* a_scales, const RingPos& pos, int row_in_tile,
                                                       float& sa0, float& sa1) {
    const float* slot =
        a_scales + ((pos.count / T::kScaleChunk) % T::kAScaleSlots) * T::kAScaleSlotFloats + pos.count % T::kScaleChunk;
    sa0 = slot[row_in_tile * T::kAScalePitch];
    sa1 = slot[(row_in_tile + 8) * T::kAScalePitch];
  }

  // One MMA unit: a K block's 4 wgmmas (k32 each) into `acc`, overwriting it, committed as one
  // group; the operand fences keep the compiler from moving accesses to `acc` across them. A from
  // shared memory (`desc_a`), or with kARegs from `a_frag` when given: those registers are only
  // read, and hold still until the unit's wait (the loop waits for every unit before the next K
  // block's ldmatrix).
  __device__ __forceinline__ static void issue_unit(float (&acc)[T::kPartRegs], uint64_t desc_a, uint64_t desc_b,
                                                    AFrag* a_frag = nullptr) {
#pragma unroll
    for (int i = 0; i < T::kPartRegs; ++i) sm90::fence_operand(acc[i]);
    if constexpr (T::kARegs) {
      if (a_frag != nullptr) {
#pragma unroll
        for (int i = 0; i < T::kAFragRegs; ++i) sm90::fence_operand((*a_frag)[i]);
      }
    }
    sm90::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockK / kWgmmaK; ++kk) {  // +2 per step: 32 bytes of K in 16-byte units
      if constexpr (T::kARegs) {
        if (a_frag != nullptr) {
          PartMmaRs::mma(acc, *reinterpret_cast<const uint32_t (*)[4]>(&(*a_frag)[4 * kk]), desc_b + 2 * kk,
                         kk == 0 ? 0u : 1u);
          continue;
        }
      }
      PartMma::mma(acc, desc_a + 2 * kk, desc_b + 2 * kk, kk == 0 ? 0u : 1u);
    }
    sm90::wgmma_commit();
#pragma unroll
    for (int i = 0; i < T::kPartRegs; ++i) sm90::fence_operand(acc[i]);
  }

  // Waits for the stage (first part only), issues part kP of its K block into `acc` and, on the
  // first part, reads the block's combined scales for this thread's two rows (their latency hides
  // behind the MMAs) and, with kARegs, the block's A fragments. The issue position moves on after
  // the last part.
  template <int kP>
  __device__ __forceinline__ static void issue_part(float (&acc)[T::kPartRegs], float (&scale)[T::kScaleBands][2],
                                                    AFrag& a_frag, const SmemView& sv, RingPos& pos, int row_in_tile) {
    if constexpr (kP == 0) {
      sm90::mbar_wait(&sv.full_bar[pos.stage], pos.phase);
      // Gathered A landed by cp.async (generic proxy); the wgmmas read it through the async one.
      if constexpr (T::kGatherA && !T::kARegs) sm90::fence_proxy_async_shared();
      if constexpr (T::kARegs) load_a_frags(a_frag, sv, pos.stage);
    }
    // Stage descriptors = the stage-0 descriptors plus the stage's offset in 16-byte units.
    const uint64_t desc_a = sv.desc_a0 + static_cast<uint64_t>((pos.stage * T::kABytes) >> 4);
    const uint64_t desc_b =
        sv.desc_b0 + static_cast<uint64_t>((pos.stage * T::kBBytes + kP * T::kPartN * kBlockK) >> 4);
    issue_unit(acc, desc_a, desc_b, &a_frag);
    if constexpr (kP == 0) {
      float sa0, sa1;
      read_a_scales(sv.a_scales, pos, row_in_tile, sa0, sa1);
      const float* sb = sv.b_scales + pos.stage * T::kScaleStageFloats;
#pragma unroll
      for (int j = 0; j < T::kScaleBands; ++j) {
        scale[j][0] = sa0 * sb[j];
        scale[j][1] = sa1 * sb[j];
      }
    }
    if constexpr (kP == T::kParts - 1) advance(pos);
  }

  // Promotes part kP of a completed K block (held in `acc`) into `result`; after the last part
  // the stage is released and the retire position moves on.
  template <int kP>
  __device__ __forceinline__ static void retire_part(float (&acc)[T::kPartRegs],
                                                     const float (&scale)[T::kScaleBands][2],
                                                     float (&result)[T::kAccRegs], const SmemView& sv, RingPos& pos,
                                                     int lane) {
#pragma unroll
    for (int i = 0; i < T::kPartRegs; ++i) sm90::fence_operand(acc[i]);
    if constexpr (kP == T::kParts - 1) release_stage(sv.empty_bar, pos.stage, lane);
    promote<kP>(acc, scale, result);
    if constexpr (kP == T::kParts - 1) advance(pos);
  }

  // result += scale * acc over the chunks of part kP (each chunk's scale band a constant once
  // unrolled).
  template <int kP>
  __device__ __forceinline__ static void promote(const float (&acc)[T::kPartRegs],
                                                 const float (&scale)[T::kScaleBands][2],
                                                 float (&result)[T::kAccRegs]) {
    constexpr int kFirst = kP * T::kPartChunks;
#pragma unroll
    for (int c = 0; c < T::kPartChunks; ++c) {
      const int block = (8 * (kFirst + c)) / T::kScaleBandCols;
      const float s0 = scale[block][0];
      const float s1 = scale[block][1];
      result[4 * (kFirst + c) + 0] = fmaf(s0, acc[4 * c + 0], result[4 * (kFirst + c) + 0]);
      result[4 * (kFirst + c) + 1] = fmaf(s0, acc[4 * c + 1], result[4 * (kFirst + c) + 1]);
      result[4 * (kFirst + c) + 2] = fmaf(s1, acc[4 * c + 2], result[4 * (kFirst + c) + 2]);
      result[4 * (kFirst + c) + 3] = fmaf(s1, acc[4 * c + 3], result[4 * (kFirst + c) + 3]);
    }
  }

  // Units [0, kCount) of a chain of whole K blocks (unit i = part i % kParts of the chain's K
  // block i / kParts) in straight-line code. Two units in flight: even units in `acc`, odd ones
  // in `acc_odd`; unit i + 1 is issued before unit i is waited for and promoted, so only the
  // chain's last promotion leaves the tensor core to the other warpgroup. Nothing stays in
  // flight past the chain: with MMAs in flight across a loop's back edge, ptxas cannot tell which
  // group a wait_group 1 retired and serializes every wgmma (C7514). One unit in flight: each
  // unit is waited for and promoted before the next is issued; the other warpgroup's MMAs keep
  // the tensor core busy meanwhile.
  template <int kCount, int kI = 0, bool kFirstIssued = false>
  __device__ __forceinline__ static void mma_chain(float (&acc)[T::kPartRegs], float (&acc_odd)[T::kOddRegs],
                                                   float (&result)[T::kAccRegs], const SmemView& sv, RingPos& issue,
                                                   RingPos& retire, int row_in_tile, int lane,
                                                   float (&scales)[2][T::kScaleBands][2], AFrag& a_frag) {
    constexpr int kParts = T::kParts;
    constexpr int kBlock = kI / kParts;  // K block within the chain: its scales are scales[kBlock % 2]
    if constexpr (T::kUnitsInFlight == 1) {
      if constexpr (kI > 0 || !kFirstIssued)
        issue_part<kI % kParts>(acc, scales[kBlock % 2], a_frag, sv, issue, row_in_tile);
      sm90::wgmma_wait<0>();
      retire_part<kI % kParts>(acc, scales[kBlock % 2], result, sv, retire, lane);
      if constexpr (kI + 1 < kCount)
        mma_chain<kCount, kI + 1>(acc, acc_odd, result, sv, issue, retire, row_in_tile, lane, scales, a_frag);
    } else {
      float (&mine)[T::kPartRegs] = kI % 2 == 0 ? acc : acc_odd;
      float (&prev)[T::kPartRegs] = kI % 2 == 0 ? acc_odd : acc;
      if constexpr (kI > 0 || !kFirstIssued)
        issue_part<kI % kParts>(mine, scales[kBlock % 2], a_frag, sv, issue, row_in_tile);
      if constexpr (kI > 0) {
        sm90::wgmma_wait<1>();  // unit kI - 1 is done; unit kI runs meanwhile
        retire_part<(kI - 1) % kParts>(prev, scales[((kI - 1) / kParts) % 2], result, sv, retire, lane);
      }
      if constexpr (kI + 1 < kCount) {
        mma_chain<kCount, kI + 1>(acc, acc_odd, result, sv, issue, retire, row_in_tile, lane, scales, a_frag);
      } else {
        sm90::wgmma_wait<0>();
        retire_part<kI % kParts>(mine, scales[kBlock % 2], result, sv, retire, lane);
      }
    }
  }

  // The K loop of one tile after its first unit was issued into `acc` (its scales in
  // scales[0]): chains of kChainKBlocks K blocks, then the remainder.
  __device__ __forceinline__ static void k_loop(float (&acc)[T::kPartRegs], float (&acc_odd)[T::kOddRegs],
                                                float (&result)[T::kAccRegs], const SmemView& sv, RingPos& issue,
                                                RingPos& retire, int row_in_tile, int lane,
                                                float (&scales)[2][T::kScaleBands][2], AFrag& a_frag) {
    constexpr int kChain = T::kLoopChain;
    mma_chain<kChain * T::kParts, 0, true>(acc, acc_odd, result, sv, issue, retire, row_in_tile, lane, scales, a_frag);
#pragma unroll 1
    for (int kb = kChain; kb + kChain <= T::kKBlocks; kb += kChain)
      mma_chain<kChain * T::kParts>(acc, acc_odd, result, sv, issue, retire, row_in_tile, lane, scales, a_frag);
    if constexpr (T::kKBlocks % kChain != 0)
      mma_chain<(T::kKBlocks % kChain) * T::kParts>(acc, acc_odd, result, sv, issue, retire, row_in_tile, lane, scales,
                                                    a_frag);
  }

  // A warpgroup whose 64 rows of the tile are all padding (kSkipHalves): its share of the ring's
  // handshake without MMAs. It waits for each stage to land before releasing it, so it never
  // arrives twice in one phase of a stage's `empty` barrier; the producer and the other
  // warpgroup run as before.
  __device__ __forceinline__ static void skip_k_loop(const SmemView& sv, RingPos& pos, int lane) {
#pragma unroll 1
    for (int kb = 0; kb < T::kKBlocks; ++kb) {
      sm90::mbar_wait(&sv.full_bar[pos.stage], pos.phase);
      release_stage(sv.empty_bar, pos.stage, lane);
      advance(pos);
    }
  }

  // kSkipHalves = 2 (two parts per tile): the K loop of a tile whose rows all lie in its first 64,
  // split by N: warpgroup `part` computes that 128-wide part of rows 0-63 (`sv` is its own view:
  // its A descriptor moved back to warpgroup 0's rows, B's to the part; `row_in_tile` a row of
  // warpgroup 0) into the first part's registers of `result`, the other warpgroup the other part,
  // so both keep the tensor core busy where one would idle. Each part is one scale band. One unit
  // in flight, waited for inside the K block: nothing crosses the loop's back edge.
  __device__ __forceinline__ static void split_k_loop(float (&acc)[T::kPartRegs], float (&result)[T::kAccRegs],
                                                      const SmemView& sv, RingPos& pos, int row_in_tile, int lane,
                                                      int part) {
    static_assert(T::kParts == 2 && T::kScaleBandCols == T::kPartN,
                  "the split runs a 256-wide tile as its two 128-wide parts, a scale band each");
#pragma unroll 1
    for (int kb = 0; kb < T::kKBlocks; ++kb) {
      sm90::mbar_wait(&sv.full_bar[pos.stage], pos.phase);
      // 16-byte units: warpgroup 1's A rows start 64 rows (64 x 128 bytes) into the tile.
      const uint64_t desc_a = sv.desc_a0 + static_cast<uint64_t>((pos.stage * T::kABytes) >> 4) -
                              static_cast<uint64_t>(part * ((64 * kBlockK) >> 4));
      const uint64_t desc_b = sv.desc_b0 + static_cast<uint64_t>((pos.stage * T::kBBytes) >> 4) +
                              static_cast<uint64_t>(part * ((T::kPartN * kBlockK) >> 4));
      issue_unit(acc, desc_a, desc_b);
      float sa0, sa1;
      read_a_scales(sv.a_scales, pos, row_in_tile, sa0, sa1);
      const float sb = sv.b_scales[pos.stage * T::kScaleStageFloats + part];
      float scale[T::kScaleBands][2];
      scale[0][0] = sa0 * sb;
      scale[0][1] = sa1 * sb;
      sm90::wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < T::kPartRegs; ++i) sm90::fence_operand(acc[i]);
      release_stage(sv.empty_bar, pos.stage, lane);
      promote<0>(acc, scale, result);
      advance(pos);
    }
  }

  // Stream-K: the K loop over `num_kb` K blocks of a tile (a whole number of chains, at least
  // one: segments are whole a_scale chunks, KernelTraits' stream-K assert).
  __device__ __forceinline__ static void k_loop_blocks(float (&acc)[T::kPartRegs], float (&acc_odd)[T::kOddRegs],
                                                       float (&result)[T::kAccRegs], const SmemView& sv, RingPos& issue,
                                                       RingPos& retire, int row_in_tile, int lane,
                                                       float (&scales)[2][T::kScaleBands][2], AFrag& a_frag,
                                                       int num_kb) {
    constexpr int kChain = T::kLoopChain;
    mma_chain<kChain * T::kParts, 0, true>(acc, acc_odd, result, sv, issue, retire, row_in_tile, lane, scales, a_frag);
#pragma unroll 1
    for (int kb = kChain; kb < num_kb; kb += kChain)
      mma_chain<kChain * T::kParts>(acc, acc_odd, result, sv, issue, retire, row_in_tile, lane, scales, a_frag);
  }
};

}  // namespace phasemoe
