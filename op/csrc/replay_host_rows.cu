// `replay_host_rows`: a batch served from host memory in one call. The rows of a host buffer go into the leading
// rows of a captured graph's static input, the graph is launched, the same rows of each static output come back
// into host buffers, and an event is recorded behind them, all queued on the stream the caller names. Through the
// framework that is a copy, a replay, a copy per output and an event record, each an operator dispatch or a
// crossing of the language boundary: on a server's host they took about ten times what the device took for a
// batch of one row. With pinned host buffers every step is asynchronous; the event says when the outputs are in.
#include "launch.cuh"

namespace fusedgate {

namespace {

bool on_host(const TensorView& t) {
  const int type = t.device().device_type;
  return type == kDLCPU || type == kDLCUDAHost;
}

size_t row_bytes(const TensorView& t) { return static_cast<size_t>(t.size(1)) * element_bytes(t.dtype()); }

// A host buffer of exactly `rows` rows and the device buffer whose leading rows it stands for.
void check_pair(const TensorView& host, const TensorView& device, const TensorView& like, int64_t rows,
                const char* name) {
  if (host.ndim() != 2 || device.ndim() != 2)
    TVM_FFI_THROW(ValueError) << "replay_host_rows: " << name << " takes 2-D tensors [rows, columns]";
  if (!on_host(host))
    TVM_FFI_THROW(ValueError) << "replay_host_rows: the host " << name << " must be in host memory (pinned for an "
                              << "asynchronous copy)";
  if (!same_device(device, like))
    TVM_FFI_THROW(ValueError) << "replay_host_rows: the device " << name << " must be on the graph's CUDA device";
  const DLDataType a = host.dtype(), b = device.dtype();
  if (!same_dtype(a, b))
    TVM_FFI_THROW(ValueError) << "replay_host_rows: " << name << " has host dtype " << dtype_str(a) << ", device "
                              << dtype_str(b);
  if (!host.IsContiguous() || !device.IsContiguous())
    TVM_FFI_THROW(ValueError) << "replay_host_rows: " << name << " tensors must be contiguous";
  if (host.size(1) != device.size(1) || host.size(0) != rows || device.size(0) < rows)
    TVM_FFI_THROW(ValueError) << "replay_host_rows: " << name << " host [" << host.size(0) << ", " << host.size(1)
                              << "] must have " << rows << " rows and the columns of device [" << device.size(0)
                              << ", " << device.size(1) << "], which needs at least " << rows << " rows";
}

}  // namespace

void replay_host_rows(TensorView host_in, TensorView device_in, int64_t graph_exec, Optional<TensorView> host_scores,
                      Optional<TensorView> device_scores, TensorView host_values, TensorView device_values,
                      TensorView host_ids, TensorView device_ids, int64_t event, int64_t stream) {
  if (device_in.ndim() != 2 || device_in.device().device_type != kDLCUDA)
    TVM_FFI_THROW(ValueError) << "replay_host_rows: device_in must be a 2-D CUDA tensor";
  const int64_t rows = host_in.ndim() == 2 ? host_in.size(0) : 0;
  if (rows < 1)
    TVM_FFI_THROW(ValueError) << "replay_host_rows: host_in must be [rows >= 1, columns], got " << host_in.ndim()
                              << " dimensions";
  check_pair(host_in, device_in, device_in, rows, "input");
  if (host_scores.has_value() != device_scores.has_value())
    TVM_FFI_THROW(ValueError) << "replay_host_rows: give both scores buffers or neither";
  if (host_scores.has_value()) check_pair(host_scores.value(), device_scores.value(), device_in, rows, "scores");
  check_pair(host_values, device_values, device_in, rows, "topk_values");
  check_pair(host_ids, device_ids, device_in, rows, "topk_indices");
  if (graph_exec == 0) TVM_FFI_THROW(ValueError) << "replay_host_rows: graph_exec must be an instantiated graph, got 0";
  if (event == 0) TVM_FFI_THROW(ValueError) << "replay_host_rows: event must be a created CUDA event, got 0";
  // Every check is done before anything is queued: a refused call leaves the stream as it was.
  DeviceGuard guard(device_in.device().device_id);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  auto copy = [&](const TensorView& to, const TensorView& from, cudaMemcpyKind kind, const char* what) {
    check_cuda(cudaMemcpyAsync(data_of(to), data_of(from), rows * row_bytes(from), kind, s), what);
  };
  copy(device_in, host_in, cudaMemcpyHostToDevice, "replay_host_rows copy in");
  check_cuda(cudaGraphLaunch(reinterpret_cast<cudaGraphExec_t>(graph_exec), s), "replay_host_rows launch");
  if (host_scores.has_value())
    copy(host_scores.value(), device_scores.value(), cudaMemcpyDeviceToHost, "replay_host_rows scores out");
  copy(host_values, device_values, cudaMemcpyDeviceToHost, "replay_host_rows topk_values out");
  copy(host_ids, device_ids, cudaMemcpyDeviceToHost, "replay_host_rows topk_indices out");
  check_cuda(cudaEventRecord(reinterpret_cast<cudaEvent_t>(event), s), "replay_host_rows event");
}

}  // namespace fusedgate

TVM_FFI_DLL_EXPORT_TYPED_FUNC(replay_host_rows, fusedgate::replay_host_rows);
