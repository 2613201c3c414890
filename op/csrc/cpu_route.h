// What every per-token routing loop of path `cpu_kernel` shares, whichever instruction set it is built for: the
// call's parameters, float decoding, rule 1's sigmoid, the exact ordering of candidates (rule 4), the choice of
// kept groups (rule 3) and the outputs (rules 5-7). Built with -ffp-contract=off and free of fast-math, so every
// vector width computes the same bits.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "checks.h"
#include "routing_layout.h"

namespace fusedgate {
namespace cpu {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kMaxFinite = std::numeric_limits<float>::max();
// Rows are padded with -inf keys to a multiple of this many experts past their end, so the lane loops need no
// tail; candidate lists are padded likewise up to the widest exact selection.
constexpr int kPad = 64;
constexpr int kRowCapacity = kMaxExperts + kPad;
// Above this many candidates the quadratic rank selection is slower than insertion into a top-k list.
constexpr int kRankSelectLimit = 64;

struct Routing {
  int experts, n_group, topk_group, top_k, experts_per_group;
  bool score_groups, renormalize;
  float scale, fallback_weight;
};

struct Buffers {
  const void* logits;
  FloatKind logits_kind;
  const float* bias;  // decoded to float32 once per call
  float* values;
  void* indices;
  bool index64;
  float* scores;  // null without scores
  // The AVX-512 loop writes the scores rows through a block buffer and non-temporal stores, and asks for the
  // logits of rows ahead before it reads them (cpu_route_avx512.h).
  bool stream_scores, prefetch_logits;
};

inline float as_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint32_t as_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

inline float max_f(float a, float b) { return a > b ? a : b; }
inline float min_f(float a, float b) { return a < b ? a : b; }

// IEEE half to float, branch-free so that a row converts in vector registers.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  // A subnormal half is mantissa x 2^-24: exact in float32 (a normal float) without depending on the
  // processor's denormal modes.
  const float subnormal = static_cast<float>(static_cast<int32_t>(mantissa)) * 0x1p-24f;
  const uint32_t normal = ((exponent + 112u) << 23) | (mantissa << 13);
  const uint32_t special = 0x7f800000u | (mantissa << 13);
  const uint32_t magnitude = exponent == 0 ? as_bits(subnormal) : exponent == 0x1fu ? special : normal;
  return as_float(sign | magnitude);
}

inline void decode_row(const void* data, FloatKind kind, int64_t first, int n, float* out) {
  if (kind == FloatKind::kFloat32) {
    std::memcpy(out, static_cast<const float*>(data) + first, sizeof(float) * n);
    return;
  }
  const uint16_t* h = static_cast<const uint16_t*>(data) + first;
  if (kind == FloatKind::kBFloat16) {
    for (int i = 0; i < n; ++i) out[i] = as_float(static_cast<uint32_t>(h[i]) << 16);
  } else {
    for (int i = 0; i < n; ++i) out[i] = half_to_float(h[i]);
  }
}

// Token t's logits as float32: the tensor's own row, or the row decoded into `scratch`.
inline const float* logits_row(const Routing& p, const Buffers& io, int64_t t, float* scratch) {
  if (io.logits_kind == FloatKind::kFloat32) return static_cast<const float*>(io.logits) + t * p.experts;
  decode_row(io.logits, io.logits_kind, t * p.experts, p.experts, scratch);
  return scratch;
}

// Rule 1's s = 1 / (1 + exp(-x)), exp by Cody-Waite reduction and the Cephes polynomial (within about an ulp of a
// correctly rounded exp). Few instructions and no branches, so the compiler vectorises it: NaN needs no test, as
// it passes the clamps and the polynomial and comes out NaN. The AVX-512 loop spells out the same operations in
// the same order (cpu_route_avx512.h), so both give the same bits.
namespace sigmoid_constants {
// exp(-20) < 2^-25, so 1 + exp(a) rounds to 1 for every a below -20: the clamp changes no s.
constexpr float kExpMinArg = -20.0f;
// Above ln(FLT_MAX) (88.7228) exp overflows; up to 89, n is at most 128 and 2^n * p rounds to +inf as it should.
constexpr float kExpMaxArg = 89.0f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;  // few mantissa bits: n * kLn2Hi is exact
constexpr float kLn2Lo = -2.12194440e-4f;
// 1.5 * 2^23: adding it rounds a * log2(e) to the integer n, which then sits in the low mantissa bits.
constexpr float kRound = 12582912.0f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f, kP3 = 4.1665795894e-2f,
                kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;
}  // namespace sigmoid_constants

inline float sigmoid(float x) {
  using namespace sigmoid_constants;
  float a = -x;
  a = a < kExpMinArg ? kExpMinArg : a;
  a = a > kExpMaxArg ? kExpMaxArg : a;
  const float shifted = a * kLog2e + kRound;
  const float n = shifted - kRound;
  float r = a - n * kLn2Hi;
  r = r - n * kLn2Lo;
  const float z = r * r;
  float p = kP0;
  p = p * r + kP1;
  p = p * r + kP2;
  p = p * r + kP3;
  p = p * r + kP4;
  p = p * r + kP5;
  p = p * z + r + 1.0f;
  // 2^n as 2^(n-1) * 2, since n reaches 128, past float's largest exponent; at n = 129 the bits are +inf.
  const uint32_t n_bits = as_bits(shifted) - as_bits(kRound);
  const float e = p * as_float((n_bits + 126u) << 23) * 2.0f;
  return 1.0f / (1.0f + e);
}

// Rule 2: a non-finite b becomes a -inf key, which no comparison ever prefers.
inline float routing_key(float b) { return std::fabs(b) <= kMaxFinite ? b : -kInf; }

// Output slots of the candidates (keys in ascending expert order, padded with -inf to W): b descending, then the
// lower expert first. All W ranks grow together, one vector step per rival; padding and ranks past top_k land in
// slot top_k. `chosen[r]` receives the candidate's index.
template <int W>
inline void rank_select(const float* cand_key, int count, int top_k, int* chosen) {
  int rank[W] = {};
  for (int d = 0; d < count; ++d) {
    const float rival = cand_key[d];
    for (int a = 0; a < W; ++a) rank[a] += (rival > cand_key[a]) | ((rival == cand_key[a]) & (d < a));
  }
  for (int a = 0; a < count; ++a) chosen[std::min(rank[a], top_k)] = a;
}

// The same order by insertion into a sorted top-k list; an equal key never passes an earlier one.
inline void insertion_select(const float* cand_key, int count, int top_k, int* chosen) {
  float kept_key[kMaxTopK];
  int filled = 0;
  for (int a = 0; a < count; ++a) {
    const float v = cand_key[a];
    if (filled == top_k && !(v > kept_key[top_k - 1])) continue;
    int slot = filled < top_k ? filled++ : top_k - 1;
    while (slot > 0 && kept_key[slot - 1] < v) {
      kept_key[slot] = kept_key[slot - 1];
      chosen[slot] = chosen[slot - 1];
      --slot;
    }
    kept_key[slot] = v;
    chosen[slot] = a;
  }
}

// Rule 4's order over `count` candidates whose keys are padded with -inf up to kRankSelectLimit: `chosen[r]`
// (top_k + 1 slots) receives the index of the candidate in output slot r.
inline void order_candidates(float* cand_key, int count, int top_k, int* chosen) {
  for (int a = count; a < kRankSelectLimit; ++a) cand_key[a] = -kInf;
  if (count <= 16) {
    rank_select<16>(cand_key, count, top_k, chosen);
  } else if (count <= 32) {
    rank_select<32>(cand_key, count, top_k, chosen);
  } else if (count <= kRankSelectLimit) {
    rank_select<kRankSelectLimit>(cand_key, count, top_k, chosen);
  } else {
    insertion_select(cand_key, count, top_k, chosen);
  }
}

// Rule 3's choice of groups: the topk_group highest scores, ties to the lower group, in ascending group order.
// Returns how many were kept (topk_group) and whether a kept group scored -inf (rule 7).
inline bool keep_groups(const Routing& p, const float* group_scores, int* kept) {
  bool dead = false;
  int kept_count = 0;
  for (int g = 0; g < p.n_group; ++g) {
    const float v = group_scores[g];
    int rank = 0;
    for (int h = 0; h < p.n_group; ++h) rank += (group_scores[h] > v) | ((group_scores[h] == v) & (h < g));
    // Every group is written and only the count depends on the scores: a branch on them is mispredicted about
    // once per kept group, which cost more than the rest of the choice.
    const bool keep = rank < p.topk_group;
    kept[kept_count] = g;
    kept_count += keep;
    dead |= keep & (v == -kInf);
  }
  return dead;
}

// Rules 5-7 for token t: `ids` and `s` of the top_k experts in output order, or the fallback when `fallback`. The
// scores go to `scores_row` (none where it is null): the token's row of io.scores, or of a buffer that the caller
// copies there.
inline void write_outputs(const Routing& p, const Buffers& io, int64_t t, bool fallback, const int* ids,
                          const float* s, float* scores_row) {
  const int K = p.top_k, E = p.experts;
  float* out_w = io.values + t * K;
  int chosen[kMaxTopK];
  if (fallback) {
    // Rule 7.
    for (int r = 0; r < K; ++r) {
      chosen[r] = r;
      out_w[r] = p.fallback_weight;
    }
  } else {
    // Rule 5, the sum in output order.
    float sum = 0.0f;
    for (int r = 0; r < K; ++r) sum += s[r];
    const float denom = sum + 1e-20f;
    for (int r = 0; r < K; ++r) {
      chosen[r] = ids[r];
      out_w[r] = (p.renormalize ? s[r] / denom : s[r]) * p.scale;
    }
  }
  if (io.index64) {
    int64_t* out_i = static_cast<int64_t*>(io.indices) + t * K;
    for (int r = 0; r < K; ++r) out_i[r] = chosen[r];
  } else {
    int32_t* out_i = static_cast<int32_t*>(io.indices) + t * K;
    for (int r = 0; r < K; ++r) out_i[r] = chosen[r];
  }
  if (scores_row != nullptr) {
    // Rule 6.
    for (int e = 0; e < E; ++e) scores_row[e] = 0.0f;
    for (int r = 0; r < K; ++r) scores_row[chosen[r]] = out_w[r];
  }
}

}  // namespace cpu
}  // namespace fusedgate
