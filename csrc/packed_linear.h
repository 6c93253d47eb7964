// The decode step's products on a weight packed along output features (see packed_linear.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace dalle_engine {

// Output features per group of a packed weight: one AVX-512 register of float32.
constexpr int64_t kPackLanes = 16;

// A weight's output features, stored (out, in) or packed.
inline int64_t out_features(const at::Tensor& weight) {
  return weight.dim() == 3 ? weight.size(0) * weight.size(2) : weight.size(0);
}

// y = x @ W^T (* scale) + bias, W packed as (out / kPackLanes, in, kPackLanes): packed[g][i][l] = W[g * kPackLanes +
// l][i]. x: (rows, in) in the compute type (float32, or float64 for float64 y) with unit stride along in; packed:
// contiguous, x's dtype or, beside float32 x, int8 (with scale), bfloat16 or float16; bias: (out,) in y's dtype, or
// undefined; scale: (out,) float32 for int8, else undefined; y: (rows, out), contiguous. Arguments checked by the
// caller (small_linear).
void packed_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias, const at::Tensor& scale,
                   at::Tensor& y);

}  // namespace dalle_engine
