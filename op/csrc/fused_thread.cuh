// The throughput kernel of path `fused`: one token per thread, for batches large enough to give every SM
// several warps of threads. The warp-per-token kernels spend most of their instructions on what crosses lanes
// (group merges, group ranks, top_k rounds of warp reductions), once per token; a thread holding a whole token
// needs none of it, and each instruction advances 32 tokens at once. The cost is a long chain per thread, which
// only a full GPU of such threads hides, hence its place at the top of the batch range.
//
// Per token, from one thread:
// - a bound that at least top_k keys reach: with groups scored (rule 3), the top_k-th largest of the kept groups'
//   top two keys, which the group pass computes anyway; without, the top_k-th largest of 16 maxima, each over
//   every 16th expert;
// - rule 4: the kept experts whose keys reach the bound, in ascending index, gathered into the thread's slots of
//   shared memory (about top_k of them, so few insertions); then inserted into a list of the best eight keys in
//   descending order, where a key passes strictly smaller keys only, so equal keys stay in index order. More
//   candidates than slots (many equal keys, or invalid ones) send the thread through every kept expert instead;
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
constexpr int kThreadBlock = kWarpsPerBlock * 32;
// Candidate slots per thread: random rows put about top_k keys at or above the bound.
constexpr int kThreadCandidates = 16;

// Batches from this many tokens up run one token per thread; $FUSEDGATE_THREAD_MIN_TOKENS sets it. No count
// selects the kernel by default until its crossover against the warp kernels has been measured.
inline int64_t thread_min_tokens() {
  static const char* env = std::getenv("FUSEDGATE_THREAD_MIN_TOKENS");
  if (env != nullptr) return std::atoll(env);
  return INT64_MAX;
}

// Rows loaded 16 bytes at a time (8 experts of 2 bytes, or 4 of float32 twice): every group must be a whole
// number of 8 experts, a row without scored groups of 16 (two loads a step, one per half of the maxima), and the
// logits 16-byte aligned. The scores rows are zeroed 16 bytes at a time.
inline bool thread_kernel_covers(const RoutingParams& p, const void* logits, const float* scores) {
  const bool layout = p.score_groups ? p.n_group <= kThreadMaxGroups && p.experts_per_group % 8 == 0
                                     : p.num_experts % 16 == 0;
  return layout && p.top_k <= kThreadTopK && reinterpret_cast<uintptr_t>(logits) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(scores) % 16 == 0;
}

inline size_t thread_kernel_smem(const RoutingParams& p) {
  return round_up4(p.num_experts) * sizeof(float) + (kThreadCandidates + 1) * kThreadBlock * sizeof(int2);
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

__device__ __forceinline__ int32_t key_of(float x, float bias) {
  return selection_key(__fadd_rn(sigmoid_f32(x), bias));
}

// The biases of experts c .. c+7 (c a multiple of 8), as two 16-byte shared loads.
__device__ __forceinline__ void bias8(const float* __restrict__ bias_s, int c, float (&b)[8]) {
  const float4 lo = *reinterpret_cast<const float4*>(bias_s + c);
  const float4 hi = *reinterpret_cast<const float4*>(bias_s + c + 4);
  b[0] = lo.x, b[1] = lo.y, b[2] = lo.z, b[3] = lo.w, b[4] = hi.x, b[5] = hi.y, b[6] = hi.z, b[7] = hi.w;
}

// The eight largest of a stream of keys, descending; two integer instructions a place.
struct TopKeys {
  int32_t key[kThreadTopK];

  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int j = 0; j < kThreadTopK; ++j) key[j] = kNoKey;
  }

  __device__ __forceinline__ void insert(int32_t k) {
#pragma unroll
    for (int j = kThreadTopK - 1; j >= 1; --j) key[j] = max(key[j], min(key[j - 1], k));
    key[0] = max(key[0], k);
  }

  // The r-th largest (from 0), read without indexing the array by a run-time value.
  __device__ __forceinline__ int32_t at(int r) const {
    int32_t v = kNoKey;
#pragma unroll
    for (int j = 0; j < kThreadTopK; ++j) v = j == r ? key[j] : v;
    return v;
  }
};

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

// Experts [first, first + count) of a row (count a multiple of 8), each into the list.
template <typename T>
__device__ __forceinline__ void offer_all(const T* __restrict__ row, const float* __restrict__ bias_s, int first,
                                          int count, BestList& best) {
  for (int c = first; c < first + count; c += 8) {
    float x[8], b[8];
    load8<T>(row + c, x);
    bias8(bias_s, c, b);
#pragma unroll
    for (int i = 0; i < 8; ++i) best.insert(key_of(x[i], b[i]), c + i);
  }
}

// Experts [first, first + count) whose keys reach `bound`, appended in index order to the thread's slots (slot j
// at slots[j * kThreadBlock]); returns the new count, which may pass the slots' capacity (those are not kept).
// Every key is stored, at the first free slot, and kept by counting it: no branch per expert, which a warp of
// different tokens would take apart. Slot kThreadCandidates takes whatever finds the slots full.
template <typename T>
__device__ __forceinline__ int gather(const T* __restrict__ row, const float* __restrict__ bias_s, int first,
                                      int count, int32_t bound, int2* slots, int n) {
  for (int c = first; c < first + count; c += 8) {
    float x[8], b[8];
    load8<T>(row + c, x);
    bias8(bias_s, c, b);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int32_t k = key_of(x[i], b[i]);
      slots[min(n, kThreadCandidates) * kThreadBlock] = make_int2(k, c + i);
      n += k >= bound;
    }
  }
  return n;
}

template <typename T>
__global__ void __launch_bounds__(kThreadBlock)
    fused_thread_kernel(const T* __restrict__ logits, const void* __restrict__ bias, int bias_kind, RoutingOutputs out,
                        const int32_t* __restrict__ num_tokens_ptr, int64_t num_tokens, RoutingParams p) {
  // Shared memory: the bias as float32 (a non-finite one as NaN, so b is finite or NaN, as route_token has it),
  // then every thread's candidate slots, interleaved so a warp's stores and loads of one slot are contiguous.
  extern __shared__ __align__(16) float smem[];
  float* bias_s = smem;
  int2* slots = reinterpret_cast<int2*>(smem + round_up4(p.num_experts)) + threadIdx.x;
  wait_for_previous_grid();
  allow_next_grid();
  for (int e = threadIdx.x; e < p.num_experts; e += blockDim.x) bias_s[e] = bias_value(bias, bias_kind, e);
  __syncthreads();
  const int64_t tokens = effective_tokens(num_tokens, num_tokens_ptr);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreadBlock;
  const float neg_inf = __int_as_float(0xff800000);
  const int epg = p.experts_per_group;

  // Whole warps step together: the score rows are zeroed by the warp.
  for (int64_t base = (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp) * 32; base < tokens; base += step) {
    const int64_t token = base + lane;
    const bool active = token < tokens;
    const T* row = logits + (active ? token : 0) * p.num_experts;
    BestList best;
    best.clear();
    bool dead_group = false;
    if (active) {
      // Kept groups as a mask (every expert when groups are not scored), and keys that bound the top_k.
      uint32_t kept = 1u;
      TopKeys reach;
      reach.clear();
      if (p.score_groups) {
        int32_t top1[kThreadMaxGroups], top2[kThreadMaxGroups];
        float group_score[kThreadMaxGroups];
#pragma unroll
        for (int g = 0; g < kThreadMaxGroups; ++g) {
          top1[g] = kInvalidKey, top2[g] = kInvalidKey;
          group_score[g] = neg_inf;
          if (g < p.n_group) {
            for (int c = g * epg; c < (g + 1) * epg; c += 8) {
              float x[8], b[8];
              load8<T>(row + c, x);
              bias8(bias_s, c, b);
#pragma unroll
              for (int i = 0; i < 8; ++i) push_top2(key_of(x[i], b[i]), top1[g], top2[g]);
            }
            group_score[g] = group_score_of(top1[g], top2[g], epg);
          }
        }
        // Ranks (ties to the lower group), and rule 7's dead group: a kept group scores -inf exactly when fewer
        // than topk_group groups are finite. Each kept group's top two are distinct experts of the kept set.
        kept = 0u;
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
            if (rank < p.topk_group) {
              kept |= 1u << g;
              reach.insert(top1[g]);
              reach.insert(top2[g]);
            }
            finite += group_score[g] > neg_inf;
          }
        }
        dead_group = finite < p.topk_group;
      } else {
        // The maximum of every 16th expert, 16 of them: each is a distinct expert.
        int32_t lo[8], hi[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) lo[i] = kNoKey, hi[i] = kNoKey;
        for (int c = 0; c < p.num_experts; c += 16) {
          float x[8], y[8], b[8], d[8];
          load8<T>(row + c, x);
          load8<T>(row + c + 8, y);
          bias8(bias_s, c, b);
          bias8(bias_s, c + 8, d);
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            lo[i] = max(lo[i], key_of(x[i], b[i]));
            hi[i] = max(hi[i], key_of(y[i], d[i]));
          }
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) reach.insert(lo[i]), reach.insert(hi[i]);
      }
      // A fallback's experts are fixed: nothing to select.
      if (!dead_group) {
        // At least top_k kept experts reach the bound, so the top_k are among those that do.
        const int32_t bound = reach.at(p.top_k - 1);
        const int span = p.score_groups ? epg : p.num_experts;
        int n = 0;
        uint32_t left = kept;
        for (int j = 0; j < (p.score_groups ? p.topk_group : 1); ++j) {
          const int g = __ffs(left) - 1;
          left &= left - 1u;
          n = gather<T>(row, bias_s, g * span, span, bound, slots, n);
        }
        if (n <= kThreadCandidates) {
          for (int j = 0; j < n; ++j) {
            const int2 c = slots[j * kThreadBlock];
            best.insert(c.x, c.y);
          }
        } else {
          left = kept;
          for (int j = 0; j < (p.score_groups ? p.topk_group : 1); ++j) {
            const int g = __ffs(left) - 1;
            left &= left - 1u;
            offer_all<T>(row, bias_s, g * span, span, best);
          }
        }
      }
    }
    // Rule 7: fewer than top_k valid keys among the kept experts.
    bool incomplete = false;
#pragma unroll
    for (int r = 0; r < kThreadTopK; ++r) incomplete |= r < p.top_k && best.key[r] <= kInvalidKey;
    const bool fallback = dead_group || incomplete;
    // The chosen s again from their logits (cheaper than carrying every s through the insertions), and rule 5's
    // sum of them in output order, as every path adds it.
    float chosen_s[kThreadTopK];
    float sum = 0.0f;
#pragma unroll
    for (int r = 0; r < kThreadTopK; ++r) {
      chosen_s[r] = 0.0f;
      if (r < p.top_k && active && !fallback) {
        chosen_s[r] = sigmoid_f32(to_float<T>(row[best.id[r]]));
        sum = __fadd_rn(sum, chosen_s[r]);
      }
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
          write_choice(out, token, p.top_k, p.num_experts, r, id, w);
        }
      }
    }
  }
}

}  // namespace fusedgate
