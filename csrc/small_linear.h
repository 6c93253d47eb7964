// CPU kernel for y = x @ weight^T + bias with a handful of rows (one token per sequence while decoding), where the
// product is bound by streaming the weight from memory.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace dalle_engine {

// x: (rows, in), any strides; weight: (out, in) with unit stride along in (any row stride, so a row slice of a bigger
// matrix works); bias: (out,) or none. CPU tensors of one dtype: float32, float64, bfloat16 or float16, except that
// the weight may be stored in fewer bits (weight-only quantisation): int8 with scale, a float32 (out,) tensor, giving
// y = (x @ weight^T) * scale + bias, or bfloat16 / float16 beside float32 x. Computes in float32 (float64
// for float64 x) and returns (rows, out), contiguous, in x's dtype. Reads the weight once whatever the number of
// rows; meant for up to ~16 rows but correct for any. The weight may also come packed along output features, (out / 16,
// in, 16) contiguous (kernels.cpp.pack_weight; see packed_linear.cpp): the fastest form for a decode step.
at::Tensor small_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& scale);

}  // namespace dalle_engine
