// Path `cpu_kernel`: the routing op in C++ on the CPU, for CPU tensors of any framework (the microservice's CPU
// backend, the Paddle CPU path). Tokens are split into contiguous row ranges over threads; each token runs the
// rules of DESIGN.md in loops the compiler vectorises, on stack scratch (no allocation per token). Built with
// -ffp-contract=off and free of fast-math, so every vector width computes the same bits.
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/optional.h>

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <system_error>
#include <thread>
#include <vector>

#include "checks.h"

// One copy per instruction set, picked when the library loads; plain x86-64 (SSE2) stays the baseline.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FUSEDGATE_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FUSEDGATE_VECTOR_CLONES
#endif

namespace fusedgate {
namespace {

using tvm::ffi::Optional;
using tvm::ffi::TensorView;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kMaxFinite = std::numeric_limits<float>::max();
// Rows are padded to this many experts with -inf keys, so the lane loops need no tail.
constexpr int kPad = 32;
constexpr int kRowCapacity = kMaxExperts + kPad;
constexpr int kMaxThreads = 1024;
// Below this many experts (rows x E) per thread, a thread costs more than it saves. On the shared 2-core x86-64
// machine a thread start and join took 25 us at best and 80 us on average, yet two threads only broke even at
// 2048 tokens of 128 experts (about 0.5 ms of work) and lost below it, the second core being rarely free.
constexpr int64_t kMinExpertsPerThread = 1 << 18;
// Above this many candidates the quadratic rank selection is slower than insertion into a top-k list.
constexpr int kRankSelectLimit = 64;

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

// Rule 1's s = 1 / (1 + exp(-x)), exp by Cody-Waite reduction and the Cephes polynomial (within about an ulp of a
// correctly rounded exp). Few instructions and no branches, so the compiler vectorises it: NaN needs no test, as
// it passes the clamps and the polynomial and comes out NaN.
inline float sigmoid(float x) {
  // exp(-20) < 2^-25, so 1 + exp(a) rounds to 1 for every a below -20: the clamp changes no s.
  constexpr float kExpMinArg = -20.0f;
  // Above ln(FLT_MAX) (88.7228) exp overflows; up to 89, n is at most 128 and 2^n * p rounds to +inf as it should.
  constexpr float kExpMaxArg = 89.0f;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // few mantissa bits: n * kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;
  // 1.5 * 2^23: adding it rounds a * log2(e) to the integer n, which then sits in the low mantissa bits.
  constexpr float kRound = 12582912.0f;
  float a = -x;
  a = a < kExpMinArg ? kExpMinArg : a;
  a = a > kExpMaxArg ? kExpMaxArg : a;
  const float shifted = a * kLog2e + kRound;
  const float n = shifted - kRound;
  float r = a - n * kLn2Hi;
  r = r - n * kLn2Lo;
  const float z = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * z + r + 1.0f;
  // 2^n as 2^(n-1) * 2, since n reaches 128, past float's largest exponent; at n = 129 the bits are +inf.
  const uint32_t n_bits = as_bits(shifted) - as_bits(kRound);
  const float e = p * as_float((n_bits + 126u) << 23) * 2.0f;
  return 1.0f / (1.0f + e);
}

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
};

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

// A lower bound of the top_k-th largest key among `keys[0, n)` (n a multiple of L, L >= top_k): the smallest of
// L lane maxima, each a distinct key. -FLT_MAX when some lane holds no valid key, so the bound never admits an
// invalid (-inf) key.
template <int L>
inline float selection_bound(const float* keys, int n) {
  float lane_max[L];
  for (int j = 0; j < L; ++j) lane_max[j] = -kInf;
  for (int i = 0; i < n; i += L) {
    for (int j = 0; j < L; ++j) lane_max[j] = max_f(lane_max[j], keys[i + j]);
  }
  float bound = lane_max[0];
  for (int j = 1; j < L; ++j) bound = min_f(bound, lane_max[j]);
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

// Output ranks of the candidates (keys in ascending expert order, padded with -inf to W): b descending, then the
// lower expert first. All W ranks grow together, one vector step per rival; padding and ranks past top_k land in
// slot top_k.
template <int W>
inline void rank_select(const float* cand_key, const int* cand_pos, int count, int top_k, int* chosen) {
  int rank[W] = {};
  for (int d = 0; d < count; ++d) {
    const float rival = cand_key[d];
    for (int a = 0; a < W; ++a) rank[a] += (rival > cand_key[a]) | ((rival == cand_key[a]) & (d < a));
  }
  for (int a = 0; a < count; ++a) chosen[std::min(rank[a], top_k)] = cand_pos[a];
}

// The same order by insertion into a sorted top-k list; an equal key never passes an earlier one.
inline void insertion_select(const float* cand_key, const int* cand_pos, int count, int top_k, int* chosen) {
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
    chosen[slot] = cand_pos[a];
  }
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
  const int E = p.experts, K = p.top_k, epg = p.experts_per_group;
  for (int i = E; i < kRowCapacity; ++i) key[i] = -kInf;

  for (int64_t t = begin; t < end; ++t) {
    const float* logits = x;
    if (io.logits_kind == FloatKind::kFloat32) {
      logits = static_cast<const float*>(io.logits) + t * E;
    } else {
      decode_row(io.logits, io.logits_kind, t * E, E, x);
    }
    // Rules 1-2: a non-finite b becomes a -inf key, which no comparison below ever prefers.
    for (int e = 0; e < E; ++e) {
      const float se = sigmoid(logits[e]);
      const float b = se + io.bias[e];
      s[e] = se;
      key[e] = std::fabs(b) <= kMaxFinite ? b : -kInf;
    }

    // Rule 3: the kept groups' keys, gathered in ascending expert order.
    bool fallback = false;
    const float* pool = key;
    int pool_size = E, kept_count = 0;
    if (p.score_groups) {
      score_groups(key, p.n_group, epg, group_scores);
      for (int g = 0; g < p.n_group; ++g) {
        const float v = group_scores[g];
        int rank = 0;
        for (int h = 0; h < p.n_group; ++h) rank += (group_scores[h] > v) | ((group_scores[h] == v) & (h < g));
        if (rank < p.topk_group) {
          std::memcpy(kept_keys + kept_count * epg, key + g * epg, sizeof(float) * epg);
          kept[kept_count++] = g;
          fallback |= v == -kInf;
        }
      }
      pool = kept_keys;
      pool_size = kept_count * epg;
      for (int i = pool_size; i < pool_size + kPad; ++i) kept_keys[i] = -kInf;
    }

    // Rule 4: the candidates at or above a bound every top-k key clears, then their exact order.
    const int padded = (pool_size + L - 1) / L * L;
    const float bound = selection_bound<L>(pool, padded);
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
    for (int a = count; a < kRankSelectLimit; ++a) cand_key[a] = -kInf;
    fallback |= count < K;

    float* out_w = io.values + t * K;
    if (fallback) {
      // Rule 7.
      for (int r = 0; r < K; ++r) {
        chosen[r] = r;
        out_w[r] = p.fallback_weight;
      }
    } else {
      if (count <= 16) {
        rank_select<16>(cand_key, cand_pos, count, K, chosen);
      } else if (count <= 32) {
        rank_select<32>(cand_key, cand_pos, count, K, chosen);
      } else if (count <= kRankSelectLimit) {
        rank_select<kRankSelectLimit>(cand_key, cand_pos, count, K, chosen);
      } else {
        insertion_select(cand_key, cand_pos, count, K, chosen);
      }
      if (p.score_groups) {
        for (int r = 0; r < K; ++r) chosen[r] = kept[chosen[r] / epg] * epg + chosen[r] % epg;
      }
      // Rule 5, the sum in output order.
      float sum = 0.0f;
      for (int r = 0; r < K; ++r) sum += s[chosen[r]];
      const float denom = sum + 1e-20f;
      for (int r = 0; r < K; ++r) out_w[r] = (p.renormalize ? s[chosen[r]] / denom : s[chosen[r]]) * p.scale;
    }
    if (io.index64) {
      int64_t* out_i = static_cast<int64_t*>(io.indices) + t * K;
      for (int r = 0; r < K; ++r) out_i[r] = chosen[r];
    } else {
      int32_t* out_i = static_cast<int32_t*>(io.indices) + t * K;
      for (int r = 0; r < K; ++r) out_i[r] = chosen[r];
    }
    if (io.scores != nullptr) {
      // Rule 6.
      float* row = io.scores + t * E;
      for (int e = 0; e < E; ++e) row[e] = 0.0f;
      for (int r = 0; r < K; ++r) row[chosen[r]] = out_w[r];
    }
  }
}

// Every preset routes 8 experts a token; wider top-k (up to 32) shares one copy with a looser bound.
void route(const Routing& p, const Buffers& io, int64_t begin, int64_t end) {
  if (p.top_k <= 8) {
    route_rows<8>(p, io, begin, end);
  } else {
    route_rows<32>(p, io, begin, end);
  }
}

int affinity_cpus() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
#endif
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

// The thread count a call may use: the keyword, else $FUSEDGATE_CPU_THREADS, else the CPUs this process may
// run on.
int thread_budget(int64_t requested) {
  if (requested < 0 || requested > kMaxThreads)
    TVM_FFI_THROW(ValueError) << "num_threads=" << requested << " is out of range: allowed 1 <= num_threads <= "
                              << kMaxThreads << ", or 0 for the default";
  if (requested > 0) return static_cast<int>(requested);
  const char* env = std::getenv("FUSEDGATE_CPU_THREADS");
  if (env != nullptr && *env != '\0') {
    char* end = nullptr;
    errno = 0;
    const long value = std::strtol(env, &end, 10);
    if (errno != 0 || *end != '\0' || value < 1 || value > kMaxThreads)
      TVM_FFI_THROW(ValueError) << "FUSEDGATE_CPU_THREADS='" << env
                                << "' is invalid: allowed an integer 1 <= FUSEDGATE_CPU_THREADS <= " << kMaxThreads;
    return static_cast<int>(value);
  }
  return affinity_cpus();
}

// Threads one call runs on: the budget, fewer where the rows hold too little work for each.
int threads_for(int64_t rows, int64_t experts, int budget) {
  const int64_t by_work = std::max<int64_t>(1, rows * experts / kMinExpertsPerThread);
  return static_cast<int>(std::min<int64_t>({budget, by_work, std::max<int64_t>(rows, 1)}));
}

}  // namespace

// The threads `cpu_grouped_topk` would run on for this shape and keyword (0 = default).
int64_t cpu_thread_count(int64_t num_tokens, int64_t num_experts, int64_t num_threads) {
  return threads_for(num_tokens, num_experts, thread_budget(num_threads));
}

void cpu_grouped_topk(TensorView logits, TensorView bias, Optional<TensorView> scores, TensorView values,
                      TensorView indices, int64_t n_group, int64_t topk_group, int64_t top_k, bool renormalize,
                      double scale, int64_t num_threads) {
  if (logits.ndim() != 2) TVM_FFI_THROW(ValueError) << "gating_output must be 2-D [num_tokens, num_experts]";
  const int64_t rows = logits.size(0), experts = logits.size(1);
  check_routing_args(experts, n_group, topk_group, top_k);
  const FloatKind kind = float_kind(logits, "gating_output");
  if (!logits.IsContiguous()) TVM_FFI_THROW(ValueError) << "gating_output must be contiguous";
  if (logits.device().device_type != kDLCPU) TVM_FFI_THROW(ValueError) << "gating_output must be a CPU tensor";
  check_bias(bias, experts, logits);
  const TensorView* scores_ptr = scores.has_value() ? &scores.value() : nullptr;
  const bool index64 = check_outputs(scores_ptr, values, indices, rows, experts, top_k, logits);
  Routing p;
  p.experts = static_cast<int>(experts);
  p.n_group = static_cast<int>(n_group);
  p.topk_group = static_cast<int>(topk_group);
  p.top_k = static_cast<int>(top_k);
  p.experts_per_group = p.experts / p.n_group;
  p.score_groups = topk_group < n_group;
  p.renormalize = renormalize;
  p.scale = static_cast<float>(scale);
  p.fallback_weight = 1.0f / static_cast<float>(p.top_k);

  float bias_f[kMaxExperts];
  decode_row(data_of(bias), float_kind(bias, "e_score_correction_bias"), 0, p.experts, bias_f);
  Buffers io{data_of(logits),
             kind,
             bias_f,
             static_cast<float*>(data_of(values)),
             data_of(indices),
             index64,
             scores_ptr ? static_cast<float*>(data_of(*scores_ptr)) : nullptr};

  const int threads = threads_for(rows, experts, thread_budget(num_threads));
  if (threads <= 1) {
    route(p, io, 0, rows);
    return;
  }
  // Contiguous row ranges whose sizes differ by at most one; this thread takes the first.
  auto range_start = [&](int i) { return rows / threads * i + std::min<int64_t>(i, rows % threads); };
  std::vector<std::thread> workers;
  workers.reserve(threads - 1);
  int started = 1;
  try {
    for (; started < threads; ++started)
      workers.emplace_back(route, std::cref(p), std::cref(io), range_start(started), range_start(started + 1));
  } catch (const std::system_error&) {
    // No thread to be had (a process limit): the ranges still unassigned run here.
  }
  route(p, io, range_start(0), range_start(1));
  route(p, io, range_start(started), rows);
  for (std::thread& w : workers) w.join();
}

}  // namespace fusedgate

TVM_FFI_DLL_EXPORT_TYPED_FUNC(cpu_grouped_topk, fusedgate::cpu_grouped_topk);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cpu_thread_count, fusedgate::cpu_thread_count);
