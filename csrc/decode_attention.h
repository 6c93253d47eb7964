// CPU kernel for KV-cache decoding: one query per (batch, head) against the cached keys its DALL-E pattern allows
// (kernels/reference.py's decode_attention gives the exact semantics).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string_view>

namespace dalle_engine {

// q: (batch, heads, dim_head); k_cache, v_cache: (batch, heads, max_seq, dim_head), any strides, row b holding
// positions 0..pos[b] (later slots are never read). CPU tensors of one dtype: float32, float64, bfloat16 or float16.
// Computes in float32 (float64 for float64 inputs) and returns (batch, heads, dim_head) in q's dtype. Reads only the
// allowed keys, so its cost does not depend on the prefix length beyond them.
// pos is a CPU integer tensor, so that a compiled decode step passes it without a graph break: one element (every row
// at that position) or shape (batch,) (row b at pos[b]). Each row's result is bitwise what it would be alone.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& pos, std::string_view pattern, int64_t text_len, int64_t fmap_size,
                            int64_t kernel_size, int64_t dilation, double scale);

}  // namespace dalle_engine
