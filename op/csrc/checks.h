// Argument checks at the C++ boundary. The Python front-end checks first with friendlier messages; these
// guard every other caller of the library, so no kernel ever sees a shape it could overrun.
#pragma once

#include <dlpack/dlpack.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>

#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string>

#include "routing_layout.h"

namespace fusedgate {

enum class FloatKind { kFloat32, kBFloat16, kFloat16 };

// Bytes of one element of that kind.
constexpr int bytes_of(FloatKind kind) { return kind == FloatKind::kFloat32 ? 4 : 2; }

inline std::string dtype_str(DLDataType t) {
  std::ostringstream os;
  os << (t.code == kDLFloat ? "float" : t.code == kDLBfloat ? "bfloat" : t.code == kDLInt ? "int" : "code")
     << static_cast<int>(t.bits);
  return os.str();
}

// Whether two tensors hold the same element type (code, bits and lanes).
inline bool same_dtype(DLDataType a, DLDataType b) { return a.code == b.code && a.bits == b.bits && a.lanes == b.lanes; }

// Bytes of one element of `t`'s type, lanes included.
inline size_t element_bytes(DLDataType t) { return (static_cast<size_t>(t.bits) * t.lanes + 7) / 8; }

inline FloatKind float_kind(const tvm::ffi::TensorView& t, const char* name) {
  const DLDataType d = t.dtype();
  if (d.lanes == 1 && d.code == kDLFloat && d.bits == 32) return FloatKind::kFloat32;
  if (d.lanes == 1 && d.code == kDLBfloat && d.bits == 16) return FloatKind::kBFloat16;
  if (d.lanes == 1 && d.code == kDLFloat && d.bits == 16) return FloatKind::kFloat16;
  TVM_FFI_THROW(ValueError) << name << " dtype " << dtype_str(d)
                            << " is not supported: allowed float32, bfloat16, float16";
  return FloatKind::kFloat32;
}

inline void check_routing_args(int64_t num_experts, int64_t n_group, int64_t topk_group, int64_t top_k) {
  if (num_experts < 2 || num_experts > kMaxExperts)
    TVM_FFI_THROW(ValueError) << "num_experts=" << num_experts << " is out of range: allowed 2 <= num_experts <= "
                              << kMaxExperts;
  if (n_group < 1 || n_group > kMaxGroups)
    TVM_FFI_THROW(ValueError) << "n_group=" << n_group << " is out of range: allowed 1 <= n_group <= " << kMaxGroups;
  if (num_experts % n_group != 0)
    TVM_FFI_THROW(ValueError) << "n_group=" << n_group << " does not divide num_experts=" << num_experts;
  if (topk_group < 1 || topk_group > n_group)
    TVM_FFI_THROW(ValueError) << "topk_group=" << topk_group << " is out of range: allowed 1 <= topk_group <= n_group="
                              << n_group;
  const int64_t limit = std::min<int64_t>(kMaxTopK, topk_group * (num_experts / n_group));
  if (top_k < 1 || top_k > limit)
    TVM_FFI_THROW(ValueError) << "top_k=" << top_k << " is out of range: allowed 1 <= top_k <= " << limit;
}

// A tensor's first element. DLPack lets a producer keep a byte offset beside the base pointer, and `data_ptr()`
// does not add it; every pointer the kernels receive comes through here.
inline void* data_of(const tvm::ffi::TensorView& t) { return static_cast<char*>(t.data_ptr()) + t.byte_offset(); }

inline bool same_device(const tvm::ffi::TensorView& a, const tvm::ffi::TensorView& b) {
  return a.device().device_type == b.device().device_type && a.device().device_id == b.device().device_id;
}

inline void check_matrix(const tvm::ffi::TensorView& t, const char* name, int64_t rows, int64_t cols,
                         const tvm::ffi::TensorView& like) {
  if (t.ndim() != 2 || t.size(0) != rows || t.size(1) != cols)
    TVM_FFI_THROW(ValueError) << name << " must have shape [" << rows << ", " << cols << "]";
  if (!t.IsContiguous()) TVM_FFI_THROW(ValueError) << name << " must be contiguous";
  if (!same_device(t, like)) TVM_FFI_THROW(ValueError) << name << " must be on the device of gating_output";
}

inline void check_dtype(const tvm::ffi::TensorView& t, const char* name, uint8_t code, uint8_t bits) {
  const DLDataType d = t.dtype(), expected{code, bits, 1};
  if (!same_dtype(d, expected))
    TVM_FFI_THROW(ValueError) << name << " has dtype " << dtype_str(d) << ", expected " << dtype_str(expected);
}

inline void check_bias(const tvm::ffi::TensorView& bias, int64_t num_experts, const tvm::ffi::TensorView& like) {
  float_kind(bias, "e_score_correction_bias");
  const bool flat = bias.ndim() == 1 && bias.size(0) == num_experts;
  const bool row = bias.ndim() == 2 && bias.size(0) == 1 && bias.size(1) == num_experts;
  if (!flat && !row) {
    // Worded as the front end words it: a bias of another shape under a cached plan is refused here.
    std::ostringstream shape;
    for (int i = 0; i < bias.ndim(); ++i) shape << (i ? ", " : "") << bias.size(i);
    TVM_FFI_THROW(ValueError) << "e_score_correction_bias shape [" << shape.str() << "] does not match num_experts="
                              << num_experts << ": allowed [" << num_experts << "] or [1, " << num_experts << "]";
  }
  if (!bias.IsContiguous()) TVM_FFI_THROW(ValueError) << "e_score_correction_bias must be contiguous";
  if (!same_device(bias, like))
    TVM_FFI_THROW(ValueError) << "e_score_correction_bias must be on the device of gating_output";
}

inline void check_scalar_int32(const tvm::ffi::TensorView& n, const char* name, const tvm::ffi::TensorView& like) {
  if (n.numel() != 1) TVM_FFI_THROW(ValueError) << name << " must hold exactly one element";
  check_dtype(n, name, kDLInt, 32);
  if (!same_device(n, like)) TVM_FFI_THROW(ValueError) << name << " must be on the device of gating_output";
}

// Shapes and dtypes of (scores, values, indices) for `num_tokens` x `num_experts` and `top_k`.
inline bool check_outputs(const tvm::ffi::TensorView* scores, const tvm::ffi::TensorView& values,
                          const tvm::ffi::TensorView& indices, int64_t num_tokens, int64_t num_experts,
                          int64_t top_k, const tvm::ffi::TensorView& like) {
  if (scores != nullptr) {
    check_matrix(*scores, "scores", num_tokens, num_experts, like);
    check_dtype(*scores, "scores", kDLFloat, 32);
  }
  check_matrix(values, "topk_values", num_tokens, top_k, like);
  check_dtype(values, "topk_values", kDLFloat, 32);
  check_matrix(indices, "topk_indices", num_tokens, top_k, like);
  const DLDataType d = indices.dtype();
  if (d.code != kDLInt || (d.bits != 32 && d.bits != 64) || d.lanes != 1)
    TVM_FFI_THROW(ValueError) << "topk_indices has dtype " << dtype_str(d) << ", expected int64 or int32";
  return d.bits == 64;
}

}  // namespace fusedgate
