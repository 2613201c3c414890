// Path `cpu_kernel`: the routing op in C++ on the CPU, for CPU tensors of any framework (the microservice's CPU
// backend, the Paddle CPU path). One token at a time, in the order DESIGN.md states the rules; built with
// -ffp-contract=off so no fused multiply-add changes a rounding.
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/optional.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "checks.h"

namespace fusedgate {
namespace {

using tvm::ffi::Optional;
using tvm::ffi::TensorView;

float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

float read_float(const void* data, FloatKind kind, int64_t i) {
  if (kind == FloatKind::kFloat32) return static_cast<const float*>(data)[i];
  const uint16_t h = static_cast<const uint16_t*>(data)[i];
  if (kind == FloatKind::kBFloat16) return bits_to_float(static_cast<uint32_t>(h) << 16);
  // IEEE half to float, subnormals included.
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    if (mantissa == 0) return bits_to_float(sign);
    const float value = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -value : value;
  }
  return bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

// Strict weak order "better expert": higher b, then lower index.
struct ByScore {
  const float* b;
  bool operator()(int l, int r) const { return b[l] > b[r] || (b[l] == b[r] && l < r); }
};

}  // namespace

void cpu_grouped_topk(TensorView logits, TensorView bias, Optional<TensorView> scores, TensorView values,
                      TensorView indices, int64_t n_group, int64_t topk_group, int64_t top_k, bool renormalize,
                      double scale) {
  if (logits.ndim() != 2) TVM_FFI_THROW(ValueError) << "gating_output must be 2-D [num_tokens, num_experts]";
  const int64_t rows = logits.size(0), experts = logits.size(1);
  check_routing_args(experts, n_group, topk_group, top_k);
  const FloatKind kind = float_kind(logits, "gating_output");
  if (!logits.IsContiguous()) TVM_FFI_THROW(ValueError) << "gating_output must be contiguous";
  if (logits.device().device_type != kDLCPU) TVM_FFI_THROW(ValueError) << "gating_output must be a CPU tensor";
  check_bias(bias, experts, logits);
  const TensorView* scores_ptr = scores.has_value() ? &scores.value() : nullptr;
  const bool index64 = check_outputs(scores_ptr, values, indices, rows, experts, top_k, logits);

  const FloatKind bias_kind = float_kind(bias, "e_score_correction_bias");
  const int E = static_cast<int>(experts), G = static_cast<int>(n_group), K = static_cast<int>(top_k);
  const int epg = E / G;
  const float scale_f = static_cast<float>(scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const float fallback_w = 1.0f / static_cast<float>(K);
  std::vector<float> bias_f(E), s(E), b(E), group_score(G);
  std::vector<int> candidates, group_order(G);
  std::vector<char> kept(G);
  for (int e = 0; e < E; ++e) bias_f[e] = read_float(data_of(bias), bias_kind, e);
  float* values_out = static_cast<float*>(data_of(values));
  float* scores_out = scores_ptr ? static_cast<float*>(data_of(*scores_ptr)) : nullptr;

  for (int64_t t = 0; t < rows; ++t) {
    for (int e = 0; e < E; ++e) {
      const float x = read_float(data_of(logits), kind, t * E + e);
      s[e] = 1.0f / (1.0f + std::exp(-x));
      b[e] = s[e] + bias_f[e];
    }
    bool fallback = false;
    std::fill(kept.begin(), kept.end(), 1);
    if (topk_group < n_group) {
      const int need = std::min(2, epg);
      for (int g = 0; g < G; ++g) {
        float top1 = neg_inf, top2 = neg_inf;
        int count = 0;
        for (int e = g * epg; e < (g + 1) * epg; ++e) {
          if (!std::isfinite(b[e])) continue;
          if (b[e] > top1) {
            top2 = top1;
            top1 = b[e];
          } else if (b[e] > top2) {
            top2 = b[e];
          }
          ++count;
        }
        group_score[g] = count < need ? neg_inf : (need == 2 ? top1 + top2 : top1);
      }
      for (int g = 0; g < G; ++g) group_order[g] = g;
      std::stable_sort(group_order.begin(), group_order.end(),
                       [&](int l, int r) { return group_score[l] > group_score[r]; });
      std::fill(kept.begin(), kept.end(), 0);
      for (int i = 0; i < topk_group; ++i) {
        kept[group_order[i]] = 1;
        fallback |= group_score[group_order[i]] == neg_inf;
      }
    }
    candidates.clear();
    for (int e = 0; e < E; ++e) {
      if (kept[e / epg] && std::isfinite(b[e])) candidates.push_back(e);
    }
    fallback |= static_cast<int>(candidates.size()) < K;
    float* out_w = values_out + t * K;
    int ids[kMaxTopK];
    if (fallback) {
      for (int r = 0; r < K; ++r) {
        ids[r] = r;
        out_w[r] = fallback_w;
      }
    } else {
      std::partial_sort(candidates.begin(), candidates.begin() + K, candidates.end(), ByScore{b.data()});
      float sum = 0.0f;
      for (int r = 0; r < K; ++r) {
        ids[r] = candidates[r];
        sum += s[ids[r]];
      }
      const float denom = sum + 1e-20f;
      for (int r = 0; r < K; ++r) out_w[r] = (renormalize ? s[ids[r]] / denom : s[ids[r]]) * scale_f;
    }
    for (int r = 0; r < K; ++r) {
      if (index64) static_cast<int64_t*>(data_of(indices))[t * K + r] = ids[r];
      else static_cast<int32_t*>(data_of(indices))[t * K + r] = ids[r];
    }
    if (scores_out != nullptr) {
      float* row = scores_out + t * E;
      std::fill(row, row + E, 0.0f);
      for (int r = 0; r < K; ++r) row[ids[r]] = out_w[r];
    }
  }
}

}  // namespace fusedgate

TVM_FFI_DLL_EXPORT_TYPED_FUNC(cpu_grouped_topk, fusedgate::cpu_grouped_topk);
