// Epilogue: a finished 64 x BLOCK_N fp32 sum (per consumer warpgroup) to bf16 rows of `out`,
// straight from registers. A tile's store is deferred until the next tile's first MMAs are
// issued, so the tensor core is not left idle while the stores drain.
#pragma once
#include <cstdint>

#include "kernel_traits.cuh"
#include "scheduler.cuh"
#include "sm90_ptx.cuh"

namespace phasemoe {

template <typename T>
struct Epilogue {
  // A finished tile whose store waits for the next tile's first MMAs.
  struct PendingStore {
    int row0;     // this thread's first row (the second is row0 + 8)
    int n_base;   // the tile's first column
    bool store0;  // row0 is the tile's expert's (not padding, not past M, not a dead tile of a pair)
    bool store1;  // ... and row0 + 8
    bool valid;   // a tile is pending
  };

  // kDirectRows: a stored tile's staged (destination token, weight bits) pairs (a shared-memory
  // slot of 128) and the layer's output [T, N] the tokens index.
  struct DirectRows {
    const int32_t* slot;
    uint16_t* out;
  };

  // This thread's two rows of a tile and their expert ids (-1 past M).
  struct TileRows {
    int row0;    // the first row (the second is row0 + 8)
    int n_base;  // the tile's first column
    int id0;     // expert id of row0
    int id1;     // ... of row0 + 8
  };

  // The rows a CTA stores are its own tile's, also when the tile is dead: a dead B-shared tile
  // computes on its partner's rows (role.m_tile), but its guards read its own rows' ids, so
  // nothing is stored. kPaired (the masked layout's pairs of live tiles): a dead tile has no rows
  // of its own; its guards read its partner's, and role.live keeps the store off.
  template <bool kPaired = false, typename Ids>
  __device__ __forceinline__ static TileRows load_rows(const TileRole& role, int m_unit, uint32_t rank, int row_in_tile,
                                                       const Ids& expert_ids, int m) {
    const int m_tile = T::kMcastA || kPaired ? role.m_tile : m_unit * T::kCluster + static_cast<int>(rank);
    const int row0 = m_tile * kBlockM + row_in_tile;
    const int row1 = row0 + 8;
    const int n_base = role.n_tile * T::kBlockN;
    const int id0 = row0 < m ? expert_ids(row0) : -1;
    const int id1 = row1 < m ? expert_ids(row1) : -1;
#ifdef PHASEMOE_DEBUG
    // A row of another expert inside a live tile means a segment did not start on a 128-row
    // boundary: the layout broke the precondition and that row would silently stay unwritten.
    if (role.live && ((id0 >= 0 && id0 != role.expert) || (id1 >= 0 && id1 != role.expert))) {
      printf("phasemoe: expert segment not 128-row aligned near row %d (tile expert %d)\n", row0, role.expert);
      __trap();
    }
#endif
    return {row0, n_base, id0, id1};
  }

  // 4 x 4 transpose of 32-bit values across the 4 lanes of a quad: on return v[j] holds what
  // lane j held in v[quad_lane]. Two butterfly stages (xor 1, xor 2), 4 shuffles in all.
  __device__ __forceinline__ static void quad_transpose(uint32_t (&v)[4], int quad_lane) {
    const bool b0 = quad_lane & 1;
#pragma unroll
    for (int j1 = 0; j1 < 2; ++j1) {
      const uint32_t send = b0 ? v[2 * j1] : v[2 * j1 + 1];
      const uint32_t got = __shfl_xor_sync(0xffffffffu, send, 1);
      if (b0)
        v[2 * j1] = got;
      else
        v[2 * j1 + 1] = got;
    }
    const bool b1 = quad_lane & 2;
#pragma unroll
    for (int j0 = 0; j0 < 2; ++j0) {
      const uint32_t send = b1 ? v[j0] : v[2 + j0];
      const uint32_t got = __shfl_xor_sync(0xffffffffu, send, 2);
      if (b1)
        v[j0] = got;
      else
        v[2 + j0] = got;
    }
  }

  // Chunks g .. g+3 of this thread's two rows as bf16, transposed inside the lane quad: lane q
  // then holds the 8 columns of chunk g + q (16 contiguous bytes) in v0 (row) and v1 (row + 8).
  __device__ __forceinline__ static void pack_chunk_group(const float (&result)[T::kAccRegs], int g, int quad_lane,
                                                          uint32_t (&v0)[4], uint32_t (&v1)[4]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      v0[j] = sm90::pack_bf16x2(result[4 * (g + j) + 0], result[4 * (g + j) + 1]);
      v1[j] = sm90::pack_bf16x2(result[4 * (g + j) + 2], result[4 * (g + j) + 3]);
    }
    quad_transpose(v0, quad_lane);
    quad_transpose(v1, quad_lane);
  }

  // Two bf16 values times w, rounded to bf16: fma(w, v, +0) is the combine's sum over one slot.
  __device__ __forceinline__ static uint32_t weigh_bf16x2(uint32_t v, float w) {
    return sm90::pack_bf16x2(__fmaf_rn(w, __uint_as_float(v << 16), 0.0f),
                             __fmaf_rn(w, __uint_as_float(v & 0xFFFF0000u), 0.0f));
  }

  // bf16 straight from registers to this thread's rows row0 and row0 + 8. Rows not flagged
  // (another expert's id: padding; past M; dead tiles of a cluster pair) are left untouched;
  // columns past N are dropped. kDirectRows: a row with a destination token goes, weighted, to
  // that token's row of direct.out instead.
  __device__ __forceinline__ static void store_tile(const float (&result)[T::kAccRegs], uint16_t* __restrict__ out,
                                                    int row0, int n_base, bool store0, bool store1, int quad_lane,
                                                    const DirectRows& direct = {nullptr, nullptr}) {
    constexpr int kN = T::kN;
    const int col_in_chunk = 2 * quad_lane;
    uint16_t* out0 = out + static_cast<int64_t>(row0) * kN;
    uint16_t* out1 = out0 + 8 * kN;
    bool direct0 = false, direct1 = false;
    float w0 = 0.0f, w1 = 0.0f;
    if constexpr (T::kDirectRows) {
      const int r = row0 % kBlockM;
      const int2 pair0 = reinterpret_cast<const int2*>(direct.slot)[r];
      const int2 pair1 = reinterpret_cast<const int2*>(direct.slot)[r + 8];
      const int token0 = pair0.x, token1 = pair1.x;
      direct0 = token0 >= 0;
      direct1 = token1 >= 0;
      w0 = __int_as_float(pair0.y);
      w1 = __int_as_float(pair1.y);
      if (direct0) out0 = direct.out + static_cast<int64_t>(token0) * kN;
      if (direct1) out1 = direct.out + static_cast<int64_t>(token1) * kN;
    }
#pragma unroll
    for (int g = 0; g < T::kVecChunks; g += 4) {
      uint32_t v0[4], v1[4];
      pack_chunk_group(result, g, quad_lane, v0, v1);
      if constexpr (T::kDirectRows) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (direct0) v0[j] = weigh_bf16x2(v0[j], w0);
          if (direct1) v1[j] = weigh_bf16x2(v1[j], w1);
        }
      }
      const int col = n_base + 8 * (g + quad_lane);
      if (col < kN) {  // N % 8 == 0: the 8 columns are all in or all out
        if (store0) *reinterpret_cast<uint4*>(out0 + col) = make_uint4(v0[0], v0[1], v0[2], v0[3]);
        if (store1) *reinterpret_cast<uint4*>(out1 + col) = make_uint4(v1[0], v1[1], v1[2], v1[3]);
      }
    }
#pragma unroll
    for (int c = T::kVecChunks; c < T::kBlockN / 8; ++c) {
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

  // Chunks [0, kChunks) of `result` as bf16 pairs, 4 bytes per store, into columns n_base.. of
  // this thread's rows (a split tile's part, kSkipHalves = 2), each under a predicate rather than
  // a branch: a branch on a per-thread guard there leaves ptxas unable to prove the warp converged
  // at the shuffles and MMAs after it. Columns past N are dropped.
  template <int kChunks>
  __device__ __forceinline__ static void store_part(const float (&result)[T::kAccRegs], uint16_t* __restrict__ out,
                                                    int row0, int n_base, bool store0, bool store1, int quad_lane) {
    static_assert(T::kN % 2 == 0, "pairs of bf16 columns");
    uint16_t* out0 = out + static_cast<int64_t>(row0) * T::kN;
    uint16_t* out1 = out0 + 8 * T::kN;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int col = n_base + 8 * c + 2 * quad_lane;
      const bool inside = col < T::kN;
      sm90::st_global_b32_if(out0 + col, sm90::pack_bf16x2(result[4 * c], result[4 * c + 1]), inside && store0);
      sm90::st_global_b32_if(out1 + col, sm90::pack_bf16x2(result[4 * c + 2], result[4 * c + 3]), inside && store1);
    }
  }

  // kSiluQuant: the tile's columns 0-127 are gate block j and 128-255 up block j (j = the N tile).
  // Each row's 128 values silu(gate) * up (gate and up rounded to bf16 first, as the separate
  // SiLU*up quant kernel reads GEMM1's bf16 output) are quantized to FP8 e4m3 with one fp32 scale
  // (the numerics of kernels/_group_quant_core.py's quantize_groups: scale = amax / 448, correctly
  // rounded, floored and capped; UE8M0 rounds it up to a power of two; x / scale correctly
  // rounded by one FMA correction of x * (1 / scale)), into act[row, 128 j ...] and
  // act_scale[row, j]. A row's 128 columns lie in the 4 lanes of a quad.
  __device__ __forceinline__ static float quant_scale(float amax) {
    float scale = fminf(__fdiv_rn(fmaxf(amax, 1e-10f), 448.0f), 0x1p119f);
    if constexpr (T::kSiluQuant == 2) scale = __int_as_float((__float_as_int(scale) + 0x7FFFFF) & 0x7F800000);
    return scale;
  }

  __device__ __forceinline__ static float quant_value(float x, float scale, float recip) {
    const float q = x * recip;
    if constexpr (T::kSiluQuant == 2) return q;  // a power-of-two scale: x * (1 / scale) is exact
    const float corrected = fmaf(fmaf(-q, scale, x), recip, q);
    return fabsf(q) <= 896.0f ? corrected : q;
  }

  __device__ __forceinline__ static void store_silu_quant(float (&result)[T::kAccRegs], uint8_t* __restrict__ act,
                                                          float* __restrict__ act_scale, int row0, int group,
                                                          bool store0, bool store1, int quad_lane) {
    constexpr int kHalf = T::kAccRegs / 2;  // registers of the gate columns; the up ones follow
    float amax0 = 0.0f, amax1 = 0.0f;
#pragma unroll
    for (int i = 0; i < kHalf; ++i) {
      // gate and up rounded to bf16 by one packed conversion (the two single ones cost twice the
      // conversion-unit slots), and exp(-gate) as __expf computes it, without its subnormal path.
      const uint32_t gate_up = sm90::pack_bf16x2(result[i], result[kHalf + i]);
      const float gate = __uint_as_float(gate_up << 16);
      const float up = __uint_as_float(gate_up & 0xFFFF0000u);
      const float v = __fdividef(gate, 1.0f + sm90::ex2_approx_ftz(gate * -0x1.715476p+0f)) * up;
      result[i] = v;
      if (i & 2)  // registers 4c + 2, 4c + 3: the second row
        amax1 = fmaxf(amax1, fabsf(v));
      else
        amax0 = fmaxf(amax0, fabsf(v));
    }
#pragma unroll
    for (int x = 1; x <= 2; x <<= 1) {
      amax0 = fmaxf(amax0, __shfl_xor_sync(0xffffffffu, amax0, x));
      amax1 = fmaxf(amax1, __shfl_xor_sync(0xffffffffu, amax1, x));
    }
    const float scale0 = quant_scale(amax0), scale1 = quant_scale(amax1);
    const float recip0 = __frcp_rn(scale0), recip1 = __frcp_rn(scale1);
    uint8_t* act0 = act + static_cast<int64_t>(row0) * T::kActCols + group * kScaleBlock;
    uint8_t* act1 = act0 + 8 * T::kActCols;
#pragma unroll
    for (int g = 0; g < kHalf / 4; g += 4) {
      // Chunks g .. g+3: per chunk, this lane's two columns of each row as 2 fp8 bytes (row 0 in
      // the low half-word, row 8 in the high one), transposed so lane q holds chunk g + q.
      uint32_t v[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int c = 4 * (g + j);
        const uint32_t lo =
            sm90::pack_e4m3x2(quant_value(result[c], scale0, recip0), quant_value(result[c + 1], scale0, recip0));
        const uint32_t hi =
            sm90::pack_e4m3x2(quant_value(result[c + 2], scale1, recip1), quant_value(result[c + 3], scale1, recip1));
        v[j] = lo | (hi << 16);
      }
      quad_transpose(v, quad_lane);
      const int col = 8 * (g + quad_lane);
      if (store0)
        *reinterpret_cast<uint2*>(act0 + col) =
            make_uint2(__byte_perm(v[0], v[1], 0x5410), __byte_perm(v[2], v[3], 0x5410));
      if (store1)
        *reinterpret_cast<uint2*>(act1 + col) =
            make_uint2(__byte_perm(v[0], v[1], 0x7632), __byte_perm(v[2], v[3], 0x7632));
    }
    if (quad_lane == 0) {
      if (store0) act_scale[static_cast<int64_t>(row0) * T::kActGroups + group] = scale0;
      if (store1) act_scale[static_cast<int64_t>(row0 + 8) * T::kActGroups + group] = scale1;
    }
  }

  __device__ __forceinline__ static void store_pending(float (&result)[T::kAccRegs], uint16_t* __restrict__ out,
                                                       const PendingStore& tile, float* __restrict__ act_scale,
                                                       const DirectRows& direct = {nullptr, nullptr}) {
    if constexpr (T::kSiluQuant) {
      store_silu_quant(result, reinterpret_cast<uint8_t*>(out), act_scale, tile.row0, tile.n_base / T::kBlockN,
                       tile.store0, tile.store1, threadIdx.x % 4);
    } else {
      store_tile(result, out, tile.row0, tile.n_base, tile.store0, tile.store1, threadIdx.x % 4, direct);
    }
  }
};

}  // namespace phasemoe
