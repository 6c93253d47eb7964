// CPU kernels for the GEGLU of the feed-forward's input projection, forward and backward, for training: each one pass
// over the rows in place of ATen's chunk, GELU, product, and in the backward their gradients and the concatenation.
#pragma once

#include <ATen/core/Tensor.h>

namespace dalle_engine {

// x: (..., 2 * hidden), float32 or float64, any strides; returns (..., hidden) = first half * GELU(second half),
// contiguous. The exact (erf) GELU, as vector_math.h computes it.
at::Tensor geglu_fwd(const at::Tensor& x);

// The gradient of geglu_fwd at x for the output gradient grad (..., hidden): (..., 2 * hidden), contiguous.
at::Tensor geglu_bwd(const at::Tensor& x, const at::Tensor& grad);

}  // namespace dalle_engine
