// `copy_rows`: the graph runner's copy-in. The leading rows of a static input buffer take a caller's logits, as
// one asynchronous device-to-device copy on the caller's stream. A framework's own copy goes through its operator
// dispatch and element-wise machinery before it reaches the same copy; this is the copy alone.
#include "launch.cuh"

namespace fusedgate {

void copy_rows(TensorView dst, TensorView src) {
  if (src.ndim() != 2 || dst.ndim() != 2)
    TVM_FFI_THROW(ValueError) << "copy_rows takes 2-D tensors [rows, columns]";
  if (src.device().device_type != kDLCUDA || !same_device(src, dst))
    TVM_FFI_THROW(ValueError) << "copy_rows: src and dst must be CUDA tensors on one device";
  const DLDataType a = src.dtype(), b = dst.dtype();
  if (a.code != b.code || a.bits != b.bits || a.lanes != b.lanes)
    TVM_FFI_THROW(ValueError) << "copy_rows: src has dtype " << dtype_str(a) << ", dst " << dtype_str(b);
  if (!src.IsContiguous() || !dst.IsContiguous()) TVM_FFI_THROW(ValueError) << "copy_rows: tensors must be contiguous";
  if (src.size(1) != dst.size(1) || src.size(0) > dst.size(0))
    TVM_FFI_THROW(ValueError) << "copy_rows: src [" << src.size(0) << ", " << src.size(1)
                              << "] must have dst's columns and at most its " << dst.size(0) << " rows";
  const size_t bytes = static_cast<size_t>(src.numel()) * ((a.bits * a.lanes + 7) / 8);
  if (bytes == 0) return;
  DeviceGuard guard(dst.device().device_id);
  check_cuda(cudaMemcpyAsync(data_of(dst), data_of(src), bytes, cudaMemcpyDeviceToDevice, current_stream(dst)),
             "copy_rows");
}

}  // namespace fusedgate

TVM_FFI_DLL_EXPORT_TYPED_FUNC(copy_rows, fusedgate::copy_rows);
