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
// Both special-function steps are the hardware approximations: ex2.approx of -x * log2 e and rcp.approx of
// 1 + e (at most 1 ulp). Their error in s, a few ulp of 2^-24, stays far below the alignment standard's 8 ulp
// at 1.0 in b and 1e-5 relative in the weights, and every GPU path shares this function, so they stay
// bit-identical with each other. The correctly rounded reciprocal cost seven more instructions per expert.
// rcp.approx.ftz flushes results below 2^-126, which 1 + e above 2^126 (x below about -87.3) would give, so
// the reciprocal is taken of (1 + e) / 4, below 2^126 until 1 + e overflows as the reference's does, and
// scaled back: s keeps its subnormal values, and elsewhere both scalings by 4 are exact.
__device__ __forceinline__ float rcp_approx_ftz(float y) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(y));
  return r;
}

__device__ __forceinline__ float sigmoid_f32(float x) {
  const float e = exp2_ftz(__fmul_rn(x, -1.4426950408889634f));
  return __fmul_rn(rcp_approx_ftz(__fmaf_rn(e, 0.25f, 0.25f)), 0.25f);
}

// Selection keys: a signed, order-preserving image of b, two integer instructions per expert. Its own
// inverse, so a key turns back into its float exactly. An invalid b (NaN) is mapped to -inf first, whose key
// kInvalidKey is below that of every finite b; kNoKey is below every key.
constexpr int32_t kInvalidKey = static_cast<int32_t>(0x807fffffu);
constexpr int32_t kNoKey = static_cast<int32_t>(0x80000000u);

__device__ __forceinline__ int32_t flip_order(int32_t v) { return v ^ ((v >> 31) & 0x7fffffff); }

__device__ __forceinline__ int32_t selection_key(float b) {
  return flip_order(__float_as_int(fmaxf(b, __int_as_float(0xff800000))));
}

// Keep the two largest keys of a stream, branch-free; a repeated maximum fills both places.
__device__ __forceinline__ void push_top2(int32_t k, int32_t& top1, int32_t& top2) {
  top2 = max(top2, min(top1, k));
  top1 = max(top1, k);
}

// Merge the top-2 of lanes `offset` apart (xor butterfly over the whole warp).
__device__ __forceinline__ void merge_top2(int32_t& top1, int32_t& top2, int offset) {
  const int32_t o1 = __shfl_xor_sync(0xffffffffu, top1, offset);
  const int32_t o2 = __shfl_xor_sync(0xffffffffu, top2, offset);
  top2 = max(max(top2, o2), min(top1, o1));
  top1 = max(top1, o1);
}

// Rule 3's group score from the group's top-2 keys: invalid experts are -inf, so a group with fewer valid
// experts than it sums scores -inf.
__device__ __forceinline__ float group_score_of(int32_t top1, int32_t top2, int experts_per_group) {
  const float v1 = __int_as_float(flip_order(top1));
  return experts_per_group >= 2 ? __fadd_rn(v1, __int_as_float(flip_order(top2))) : v1;
}

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

// Element e of a bias tagged 0 float32, 1 bfloat16, 2 float16, as float32; a non-finite bias as NaN, so that
// b = s + bias is finite or NaN (rule 2), all that selection has to tell apart.
__device__ __forceinline__ float bias_value(const void* __restrict__ bias, int kind, int e) {
  const float v = kind == 0   ? static_cast<const float*>(bias)[e]
                  : kind == 1 ? to_float<__nv_bfloat16>(static_cast<const __nv_bfloat16*>(bias)[e])
                              : to_float<__half>(static_cast<const __half*>(bias)[e]);
  return isfinite(v) ? v : __int_as_float(0x7fc00000);
}

// Per-token shared memory, 16-byte aligned: candidate records (64-bit order key, then s, 16 bytes each), then
// the chosen s and ids, each padded to a multiple of 4 so they are read as float4. A token never has more
// candidates than the experts its lanes hold, so narrow layouts keep their blocks' shared memory small.
constexpr int kCandidates = 32;

__host__ __device__ inline int round_up4(int v) { return (v + 3) & ~3; }

__host__ __device__ inline int candidate_slots(const RoutingParams& p) {
  return p.lanes * p.vpt < kCandidates ? p.lanes * p.vpt : kCandidates;
}

__host__ __device__ inline int stage_words(const RoutingParams& p) {
  return 4 * round_up4(candidate_slots(p)) + 2 * round_up4(p.top_k);
}

enum class Selection { kDone, kIncomplete, kTooMany };

// Zero the padding after the chosen s, so their sum can be read four at a time.
__device__ __forceinline__ void pad_chosen(float* stage_s, int top_k, int sub_lane, int lanes) {
  for (int r = top_k + sub_lane; r < round_up4(top_k); r += lanes) stage_s[r] = 0.0f;
}

// Candidate record: the selection key above the complemented expert id, read as one signed 64-bit value, so
// a larger record is the better expert, ties included (equal b: the lower index wins), and no two compare
// equal; then the expert's s.
struct alignas(16) Candidate {
  uint32_t not_id;
  int32_t key;
  float s;
  float unused;
};

__device__ __forceinline__ int64_t order_of(const Candidate& c) {
  return static_cast<int64_t>((static_cast<uint64_t>(static_cast<uint32_t>(c.key)) << 32) | c.not_id);
}

// Select the top_k keys of a sub-warp through a threshold, writing their s and ids to the stage in output
// order (b descending, then index ascending). Lanes' maxima taken top_k times (a repeated maximum drops every
// lane holding it) end at a value that at least top_k keys reach, so the top_k keys are among the keys at or
// above it. Those candidates are compacted into shared memory and each ranks itself against the others.
// kIncomplete: fewer than top_k keys are valid (rule 7's fallback). kTooMany: more than `slots` keys pass
// (many equal keys) and nothing was written; the caller then selects round by round. K > 0 fixes top_k at
// compile time, so the threshold rounds unroll.
template <int VPT, int K = 0>
__device__ __forceinline__ Selection select_by_threshold(const int32_t (&key)[VPT], const float (&s)[VPT], int e0,
                                                         int sub_lane, int lanes, unsigned sub_mask, int top_k_arg,
                                                         int slots, float* stage) {
  const int top_k = K > 0 ? K : top_k_arg;
  int32_t v = key[0];
#pragma unroll
  for (int i = 1; i < VPT; ++i) v = max(v, key[i]);
  int32_t threshold = kInvalidKey;
#pragma unroll
  for (int r = 0; r < top_k; ++r) {
    const int32_t m = __reduce_max_sync(sub_mask, v);
    threshold = m;
    v = v == m ? kNoKey : v;
  }
  // Fewer than top_k lanes hold a valid key: every valid key is a candidate.
  threshold = max(threshold, kInvalidKey + 1);
  int count = 0;
#pragma unroll
  for (int i = 0; i < VPT; ++i) count += key[i] >= threshold;
  const int total = static_cast<int>(__reduce_add_sync(sub_mask, static_cast<uint32_t>(count)));
  if (total < top_k) return Selection::kIncomplete;
  if (total > slots) return Selection::kTooMany;
  // Exclusive prefix of the counts over the sub-warp, one ballot per bit of a count: no chain of shuffles.
  const unsigned below = sub_mask & ((1u << (threadIdx.x & 31)) - 1u);
  int pos = 0;
#pragma unroll
  for (int bit = 0; (1 << bit) <= VPT; ++bit) pos += __popc(__ballot_sync(sub_mask, count >> bit & 1) & below) << bit;
  Candidate* cand = reinterpret_cast<Candidate*>(stage);
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    if (key[i] >= threshold) {
      cand[pos] = Candidate{~static_cast<uint32_t>(e0 + i), key[i], s[i], 0.0f};
      ++pos;
    }
  }
  // Pad to a multiple of 4 records that beat nothing, so the ranking loop runs unguarded in steps of 4.
  const int padded = round_up4(total);
  for (int j = total + sub_lane; j < padded; j += lanes) cand[j] = Candidate{0u, kNoKey, 0.0f, 0.0f};
  __syncwarp(sub_mask);
  float* stage_s = stage + 4 * round_up4(slots);
  int* stage_id = reinterpret_cast<int*>(stage_s + round_up4(top_k));
  for (int j = sub_lane; j < total; j += lanes) {
    const Candidate c = cand[j];
    const int64_t mine = order_of(c);
    int rank = 0;
    for (int q = 0; q < padded; q += 4) {
#pragma unroll
      for (int u = 0; u < 4; ++u) rank += order_of(cand[q + u]) > mine;
    }
    if (rank < top_k) {
      stage_s[rank] = c.s;
      stage_id[rank] = static_cast<int>(~c.not_id);
    }
  }
  pad_chosen(stage_s, top_k, sub_lane, lanes);
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

// Rule 6's outputs for a token's r-th choice, expert `id` at weight `w`: the value, the index (int32 or int64)
// and, where scores are written, the weight in the token's row. Every kernel writes its choices through here.
__device__ __forceinline__ void write_choice(const RoutingOutputs& out, int64_t token, int top_k, int num_experts,
                                             int r, int id, float w) {
  out.values[token * top_k + r] = w;
  if (out.index64) {
    static_cast<int64_t*>(out.indices)[token * top_k + r] = id;
  } else {
    static_cast<int32_t*>(out.indices)[token * top_k + r] = id;
  }
  if (out.scores != nullptr) out.scores[token * num_experts + id] = w;
}

// Route one token held by `p.lanes` lanes of the warp. Every lane of the warp calls this with the same
// parameters (inactive sub-warps too, with `active` false and every b invalid), because it shuffles across
// the whole warp. `b` is finite or NaN (invalid); `stage` is this token's stage_words(p) words of shared
// memory, 16-byte aligned. K > 0 is p.top_k fixed at compile time: the rounds, the sum and the output loop
// unroll.
template <int VPT, int K = 0>
__device__ __forceinline__ void route_token(const float (&s)[VPT], const float (&b)[VPT], int64_t token, bool active,
                                            const RoutingParams& p, RoutingOutputs out, float* stage) {
  const int top_k = K > 0 ? K : p.top_k;
  const int lane = threadIdx.x & 31;
  const int lanes = p.lanes;
  const int sub_lane = lane & (lanes - 1);
  const int sub_base = lane - sub_lane;
  const int e0 = sub_lane * p.vpt;
  const unsigned sub_mask = lanes == 32 ? kFullMask : ((1u << lanes) - 1u) << sub_base;
  const float neg_inf = __int_as_float(0xff800000);

  // Selection keys, computed once, so group scoring and every round compare integers only.
  int32_t key[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) key[i] = selection_key(b[i]);

  bool dead_group = false;
  if (p.score_groups) {
    const int epg = p.experts_per_group;
    const int lpg = p.lanes_per_group > 0 ? p.lanes_per_group : 1;
    float group_score = neg_inf;
    if (p.lanes_per_group > 0) {
      int32_t top1 = kInvalidKey, top2 = kInvalidKey;
#pragma unroll
      for (int i = 0; i < VPT; ++i) push_top2(key[i], top1, top2);
      for (int offset = 1; offset < lpg; offset <<= 1) merge_top2(top1, top2, offset);
      group_score = group_score_of(top1, top2, epg);
    } else {
      // Generic layout (one token per warp): score group g in lane g.
      for (int g = 0; g < p.n_group; ++g) {
        int32_t top1 = kInvalidKey, top2 = kInvalidKey;
#pragma unroll
        for (int i = 0; i < VPT; ++i) push_top2((e0 + i) / epg == g ? key[i] : kInvalidKey, top1, top2);
        for (int offset = 1; offset < 32; offset <<= 1) merge_top2(top1, top2, offset);
        if (sub_lane == g) group_score = group_score_of(top1, top2, epg);
      }
    }
    // Rank every group against the others (ties go to the lower group index). The lanes of a group split
    // the comparisons, then add their counts.
    const int shift = __ffs(lpg) - 1;
    const int my_group = sub_lane >> shift;
    const int part = sub_lane & (lpg - 1);
    int rank = 0;
    const int per_lane = (p.n_group + lpg - 1) >> shift;
    for (int j = 0; j < per_lane; ++j) {
      const int h = part + (j << shift);
      const float other = __shfl_sync(kFullMask, group_score, sub_base + (min(h, p.n_group - 1) << shift));
      rank += h < p.n_group && ((other > group_score) || (other == group_score && h < my_group));
    }
    for (int offset = 1; offset < lpg; offset <<= 1) rank += __shfl_xor_sync(kFullMask, rank, offset);
    // A kept group scores -inf exactly when fewer than topk_group groups are finite.
    const unsigned finite =
        __ballot_sync(kFullMask, part == 0 && my_group < p.n_group && group_score > neg_inf) & sub_mask;
    dead_group = __popc(finite) < p.topk_group;
    const bool kept = my_group < p.n_group && rank < p.topk_group;
    if (p.lanes_per_group > 0) {
      if (!kept) {
#pragma unroll
        for (int i = 0; i < VPT; ++i) key[i] = kInvalidKey;
      }
    } else {
      const uint32_t kept_groups = __ballot_sync(kFullMask, kept);
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        const int e = e0 + i;
        if (e < p.num_experts && !(kept_groups >> (e / epg) & 1u)) key[i] = kInvalidKey;
      }
    }
  }

  const int slots = candidate_slots(p);
  float* stage_s = stage + 4 * round_up4(slots);
  int* stage_id = reinterpret_cast<int*>(stage_s + round_up4(top_k));
  const Selection selection = select_by_threshold<VPT, K>(key, s, e0, sub_lane, lanes, sub_mask, top_k, slots, stage);
  bool incomplete = selection == Selection::kIncomplete;
  if (selection == Selection::kTooMany) {
    // top_k rounds of a sub-warp arg-max. The owner of each winner records its s and id in `stage` and
    // drops it from its keys; nothing else crosses lanes.
    for (int r = 0; r < top_k; ++r) {
      int32_t best_key = kNoKey;
      int best_i = 0;
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        if (key[i] > best_key) {
          best_key = key[i];
          best_i = i;
        }
      }
      // The largest key, then the lowest expert holding it (equal keys are equal b; the lower index wins).
      const int32_t own_key = best_key;
      best_key = __reduce_max_sync(sub_mask, own_key);
      const int held = own_key == best_key ? e0 + best_i : 0x7fffffff;
      const int best_e = __reduce_min_sync(sub_mask, held);
      incomplete |= best_key <= kInvalidKey;
      const int local = best_e - e0;
      if (best_key > kInvalidKey && local >= 0 && local < p.vpt) {
        float chosen_s = 0.0f;
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
          if (i == local) {
            chosen_s = s[i];
            key[i] = kNoKey;
          }
        }
        stage_s[r] = chosen_s;
        stage_id[r] = best_e;
      }
    }
    pad_chosen(stage_s, top_k, sub_lane, lanes);
  }
  __syncwarp();

  const bool fallback = dead_group || incomplete;
  // Rule 5's sum, in output order, as every path adds it; the zero padding adds nothing.
  float sum = 0.0f;
  if (!fallback) {
    const float4* chosen = reinterpret_cast<const float4*>(stage_s);
    for (int q = 0; q < round_up4(top_k) / 4; ++q) {
      const float4 c = chosen[q];
      sum = __fadd_rn(__fadd_rn(__fadd_rn(__fadd_rn(sum, c.x), c.y), c.z), c.w);
    }
  }
  const float denom = __fadd_rn(sum, 1e-20f);
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
  for (int r = sub_lane; r < top_k; r += lanes) {
    const float w = fallback ? p.fallback_weight : routed_weight(stage_s[r], denom, p);
    const int id = fallback ? r : stage_id[r];
    if (active) write_choice(out, token, top_k, p.num_experts, r, id, w);
  }
  __syncwarp();
}

// Programmatic dependent launch (sm_90+): wait until the previous kernel in the stream has finished and its
// writes are visible before touching global memory, then let the next kernel start its own launch while this
// one runs. Launched without the attribute, both are no-ops.
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// A lane's place in the grid-strided walk over tokens of the warp-per-token kernels: each step its warp
// routes the tokens from `base` on, this lane's token is base + sub, its experts start at e0, and `stage` is
// that token's shared memory. The walk advances by whole warps, so every sub-warp of a warp steps together
// (route_token shuffles across the warp).
struct TokenWalk {
  int64_t base;
  int64_t step;
  int sub;
  int e0;
  float* stage;
};

__device__ __forceinline__ TokenWalk token_walk(const RoutingParams& p, float* stage_all) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int tokens_per_warp = 32 / p.lanes;
  TokenWalk walk;
  walk.sub = lane / p.lanes;
  walk.e0 = (lane & (p.lanes - 1)) * p.vpt;
  walk.stage = stage_all + (warp * tokens_per_warp + walk.sub) * stage_words(p);
  walk.step = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock * tokens_per_warp;
  walk.base = (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp) * tokens_per_warp;
  return walk;
}

// Tokens this launch computes: all of them, or the first *num_tokens (CUDA-graph buckets).
__device__ __forceinline__ int64_t effective_tokens(int64_t num_tokens, const int32_t* num_tokens_ptr) {
  if (num_tokens_ptr == nullptr) return num_tokens;
  const int64_t n = *num_tokens_ptr;
  return n < 0 ? 0 : (n < num_tokens ? n : num_tokens);
}

}  // namespace fusedgate
