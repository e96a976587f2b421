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
//                      (128-byte swizzle), a second warp copies the K block's scales next to
//                      them (cp.async); each stage completes on its `full` mbarrier.
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

// Measurement only (benchmarks/probe_cuda_gemm.py "@bits" variants; results are wrong): leave
// one part of the work out and time the difference. ptxas removes whatever feeds only dead
// values (a wgmma whose accumulator nobody reads included), so each switch keeps the rest alive
// with a predicated use that never fires; check the SASS of an ablated build before trusting it. 1: the promotion FFMAs, 2: the epilogue
// stores, 4: the MMAs, 8: the scale copies, 16: the TMA loads (the stage completes on a plain
// arrival), 32: the bulk copies of the shared-memory epilogue, 64: every other K block's A tile
// (the L2 reads 2 x 2 clusters would save), 128: the promotion's FFMAs read the unit
// accumulator as usual but sum into 8 registers instead of the tile's sum, so two 128-wide
// units fit in flight at 256 wide (unit_accs=2): the promotion's energy kept, its latency
// hidden behind the warpgroup's own next unit (a bound on what more consumer warpgroups could gain).
// Two-accumulator loop only.
#ifndef PHASEMOE_ABLATE
#define PHASEMOE_ABLATE 0
#endif

namespace phasemoe {

constexpr int kAblate = PHASEMOE_ABLATE;
constexpr int kKLoopUnroll = PHASEMOE_K_UNROLL;  // the consumer K loop's unroll factor
constexpr int kTwoAccChain = 2 * kKLoopUnroll;   // K blocks per straight-line chain (kTwoAcc)
constexpr int kBlockM = 128;          // 2 consumer warpgroups x 64 rows (wgmma M)
constexpr int kBlockK = 128;          // = the scale block: one promotion per stage
constexpr int kWgmmaK = 32;           // K of one fp8 wgmma
constexpr int kNumConsumerWarpgroups = 2;
constexpr int kNumThreads = 128 * (kNumConsumerWarpgroups + 1);
constexpr int kScaleBlock = 128;
// Register split after setmaxnreg: 2 x 128 x 232 + 128 x 40 = 64512 <= 65536.
constexpr int kConsumerRegs = 232;
constexpr int kProducerRegs = 40;

// What a CTA computes of a unit: K blocks [kb_begin, kb_begin + kb_count) and what becomes of
// the sums (the split tail, below): kWhole = the whole K range, stored as usual; kFinalizer = the
// first K blocks, plus the partial sums of the `others` workers after this one, then stored;
// kContributor = later K blocks, handed to the unit's finalizer through the workspace.
struct TilePiece {
  static constexpr int kWhole = 0;
  static constexpr int kFinalizer = 1;
  static constexpr int kContributor = 2;
  int kb_begin;
  int kb_count;
  int kind;
  int others;
};

// Walks the tiles of one CTA (kCluster = 1) or one cluster of 2 (a unit is a pair of tiles, one
// per CTA): kMcastA = 0 pairs vertically adjacent M tiles 2i, 2i + 1 at one N tile (B shared);
// kMcastA = 1 pairs N tiles 2j, 2j + 1 at one M tile (A shared, always one expert).
// kSplitTail = 1 (stream-K on the last wave): the units that fill whole waves go round-robin as
// usual; the last, partial wave's units are cut into chunks of kSplitQuantum K blocks and every
// worker (CTA or cluster) takes an equal run of consecutive chunks, so the idle SMs of the last
// wave share its work. A run starts inside a unit at most once (its first piece: a contributor)
// and ends inside one at most once (its last piece: that unit's finalizer), so a contributor
// hands its sums over early in its run and the finalizer needs them only at the end of its own.
// kMaskedMaxM > 0 (the masked layout, M-unit-major walk of one M tile per unit): skip_dead_rest.
template <int kN, int kBlockN, int kGroupM, int kCluster, int kMcastA, int kKBlocks, int kSplitTail,
          int kMaskedMaxM = 0>
struct TileScheduler {
  static constexpr int kNumNTiles = (kN + kBlockN - 1) / kBlockN;
  static constexpr int kNumNUnits = kMcastA ? (kNumNTiles + kCluster - 1) / kCluster : kNumNTiles;
  static constexpr int kGroupUnits = kMcastA ? kGroupM : (kGroupM / kCluster > 0 ? kGroupM / kCluster : 1);
  // Tail chunks follow the a_scale chunks (8 K blocks): a piece then starts on a chunk boundary.
  static constexpr int kSplitQuantum = 8;
  static constexpr int kChunks = kKBlocks / kSplitQuantum;  // chunks per unit
  static_assert(!kSplitTail || kKBlocks % kSplitQuantum == 0, "split tail: K / 128 must be a multiple of 8");

  int num_m_units;
  int num_tiles;
  int next;
  int stride;
  int whole_units;  // units walked round-robin (all of them without a split tail)
  int worker;       // kSplitTail: this CTA's (cluster's) index among the stride workers
  int chunk;        // kSplitTail: this worker's next tail chunk and the end of its run
  int chunk_end;
  int run_len;      // kSplitTail: chunks per worker

  __device__ __forceinline__ explicit TileScheduler(int m)
      : num_m_units(kMcastA ? (m + kBlockM - 1) / kBlockM
                            : ((m + kBlockM - 1) / kBlockM + kCluster - 1) / kCluster),
        num_tiles(num_m_units * kNumNUnits),
        next(blockIdx.x / kCluster),
        stride(gridDim.x / kCluster) {
    whole_units = num_tiles;
    worker = next;
    chunk = chunk_end = 0;
    run_len = 1;
    if constexpr (kSplitTail) {
      const int full = num_tiles - num_tiles % stride;
      const int tail_chunks = (num_tiles - full) * kChunks;
      const int len = (tail_chunks + stride - 1) / stride;
      if (tail_chunks > 0 && len < kChunks) {  // else each tail unit takes one worker anyway
        whole_units = full;
        run_len = len;
        chunk = min(worker * len, tail_chunks);
        chunk_end = min(chunk + len, tail_chunks);
      }
    }
  }

  // Tiles are numbered so that kGroupM consecutive M units sweep the N units together: the CTAs
  // running at one time share a few experts' weights and a few A row blocks in L2.
  __device__ __forceinline__ void unit_coords(int t, int& m_unit, int& n_unit) const {
    const int per_group = kGroupUnits * kNumNUnits;
    const int group = t / per_group;
    const int first_m = group * kGroupUnits;
    const int rows_in_group = min(num_m_units - first_m, kGroupUnits);
    const int r = t - group * per_group;
    m_unit = first_m + r % rows_in_group;
    n_unit = r / rows_in_group;
  }

  // Called on a unit found dead (its first row is padding). In the masked layout every M tile of
  // an expert after one past its rows is dead too, up to the next expert's first: jump to this
  // CTA's first unit there. A layout sized for the worst case (max_m 1024, a few rows per expert)
  // is mostly dead M tiles; walked one by one, each costs a dependent load of masked_m per CTA
  // (thousands per CTA on TP8's 256 experts x 112 N tiles), now at most one per expert and CTA.
  // Needs units numbered M-unit-major (kGroupUnits 1) with one M tile each (kCluster 1, or
  // A-sharing pairs); elsewhere a no-op. Producer and consumers may skip differently (the
  // consumers have fetched a unit ahead): they still agree on every live unit.
  __device__ __forceinline__ void skip_dead_rest(int m_unit) {
    if constexpr (kMaskedMaxM > 0 && kGroupUnits == 1 && (kCluster == 1 || kMcastA) && !kSplitTail) {
      constexpr int kTilesPerExpert = kMaskedMaxM / kBlockM;
      const int next_expert_unit = (m_unit / kTilesPerExpert + 1) * kTilesPerExpert * kNumNUnits;
      if (next < next_expert_unit) next += (next_expert_unit - next + stride - 1) / stride * stride;
    }
  }

  __device__ __forceinline__ bool next_tile(int& m_unit, int& n_unit, TilePiece& piece) {
    if (next < whole_units) {
      unit_coords(next, m_unit, n_unit);
      next += stride;
      piece = TilePiece{0, kKBlocks, TilePiece::kWhole, 0};
      return true;
    }
    if constexpr (kSplitTail) {
      if (chunk < chunk_end) {
        const int u = chunk / kChunks;
        const int unit_end = (u + 1) * kChunks;
        const int end = min(chunk_end, unit_end);
        const bool first = chunk == u * kChunks;
        piece.kb_begin = (chunk - u * kChunks) * kSplitQuantum;
        piece.kb_count = (end - chunk) * kSplitQuantum;
        piece.kind = first ? (end == unit_end ? TilePiece::kWhole : TilePiece::kFinalizer) : TilePiece::kContributor;
        piece.others = (unit_end - 1) / run_len - worker;  // workers after this one holding the unit's rest
        unit_coords(whole_units + u, m_unit, n_unit);
        chunk = end;
        return true;
      }
    }
    return false;
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
// The expert id of a row (-1: padding, not written). kMaskedMaxM = 0: the contiguous layout's
// per-row ids. kMaskedMaxM > 0: the masked layout [E, kMaskedMaxM, K] read as a contiguous one,
// `ids` being masked_m itself: row r belongs to expert r / max_m and is valid while its index in
// the expert is below masked_m. Reading masked_m directly spares the launch the kernels that
// would build a per-row id array (several small launches per decode step).
template <int kMaskedMaxM>
struct RowIds {
  const int32_t* __restrict__ ids;

  __device__ __forceinline__ int operator()(int row) const {
    if constexpr (kMaskedMaxM == 0) {
      return ids[row];
    } else {
      const int e = row / kMaskedMaxM;
      return row - e * kMaskedMaxM < ids[e] ? e : -1;
    }
  }
};

struct TileRole {
  int expert;       // expert whose weights are loaded (valid when live_pair)
  bool live;        // this CTA's tile has real rows: store them
  bool multicast;   // B tile shared by the pair
  int m_tile;       // this CTA's tile (a dead one: the coordinates it loads)
  int n_tile;
};

// The expert ids a unit's role depends on: its M tile's first row's (e1: the pair's second M
// tile's, B-shared pairs only; -1 past M). Loaded apart from tile_role so that the consumers can
// load the next unit's ids a tile ahead: loaded at the tile's start, the ids' global-load latency
// sat between the previous tile's last MMA and this tile's first (SASS: the first wgmma waited
// on it). `zero` is 0; the consumers pass one the compiler cannot prove to be 0 or warp-uniform:
// ids loaded from a provably uniform address are moved into uniform registers right after the
// load (R2UR), which waits for the load there, at the tile boundary, again.
struct TileIds {
  int e0;
  int e1;
};

template <int kCluster, int kMcastA, typename Ids>
__device__ __forceinline__ TileIds load_tile_ids(const Ids& expert_ids, int m, int m_unit, int zero = 0) {
  if constexpr (kCluster == 1 || kMcastA) {
    return TileIds{expert_ids(m_unit * kBlockM + zero), -1};
  } else {
    const int first = 2 * m_unit * kBlockM + zero;
    return TileIds{expert_ids(first), first + kBlockM < m ? expert_ids(first + kBlockM) : -1};
  }
}

template <int kCluster, int kMcastA, int kNumNTiles>
__device__ __forceinline__ TileRole tile_role(const TileIds& ids, int m_unit, int n_unit, uint32_t rank,
                                              bool& live_pair) {
  TileRole role;
  if constexpr (kCluster == 1) {
    role.expert = ids.e0;
    role.live = role.expert >= 0;
    role.multicast = false;
    role.m_tile = m_unit;
    role.n_tile = n_unit;
    live_pair = role.live;
  } else if constexpr (kMcastA) {
    role.expert = ids.e0;
    const int n_tile = n_unit * kCluster + static_cast<int>(rank);
    live_pair = role.expert >= 0;
    role.live = live_pair && n_tile < kNumNTiles;
    role.multicast = true;
    role.m_tile = m_unit;
    // Past N (odd tile count: only the last pair's second tile): load the partner's B tile
    // (valid coordinates; nothing is stored).
    role.n_tile = min(n_tile, kNumNTiles - 1);
  } else {
    const int e0 = ids.e0;
    const int e1 = ids.e1;
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
// kBulkStore = 1 (needs N % 8 == 0): the epilogue writes each warpgroup's 64 x BLOCK_N tile to a
// shared-memory buffer and stores its valid rows with one asynchronous bulk copy each, so the
// next tile's MMAs overlap the stores; 0: 16-byte stores straight from registers.
// kTwoAcc = 1: the unit-chain K loop. Each K block runs as BLOCK_N / kPartN units (kPartNArg = 0:
// one unit, the whole tile) with kUnitAccs unit accumulators: with two, unit i + 1 is issued
// before unit i is promoted; with one, each unit is waited for (the ping-pong token optional).
// kTmaStore = 1: its epilogue through TMA tensor stores (store_tile_tma).
// kMaskedMaxM > 0: the masked layout with max_m = kMaskedMaxM (`expert_ids` is then masked_m; RowIds).
template <int kN, int kK, int kBlockN, int kStages, int kGroupM, int kPingPong = 1, int kCluster = 1,
          int kMcastA = 0, int kBulkStore = 0, int kTwoAcc = 0, int kMaskedMaxM = 0, int kPartNArg = 0,
          int kUnitAccs = 2, int kTmaStore = 0, int kSplitTail = 0>
struct GroupedGemmContiguous {
  static_assert(kK % kBlockK == 0, "K must be a multiple of 128");
  static_assert(kBlockN % 16 == 0 && kBlockN >= 64 && (kBlockN <= 192 || (kTwoAcc && kBlockN == 256)),
                "BLOCK_N: multiple of 16 in [64, 192], or 256 with two accumulators in parts");
  static_assert(kStages >= 2, "need at least two pipeline stages");
  static_assert(kCluster == 1 || kCluster == 2, "clusters of 1 or 2 CTAs");
  static_assert(kMcastA == 0 || kCluster == 2, "A multicast needs a cluster of 2");
  static_assert(kTwoAcc == 0 || kPingPong == 0 || kUnitAccs == 1,
                "two accumulators: the ping-pong token only with one unit in flight");
  static_assert(kMaskedMaxM % kBlockM == 0, "masked layout: max_m must be a multiple of the 128-row tile");
  static_assert(kBulkStore == 0 || kN % 8 == 0, "bulk-copy epilogue: rows must be 16-byte multiples (N % 8 == 0)");
  static_assert(kTmaStore == 0 || (kTwoAcc && !kBulkStore && kN % 8 == 0 && kBlockN % 64 == 0),
                "TMA-store epilogue: unit-chain loop, N % 8 == 0, BLOCK_N a multiple of 64");
  static_assert(kSplitTail == 0 || (kTwoAcc && kMaskedMaxM == 0 && 8 % kTwoAccChain == 0),
                "split tail: unit-chain loop, contiguous layout, chains that divide the 8-K-block chunks");

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
  // Scale blocks a tile can touch given where tiles start (n_base % 128 is a multiple of
  // kOffQuantum): 1 for 64/128, 2 for 192/256.
  static constexpr int kTileScaleBlocks = (kScaleBlock - kOffQuantum + kBlockN - 1) / kScaleBlock + 1;
  // kTwoAcc: the MMA unit's width (kPartNArg = 0: the whole tile). Promoted sum + two part
  // accumulators must fit the consumer's registers (<= 192 of 232); a part must not straddle a
  // scale block wherever the tile starts.
  static constexpr int kPartN = kPartNArg == 0 ? kBlockN : kPartNArg;
  static constexpr int kParts = kBlockN / kPartN;
  static constexpr int kPartRegs = kPartN / 2;
  static constexpr int kPartChunks = kPartN / 8;
  static constexpr int kOddRegs = kUnitAccs == 2 ? kPartRegs : 1;  // the second unit accumulator
  static_assert(kUnitAccs == 1 || kUnitAccs == 2, "one or two MMA units in flight per warpgroup");
  static_assert(kTwoAcc == 0 || ((kPartN == 64 || kPartN == 128 || kPartN == kBlockN) && kBlockN % kPartN == 0 &&
                                 (kScaleAligned || kNumOffsets <= 2) &&
                                 ((kAblate & 128) || kBlockN / 2 + kUnitAccs * kPartN / 2 <= 192)),
                "two accumulators: units of 64 or 128 columns (or the whole tile) that tile BLOCK_N, tiles "
                "starting at <= 2 offsets in a scale block, registers: BLOCK_N / 2 + UNIT_ACCS x PART_N / 2 <= 192");
  static_assert(kTwoAcc || kPartNArg == 0, "parts need two accumulators");
  // Epilogue: groups of 4 8-column chunks are transposed inside each lane quad so every lane
  // stores 16 contiguous bytes (full 32-byte sectors); needs N % 8 == 0 (16-byte row pitch).
  static constexpr int kVecChunks = (kN % 8 == 0) ? (kBlockN / 8) / 4 * 4 : 0;
  // Each stage's b_scale values (<= kScaleSpan of the N tile), staged by a producer warp next to
  // the tiles, padded to 16 bytes.
  static constexpr uint32_t kScaleStageFloats = 4;
  static constexpr uint32_t kScaleStageBytes = kScaleStageFloats * sizeof(float);
  static_assert(kScaleSpan <= 4, "b_scale slots per stage");
  // a_scale is staged in chunks of kScaleChunk K blocks: each of the tile's 128 rows copies
  // kScaleChunk consecutive floats (one 32-byte sector for 8) once per chunk. One K block at a
  // time (4 bytes per row, a sector each) read 8x the L2 sectors and cost EP8 w13 ~20% (the
  // "@8" ablation). Chunks divide the tile's K blocks, so they never cross a tile.
  static constexpr int kScaleChunk = kKBlocks % 8 == 0 ? 8 : kKBlocks % 4 == 0 ? 4 : kKBlocks % 2 == 0 ? 2 : 1;
  // Row pitch in floats: 12 for chunks of 8 (16-byte aligned rows; the 8 rows a warp reads at
  // once fall in different banks), else 4.
  static constexpr int kAScalePitch = kScaleChunk == 8 ? 12 : 4;
  // Chunk slots in a ring: the producer overwrites a slot when it fills the first stage of the
  // chunk kAScaleSlots later; the `empty` wait of that stage proves the consumers released K
  // block count - kStages, which is past the old chunk's last block when
  // kAScaleSlots * kScaleChunk >= kStages + kScaleChunk - 1.
  static constexpr int kAScaleSlots = (kStages - 1 + kScaleChunk - 1) / kScaleChunk + 1;
  static constexpr uint32_t kAScaleSlotFloats = kBlockM * kAScalePitch;
  static constexpr uint32_t kAScaleArea = 12288;  // bytes reserved whatever the chunk (launcher formula)
  static_assert(kAScaleSlots * kAScaleSlotFloats * sizeof(float) <= kAScaleArea, "a_scale chunk slots");
  // Ring of stages, then the scales, then the barriers; +1024 to align the ring (128-byte
  // swizzle atoms are 1024 bytes: the descriptors assume 1024-aligned tiles).
  // Bulk-store epilogue: one 64 x BLOCK_N bf16 buffer per consumer warpgroup; rows padded by 16
  // bytes so the 8 rows one warp writes at a time fall in different banks.
  static constexpr uint32_t kOutPitch = kBlockN * 2 + 16;
  // TMA-store epilogue: per warpgroup, BLOCK_N / 64 boxes of [64 rows x 64 columns] bf16 (128-byte
  // rows, 128-byte swizzle: 8 KB each, 1024-byte aligned after the ring).
  static constexpr uint32_t kOutBytes = kBulkStore ? kNumConsumerWarpgroups * 64 * kOutPitch
                                        : kTmaStore ? kNumConsumerWarpgroups * 64 * kBlockN * 2 : 0;
  static constexpr uint32_t kSmemBytes =
      kStages * (kStageBytes + kScaleStageBytes) + kOutBytes + kAScaleArea + 2 * kStages * sizeof(uint64_t) + 1024;
  // `full` completes on the TMA lane's expect_tx arrival plus one cp.async arrival per lane of
  // the scale warp.
  static constexpr uint32_t kFullArrivals = 1 + 32;
  static_assert(kABytes % 1024 == 0 && kBBytes % 1024 == 0 && kBLoadBytes % 1024 == 0 && kALoadBytes % 1024 == 0,
                "stage tiles must keep 1024-byte alignment");
  static_assert(kSmemBytes <= 232448, "exceeds the 227 KB of shared memory a Hopper block can opt into");

  using Scheduler = TileScheduler<kN, kBlockN, kGroupM, kCluster, kMcastA, kKBlocks, kSplitTail, kMaskedMaxM>;
  static_assert(!kSplitTail || kScaleChunk == Scheduler::kSplitQuantum,
                "split tail: pieces must start on an a_scale chunk (the scale warp stages a chunk at its first K block)");
  // The one-accumulator loop's MMA covers the whole tile (never compiled with kTwoAcc: BLOCK_N 256
  // has no whole-tile wrapper).
  using Mma = WgmmaFp8<kTwoAcc ? kPartN : kBlockN>;
  using PartMma = WgmmaFp8<kPartN>;

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

  // Chunks g .. g+3 of this thread's two rows as bf16, transposed inside the lane quad: lane q
  // then holds the 8 columns of chunk g + q (16 contiguous bytes) in v0 (row) and v1 (row + 8).
  __device__ __forceinline__ static void pack_chunk_group(const float (&result)[kAccRegs], int g, int quad_lane,
                                                          uint32_t (&v0)[4], uint32_t (&v1)[4]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      v0[j] = sm90::pack_bf16x2(result[4 * (g + j) + 0], result[4 * (g + j) + 1]);
      v1[j] = sm90::pack_bf16x2(result[4 * (g + j) + 2], result[4 * (g + j) + 3]);
    }
    quad_transpose(v0, quad_lane);
    quad_transpose(v1, quad_lane);
  }

  // kTwoAcc: a finished tile whose epilogue waits until the next tile's first MMAs are issued.
  struct PendingStore {
    int row0;
    int n_base;
    bool store0;
    bool store1;
    bool valid;
    int bulk_row;      // kBulkStore: the row this thread copies (threads 0-63 of each warpgroup)
    bool bulk_row_ok;  // ... and whether it is written
    bool rows_ok;      // kTmaStore: this thread's two rows are the tile's expert's or past M
  };

  // Epilogue: bf16 straight from registers to this thread's rows row0 and row0 + 8. Rows not
  // flagged (another expert's id: padding; past M; dead tiles of a cluster pair) are left
  // untouched; columns past N are dropped.
  __device__ __forceinline__ static void store_tile(const float (&result)[kAccRegs], uint16_t* __restrict__ out,
                                                    int row0, int n_base, bool store0, bool store1, int quad_lane) {
    if constexpr (kAblate & 2) {
      // Keep the sums alive without storing them (an empty asm would not: ptxas would drop the
      // promotion as dead code): one predicated store that never fires.
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kAccRegs; ++i) sum += result[i];
      if (sum == 1234.5f) out[static_cast<int64_t>(row0) * kN] = 0;
      return;
    }
    const int col_in_chunk = 2 * quad_lane;
    uint16_t* out0 = out + static_cast<int64_t>(row0) * kN;
    uint16_t* out1 = out0 + 8 * kN;
#pragma unroll
    for (int g = 0; g < kVecChunks; g += 4) {
      uint32_t v0[4], v1[4];
      pack_chunk_group(result, g, quad_lane, v0, v1);
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
          if (store0) *reinterpret_cast<uint32_t*>(out0 + col) = sm90::pack_bf16x2(result[4 * c], result[4 * c + 1]);
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

  // Epilogue through shared memory (kBulkStore): this warpgroup's 64 rows go to its buffer
  // (16-byte writes after the quad transpose), then thread t < 64 of the warpgroup copies row t
  // to `out` with one asynchronous bulk copy when `row_ok` (padding rows, rows past M, dead tiles
  // of a pair: untouched; columns past N: not copied). No register is held by a pending global
  // store: a register-sourced store that waits in the memory pipe holds its registers, and the next
  // wgmma.fence waits for them (measured: the register stores cost EP8 w13 512 rows ~40%).
  __device__ __forceinline__ static void store_tile_bulk(const float (&result)[kAccRegs], uint8_t* smem_out,
                                                         uint16_t* __restrict__ out, int warpgroup, int row,
                                                         int n_base, bool row_ok) {
    uint8_t* buf = smem_out + warpgroup * 64 * kOutPitch;
    const int wg_thread = threadIdx.x % 128;
    const int lane = threadIdx.x % 32;
    const int quad_lane = lane % 4;
    const int local_row0 = (wg_thread / 32) * 16 + lane / 4;
    if (wg_thread < 64) sm90::bulk_wait_read<0>();  // the previous tile's copies have read the buffer
    sm90::named_bar_sync(3 + warpgroup, 128);
#pragma unroll
    for (int g = 0; g < kVecChunks; g += 4) {
      uint32_t v0[4], v1[4];
      pack_chunk_group(result, g, quad_lane, v0, v1);
      uint8_t* at = buf + local_row0 * kOutPitch + 16 * (g + quad_lane);
      sm90::st_shared_v4(at, v0[0], v0[1], v0[2], v0[3]);
      sm90::st_shared_v4(at + 8 * kOutPitch, v1[0], v1[1], v1[2], v1[3]);
    }
#pragma unroll
    for (int c = kVecChunks; c < kBlockN / 8; ++c) {
      uint8_t* at = buf + local_row0 * kOutPitch + 2 * (8 * c + 2 * quad_lane);
      sm90::st_shared_b32(at, sm90::pack_bf16x2(result[4 * c], result[4 * c + 1]));
      sm90::st_shared_b32(at + 8 * kOutPitch, sm90::pack_bf16x2(result[4 * c + 2], result[4 * c + 3]));
    }
    sm90::fence_proxy_async_shared();  // the writes above, before the bulk engine reads them
    sm90::named_bar_sync(3 + warpgroup, 128);
    if (wg_thread < 64) {
      if (row_ok && !(kAblate & 32)) {
        const uint32_t bytes = 2u * static_cast<uint32_t>(min(kBlockN, kN - n_base));
        sm90::bulk_store(out + static_cast<int64_t>(row) * kN + n_base, buf + wg_thread * kOutPitch, bytes);
      }
      sm90::bulk_commit();
    }
  }

  // Epilogue through a TMA tensor store (kTmaStore) when every row of this warpgroup's 64 is the
  // tile's expert's or past M (`tile.rows_ok` of all 128 threads: a warpgroup-wide vote); otherwise (a
  // tile holding padding rows, which must stay untouched) the register stores. The buffer takes
  // the map's 128-byte swizzle: 16-byte chunk c of row r at chunk c ^ (r % 8), so the 8 rows a
  // warp writes at once fall in different banks. One thread issues BLOCK_N / 64 box stores; the
  // next use of the buffer first waits until they have read it.
  __device__ __forceinline__ static void store_tile_tma(const float (&result)[kAccRegs], uint8_t* smem_out,
                                                        const sm90::TmaDescriptor* tmap_out, uint16_t* __restrict__ out,
                                                        int warpgroup, const PendingStore& tile) {
    const int wg_thread = threadIdx.x % 128;
    const int lane = threadIdx.x % 32;
    const int quad_lane = lane % 4;
    if (wg_thread == 0) sm90::bulk_wait_read<0>();  // the previous boxes have been read
    if (!sm90::named_bar_sync_and(3 + warpgroup, 128, tile.rows_ok)) {
      store_tile(result, out, tile.row0, tile.n_base, tile.store0, tile.store1, quad_lane);
      return;
    }
    uint8_t* buf = smem_out + warpgroup * 64 * kBlockN * 2;
    const int r0 = (wg_thread / 32) * 16 + lane / 4;  // this thread's rows r0 and r0 + 8 (same r % 8)
    const int sw = r0 % 8;
#pragma unroll
    for (int g = 0; g < kVecChunks; g += 4) {
      uint32_t v0[4], v1[4];
      pack_chunk_group(result, g, quad_lane, v0, v1);
      const int chunk = g + quad_lane;  // 8-column chunk of the tile
      uint8_t* at = buf + (chunk / 8) * 8192 + r0 * 128 + (((chunk % 8) ^ sw) * 16);
      sm90::st_shared_v4(at, v0[0], v0[1], v0[2], v0[3]);
      sm90::st_shared_v4(at + 8 * 128, v1[0], v1[1], v1[2], v1[3]);
    }
    sm90::fence_proxy_async_shared();  // the writes above, before the TMA engine reads them
    sm90::named_bar_sync(3 + warpgroup, 128);
    if (wg_thread == 0) {
      const int row = tile.row0 - r0;  // the warpgroup's first row (thread 0: r0 = 0)
#pragma unroll
      for (int box = 0; box < kBlockN / 64; ++box)
        if (tile.n_base + box * 64 < kN) sm90::tma_store_2d(tmap_out, buf + box * 8192, tile.n_base + box * 64, row);
      sm90::bulk_commit();
    }
  }

  // kTwoAcc: the deferred epilogue of a finished tile, through the configured path.
  __device__ __forceinline__ static void store_pending(const float (&result)[kAccRegs], uint8_t* smem_out,
                                                       const sm90::TmaDescriptor* tmap_out, uint16_t* __restrict__ out,
                                                       int warpgroup, const PendingStore& tile) {
    if constexpr (kBulkStore)
      store_tile_bulk(result, smem_out, out, warpgroup, tile.bulk_row, tile.n_base, tile.bulk_row_ok);
    else if constexpr (kTmaStore)
      store_tile_tma(result, smem_out, tmap_out, out, warpgroup, tile);
    else
      store_tile(result, out, tile.row0, tile.n_base, tile.store0, tile.store1, threadIdx.x % 4);
  }

  // Releases `stage` in every CTA of the cluster (a peer's producer may multicast into it).
  __device__ __forceinline__ static void release_stage(uint64_t* empty_bar, int stage, int lane) {
    if constexpr (kCluster == 1) {
      if (lane == 0) sm90::mbar_arrive(&empty_bar[stage]);
    } else {
      if (lane < kCluster) sm90::mbar_arrive_cluster(&empty_bar[stage], static_cast<uint32_t>(lane));
    }
  }

  // A position in the ring of stages: the stage, its barrier phase, and how many K blocks came
  // before it on this CTA (which a_scale chunk slot holds its scales).
  struct RingPos {
    int stage = 0;
    uint32_t phase = 0;
    uint32_t count = 0;
  };

  __device__ __forceinline__ static void advance(RingPos& pos) {
    ++pos.count;
    if (++pos.stage == kStages) {
      pos.stage = 0;
      pos.phase ^= 1;
    }
  }

  // This thread's two rows' a_scale for the K block at `pos` (staged by the producer's scale warp).
  __device__ __forceinline__ static void read_a_scales(const float* a_scales, const RingPos& pos, int row_in_tile,
                                                       float& sa0, float& sa1) {
    const float* slot = a_scales + ((pos.count / kScaleChunk) % kAScaleSlots) * kAScaleSlotFloats +
                        pos.count % kScaleChunk;
    sa0 = slot[row_in_tile * kAScalePitch];
    sa1 = slot[(row_in_tile + 8) * kAScalePitch];
  }

  // ---- two block accumulators (kTwoAcc) ---------------------------------------------------
  // The MMA unit is one part of a K block: kPartN of the tile's columns, 4 wgmmas, one commit
  // group. Parts narrower than the tile (kParts > 1) let tiles wider than 128 columns keep two
  // accumulators in flight: the registers hold the tile's promoted sum (BLOCK_N / 2) plus two
  // part accumulators (kPartN / 2 each) instead of three whole-tile copies.

  // What the unit-chain loop works with: shared-memory operands, this warpgroup, the token.
  struct SmemView {
    uint64_t* full_bar;
    uint64_t* empty_bar;
    const float* b_scales;  // per stage: the N tile's b_scale values
    const float* a_scales;  // a_scale chunk slots
    uint64_t desc_a0;       // stage-0 descriptors of this warpgroup's A rows and of B
    uint64_t desc_b0;
    int warpgroup;
    bool* issued_any;       // kPingPong: this warpgroup has issued (warpgroup 0's first unit waits for no token)
  };

  // Waits for the stage (first part only), issues part kP of its K block into `acc` and, on the
  // first part, reads the block's combined scales for this thread's two rows (their latency hides
  // behind the MMAs). The issue position moves on after the last part.
  template <int kP>
  __device__ __forceinline__ static void issue_part(float (&acc)[kPartRegs], float (&scale)[kTileScaleBlocks][2],
                                                    const SmemView& sv, RingPos& pos, int row_in_tile) {
    if constexpr (kP == 0) sm90::mbar_wait(&sv.full_bar[pos.stage], pos.phase);
    const uint64_t desc_a = sv.desc_a0 + static_cast<uint64_t>((pos.stage * kABytes) >> 4);
    const uint64_t desc_b = sv.desc_b0 + static_cast<uint64_t>((pos.stage * kBBytes + kP * kPartN * kBlockK) >> 4);
#pragma unroll
    for (int i = 0; i < kPartRegs; ++i) sm90::fence_operand(acc[i]);
    if constexpr (kPingPong) {
      // One unit in flight per warpgroup: the token makes the warpgroups alternate, so the
      // tensor core holds the other's unit while one waits for its own and promotes it.
      if (sv.warpgroup == 0) {
        if (*sv.issued_any) sm90::named_bar_sync(2, 256);
      } else {
        sm90::named_bar_sync(1, 256);
      }
    }
    sm90::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < (kAblate & 4 ? 0 : kBlockK / kWgmmaK); ++kk)
      PartMma::mma(acc, desc_a + 2 * kk, desc_b + 2 * kk, kk == 0 ? 0u : 1u);
    sm90::wgmma_commit();
    if constexpr (kPingPong) {
      sm90::named_bar_arrive(sv.warpgroup == 0 ? 1 : 2, 256);
      *sv.issued_any = true;
    }
#pragma unroll
    for (int i = 0; i < kPartRegs; ++i) sm90::fence_operand(acc[i]);
    if constexpr (kP == 0) {
      float sa0, sa1;
      read_a_scales(sv.a_scales, pos, row_in_tile, sa0, sa1);
      const float* sb = sv.b_scales + pos.stage * kScaleStageFloats;
#pragma unroll
      for (int j = 0; j < kTileScaleBlocks; ++j) {
        scale[j][0] = sa0 * sb[j];
        scale[j][1] = sa1 * sb[j];
      }
    }
    if constexpr (kP == kParts - 1) advance(pos);
  }

  // Promotes part kP of a completed K block (held in `acc`) into `result`; after the last part
  // the stage is released and the retire position moves on. kOff: where the tile starts inside
  // its first 128-column scale block (0, or 64 for 192-wide tiles; the K loop is compiled once per
  // value), so every 8-column chunk's scale block is a compile-time index.
  template <int kP, int kOff>
  __device__ __forceinline__ static void retire_part(float (&acc)[kPartRegs], const float (&scale)[kTileScaleBlocks][2],
                                                     float (&result)[kAccRegs], const SmemView& sv, RingPos& pos,
                                                     int lane) {
#pragma unroll
    for (int i = 0; i < kPartRegs; ++i) sm90::fence_operand(acc[i]);
    if constexpr (kP == kParts - 1) release_stage(sv.empty_bar, pos.stage, lane);
    if constexpr (kAblate & 1) {
      // Keep the MMAs (ptxas drops a wgmma whose results are never read): one element, compared.
      if (acc[0] == 1234.5f) result[0] += scale[0][0] * scale[0][1];
    }
    constexpr int kFirst = kP * kPartChunks;
    if constexpr (kAblate & 128) {
      // The promotion's FFMAs, one per accumulator element, summed into result[0..7] only (the
      // rest of the sum stays zero: no registers), so a second unit accumulator fits.
#pragma unroll
      for (int c = 0; c < kPartChunks; ++c) {
        const int block = (kOff + 8 * (kFirst + c)) / kScaleBlock;
#pragma unroll
        for (int j = 0; j < 4; ++j)
          result[(4 * c + j) % 8] = fmaf(scale[block][j / 2], acc[4 * c + j], result[(4 * c + j) % 8]);
      }
    }
#pragma unroll
    for (int c = 0; c < (kAblate & (1 | 128) ? 0 : kPartChunks); ++c) {
      const int block = (kOff + 8 * (kFirst + c)) / kScaleBlock;  // a constant once unrolled
      const float s0 = scale[block][0];
      const float s1 = scale[block][1];
      result[4 * (kFirst + c) + 0] = fmaf(s0, acc[4 * c + 0], result[4 * (kFirst + c) + 0]);
      result[4 * (kFirst + c) + 1] = fmaf(s0, acc[4 * c + 1], result[4 * (kFirst + c) + 1]);
      result[4 * (kFirst + c) + 2] = fmaf(s1, acc[4 * c + 2], result[4 * (kFirst + c) + 2]);
      result[4 * (kFirst + c) + 3] = fmaf(s1, acc[4 * c + 3], result[4 * (kFirst + c) + 3]);
    }
    if constexpr (kP == kParts - 1) advance(pos);
  }

  // Units [0, kCount) of a chain of whole K blocks (unit i = part i % kParts of the chain's K
  // block i / kParts) in straight-line code. Two units in flight (kUnitAccs = 2): even units in
  // `acc`, odd ones in `acc_odd`; unit i + 1 is issued before unit i is waited for and promoted,
  // so only the chain's last promotion leaves the tensor core to the other warpgroup. Nothing
  // stays in flight past the chain: with MMAs in flight across a loop's back edge, ptxas cannot
  // tell which group a wait_group 1 retired and serializes every wgmma (C7514). One unit in
  // flight (kUnitAccs = 1): each unit is waited for and promoted before the next is issued; the
  // other warpgroup's MMAs keep the tensor core busy meanwhile.
  template <int kOff, int kCount, int kI = 0, bool kFirstIssued = false>
  __device__ __forceinline__ static void mma_chain(float (&acc)[kPartRegs], float (&acc_odd)[kOddRegs],
                                                   float (&result)[kAccRegs], const SmemView& sv, RingPos& issue,
                                                   RingPos& retire, int row_in_tile, int lane,
                                                   float (&scales)[2][kTileScaleBlocks][2]) {
    constexpr int kBlock = kI / kParts;  // K block within the chain: its scales are scales[kBlock % 2]
    if constexpr (kUnitAccs == 1) {
      if constexpr (kI > 0 || !kFirstIssued)
        issue_part<kI % kParts>(acc, scales[kBlock % 2], sv, issue, row_in_tile);
      sm90::wgmma_wait<0>();
      retire_part<kI % kParts, kOff>(acc, scales[kBlock % 2], result, sv, retire, lane);
      if constexpr (kI + 1 < kCount)
        mma_chain<kOff, kCount, kI + 1>(acc, acc_odd, result, sv, issue, retire, row_in_tile, lane, scales);
    } else {
      float (&mine)[kPartRegs] = kI % 2 == 0 ? acc : acc_odd;
      float (&prev)[kPartRegs] = kI % 2 == 0 ? acc_odd : acc;
      if constexpr (kI > 0 || !kFirstIssued)
        issue_part<kI % kParts>(mine, scales[kBlock % 2], sv, issue, row_in_tile);
      if constexpr (kI > 0) {
        sm90::wgmma_wait<1>();  // unit kI - 1 is done; unit kI runs meanwhile
        retire_part<(kI - 1) % kParts, kOff>(prev, scales[((kI - 1) / kParts) % 2], result, sv, retire, lane);
      }
      if constexpr (kI + 1 < kCount) {
        mma_chain<kOff, kCount, kI + 1>(acc, acc_odd, result, sv, issue, retire, row_in_tile, lane, scales);
      } else {
        sm90::wgmma_wait<0>();
        retire_part<kI % kParts, kOff>(mine, scales[kBlock % 2], result, sv, retire, lane);
      }
    }
  }

  // The K loop with two accumulators after the tile's first unit was issued into `acc` (its
  // scales in scales[0]): chains of kTwoAccChain K blocks, then the remainder. `num_kb`: the
  // K blocks of this piece (kKBlocks, a constant, unless the split tail cut the unit; pieces are
  // then multiples of 8 K blocks, so of the chain).
  template <int kOff>
  __device__ __forceinline__ static void k_loop_two_acc(float (&acc)[kPartRegs], float (&acc_odd)[kOddRegs],
                                                        float (&result)[kAccRegs], const SmemView& sv, RingPos& issue,
                                                        RingPos& retire, int row_in_tile, int lane,
                                                        float (&scales)[2][kTileScaleBlocks][2], int num_kb) {
    constexpr int kChain = kTwoAccChain < kKBlocks ? kTwoAccChain : kKBlocks;
    mma_chain<kOff, kChain * kParts, 0, true>(acc, acc_odd, result, sv, issue, retire, row_in_tile, lane, scales);
#pragma unroll 1
    for (int kb = kChain; kb + kChain <= (kSplitTail ? num_kb : kKBlocks); kb += kChain)
      mma_chain<kOff, kChain * kParts>(acc, acc_odd, result, sv, issue, retire, row_in_tile, lane, scales);
    if constexpr (kKBlocks % kChain != 0)
      mma_chain<kOff, (kKBlocks % kChain) * kParts>(acc, acc_odd, result, sv, issue, retire, row_in_tile, lane,
                                                    scales);
  }

  // Split tail. Each CTA owns one workspace slot: its warpgroups' 64 x BLOCK_N fp32 sums, stored
  // in the accumulator's register order (thread t's value i at [i / 4][t], 16 bytes each), so
  // the finalizer's thread t reads back exactly the fragment its own thread t holds: no shuffles,
  // coalesced 2 KB per step. One flag per (CTA, warpgroup).
  __device__ __forceinline__ static float4* partial_slot(float* workspace, int cta, int warpgroup) {
    return reinterpret_cast<float4*>(workspace) + (cta * kNumConsumerWarpgroups + warpgroup) * (kAccRegs / 4) * 128;
  }

  __device__ __forceinline__ static void hand_over_partial(const float (&result)[kAccRegs], float* workspace,
                                                           int* flags, int warpgroup) {
    const int t = threadIdx.x % 128;
    float4* slot = partial_slot(workspace, blockIdx.x, warpgroup);
#pragma unroll
    for (int i = 0; i < kAccRegs / 4; ++i)
      slot[i * 128 + t] = make_float4(result[4 * i], result[4 * i + 1], result[4 * i + 2], result[4 * i + 3]);
    sm90::named_bar_sync(3 + warpgroup, 128);  // the warpgroup's writes, before the release
    if (t == 0) sm90::flag_set_release(&flags[blockIdx.x * kNumConsumerWarpgroups + warpgroup]);
    // Reconverge after the lane-0 branch: without it ptxas could not prove the warp converged for
    // the rest of the tile loop and moved every wgmma descriptor through vector registers (R2UR
    // before each wgmma, 10-25% slower; the compile test checks there is none).
    __syncwarp();
  }

  // Adds the partial sums of the `others` workers after this one (same cluster rank) into `result`.
  __device__ __forceinline__ static void take_partials(float (&result)[kAccRegs], float* workspace, int* flags,
                                                       int warpgroup, int others) {
    const int t = threadIdx.x % 128;
    const int cta0 = static_cast<int>(blockIdx.x);
    if (t == 0) {
      for (int j = 1; j <= others; ++j)
        sm90::flag_wait_acquire_and_clear(&flags[(cta0 + j * kCluster) * kNumConsumerWarpgroups + warpgroup]);
    }
    __syncwarp();  // reconverge after the lane-0 loop (see hand_over_partial)
    sm90::named_bar_sync(3 + warpgroup, 128);  // thread 0's acquire, before the warpgroup reads
    for (int j = 1; j <= others; ++j) {
      const float4* slot = partial_slot(workspace, cta0 + j * kCluster, warpgroup);
#pragma unroll
      for (int i = 0; i < kAccRegs / 4; ++i) {
        const float4 v = __ldcg(&slot[i * 128 + t]);
        result[4 * i] += v.x;
        result[4 * i + 1] += v.y;
        result[4 * i + 2] += v.z;
        result[4 * i + 3] += v.w;
      }
    }
  }

  __device__ __forceinline__ static void run(const sm90::TmaDescriptor& tmap_a, const sm90::TmaDescriptor& tmap_b,
                                             const sm90::TmaDescriptor& tmap_out,
                                             const float* __restrict__ a_scale, const float* __restrict__ b_scale,
                                             const int32_t* __restrict__ row_ids, uint16_t* __restrict__ out,
                                             int m, float* __restrict__ workspace, int* __restrict__ flags) {
    const RowIds<kMaskedMaxM> expert_ids{row_ids};
    extern __shared__ uint8_t smem_raw[];
    // Aligned as an offset from the __shared__ array (not by casting a generic pointer to an
    // integer): the compiler keeps every derived address in the shared window, instead of
    // rebuilding the generic address (SR_CgaCtaId, SR_SWINHI) and converting back per K block.
    const uint32_t raw_addr = sm90::smem_addr(smem_raw);
    uint8_t* smem = smem_raw + (((raw_addr + 1023u) & ~1023u) - raw_addr);
    uint8_t* smem_a = smem;                       // kStages x [128 x 128] e4m3
    uint8_t* smem_b = smem + kStages * kABytes;   // kStages x [BLOCK_N x 128] e4m3
    uint8_t* smem_out = smem + kStages * kStageBytes;                     // kOutBytes (bulk-store epilogue)
    float* smem_a_scales = reinterpret_cast<float*>(smem_out + kOutBytes);  // kAScaleSlots x [128 x kAScalePitch]
    float* smem_scales = smem_a_scales + kAScaleArea / sizeof(float);        // kStages x kScaleStageFloats (b_scale)
    uint64_t* full_bar = reinterpret_cast<uint64_t*>(smem_out + kOutBytes + kAScaleArea + kStages * kScaleStageBytes);
    uint64_t* empty_bar = full_bar + kStages;

    // Broadcast from lane 0: the compiler then knows the index is warp-uniform and keeps what
    // derives from it (the consumers' A descriptors, barrier ids) in uniform registers instead
    // of rebuilding 64-bit descriptors in vector registers and moving them over every K block.
    const int warpgroup = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x / 128), 0);
    const int lane = threadIdx.x % 32;
    const uint32_t rank = kCluster == 1 ? 0u : sm90::cluster_ctarank();

    if (threadIdx.x == 0) {
      for (int s = 0; s < kStages; ++s) {
        sm90::mbar_init(&full_bar[s], kFullArrivals);                              // producer warps
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
      // Two producer warps walk the same tiles through the ring: lane 0 of the first issues the
      // TMA loads of the A and B tiles; the second stages the stage's scales with cp.async (each
      // lane 4 of the tile's 128 a_scale values, lanes < kScaleSpan one b_scale each). All of it
      // completes on the stage's `full` barrier, so the consumers read their scales from shared
      // memory: no global addresses or load latency in their K loop. A warp of its own for the
      // scales keeps the TMA issue from queueing behind the cp.asyncs when the memory pipe is
      // busy with the epilogue's stores.
      const int producer_warp = threadIdx.x / 32 - kNumConsumerWarpgroups * 4;
      // Calls fill(role, kb, pos) for every K block of this CTA's live tiles once its stage is free.
      auto for_each_stage = [&](auto&& fill) {
        Scheduler sched(m);
        RingPos pos;
        int m_unit, n_unit;
        TilePiece piece;
        while (sched.next_tile(m_unit, n_unit, piece)) {
          bool live_pair;
          const TileRole role = tile_role<kCluster, kMcastA, Scheduler::kNumNTiles>(
              load_tile_ids<kCluster, kMcastA>(expert_ids, m, m_unit), m_unit, n_unit, rank, live_pair);
          if (!live_pair) {
            sched.skip_dead_rest(m_unit);
            continue;
          }
          const int kb_end = kSplitTail ? piece.kb_begin + piece.kb_count : kKBlocks;
#pragma unroll 1
          for (int kb = kSplitTail ? piece.kb_begin : 0; kb < kb_end; ++kb) {
            sm90::mbar_wait(&empty_bar[pos.stage], pos.phase ^ 1);
            fill(role, kb, pos);
            advance(pos);
          }
        }
      };
      if (producer_warp == 0 && lane == 0) {
        sm90::tma_prefetch_descriptor(&tmap_a);
        sm90::tma_prefetch_descriptor(&tmap_b);
        for_each_stage([&](const TileRole& role, int kb, const RingPos& pos) {
          const int stage = pos.stage;
          if (kAblate & 16) {
            sm90::mbar_arrive(&full_bar[stage]);
            return;
          }
          const int m_tile = role.m_tile;
          const int n_tile = role.n_tile;
          // Out-of-bounds box elements (rows past M, columns past N) are zero-filled and still
          // counted in the transaction bytes.
          const bool skip_a = (kAblate & 64) && (kb & 1);
          sm90::mbar_arrive_expect_tx(&full_bar[stage], skip_a ? kStageBytes - kABytes : kStageBytes);
          if (!skip_a) {
            if constexpr (kMcastA) {
              // This CTA's half of the A tile, into both CTAs; its own whole B tile.
              sm90::tma_load_2d_multicast(smem_a + stage * kABytes + rank * kALoadBytes, &tmap_a, &full_bar[stage],
                                          kb * kBlockK, m_tile * kBlockM + static_cast<int>(rank) * kARowsPerLoad,
                                          static_cast<uint16_t>((1u << kCluster) - 1));
            } else {
              sm90::tma_load_2d(smem_a + stage * kABytes, &tmap_a, &full_bar[stage], kb * kBlockK, m_tile * kBlockM);
            }
          }
          if constexpr (kCluster == 1 || kMcastA) {
            sm90::tma_load_3d(smem_b + stage * kBBytes, &tmap_b, &full_bar[stage], kb * kBlockK, n_tile * kBlockN,
                              role.expert);
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
        });
      } else if (producer_warp == 1) {
        for_each_stage([&](const TileRole& role, int kb, const RingPos& pos) {
          const int stage = pos.stage;
          if (kAblate & 8) {
            sm90::cp_async_mbar_arrive_noinc(&full_bar[stage]);
            return;
          }
          if (kb % kScaleChunk == 0) {
            // The next kScaleChunk K blocks' a_scale of the tile's rows, lane + 32 i (rows past M
            // are zero-filled and read from a valid address; their products are never stored).
            float* slot = smem_a_scales + ((pos.count / kScaleChunk) % kAScaleSlots) * kAScaleSlotFloats;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int row = role.m_tile * kBlockM + lane + 32 * i;
              const float* src = a_scale + static_cast<int64_t>(row < m ? row : 0) * kKBlocks + kb;
              float* dst = slot + (lane + 32 * i) * kAScalePitch;
              if constexpr (kScaleChunk >= 4) {
#pragma unroll
                for (int c = 0; c < kScaleChunk / 4; ++c) sm90::cp_async_16(dst + 4 * c, src + 4 * c, row < m ? 16u : 0u);
              } else {
#pragma unroll
                for (int c = 0; c < kScaleChunk; ++c) sm90::cp_async_4(dst + c, src + c, row < m ? 4u : 0u);
              }
            }
          }
          if (lane < kScaleSpan) {
            const int block = min(role.n_tile * kBlockN / kScaleBlock + lane, kNScaleBlocks - 1);
            sm90::cp_async_4(smem_scales + stage * kScaleStageFloats + lane,
                             b_scale + (static_cast<int64_t>(role.expert) * kNScaleBlocks + block) * kKBlocks + kb, 4u);
          }
          sm90::cp_async_mbar_arrive_noinc(&full_bar[stage]);
        });
      }
    } else {
      // ------------------------------- consumers ------------------------------------------
      sm90::setmaxnreg_inc<kConsumerRegs>();
      const int warp_in_wg = (threadIdx.x / 32) % 4;
      // This thread's two accumulator rows within the 128-row tile (wgmma D layout).
      const int row_in_tile = warpgroup * 64 + warp_in_wg * 16 + lane / 4;
      const int quad_lane = lane % 4;

      // Stage-0 shared-memory descriptors of this warpgroup's A rows and of B (loop-invariant).
      const uint64_t desc_a0 = sm90::smem_desc_kmajor_sw128(smem_a + warpgroup * 64 * kBlockK);
      const uint64_t desc_b0 = sm90::smem_desc_kmajor_sw128(smem_b);
      float acc[kTwoAcc ? kPartRegs : kAccRegs];  // one K block (kTwoAcc: the even units), unscaled
      float acc_odd[kTwoAcc ? kOddRegs : 1];      // kTwoAcc: the odd units
      float result[kAccRegs];  // promoted fp32 sum over K blocks
#pragma unroll
      for (int i = 0; i < (kTwoAcc ? kPartRegs : kAccRegs); ++i) acc[i] = 0.f;

      Scheduler sched(m);
      RingPos pos;  // the K block to retire next (one-accumulator loop: the K block in hand)
      bool issued_any = false;  // ping-pong: warpgroup 0's first K block waits for no token
      const SmemView sv{full_bar, empty_bar, smem_scales, smem_a_scales, desc_a0, desc_b0, warpgroup, &issued_any};
      PendingStore prev{0, 0, false, false, false};  // kTwoAcc: the tile whose epilogue is deferred
      // Same walk as the producer's, written out again on purpose: a shared "next live tile"
      // helper carrying TileRole across iterations made ptxas spill at BLOCK_N = 192. The next
      // unit's expert ids are loaded a tile ahead (load_tile_ids).
      int next_m_unit, next_n_unit;
      TilePiece next_piece;
      bool more = sched.next_tile(next_m_unit, next_n_unit, next_piece);
      // 0 (m >= 0), from the thread index: neither provably 0 nor provably warp-uniform.
      const int zero = static_cast<int>(threadIdx.x) & (m >> 31);
      TileIds next_ids{-1, -1};
      if (more) next_ids = load_tile_ids<kCluster, kMcastA>(expert_ids, m, next_m_unit, zero);
      while (more) {
        const int m_unit = next_m_unit;
        const int n_unit = next_n_unit;
        const TilePiece piece = next_piece;
        // Broadcast here, a tile after the load: the ids become warp-uniform only now.
        const TileIds ids{__shfl_sync(0xffffffffu, next_ids.e0, 0), __shfl_sync(0xffffffffu, next_ids.e1, 0)};
        more = sched.next_tile(next_m_unit, next_n_unit, next_piece);
        if (more) next_ids = load_tile_ids<kCluster, kMcastA>(expert_ids, m, next_m_unit, zero);
        bool live_pair;
        const TileRole role = tile_role<kCluster, kMcastA, Scheduler::kNumNTiles>(ids, m_unit, n_unit, rank,
                                                                                  live_pair);
        if (!live_pair) {
          // The unit fetched ahead lies before the jump: it is dead as well, or in the next expert.
          sched.skip_dead_rest(m_unit);
          continue;
        }
        const int expert = role.expert;
        // Rows this CTA stores (a dead B-shared tile computes on its partner's rows: the guards
        // below read its own rows' ids, so nothing is stored).
        const int m_tile = kMcastA ? role.m_tile : m_unit * kCluster + static_cast<int>(rank);
        const int n_tile = role.n_tile;

        const int row0 = m_tile * kBlockM + row_in_tile;
        const int row1 = row0 + 8;
        const int n_base = n_tile * kBlockN;
        const int n_offset = n_base % kScaleBlock;  // 0 when kScaleAligned
        // The epilogue's row guards, loaded now: their latency hides behind the K loop.
        const int id0 = row0 < m ? expert_ids(row0) : -1;
        const int id1 = row1 < m ? expert_ids(row1) : -1;
        // kBulkStore: thread t < 64 of the warpgroup copies the tile's row warpgroup * 64 + t.
        const int bulk_row = m_tile * kBlockM + warpgroup * 64 + static_cast<int>(threadIdx.x % 128);
        const int bulk_id = kBulkStore && threadIdx.x % 128 < 64 && bulk_row < m ? expert_ids(bulk_row) : -1;
#ifdef PHASEMOE_DEBUG
        // A row of another expert inside the tile means a segment did not start on a 128-row
        // boundary: the layout broke the precondition and that row would silently stay unwritten.
        if (role.live && ((id0 >= 0 && id0 != expert) || (id1 >= 0 && id1 != expert))) {
          printf("phasemoe: expert segment not 128-row aligned near row %d (tile expert %d)\n", row0, expert);
          __trap();
        }
#endif

        if constexpr (kTwoAcc) {
          // This tile's K block 0 is issued first, then the previous tile's epilogue runs while it
          // computes (the tensor core is not left idle for the stores), then the rest of the K loop.
          RingPos issue = pos;
          float scales[2][kTileScaleBlocks][2];  // combined row scales of the K blocks in flight
          issue_part<0>(acc, scales[0], sv, issue, row_in_tile);
          if (prev.valid) store_pending(result, smem_out, &tmap_out, out, warpgroup, prev);
#pragma unroll
          for (int i = 0; i < kAccRegs; ++i) result[i] = 0.f;
          // Compiled once per column offset of the tile inside its scale block (192: 0 or 64).
          auto k_loop = [&](auto off_c) {
            k_loop_two_acc<decltype(off_c)::value>(acc, acc_odd, result, sv, issue, pos, row_in_tile, lane, scales,
                                                   piece.kb_count);
          };
          if constexpr (kScaleAligned) {
            k_loop(IntC<0>{});
          } else {
            dispatch_offset<0, kNumOffsets, kOffQuantum>(n_offset / kOffQuantum, k_loop);
          }
          if constexpr (kSplitTail) {
            if (piece.kind == TilePiece::kContributor) {
              hand_over_partial(result, workspace, flags, warpgroup);
              prev.valid = false;  // nothing to store: the unit's finalizer stores it
              continue;
            }
            if (piece.kind == TilePiece::kFinalizer) take_partials(result, workspace, flags, warpgroup, piece.others);
          }
          prev = PendingStore{row0, n_base, role.live && id0 == expert, role.live && id1 == expert, true, bulk_row,
                              role.live && bulk_id == expert,
                              role.live && (id0 == expert || row0 >= m) && (id1 == expert || row1 >= m)};
        } else {
#pragma unroll
        for (int i = 0; i < kAccRegs; ++i) result[i] = 0.f;

        // The K loop, instantiated per column offset of the tile inside its first scale block
        // (kOff): aligned tiles have one (0); 192/160/96 have 2-4, each compiled with
        // compile-time scale indices (no per-chunk selects in the promotion); the others
        // (80/112/144/176: up to 8 offsets) pass kOff = -1 and select at run time.
        auto k_loop = [&](auto off_c) {
          constexpr int kOff = decltype(off_c)::value;
#pragma unroll kKLoopUnroll
          for (int kb = 0; kb < kKBlocks; ++kb) {
            const int stage = pos.stage;
            sm90::mbar_wait(&full_bar[stage], pos.phase);
            // The stage's scales (staged by a producer warp; shared-memory latency hides behind
            // the MMAs: the products are used only after the wgmma wait).
            float sa0, sa1;
            read_a_scales(smem_a_scales, pos, row_in_tile, sa0, sa1);
            const float* stage_scales = smem_scales + stage * kScaleStageFloats;
            float sb[kScaleSpan];
#pragma unroll
            for (int j = 0; j < kScaleSpan; ++j) sb[j] = stage_scales[j];
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
            // The stage's bytes are consumed once this warp's MMAs completed and its scale loads
            // returned (the arrive releases both): hand it back (in every CTA of the cluster: a
            // peer's producer may multicast into this stage).
            release_stage(empty_bar, stage, lane);
            advance(pos);

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
          }
        };
        if constexpr (kScaleAligned) {
          k_loop(IntC<0>{});
        } else if constexpr (kSplitOffsets) {
          dispatch_offset<0, kNumOffsets, kOffQuantum>(n_offset / kOffQuantum, k_loop);
        } else {
          k_loop(IntC<-1>{});
        }

        if constexpr (kBulkStore) {
          // The copies run while the next tile computes.
          store_tile_bulk(result, smem_out, out, warpgroup, bulk_row, n_base, role.live && bulk_id == expert);
        } else {
          const bool store0 = role.live && id0 == expert;
          const bool store1 = role.live && id1 == expert;
          store_tile(result, out, row0, n_base, store0, store1, quad_lane);
        }
        }
      }
      if constexpr (kTwoAcc) {
        if (prev.valid) store_pending(result, smem_out, &tmap_out, out, warpgroup, prev);
      }
      // The last bulk stores complete before the CTA (and its shared memory) goes away.
      if constexpr (kBulkStore) {
        if (threadIdx.x % 128 < 64) sm90::bulk_wait<0>();
      }
      if constexpr (kTmaStore) {
        if (threadIdx.x % 128 == 0) sm90::bulk_wait<0>();  // the last boxes are written before the CTA exits
      }
      // Consume warpgroup 1's last token so no barrier arrival is left pending at exit.
      if constexpr (kPingPong) {
        if (warpgroup == 0 && issued_any) sm90::named_bar_sync(2, 256);
      }
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
