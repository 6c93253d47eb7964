// GEGLU forward and backward on the CPU (see geglu.h). Elementwise over each row, so a row's result never depends on
// the rows beside it; the GELU is the one the fused decode layer computes.

#include "geglu.h"
#include "vector_math.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace dalle_engine {
namespace {

constexpr int64_t kMinTaskElements = int64_t{1} << 15;  // elements per parallel task: a few us of work
constexpr int64_t kSumRows = 64;  // rows per partial sum of the bias's gradient

// out = a * GELU(gate), a and gate each plus their half of the bias (zeros when there is none).
template <typename scalar_t>
DALLE_ENGINE_INLINE void geglu_row(const scalar_t* a, const scalar_t* gate, const scalar_t* bias_a,
                                   const scalar_t* bias_gate, int64_t hidden, scalar_t* out) {
#pragma omp simd
  for (int64_t j = 0; j < hidden; ++j) out[j] = (a[j] + bias_a[j]) * gelu(gate[j] + bias_gate[j]);
}

// d/da = grad * GELU(gate), d/dgate = grad * a * GELU'(gate), each added into `sum` (the bias's partial gradient).
template <typename scalar_t>
DALLE_ENGINE_INLINE void geglu_grad_row(const scalar_t* a, const scalar_t* gate, const scalar_t* bias_a,
                                        const scalar_t* bias_gate, const scalar_t* grad, int64_t hidden,
                                        scalar_t* da, scalar_t* dgate, scalar_t* sum_a, scalar_t* sum_gate) {
#pragma omp simd
  for (int64_t j = 0; j < hidden; ++j) {
    const scalar_t x = a[j] + bias_a[j], g = gate[j] + bias_gate[j];
    da[j] = grad[j] * gelu(g);
    dgate[j] = grad[j] * x * gelu_grad(g);
    sum_a[j] += da[j];
    sum_gate[j] += dgate[j];
  }
}

void check(const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "geglu: x must be a float32 or float64 CPU tensor, got ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "geglu: x's last dim must be even, got shape ", x.sizes());
  TORCH_CHECK(!bias || (bias->device().is_cpu() && bias->scalar_type() == x.scalar_type() && bias->dim() == 1 &&
                        bias->size(0) == x.size(-1)),
              "geglu: bias must be (", x.size(-1), ",) of x's dtype on the CPU");
}

// The bias, contiguous, or zeros of its shape.
at::Tensor bias_or_zeros(const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  return bias ? bias->contiguous() : at::zeros({x.size(-1)}, x.options());
}

}  // namespace

at::Tensor geglu_fwd(const at::Tensor& x_in, const std::optional<at::Tensor>& bias_in) {
  check(x_in, bias_in);
  const at::Tensor x = x_in.contiguous(), bias = bias_or_zeros(x_in, bias_in);
  const int64_t hidden = x.size(-1) / 2, rows = hidden ? x.numel() / (2 * hidden) : 0;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = hidden;
  at::Tensor out = at::empty(shape, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "geglu_fwd", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    const scalar_t* b = bias.const_data_ptr<scalar_t>();
    scalar_t* dest = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(2 * hidden, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      with_cpu_isa([&]() DALLE_ENGINE_INLINE_LAMBDA {
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t* row = in + r * 2 * hidden;
          geglu_row(row, row + hidden, b, b + hidden, hidden, dest + r * hidden);
        }
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> geglu_bwd(const at::Tensor& x_in, const std::optional<at::Tensor>& bias_in,
                                             const at::Tensor& grad_in) {
  check(x_in, bias_in);
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() /= 2;
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef(shape) && grad_in.scalar_type() == x_in.scalar_type() &&
                  grad_in.device() == x_in.device(),
              "geglu_bwd: grad must be x's dtype and device and shape ", at::IntArrayRef(shape), ", got ",
              grad_in.sizes(), " ", grad_in.scalar_type());
  const at::Tensor x = x_in.contiguous(), grad = grad_in.contiguous(), bias = bias_or_zeros(x_in, bias_in);
  const int64_t hidden = shape.back(), rows = hidden ? grad.numel() / hidden : 0;
  const int64_t blocks = (rows + kSumRows - 1) / kSumRows;
  at::Tensor dx = at::empty(x.sizes(), x.options());
  // Each block of rows sums into its own row of partial sums (unused without a bias, but cheap beside the GELUs).
  at::Tensor partial = at::zeros({std::max<int64_t>(blocks, 1), 2 * hidden}, x.options());
  at::Tensor dbias = at::empty({bias_in ? 2 * hidden : 0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "geglu_bwd", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    const scalar_t* b = bias.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* dest = dx.mutable_data_ptr<scalar_t>();
    scalar_t* sums = partial.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(kSumRows * 3 * hidden, 1));
    at::parallel_for(0, blocks, grain, [&](int64_t first, int64_t last) {
      with_cpu_isa([&]() DALLE_ENGINE_INLINE_LAMBDA {
        for (int64_t block = first; block < last; ++block) {
          scalar_t* sum = sums + block * 2 * hidden;
          for (int64_t r = block * kSumRows; r < std::min(rows, (block + 1) * kSumRows); ++r) {
            const scalar_t* row = in + r * 2 * hidden;
            scalar_t* d = dest + r * 2 * hidden;
            geglu_grad_row(row, row + hidden, b, b + hidden, g + r * hidden, hidden, d, d + hidden, sum,
                           sum + hidden);
          }
        }
      });
    });
    if (!bias_in) return;
    scalar_t* total = dbias.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, 2 * hidden, 256, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        scalar_t acc = 0;
        for (int64_t block = 0; block < blocks; ++block) acc += sums[block * 2 * hidden + j];
        total[j] = acc;
      }
    });
  });
  return {dx, dbias};
}

}  // namespace dalle_engine
