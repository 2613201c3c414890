// Path `cpu_kernel`'s per-token loop in portable C++, for every processor: the loops are written for the compiler
// to vectorise (one copy per x86-64 level, picked when the library loads), on stack scratch (no allocation per
// token). Processors with AVX-512 take cpu_route_avx512.h instead, which gives the same bits.
#pragma once

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "cpu_route.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FUSEDGATE_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FUSEDGATE_VECTOR_CLONES
#endif

namespace fusedgate {
namespace cpu {
namespace portable {

// Rule 3's group scores: the sum of each group's two largest keys (invalid experts hold -inf, so fewer than two
// valid gives -inf by the sum itself), a repeated maximum counting twice. The groups advance together, one per
// vector lane, so the running top two stay in registers.
inline void score_groups(const float* key, int n_group, int epg, float* scores) {
  float top1[kMaxGroups], top2[kMaxGroups];
  for (int g = 0; g < n_group; ++g) top1[g] = top2[g] = -kInf;
  for (int i = 0; i < epg; ++i) {
    for (int g = 0; g < n_group; ++g) {
      const float v = key[g * epg + i];
      top2[g] = max_f(top2[g], min_f(top1[g], v));
      top1[g] = max_f(top1[g], v);
    }
  }
  for (int g = 0; g < n_group; ++g) scores[g] = epg == 1 ? top1[g] : top1[g] + top2[g];
}

// A lower bound of the top_k-th largest key among `keys[0, n)` (n a multiple of L, L >= top_k): the top_k-th
// largest of L lane maxima, each a distinct key. -FLT_MAX when fewer than top_k lanes hold a valid key, so the
// bound never admits an invalid (-inf) key.
template <int L>
inline float selection_bound(const float* keys, int n, int top_k) {
  float lane_max[L];
  for (int j = 0; j < L; ++j) lane_max[j] = -kInf;
  for (int i = 0; i < n; i += L) {
    for (int j = 0; j < L; ++j) lane_max[j] = max_f(lane_max[j], keys[i + j]);
  }
  // The top_k-th largest maximum is the smallest of those with fewer than top_k maxima above them.
  float bound = kInf;
  for (int a = 0; a < L; ++a) {
    int above = 0;
    for (int b = 0; b < L; ++b) above += lane_max[b] > lane_max[a];
    bound = above < top_k ? min_f(bound, lane_max[a]) : bound;
  }
  return max_f(bound, -kMaxFinite);
}

// Bit j set where v[j] >= bound, for 16 keys (never NaN).
inline uint32_t at_least_mask16(const float* v, float bound) {
  uint32_t mask = 0;
#if defined(__SSE2__)
  // SSE2 is part of every x86-64; compilers do not turn the portable loop below into movemask.
  const __m128 b = _mm_set1_ps(bound);
  for (int q = 0; q < 4; ++q)
    mask |= static_cast<uint32_t>(_mm_movemask_ps(_mm_cmpge_ps(_mm_loadu_ps(v + 4 * q), b))) << (4 * q);
#else
  for (int j = 0; j < 16; ++j) mask |= static_cast<uint32_t>(v[j] >= bound) << j;
#endif
  return mask;
}

template <int L>
FUSEDGATE_VECTOR_CLONES void route_rows(const Routing& p, const Buffers& io, int64_t begin, int64_t end) {
  alignas(64) float x[kRowCapacity];
  alignas(64) float s[kRowCapacity];
  alignas(64) float key[kRowCapacity];
  alignas(64) float kept_keys[kRowCapacity];
  alignas(64) float cand_key[kRowCapacity];
  alignas(64) int cand_pos[kRowCapacity];
  float group_scores[kMaxGroups];
  int kept[kMaxGroups];
  int chosen[kMaxTopK + 1];  // slot top_k takes the candidates ranked below it
  int ids[kMaxTopK];
  float weights[kMaxTopK];
  const int E = p.experts, K = p.top_k, epg = p.experts_per_group;
  for (int i = E; i < kRowCapacity; ++i) key[i] = -kInf;

  for (int64_t t = begin; t < end; ++t) {
    const float* logits = logits_row(p, io, t, x);
    // Rules 1-2.
    for (int e = 0; e < E; ++e) {
      const float se = sigmoid(logits[e]);
      s[e] = se;
      key[e] = routing_key(se + io.bias[e]);
    }

    // Rule 3: the kept groups' keys, gathered in ascending expert order.
    bool fallback = false;
    const float* pool = key;
    int pool_size = E;
    if (p.score_groups) {
      score_groups(key, p.n_group, epg, group_scores);
      fallback = keep_groups(p, group_scores, kept);
      for (int k = 0; k < p.topk_group; ++k)
        std::memcpy(kept_keys + k * epg, key + kept[k] * epg, sizeof(float) * epg);
      pool = kept_keys;
      pool_size = p.topk_group * epg;
      for (int i = pool_size; i < pool_size + kPad; ++i) kept_keys[i] = -kInf;
    }

    // Rule 4: the candidates at or above a bound every top-k key clears, then their exact order.
    const float bound = selection_bound<L>(pool, (pool_size + L - 1) / L * L, K);
    int count = 0;
    for (int base = 0; base < pool_size; base += 16) {
      uint32_t passed = at_least_mask16(pool + base, bound);
      // A chunk rarely holds more than two candidates: take two without a branch (the padding absorbs the write
      // of an absent one), so the loop that follows seldom runs and its exit is seldom mispredicted.
      for (int unrolled = 0; unrolled < 2; ++unrolled) {
        const int i = base + __builtin_ctz(passed | 0x10000u);
        cand_key[count] = pool[i];
        cand_pos[count] = i;
        count += passed != 0;
        passed &= passed - 1;
      }
      for (; passed != 0; passed &= passed - 1) {
        const int i = base + __builtin_ctz(passed);
        cand_key[count] = pool[i];
        cand_pos[count++] = i;
      }
    }
    fallback |= count < K;
    if (!fallback) {
      order_candidates(cand_key, count, K, chosen);
      for (int r = 0; r < K; ++r) {
        const int i = cand_pos[chosen[r]];
        ids[r] = p.score_groups ? kept[i / epg] * epg + i % epg : i;
        weights[r] = s[ids[r]];
      }
    }
    write_outputs(p, io, t, fallback, ids, weights, io.scores != nullptr ? io.scores + t * E : nullptr);
  }
}

// Lanes for the selection bound: at least top_k of them, so that top_k lane maxima exist.
inline void route_rows_any(const Routing& p, const Buffers& io, int64_t begin, int64_t end) {
  if (p.top_k <= 16) {
    route_rows<16>(p, io, begin, end);
  } else {
    route_rows<32>(p, io, begin, end);
  }
}

}  // namespace portable
}  // namespace cpu
}  // namespace fusedgate
