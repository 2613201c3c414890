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
// The correctly rounded reciprocal equals the IEEE quotient 1 / y at a fraction of a division's cost. The
// exponential is the hardware one (ex2.approx of x * log2 e): its error in s stays far below the alignment
// standard's 8 ulp at 1.0 in b and 1e-5 relative in the weights, and every GPU path shares this function.
__device__ __forceinline__ float sigmoid_rn(float x) { return __frcp_rn(__fadd_rn(1.0f, __expf(-x))); }

// Keep the two largest of a stream of values; a repeated maximum fills both places.
__device__ __forceinline__ void push_top2(float v, float& top1, float& top2) {
  if (v > top1) {
    top2 = top1;
    top1 = v;
  } else if (v > top2) {
    top2 = v;
  }
}

// Merge the top-2 and valid counts of lanes `offset` apart (xor butterfly).
__device__ __forceinline__ void merge_top2(float& top1, float& top2, int& count, int offset) {
  const float o1 = __shfl_xor_sync(0xffffffffu, top1, offset);
  const float o2 = __shfl_xor_sync(0xffffffffu, top2, offset);
  count += __shfl_xor_sync(0xffffffffu, count, offset);
  top2 = fmaxf(fminf(top1, o1), fmaxf(top2, o2));
  top1 = fmaxf(top1, o1);
}

// Rule 3's group score from a group's merged top-2 and count of valid experts.
__device__ __forceinline__ float group_score_of(float top1, float top2, int count, int need) {
  return count >= need ? (need == 2 ? __fadd_rn(top1, top2) : top1) : __int_as_float(0xff800000);
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
// the whole warp. `stage` is this token's 3*top_k words of shared memory.
template <int VPT>
__device__ __forceinline__ void route_token(const float (&s)[VPT], const float (&b)[VPT], int64_t token, bool active,
                                            const RoutingParams& p, RoutingOutputs out, float* stage) {
  const int lane = threadIdx.x & 31;
  const int lanes = p.lanes;
  const int sub_lane = lane & (lanes - 1);
  const int sub_base = lane - sub_lane;
  const int e0 = sub_lane * p.vpt;
  const unsigned sub_mask = lanes == 32 ? kFullMask : ((1u << lanes) - 1u) << sub_base;
  const float neg_inf = __int_as_float(0xff800000);

  // Selection keys, 0 for "not a candidate": computed once, so each round compares integers only.
  uint32_t key[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) key[i] = isfinite(b[i]) ? ordered_key(b[i]) : 0u;

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
        if (key[i]) {
          push_top2(b[i], top1, top2);
          ++count;
        }
      }
      for (int offset = 1; offset < lpg; offset <<= 1) merge_top2(top1, top2, count, offset);
      group_score = group_score_of(top1, top2, count, need);
    } else {
      // Generic layout (one token per warp): score group g in lane g.
      for (int g = 0; g < p.n_group; ++g) {
        float top1 = neg_inf, top2 = neg_inf;
        int count = 0;
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
          if (key[i] && (e0 + i) / epg == g) {
            push_top2(b[i], top1, top2);
            ++count;
          }
        }
        for (int offset = 1; offset < 32; offset <<= 1) merge_top2(top1, top2, count, offset);
        if (sub_lane == g) group_score = group_score_of(top1, top2, count, need);
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
      if (!kept) {
#pragma unroll
        for (int i = 0; i < VPT; ++i) key[i] = 0;
      }
    } else {
      const uint32_t kept_groups = __ballot_sync(kFullMask, kept);
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        const int e = e0 + i;
        if (e < p.num_experts && !(kept_groups >> (e / epg) & 1u)) key[i] = 0;
      }
    }
  }

  // top_k rounds of a sub-warp arg-max. The owner of each winner records its s and id in `stage` and drops
  // it from its keys; nothing else crosses lanes.
  float* stage_s = stage;
  int* stage_id = reinterpret_cast<int*>(stage + p.top_k);
  float* stage_w = stage + 2 * p.top_k;
  bool incomplete = false;
  for (int r = 0; r < p.top_k; ++r) {
    uint32_t best_key = 0;
    int best_i = 0;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if (key[i] > best_key) {
        best_key = key[i];
        best_i = i;
      }
    }
    // Arg-max over the sub-warp in two hardware reductions: the largest key, then the lowest expert
    // holding it (equal keys are equal b; the lower index wins).
    const uint32_t own_key = best_key;
    best_key = __reduce_max_sync(sub_mask, own_key);
    const int best_e = static_cast<int>(
        __reduce_min_sync(sub_mask, own_key == best_key && best_key ? static_cast<uint32_t>(e0 + best_i) : 0x7fffffffu));
    incomplete |= best_key == 0;
    const int local = best_e - e0;
    if (best_key != 0 && local >= 0 && local < p.vpt) {
      float chosen_s = 0.0f;
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        if (i == local) {
          chosen_s = s[i];
          key[i] = 0;
        }
      }
      stage_s[r] = chosen_s;
      stage_id[r] = best_e;
    }
  }
  __syncwarp();

  const bool fallback = dead_group || incomplete;
  // Rule 5's sum, in output order, as every path adds it.
  float sum = 0.0f;
  if (!fallback) {
    for (int r = 0; r < p.top_k; ++r) sum = __fadd_rn(sum, stage_s[r]);
  }
  const float denom = __fadd_rn(sum, 1e-20f);
  const float fallback_w = __fdiv_rn(1.0f, static_cast<float>(p.top_k));
  for (int r = sub_lane; r < p.top_k; r += lanes) {
    const float w = fallback ? fallback_w : routed_weight(stage_s[r], denom, p);
    const int id = fallback ? r : stage_id[r];
    stage_w[r] = w;
    if (active) {
      out.values[token * p.top_k + r] = w;
      if (out.index64) {
        static_cast<int64_t*>(out.indices)[token * p.top_k + r] = id;
      } else {
        static_cast<int32_t*>(out.indices)[token * p.top_k + r] = id;
      }
    }
  }
  if (active && out.scores != nullptr) {
    // Zero this lane's slice, then the lanes that hold weights scatter them; __syncwarp orders the two.
    float* row = out.scores + token * p.num_experts;
    const bool vec = (p.num_experts % 4 == 0) && (p.vpt % 4 == 0) &&
                     (reinterpret_cast<uintptr_t>(out.scores) % 16 == 0);
    if (vec) {
#pragma unroll
      for (int i = 0; i < VPT; i += 4) {
        if (i < p.vpt && e0 + i < p.num_experts) {
          *reinterpret_cast<float4*>(row + e0 + i) = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        if (i < p.vpt && e0 + i < p.num_experts) row[e0 + i] = 0.0f;
      }
    }
  }
  __syncwarp();
  if (active && out.scores != nullptr) {
    float* row = out.scores + token * p.num_experts;
    for (int r = sub_lane; r < p.top_k; r += lanes) row[fallback ? r : stage_id[r]] = stage_w[r];
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
