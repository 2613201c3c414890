// Loading one lane's contiguous chunk of a logits row into registers, as wide as the row's size and alignment
// allow: shared by the warp-per-token kernels of path `fused`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "routing_layout.h"

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

// A lane's chunk of a row as loaded, before conversion: VPT elements of T in 16-byte words, so a prefetched
// bfloat16 chunk holds half the registers its floats would. Elements not loaded (past the chunk or the row, or
// of an inactive token) keep every bit set: NaN in float32, bfloat16 and float16 alike, so they are never
// chosen and need no select after conversion. Bytes move in and out by memcpy, which the compiler turns into
// register moves and which, unlike pointer casts, is defined for any pair of types.
template <typename T, int VPT>
struct RawChunk {
  uint4 word[(VPT * static_cast<int>(sizeof(T)) + 15) / 16];

  __device__ __forceinline__ T element(int i) const {
    T v;
    memcpy(&v, reinterpret_cast<const char*>(word) + i * sizeof(T), sizeof(T));
    return v;
  }
};

// Loads one lane's chunk `BYTES` at a time. A chunk never straddles the end of the lane's experts or of the
// row: the launcher picks BYTES to divide both.
template <typename T, int VPT, int BYTES>
__device__ __forceinline__ void load_chunk(const T* __restrict__ row, bool active, int e0, const RoutingParams& p,
                                           RawChunk<T, VPT>& chunk) {
  constexpr int kVec = BYTES / static_cast<int>(sizeof(T));
  using V = typename VecOf<BYTES>::type;
#pragma unroll
  for (int w = 0; w < static_cast<int>(sizeof(chunk.word) / sizeof(uint4)); ++w)
    chunk.word[w] = make_uint4(0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu);
#pragma unroll
  for (int i = 0; i < VPT; i += kVec) {
    if (active && i < p.vpt && e0 + i < p.num_experts) {
      const V v = __ldg(reinterpret_cast<const V*>(row + e0 + i));
      memcpy(reinterpret_cast<char*>(chunk.word) + i * sizeof(T), &v, BYTES);
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

// The widest load (16, 8 or 4 bytes, else one element) that divides a lane's chunk of `vpt` elements, the row
// and the base address.
inline int row_vec_bytes(int vpt, int64_t experts, int elem, const void* base) {
  for (int bytes : {16, 8, 4}) {
    if (bytes > elem && (vpt * elem) % bytes == 0 && (experts * elem) % bytes == 0 &&
        reinterpret_cast<uintptr_t>(base) % bytes == 0) {
      return bytes;
    }
  }
  return elem;
}

}  // namespace fusedgate
