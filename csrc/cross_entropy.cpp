// Cross-entropy rows on the CPU (see cross_entropy.h). Each row is its own task in a fixed order of operations, so
// a row's loss and gradient never depend on the rows beside it.

#include "cross_entropy.h"
#include "vector_math.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace dalle_engine {
namespace {

constexpr int64_t kMinTaskElements = int64_t{1} << 15;  // elements per parallel task: a few us of work

// The row's loss, bias added to it first (if any); with grad, the row becomes softmax minus the one-hot target.
template <typename T>
DALLE_ENGINE_INLINE T cross_entropy_row(T* row, const T* bias, int64_t n, int64_t target, bool grad) {
  T top = -std::numeric_limits<T>::infinity();
  if (bias != nullptr) {
#pragma omp simd reduction(max : top)
    for (int64_t j = 0; j < n; ++j) {
      row[j] += bias[j];
      top = std::max(top, row[j]);
    }
  } else {
#pragma omp simd reduction(max : top)
    for (int64_t j = 0; j < n; ++j) top = std::max(top, row[j]);
  }
  const T picked = row[target];
  const T sum = exp_shifted(row, n, top);
  if (grad) {
    const T inverse = T(1) / sum;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] *= inverse;
    row[target] -= T(1);
  }
  return top + std::log(sum) - picked;
}

}  // namespace

at::Tensor cross_entropy_rows(at::Tensor& logits, const std::optional<at::Tensor>& bias_in, const at::Tensor& target,
                              bool grad) {
  TORCH_CHECK(logits.device().is_cpu() && (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble),
              "cross_entropy_rows: logits must be a float32 or float64 CPU tensor, got ", logits.scalar_type(),
              " on ", logits.device());
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.size(1) >= 1,
              "cross_entropy_rows: logits must be contiguous (rows, vocabulary), got shape ", logits.sizes());
  TORCH_CHECK(target.device().is_cpu() && target.scalar_type() == at::kLong && target.dim() == 1 &&
                  target.size(0) == logits.size(0),
              "cross_entropy_rows: target must be (", logits.size(0), ",) int64 on the CPU, got ", target.sizes(), " ",
              target.scalar_type());
  const int64_t rows = logits.size(0), n = logits.size(1);
  TORCH_CHECK(!bias_in || (bias_in->device().is_cpu() && bias_in->scalar_type() == logits.scalar_type() &&
                           bias_in->dim() == 1 && bias_in->size(0) == n),
              "cross_entropy_rows: bias must be (", n, ",) of logits' dtype on the CPU");
  const at::Tensor bias = bias_in ? bias_in->contiguous() : at::Tensor();
  const at::Tensor ids = target.contiguous();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(id[r] >= 0 && id[r] < n, "cross_entropy_rows: target ", id[r], " at row ", r,
                " is outside the vocabulary [0, ", n, ")");
  }
  at::Tensor loss = at::empty({rows}, logits.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "cross_entropy_rows", [&] {
    scalar_t* data = logits.mutable_data_ptr<scalar_t>();
    scalar_t* out = loss.mutable_data_ptr<scalar_t>();
    const scalar_t* shift = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, std::max<int64_t>(1, kMinTaskElements / n), [&](int64_t begin, int64_t end) {
      with_cpu_isa([&]() DALLE_ENGINE_INLINE_LAMBDA {
        for (int64_t r = begin; r < end; ++r) out[r] = cross_entropy_row(data + r * n, shift, n, id[r], grad);
      });
    });
  });
  return loss;
}

}  // namespace dalle_engine
