// The small-batch kernel of path `fused`: one block per token, one thread per expert, so the chain from a
// token's logits to its outputs is a handful of parallel steps instead of one warp's long serial walk. At a
// few tokens the launch and that chain are the whole cost; the warp-per-token kernel in fused.cu takes over
// where throughput matters. Both run the same arithmetic (sigmoid_f32, the selection keys, the sum in output
// order, routed_weight), so their outputs are bit-identical.
//
// Steps, each separated by one barrier:
//   1. every thread loads its logit and bias, zeroes its `scores` element, computes s, b and the key; with
//      group scoring each group's top-2 keys (groups never straddle a warp) give its score;
//   2. every thread ranks its group among all groups; in each warp every lane ranks its (kept) key against
//      the other 31 by shuffles, and the lanes ranked below top_k write themselves as candidates;
//   3. each candidate ranks itself against all candidates (order key: b, then the lower index); the top_k
//      land in output order;
//   4. warp 0 sums the chosen s in output order, divides, scales and writes.
#pragma once

#include <cstdlib>

#include "launch.cuh"

namespace fusedgate {

// The candidate array holds top_k per warp (or per kept group where a group is a whole warp).
constexpr int kLatencyMaxWarps = kMaxExperts / 32;
constexpr int kLatencyMaxCandidates = kLatencyMaxWarps * kMaxTopK;

// Whether the block-per-token kernel covers p: groups, when scored, must lie inside one warp at lane offsets
// that a butterfly over a power-of-two span can reach.
inline bool latency_kernel_covers(const RoutingParams& p) {
  if (!p.score_groups) return true;
  const int epg = p.experts_per_group;
  return epg <= 32 && (epg & (epg - 1)) == 0;
}

// Experts past E: below every key, invalid ones included, and one above kNoKey, so `key - 1` cannot wrap.
constexpr int32_t kAbsentKey = kNoKey + 1;

// Token counts up to which `fused` runs this kernel. Its blocks hold one thread per expert, so it pays while
// they fit the GPU in about one wave: up to 98304 threads in all, the crossover measured on an H200 for every
// preset (op/csrc/NOTES.md, v7). FUSEDGATE_LATENCY_MAX_TOKENS overrides it (read once), so a benchmark can time
// either kernel at any count.
constexpr int64_t kLatencyThreads = 98304;

static inline int64_t latency_max_tokens(const RoutingParams& p) {
  static const char* env = std::getenv("FUSEDGATE_LATENCY_MAX_TOKENS");
  if (env != nullptr) return std::atoll(env);
  return kLatencyThreads / ((p.num_experts + 31) / 32 * 32);
}

// 64-bit order of a candidate: its key (made unsigned, order kept) above its complemented index, so the larger
// order is the better expert with ties to the lower index, and no two candidates compare equal.
__device__ __forceinline__ uint64_t candidate_order(int32_t key, int expert) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(key) ^ 0x80000000u) << 32) | static_cast<uint32_t>(~expert);
}

// K > 0: top_k fixed at compile time (the sum and the ranking unroll); K == 0: p.top_k.
template <typename T, int K>
__global__ void __launch_bounds__(kMaxExperts)
    fused_latency_kernel(const T* __restrict__ logits, const void* __restrict__ bias, int bias_kind,
                         RoutingOutputs out, const int32_t* __restrict__ num_tokens_ptr, int64_t num_tokens,
                         RoutingParams p) {
  __shared__ float group_score_s[kMaxGroups];
  __shared__ __align__(16) uint64_t cand_order[kLatencyMaxCandidates];
  __shared__ float cand_s[kLatencyMaxCandidates];
  __shared__ __align__(16) float chosen_s[kMaxTopK];
  __shared__ int chosen_id[kMaxTopK];
  __shared__ int incomplete_s;

  wait_for_previous_grid();
  allow_next_grid();
  const int64_t token = blockIdx.x;
  if (token >= effective_tokens(num_tokens, num_tokens_ptr)) return;

  const int top_k = K > 0 ? K : p.top_k;
  const int e = threadIdx.x;
  const int lane = e & 31;
  const int warp = e >> 5;
  const bool exists = e < p.num_experts;
  const float neg_inf = __int_as_float(0xff800000);

  float x = 0.0f, bias_e = 0.0f;
  if (exists) {
    x = to_float<T>(logits[token * p.num_experts + e]);
    bias_e = bias_value(bias, bias_kind, e);
    if (out.scores != nullptr) out.scores[token * p.num_experts + e] = 0.0f;
  }
  const float s = sigmoid_f32(x);
  // b is finite or NaN (rule 2), whose key is invalid; experts past E hold the lowest key of all.
  const float b = __fadd_rn(s, bias_e);
  int32_t key = exists ? selection_key(b) : kAbsentKey;

  bool dead_group = false;
  int group_rank = 0;
  if (p.score_groups) {
    const int epg = p.experts_per_group;
    int32_t top1 = key, top2 = kInvalidKey;
    if (epg == 32) {
      // A whole warp is one group: two reductions, and a repeated maximum fills both places.
      top1 = __reduce_max_sync(kFullMask, key);
      const int holders = __popc(__ballot_sync(kFullMask, key == top1));
      top2 = holders >= 2 ? top1 : __reduce_max_sync(kFullMask, key == top1 ? kNoKey : key);
    } else {
      for (int offset = 1; offset < epg; offset <<= 1) merge_top2(top1, top2, offset);
    }
    const int g = e / epg;
    if (exists && e % epg == 0) group_score_s[g] = group_score_of(top1, top2, epg);
    __syncthreads();
    const float mine = group_score_s[g < p.n_group ? g : 0];
    int finite = 0;
    for (int h = 0; h < p.n_group; ++h) {
      const float other = group_score_s[h];
      finite += other > neg_inf;
      group_rank += (other > mine) || (other == mine && h < g);
    }
    // A kept group scores -inf exactly when fewer than topk_group groups are finite.
    dead_group = finite < p.topk_group;
    if (exists && group_rank >= p.topk_group) key = kInvalidKey;
  }

  // Rank within the warp: the lanes holding a larger key, or an equal key at a lower lane (a lower index).
  int rank = 0;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const int32_t other = __shfl_sync(kFullMask, key, j);
    rank += other > key - (j < lane ? 1 : 0);
  }
  // Where a group fills a warp, only the kept groups' warps contribute, packed by group rank.
  const bool packed = p.score_groups && p.experts_per_group == 32;
  const int slot_base = packed ? group_rank : warp;
  const int num_warps = (p.num_experts + 31) >> 5;
  const int candidates = (packed ? p.topk_group : num_warps) * top_k;
  if (rank < top_k && (!packed || group_rank < p.topk_group)) {
    cand_order[slot_base * top_k + rank] = candidate_order(key, e);
    cand_s[slot_base * top_k + rank] = s;
  }
  // Pad to an even count with orders below every candidate, so the ranking reads two at a time.
  if (e == 0 && (candidates & 1)) cand_order[candidates] = 0;
  __syncthreads();
  // At most 32 candidates: warp 0 alone ranks them and writes the outputs, so the others are done.
  const bool one_warp = candidates <= 32;
  if (one_warp && warp != 0) return;

  if (e < candidates) {
    const uint64_t mine = cand_order[e];
    const ulonglong2* pairs = reinterpret_cast<const ulonglong2*>(cand_order);
    int better = 0;
    for (int q = 0; q < (candidates + 1) >> 1; ++q) {
      const ulonglong2 two = pairs[q];
      better += (two.x > mine) + (two.y > mine);
    }
    if (better < top_k) {
      chosen_s[better] = cand_s[e];
      chosen_id[better] = static_cast<int>(~static_cast<uint32_t>(mine));
      // The last place holds an invalid key only when fewer than top_k valid experts are kept (rule 7).
      if (better == top_k - 1) incomplete_s = static_cast<int32_t>((mine >> 32) ^ 0x80000000u) <= kInvalidKey;
    }
  }
  if (one_warp) {
    __syncwarp();
  } else {
    __syncthreads();
  }

  if (warp == 0) {
    const bool fallback = dead_group || incomplete_s;
    // Rule 5's sum in output order, as every GPU path adds it.
    float sum = 0.0f;
    if (!fallback) {
#pragma unroll
      for (int r = 0; r < top_k; ++r) sum = __fadd_rn(sum, chosen_s[r]);
    }
    const float denom = __fadd_rn(sum, 1e-20f);
    if (lane < top_k) {
      const float w = fallback ? p.fallback_weight : routed_weight(chosen_s[lane], denom, p);
      const int id = fallback ? lane : chosen_id[lane];
      write_choice(out, token, top_k, p.num_experts, lane, id, w);
    }
  }
}

}  // namespace fusedgate
