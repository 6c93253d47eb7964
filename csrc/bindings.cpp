// Registers the CPU kernels as torch.ops.dalle_engine_cpu.*; kernels/cpp.py loads this library, adds their fake
// (meta) implementations and wraps the sparse attention pair in an autograd.Function.

#include <torch/library.h>

#include "decode_attention.h"
#include "small_linear.h"
#include "sparse_attention.h"

TORCH_LIBRARY(dalle_engine_cpu, m) {
  m.def(
      "sparse_attention_fwd(Tensor q, Tensor k, Tensor v, str pattern, int text_len, int fmap_size, "
      "int kernel_size, int dilation, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "sparse_attention_bwd(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor dout, str pattern, "
      "int text_len, int fmap_size, int kernel_size, int dilation, float scale) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor pos, str pattern, int text_len, int fmap_size, "
      "int kernel_size, int dilation, float scale) -> Tensor");
  m.def("small_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? scale=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(dalle_engine_cpu, CPU, m) {
  m.impl("sparse_attention_fwd", &dalle_engine::sparse_attention_fwd);
  m.impl("sparse_attention_bwd", &dalle_engine::sparse_attention_bwd);
  m.impl("decode_attention", &dalle_engine::decode_attention);
  m.impl("small_linear", &dalle_engine::small_linear);
}
