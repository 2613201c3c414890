// Path `cpu_kernel`'s per-token loop for processors with AVX-512 (F, BW, CD, DQ, VL), chosen at run time. It gives
// the bits of the portable loop (cpu_route_portable.h): every s and b it outputs or ranks by is computed by the
// same operations in the same order, and the selection is exact.
//
// Without group scoring a token is routed in two passes over its experts. The first computes an approximate key
// for every expert, within `delta` of its exact b (a cubic for 2^f and a 14-bit reciprocal), and the lane maxima
// of those keys; the top_k-th largest lane maximum bounds the top_k-th exact key from below, to within delta. The
// second keeps the experts whose approximate key comes within 2 delta of that bound (about 10 of 384 for random
// logits), and only those get the exact sigmoid. With group scoring every expert needs its exact key (a group's
// score is the sum of two of them), so the first pass is exact and the second keeps the kept groups' experts at
// or above the bound.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define FUSEDGATE_HAVE_AVX512 1

#include <immintrin.h>

#include "cpu_route.h"

#define FUSEDGATE_AVX512 __attribute__((target("avx512f,avx512bw,avx512cd,avx512dq,avx512vl,fma,popcnt,bmi,bmi2")))

namespace fusedgate {
namespace cpu {
namespace avx512 {

// Error of the approximate sigmoid: the cubic's 7.6e-5 relative (a quarter of it reaches s), the reciprocal's
// 2^-14 and the roundings, 8.2e-5 at most and 4.4e-5 seen, with a margin of three.
constexpr float kApproxError = 0x1p-12f;

inline bool supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
}

// The bias the approximate keys add (-inf where it is not finite, so such experts never pass, and from the end of
// the row to the next multiple of 16), and the approximate keys' distance from the exact ones: the sigmoid's
// error, and the rounding of a sum as large as 1 + |bias| (an ulp of it, twice over, with a margin of two).
inline float prepare_filter(const float* bias, int experts, float* filter_bias) {
  float largest = 0.0f;
  for (int e = 0; e < experts; ++e) {
    const bool finite = std::fabs(bias[e]) <= kMaxFinite;
    filter_bias[e] = finite ? bias[e] : -kInf;
    largest = finite ? max_f(largest, std::fabs(bias[e])) : largest;
  }
  for (int e = experts; e % 16 != 0; ++e) filter_bias[e] = -kInf;
  return kApproxError + (1.0f + largest) * 0x1p-21f;
}

// Lanes [0, n) of a 16-expert chunk.
FUSEDGATE_AVX512 inline __mmask16 first_lanes(int n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
}

// sigmoid() of cpu_route.h on 16 lanes: the same operations in the same order. roundscale gives the n that the
// magic-number rounding gives, and scalef(p, n) the product p * 2^(n-1) * 2 (exact, or +inf past FLT_MAX).
FUSEDGATE_AVX512 inline __m512 sigmoid16(__m512 x) {
  using namespace sigmoid_constants;
  __m512 a = _mm512_sub_ps(_mm512_setzero_ps(), x);
  // max/min return their second operand where either is NaN: NaN passes through, as in the scalar selects.
  a = _mm512_max_ps(_mm512_set1_ps(kExpMinArg), a);
  a = _mm512_min_ps(_mm512_set1_ps(kExpMaxArg), a);
  const __m512 n =
      _mm512_roundscale_ps(_mm512_mul_ps(a, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_sub_ps(a, _mm512_mul_ps(n, _mm512_set1_ps(kLn2Hi)));
  r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(kLn2Lo)));
  const __m512 z = _mm512_mul_ps(r, r);
  __m512 p = _mm512_set1_ps(kP0);
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(kP1));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(kP2));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(kP3));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(kP4));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(kP5));
  p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(p, z), r), _mm512_set1_ps(1.0f));
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, _mm512_scalef_ps(p, n)));
}

// routing_key() on 16 lanes.
FUSEDGATE_AVX512 inline __m512 routing_key16(__m512 b) {
  const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_abs_ps(b), _mm512_set1_ps(kMaxFinite), _CMP_LE_OQ);
  return _mm512_mask_blend_ps(finite, _mm512_set1_ps(-kInf), b);
}

// s within kApproxError of the exact sigmoid (4.4e-5 at most over every float input, checked exhaustively), NaN
// for NaN. exp(-x) = 2^y is p(f) * 2^floor(y) with f = y - floor(y) and p a cubic fitted to 2^f. No clamp is
// needed: reduce gives f = 0 for every integral y (all |y| >= 2^23, and +-inf), and scalef floors its exponent
// itself and saturates to 0 or +inf, whence s = 1 or 0.
FUSEDGATE_AVX512 inline __m512 approx_sigmoid16(__m512 x) {
  const __m512 y = _mm512_mul_ps(x, _mm512_set1_ps(-1.44269504088896341f));
  const __m512 f = _mm512_reduce_ps(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_set1_ps(0.07802805304527283f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.22607068717479706f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6958274841308594f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999262094497681f));
  return _mm512_rcp14_ps(_mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_scalef_ps(p, y)));
}

// Lanes where a bitonic network's step (k, j) keeps the larger of lanes i and i ^ j: the lower lane of a pair in a
// block of k sorted downwards (i & k == 0), the upper one in a block sorted upwards.
constexpr __mmask16 bitonic_keeps_max(int k, int j) {
  unsigned mask = 0;
  for (int i = 0; i < 16; ++i) mask |= static_cast<unsigned>(((i & j) == 0) == ((i & k) == 0)) << i;
  return static_cast<__mmask16>(mask);
}

template <int K, int J>
FUSEDGATE_AVX512 inline __m512 bitonic_step(__m512 v) {
  __m512 other;
  if constexpr (J == 1) {
    other = _mm512_permute_ps(v, 0xb1);
  } else if constexpr (J == 2) {
    other = _mm512_permute_ps(v, 0x4e);
  } else if constexpr (J == 4) {
    other = _mm512_shuffle_f32x4(v, v, 0xb1);
  } else {
    other = _mm512_shuffle_f32x4(v, v, 0x4e);
  }
  return _mm512_mask_blend_ps(bitonic_keeps_max(K, J), _mm512_min_ps(v, other), _mm512_max_ps(v, other));
}

// The descending bitonic network up to the last merge's first half-cleaner: the 8 largest lanes of v then fill
// lanes 0-7 (none is NaN).
FUSEDGATE_AVX512 inline __m512 bitonic_half_cleaned(__m512 v) {
  v = bitonic_step<2, 1>(v);
  v = bitonic_step<4, 2>(v);
  v = bitonic_step<4, 1>(v);
  v = bitonic_step<8, 4>(v);
  v = bitonic_step<8, 2>(v);
  v = bitonic_step<8, 1>(v);
  return bitonic_step<16, 8>(v);
}

// The 16 lanes of v in descending order (none is NaN): 40 operations against 56 for ranking each lane by counting.
FUSEDGATE_AVX512 inline __m512 sort16_descending(__m512 v) {
  v = bitonic_half_cleaned(v);
  v = bitonic_step<16, 4>(v);
  v = bitonic_step<16, 2>(v);
  return bitonic_step<16, 1>(v);
}

// The top_k-th largest of the 16 or 32 lanes of `m` (-inf lanes hold no valid key; no lane is NaN): the smallest
// of the lanes with fewer than top_k lanes above them. Clamped to -FLT_MAX, so that it never admits an invalid key.
template <int V>
FUSEDGATE_AVX512 inline float kth_largest(const __m512* m, int top_k) {
  if constexpr (V == 1) {
    if (top_k == 8) {
      // The merge's first half-cleaner already puts the 8 largest in lanes 0-7, so their least is the bound:
      // three shuffles and three minima instead of the sort's last three steps (four operations each) and a
      // permutation.
      __m512 v = bitonic_half_cleaned(m[0]);
      v = _mm512_min_ps(v, _mm512_shuffle_f32x4(v, v, 0xb1));
      v = _mm512_min_ps(v, _mm512_permute_ps(v, 0x4e));
      v = _mm512_min_ps(v, _mm512_permute_ps(v, 0xb1));
      return max_f(_mm512_cvtss_f32(v), -kMaxFinite);
    }
    const __m512 sorted = sort16_descending(m[0]);
    return max_f(_mm512_cvtss_f32(_mm512_permutexvar_ps(_mm512_set1_epi32(top_k - 1), sorted)), -kMaxFinite);
  } else {
    // Lanes are broadcast within registers: scalar loads of a vector just stored would wait for the store.
    __m512i above[V];
    for (int v = 0; v < V; ++v) above[v] = _mm512_setzero_si512();
    const __m512i one = _mm512_set1_epi32(1);
    for (int b = 0; b < 16 * V; ++b) {
      const __m512 rival = _mm512_permutexvar_ps(_mm512_set1_epi32(b % 16), m[b / 16]);
      for (int v = 0; v < V; ++v)
        above[v] = _mm512_mask_add_epi32(above[v], _mm512_cmp_ps_mask(rival, m[v], _CMP_GT_OQ), above[v], one);
    }
    __m512 bound = _mm512_set1_ps(kInf);
    for (int v = 0; v < V; ++v) {
      const __mmask16 within = _mm512_cmplt_epi32_mask(above[v], _mm512_set1_epi32(top_k));
      bound = _mm512_mask_min_ps(bound, within, bound, m[v]);
    }
    return max_f(_mm512_reduce_min_ps(bound), -kMaxFinite);
  }
}

// Appends the positions [base, base + 16) whose lane is set in `take` to `pos` with a full vector store (pos
// holds 16 slots of room past any count); returns the new count.
FUSEDGATE_AVX512 inline int append_positions(int* pos, int count, int base, __mmask16 take) {
  const __m512i lanes = _mm512_add_epi32(_mm512_set1_epi32(base),
                                         _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  _mm512_storeu_si512(pos + count, _mm512_maskz_compress_epi32(take, lanes));
  return count + _mm_popcnt_u32(take);
}

// A range of experts a token chooses from: the whole row, or one kept group.
struct Segment {
  int first, size;
};

// Lane maxima of `key` over the segments, V vectors of 16 lanes taking chunks in turn, each lane a distinct
// expert. They are kept in registers until the end: `m` may alias the keys, so updating it in place would make a
// chain through memory.
template <int V>
FUSEDGATE_AVX512 inline void lane_maxima(const float* key, const Segment* segments, int n_segments, __m512* m) {
  __m512 top[V];
  for (int v = 0; v < V; ++v) top[v] = _mm512_set1_ps(-kInf);
  int v = 0;
  for (int k = 0; k < n_segments; ++k) {
    for (int i = 0; i < segments[k].size; i += 16) {
      const __mmask16 lanes = first_lanes(segments[k].size - i);
      // Masked-off lanes and NaN keys (max returns its second operand) leave the maximum as it was.
      top[v] = _mm512_mask_max_ps(top[v], lanes, _mm512_maskz_loadu_ps(lanes, key + segments[k].first + i), top[v]);
      v = v + 1 == V ? 0 : v + 1;
    }
  }
  for (int w = 0; w < V; ++w) m[w] = top[w];
}

// The positions of the segments' keys at or above `margin` below the top_k-th largest of the lane maxima `m`.
// Returns their count.
template <int V>
FUSEDGATE_AVX512 inline int candidates(const float* key, const Segment* segments, int n_segments, const __m512* m,
                                       int top_k, float margin, int* pos) {
  const __m512 threshold = _mm512_set1_ps(max_f(kth_largest<V>(m, top_k) - margin, -kMaxFinite));
  int count = 0;
  for (int k = 0; k < n_segments; ++k) {
    for (int i = 0; i < segments[k].size; i += 16) {
      const int base = segments[k].first + i;
      const __mmask16 lanes = first_lanes(segments[k].size - i);
      const __mmask16 take =
          _mm512_mask_cmp_ps_mask(lanes, _mm512_maskz_loadu_ps(lanes, key + base), threshold, _CMP_GE_OQ);
      count = append_positions(pos, count, base, take);
    }
  }
  return count;
}

// candidates() for a whole row whose keys are padded with -inf to a multiple of 16: no segment or lane mask to
// work out per chunk.
template <int V>
FUSEDGATE_AVX512 inline int row_candidates(const float* key, int experts, const __m512* m, int top_k, float margin,
                                           int* pos) {
  const __m512 threshold = _mm512_set1_ps(max_f(kth_largest<V>(m, top_k) - margin, -kMaxFinite));
  __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int count = 0;
  for (int base = 0; base < experts; base += 16) {
    const __mmask16 take = _mm512_cmp_ps_mask(_mm512_load_ps(key + base), threshold, _CMP_GE_OQ);
    _mm512_storeu_si512(pos + count, _mm512_maskz_compress_epi32(take, lanes));
    count += _mm_popcnt_u32(take);
    lanes = _mm512_add_epi32(lanes, _mm512_set1_epi32(16));
  }
  return count;
}

// Rows of up to this many experts give their candidates' logits and biases by lane permutations of the rows
// instead of two gathers (measured faster at 128 and 160 experts; a permutation more per 32 experts above).
constexpr int kPermuteExperts = 160;

// Lanes [0, n) of a 16-expert chunk, none for n <= 0.
FUSEDGATE_AVX512 inline __mmask16 lanes_upto(int n) { return n <= 0 ? static_cast<__mmask16>(0) : first_lanes(n); }

// logits[at] and bias[at] for positions `at` in [0, experts), experts <= kPermuteExperts: each 32-expert span of
// the rows is one two-table permutation, kept in the lanes whose position falls in that span. A gather of 16
// lanes costs a load per lane; the rows are in the cache already, and a span costs three operations a table.
FUSEDGATE_AVX512 inline void permute_lookup(const float* logits, const float* bias, int experts, __m512i at,
                                            __m512* x, __m512* b) {
  const __m512i span = _mm512_srli_epi32(at, 5);
  __m512 rx = _mm512_setzero_ps(), rb = _mm512_setzero_ps();
  for (int e = 0; e < experts; e += 32) {
    const __mmask16 lo = lanes_upto(experts - e), hi = lanes_upto(experts - e - 16);
    const __mmask16 in_span = _mm512_cmpeq_epi32_mask(span, _mm512_set1_epi32(e / 32));
    rx = _mm512_mask_mov_ps(rx, in_span,
                            _mm512_permutex2var_ps(_mm512_maskz_loadu_ps(lo, logits + e), at,
                                                   _mm512_maskz_loadu_ps(hi, logits + e + 16)));
    rb = _mm512_mask_mov_ps(rb, in_span,
                            _mm512_permutex2var_ps(_mm512_maskz_loadu_ps(lo, bias + e), at,
                                                   _mm512_maskz_loadu_ps(hi, bias + e + 16)));
  }
  *x = rx;
  *b = rb;
}

// Rules 4-6 for a token's at most 16 candidates, all in vectors, in three steps that a block of tokens takes in
// turn (route_rows()). Each step reads what the one before stored, so its rivals and sums come from memory by
// broadcast loads instead of lane permutations, which compete for the shuffle unit.

// Rule 4's rank of each candidate (exact keys `keys`, -inf past `count`, also stored at `key_lanes`): one step per
// rival, counting a higher key, or an equal one at a lower index.
FUSEDGATE_AVX512 inline __m512i rank16(__m512 keys, const float* key_lanes, int count) {
  const __m512i one = _mm512_set1_epi32(1);
  __m512i rank = _mm512_setzero_si512();
  // Equal keys have equal bits here (a key is never NaN, and never -0: s >= +0, and s + bias rounds an exact zero
  // to +0), so the conflict check finds every tie. Without one, the index rule cannot apply and a rival counts
  // by its key alone, which saves two of a step's five operations.
  const __m512i equal_before = _mm512_maskz_conflict_epi32(first_lanes(count), _mm512_castps_si512(keys));
  if (_mm512_test_epi32_mask(equal_before, equal_before) == 0) {
    for (int d = 0; d < count; ++d)
      rank = _mm512_mask_add_epi32(rank, _mm512_cmp_ps_mask(_mm512_set1_ps(key_lanes[d]), keys, _CMP_GT_OQ), rank, one);
  } else {
    for (int d = 0; d < count; ++d) {
      const __m512 rival = _mm512_set1_ps(key_lanes[d]);
      const __mmask16 later = static_cast<__mmask16>(0xfffeu << d);
      const __mmask16 beaten =
          _mm512_cmp_ps_mask(rival, keys, _CMP_GT_OQ) | _mm512_mask_cmp_ps_mask(later, rival, keys, _CMP_EQ_OQ);
      rank = _mm512_mask_add_epi32(rank, beaten, rank, one);
    }
  }
  return rank;
}

// The candidates' positions `pos` and sigmoids `s` in output order, by inverting the ranks stored at `rank_lanes`.
FUSEDGATE_AVX512 inline void order16(const int* rank_lanes, int count, __m512i pos, __m512 s, __m512i* ids,
                                     __m512* chosen_s) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // order[r] = the candidate of rank r.
  __m512i order = _mm512_setzero_si512();
  for (int a = 0; a < count; ++a)
    order = _mm512_mask_mov_epi32(order, _mm512_cmpeq_epi32_mask(_mm512_set1_epi32(rank_lanes[a]), iota),
                                  _mm512_set1_epi32(a));
  *ids = _mm512_permutexvar_epi32(order, pos);
  *chosen_s = _mm512_permutexvar_ps(order, s);
}

// Rules 5-6 for token t from the chosen ids and sigmoids in output order (the sigmoids also stored at
// `chosen_lanes`), with the operations of write_outputs() in the same order. The weights go into `scores_row`
// (none where it is null), which holds zeros already where `row_zeroed`.
FUSEDGATE_AVX512 inline void write16(const Routing& p, const Buffers& io, int64_t t, __m512i ids, __m512 chosen_s,
                                     const float* chosen_lanes, float* scores_row, bool row_zeroed) {
  const int K = p.top_k;
  // Rule 5, the sum in output order.
  float sum = chosen_lanes[0];
  for (int r = 1; r < K; ++r) sum += chosen_lanes[r];
  const __m512 denom = _mm512_set1_ps(sum + 1e-20f);
  const __m512 w = _mm512_mul_ps(p.renormalize ? _mm512_div_ps(chosen_s, denom) : chosen_s, _mm512_set1_ps(p.scale));
  const __mmask16 outputs = first_lanes(K);
  _mm512_mask_storeu_ps(io.values + t * K, outputs, w);
  if (io.index64) {
    int64_t* out_i = static_cast<int64_t*>(io.indices) + t * K;
    _mm512_mask_storeu_epi64(out_i, static_cast<__mmask8>(outputs), _mm512_cvtepi32_epi64(_mm512_castsi512_si256(ids)));
    if (K > 8)
      _mm512_mask_storeu_epi64(out_i + 8, static_cast<__mmask8>(outputs >> 8),
                               _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(ids, 1)));
  } else {
    _mm512_mask_storeu_epi32(static_cast<int32_t*>(io.indices) + t * K, outputs, ids);
  }
  if (scores_row != nullptr) {
    // Rule 6.
    if (!row_zeroed)
      for (int e = 0; e < p.experts; e += 16)
        _mm512_mask_storeu_ps(scores_row + e, first_lanes(p.experts - e), _mm512_setzero_ps());
    _mm512_mask_i32scatter_ps(scores_row, outputs, ids, w, 4);
  }
}

// Copies `count` floats from `staged` + `lead` (`staged` 64-byte aligned) to `out`, whose address lies `lead`
// floats past a 64-byte boundary, so that buffer and output lines coincide, and leaves zeros in the buffer. Whole
// lines go by non-temporal stores, which write a line without first reading it into the cache (a plain store
// reads each line of the scores from memory before overwriting it); the partial lines at either end, which
// neighbouring blocks share, by masked plain stores. The caller fences before its writes are published.
FUSEDGATE_AVX512 inline void stream_out(float* staged, int lead, int count, float* out) {
  float* const line0 = reinterpret_cast<float*>(reinterpret_cast<uintptr_t>(out) - sizeof(float) * lead);
  const int last = (lead + count - 1) / 16;
  const __mmask16 head = static_cast<__mmask16>(0xffffu << lead);
  const __mmask16 tail = first_lanes(lead + count - 16 * last);
  for (int i = 0; i <= last; ++i) {
    const __m512 v = _mm512_load_ps(staged + 16 * i);
    if (i == 0 || i == last) {
      _mm512_mask_storeu_ps(line0 + 16 * i, (i == 0 ? head : 0xffff) & (i == last ? tail : 0xffff), v);
    } else {
      _mm512_stream_ps(line0 + 16 * i, v);
    }
    _mm512_store_ps(staged + 16 * i, _mm512_setzero_ps());
  }
}

// Merges two top-two summaries of disjoint expert sets, lane by lane: (a1, b1) and (a2, b2) with a >= b.
FUSEDGATE_AVX512 inline void merge_top2(__m512& a1, __m512& b1, __m512 a2, __m512 b2) {
  const __m512 high = _mm512_max_ps(a1, a2);
  b1 = _mm512_max_ps(_mm512_min_ps(a1, a2), _mm512_max_ps(b1, b2));
  a1 = high;
}

// Rule 3's group scores for up to 8 groups starting at group g0, returned in lanes 0-7 (those past `groups` hold
// no group): each group's chunks fold into a per-lane top two, then a tree of merges halves the lanes per group
// while doubling the groups per vector, until each group's summary sits in two lanes of one vector.
FUSEDGATE_AVX512 inline __m512 score_eight_groups(const float* key, int g0, int groups, int epg) {
  __m512 a[8], b[8];
  for (int g = 0; g < 8; ++g) {
    a[g] = b[g] = _mm512_set1_ps(-kInf);
    if (g >= groups) continue;
    const float* group = key + (g0 + g) * epg;
    for (int i = 0; i < epg; i += 16) {
      const __mmask16 lanes = first_lanes(epg - i);
      merge_top2(a[g], b[g], _mm512_mask_loadu_ps(_mm512_set1_ps(-kInf), lanes, group + i), _mm512_set1_ps(-kInf));
    }
  }
  // 16 lanes a group -> 8: the low halves of groups 2j, 2j+1 against their high halves.
  for (int j = 0; j < 4; ++j) {
    __m512 lo_a = _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0x44), hi_a = _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0xee);
    __m512 lo_b = _mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0x44), hi_b = _mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0xee);
    merge_top2(lo_a, lo_b, hi_a, hi_b);
    a[j] = lo_a;
    b[j] = lo_b;
  }
  // 8 -> 4: quarters 0 and 2 against 1 and 3, four groups a vector.
  for (int j = 0; j < 2; ++j) {
    __m512 x_a = _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0x88), y_a = _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0xdd);
    __m512 x_b = _mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0x88), y_b = _mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0xdd);
    merge_top2(x_a, x_b, y_a, y_b);
    a[j] = x_a;
    b[j] = x_b;
  }
  // 4 -> 2, within each quarter: lanes 0-1 against 2-3, groups q (from a[0]) and q + 4 (from a[1]).
  __m512 x_a = _mm512_shuffle_ps(a[0], a[1], 0x44), y_a = _mm512_shuffle_ps(a[0], a[1], 0xee);
  __m512 x_b = _mm512_shuffle_ps(b[0], b[1], 0x44), y_b = _mm512_shuffle_ps(b[0], b[1], 0xee);
  merge_top2(x_a, x_b, y_a, y_b);
  // 2 -> 1: neighbouring lanes.
  merge_top2(x_a, x_b, _mm512_permute_ps(x_a, 0xb1), _mm512_permute_ps(x_b, 0xb1));
  // Group g's summary lies in lane 4g for g < 4, and in lane 4(g - 4) + 2 above.
  const __m512i summary = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512 top1 = _mm512_permutexvar_ps(summary, x_a);
  return epg == 1 ? top1 : _mm512_add_ps(top1, _mm512_permutexvar_ps(summary, x_b));
}

// keep_groups() for up to 8 groups whose scores lie in lanes 0-7 of `scores` (none NaN), ranked in vectors: the
// scalar loop's n_group^2 compares and loads cost more than the rest of the group choice.
FUSEDGATE_AVX512 inline bool keep_eight_groups(const Routing& p, __m512 scores, int* kept) {
  const __m512i one = _mm512_set1_epi32(1);
  __m512i rank = _mm512_setzero_si512();
  for (int h = 0; h < p.n_group; ++h) {
    const __m512 rival = _mm512_permutexvar_ps(_mm512_set1_epi32(h), scores);
    const __mmask16 later = static_cast<__mmask16>(0xfffeu << h);
    const __mmask16 beaten =
        _mm512_cmp_ps_mask(rival, scores, _CMP_GT_OQ) | _mm512_mask_cmp_ps_mask(later, rival, scores, _CMP_EQ_OQ);
    rank = _mm512_mask_add_epi32(rank, beaten, rank, one);
  }
  const __mmask16 keep = _mm512_mask_cmplt_epi32_mask(first_lanes(p.n_group), rank, _mm512_set1_epi32(p.topk_group));
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(kept), _mm512_castsi512_si256(_mm512_maskz_compress_epi32(keep, iota)));
  // Rule 7: a kept group scored -inf.
  return _mm512_mask_cmp_ps_mask(keep, scores, _mm512_set1_ps(-kInf), _CMP_EQ_OQ) != 0;
}

// How far ahead, in tokens, the keys phase asks for logits where Buffers::prefetch_logits: two blocks.
constexpr int kPrefetchTokens = 16;

// Tokens routed together, phase by phase. One token's phases form a chain of dependent steps (bound, candidates,
// exact keys, ranks, weights) too long for the processor to overlap with the next token's; a phase run over
// several independent tokens keeps its units busy instead of waiting on that chain.
constexpr int kBlockTokens = 8;

// Per-token state carried from one phase of a block to the next.
template <int V>
struct Block {
  alignas(64) float x[kBlockTokens][kRowCapacity];  // 16-bit logits decoded
  alignas(64) float s[kBlockTokens][kRowCapacity];  // exact sigmoids (group scoring)
  alignas(64) float key[kBlockTokens][kRowCapacity];
  alignas(64) int cand_pos[kBlockTokens][kRowCapacity + 16];
  __m512 m[kBlockTokens][V];
  __m512 cand_b[kBlockTokens], cand_s[kBlockTokens];  // candidates' exact keys and sigmoids
  __m512i rank[kBlockTokens];
  __m512i ids[kBlockTokens];
  __m512 chosen_s[kBlockTokens];  // in output order
  const float* logits[kBlockTokens];
  // The block's scores rows where they are streamed (Buffers::stream_scores), laid out as in the output from a
  // 64-byte boundary; all zeros between blocks, so a row needs only its weights written.
  alignas(64) float staged[kBlockTokens * kMaxExperts + 32];
  Segment segments[kBlockTokens][kMaxGroups];
  int count[kBlockTokens];
  bool fallback[kBlockTokens];
};

// The calling thread's block state (too large for the stack of every caller's thread), looked up once per call:
// in a shared library each thread-local access is a call that saves every vector register. Internal linkage: the
// static of an inline function is one object across the process (a unique symbol), so a second build of the
// library loaded into the same process would use the first one's block, which may be smaller.
template <int V>
__attribute__((noinline)) static Block<V>& thread_block() {
  static thread_local Block<V> block;
  return block;
}

// Rules 4-7 for a token with more than 16 candidates (or that falls back): exact order by rank or
// insertion over candidate arrays.
FUSEDGATE_AVX512 inline void finish_any(const Routing& p, const Buffers& io, int64_t t, const float* logits,
                                        const float* s, const float* key, const int* pos, int count, bool fallback,
                                        float* scores_row) {
  alignas(64) float cand_key[kRowCapacity];
  alignas(64) float cand_s[kRowCapacity];
  int chosen[kMaxTopK + 1];  // slot top_k takes the candidates ranked below it
  int ids[kMaxTopK];
  float weights[kMaxTopK];
  const int K = p.top_k;
  if (!fallback) {
    if (p.score_groups) {
      for (int a = 0; a < count; ++a) {
        cand_key[a] = key[pos[a]];
        cand_s[a] = s[pos[a]];
      }
    } else {
      // Rules 1-2, exactly, for the candidates alone.
      int valid = 0;
      for (int a = 0; a < count; a += 16) {
        const __mmask16 lanes = first_lanes(count - a);
        const __m512i at = _mm512_maskz_loadu_epi32(lanes, pos + a);
        const __m512 se = sigmoid16(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, at, logits, 4));
        const __m512 b = routing_key16(_mm512_add_ps(se, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, at, io.bias, 4)));
        valid += _mm_popcnt_u32(_mm512_mask_cmp_ps_mask(lanes, b, _mm512_set1_ps(-kInf), _CMP_NEQ_OQ));
        _mm512_storeu_ps(cand_s + a, se);
        _mm512_storeu_ps(cand_key + a, b);
      }
      fallback = valid < K;
    }
  }
  if (!fallback) {
    order_candidates(cand_key, count, K, chosen);
    for (int r = 0; r < K; ++r) {
      ids[r] = pos[chosen[r]];
      weights[r] = cand_s[chosen[r]];
    }
  }
  write_outputs(p, io, t, fallback, ids, weights, scores_row);
}

template <int V>
FUSEDGATE_AVX512 void route_rows(const Routing& p, const Buffers& io, int64_t begin, int64_t end,
                                 const float* filter_bias, float delta) {
  Block<V>& blk = thread_block<V>();
  float group_scores[kMaxGroups];
  int kept[kMaxGroups];
  const int E = p.experts, K = p.top_k, epg = p.experts_per_group;
  const int n_segments = p.score_groups ? p.topk_group : 1;
  // Approximate keys may trail exact ones by delta: a margin of twice that keeps every expert the exact keys
  // choose (cpu_route_avx512.h's header). Exact keys need none.
  const float margin = p.score_groups ? 0.0f : 2.0f * delta;
  const int64_t row_bytes = E * static_cast<int64_t>(bytes_of(io.logits_kind));

  for (int64_t t0 = begin; t0 < end; t0 += kBlockTokens) {
    const int n = static_cast<int>(std::min<int64_t>(kBlockTokens, end - t0));
    // Keys (and, without group scoring, their lane maxima).
    for (int j = 0; j < n; ++j) {
      const float* logits = blk.logits[j] = logits_row(p, io, t0 + j, blk.x[j]);
      if (io.prefetch_logits && t0 + j + kPrefetchTokens < end) {
        // Logits too many for the cache arrive from memory; the hardware's own prefetch left the loop waiting.
        const char* ahead = static_cast<const char*>(io.logits) + (t0 + j + kPrefetchTokens) * row_bytes;
        for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
      }
      float* key = blk.key[j];
      blk.fallback[j] = false;
      if (p.score_groups) {
        // Rules 1-2 for every expert.
        float* s = blk.s[j];
        for (int e = 0; e < E; e += 16) {
          const __mmask16 lanes = first_lanes(E - e);
          const __m512 se = sigmoid16(_mm512_maskz_loadu_ps(lanes, logits + e));
          _mm512_storeu_ps(s + e, se);
          _mm512_storeu_ps(key + e, routing_key16(_mm512_add_ps(se, _mm512_maskz_loadu_ps(lanes, io.bias + e))));
        }
      } else {
        // Approximate keys (filter_bias is -inf where the bias is not finite, so such experts never pass, and
        // past the row, so the last chunk's spare lanes hold -inf) and their lane maxima, V vectors taking chunks
        // in turn, kept in registers (as in lane_maxima()).
        __m512 top[V];
        for (int v = 0; v < V; ++v) top[v] = _mm512_set1_ps(-kInf);
        for (int e = 0; e < E; e += 16) {
          const __mmask16 lanes = first_lanes(E - e);
          const __m512 approx = approx_sigmoid16(_mm512_maskz_loadu_ps(lanes, logits + e));
          const __m512 k = _mm512_add_ps(approx, _mm512_load_ps(filter_bias + e));
          _mm512_store_ps(key + e, k);
          // A NaN key (max returns its second operand) leaves the maximum as it was.
          top[(e / 16) % V] = _mm512_max_ps(k, top[(e / 16) % V]);
        }
        for (int v = 0; v < V; ++v) blk.m[j][v] = top[v];
        blk.segments[j][0] = Segment{0, E};
      }
    }
    if (p.score_groups) {
      // Rule 3, then the kept groups' lane maxima.
      for (int j = 0; j < n; ++j) {
        if (p.n_group <= 8) {
          blk.fallback[j] = keep_eight_groups(p, score_eight_groups(blk.key[j], 0, p.n_group, epg), kept);
        } else {
          for (int g0 = 0; g0 < p.n_group; g0 += 8)
            _mm256_storeu_ps(group_scores + g0,
                             _mm512_castps512_ps256(score_eight_groups(blk.key[j], g0, std::min(8, p.n_group - g0), epg)));
          blk.fallback[j] = keep_groups(p, group_scores, kept);
        }
        for (int k = 0; k < p.topk_group; ++k) blk.segments[j][k] = Segment{kept[k] * epg, epg};
      }
      for (int j = 0; j < n; ++j) lane_maxima<V>(blk.key[j], blk.segments[j], n_segments, blk.m[j]);
    }
    // Rule 4's candidates.
    for (int j = 0; j < n; ++j) {
      blk.count[j] = p.score_groups
                         ? candidates<V>(blk.key[j], blk.segments[j], n_segments, blk.m[j], K, margin, blk.cand_pos[j])
                         : row_candidates<V>(blk.key[j], E, blk.m[j], K, margin, blk.cand_pos[j]);
      blk.fallback[j] |= blk.count[j] < K;
    }
    // Exact keys and sigmoids of up to 16 candidates, in registers.
    for (int j = 0; j < n; ++j) {
      if (blk.fallback[j] || blk.count[j] > 16) continue;
      const __mmask16 lanes = first_lanes(blk.count[j]);
      const __m512i at = _mm512_maskz_loadu_epi32(lanes, blk.cand_pos[j]);
      if (p.score_groups) {
        blk.cand_b[j] = _mm512_mask_i32gather_ps(_mm512_set1_ps(-kInf), lanes, at, blk.key[j], 4);
        blk.cand_s[j] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, at, blk.s[j], 4);
      } else {
        // Rules 1-2, exactly, for the candidates alone.
        __m512 x, bias;
        if (E <= kPermuteExperts) {
          permute_lookup(blk.logits[j], io.bias, E, at, &x, &bias);
        } else {
          x = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, at, blk.logits[j], 4);
          bias = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, at, io.bias, 4);
        }
        const __m512 se = sigmoid16(x);
        const __m512 b = _mm512_mask_mov_ps(_mm512_set1_ps(-kInf), lanes, routing_key16(_mm512_add_ps(se, bias)));
        blk.fallback[j] = _mm_popcnt_u32(_mm512_cmp_ps_mask(b, _mm512_set1_ps(-kInf), _CMP_NEQ_OQ)) < K;
        blk.cand_b[j] = b;
        blk.cand_s[j] = se;
      }
    }
    // Rules 4-7: up to 16 candidates in vectors, in three steps; more, or the fallback, by finish_any().
    for (int j = 0; j < n; ++j) {
      if (!blk.fallback[j] && blk.count[j] <= 16)
        blk.rank[j] = rank16(blk.cand_b[j], reinterpret_cast<const float*>(&blk.cand_b[j]), blk.count[j]);
    }
    for (int j = 0; j < n; ++j) {
      const int count = blk.count[j];
      if (!blk.fallback[j] && count <= 16)
        order16(reinterpret_cast<const int*>(&blk.rank[j]), count,
                _mm512_maskz_loadu_epi32(first_lanes(count), blk.cand_pos[j]), blk.cand_s[j], &blk.ids[j],
                &blk.chosen_s[j]);
    }
    // Scores rows in the block buffer, at the output's offset from a 64-byte boundary, or in the output itself.
    float* const out_rows = io.scores != nullptr ? io.scores + t0 * E : nullptr;
    const int lead =
        io.stream_scores ? static_cast<int>(reinterpret_cast<uintptr_t>(out_rows) / sizeof(float) % 16) : 0;
    float* const rows = io.stream_scores ? blk.staged + lead : out_rows;
    for (int j = 0; j < n; ++j) {
      const int count = blk.count[j];
      float* const row = rows != nullptr ? rows + j * E : nullptr;
      if (!blk.fallback[j] && count <= 16) {
        write16(p, io, t0 + j, blk.ids[j], blk.chosen_s[j], reinterpret_cast<const float*>(&blk.chosen_s[j]), row,
                io.stream_scores);
      } else {
        finish_any(p, io, t0 + j, blk.logits[j], blk.s[j], blk.key[j], blk.cand_pos[j], count, blk.fallback[j], row);
      }
    }
    if (io.stream_scores) stream_out(blk.staged, lead, n * E, out_rows);
  }
  if (io.stream_scores) {
    // Non-temporal stores are weakly ordered: without the fence, the store that tells the caller this range is
    // done could become visible before the rows.
    _mm_sfence();
  }
}

FUSEDGATE_AVX512 inline void route_rows_any(const Routing& p, const Buffers& io, int64_t begin, int64_t end,
                                            const float* filter_bias, float delta) {
  if (p.top_k <= 16) {
    route_rows<1>(p, io, begin, end, filter_bias, delta);
  } else {
    route_rows<2>(p, io, begin, end, filter_bias, delta);
  }
}

}  // namespace avx512
}  // namespace cpu
}  // namespace fusedgate

#endif
