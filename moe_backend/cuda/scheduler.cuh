// Tile scheduling of the persistent grouped GEMM: which units (tiles, or pairs of tiles for a
// cluster of 2) a CTA walks, in which order, which expert each belongs to, and the masked
// layout's walk over live tiles only. Producer and consumers walk the same sequence, so no tile
// list is exchanged between them.
#pragma once
#include <cstdint>

#include "kernel_traits.cuh"

namespace phasemoe {

// Experts the masked layout's dense walk can index (LiveTiles' table: 4 KB of shared memory).
constexpr int kMaxMaskedExperts = 1024;

// Whether a masked kernel walks a dense list of its live units (LiveTiles) instead of the whole
// [E * max_m / 128] tile space: configs whose units are not grouped, numbered M-unit-major.
template <int kGroupUnits, int kCluster, int kMcastA, int kMaskedMaxM>
constexpr bool kDenseMaskedWalk = kMaskedMaxM > 0 && kGroupUnits == 1;

// The dense walk of pairs of M tiles (B shared): a unit pairs live tiles 2i and 2i + 1 of the list
// of live tiles, which may lie in two experts (then each CTA loads its own B, as on the contiguous
// layout), so that no CTA idles beside an expert's odd last tile. Its M unit packs the two tiles'
// indices in the [E * max_m / 128] tile space (PairedTiles).
template <int kGroupUnits, int kCluster, int kMcastA, int kMaskedMaxM>
constexpr bool kPairedLiveWalk =
    kDenseMaskedWalk<kGroupUnits, kCluster, kMcastA, kMaskedMaxM> && kCluster == 2 && kMcastA == 0;

// The dense walk of mixed pairs (kMcastA = 2, MixedUnits): per expert, pairs of its live M tiles
// sharing B, and its odd last tile as pairs of N tiles sharing A; a pair never spans two experts.
template <int kGroupUnits, int kCluster, int kMcastA, int kMaskedMaxM>
constexpr bool kMixedLiveWalk =
    kDenseMaskedWalk<kGroupUnits, kCluster, kMcastA, kMaskedMaxM> && kCluster == 2 && kMcastA == 2;

// Two M tiles in one int: the first in the low 16 bits, the second + 1 above them (0: no second
// tile, the list's odd last one). The host keeps E * max_m / 128 below 2^16 (launch.py). Host and
// device: tests/cuda/paired_live_walk_check.cu walks it on the CPU.
struct PairedTiles {
  __host__ __device__ __forceinline__ static int pack(int first, int second) {
    return static_cast<int>(static_cast<uint32_t>(first) | (static_cast<uint32_t>(second + 1) << 16));
  }
  __host__ __device__ __forceinline__ static int first(int unit) {
    return static_cast<int>(static_cast<uint32_t>(unit) & 0xffffu);
  }
  __host__ __device__ __forceinline__ static int second(int unit) {
    return static_cast<int>(static_cast<uint32_t>(unit) >> 16) - 1;
  }

  // Live tile l of the list (prefix: LiveTiles' table) -> its M tile in the [E * max_m / 128]
  // space. `expert` only moves forward: a walker's l never decreases.
  __host__ __device__ __forceinline__ static int live_tile(const int* prefix, int& expert, int l,
                                                           int tiles_per_expert) {
    while (prefix[expert + 1] <= l) ++expert;
    return expert * tiles_per_expert + (l - prefix[expert]);
  }

  // Pair p of the list (its live tiles 2p and 2p + 1 of live_tiles), packed.
  __host__ __device__ __forceinline__ static int pair(const int* prefix, int& expert, int p, int live_tiles,
                                                      int tiles_per_expert) {
    const int first = live_tile(prefix, expert, 2 * p, tiles_per_expert);
    return pack(first, 2 * p + 1 < live_tiles ? live_tile(prefix, expert, 2 * p + 1, tiles_per_expert) : -1);
  }
};

// The units of the mixed walk (kMixedLiveWalk), expert by expert: an expert with t live M tiles
// has t / 2 pairs of M tiles, each at every N tile (B shared: the pair reads each B tile once),
// then, for odd t, its last tile at every pair of N tiles (A shared). A hot expert's weights are
// read once per two of its M tiles; an expert of one tile still shares its A. M units are packed as
// PairedTiles (second -1: a unit of N-tile pairs). Host and device: tests/cuda/paired_live_walk_check.cu.
template <int kNumNTiles>
struct MixedUnits {
  static_assert(kNumNTiles >= 2, "mixed pairs: an A-shared unit's N tile pair must fit");
  static constexpr int kNPairs = (kNumNTiles + 1) / 2;

  __host__ __device__ __forceinline__ static int units(int tiles) {
    return tiles / 2 * kNumNTiles + (tiles & 1) * kNPairs;
  }

  // Unit t of the walk (prefix: units before each expert, LiveMixedUnits' table) ->
  // its packed M unit and its N unit (an N tile, or a pair of N tiles when A is shared). `expert`
  // only moves forward: a walker's t never decreases.
  __host__ __device__ __forceinline__ static void coords(const int* prefix, int& expert, int t, int tiles_per_expert,
                                                         int& m_unit, int& n_unit) {
    while (prefix[expert + 1] <= t) ++expert;
    const int u = t - prefix[expert];
    // Units of N-tile pairs are fewer than kNumNTiles, so the quotient counts the M-tile pairs.
    const int pairs = (prefix[expert + 1] - prefix[expert]) / kNumNTiles;
    const int first = expert * tiles_per_expert;
    if (u < pairs * kNumNTiles) {
      const int p = u / kNumNTiles;
      n_unit = u - p * kNumNTiles;
      m_unit = PairedTiles::pack(first + 2 * p, first + 2 * p + 1);
    } else {
      n_unit = u - pairs * kNumNTiles;
      m_unit = PairedTiles::pack(first + 2 * pairs, -1);
    }
  }

  // The tile CTA `rank` of the pair computes for unit (m_unit, n_unit); false: an N tile past N
  // (odd kNumNTiles, the last pair's second), which computes on its partner's B and stores nothing.
  __host__ __device__ __forceinline__ static bool tile(int m_unit, int n_unit, int rank, int& m_tile, int& n_tile) {
    const int second = PairedTiles::second(m_unit);
    if (second < 0) {
      m_tile = PairedTiles::first(m_unit);
      n_tile = 2 * n_unit + rank;
      const bool inside = n_tile < kNumNTiles;
      if (!inside) n_tile = kNumNTiles - 1;
      return inside;
    }
    m_tile = rank == 0 ? PairedTiles::first(m_unit) : second;
    n_tile = n_unit;
    return true;
  }
};

// prefix[1..E] (each expert's count) -> inclusive sums, prefix[0] = 0, by the whole CTA: one warp
// scans 32 experts at a time (the caller wrote the counts; the sync publishes them).
__device__ __forceinline__ void scan_expert_counts(int* prefix, int num_experts) {
  if (threadIdx.x == 0) prefix[0] = 0;
  __syncthreads();
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int carry = 0;
    for (int base = 1; base <= num_experts; base += 32) {
      const int i = base + lane;
      int v = i <= num_experts ? prefix[i] : 0;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int u = __shfl_up_sync(0xffffffffu, v, d);
        if (lane >= d) v += u;
      }
      if (i <= num_experts) prefix[i] = v + carry;
      carry += __shfl_sync(0xffffffffu, v, 31);
    }
  }
}

// An expert's live M tiles: its rows, masked_m[e] clamped to [0, max_m], fill ceil(rows / 128).
template <int kMaskedMaxM>
__device__ __forceinline__ int live_tiles_of(const int32_t* __restrict__ masked_m, int e) {
  const int rows = min(max(__ldg(masked_m + e), 0), kMaskedMaxM);
  return (rows + kBlockM - 1) / kBlockM;
}

// The masked layout's live M tiles, counted once per CTA at its start: prefix[e] = M tiles
// holding rows of the experts before e. With it the scheduler walks only units that hold rows,
// spread evenly over the CTAs whatever max_m is; probing the [E * max_m / 128] tile space instead
// costs a dependent load per dead expert run and hands each CTA a share that depends on max_m.
template <int kMaskedMaxM>
struct LiveTiles {
  // Every thread of the CTA calls this before the barriers' initial sync, which publishes the
  // table to the producer and the consumers alike.
  __device__ __forceinline__ static const int* build(const int32_t* __restrict__ masked_m, int num_experts) {
    __shared__ int prefix[kMaxMaskedExperts + 1];
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) prefix[e + 1] = live_tiles_of<kMaskedMaxM>(masked_m, e);
    scan_expert_counts(prefix, num_experts);
    return prefix;
  }
};

// The mixed walk's table (kMixedLiveWalk): prefix[e] = units of the experts before e (MixedUnits),
// built as LiveTiles' is.
template <int kMaskedMaxM, int kNumNTiles>
struct LiveMixedUnits {
  __device__ __forceinline__ static const int* build(const int32_t* __restrict__ masked_m, int num_experts) {
    __shared__ int prefix[kMaxMaskedExperts + 1];
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x)
      prefix[e + 1] = MixedUnits<kNumNTiles>::units(live_tiles_of<kMaskedMaxM>(masked_m, e));
    scan_expert_counts(prefix, num_experts);
    return prefix;
  }
};

// One unit's share of a CTA's work under stream-K (StreamKPool): its K blocks [kb_begin,
// kb_begin + kb_count) and what becomes of the sum (kind), with, for kFinish, the pool chunk
// after the unit's last (unit_end), packed in one word: the consumers keep it through the K loop,
// where registers are few.
struct Segment {
  enum Kind : int {
    kWhole = 0,    // the whole unit: stored as usual
    kPartial = 1,  // not the unit's first chunk: the sum goes to the workspace, not to `out`
    kFinish = 2,   // the unit's first chunk but not its last: add the later clusters' partial sums
  };
  int kb_begin;
  int kb_count;
  int tag;  // unit_end * 4 + kind

  __host__ __device__ int kind() const { return tag & 3; }
  __host__ __device__ int unit_end() const { return tag >> 2; }
};

// Stream-K: the units that would leave the last wave part full are not dealt whole. The first
// dp_units (a multiple of the clusters) go round robin as usual; the K blocks of the rest, in
// chunks, form a pool cut into one contiguous range per cluster, so all clusters finish within a
// chunk of each other. A unit cut between clusters is finished by the cluster holding its first
// chunk (its owner: the unit comes last in the owner's range) from the partial sums the later
// clusters leave in a workspace (the unit comes first in theirs, so they never wait for it, and
// the cluster ending the pool never waits: every wait points to a later cluster).
// Pure arithmetic, host and device: tests/cuda/test_stream_k_pool.py runs it on the host.
struct StreamKPool {
  int dp_units;  // units dealt whole, round robin
  int chunks;    // K chunks in the pool: the remaining units x chunks per unit

  __host__ __device__ static StreamKPool make(int units, int clusters, int chunks_per_unit) {
    const int rest = units % clusters;
    // A last wave that takes every chunk of a unit anyway gains nothing from the cut.
    const bool cut = rest > 0 && (rest * chunks_per_unit + clusters - 1) / clusters < chunks_per_unit;
    const int pool_units = cut ? rest : 0;
    return StreamKPool{units - pool_units, pool_units * chunks_per_unit};
  }

  // The first pool chunk of cluster c's range (of `clusters`); c = clusters: the pool's end.
  __host__ __device__ int begin(int c, int clusters) const {
    return static_cast<int>(static_cast<int64_t>(chunks) * c / clusters);
  }

  // The piece of a range that starts at pool chunk `chunk` and ends at `range_end`: its unit
  // (pool-local), its segment and the chunk after it.
  __host__ __device__ static Segment piece(int chunk, int range_end, int chunks_per_unit, int chunk_k_blocks, int& unit,
                                           int& end) {
    unit = chunk / chunks_per_unit;
    const int first = unit * chunks_per_unit;
    const int unit_end = first + chunks_per_unit;
    end = range_end < unit_end ? range_end : unit_end;
    const int kind = chunk != first ? Segment::kPartial : end != unit_end ? Segment::kFinish : Segment::kWhole;
    return Segment{(chunk - first) * chunk_k_blocks, (end - chunk) * chunk_k_blocks, unit_end * 4 + kind};
  }

  // A kFinish segment of cluster `cluster`: calls helper(c) for every later cluster c whose
  // range starts inside the unit (a cluster with an empty range holds nothing), in order.
  template <typename Helper>
  __host__ __device__ void for_each_helper(int cluster, int clusters, const Segment& seg, Helper&& helper) const {
    for (int c = cluster + 1; c < clusters; ++c) {
      const int b = begin(c, clusters);
      if (b >= seg.unit_end()) break;
      if (begin(c + 1, clusters) > b) helper(c);
    }
  }
};

// Walks the units of one CTA (kCluster = 1) or one cluster of 2 (a unit is a pair of tiles, one
// per CTA): kMcastA = 0 pairs vertically adjacent M tiles 2i, 2i + 1 at one N tile (B shared;
// on the masked layout's dense walk, live tiles 2i, 2i + 1 of the live list: kPairedLiveWalk);
// kMcastA = 1 pairs N tiles 2j, 2j + 1 at one M tile (A shared, always one expert); kMcastA = 2
// (masked layout only) chooses per unit, expert by expert (MixedUnits).
template <int kN, int kBlockN, int kGroupM, int kCluster, int kMcastA, int kMaskedMaxM>
struct TileScheduler {
  static constexpr int kNumNTiles = (kN + kBlockN - 1) / kBlockN;
  static constexpr int kNumNUnits = kMcastA == 1 ? (kNumNTiles + kCluster - 1) / kCluster : kNumNTiles;
  static constexpr int kGroupUnits = kMcastA ? kGroupM : (kGroupM / kCluster > 0 ? kGroupM / kCluster : 1);
  static constexpr bool kDense = kDenseMaskedWalk<kGroupUnits, kCluster, kMcastA, kMaskedMaxM>;
  static constexpr bool kPairedLive = kPairedLiveWalk<kGroupUnits, kCluster, kMcastA, kMaskedMaxM>;
  static constexpr bool kMixedLive = kMixedLiveWalk<kGroupUnits, kCluster, kMcastA, kMaskedMaxM>;
  static_assert(kMcastA != 2 || kMixedLive, "mixed pairs: the masked layout's dense walk only");

  int num_m_units;
  int num_tiles;
  int next;
  int stride;
  const int* live_prefix;  // kDense: LiveTiles' table
  int expert;              // kDense: the expert of the last unit walked (units come in order)
  int live_tiles;          // kPairedLive: the live M tiles of all experts

  __device__ __forceinline__ explicit TileScheduler(int m, const int* live = nullptr)
      : num_m_units(kMcastA ? (m + kBlockM - 1) / kBlockM : ((m + kBlockM - 1) / kBlockM + kCluster - 1) / kCluster),
        num_tiles(num_m_units * kNumNUnits),
        next(blockIdx.x / kCluster),
        stride(gridDim.x / kCluster),
        live_prefix(live),
        expert(0) {
    if constexpr (kMixedLive) {
      num_tiles = live[m / kMaskedMaxM];
    } else if constexpr (kPairedLive) {
      live_tiles = live[m / kMaskedMaxM];
      num_tiles = (live_tiles + 1) / 2 * kNumNUnits;
    } else if constexpr (kDense) {
      num_tiles = live[m / kMaskedMaxM] * kNumNUnits;
    }
  }

  // kDense: unit t of the live units -> its M tile in the [E * max_m / 128] space (kPairedLive:
  // its two tiles, packed). A CTA's units increase, so the expert only moves forward (past experts
  // without rows).
  __device__ __forceinline__ void live_unit_coords(int t, int& m_unit, int& n_unit) {
    if constexpr (kMixedLive) {
      MixedUnits<kNumNTiles>::coords(live_prefix, expert, t, kMaskedMaxM / kBlockM, m_unit, n_unit);
      return;
    }
    const int live_m = t / kNumNUnits;
    n_unit = t - live_m * kNumNUnits;
    if constexpr (kPairedLive) {
      m_unit = PairedTiles::pair(live_prefix, expert, live_m, live_tiles, kMaskedMaxM / kBlockM);
    } else {
      while (live_prefix[expert + 1] <= live_m) ++expert;
      m_unit = expert * (kMaskedMaxM / kBlockM) + (live_m - live_prefix[expert]);
    }
  }

  // Units are numbered so that kGroupM consecutive M units sweep the N units together: the CTAs
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

  __device__ __forceinline__ bool next_tile(int& m_unit, int& n_unit) {
    if (next < num_tiles) {
      if constexpr (kDense) {
        live_unit_coords(next, m_unit, n_unit);
      } else {
        unit_coords(next, m_unit, n_unit);
      }
      next += stride;
      return true;
    }
    return false;
  }
};

// kStreamKChunk > 0: the walk of TileScheduler with the last units dealt as a pool of K chunks
// (StreamKPool). Whole units first, round robin; then this cluster's range of the pool, unit by
// unit (units only increase, as the masked layout's dense walk needs). A separate walker, so the
// kernels dealing whole units keep their code.
template <int kN, int kBlockN, int kGroupM, int kCluster, int kMcastA, int kMaskedMaxM, int kKBlocks, int kStreamKChunk>
struct StreamKScheduler : TileScheduler<kN, kBlockN, kGroupM, kCluster, kMcastA, kMaskedMaxM> {
  using Base = TileScheduler<kN, kBlockN, kGroupM, kCluster, kMcastA, kMaskedMaxM>;
  static constexpr int kChunksPerUnit = kKBlocks / kStreamKChunk;
  static_assert(kStreamKChunk > 0 && kKBlocks % kStreamKChunk == 0, "stream-K chunks divide a unit's K blocks");

  StreamKPool pool;
  int chunk;      // the next pool chunk to walk
  int chunk_end;  // the end of this cluster's range

  __device__ __forceinline__ explicit StreamKScheduler(int m, const int* live = nullptr)
      : Base(m, live), pool(StreamKPool::make(Base::num_tiles, Base::stride, kChunksPerUnit)) {
    chunk = pool.begin(cluster(), Base::stride);
    chunk_end = pool.begin(cluster() + 1, Base::stride);
  }

  // Unit t's coordinates: the masked layout's dense walk over live tiles, or the grouped one.
  __device__ __forceinline__ void coords(int t, int& m_unit, int& n_unit) {
    if constexpr (Base::kDense) {
      Base::live_unit_coords(t, m_unit, n_unit);
    } else {
      Base::unit_coords(t, m_unit, n_unit);
    }
  }

  __device__ __forceinline__ static int cluster() { return static_cast<int>(blockIdx.x) / kCluster; }

  __device__ __forceinline__ bool next_segment(int& m_unit, int& n_unit, Segment& seg) {
    if (Base::next < pool.dp_units) {
      coords(Base::next, m_unit, n_unit);
      Base::next += Base::stride;
      seg = Segment{0, kKBlocks, Segment::kWhole};
      return true;
    }
    if (chunk < chunk_end) {
      int unit, end;
      seg = StreamKPool::piece(chunk, chunk_end, kChunksPerUnit, kStreamKChunk, unit, end);
      coords(pool.dp_units + unit, m_unit, n_unit);
      chunk = end;
      return true;
    }
    return false;
  }

  // kFinish: add(cta) for every helper cluster's CTA of this rank (the same M tile of a pair).
  template <typename Add>
  __device__ __forceinline__ void for_each_helper(const Segment& seg, uint32_t rank, Add&& add) const {
    pool.for_each_helper(cluster(), Base::stride, seg, [&](int c) { add(c * kCluster + static_cast<int>(rank)); });
  }
};

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

// Which expert a CTA's tile belongs to and how its B tile is loaded. kCluster = 1: the tile's
// own expert (skip when its first row is padding). kCluster = 2, B shared (kMcastA = 0): both
// CTAs read both tiles' first ids, so they agree: skip the pair only when both are padding; when
// both tiles hold the same expert, each CTA loads half of the B tile and multicasts it to both
// (B read once from L2 for two M tiles); otherwise each loads its own B. A dead tile in a live
// pair (padding, or past M) computes on its partner's expert and stores nothing. kCluster = 2, A
// shared (kMcastA = 1): one M tile, so one expert; each CTA loads half of A for both; a CTA whose
// N tile lies past N (odd tile count) computes on its partner's B tile and stores nothing.
// kMcastA = 2 (mixed pairs, MixedUnits): per unit, B shared by two M tiles of one expert or A by
// two N tiles of one M tile (share_a); a pair always holds one expert.
struct TileRole {
  int expert;      // expert whose weights are loaded (valid when live_pair)
  bool live;       // this CTA's tile has real rows: store them
  bool multicast;  // B tile shared by the pair
  int m_tile;      // this CTA's tile (a dead one: the coordinates it loads)
  int n_tile;
  bool share_a;  // kMcastA = 2: this unit shares A (else B)
};

// The expert ids a unit's role depends on: its M tile's first row's (e1: the pair's second M
// tile's, B-shared pairs only; -1 past M). Loaded apart from tile_role so that the consumers can
// load the next unit's ids a tile ahead: loaded at the tile's start, the ids' global-load latency
// would sit between the previous tile's last MMA and this tile's first. `zero` is 0; the
// consumers pass one the compiler cannot prove to be 0 or warp-uniform: ids loaded from a
// provably uniform address are moved into uniform registers right after the load (R2UR), which
// waits for the load there, at the tile boundary, again.
struct TileIds {
  int e0;
  int e1;
};

// 0 for m >= 0, from the thread index: neither provably 0 nor provably warp-uniform (the `zero`
// load_tile_ids takes).
__device__ __forceinline__ int opaque_zero(int m) { return static_cast<int>(threadIdx.x) & (m >> 31); }

template <int kCluster, int kMcastA, bool kPaired = false, typename Ids>
__device__ __forceinline__ TileIds load_tile_ids(const Ids& expert_ids, int m, int m_unit, int zero = 0) {
  if constexpr (kMcastA == 2) {  // mixed pairs: one expert per unit, its first tile's
    return TileIds{expert_ids(PairedTiles::first(m_unit) * kBlockM + zero), -1};
  } else if constexpr (kPaired) {  // the two tiles of PairedTiles (the second: -1 when absent)
    const int second = PairedTiles::second(m_unit);
    return TileIds{expert_ids(PairedTiles::first(m_unit) * kBlockM + zero),
                   second >= 0 ? expert_ids(second * kBlockM + zero) : -1};
  } else if constexpr (kCluster == 1 || kMcastA) {
    return TileIds{expert_ids(m_unit * kBlockM + zero), -1};
  } else {
    const int first = 2 * m_unit * kBlockM + zero;
    return TileIds{expert_ids(first), first + kBlockM < m ? expert_ids(first + kBlockM) : -1};
  }
}

// The consumers' walk: the next unit, and its ids loaded now, a tile ahead of their use (loaded at
// the tile's start, their latency would sit between the previous tile's last MMA and this one's
// first). The same walk as the producer's, written out again on purpose: a shared "next live
// tile" helper carrying TileRole across iterations made ptxas spill.
template <int kCluster, int kMcastA, typename Scheduler, typename Ids>
__device__ __forceinline__ bool next_tile_ahead(Scheduler& sched, int& m_unit, int& n_unit, TileIds& ids,
                                                const Ids& expert_ids, int m, int zero) {
  const bool more = sched.next_tile(m_unit, n_unit);
  if (more) ids = load_tile_ids<kCluster, kMcastA, Scheduler::kPairedLive>(expert_ids, m, m_unit, zero);
  return more;
}

// Lane 0's ids in every lane, a tile after their load: warp-uniform only from here on.
__device__ __forceinline__ TileIds warp_uniform(const TileIds& ids) {
  return TileIds{__shfl_sync(0xffffffffu, ids.e0, 0), __shfl_sync(0xffffffffu, ids.e1, 0)};
}

template <int kCluster, int kMcastA, int kNumNTiles, bool kPaired = false>
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
  } else if constexpr (kMcastA == 2) {
    // Both tiles of a unit belong to one expert, so the first tile's id is the pair's.
    role.expert = ids.e0;
    live_pair = role.expert >= 0;
    role.multicast = true;
    role.share_a = PairedTiles::second(m_unit) < 0;
    role.live =
        MixedUnits<kNumNTiles>::tile(m_unit, n_unit, static_cast<int>(rank), role.m_tile, role.n_tile) && live_pair;
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
    if constexpr (kPaired) {
      role.m_tile = role.live == (rank == 0) ? PairedTiles::first(m_unit) : PairedTiles::second(m_unit);
    } else {
      role.m_tile = m_unit * kCluster + static_cast<int>(role.live ? rank : rank ^ 1u);
    }
    role.n_tile = n_unit;
  }
  return role;
}

}  // namespace phasemoe
