// CPU kernel for the rows of a cross-entropy: each row's loss and, in place, its logits' gradient, in one visit of
// the row while it is in cache (engine/model/cross_entropy.py runs it on chunks of rows straight from the product).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace dalle_engine {

// logits: (rows, vocabulary), contiguous float32 or float64 CPU; bias: (vocabulary,) of its dtype, or none; target:
// (rows,) int64 ids in [0, vocabulary). Returns (rows,) of logits' dtype: logsumexp(row) - row[target] of each row
// plus bias. With grad, overwrites each row with the gradient of its loss: softmax(row + bias) minus the one-hot
// target; without, leaves logits in an unspecified state.
at::Tensor cross_entropy_rows(at::Tensor& logits, const std::optional<at::Tensor>& bias, const at::Tensor& target,
                              bool grad);

}  // namespace dalle_engine
