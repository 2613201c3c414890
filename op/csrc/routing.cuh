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

// 2^t by the hardware exponential, flushing results below 2^-126 to zero. Here that changes nothing: such a
// value vanishes in 1 + e anyway, and skipping the denormal range check saves three instructions per expert.
__device__ __forceinline__ float exp2_ftz(float t) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(t));
  return r;
}

// Rule 1, written with explicit round-to-nearest intrinsics so no contraction changes a bit between paths.
// The correctly rounded reciprocal equals the IEEE quotient 1 / y at a fraction of a division's cost. The
// exponential is the hardware one (ex2.approx of -x * log2 e): its error in s stays far below the alignment
// standard's 8 ulp at 1.0 in b and 1e-5 relative in the weights, and every GPU path shares this function.
__device__ __forceinline__ float sigmoid_rn(float x) {
  return __frcp_rn(__fadd_rn(1.0f, exp2_ftz(__fmul_rn(x, -1.4426950408889634f))));
}

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

// Per-token shared memory: room for the selection candidates (64-bit order keys, then their s), then the
// chosen s, ids and weights (top_k each). A token never has more candidates than the experts its lanes hold,
// so narrow layouts (many tokens per warp) keep their blocks' shared memory small. An even word count keeps
// every token's 64-bit keys 8-byte aligned.
constexpr int kCandidates = 32;

__host__ __device__ inline int candidate_slots(const RoutingParams& p) {
  return p.lanes * p.vpt < kCandidates ? p.lanes * p.vpt : kCandidates;
}

__host__ __device__ inline int stage_words(const RoutingParams& p) {
  const int words = 3 * candidate_slots(p) + 3 * p.top_k;
  return words + (words & 1);
}

enum class Selection { kDone, kIncomplete, kTooMany };

// Select the top_k keys of a sub-warp through a threshold, writing their s and ids to the stage in output
// order (b descending, then index ascending). Lanes' maxima taken top_k times (a repeated maximum drops every
// lane holding it) end at a value that at least top_k keys reach, so the top_k keys are among the keys at or
// above it. Those candidates are compacted into shared memory and each ranks itself against the others.
// kIncomplete: fewer than top_k keys are valid (rule 7's fallback). kTooMany: more than `slots` keys pass
// (many equal keys) and nothing was written; the caller then selects round by round.
template <int VPT>
__device__ __forceinline__ Selection select_by_threshold(const uint32_t (&key)[VPT], const float (&s)[VPT], int e0,
                                                         int sub_lane, int lanes, unsigned sub_mask, int top_k,
                                                         int slots, float* stage) {
  uint32_t lane_max = 0;
#pragma unroll
  for (int i = 0; i < VPT; ++i) lane_max = max(lane_max, key[i]);
  uint32_t threshold = 0, v = lane_max;
  bool exhausted = false;
  for (int r = 0; r < top_k; ++r) {
    const uint32_t m = __reduce_max_sync(sub_mask, v);
    exhausted |= m == 0;
    threshold = m != 0 ? m : threshold;
    v = v == m ? 0u : v;
  }
  // Fewer than top_k lanes hold a valid key: every valid key is a candidate.
  if (exhausted) threshold = 1;
  int count = 0;
#pragma unroll
  for (int i = 0; i < VPT; ++i) count += key[i] >= threshold;
  const int total = static_cast<int>(__reduce_add_sync(sub_mask, static_cast<uint32_t>(count)));
  if (total < top_k) return Selection::kIncomplete;
  if (total > slots) return Selection::kTooMany;
  int inclusive = count;
  for (int d = 1; d < lanes; d <<= 1) {
    const int below = __shfl_up_sync(sub_mask, inclusive, d, lanes);
    if (sub_lane >= d) inclusive += below;
  }
  // Order key: the selection key above the complemented expert id, so a larger order key is the better
  // expert, ties included (equal b: the lower index wins), and no two candidates compare equal.
  uint64_t* order = reinterpret_cast<uint64_t*>(stage);
  float* cand_s = stage + 2 * slots;
  int pos = inclusive - count;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    if (key[i] >= threshold) {
      order[pos] = (static_cast<uint64_t>(key[i]) << 32) | static_cast<uint32_t>(~(e0 + i));
      cand_s[pos] = s[i];
      ++pos;
    }
  }
  __syncwarp(sub_mask);
  float* stage_s = stage + 3 * slots;
  int* stage_id = reinterpret_cast<int*>(stage_s + top_k);
  for (int j = sub_lane; j < total; j += lanes) {
    const uint64_t mine = order[j];
    int rank = 0;
    for (int q = 0; q < total; ++q) rank += order[q] > mine;
    if (rank < top_k) {
      stage_s[rank] = cand_s[j];
      stage_id[rank] = static_cast<int>(~static_cast<uint32_t>(mine));
    }
  }
  return Selection::kDone;
}

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

  const int slots = candidate_slots(p);
  float* stage_s = stage + 3 * slots;
  int* stage_id = reinterpret_cast<int*>(stage_s + p.top_k);
  float* stage_w = stage_s + 2 * p.top_k;
  const Selection selection =
      select_by_threshold<VPT>(key, s, e0, sub_lane, lanes, sub_mask, p.top_k, slots, stage);
  bool incomplete = selection == Selection::kIncomplete;
  if (selection == Selection::kTooMany) {
    // top_k rounds of a sub-warp arg-max. The owner of each winner records its s and id in `stage` and
    // drops it from its keys; nothing else crosses lanes.
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
      const int best_e = static_cast<int>(__reduce_min_sync(
          sub_mask, own_key == best_key && best_key ? static_cast<uint32_t>(e0 + best_i) : 0x7fffffffu));
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
