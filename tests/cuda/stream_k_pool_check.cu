// Host check of stream-K's pool arithmetic (scheduler.cuh: StreamKPool, Segment), built by
// tests/cuda/test_stream_k_pool.py. For each case "units clusters chunks_per_unit chunk_k_blocks"
// on stdin it walks every cluster as the kernel's StreamKScheduler does (whole units round robin,
// then the cluster's pool range piece by piece) and checks: every K block of every unit is
// computed exactly once; a cut unit has one owner (kFinish, the last piece of its range) whose
// helpers (for_each_helper) are exactly the clusters holding its kPartial pieces, each such piece
// being the first of its cluster's range; no cluster waits on an earlier one; the clusters' K
// blocks differ by at most one chunk. Prints "ok" per case, or the first violation and exits 1.
#include <cstdio>
#include <vector>

#include "scheduler.cuh"

using phasemoe::Segment;
using phasemoe::StreamKPool;

static int fail(const char* what, int units, int clusters, int cpu, int a, int b) {
  std::printf("FAIL %s: units=%d clusters=%d chunks_per_unit=%d (%d, %d)\n", what, units, clusters, cpu, a, b);
  return 1;
}

static int check(int units, int clusters, int cpu, int ckb) {
  const int kbs = cpu * ckb;
  const StreamKPool pool = StreamKPool::make(units, clusters, cpu);
  // Either no cut (every unit whole) or whole waves before the pool.
  if (pool.dp_units != units && pool.dp_units % clusters != 0)
    return fail("dp_units", units, clusters, cpu, pool.dp_units, 0);
  if (pool.chunks != (units - pool.dp_units) * cpu) return fail("pool chunks", units, clusters, cpu, pool.chunks, 0);
  std::vector<int> covered(static_cast<size_t>(units) * kbs, 0);
  std::vector<int> owner(units, -1), work(clusters, 0);
  std::vector<std::vector<int>> partials(units), helpers(units);
  for (int c = 0; c < clusters; ++c) {
    for (int u = c; u < pool.dp_units; u += clusters) {
      for (int kb = 0; kb < kbs; ++kb) ++covered[static_cast<size_t>(u) * kbs + kb];
      owner[u] = c;
      work[c] += kbs;
    }
    int chunk = pool.begin(c, clusters);
    const int chunk_end = pool.begin(c + 1, clusters);
    bool first_piece = true;
    while (chunk < chunk_end) {
      int unit, end;
      const Segment seg = StreamKPool::piece(chunk, chunk_end, cpu, ckb, unit, end);
      const int u = pool.dp_units + unit;
      if (end <= chunk || seg.kb_count <= 0 || seg.kb_count % ckb)
        return fail("piece size", units, clusters, cpu, c, chunk);
      for (int kb = seg.kb_begin; kb < seg.kb_begin + seg.kb_count; ++kb) {
        if (kb < 0 || kb >= kbs) return fail("K block range", units, clusters, cpu, c, kb);
        ++covered[static_cast<size_t>(u) * kbs + kb];
      }
      work[c] += seg.kb_count;
      if (seg.kind() == Segment::kPartial) {
        if (!first_piece) return fail("a partial piece not first in its range", units, clusters, cpu, c, u);
        partials[u].push_back(c);
      } else {
        if (owner[u] >= 0) return fail("two owners", units, clusters, cpu, c, u);
        owner[u] = c;
        if (seg.kb_begin != 0) return fail("owner without the first chunk", units, clusters, cpu, c, u);
        if (seg.kind() == Segment::kFinish) {
          if (end != chunk_end) return fail("a finishing piece not last in its range", units, clusters, cpu, c, u);
          if (seg.unit_end() != (unit + 1) * cpu) return fail("unit_end", units, clusters, cpu, c, u);
          pool.for_each_helper(c, clusters, seg, [&](int h) { helpers[u].push_back(h); });
          for (int h : helpers[u])
            if (h <= c) return fail("a wait on an earlier cluster", units, clusters, cpu, c, h);
          if (helpers[u].empty()) return fail("a finishing piece without helpers", units, clusters, cpu, c, u);
        } else if (seg.kb_count != kbs) {
          return fail("a whole piece not whole", units, clusters, cpu, c, u);
        }
      }
      first_piece = false;
      chunk = end;
    }
  }
  for (size_t i = 0; i < covered.size(); ++i)
    if (covered[i] != 1) return fail("K block computed != once", units, clusters, cpu, static_cast<int>(i), covered[i]);
  for (int u = 0; u < units; ++u) {
    if (owner[u] < 0) return fail("no owner", units, clusters, cpu, u, 0);
    // The clusters walk in order, so partials[u] is sorted, as for_each_helper lists them.
    if (partials[u] != helpers[u])
      return fail("helpers != clusters holding partial pieces", units, clusters, cpu, u,
                  static_cast<int>(partials[u].size()) - static_cast<int>(helpers[u].size()));
  }
  int lo = work[0], hi = work[0];
  for (int w : work) {
    lo = w < lo ? w : lo;
    hi = w > hi ? w : hi;
  }
  if (pool.chunks > 0 && hi - lo > ckb) return fail("unbalanced", units, clusters, cpu, lo, hi);
  return 0;
}

int main() {
  int units, clusters, cpu, ckb;
  int cases = 0;
  while (std::scanf("%d %d %d %d", &units, &clusters, &cpu, &ckb) == 4) {
    if (check(units, clusters, cpu, ckb)) return 1;
    ++cases;
  }
  std::printf("ok %d\n", cases);
  return 0;
}
