// Path `fused`: one launch does cast, sigmoid, bias, group scoring, group and expert selection,
// renormalisation, scaling, and writes scores, values and indices.
//
// A token occupies a sub-warp of `lanes` lanes (4 tokens per warp for deepseek_v3), each lane holding a
// contiguous chunk of the row in registers after 16-byte loads. The bias is converted once per block into
// shared memory; the grid is persistent, so large batches loop over tokens instead of launching more blocks.
#include "launch.cuh"

namespace fusedgate {

template <int BYTES>
struct VecOf;
template <>
struct VecOf<16> {
  using type = uint4;
};
template <>
struct VecOf<8> {
  using type = uint2;
};
template <>
struct VecOf<4> {
  using type = uint32_t;
};
template <>
struct VecOf<2> {
  using type = uint16_t;
};

// Loads one lane's chunk `BYTES` at a time; elements past the chunk or the row become NaN (never chosen).
template <typename T, int VPT, int BYTES>
__device__ __forceinline__ void load_chunk(const T* __restrict__ row, bool active, int e0, const RoutingParams& p,
                                           float (&x)[VPT]) {
  constexpr int kVec = BYTES / sizeof(T) > 0 ? BYTES / sizeof(T) : 1;
  using V = typename VecOf<kVec * sizeof(T)>::type;
  const float nan = __int_as_float(0x7fc00000);
#pragma unroll
  for (int i = 0; i < VPT; i += kVec) {
    if (active && i < p.vpt && e0 + i < p.num_experts) {
      const V raw = __ldg(reinterpret_cast<const V*>(row + e0 + i));
      const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (i + j < VPT) x[i + j] = (i + j < p.vpt) ? to_float<T>(v[j]) : nan;
      }
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (i + j < VPT) x[i + j] = nan;
      }
    }
  }
}

// The widest access that divides the chunk, the row and the base address: 16, 8, 4 bytes or one element.
template <typename T, int VPT>
__device__ __forceinline__ void load_row(const T* __restrict__ row, bool active, int e0, int vec_bytes,
                                         const RoutingParams& p, float (&x)[VPT]) {
  switch (vec_bytes) {
    case 16:
      load_chunk<T, VPT, 16>(row, active, e0, p, x);
      break;
    case 8:
      load_chunk<T, VPT, 8>(row, active, e0, p, x);
      break;
    case 4:
      load_chunk<T, VPT, 4>(row, active, e0, p, x);
      break;
    default:
      load_chunk<T, VPT, sizeof(T)>(row, active, e0, p, x);
      break;
  }
}

template <typename B>
__device__ __forceinline__ float load_bias(const void* bias, int i) {
  return to_float<B>(static_cast<const B*>(bias)[i]);
}

template <typename T, int VPT>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    fused_grouped_topk_kernel(const T* __restrict__ logits, const void* __restrict__ bias, int bias_kind,
                              RoutingOutputs out, const int32_t* __restrict__ num_tokens_ptr, int64_t num_tokens,
                              RoutingParams p, int vec) {
  extern __shared__ float stage_all[];
  const int64_t tokens = effective_tokens(num_tokens, num_tokens_ptr);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int tokens_per_warp = 32 / p.lanes;
  const int sub = lane / p.lanes;
  const int e0 = (lane & (p.lanes - 1)) * p.vpt;
  float* stage = stage_all + (warp * tokens_per_warp + sub) * stage_words(p);

  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock * tokens_per_warp;
  int64_t base = (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp) * tokens_per_warp;
  // The first row's loads go out before the bias's, so the two memory round trips overlap.
  float x[VPT];
  load_row<T, VPT>(logits + (base + sub < tokens ? base + sub : 0) * p.num_experts, base + sub < tokens, e0, vec, p,
                   x);
  // Each lane keeps the bias of its own experts in registers for the whole grid-stride loop.
  float bias_r[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int e = e0 + i;
    const bool in = i < p.vpt && e < p.num_experts;
    bias_r[i] = !in               ? 0.0f
                : bias_kind == 0 ? load_bias<float>(bias, e)
                : bias_kind == 1 ? load_bias<__nv_bfloat16>(bias, e)
                                 : load_bias<__half>(bias, e);
  }

  for (; base < tokens; base += step) {
    const int64_t token = base + sub;
    const bool active = token < tokens;
    // Prefetch the next row this sub-warp routes, so its loads are in flight while this one is routed.
    const int64_t next = token + step;
    float x_next[VPT];
    load_row<T, VPT>(logits + (next < tokens ? next : 0) * p.num_experts, next < tokens, e0, vec, p, x_next);
    float s[VPT], b[VPT];
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      s[i] = sigmoid_rn(x[i]);
      b[i] = __fadd_rn(s[i], bias_r[i]);
    }
    route_token<VPT>(s, b, token, active, p, out, stage);
#pragma unroll
    for (int i = 0; i < VPT; ++i) x[i] = x_next[i];
  }
}

void fused_grouped_topk(TensorView logits, TensorView bias, Optional<TensorView> scores, TensorView values,
                        TensorView indices, Optional<TensorView> num_tokens, int64_t n_group, int64_t topk_group,
                        int64_t top_k, bool renormalize, double scale) {
  if (logits.ndim() != 2) TVM_FFI_THROW(ValueError) << "gating_output must be 2-D [num_tokens, num_experts]";
  const int64_t rows = logits.size(0), experts = logits.size(1);
  check_routing_args(experts, n_group, topk_group, top_k);
  const FloatKind kind = float_kind(logits, "gating_output");
  if (!logits.IsContiguous()) TVM_FFI_THROW(ValueError) << "gating_output must be contiguous";
  if (logits.device().device_type != kDLCUDA) TVM_FFI_THROW(ValueError) << "gating_output must be a CUDA tensor";
  check_bias(bias, experts, logits);
  const TensorView* scores_ptr = scores.has_value() ? &scores.value() : nullptr;
  const bool index64 = check_outputs(scores_ptr, values, indices, rows, experts, top_k, logits);
  const int32_t* n_ptr = num_tokens_pointer(num_tokens, logits);
  if (rows == 0) return;

  const int elem = kind == FloatKind::kFloat32 ? 4 : 2;
  RoutingParams p = make_params(static_cast<int>(experts), static_cast<int>(n_group), static_cast<int>(topk_group),
                                static_cast<int>(top_k), renormalize, static_cast<float>(scale), 8 / elem);
  int vec = elem;
  for (int bytes : {16, 8, 4}) {
    if (bytes > elem && (p.vpt * elem) % bytes == 0 && (experts * elem) % bytes == 0 &&
        reinterpret_cast<uintptr_t>(logits.data_ptr()) % bytes == 0) {
      vec = bytes;
      break;
    }
  }
  const FloatKind bkind = float_kind(bias, "e_score_correction_bias");
  const int bias_kind = bkind == FloatKind::kFloat32 ? 0 : bkind == FloatKind::kBFloat16 ? 1 : 2;
  RoutingOutputs out{scores_ptr ? static_cast<float*>(scores_ptr->data_ptr()) : nullptr,
                     static_cast<float*>(values.data_ptr()), indices.data_ptr(), index64 ? 1 : 0};
  const int device = logits.device().device_id;
  const size_t smem = stage_bytes(p);
  const int blocks = grid_blocks(rows, p, device, 16);
  cudaStream_t stream = current_stream(logits);
  dispatch_vpt(p.vpt, [&](auto cap) {
    constexpr int VPT = decltype(cap)::value;
    auto launch = [&](auto* typed) {
      using T = std::remove_const_t<std::remove_pointer_t<decltype(typed)>>;
      fused_grouped_topk_kernel<T, VPT><<<blocks, kWarpsPerBlock * 32, smem, stream>>>(
          static_cast<const T*>(logits.data_ptr()), bias.data_ptr(), bias_kind, out, n_ptr, rows, p, vec);
    };
    if (kind == FloatKind::kFloat32) launch(static_cast<const float*>(nullptr));
    else if (kind == FloatKind::kBFloat16) launch(static_cast<const __nv_bfloat16*>(nullptr));
    else launch(static_cast<const __half*>(nullptr));
  });
  check_cuda(cudaGetLastError(), "fused_grouped_topk launch");
}

}  // namespace fusedgate

TVM_FFI_DLL_EXPORT_TYPED_FUNC(fused_grouped_topk, fusedgate::fused_grouped_topk);
