// `replay_rows`: the graph runner's call. The leading rows of a static input buffer take a caller's logits (one
// asynchronous device-to-device copy, left out when the caller passes those rows themselves), then a captured
// graph is launched, both on the caller's stream. A framework's copy goes through its operator dispatch and
// element-wise set-up before it reaches the same copy, and its replay through another crossing of the language
// boundary; this is the copy and the launch in one call.
#include "launch.cuh"

namespace fusedgate {

void replay_rows(TensorView dst, TensorView src, int64_t graph_exec) {
  if (src.ndim() != 2 || dst.ndim() != 2)
    TVM_FFI_THROW(ValueError) << "replay_rows takes 2-D tensors [rows, columns]";
  if (src.device().device_type != kDLCUDA || !same_device(src, dst))
    TVM_FFI_THROW(ValueError) << "replay_rows: src and dst must be CUDA tensors on one device";
  const DLDataType a = src.dtype(), b = dst.dtype();
  if (!same_dtype(a, b))
    TVM_FFI_THROW(ValueError) << "replay_rows: src has dtype " << dtype_str(a) << ", dst " << dtype_str(b);
  if (!src.IsContiguous() || !dst.IsContiguous())
    TVM_FFI_THROW(ValueError) << "replay_rows: tensors must be contiguous";
  if (src.size(1) != dst.size(1) || src.size(0) > dst.size(0))
    TVM_FFI_THROW(ValueError) << "replay_rows: src [" << src.size(0) << ", " << src.size(1)
                              << "] must have dst's columns and at most its " << dst.size(0) << " rows";
  if (graph_exec == 0) TVM_FFI_THROW(ValueError) << "replay_rows: graph_exec must be an instantiated graph, got 0";
  const size_t bytes = static_cast<size_t>(src.numel()) * element_bytes(a);
  const char* from = static_cast<const char*>(data_of(src));
  char* to = static_cast<char*>(data_of(dst));
  if (from != to && from < to + bytes && to < from + bytes)
    TVM_FFI_THROW(ValueError) << "replay_rows: src overlaps dst's rows without being them";
  // Every check is done before anything is queued: a refused call leaves the stream as it was, and the caller's
  // fallback copies and replays instead.
  DeviceGuard guard(dst.device().device_id);
  cudaStream_t stream = current_stream(dst);
  if (bytes != 0 && from != to)
    check_cuda(cudaMemcpyAsync(to, from, bytes, cudaMemcpyDeviceToDevice, stream), "replay_rows copy");
  check_cuda(cudaGraphLaunch(reinterpret_cast<cudaGraphExec_t>(graph_exec), stream), "replay_rows launch");
}

}  // namespace fusedgate

TVM_FFI_DLL_EXPORT_TYPED_FUNC(replay_rows, fusedgate::replay_rows);
