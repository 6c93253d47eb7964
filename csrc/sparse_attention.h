// CPU kernels for DALL-E sparse attention (see kernels/masks.py for the patterns and kernels/reference.py for the
// exact pure-PyTorch semantics these kernels reproduce).
#pragma once

#include <ATen/core/Tensor.h>

#include <string_view>
#include <tuple>

namespace dalle_engine {

// q, k, v: (batch, heads, seq, dim_head) CPU tensors of one float dtype (float32, float64, bfloat16 or float16).
// Returns out in the input dtype and the per-query log-sum-exp of the scaled scores, (batch, heads, seq), in the
// compute dtype (float64 for float64 inputs, float32 otherwise).
std::tuple<at::Tensor, at::Tensor> sparse_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, std::string_view pattern, int64_t text_len,
    int64_t fmap_size, int64_t kernel_size, int64_t dilation, double scale);

// Gradients (dq, dk, dv), in the input dtype, from the forward's inputs, its out and lse, and the upstream dout.
// out and lse are the op's interface (a tiled kernel needs them); this CPU kernel only checks their shapes: it sees
// every key of a query in one block, so it recomputes each row's softmax and rowsum(P * dP) exactly instead.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_bwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& dout, std::string_view pattern, int64_t text_len, int64_t fmap_size, int64_t kernel_size,
    int64_t dilation, double scale);

}  // namespace dalle_engine
