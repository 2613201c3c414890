// Device code shared by the fused kernel and kernel 2 of the two-kernel path: everything after a token's
// unbiased scores `s` and biased scores `b` sit in registers. Both paths run the same arithmetic in the same
// order, which is what makes their outputs bit-identical.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "routing_layout.h"

namespace fusedgate {

constexpr unsigned kFullMask = 0xffffffffu;

// Rule 1, written with explicit round-to-nearest intrinsics so no contraction changes a bit between paths.
__device__ __forceinline__ float sigmoid_rn(float x) {
  return __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-x)));
}

// Order-preserving map from a finite float to uint32 (0 is reserved for "no candidate").
__device__ __forceinline__ uint32_t ordered_key(float v) {
  uint32_t u = __float_as_uint(__fadd_rn(v, 0.0f));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

// Output tensors of one call; `indices` is int32 or int64 by `index64`.
struct RoutingOutputs {
  float* scores;  // nullptr: not written
  float* values;
  void* indices;
  int index64;
};

__device__ __forceinline__ float routed_weight(float s, float denom, const RoutingParams& p) {
  return p.renormalize ? __fmul_rn(__fdiv_rn(s, denom), p.scale) : __fmul_rn(s, p.scale);
}

// Route one token held by `p.lanes` lanes of the warp. Every lane of the warp calls this with the same
// parameters (inactive sub-warps too, with `active` false and every b invalid), because it shuffles across
// the whole warp. `stage` is this token's 2*top_k words of shared memory.
template <int VPT>
__device__ __forceinline__ void route_token(const float (&s)[VPT], const float (&b)[VPT], int64_t token, bool active,
                                            const RoutingParams& p, RoutingOutputs out, float* stage) {
  const int lane = threadIdx.x & 31;
  const int lanes = p.lanes;
  const int sub_lane = lane & (lanes - 1);
  const int sub_base = lane - sub_lane;
  const int e0 = sub_lane * p.vpt;
  const float neg_inf = __int_as_float(0xff800000);

  uint32_t candidates = 0;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    if (isfinite(b[i])) candidates |= 1u << i;
  }

  bool dead_group = false;
  if (p.score_groups) {
    const int epg = p.num_experts / p.n_group;
    const int need = epg >= 2 ? 2 : 1;
    const int lpg = p.lanes_per_group > 0 ? p.lanes_per_group : 1;
    float group_score = neg_inf;
    if (p.lanes_per_group > 0) {
      float top1 = neg_inf, top2 = neg_inf;
      int count = 0;
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        if (candidates >> i & 1u) {
          const float v = b[i];
          if (v > top1) {
            top2 = top1;
            top1 = v;
          } else if (v > top2) {
            top2 = v;
          }
          ++count;
        }
      }
      for (int offset = 1; offset < lpg; offset <<= 1) {
        const float o1 = __shfl_xor_sync(kFullMask, top1, offset);
        const float o2 = __shfl_xor_sync(kFullMask, top2, offset);
        count += __shfl_xor_sync(kFullMask, count, offset);
        top2 = fmaxf(fminf(top1, o1), fmaxf(top2, o2));
        top1 = fmaxf(top1, o1);
      }
      if (count >= need) group_score = need == 2 ? __fadd_rn(top1, top2) : top1;
    } else {
      // Generic layout (one token per warp): score group g in lane g.
      for (int g = 0; g < p.n_group; ++g) {
        float top1 = neg_inf, top2 = neg_inf;
        int count = 0;
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
          const int e = e0 + i;
          if ((candidates >> i & 1u) && e / epg == g) {
            const float v = b[i];
            if (v > top1) {
              top2 = top1;
              top1 = v;
            } else if (v > top2) {
              top2 = v;
            }
            ++count;
          }
        }
        for (int offset = 1; offset < 32; offset <<= 1) {
          const float o1 = __shfl_xor_sync(kFullMask, top1, offset);
          const float o2 = __shfl_xor_sync(kFullMask, top2, offset);
          count += __shfl_xor_sync(kFullMask, count, offset);
          top2 = fmaxf(fminf(top1, o1), fmaxf(top2, o2));
          top1 = fmaxf(top1, o1);
        }
        if (sub_lane == g) group_score = count >= need ? (need == 2 ? __fadd_rn(top1, top2) : top1) : neg_inf;
      }
    }
    // Rank every group against the others: ties go to the lower group index.
    const int my_group = sub_lane / lpg;
    int rank = 0, finite_groups = 0;
    for (int h = 0; h < p.n_group; ++h) {
      const float other = __shfl_sync(kFullMask, group_score, sub_base + h * lpg);
      finite_groups += other > neg_inf;
      rank += (other > group_score) || (other == group_score && h < my_group);
    }
    // A kept group scores -inf exactly when fewer than topk_group groups are finite.
    dead_group = finite_groups < p.topk_group;
    const bool kept = my_group < p.n_group && rank < p.topk_group;
    if (p.lanes_per_group > 0) {
      if (!kept) candidates = 0;
    } else {
      const uint32_t kept_groups = __ballot_sync(kFullMask, kept);
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        const int e = e0 + i;
        if (e < p.num_experts && !(kept_groups >> (e / epg) & 1u)) candidates &= ~(1u << i);
      }
    }
  }

  // top_k rounds of a sub-warp arg-max; the winner's lane drops it from its candidates.
  uint32_t chosen = 0;
  bool incomplete = false;
  float sum = 0.0f;
  for (int r = 0; r < p.top_k; ++r) {
    uint32_t best_key = 0;
    int best_i = 0;
    float best_s = 0.0f;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if (candidates >> i & 1u) {
        const uint32_t key = ordered_key(b[i]);
        if (key > best_key) {
          best_key = key;
          best_i = i;
          best_s = s[i];
        }
      }
    }
    int best_e = best_key ? e0 + best_i : 0x7fffffff;
    for (int offset = lanes >> 1; offset > 0; offset >>= 1) {
      const uint32_t other_key = __shfl_xor_sync(kFullMask, best_key, offset);
      const int other_e = __shfl_xor_sync(kFullMask, best_e, offset);
      if (other_key > best_key || (other_key == best_key && other_e < best_e)) {
        best_key = other_key;
        best_e = other_e;
      }
    }
    const int owner = best_key ? best_e / p.vpt : sub_lane;
    const float winner_s = __shfl_sync(kFullMask, best_s, sub_base + owner);
    if (best_key == 0) {
      incomplete = true;
    } else {
      if (owner == sub_lane) {
        candidates &= ~(1u << (best_e - e0));
        chosen |= 1u << (best_e - e0);
      }
      sum = __fadd_rn(sum, winner_s);
    }
    if (sub_lane == 0) {
      stage[r] = winner_s;
      stage[p.top_k + r] = __int_as_float(best_e);
    }
  }
  __syncwarp();

  const bool fallback = dead_group || incomplete;
  const float denom = __fadd_rn(sum, 1e-20f);
  const float fallback_w = __fdiv_rn(1.0f, static_cast<float>(p.top_k));
  if (active) {
    for (int r = sub_lane; r < p.top_k; r += lanes) {
      const float w = fallback ? fallback_w : routed_weight(stage[r], denom, p);
      const int id = fallback ? r : __float_as_int(stage[p.top_k + r]);
      out.values[token * p.top_k + r] = w;
      if (out.index64) {
        static_cast<int64_t*>(out.indices)[token * p.top_k + r] = id;
      } else {
        static_cast<int32_t*>(out.indices)[token * p.top_k + r] = id;
      }
    }
    if (out.scores != nullptr) {
      float* row = out.scores + token * p.num_experts;
      float w[VPT];
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        const int e = e0 + i;
        w[i] = fallback ? (e < p.top_k ? fallback_w : 0.0f)
                        : ((chosen >> i & 1u) ? routed_weight(s[i], denom, p) : 0.0f);
      }
      const bool vec = (p.num_experts % 4 == 0) && (p.vpt % 4 == 0) &&
                       (reinterpret_cast<uintptr_t>(out.scores) % 16 == 0);
      if (vec) {
#pragma unroll
        for (int i = 0; i < VPT; i += 4) {
          if (i < p.vpt && e0 + i < p.num_experts) {
            *reinterpret_cast<float4*>(row + e0 + i) = make_float4(w[i], w[i + 1], w[i + 2], w[i + 3]);
          }
        }
      } else {
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
          if (i < p.vpt && e0 + i < p.num_experts) row[e0 + i] = w[i];
        }
      }
    }
  }
  __syncwarp();
}

// Tokens this launch computes: all of them, or the first *num_tokens (CUDA-graph buckets).
__device__ __forceinline__ int64_t effective_tokens(int64_t num_tokens, const int32_t* num_tokens_ptr) {
  if (num_tokens_ptr == nullptr) return num_tokens;
  const int64_t n = *num_tokens_ptr;
  return n < 0 ? 0 : (n < num_tokens ? n : num_tokens);
}

}  // namespace fusedgate
