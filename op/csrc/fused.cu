// Path `fused`: one launch does cast, sigmoid, bias, group scoring, group and expert selection,
// renormalisation, scaling, and writes scores, values and indices. Which kernel that launch runs depends on the
// batch: one block per token while the blocks fit about one wave (fused_latency.cuh), then, where a lane holds
// few experts, one token per warp with top_k arg-max rounds (fused_warp.cuh), and otherwise the threshold kernel
// below. All three share the arithmetic and so give bit-identical outputs.
//
// The threshold kernel: a token occupies a sub-warp of `lanes` lanes (a whole warp for deepseek_v3, half of
// one for glm45_air), each lane holding a contiguous chunk of the row in registers after loads as wide as 16
// bytes; the grid is persistent, so large batches loop over tokens instead of launching more blocks.
#include "fused_latency.cuh"
#include "fused_warp.cuh"
#include "launch.cuh"
#include "row_load.cuh"

namespace fusedgate {

// K > 0: top_k fixed at compile time (see route_token); K == 0: p.top_k.
template <typename T, int VPT, int K>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, min_blocks_per_sm(VPT, sizeof(T)))
    fused_grouped_topk_kernel(const T* __restrict__ logits, const void* __restrict__ bias, int bias_kind,
                              RoutingOutputs out, const int32_t* __restrict__ num_tokens_ptr, int64_t num_tokens,
                              RoutingParams p, int vec) {
  // Shared memory: the bias as float32 (a non-finite one as NaN, so b is finite or NaN, which is all
  // route_token has to tell apart), then each token's stage.
  extern __shared__ __align__(16) float smem[];
  float* bias_s = smem;
  float* stage_all = smem + round_up4(p.num_experts);
  wait_for_previous_grid();
  allow_next_grid();
  const int64_t tokens = effective_tokens(num_tokens, num_tokens_ptr);
  const TokenWalk walk = token_walk(p, stage_all);
  const int e0 = walk.e0;
  // The first row's loads go out before the bias's, so the two memory round trips overlap.
  RawChunk<T, VPT> chunk;
  const int64_t first = walk.base + walk.sub;
  load_row<T, VPT>(logits + (first < tokens ? first : 0) * p.num_experts, first < tokens, e0, vec, p, chunk);
  for (int e = threadIdx.x; e < p.num_experts; e += blockDim.x) bias_s[e] = bias_value(bias, bias_kind, e);
  __syncthreads();
  // Read per token rather than held in registers: two shared loads cost less than the spills that eight
  // more live registers cause.
  const bool bias_vec = p.vpt % 4 == 0 && p.num_experts % 4 == 0;

  for (int64_t base = walk.base; base < tokens; base += walk.step) {
    const int64_t token = base + walk.sub;
    const bool active = token < tokens;
    // Prefetch the next row this sub-warp routes, so its loads are in flight while this one is routed.
    const int64_t next = token + walk.step;
    RawChunk<T, VPT> next_chunk;
    load_row<T, VPT>(logits + (next < tokens ? next : 0) * p.num_experts, next < tokens, e0, vec, p, next_chunk);
    float bias_r[VPT];
#pragma unroll
    for (int i = 0; i < VPT; i += 4) {
      if (bias_vec) {
        const float4 v = i < p.vpt && e0 + i < p.num_experts ? *reinterpret_cast<const float4*>(bias_s + e0 + i)
                                                             : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        bias_r[i] = v.x, bias_r[i + 1] = v.y, bias_r[i + 2] = v.z, bias_r[i + 3] = v.w;
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          bias_r[i + j] = i + j < p.vpt && e0 + i + j < p.num_experts ? bias_s[e0 + i + j] : 0.0f;
        }
      }
    }
    float s[VPT], b[VPT];
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      s[i] = sigmoid_f32(to_float<T>(chunk.element(i)));
      b[i] = __fadd_rn(s[i], bias_r[i]);
    }
    route_token<VPT, K>(s, b, token, active, p, out, walk.stage);
    chunk = next_chunk;
  }
}

void fused_grouped_topk(TensorView logits, TensorView bias, Optional<TensorView> scores, TensorView values,
                        TensorView indices, Optional<TensorView> num_tokens, int64_t n_group, int64_t topk_group,
                        int64_t top_k, bool renormalize, double scale) {
  const FusedCall call =
      check_fused_call(logits, bias, scores, values, indices, num_tokens, n_group, topk_group, top_k);
  const int64_t rows = call.rows, experts = call.experts;
  const FloatKind kind = call.kind;
  if (rows == 0) return;

  const int elem = bytes_of(kind);
  RoutingParams p = make_params(static_cast<int>(experts), static_cast<int>(n_group), static_cast<int>(topk_group),
                                static_cast<int>(top_k), renormalize, static_cast<float>(scale), 8 / elem);
  const int device = logits.device().device_id;
  const DeviceGuard guard(device);
  cudaStream_t stream = current_stream(logits);
  // Calls launch(typed nullptr) with the logits' element type.
  auto by_dtype = [&](auto&& launch) {
    if (kind == FloatKind::kFloat32) launch(static_cast<const float*>(nullptr));
    else if (kind == FloatKind::kBFloat16) launch(static_cast<const __nv_bfloat16*>(nullptr));
    else launch(static_cast<const __half*>(nullptr));
  };
  const bool latency_covers = latency_kernel_covers(p);
  if (latency_covers && rows <= latency_max_tokens(p)) {
    by_dtype([&](auto* typed) {
      using T = std::remove_const_t<std::remove_pointer_t<decltype(typed)>>;
      // Every model preset routes to 8 experts: that count unrolls the kernel's loops.
      auto* kernel = top_k == 8 ? fused_latency_kernel<T, 8> : fused_latency_kernel<T, 0>;
      launch_dependent("fused_grouped_topk launch", kernel, static_cast<int>(rows),
                       (static_cast<int>(experts) + 31) / 32 * 32, 0, stream, device,
                       static_cast<const T*>(data_of(logits)), data_of(bias), call.bias_kind, call.out,
                       call.num_tokens, rows, p);
    });
    return;
  }
  const RoutingParams wp = warp_params(p, 8 / elem);
  if (warp_kernel_covers(wp) && rows <= warp_max_tokens(wp, latency_covers)) {
    const int vec = row_vec_bytes(wp.vpt, experts, elem, data_of(logits));
    const int warps_per_token = warp_split(p);
    const size_t warp_smem = warp_kernel_smem(warps_per_token);
    dispatch_warp_vpt(wp.vpt, [&](auto cap) {
      constexpr int VPT = decltype(cap)::value;
      by_dtype([&](auto* typed) {
        using T = std::remove_const_t<std::remove_pointer_t<decltype(typed)>>;
        auto launch = [&](auto* kernel) {
          // A split row's block is that token's warps; otherwise a block holds kWarpsPerBlock tokens.
          const int threads = warps_per_token > 1 ? 32 * warps_per_token : kWarpsPerBlock * 32;
          const int64_t resident = static_cast<int64_t>(sm_count(device)) *
                                   resident_blocks(kernel, warp_smem, device, threads);
          const int64_t needed = warps_per_token > 1 ? rows : (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
          launch_dependent("fused_grouped_topk launch", kernel, static_cast<int>(needed < resident ? needed : resident),
                           threads, warp_smem, stream, device, static_cast<const T*>(data_of(logits)), data_of(bias),
                           call.bias_kind, call.out, call.num_tokens, rows, wp, vec, warps_per_token);
        };
        // Every model preset routes to 8 experts: that count unrolls its rounds.
        if constexpr (VPT <= 12) {
          if (top_k == 8) return launch(fused_warp_kernel<T, VPT, 8>);
        }
        launch(fused_warp_kernel<T, VPT, 0>);
      });
    });
    return;
  }
  const int vec = row_vec_bytes(p.vpt, experts, elem, data_of(logits));
  const size_t smem = round_up4(static_cast<int>(experts)) * sizeof(float) + stage_bytes(p);
  dispatch_vpt(p.vpt, [&](auto cap) {
    constexpr int VPT = decltype(cap)::value;
    by_dtype([&](auto* typed) {
      using T = std::remove_const_t<std::remove_pointer_t<decltype(typed)>>;
      auto launch = [&](auto* kernel) {
        launch_routing("fused_grouped_topk launch", kernel, rows, p, smem, stream, device,
                       static_cast<const T*>(data_of(logits)), data_of(bias), call.bias_kind, call.out,
                       call.num_tokens, rows, p, vec);
      };
      // Every model preset routes to 8 experts; where a lane holds 12 or 16 of them (Kimi-K2's 384 at 12), that
      // count fixed unrolls the rounds, the sum and the output loop. Not with 8 a lane, whose 80-register bound
      // the unrolled code would spill.
      if constexpr (VPT == 12 || VPT == 16) {
        if (top_k == 8) return launch(fused_grouped_topk_kernel<T, VPT, 8>);
      }
      launch(fused_grouped_topk_kernel<T, VPT, 0>);
    });
  });
}

}  // namespace fusedgate

TVM_FFI_DLL_EXPORT_TYPED_FUNC(fused_grouped_topk, fusedgate::fused_grouped_topk);
