// The throughput kernel of path `fused`: one token per thread, for batches large enough to give every SM
// several warps of threads. The warp-per-token kernels spend most of their instructions on what crosses lanes
// (group merges, group ranks, top_k rounds of warp reductions), once per token; a thread holding a whole token
// needs none of it, and each instruction advances 32 tokens at once. The cost is a long chain per thread, which
// only a full GPU of such threads hides, hence its place at the top of the batch range.
//
// Per token, from one thread:
// - rule 3 (when groups are scored): every expert's selection key, each group's top two keys, the group scores,
//   and the ranks of the groups (ties to the lower group), as `route_token` computes them;
// - rule 4: the kept groups' experts, in ascending index, inserted into a list of the best eight keys kept in
//   descending order; a key moves past strictly smaller keys only, so equal keys stay in index order;
// - rules 5-7: the chosen s recomputed from the logits, their sum in output order, the fallback, the weights,
//   all with the shared arithmetic, so outputs are bit-identical with the other kernels.
// The warp zeroes its tokens' score rows together (coalesced), then each thread writes its token's weights.
#pragma once

#include <cstdlib>

#include "routing.cuh"

namespace fusedgate {

// The kernel's capacities: every model preset fits (at most 8 groups, top_k at most 8).
constexpr int kThreadMaxGroups = 8;
constexpr int kThreadTopK = 8;

// Batches from this many tokens up run one token per thread; $FUSEDGATE_THREAD_MIN_TOKENS overrides it.
inline int64_t thread_min_tokens() {
  static const char* env = std::getenv("FUSEDGATE_THREAD_MIN_TOKENS");
  if (env != nullptr) return std::atoll(env);
  return 32768;
}

// Rows loaded 16 bytes at a time (8 experts of 2 bytes, or 4 of float32 twice): every group and the row must be a
// whole number of 8 experts, and the logits 16-byte aligned. The scores rows are zeroed 16 bytes at a time.
inline bool thread_kernel_covers(const RoutingParams& p, const void* logits, const float* scores) {
  const bool groups_fit = !p.score_groups || (p.n_group <= kThreadMaxGroups && p.experts_per_group % 8 == 0);
  return groups_fit && p.top_k <= kThreadTopK && p.num_experts % 8 == 0 &&
         reinterpret_cast<uintptr_t>(logits) % 16 == 0 && reinterpret_cast<uintptr_t>(scores) % 16 == 0;
}

// Eight logits from a 16-byte aligned address, as float32.
template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ at, float (&x)[8]);

template <>
__device__ __forceinline__ void load8<float>(const float* __restrict__ at, float (&x)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(at));
  const float4 b = __ldg(reinterpret_cast<const float4*>(at) + 1);
  x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
}

template <typename T>
__device__ __forceinline__ void load8_half_width(const T* __restrict__ at, float (&x)[8]) {
  const uint4 w = __ldg(reinterpret_cast<const uint4*>(at));
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    T lo, hi;
    const uint16_t lo_bits = static_cast<uint16_t>(words[i] & 0xffffu);
    const uint16_t hi_bits = static_cast<uint16_t>(words[i] >> 16);
    memcpy(&lo, &lo_bits, sizeof(T));
    memcpy(&hi, &hi_bits, sizeof(T));
    x[2 * i] = to_float<T>(lo);
    x[2 * i + 1] = to_float<T>(hi);
  }
}

template <>
__device__ __forceinline__ void load8<__nv_bfloat16>(const __nv_bfloat16* __restrict__ at, float (&x)[8]) {
  load8_half_width(at, x);
}

template <>
__device__ __forceinline__ void load8<__half>(const __half* __restrict__ at, float (&x)[8]) {
  load8_half_width(at, x);
}

// A token's best keys so far, descending, with their experts.
struct BestList {
  int32_t key[kThreadTopK];
  int id[kThreadTopK];

  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int j = 0; j < kThreadTopK; ++j) key[j] = kNoKey, id[j] = 0;
  }

  // Slot j takes slot j-1's entry where k beats that, else k where k beats slot j's own: `beats` is monotone
  // down a descending list, so this is one insertion without a loop-carried chain.
  __device__ __forceinline__ void insert(int32_t k, int e) {
    bool beats[kThreadTopK];
#pragma unroll
    for (int j = 0; j < kThreadTopK; ++j) beats[j] = k > key[j];
#pragma unroll
    for (int j = kThreadTopK - 1; j >= 1; --j) {
      key[j] = beats[j - 1] ? key[j - 1] : (beats[j] ? k : key[j]);
      id[j] = beats[j - 1] ? id[j - 1] : (beats[j] ? e : id[j]);
    }
    key[0] = beats[0] ? k : key[0];
    id[0] = beats[0] ? e : id[0];
  }
};

// Experts [first, first + count) of a row (count a multiple of 8) into the list.
template <typename T>
__device__ __forceinline__ void offer_experts(const T* __restrict__ row, const float* __restrict__ bias_s, int first,
                                              int count, BestList& best) {
  for (int c = first; c < first + count; c += 8) {
    float x[8];
    load8<T>(row + c, x);
    const float4 b0 = *reinterpret_cast<const float4*>(bias_s + c);
    const float4 b1 = *reinterpret_cast<const float4*>(bias_s + c + 4);
    const float bias[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) best.insert(selection_key(__fadd_rn(sigmoid_f32(x[i]), bias[i])), c + i);
  }
}

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    fused_thread_kernel(const T* __restrict__ logits, const void* __restrict__ bias, int bias_kind, RoutingOutputs out,
                        const int32_t* __restrict__ num_tokens_ptr, int64_t num_tokens, RoutingParams p) {
  // The bias as float32, a non-finite one as NaN (so b is finite or NaN, as route_token has it).
  extern __shared__ __align__(16) float bias_s[];
  wait_for_previous_grid();
  allow_next_grid();
  for (int e = threadIdx.x; e < p.num_experts; e += blockDim.x) bias_s[e] = bias_value(bias, bias_kind, e);
  __syncthreads();
  const int64_t tokens = effective_tokens(num_tokens, num_tokens_ptr);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock * 32;
  const float neg_inf = __int_as_float(0xff800000);

  // Whole warps step together: the score rows are zeroed by the warp.
  for (int64_t base = (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp) * 32; base < tokens; base += step) {
    const int64_t token = base + lane;
    const bool active = token < tokens;
    const T* row = logits + (active ? token : 0) * p.num_experts;
    BestList best;
    best.clear();
    bool dead_group = false;
    if (active) {
      if (p.score_groups) {
        const int epg = p.experts_per_group;
        float group_score[kThreadMaxGroups];
#pragma unroll
        for (int g = 0; g < kThreadMaxGroups; ++g) {
          group_score[g] = neg_inf;
          if (g < p.n_group) {
            int32_t top1 = kInvalidKey, top2 = kInvalidKey;
            for (int c = g * epg; c < (g + 1) * epg; c += 8) {
              float x[8];
              load8<T>(row + c, x);
#pragma unroll
              for (int i = 0; i < 8; ++i)
                push_top2(selection_key(__fadd_rn(sigmoid_f32(x[i]), bias_s[c + i])), top1, top2);
            }
            group_score[g] = group_score_of(top1, top2, epg);
          }
        }
        // Ranks (ties to the lower group), the kept groups as a mask, and rule 7's dead group: a kept group
        // scores -inf exactly when fewer than topk_group groups are finite.
        uint32_t kept = 0;
        int finite = 0;
#pragma unroll
        for (int g = 0; g < kThreadMaxGroups; ++g) {
          if (g < p.n_group) {
            int rank = 0;
#pragma unroll
            for (int h = 0; h < kThreadMaxGroups; ++h) {
              rank += h < p.n_group &&
                      ((group_score[h] > group_score[g]) || (group_score[h] == group_score[g] && h < g));
            }
            kept |= static_cast<uint32_t>(rank < p.topk_group) << g;
            finite += group_score[g] > neg_inf;
          }
        }
        dead_group = finite < p.topk_group;
        // Kept groups in ascending order, so experts arrive in ascending index.
        for (int j = 0; j < p.topk_group; ++j) {
          const int g = __ffs(kept) - 1;
          kept &= kept - 1u;
          offer_experts<T>(row, bias_s, g * epg, epg, best);
        }
      } else {
        offer_experts<T>(row, bias_s, 0, p.num_experts, best);
      }
    }
    // Rule 7: fewer than top_k valid keys among the kept experts.
    bool incomplete = false;
    float chosen_s[kThreadTopK];
    float sum = 0.0f;
#pragma unroll
    for (int r = 0; r < kThreadTopK; ++r) {
      chosen_s[r] = 0.0f;
      if (r < p.top_k) {
        incomplete |= best.key[r] <= kInvalidKey;
        // The chosen s again from its logit: cheaper than carrying every s through the insertions.
        if (active) chosen_s[r] = sigmoid_f32(to_float<T>(row[best.id[r]]));
      }
    }
    const bool fallback = dead_group || incomplete;
    // Rule 5's sum in output order, as every path adds it.
#pragma unroll
    for (int r = 0; r < kThreadTopK; ++r) {
      if (r < p.top_k && !fallback) sum = __fadd_rn(sum, chosen_s[r]);
    }
    const float denom = __fadd_rn(sum, 1e-20f);
    if (out.scores != nullptr) {
      // The warp zeroes its tokens' rows together, 16 bytes a lane, then each thread writes its weights.
      const int64_t rows_here = tokens - base < 32 ? tokens - base : 32;
      for (int t = 0; t < rows_here; ++t) {
        float* zero_row = out.scores + (base + t) * p.num_experts;
        for (int e = lane * 4; e < p.num_experts; e += 128)
          *reinterpret_cast<float4*>(zero_row + e) = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
      __syncwarp();
    }
    if (active) {
#pragma unroll
      for (int r = 0; r < kThreadTopK; ++r) {
        if (r < p.top_k) {
          const float w = fallback ? p.fallback_weight : routed_weight(chosen_s[r], denom, p);
          const int id = fallback ? r : best.id[r];
          out.values[token * p.top_k + r] = w;
          if (out.index64) {
            static_cast<int64_t*>(out.indices)[token * p.top_k + r] = id;
          } else {
            static_cast<int32_t*>(out.indices)[token * p.top_k + r] = id;
          }
          if (out.scores != nullptr) out.scores[token * p.num_experts + id] = w;
        }
      }
    }
  }
}

}  // namespace fusedgate
