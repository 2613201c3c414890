// The mid and large-batch kernel of path `fused` where its layout fits: one token per warp, lane j holding the
// contiguous experts [j*vpt, (j+1)*vpt) in registers, and top_k rounds of a warp arg-max. Nothing goes through
// shared memory but the bias, no barrier follows the prologue, and each round is a handful of instructions, so
// a token costs a few hundred warp instructions on a short chain. Same arithmetic as the other kernels
// (sigmoid_f32, selection keys, the sum in output order, routed_weight): bit-identical outputs.
#pragma once

#include <cstdlib>

#include "launch.cuh"
#include "row_load.cuh"

namespace fusedgate {

// The warp layout: vpt experts per lane, and with group scoring each group on a power-of-two span of lanes.
inline RoutingParams warp_params(RoutingParams p, int vec_elems) {
  p.lanes = 32;
  const int vpt = (p.num_experts + 31) / 32;
  const int rounded = (vpt + vec_elems - 1) / vec_elems * vec_elems;
  // Chunks rounded up to whole 8-byte words load wide; where that splits a group over lanes unevenly, the
  // narrow chunk may still fit the groups.
  for (int candidate : {rounded, vpt}) {
    if (candidate > 32) continue;
    p.vpt = candidate;
    p.lanes_per_group = 0;
    if (!p.score_groups) return p;
    const int lpg = p.experts_per_group / candidate;
    if (p.experts_per_group % candidate == 0 && (lpg & (lpg - 1)) == 0) {
      p.lanes_per_group = lpg;
      return p;
    }
  }
  return p;
}

// Compile-time experts per lane the warp kernel is instantiated for.
inline int warp_vpt_capacity(int vpt) { return vpt <= 4 ? 4 : vpt <= 8 ? 8 : vpt <= 12 ? 12 : 16; }

template <typename F>
inline void dispatch_warp_vpt(int vpt, F&& f) {
  switch (warp_vpt_capacity(vpt)) {
    case 4:
      f(std::integral_constant<int, 4>{});
      break;
    case 8:
      f(std::integral_constant<int, 8>{});
      break;
    case 12:
      f(std::integral_constant<int, 12>{});
      break;
    default:
      f(std::integral_constant<int, 16>{});
      break;
  }
}

// Beyond 16 experts per lane the registers a lane needs spill, and the threshold kernel is faster anyway.
inline bool warp_kernel_covers(const RoutingParams& p) {
  return p.vpt <= 16 && (!p.score_groups || p.lanes_per_group > 0);
}

// Token counts up to which `fused` runs this kernel rather than the threshold kernel in fused.cu (above the
// block-per-token kernel's range, where that covers the config). Its rounds cost a few instructions per expert
// a lane holds, while the threshold kernel's selection does not grow with them: on an H200 with bf16 logits and
// scores written (op/csrc/NOTES.md, v8) it wins up to 8192 tokens with 4 experts per lane and loses above the
// block-per-token range with 8 or more; where that kernel does not apply, it still wins up to 1024 tokens.
// FUSEDGATE_WARP_MAX_TOKENS overrides it (read once), so a benchmark can time either kernel at any count.
inline int64_t warp_max_tokens(const RoutingParams& p, bool latency_covers) {
  static const char* env = std::getenv("FUSEDGATE_WARP_MAX_TOKENS");
  if (env != nullptr) return std::atoll(env);
  if (p.vpt <= 4) return 8192;
  return latency_covers ? 0 : 1024;
}

// K > 0: top_k fixed at compile time (the rounds unroll); K == 0: p.top_k.
template <typename T, int VPT, int K>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, 4)
    fused_warp_kernel(const T* __restrict__ logits, const void* __restrict__ bias, int bias_kind, RoutingOutputs out,
                      const int32_t* __restrict__ num_tokens_ptr, int64_t num_tokens, RoutingParams p, int vec) {
  extern __shared__ __align__(16) float bias_s[];
  wait_for_previous_grid();
  allow_next_grid();
  const int64_t tokens = effective_tokens(num_tokens, num_tokens_ptr);
  const int lane = threadIdx.x & 31;
  const int e0 = lane * p.vpt;
  const int top_k = K > 0 ? K : p.top_k;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  int64_t token = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  // The first row's loads go out before the bias's, so the two memory round trips overlap.
  RawChunk<T, VPT> chunk;
  load_row<T, VPT>(logits + (token < tokens ? token : 0) * p.num_experts, token < tokens, e0, vec, p, chunk);
  for (int e = threadIdx.x; e < p.num_experts; e += blockDim.x) bias_s[e] = bias_value(bias, bias_kind, e);
  __syncthreads();
  const float neg_inf = __int_as_float(0xff800000);
  const bool vec_scores = p.vpt % 4 == 0 && p.num_experts % 4 == 0 && reinterpret_cast<uintptr_t>(out.scores) % 16 == 0;

  for (; token < tokens; token += step) {
    const int64_t next = token + step;
    RawChunk<T, VPT> next_chunk;
    load_row<T, VPT>(logits + (next < tokens ? next : 0) * p.num_experts, next < tokens, e0, vec, p, next_chunk);

    // Elements past the lane's chunk or the row were loaded as NaN: invalid keys that are never chosen.
    float s[VPT];
    int32_t key[VPT];
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      s[i] = sigmoid_f32(to_float<T>(chunk.element(i)));
      const float bias_i = i < p.vpt && e0 + i < p.num_experts ? bias_s[e0 + i] : 0.0f;
      key[i] = selection_key(__fadd_rn(s[i], bias_i));
    }

    bool dead_group = false;
    if (p.score_groups) {
      const int lpg = p.lanes_per_group;
      int32_t top1 = kInvalidKey, top2 = kInvalidKey;
#pragma unroll
      for (int i = 0; i < VPT; ++i) push_top2(key[i], top1, top2);
      for (int offset = 1; offset < lpg; offset <<= 1) merge_top2(top1, top2, offset);
      const float score = group_score_of(top1, top2, p.experts_per_group);
      const int g = lane / lpg;
      int rank = 0, finite = 0;
      for (int h = 0; h < p.n_group; ++h) {
        const float other = __shfl_sync(kFullMask, score, h * lpg);
        finite += other > neg_inf;
        rank += (other > score) || (other == score && h < g);
      }
      // A kept group scores -inf exactly when fewer than topk_group groups are finite.
      dead_group = finite < p.topk_group;
      if (rank >= p.topk_group) {
#pragma unroll
        for (int i = 0; i < VPT; ++i) key[i] = kInvalidKey;
      }
    }

    // top_k rounds: each lane offers its best key (the lowest index among equal ones), the warp takes the
    // largest, the lowest lane holding it wins (the lower index), and the winner drops it. Every lane adds the
    // winners' s in output order, as every GPU path sums them.
    float sum = 0.0f, my_s = 0.0f;
    int my_id = 0;
    // The round in which each of this lane's experts was chosen, or -1.
    int round_of[VPT];
#pragma unroll
    for (int i = 0; i < VPT; ++i) round_of[i] = -1;
    bool incomplete = false;
#pragma unroll
    for (int r = 0; r < top_k; ++r) {
      int32_t best = key[0];
      int best_i = 0;
      float best_s = s[0];
#pragma unroll
      for (int i = 1; i < VPT; ++i) {
        if (key[i] > best) {
          best = key[i];
          best_i = i;
          best_s = s[i];
        }
      }
      const int32_t top = __reduce_max_sync(kFullMask, best);
      const int winner = __ffs(__ballot_sync(kFullMask, best == top)) - 1;
      const float win_s = __shfl_sync(kFullMask, best_s, winner);
      const int win_i = __shfl_sync(kFullMask, best_i, winner);
      incomplete |= top <= kInvalidKey;
      if (lane == winner) {
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
          round_of[i] = i == best_i ? r : round_of[i];
          key[i] = i == best_i ? kNoKey : key[i];
        }
      }
      sum = __fadd_rn(sum, win_s);
      if (lane == r) {
        my_s = win_s;
        my_id = winner * p.vpt + win_i;
      }
    }

    const bool fallback = dead_group || incomplete;
    const float denom = __fadd_rn(sum, 1e-20f);
    // Lane r holds the r-th weight; the lanes owning the chosen experts fetch theirs from it below.
    const float my_w = fallback ? p.fallback_weight : routed_weight(my_s, denom, p);
    if (lane < top_k) {
      out.values[token * top_k + lane] = my_w;
      const int id = fallback ? lane : my_id;
      if (out.index64) {
        static_cast<int64_t*>(out.indices)[token * top_k + lane] = id;
      } else {
        static_cast<int32_t*>(out.indices)[token * top_k + lane] = id;
      }
    }
    if (out.scores != nullptr) {
      // Each element of the row written once, from registers: its weight where chosen, zero elsewhere.
      float row[VPT];
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        const int from = fallback ? (e0 + i < top_k ? e0 + i : -1) : round_of[i];
        const float w = __shfl_sync(kFullMask, my_w, from < 0 ? 0 : from);
        row[i] = from < 0 ? 0.0f : w;
      }
      float* dst = out.scores + token * p.num_experts + e0;
      if (vec_scores) {
#pragma unroll
        for (int i = 0; i < VPT; i += 4) {
          if (i < p.vpt && e0 + i < p.num_experts) {
            *reinterpret_cast<float4*>(dst + i) = make_float4(row[i], row[i + 1], row[i + 2], row[i + 3]);
          }
        }
      } else {
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
          if (i < p.vpt && e0 + i < p.num_experts) dst[i] = row[i];
        }
      }
    }
    chunk = next_chunk;
  }
}

}  // namespace fusedgate
