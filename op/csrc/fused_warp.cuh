// The mid and large-batch kernel of path `fused` where its layout fits: each lane holds `vpt` contiguous
// experts of a token in registers and the token's warp takes top_k rounds of a warp arg-max. A row wider than
// one warp's 4 experts per lane (an ungrouped config such as kimi_k2) is spread over `warps_per_token` warps
// whose winners one warp merges by the same rounds (chosen only through FUSEDGATE_WARP_MAX_TOKENS: see
// warp_max_tokens). The bias sits in registers, loaded once per lane; shared memory holds only the winners.
// Same arithmetic as the other kernels (sigmoid_f32, selection keys, the sum in output order, routed_weight):
// bit-identical outputs.
#pragma once

#include <cstdlib>

#include "launch.cuh"
#include "row_load.cuh"

namespace fusedgate {

// Experts per lane where a row is split over several warps, and the most warps a token may take.
constexpr int kSplitVpt = 4;
constexpr int kMaxSplitWarps = 4;

// Warps per token: one, or for an ungrouped row of more than 32 * kSplitVpt experts as many as hold it at
// kSplitVpt per lane, provided the merging warp can hold every warp's top_k winners (a lane each).
inline int warp_split(const RoutingParams& p) {
  if (p.score_groups || p.num_experts <= 32 * kSplitVpt) return 1;
  const int warps = (p.num_experts + 32 * kSplitVpt - 1) / (32 * kSplitVpt);
  return warps <= kMaxSplitWarps && warps * p.top_k <= 32 ? warps : 1;
}

// The warp layout: vpt experts per lane (kSplitVpt when split), and with group scoring each group on a
// power-of-two span of lanes.
inline RoutingParams warp_params(RoutingParams p, int vec_elems) {
  p.lanes = 32;
  if (warp_split(p) > 1) {
    p.vpt = kSplitVpt;
    p.lanes_per_group = 0;
    return p;
  }
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
// scores written (op/csrc/NOTES.md, v8 and v9) it wins at every count measured with 4 experts per lane, loses
// above the block-per-token range with 8 or more, and where that kernel does not apply still wins up to 1024
// tokens. A row split over warps measured slower than the threshold kernel (kimi_k2 at 1024 tokens), so no
// count selects it by default. FUSEDGATE_WARP_MAX_TOKENS overrides every limit (read once), so a benchmark can
// time either kernel at any count.
static inline int64_t warp_max_tokens(const RoutingParams& p, bool latency_covers) {
  static const char* env = std::getenv("FUSEDGATE_WARP_MAX_TOKENS");
  if (env != nullptr) return std::atoll(env);
  if (warp_split(p) > 1) return 0;
  if (p.vpt <= 4) return INT64_MAX;
  return latency_covers ? 0 : 1024;
}

// Shared memory of one block: each token's winners (s, then ids, 32 slots each), and where a token is split
// over warps, two alternating sets of every warp's winners (key, s, id) for the merge.
inline size_t warp_kernel_smem(int warps_per_token) {
  const int tokens_per_block = warps_per_token > 1 ? 1 : kWarpsPerBlock;
  const int candidates = warps_per_token > 1 ? 2 * 3 * 32 : 0;
  return static_cast<size_t>(tokens_per_block * 2 * 32 + candidates) * sizeof(float);
}

// A lane's experts as the rounds consume them. With four, they are sorted once (key descending, equal keys
// by index), so a round only looks at the front and the winner shifts the rest up; with more, each round
// scans them for the best, which costs fewer instructions than sorting that many.
template <int VPT, bool kSorted = (VPT == 4)>
struct Hand {
  int32_t key[VPT];
  float s[VPT];

  __device__ __forceinline__ void prepare() {}

  __device__ __forceinline__ void top2(int32_t& top1, int32_t& top2) const {
    top1 = kInvalidKey;
    top2 = kInvalidKey;
#pragma unroll
    for (int i = 0; i < VPT; ++i) push_top2(key[i], top1, top2);
  }

  __device__ __forceinline__ void invalidate() {
#pragma unroll
    for (int i = 0; i < VPT; ++i) key[i] = kInvalidKey;
  }

  // The best key, lowest index among equal ones, and where it sits.
  __device__ __forceinline__ int32_t best(int& at) const {
    int32_t b = key[0];
    at = 0;
#pragma unroll
    for (int i = 1; i < VPT; ++i) {
      if (key[i] > b) {
        b = key[i];
        at = i;
      }
    }
    return b;
  }

  // Drop the best (found at `at`), returning its s and index within the lane.
  __device__ __forceinline__ float take(int at, int& index) {
    float chosen = s[0];
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if (i == at) {
        chosen = s[i];
        key[i] = kNoKey;
      }
    }
    index = at;
    return chosen;
  }
};

template <int VPT>
struct Hand<VPT, true> {
  int32_t key[VPT];
  float s[VPT];
  // Index within the lane of place j in bits [4j, 4j + 4).
  uint32_t order;

  // Sorting network for four places. Equal keys keep their order through every exchange but the last, whose
  // two places may hold indices in either order, so that one compares indices as well.
  __device__ __forceinline__ void prepare() {
    int index[VPT];
#pragma unroll
    for (int i = 0; i < VPT; ++i) index[i] = i;
    exchange(index, 0, 1, false);
    exchange(index, 2, 3, false);
    exchange(index, 0, 2, false);
    exchange(index, 1, 3, false);
    exchange(index, 1, 2, true);
    order = index[0] | index[1] << 4 | index[2] << 8 | index[3] << 12;
  }

  __device__ __forceinline__ void exchange(int (&index)[VPT], int a, int b, bool by_index) {
    const bool swap = key[b] > key[a] || (by_index && key[b] == key[a] && index[b] < index[a]);
    if (swap) {
      const int32_t k = key[a];
      key[a] = key[b];
      key[b] = k;
      const float v = s[a];
      s[a] = s[b];
      s[b] = v;
      const int i = index[a];
      index[a] = index[b];
      index[b] = i;
    }
  }

  __device__ __forceinline__ void top2(int32_t& top1, int32_t& top2) const {
    top1 = key[0];
    top2 = key[1];
  }

  __device__ __forceinline__ void invalidate() {
#pragma unroll
    for (int i = 0; i < VPT; ++i) key[i] = kInvalidKey;
  }

  __device__ __forceinline__ int32_t best(int& at) const {
    at = 0;
    return key[0];
  }

  __device__ __forceinline__ float take(int, int& index) {
    const float chosen = s[0];
    index = order & 15;
#pragma unroll
    for (int i = 0; i + 1 < VPT; ++i) {
      key[i] = key[i + 1];
      s[i] = s[i + 1];
    }
    key[VPT - 1] = kNoKey;
    order >>= 4;
    return chosen;
  }
};

// One round of a warp arg-max: every lane offers `offered`, the warp takes the largest, and the lowest lane
// offering it (the lowest expert index: lanes hold ascending experts) wins. Returns the largest. Every lane
// must vote, so the ballot is taken before the test that uses it.
__device__ __forceinline__ int32_t warp_round(int32_t offered, unsigned lanes_below, bool& wins) {
  const int32_t top = __reduce_max_sync(kFullMask, offered);
  const bool holds = offered == top;
  const unsigned holders = __ballot_sync(kFullMask, holds);
  wins = holds && (holders & lanes_below) == 0u;
  return top;
}

// K > 0: top_k fixed at compile time (the rounds unroll); K == 0: p.top_k.
template <typename T, int VPT, int K>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, 4)
    fused_warp_kernel(const T* __restrict__ logits, const void* __restrict__ bias, int bias_kind, RoutingOutputs out,
                      const int32_t* __restrict__ num_tokens_ptr, int64_t num_tokens, RoutingParams p, int vec,
                      int warps_per_token) {
  extern __shared__ __align__(16) float smem[];
  wait_for_previous_grid();
  allow_next_grid();
  const int64_t tokens = effective_tokens(num_tokens, num_tokens_ptr);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const bool split = warps_per_token > 1;
  const int part = warp % warps_per_token;
  const int slot = warp / warps_per_token;
  const int tokens_per_block = blockDim.x / (32 * warps_per_token);
  const int e0 = (part * 32 + lane) * p.vpt;
  const int top_k = K > 0 ? K : p.top_k;
  const unsigned lanes_below = (1u << lane) - 1u;
  float* chosen_s = smem + slot * 64;
  int* chosen_id = reinterpret_cast<int*>(chosen_s + 32);
  int32_t* cand_key = reinterpret_cast<int32_t*>(smem + tokens_per_block * 64);
  const int64_t step = static_cast<int64_t>(gridDim.x) * tokens_per_block;
  int64_t token = static_cast<int64_t>(blockIdx.x) * tokens_per_block + slot;
  // The first row's loads go out before the bias's, so the two memory round trips overlap.
  RawChunk<T, VPT> chunk;
  load_row<T, VPT>(logits + (token < tokens ? token : 0) * p.num_experts, token < tokens, e0, vec, p, chunk);
  float bias_r[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    bias_r[i] = i < p.vpt && e0 + i < p.num_experts ? bias_value(bias, bias_kind, e0 + i) : 0.0f;
  }
  const bool vec_scores = p.vpt % 4 == 0 && p.num_experts % 4 == 0 && reinterpret_cast<uintptr_t>(out.scores) % 16 == 0;
  int buffer = 0;

  for (; token < tokens; token += step) {
    const int64_t next = token + step;
    RawChunk<T, VPT> next_chunk;
    load_row<T, VPT>(logits + (next < tokens ? next : 0) * p.num_experts, next < tokens, e0, vec, p, next_chunk);

    // The scores row is zeroed first, off the rounds' chain; the chosen weights overwrite their places after a
    // barrier that orders the two stores.
    if (out.scores != nullptr) {
      float* row = out.scores + token * p.num_experts + e0;
      if (vec_scores) {
#pragma unroll
        for (int i = 0; i < VPT; i += 4) {
          if (i < p.vpt && e0 + i < p.num_experts) *reinterpret_cast<float4*>(row + i) = make_float4(0.f, 0.f, 0.f, 0.f);
        }
      } else {
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
          if (i < p.vpt && e0 + i < p.num_experts) row[i] = 0.0f;
        }
      }
    }

    // Elements past the lane's chunk or the row were loaded as NaN: invalid keys that are never chosen.
    Hand<VPT> hand;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      hand.s[i] = sigmoid_f32(to_float<T>(chunk.element(i)));
      hand.key[i] = selection_key(__fadd_rn(hand.s[i], bias_r[i]));
    }
    hand.prepare();

    bool dead_group = false;
    if (p.score_groups) {
      const int lpg = p.lanes_per_group;
      int32_t top1, top2;
      hand.top2(top1, top2);
      for (int offset = 1; offset < lpg; offset <<= 1) merge_top2(top1, top2, offset);
      const float score = group_score_of(top1, top2, p.experts_per_group);
      const int g = lane / lpg;
      int rank = 0, finite = 0;
      for (int h = 0; h < p.n_group; ++h) {
        const float other = __shfl_sync(kFullMask, score, h * lpg);
        finite += other > __int_as_float(0xff800000);
        rank += (other > score) || (other == score && h < g);
      }
      // A kept group scores -inf exactly when fewer than topk_group groups are finite.
      dead_group = finite < p.topk_group;
      if (rank >= p.topk_group) hand.invalidate();
    }

    // top_k rounds; each winner records its s and id (and, split, its key) in shared memory.
    float* win_s = chosen_s;
    int* win_id = chosen_id;
    if (split) {
      win_s = reinterpret_cast<float*>(cand_key + (buffer * 3 + 1) * 32) + part * top_k;
      win_id = cand_key + (buffer * 3 + 2) * 32 + part * top_k;
    }
    int32_t* win_key = cand_key + buffer * 3 * 32 + part * top_k;
    int32_t last = kNoKey;
#pragma unroll
    for (int r = 0; r < top_k; ++r) {
      int at;
      bool wins;
      const int32_t offered = hand.best(at);
      last = warp_round(offered, lanes_below, wins);
      if (wins) {
        int index;
        win_s[r] = hand.take(at, index);
        win_id[r] = e0 + index;
        if (split) win_key[r] = offered;
      }
    }

    if (split) {
      // Warp 0 merges every warp's winners, a lane each, by the same rounds.
      __syncthreads();
      buffer ^= 1;
      if (part != 0) {
        chunk = next_chunk;
        continue;
      }
      const int from = lane < warps_per_token * top_k ? lane : 0;
      int32_t offered = lane < warps_per_token * top_k ? win_key[from] : kNoKey;
      const float cs = win_s[from];
      const int cid = win_id[from];
      last = kNoKey;
#pragma unroll
      for (int r = 0; r < top_k; ++r) {
        bool wins;
        last = warp_round(offered, lanes_below, wins);
        if (wins) {
          chosen_s[r] = cs;
          chosen_id[r] = cid;
          offered = kNoKey;
        }
      }
    }
    __syncwarp();

    // The largest key of the last round is the smallest chosen: invalid exactly when fewer than top_k experts
    // are valid (rule 7).
    const bool fallback = dead_group || last <= kInvalidKey;
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
    // The next token's rounds overwrite what this token's lanes read above.
    __syncwarp();
    chunk = next_chunk;
  }
}

}  // namespace fusedgate
