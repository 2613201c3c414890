// Path `fused`: one launch does cast, sigmoid, bias, group scoring, group and expert selection,
// renormalisation, scaling, and writes scores, values and indices.
//
// A token occupies a sub-warp of `lanes` lanes (a whole warp for deepseek_v3, half of one for glm45_air),
// each lane holding a contiguous chunk of the row in registers after loads as wide as 16 bytes. Each lane
// keeps the bias of its experts in registers; the grid is persistent, so large batches loop over tokens
// instead of launching more blocks.
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

// A lane's chunk of a row as loaded, before conversion: VPT elements of T packed in 32-bit words, so a
// prefetched bfloat16 chunk holds half the registers its floats would. Elements not loaded (past the chunk or
// the row, or of an inactive token) keep every bit set: NaN in float32, bfloat16 and float16 alike, so they
// are never chosen and need no select after conversion.
template <typename T, int VPT>
struct RawChunk {
  uint32_t word[(VPT * static_cast<int>(sizeof(T)) + 3) / 4];
};

// Loads one lane's chunk `BYTES` at a time. A chunk never straddles the end of the lane's experts or of the
// row: the launcher picks BYTES to divide both.
template <typename T, int VPT, int BYTES>
__device__ __forceinline__ void load_chunk(const T* __restrict__ row, bool active, int e0, const RoutingParams& p,
                                           RawChunk<T, VPT>& chunk) {
  constexpr int kVec = BYTES / static_cast<int>(sizeof(T));
  using V = typename VecOf<BYTES>::type;
#pragma unroll
  for (int w = 0; w < static_cast<int>(sizeof(chunk.word) / 4); ++w) chunk.word[w] = 0xffffffffu;
#pragma unroll
  for (int i = 0; i < VPT; i += kVec) {
    if (active && i < p.vpt && e0 + i < p.num_experts) {
      *reinterpret_cast<V*>(reinterpret_cast<T*>(chunk.word) + i) = __ldg(reinterpret_cast<const V*>(row + e0 + i));
    }
  }
}

// The widest access that divides the chunk, the row and the base address: 16, 8, 4 bytes or one element.
template <typename T, int VPT>
__device__ __forceinline__ void load_row(const T* __restrict__ row, bool active, int e0, int vec_bytes,
                                         const RoutingParams& p, RawChunk<T, VPT>& chunk) {
  switch (vec_bytes) {
    case 16:
      load_chunk<T, VPT, 16>(row, active, e0, p, chunk);
      break;
    case 8:
      load_chunk<T, VPT, 8>(row, active, e0, p, chunk);
      break;
    case 4:
      load_chunk<T, VPT, 4>(row, active, e0, p, chunk);
      break;
    default:
      load_chunk<T, VPT, sizeof(T)>(row, active, e0, p, chunk);
      break;
  }
}

template <typename B>
__device__ __forceinline__ float load_bias(const void* bias, int i) {
  return to_float<B>(static_cast<const B*>(bias)[i]);
}

template <typename T, int VPT>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, min_blocks_per_sm(VPT))
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
  for (int e = threadIdx.x; e < p.num_experts; e += blockDim.x) {
    const float v = bias_kind == 0   ? load_bias<float>(bias, e)
                    : bias_kind == 1 ? load_bias<__nv_bfloat16>(bias, e)
                                     : load_bias<__half>(bias, e);
    bias_s[e] = isfinite(v) ? v : __int_as_float(0x7fc00000);
  }
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
      s[i] = sigmoid_f32(to_float<T>(reinterpret_cast<const T*>(chunk.word)[i]));
      b[i] = __fadd_rn(s[i], bias_r[i]);
    }
    route_token<VPT>(s, b, token, active, p, out, walk.stage);
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

  const int elem = kind == FloatKind::kFloat32 ? 4 : 2;
  RoutingParams p = make_params(static_cast<int>(experts), static_cast<int>(n_group), static_cast<int>(topk_group),
                                static_cast<int>(top_k), renormalize, static_cast<float>(scale), 8 / elem);
  int vec = elem;
  for (int bytes : {16, 8, 4}) {
    if (bytes > elem && (p.vpt * elem) % bytes == 0 && (experts * elem) % bytes == 0 &&
        reinterpret_cast<uintptr_t>(data_of(logits)) % bytes == 0) {
      vec = bytes;
      break;
    }
  }
  const int device = logits.device().device_id;
  const DeviceGuard guard(device);
  const size_t smem = round_up4(static_cast<int>(experts)) * sizeof(float) + stage_bytes(p);
  cudaStream_t stream = current_stream(logits);
  dispatch_vpt(p.vpt, [&](auto cap) {
    constexpr int VPT = decltype(cap)::value;
    auto launch = [&](auto* typed) {
      using T = std::remove_const_t<std::remove_pointer_t<decltype(typed)>>;
      launch_routing("fused_grouped_topk launch", fused_grouped_topk_kernel<T, VPT>, rows, p, smem, stream, device,
                     static_cast<const T*>(data_of(logits)), data_of(bias), call.bias_kind, call.out,
                     call.num_tokens, rows, p, vec);
    };
    if (kind == FloatKind::kFloat32) launch(static_cast<const float*>(nullptr));
    else if (kind == FloatKind::kBFloat16) launch(static_cast<const __nv_bfloat16*>(nullptr));
    else launch(static_cast<const __half*>(nullptr));
  });
}

}  // namespace fusedgate

TVM_FFI_DLL_EXPORT_TYPED_FUNC(fused_grouped_topk, fusedgate::fused_grouped_topk);
