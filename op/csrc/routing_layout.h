// How one token's experts are spread over the lanes of a warp: shared by the host launchers of every
// GPU path so that they agree, and free of CUDA so the CPU build can include it.
#pragma once

#include <cstdint>

namespace fusedgate {

constexpr int kMaxExperts = 1024;
constexpr int kMaxGroups = 32;
constexpr int kMaxTopK = 32;
constexpr int kWarpsPerBlock = 4;

struct RoutingParams {
  int num_experts;
  int n_group;
  int topk_group;
  int top_k;
  int experts_per_group;  // num_experts / n_group, divided once on the host
  int renormalize;
  float scale;
  float fallback_weight;  // 1 / top_k in float32 (rule 7), divided once on the host
  // A token occupies `lanes` consecutive lanes (a power of two); lane j holds experts [j*vpt, (j+1)*vpt).
  int lanes;
  int vpt;
  // Group scoring: 0 when skipped (every group kept); with lanes_per_group > 0 each group covers exactly
  // that many lanes; with lanes_per_group == 0 and score_groups set, groups are scored by a generic loop.
  int score_groups;
  int lanes_per_group;
};

inline int next_pow2(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Capacity (compile-time experts per lane) the kernels are instantiated for.
inline int vpt_capacity(int vpt) { return vpt <= 8 ? 8 : vpt <= 12 ? 12 : vpt <= 16 ? 16 : vpt <= 24 ? 24 : 32; }

// `vec_elems` is how many experts fill 8 bytes; chunk sizes are rounded up to it so every chunk start stays
// 8-byte aligned and the loads can be vectorised, without padding lanes with work they do not need.
inline RoutingParams make_params(int num_experts, int n_group, int topk_group, int top_k, bool renormalize,
                                 float scale, int vec_elems) {
  RoutingParams p{};
  p.num_experts = num_experts;
  p.n_group = n_group;
  p.topk_group = topk_group;
  p.top_k = top_k;
  p.experts_per_group = num_experts / n_group;
  p.renormalize = renormalize ? 1 : 0;
  p.scale = scale;
  p.fallback_weight = 1.0f / static_cast<float>(top_k);
  p.score_groups = topk_group < n_group ? 1 : 0;
  const int epg = num_experts / n_group;
  if (p.score_groups) {
    // Spread each group over as many lanes as fit (short serial chains per token), but keep at least 8
    // experts per lane where the group has them, so loads stay wide.
    for (int lpg = 32; lpg >= 1; lpg >>= 1) {
      if (n_group * lpg > 32 || epg % lpg != 0 || epg / lpg > 32) continue;
      if (lpg > 1 && epg / lpg < 8) continue;
      p.lanes_per_group = lpg;
      p.vpt = epg / lpg;
      p.lanes = next_pow2(n_group * lpg);
      return p;
    }
    // No lane-aligned layout: one token per warp, groups scored one at a time.
    p.lanes_per_group = 0;
    p.lanes = 32;
    p.vpt = (num_experts + 31) / 32;
    return p;
  }
  // About 8 experts per lane: the per-token chain of selection rounds is short, and wide loads remain.
  p.lanes = next_pow2((num_experts + 7) / 8);
  if (p.lanes > 32) p.lanes = 32;
  const int vpt = (num_experts + p.lanes - 1) / p.lanes;
  const int rounded = (vpt + vec_elems - 1) / vec_elems * vec_elems;
  p.vpt = rounded <= 32 ? rounded : vpt;
  return p;
}

}  // namespace fusedgate
