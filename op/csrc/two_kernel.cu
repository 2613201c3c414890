// Path `two_kernel`, as production engines run it: kernel 1 `cast_sigmoid_bias` writes float32 `scores` and
// `scores_with_bias`; kernel 2 `noaux_tc` reads both, routes, and rewrites `scores` in place as the sparse
// weights. Written with the same care as the fused path (16-byte accesses, sub-warp per token, persistent
// grid), because a weak baseline would make any crossover meaningless.
#include "launch.cuh"

namespace fusedgate {

template <typename T, typename B>
__global__ void __launch_bounds__(256)
    cast_sigmoid_bias_kernel(const T* __restrict__ logits, const B* __restrict__ bias, float* __restrict__ scores,
                             float* __restrict__ biased, const int32_t* __restrict__ num_tokens_ptr,
                             int64_t num_tokens, int num_experts, int vec) {
  wait_for_previous_grid();
  allow_next_grid();
  const int64_t total = effective_tokens(num_tokens, num_tokens_ptr) * num_experts;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if (vec) {
    // 4 experts per step: E % 4 == 0 keeps each step inside one row.
    for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 4; i < total; i += stride * 4) {
      const int e = static_cast<int>(i % num_experts);
      float s[4], b[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        s[j] = sigmoid_f32(to_float<T>(logits[i + j]));
        b[j] = __fadd_rn(s[j], to_float<B>(bias[e + j]));
      }
      *reinterpret_cast<float4*>(scores + i) = make_float4(s[0], s[1], s[2], s[3]);
      *reinterpret_cast<float4*>(biased + i) = make_float4(b[0], b[1], b[2], b[3]);
    }
  } else {
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
      const float s = sigmoid_f32(to_float<T>(logits[i]));
      scores[i] = s;
      biased[i] = __fadd_rn(s, to_float<B>(bias[i % num_experts]));
    }
  }
}

template <int VPT>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, min_blocks_per_sm(VPT, sizeof(float)))
    noaux_tc_kernel(float* scores, const float* __restrict__ biased, RoutingOutputs out,
                    const int32_t* __restrict__ num_tokens_ptr, int64_t num_tokens, RoutingParams p, int vec) {
  extern __shared__ __align__(16) float stage_all[];
  wait_for_previous_grid();
  allow_next_grid();
  const int64_t tokens = effective_tokens(num_tokens, num_tokens_ptr);
  const TokenWalk walk = token_walk(p, stage_all);
  const int e0 = walk.e0;
  const float nan = __int_as_float(0x7fc00000);

  for (int64_t base = walk.base; base < tokens; base += walk.step) {
    const int64_t token = base + walk.sub;
    const bool active = token < tokens;
    const float* s_row = scores + (active ? token : 0) * p.num_experts;
    const float* b_row = biased + (active ? token : 0) * p.num_experts;
    float s[VPT], b[VPT];
#pragma unroll
    for (int i = 0; i < VPT; i += 4) {
      const bool in = active && i < p.vpt && e0 + i < p.num_experts;
      if (vec && in) {
        const float4 sv = *reinterpret_cast<const float4*>(s_row + e0 + i);
        const float4 bv = __ldg(reinterpret_cast<const float4*>(b_row + e0 + i));
        s[i] = sv.x, s[i + 1] = sv.y, s[i + 2] = sv.z, s[i + 3] = sv.w;
        b[i] = bv.x, b[i + 1] = bv.y, b[i + 2] = bv.z, b[i + 3] = bv.w;
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const bool ok = active && i + j < p.vpt && e0 + i + j < p.num_experts;
          s[i + j] = ok ? s_row[e0 + i + j] : 0.0f;
          b[i + j] = ok ? b_row[e0 + i + j] : nan;
        }
      }
    }
    // route_token tells only finite from NaN: a caller's infinite b is invalid too (rule 2).
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if (i >= p.vpt || e0 + i >= p.num_experts || !isfinite(b[i])) b[i] = nan;
    }
    route_token<VPT>(s, b, token, active, p, out, walk.stage);
  }
}

namespace {

// A float32 [rows, experts] matrix on the device of `like`: the pair kernel 1 writes and kernel 2 reads.
void check_score_matrix(const TensorView& t, const char* name, int64_t rows, int64_t experts, const TensorView& like) {
  check_matrix(t, name, rows, experts, like);
  check_dtype(t, name, kDLFloat, 32);
}

// Kernel 1 on checked arguments. The caller has made the logits' device current: the SM count and stream are its.
void launch_cast(const TensorView& logits, FloatKind kind, const TensorView& bias, float* scores, float* biased,
                 const int32_t* num_tokens, int64_t rows, int64_t experts, cudaStream_t stream) {
  const int device = logits.device().device_id;
  const int vec = experts % 4 == 0 && reinterpret_cast<uintptr_t>(scores) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(biased) % 16 == 0;
  const int64_t work = (rows * experts + (vec ? 3 : 0)) / (vec ? 4 : 1);
  const int64_t cap = static_cast<int64_t>(sm_count(device)) * 8;
  const int blocks = static_cast<int>(std::min<int64_t>(std::max<int64_t>((work + 255) / 256, 1), cap));
  const FloatKind bkind = float_kind(bias, "e_score_correction_bias");
  auto launch = [&](auto* typed_logits, auto* typed_bias) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(typed_logits)>>;
    using B = std::remove_const_t<std::remove_pointer_t<decltype(typed_bias)>>;
    launch_dependent("cast_sigmoid_bias launch", cast_sigmoid_bias_kernel<T, B>, blocks, 256, 0, stream, device,
                     static_cast<const T*>(data_of(logits)), static_cast<const B*>(data_of(bias)), scores, biased,
                     num_tokens, rows, static_cast<int>(experts), vec);
  };
  auto with_bias = [&](auto* typed_logits) {
    if (bkind == FloatKind::kFloat32) launch(typed_logits, static_cast<const float*>(nullptr));
    else if (bkind == FloatKind::kBFloat16) launch(typed_logits, static_cast<const __nv_bfloat16*>(nullptr));
    else launch(typed_logits, static_cast<const __half*>(nullptr));
  };
  if (kind == FloatKind::kFloat32) with_bias(static_cast<const float*>(nullptr));
  else if (kind == FloatKind::kBFloat16) with_bias(static_cast<const __nv_bfloat16*>(nullptr));
  else with_bias(static_cast<const __half*>(nullptr));
}

// Kernel 2 reads float32 rows, four elements to a 16-byte load.
RoutingParams route_params(int64_t experts, int64_t n_group, int64_t topk_group, int64_t top_k, bool renormalize,
                           double scale) {
  return make_params(static_cast<int>(experts), static_cast<int>(n_group), static_cast<int>(topk_group),
                     static_cast<int>(top_k), renormalize, static_cast<float>(scale), 4);
}

// Kernel 2 on checked arguments: routes from out.scores and `biased`, rewriting out.scores as the sparse weights.
void launch_route(const RoutingParams& p, const RoutingOutputs& out, const float* biased, const int32_t* num_tokens,
                  int64_t rows, int device, cudaStream_t stream) {
  const int vec = p.vpt % 4 == 0 && p.num_experts % 4 == 0 && reinterpret_cast<uintptr_t>(out.scores) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(biased) % 16 == 0;
  dispatch_vpt(p.vpt, [&](auto cap) {
    constexpr int VPT = decltype(cap)::value;
    launch_routing("noaux_tc launch", noaux_tc_kernel<VPT>, rows, p, stage_bytes(p), stream, device, out.scores,
                   biased, out, num_tokens, rows, p, vec);
  });
}

}  // namespace

void cast_sigmoid_bias(TensorView logits, TensorView bias, TensorView scores, TensorView biased,
                       Optional<TensorView> num_tokens) {
  if (logits.ndim() != 2) TVM_FFI_THROW(ValueError) << "gating_output must be 2-D [num_tokens, num_experts]";
  const int64_t rows = logits.size(0), experts = logits.size(1);
  if (experts < 2 || experts > kMaxExperts)
    TVM_FFI_THROW(ValueError) << "num_experts=" << experts << " is out of range: allowed 2 <= num_experts <= "
                              << kMaxExperts;
  const FloatKind kind = float_kind(logits, "gating_output");
  if (!logits.IsContiguous()) TVM_FFI_THROW(ValueError) << "gating_output must be contiguous";
  if (logits.device().device_type != kDLCUDA) TVM_FFI_THROW(ValueError) << "gating_output must be a CUDA tensor";
  check_bias(bias, experts, logits);
  check_score_matrix(scores, "scores", rows, experts, logits);
  check_score_matrix(biased, "scores_with_bias", rows, experts, logits);
  const int32_t* n_ptr = num_tokens_pointer(num_tokens, logits);
  if (rows == 0) return;
  const DeviceGuard guard(logits.device().device_id);
  launch_cast(logits, kind, bias, static_cast<float*>(data_of(scores)), static_cast<float*>(data_of(biased)), n_ptr,
              rows, experts, current_stream(logits));
}

void noaux_tc(TensorView scores, TensorView biased, TensorView values, TensorView indices,
              Optional<TensorView> num_tokens, int64_t n_group, int64_t topk_group, int64_t top_k, bool renormalize,
              double scale) {
  if (scores.ndim() != 2) TVM_FFI_THROW(ValueError) << "scores must be 2-D [num_tokens, num_experts]";
  const int64_t rows = scores.size(0), experts = scores.size(1);
  check_routing_args(experts, n_group, topk_group, top_k);
  if (scores.device().device_type != kDLCUDA) TVM_FFI_THROW(ValueError) << "scores must be a CUDA tensor";
  check_score_matrix(scores, "scores", rows, experts, scores);
  check_score_matrix(biased, "scores_with_bias", rows, experts, scores);
  const bool index64 = check_outputs(nullptr, values, indices, rows, experts, top_k, scores);
  const int32_t* n_ptr = num_tokens_pointer(num_tokens, scores);
  if (rows == 0) return;
  const int device = scores.device().device_id;
  const DeviceGuard guard(device);
  const RoutingOutputs out{static_cast<float*>(data_of(scores)), static_cast<float*>(data_of(values)),
                           data_of(indices), index64 ? 1 : 0};
  launch_route(route_params(experts, n_group, topk_group, top_k, renormalize, scale), out,
               static_cast<const float*>(data_of(biased)), n_ptr, rows, device, current_stream(scores));
}

// The whole path in one call from the host: every argument of both kernels is checked before either is queued,
// and the two launches follow each other on the caller's stream.
void two_kernel_grouped_topk(TensorView logits, TensorView bias, TensorView scores, TensorView biased,
                             TensorView values, TensorView indices, Optional<TensorView> num_tokens, int64_t n_group,
                             int64_t topk_group, int64_t top_k, bool renormalize, double scale) {
  const FusedCall call =
      check_fused_call(logits, bias, scores, values, indices, num_tokens, n_group, topk_group, top_k);
  check_score_matrix(biased, "scores_with_bias", call.rows, call.experts, logits);
  if (call.rows == 0) return;
  const int device = logits.device().device_id;
  const DeviceGuard guard(device);
  cudaStream_t stream = current_stream(logits);
  float* scratch = static_cast<float*>(data_of(biased));
  const RoutingParams p = route_params(call.experts, n_group, topk_group, top_k, renormalize, scale);
  launch_cast(logits, call.kind, bias, call.out.scores, scratch, call.num_tokens, call.rows, call.experts, stream);
  launch_route(p, call.out, scratch, call.num_tokens, call.rows, device, stream);
}

}  // namespace fusedgate

TVM_FFI_DLL_EXPORT_TYPED_FUNC(cast_sigmoid_bias, fusedgate::cast_sigmoid_bias);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(noaux_tc, fusedgate::noaux_tc);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(two_kernel_grouped_topk, fusedgate::two_kernel_grouped_topk);
