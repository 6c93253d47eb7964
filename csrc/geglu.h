// CPU kernels for the GEGLU of the feed-forward's input projection, forward and backward, for training: each one pass
// over the rows in place of ATen's chunk, GELU, product, and in the backward their gradients and the concatenation.
// The projection's bias may be left to them: added as the rows are read, and its gradient (the column sums of the
// rows' gradient) summed as they are written, where the product's own bias costs a copy forward and a pass backward.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace dalle_engine {

// x: (..., 2 * hidden), float32 or float64, any strides; bias: (2 * hidden,) of x's dtype, or none. Returns (...,
// hidden) = first half * GELU(second half) of x + bias, contiguous. The exact (erf) GELU, as vector_math.h computes it.
at::Tensor geglu_fwd(const at::Tensor& x, const std::optional<at::Tensor>& bias);

// The gradient of geglu_fwd at x (and bias) for the output gradient grad (..., hidden): x's, (..., 2 * hidden)
// contiguous, and with a bias the bias's, (2 * hidden,) (an empty tensor without). The bias's sums run over fixed
// blocks of rows, then over the blocks in order: the same bits whatever the number of threads.
std::tuple<at::Tensor, at::Tensor> geglu_bwd(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                                             const at::Tensor& grad);

}  // namespace dalle_engine
