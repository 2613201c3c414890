// Path `fused_block`: the published one-block-per-token fused design, kept only as a baseline so the harness
// can show its crossover against `two_kernel` on the same card. It models FastDeploy PR 7777's kernel: grid
// of T blocks, one warp per group (block = n_group x 32 threads); every warp scores its group; then warp 0
// alone picks the groups and the top-k experts while the other warps wait, recomputes the chosen sigmoids,
// renormalises and scales, zeroes the scores row and scatters. Same semantics and arithmetic as `fused`,
// hence bit-identical outputs; none of its speed work.
#include "launch.cuh"

namespace fusedgate {

template <typename T>
__global__ void fused_block_kernel(const T* __restrict__ logits, const void* __restrict__ bias, int bias_kind,
                                   RoutingOutputs out, const int32_t* __restrict__ num_tokens_ptr,
                                   int64_t num_tokens, RoutingParams p) {
  extern __shared__ float smem[];
  float* b = smem;                        // [E] biased scores
  float* group_score = smem + p.num_experts;  // [n_group]
  float* chosen_s = group_score + p.n_group;  // [top_k]
  int* chosen_e = reinterpret_cast<int*>(chosen_s + p.top_k);
  const int64_t token = blockIdx.x;
  if (token >= effective_tokens(num_tokens, num_tokens_ptr)) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int epg = p.experts_per_group;
  const float neg_inf = __int_as_float(0xff800000);
  const T* row = logits + token * p.num_experts;

  // b is finite or NaN (a NaN logit or a non-finite bias), whose selection key is invalid.
  int32_t top1 = kInvalidKey, top2 = kInvalidKey;
  for (int e = warp * epg + lane; e < (warp + 1) * epg; e += 32) {
    b[e] = __fadd_rn(sigmoid_f32(to_float<T>(row[e])), bias_value(bias, bias_kind, e));
    push_top2(selection_key(b[e]), top1, top2);
  }
  for (int offset = 16; offset > 0; offset >>= 1) merge_top2(top1, top2, offset);
  if (lane == 0) group_score[warp] = group_score_of(top1, top2, epg);
  __syncthreads();
  if (warp != 0) return;

  uint32_t kept = kFullMask;
  bool fallback = false;
  if (p.score_groups) {
    const float mine = lane < p.n_group ? group_score[lane] : neg_inf;
    int rank = 0, finite_groups = 0;
    for (int h = 0; h < p.n_group; ++h) {
      finite_groups += group_score[h] > neg_inf;
      rank += (group_score[h] > mine) || (group_score[h] == mine && h < lane);
    }
    kept = __ballot_sync(kFullMask, lane < p.n_group && rank < p.topk_group);
    fallback = finite_groups < p.topk_group;
  }
  // Warp 0 holds the biased scores of experts lane, lane + 32, ... as keys in registers, dropped groups as
  // invalid, and takes the top_k by rounds of a warp arg-max; the owner of each winner drops it.
  constexpr int kPerLane = kMaxExperts / 32;
  int32_t key[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int e = lane + 32 * i;
    key[i] = kNoKey;
    if (e < p.num_experts) key[i] = (kept >> (e / epg) & 1u) ? selection_key(b[e]) : kInvalidKey;
  }
  int my_e = 0;
  for (int r = 0; r < p.top_k; ++r) {
    int32_t own = kNoKey;
    int own_i = 0;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      if (key[i] > own) {
        own = key[i];
        own_i = i;
      }
    }
    const int32_t best_key = __reduce_max_sync(kFullMask, own);
    const int best_e = __reduce_min_sync(kFullMask, own == best_key ? lane + 32 * own_i : 0x7fffffff);
    fallback |= best_key <= kInvalidKey;
    if (best_e == lane + 32 * own_i) {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) key[i] = i == own_i ? kNoKey : key[i];
    }
    if (lane == r) my_e = best_e;
  }
  // The chosen sigmoids are recomputed from the logits, all at once, and summed in output order.
  const float my_s = !fallback && lane < p.top_k ? sigmoid_f32(to_float<T>(row[my_e])) : 0.0f;
  float sum = 0.0f;
  for (int r = 0; r < p.top_k; ++r) sum = __fadd_rn(sum, __shfl_sync(kFullMask, my_s, r));
  if (lane < p.top_k) {
    chosen_e[lane] = my_e;
    chosen_s[lane] = my_s;
  }
  const float denom = __fadd_rn(sum, 1e-20f);
  if (out.scores != nullptr) {
    for (int e = lane; e < p.num_experts; e += 32) out.scores[token * p.num_experts + e] = 0.0f;
  }
  __syncwarp();
  for (int r = lane; r < p.top_k; r += 32) {
    const int id = fallback ? r : chosen_e[r];
    const float w = fallback ? p.fallback_weight : routed_weight(chosen_s[r], denom, p);
    write_choice(out, token, p.top_k, p.num_experts, r, id, w);
  }
}

void fused_block_grouped_topk(TensorView logits, TensorView bias, Optional<TensorView> scores, TensorView values,
                              TensorView indices, Optional<TensorView> num_tokens, int64_t n_group,
                              int64_t topk_group, int64_t top_k, bool renormalize, double scale) {
  const FusedCall call =
      check_fused_call(logits, bias, scores, values, indices, num_tokens, n_group, topk_group, top_k);
  const int64_t rows = call.rows, experts = call.experts;
  const FloatKind kind = call.kind;
  if (rows == 0) return;
  if (rows > 0x7fffffff) TVM_FFI_THROW(ValueError) << "fused_block launches one block per token: at most 2^31-1";
  RoutingParams p = make_params(static_cast<int>(experts), static_cast<int>(n_group), static_cast<int>(topk_group),
                                static_cast<int>(top_k), renormalize, static_cast<float>(scale), 1);
  const size_t smem = (experts + n_group + 2 * top_k) * sizeof(float);
  const DeviceGuard guard(logits.device().device_id);
  cudaStream_t stream = current_stream(logits);
  const dim3 grid(static_cast<unsigned>(rows)), block(static_cast<unsigned>(n_group * 32));
  if (kind == FloatKind::kFloat32)
    fused_block_kernel<float><<<grid, block, smem, stream>>>(static_cast<const float*>(data_of(logits)),
                                                             data_of(bias), call.bias_kind, call.out,
                                                             call.num_tokens, rows, p);
  else if (kind == FloatKind::kBFloat16)
    fused_block_kernel<__nv_bfloat16><<<grid, block, smem, stream>>>(
        static_cast<const __nv_bfloat16*>(data_of(logits)), data_of(bias), call.bias_kind, call.out,
        call.num_tokens, rows, p);
  else
    fused_block_kernel<__half><<<grid, block, smem, stream>>>(static_cast<const __half*>(data_of(logits)),
                                                              data_of(bias), call.bias_kind, call.out,
                                                              call.num_tokens, rows, p);
  check_cuda(cudaGetLastError(), "fused_block_grouped_topk launch");
}

}  // namespace fusedgate

TVM_FFI_DLL_EXPORT_TYPED_FUNC(fused_block_grouped_topk, fusedgate::fused_block_grouped_topk);
