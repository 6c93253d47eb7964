// CPU kernel for y = x @ weight^T + bias with a handful of rows (one token per sequence while decoding), where the
// product is bound by streaming the weight from memory.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace dalle_engine {

// x: (rows, in), any strides; weight: (out, in) with unit stride along in (any row stride, so a row slice of a bigger
// matrix works); bias: (out,) or none. CPU tensors of one dtype: float32, float64, bfloat16 or float16. Computes in
// float32 (float64 for float64 inputs) and returns (rows, out), contiguous, in x's dtype. Reads the weight once
// whatever the number of rows; meant for up to ~16 rows but correct for any.
at::Tensor small_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

}  // namespace dalle_engine
