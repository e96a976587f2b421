// Compile-time shape of one grouped-GEMM kernel: the block shape, the thread roles, the MMA
// unit and the shared-memory layout that producer, mainloop and epilogue agree on. Only N, K and
// the tiling are compile-time; M (the row count) stays a runtime argument.
#pragma once
#include <cstdint>

namespace phasemoe {

constexpr int kBlockM = 128;  // 2 consumer warpgroups x 64 rows (wgmma M)
constexpr int kBlockK = 128;  // = the scale block: one promotion per stage
constexpr int kWgmmaK = 32;   // K of one fp8 wgmma
constexpr int kNumConsumerWarpgroups = 2;
constexpr int kNumThreads = 128 * (kNumConsumerWarpgroups + 1);
constexpr int kScaleBlock = 128;
// Register split after setmaxnreg: 2 x 128 x 232 + 128 x 40 = 64512 <= 65536.
constexpr int kConsumerRegs = 232;
constexpr int kProducerRegs = 40;

// kMcastA = 0 with kCluster = 2: pairs of M tiles share B; kMcastA = 1: pairs of N tiles share A;
// kMcastA = 2 (masked layout): per unit, either (scheduler.cuh, MixedUnits), both operands then
// loaded in half-height boxes.
// kMaskedMaxM > 0: the masked layout [E, kMaskedMaxM, K] read as a contiguous one.
// kGatherA = 1: A's rows are token rows read through a per-row index (`a_rows`), copied by the
// producer's warps 2 and 3 (cp.async) instead of one TMA box.
// kSiluQuant > 0 (GEMM1 of the SwiGLU MLP, N = 2I: gate rows, then up rows): N tile j holds gate
// block j and up block j (128 rows each), and the epilogue stores FP8 silu(gate) * up with one
// scale per row (1 x 128 group j) instead of the bf16 tile; 2: the scales rounded up to powers
// of two (UE8M0).
// kDirectRows = 1 (GEMM2 of an expert-parallel slice): a row whose token has no other local slot
// is stored weighted, bf16(w * bf16(sum)) as the combine computes it, into the token's row of the
// layer's output instead of its own row of `out`; the combine then skips that token. Per layout
// row, the destination token (-1: through the combine) and the weight come precomputed as an int32
// pair (kernels/direct_rows.py); the scale warp stages a tile's 128 pairs in shared memory with
// its first K block, in one of two slots by tile parity.
// kStreamK = 1: the units of a last part-full
// wave are dealt as a pool of K chunks (scheduler.cuh, StreamKPool), cut units finished from
// partial sums in a workspace (stream_k.cuh).
// kARegs = 1 (256-wide tiles): a K block's A fragments are read from shared memory once
// (ldmatrix) into registers and both 128-wide parts' wgmmas take A from there, where A from
// shared memory is read by each part's wgmmas again.
template <int kN_, int kK_, int kBlockN_, int kStages_, int kGroupM_, int kCluster_, int kMcastA_, int kMaskedMaxM_,
          int kGatherA_ = 0, int kSiluQuant_ = 0, int kDirectRows_ = 0, int kStreamK_ = 0, int kARegs_ = 0>
struct KernelTraits {
  static constexpr int kN = kN_;
  static constexpr int kK = kK_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStages = kStages_;
  static constexpr int kGroupM = kGroupM_;
  static constexpr int kCluster = kCluster_;
  static constexpr int kMcastA = kMcastA_;
  static constexpr int kMaskedMaxM = kMaskedMaxM_;
  static constexpr int kGatherA = kGatherA_;
  static constexpr int kSiluQuant = kSiluQuant_;
  static constexpr int kDirectRows = kDirectRows_;
  static constexpr int kStreamK = kStreamK_;
  static constexpr int kARegs = kARegs_;

  static_assert(kK % kBlockK == 0, "K must be a multiple of 128");
  static_assert(kBlockN == 64 || kBlockN == 128 || kBlockN == 192 || kBlockN == 256, "BLOCK_N: 64, 128, 192 or 256");
  static_assert(kStages >= 2, "need at least two pipeline stages");
  static_assert(kCluster == 1 || kCluster == 2, "clusters of 1 or 2 CTAs");
  static_assert(kMcastA == 0 || kCluster == 2, "A multicast needs a cluster of 2");
  static_assert(kMcastA <= 1 || (kMcastA == 2 && kMaskedMaxM > 0 && kGroupM == 1),
                "mixed pairs: masked layout, one M unit per group");
  static_assert(kMaskedMaxM % kBlockM == 0, "masked layout: max_m must be a multiple of the 128-row tile");
  static_assert(kGatherA == 0 || (kMcastA == 0 && kMaskedMaxM == 0),
                "gathered A rows: contiguous layout, A not shared by a CTA pair");
  static_assert(kSiluQuant == 0 || (kBlockN == 256 && kMcastA == 0 && kMaskedMaxM == 0 && kN % 256 == 0),
                "SiLU*up quant epilogue: contiguous layout, 256-wide tiles of gate and up, B not shared as A");

  static constexpr int kKBlocks = kK / kBlockK;
  // A slot is rewritten at the first K block of the tile two later, once the consumers released
  // the stage kStages K blocks before it: in the tile between, after they stored from the slot.
  static_assert(kDirectRows == 0 ||
                    (kSiluQuant == 0 && kMaskedMaxM == 0 && kN % 8 == 0 && kBlockN % 32 == 0 && kKBlocks >= kStages),
                "direct rows: contiguous bf16 output in whole vector chunks, at least kStages K blocks per tile");
  static constexpr int kNScaleBlocks = (kN + kScaleBlock - 1) / kScaleBlock;
  static constexpr uint32_t kABytes = kBlockM * kBlockK;  // fp8
  static constexpr uint32_t kBBytes = kBlockN * kBlockK;
  // Box heights of the tensor maps: the shared operand is loaded in kCluster parts, one per CTA.
  static constexpr int kARowsPerLoad = kMcastA ? kBlockM / kCluster : kBlockM;
  static constexpr uint32_t kALoadBytes = kARowsPerLoad * kBlockK;
  static constexpr int kBRowsPerLoad = kSiluQuant ? kBlockN / 2 : kMcastA == 1 ? kBlockN : kBlockN / kCluster;
  // B loads per stage when no multicast applies (kSiluQuant: the gate half and the up half).
  static constexpr int kBLoads = kBlockN / kBRowsPerLoad;
  // kSiluQuant: columns of the activation (I = N / 2) and its 1 x 128 groups per row.
  static constexpr int kActCols = kN / 2;
  static constexpr int kActGroups = kActCols / kScaleBlock;
  static constexpr uint32_t kBLoadBytes = kBRowsPerLoad * kBlockK;
  static constexpr uint32_t kStageBytes = kABytes + kBBytes;
  static constexpr int kAccRegs = kBlockN / 2;  // fp32 per thread for a 64 x BLOCK_N tile
  // The tile's columns in bands that each lie in one scale block, so each 8-column chunk's band is
  // a compile-time index: whole scale blocks where tiles start on one (BLOCK_N divides 128 or is
  // a multiple of it); 64-column bands for 192-wide tiles, which start on a scale block or 64
  // columns into one (the producer stages each band's b_scale, so the consumers never ask which).
  static constexpr int kScaleBandCols = kBlockN % kScaleBlock == 0 || kScaleBlock % kBlockN == 0 ? kScaleBlock : 64;
  static constexpr int kScaleBands = (kBlockN + kScaleBandCols - 1) / kScaleBandCols;

  // The MMA unit: one part of a K block, 4 wgmmas into its own accumulator, then promoted into
  // the tile's fp32 sum. Promoted sum + unit accumulators must fit 192 of the 232 registers: 64
  // and 128 run whole with two units in flight (the next issued before the last is promoted);
  // 192 runs whole and 256 as two 128-wide parts, each with one in flight (the other warpgroup
  // fills the gap).
  static constexpr int kPartN = kBlockN == 256 ? 128 : kBlockN;
  static constexpr int kParts = kBlockN / kPartN;
  static constexpr int kPartRegs = kPartN / 2;
  static constexpr int kPartChunks = kPartN / 8;
  static constexpr int kUnitsInFlight = kParts == 1 && kBlockN <= 128 ? 2 : 1;
  static constexpr int kOddRegs = kUnitsInFlight == 2 ? kPartRegs : 1;  // the second unit accumulator
  static_assert(kBlockN / 2 + kUnitsInFlight * kPartN / 2 <= 192,
                "promoted sum + unit accumulators exceed 192 registers");
  // K blocks per straight-line chain of the K loop (nothing in flight across its back edge).
  static constexpr int kChainKBlocks = kParts == 1 ? 4 : 2;
  static constexpr int kLoopChain = kChainKBlocks < kKBlocks ? kChainKBlocks : kKBlocks;  // a tile's chains
  // kARegs: a K block's A fragments per thread, 4 k32 steps x 4 registers, held from the first
  // part's issue to the last part's wait.
  static_assert(kARegs == 0 || (kParts == 2 && kUnitsInFlight == 1),
                "A fragments in registers: 256-wide tiles (two parts sharing them)");
  static constexpr int kAFragRegs = kARegs ? (kBlockK / kWgmmaK) * 4 : 1;

  // Epilogue: groups of 4 8-column chunks are transposed inside each lane quad so every lane
  // stores 16 contiguous bytes (full 32-byte sectors); needs N % 8 == 0 (16-byte row pitch).
  static constexpr int kVecChunks = (kN % 8 == 0) ? (kBlockN / 8) / 4 * 4 : 0;

  // Each stage's b_scale values (one per scale band of the N tile), staged by a producer warp next
  // to the tiles, padded to 16 bytes.
  static constexpr uint32_t kScaleStageFloats = 4;
  static constexpr uint32_t kScaleStageBytes = kScaleStageFloats * sizeof(float);
  static_assert(kScaleBands <= kScaleStageFloats, "a stage stages at most 4 b_scale values");
  // a_scale is staged in chunks of kScaleChunk K blocks: each of the tile's 128 rows copies
  // kScaleChunk consecutive floats (one 32-byte sector for 8) once per chunk; one K block at a
  // time would read 8x the L2 sectors. Chunks divide the tile's K blocks, so never cross a tile.
  static constexpr int kScaleChunk = kKBlocks % 8 == 0 ? 8 : kKBlocks % 4 == 0 ? 4 : kKBlocks % 2 == 0 ? 2 : 1;
  // Stream-K cuts units at a_scale chunks (a cut starts a chunk, so the scale warp stages it) and
  // needs each piece to be whole K-loop chains (gathered rows are looked up at a piece's start).
  // Direct rows: a slot is rewritten two stored pieces later, which needs every piece (a chunk at
  // least) to span as many K blocks as stages, as whole tiles do.
  static_assert(kStreamK == 0 || (kScaleChunk % kLoopChain == 0 && (kDirectRows == 0 || kScaleChunk >= kStages)),
                "stream-K: a_scale chunks of whole K-loop chains (and of kStages K blocks with direct rows)");

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
  // Ring of stages, then the a_scale slots, the b_scale slots and the barriers; +1024 to align
  // the ring (128-byte swizzle atoms are 1024 bytes: the descriptors assume 1024-aligned tiles).
  // kDirectRows: two slots, each a tile's 128 (destination token, weight bits) int32 pairs.
  static constexpr int kDirectSlotWords = 2 * kBlockM;
  static constexpr uint32_t kDirectArea = kDirectRows ? 2 * kDirectSlotWords * sizeof(int32_t) : 0;
  static constexpr uint32_t kSmemBytes =
      kStages * (kStageBytes + kScaleStageBytes) + kAScaleArea + 2 * kStages * sizeof(uint64_t) + kDirectArea + 1024;
  // `full` completes on the TMA lane's expect_tx arrival plus one cp.async arrival per lane of
  // the scale warp (and of the two A-row warps when A is gathered).
  static constexpr int kGatherThreads = 64;
  static constexpr uint32_t kFullArrivals = 1 + 32 + (kGatherA ? kGatherThreads : 0);
  // Bytes the TMA loads of a stage deliver (gathered A rows come by cp.async).
  static constexpr uint32_t kTmaStageBytes = kGatherA ? kBBytes : kStageBytes;
  static_assert(kABytes % 1024 == 0 && kBBytes % 1024 == 0 && kBLoadBytes % 1024 == 0 && kALoadBytes % 1024 == 0,
                "stage tiles must keep 1024-byte alignment");
  static_assert(kSmemBytes <= 232448, "exceeds the 227 KB of shared memory a Hopper block can opt into");
};

}  // namespace phasemoe
