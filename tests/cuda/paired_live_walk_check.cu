// Host check of the masked layout's walk of live tile pairs (scheduler.cuh: PairedTiles), built by
// tests/cuda/test_paired_live_walk.py. Each case on stdin is "clusters tiles_per_expert E live_0 ..
// live_{E-1}" (live M tiles per expert). It builds LiveTiles' prefix table, walks every cluster's
// pairs as the kernel's TileScheduler does (pairs c, c + clusters, ..., one forward-only expert
// cursor per cluster) and checks: pair p holds live tiles 2p and 2p + 1 of the list (experts in
// order, each expert's tiles in order), its second tile absent only for the odd last one; every
// live tile is walked exactly once; the packed indices decode to what was packed. Then the mixed
// pairs' walk (MixedUnits) of the same live tiles at several N tile counts: both tiles of every unit
// lie in the expert the cursor names, among its live tiles, and every (live tile, N tile) is stored
// by exactly one CTA (the other N tiles' and dead tiles' never). Prints "ok N" for N cases, or
// the first violation and exits 1.
#include <cstdio>
#include <vector>

#include "scheduler.cuh"

using phasemoe::MixedUnits;
using phasemoe::PairedTiles;

static int fail(const char* what, int c, int p, int a, int b) {
  std::printf("FAIL %s: cluster=%d pair=%d (%d, %d)\n", what, c, p, a, b);
  return 1;
}

static int check(int clusters, int tiles_per_expert, const std::vector<int>& live) {
  const int num_experts = static_cast<int>(live.size());
  std::vector<int> prefix(num_experts + 1, 0), list;
  for (int e = 0; e < num_experts; ++e) {
    prefix[e + 1] = prefix[e] + live[e];
    for (int t = 0; t < live[e]; ++t) list.push_back(e * tiles_per_expert + t);
  }
  const int live_tiles = prefix[num_experts];
  const int pairs = (live_tiles + 1) / 2;
  std::vector<int> walked(static_cast<size_t>(num_experts) * tiles_per_expert, 0);
  for (int c = 0; c < clusters; ++c) {
    int expert = 0;  // the CTA's cursor, as TileScheduler::expert
    for (int p = c; p < pairs; p += clusters) {
      const int unit = PairedTiles::pair(prefix.data(), expert, p, live_tiles, tiles_per_expert);
      const int first = PairedTiles::first(unit), second = PairedTiles::second(unit);
      if (first != list[2 * p]) return fail("first tile", c, p, first, list[2 * p]);
      const int want = 2 * p + 1 < live_tiles ? list[2 * p + 1] : -1;
      if (second != want) return fail("second tile", c, p, second, want);
      ++walked[first];
      if (second >= 0) ++walked[second];
    }
  }
  for (size_t t = 0; t < walked.size(); ++t) {
    const int e = static_cast<int>(t) / tiles_per_expert, local = static_cast<int>(t) % tiles_per_expert;
    if (walked[t] != (local < live[e] ? 1 : 0)) return fail("tile walked", -1, -1, static_cast<int>(t), walked[t]);
  }
  return 0;
}

template <int kNumNTiles>
static int check_mixed(int clusters, int tiles_per_expert, const std::vector<int>& live) {
  using Units = MixedUnits<kNumNTiles>;
  const int num_experts = static_cast<int>(live.size());
  std::vector<int> prefix(num_experts + 1, 0);
  for (int e = 0; e < num_experts; ++e) prefix[e + 1] = prefix[e] + Units::units(live[e]);
  std::vector<int> stored(static_cast<size_t>(num_experts) * tiles_per_expert * kNumNTiles, 0);
  for (int c = 0; c < clusters; ++c) {
    int expert = 0;
    for (int t = c; t < prefix[num_experts]; t += clusters) {
      int m_unit, n_unit;
      Units::coords(prefix.data(), expert, t, tiles_per_expert, m_unit, n_unit);
      for (int rank = 0; rank < 2; ++rank) {
        int m_tile, n_tile;
        const bool store = Units::tile(m_unit, n_unit, rank, m_tile, n_tile);
        if (m_tile / tiles_per_expert != expert || m_tile % tiles_per_expert >= live[expert])
          return fail("mixed tile outside its expert's live tiles", c, t, m_tile, expert);
        if (n_tile < 0 || n_tile >= kNumNTiles) return fail("mixed N tile", c, t, n_tile, kNumNTiles);
        if (store) ++stored[static_cast<size_t>(m_tile) * kNumNTiles + n_tile];
      }
    }
  }
  for (size_t i = 0; i < stored.size(); ++i) {
    const int tile = static_cast<int>(i / kNumNTiles);
    const int want = tile % tiles_per_expert < live[tile / tiles_per_expert] ? 1 : 0;
    if (stored[i] != want) return fail("mixed tile stored", -1, -1, static_cast<int>(i), stored[i]);
  }
  return 0;
}

int main() {
  // The packing at its ends: tile indices 0 .. 65534 with and without a second tile.
  const int ends[] = {0, 1, 2, 32767, 32768, 65533, 65534};
  for (int a : ends)
    for (int b : ends)
      for (int second : {b, -1}) {
        const int unit = PairedTiles::pack(a, second);
        if (PairedTiles::first(unit) != a || PairedTiles::second(unit) != second)
          return fail("pack", -1, -1, a, second);
      }
  int cases = 0, clusters, tiles_per_expert, num_experts;
  while (std::scanf("%d %d %d", &clusters, &tiles_per_expert, &num_experts) == 3) {
    std::vector<int> live(num_experts);
    for (int& x : live)
      if (std::scanf("%d", &x) != 1) return fail("input", -1, -1, cases, 0);
    if (check(clusters, tiles_per_expert, live) || check_mixed<2>(clusters, tiles_per_expert, live) ||
        check_mixed<3>(clusters, tiles_per_expert, live) || check_mixed<7>(clusters, tiles_per_expert, live) ||
        check_mixed<32>(clusters, tiles_per_expert, live) || check_mixed<56>(clusters, tiles_per_expert, live)) {
      std::printf("case %d\n", cases);
      return 1;
    }
    ++cases;
  }
  std::printf("ok %d\n", cases);
  return 0;
}
