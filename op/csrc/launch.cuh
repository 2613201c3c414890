// Host-side helpers shared by the CUDA entry points: argument checks, stream, grid size, dispatch.
#pragma once

#include <cuda_runtime.h>
#include <tvm/ffi/container/tensor.h>

#include <array>
#include <atomic>
#include <map>
#include <mutex>
#include <tuple>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/extra/cuda/device_guard.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/optional.h>

#include "checks.h"
#include "routing.cuh"

namespace fusedgate {

using tvm::ffi::Optional;
using tvm::ffi::TensorView;

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) TVM_FFI_THROW(RuntimeError) << what << ": " << cudaGetErrorString(err);
}

inline cudaStream_t current_stream(const TensorView& t) {
  return static_cast<cudaStream_t>(TVMFFIEnvGetStream(t.device().device_type, t.device().device_id));
}

// Makes the tensor's device current for the launch (the stream, SM count and pointers all belong to it),
// restoring the caller's device afterwards.
using DeviceGuard = tvm::ffi::CUDADeviceGuard;

constexpr int kMaxDevices = 64;

// A device attribute, read once per device. Any thread may fill an entry; they all write the same value. Static,
// as are the other functions here and in the kernels' headers that keep a cache: the static of an inline function
// is one object across the process (a unique symbol), which a second build of the library loaded beside this one
// would share.
template <cudaDeviceAttr kAttribute>
static inline int device_attribute(int device) {
  static std::array<std::atomic<int>, kMaxDevices> cached{};
  if (device < 0 || device >= kMaxDevices)
    TVM_FFI_THROW(ValueError) << "device " << device << " is out of range: allowed 0 <= device < " << kMaxDevices;
  int value = cached[device].load(std::memory_order_relaxed);
  if (value == 0) {
    check_cuda(cudaDeviceGetAttribute(&value, kAttribute, device), "cudaDeviceGetAttribute");
    cached[device].store(value, std::memory_order_relaxed);
  }
  return value;
}

inline int sm_count(int device) { return device_attribute<cudaDevAttrMultiProcessorCount>(device); }

// Blocks each SM must hold at once, for __launch_bounds__. With 8 two-byte experts per lane the kernels fit 80
// registers without spilling (6 blocks, 24 warps); float32 chunks hold twice the words and need the 102 that
// 5 blocks leave; a tighter bound spills, and the reloads sit on the latency chain of a small batch. Wider
// chunks need their registers.
constexpr int min_blocks_per_sm(int vpt, int elem_bytes) { return vpt <= 8 ? (elem_bytes <= 2 ? 6 : 5) : 1; }

// Blocks of `kernel` an SM holds at once with `smem` bytes of dynamic shared memory (its registers and shared
// memory decide), asked of the runtime once per kernel, size and device.
template <typename... Params>
static inline int resident_blocks(void (*kernel)(Params...), size_t smem, int device,
                                  int threads = kWarpsPerBlock * 32) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, size_t, int, int>, int> known;
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), smem, device, threads);
  std::lock_guard<std::mutex> lock(mutex);
  auto it = known.find(key);
  if (it == known.end()) {
    int blocks = 0;
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem),
               "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    it = known.emplace(key, blocks > 0 ? blocks : 1).first;
  }
  return it->second;
}

// Blocks of kWarpsPerBlock warps, each warp routing 32/lanes tokens per step, grid-strided. The grid is at
// most what the device holds at once: a grid larger than one wave would leave its last, partial wave running
// on a fraction of the SMs, while a resident grid keeps every warp busy to the end.
inline int grid_blocks(int64_t num_tokens, const RoutingParams& p, int device, int blocks_per_sm) {
  const int64_t tokens_per_block = static_cast<int64_t>(kWarpsPerBlock) * (32 / p.lanes);
  const int64_t needed = (num_tokens + tokens_per_block - 1) / tokens_per_block;
  const int64_t cap = static_cast<int64_t>(sm_count(device)) * blocks_per_sm;
  return static_cast<int>(needed < cap ? (needed > 0 ? needed : 1) : cap);
}

// Launches `kernel` allowing programmatic dependent launch where the device has it (sm_90+): in a stream or
// graph of back-to-back calls its launch overlaps the previous kernel's tail, and its griddepcontrol.wait
// keeps the ordering every stream user relies on.
template <typename... Params, typename... Args>
inline void launch_dependent(const char* what, void (*kernel)(Params...), int blocks, int threads, size_t smem,
                             cudaStream_t stream, int device, Args... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = device_attribute<cudaDevAttrComputeCapabilityMajor>(device) >= 9 ? 1 : 0;
  check_cuda(cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...), what);
}

// Launches a warp-per-token routing kernel on a resident grid (see grid_blocks).
template <typename... Params, typename... Args>
inline void launch_routing(const char* what, void (*kernel)(Params...), int64_t rows, const RoutingParams& p,
                           size_t smem, cudaStream_t stream, int device, Args... args) {
  const int blocks = grid_blocks(rows, p, device, resident_blocks(kernel, smem, device));
  launch_dependent(what, kernel, blocks, kWarpsPerBlock * 32, smem, stream, device, args...);
}

inline size_t stage_bytes(const RoutingParams& p) {
  return static_cast<size_t>(kWarpsPerBlock) * (32 / p.lanes) * stage_words(p) * sizeof(float);
}

inline const int32_t* num_tokens_pointer(const Optional<TensorView>& num_tokens, const TensorView& like) {
  if (!num_tokens.has_value()) return nullptr;
  const TensorView& n = num_tokens.value();
  check_scalar_int32(n, "num_tokens", like);
  return static_cast<const int32_t*>(data_of(n));
}

// A checked call of a fused entry point (`fused`, `fused_block`): gating_output [T, E] on the GPU, its bias,
// the outputs and the optional device token count, each refused with the argument's name.
struct FusedCall {
  int64_t rows;
  int64_t experts;
  FloatKind kind;
  int bias_kind;  // 0 float32, 1 bfloat16, 2 float16
  RoutingOutputs out;
  const int32_t* num_tokens;
};

inline FusedCall check_fused_call(const TensorView& logits, const TensorView& bias, const Optional<TensorView>& scores,
                                  const TensorView& values, const TensorView& indices,
                                  const Optional<TensorView>& num_tokens, int64_t n_group, int64_t topk_group,
                                  int64_t top_k) {
  if (logits.ndim() != 2) TVM_FFI_THROW(ValueError) << "gating_output must be 2-D [num_tokens, num_experts]";
  FusedCall call{};
  call.rows = logits.size(0);
  call.experts = logits.size(1);
  check_routing_args(call.experts, n_group, topk_group, top_k);
  call.kind = float_kind(logits, "gating_output");
  if (!logits.IsContiguous()) TVM_FFI_THROW(ValueError) << "gating_output must be contiguous";
  if (logits.device().device_type != kDLCUDA) TVM_FFI_THROW(ValueError) << "gating_output must be a CUDA tensor";
  check_bias(bias, call.experts, logits);
  const FloatKind bias_kind = float_kind(bias, "e_score_correction_bias");
  call.bias_kind = bias_kind == FloatKind::kFloat32 ? 0 : bias_kind == FloatKind::kBFloat16 ? 1 : 2;
  const TensorView* scores_ptr = scores.has_value() ? &scores.value() : nullptr;
  const bool index64 = check_outputs(scores_ptr, values, indices, call.rows, call.experts, top_k, logits);
  call.out = RoutingOutputs{scores_ptr ? static_cast<float*>(data_of(*scores_ptr)) : nullptr,
                            static_cast<float*>(data_of(values)), data_of(indices), index64 ? 1 : 0};
  call.num_tokens = num_tokens_pointer(num_tokens, logits);
  return call;
}

// Calls f with the compile-time experts-per-lane capacity that covers p.vpt.
template <typename F>
inline void dispatch_vpt(int vpt, F&& f) {
  switch (vpt_capacity(vpt)) {
    case 8:
      f(std::integral_constant<int, 8>{});
      break;
    case 12:
      f(std::integral_constant<int, 12>{});
      break;
    case 16:
      f(std::integral_constant<int, 16>{});
      break;
    case 24:
      f(std::integral_constant<int, 24>{});
      break;
    default:
      f(std::integral_constant<int, 32>{});
      break;
  }
}

}  // namespace fusedgate
