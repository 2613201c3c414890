// Host-side helpers shared by the CUDA entry points: argument checks, stream, grid size, dispatch.
#pragma once

#include <cuda_runtime.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
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

inline int sm_count(int device) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) device = 0;
  if (cached[device] == 0) {
    int count = 0;
    check_cuda(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    cached[device] = count;
  }
  return cached[device];
}

// Blocks of kWarpsPerBlock warps, each warp routing 32/lanes tokens per step, grid-strided; the grid never
// exceeds what the device runs at once, so large batches loop instead of queueing blocks.
inline int grid_blocks(int64_t num_tokens, const RoutingParams& p, int device, int blocks_per_sm) {
  const int64_t tokens_per_block = static_cast<int64_t>(kWarpsPerBlock) * (32 / p.lanes);
  const int64_t needed = (num_tokens + tokens_per_block - 1) / tokens_per_block;
  const int64_t cap = static_cast<int64_t>(sm_count(device)) * blocks_per_sm;
  return static_cast<int>(needed < cap ? (needed > 0 ? needed : 1) : cap);
}

inline size_t stage_bytes(const RoutingParams& p) {
  return static_cast<size_t>(kWarpsPerBlock) * (32 / p.lanes) * stage_words(p) * sizeof(float);
}

inline const int32_t* num_tokens_pointer(const Optional<TensorView>& num_tokens, const TensorView& like) {
  if (!num_tokens.has_value()) return nullptr;
  const TensorView& n = num_tokens.value();
  check_scalar_int32(n, "num_tokens", like);
  return static_cast<const int32_t*>(n.data_ptr());
}

// Calls f with the compile-time experts-per-lane capacity that covers p.vpt.
template <typename F>
inline void dispatch_vpt(int vpt, F&& f) {
  switch (vpt_capacity(vpt)) {
    case 8:
      f(std::integral_constant<int, 8>{});
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
