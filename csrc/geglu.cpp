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

template <typename scalar_t>
DALLE_ENGINE_INLINE void geglu_row(const scalar_t* a, const scalar_t* gate, int64_t hidden, scalar_t* out) {
#pragma omp simd
  for (int64_t j = 0; j < hidden; ++j) out[j] = a[j] * gelu(gate[j]);
}

// d/da = grad * GELU(gate), d/dgate = grad * a * GELU'(gate).
template <typename scalar_t>
DALLE_ENGINE_INLINE void geglu_grad_row(const scalar_t* a, const scalar_t* gate, const scalar_t* grad, int64_t hidden,
                                        scalar_t* da, scalar_t* dgate) {
#pragma omp simd
  for (int64_t j = 0; j < hidden; ++j) {
    da[j] = grad[j] * gelu(gate[j]);
    dgate[j] = grad[j] * a[j] * gelu_grad(gate[j]);
  }
}

void check(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "geglu: x must be a float32 or float64 CPU tensor, got ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "geglu: x's last dim must be even, got shape ", x.sizes());
}

// Runs row(begin, end) over the rows in parallel tasks of about kMinTaskElements.
template <typename F>
void for_rows(int64_t rows, int64_t width, const F& row) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(width, 1)), row);
}

}  // namespace

at::Tensor geglu_fwd(const at::Tensor& x_in) {
  check(x_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t hidden = x.size(-1) / 2, rows = hidden ? x.numel() / (2 * hidden) : 0;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = hidden;
  at::Tensor out = at::empty(shape, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "geglu_fwd", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* dest = out.mutable_data_ptr<scalar_t>();
    for_rows(rows, 2 * hidden, [&](int64_t begin, int64_t end) {
      with_cpu_isa([&]() DALLE_ENGINE_INLINE_LAMBDA {
        for (int64_t r = begin; r < end; ++r) {
          geglu_row(in + r * 2 * hidden, in + r * 2 * hidden + hidden, hidden, dest + r * hidden);
        }
      });
    });
  });
  return out;
}

at::Tensor geglu_bwd(const at::Tensor& x_in, const at::Tensor& grad_in) {
  check(x_in);
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() /= 2;
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef(shape) && grad_in.scalar_type() == x_in.scalar_type() &&
                  grad_in.device() == x_in.device(),
              "geglu_bwd: grad must be x's dtype and device and shape ", at::IntArrayRef(shape), ", got ",
              grad_in.sizes(), " ", grad_in.scalar_type());
  const at::Tensor x = x_in.contiguous(), grad = grad_in.contiguous();
  const int64_t hidden = shape.back(), rows = hidden ? grad.numel() / hidden : 0;
  at::Tensor dx = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "geglu_bwd", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* dest = dx.mutable_data_ptr<scalar_t>();
    for_rows(rows, 3 * hidden, [&](int64_t begin, int64_t end) {
      with_cpu_isa([&]() DALLE_ENGINE_INLINE_LAMBDA {
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t* a = in + r * 2 * hidden;
          scalar_t* da = dest + r * 2 * hidden;
          geglu_grad_row(a, a + hidden, g + r * hidden, hidden, da, da + hidden);
        }
      });
    });
  });
  return dx;
}

}  // namespace dalle_engine
