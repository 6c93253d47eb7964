// CPU kernel for the sampler's counter-based uniforms (engine/sampling/noise.py's uniform, bit for bit).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace dalle_engine {

// keys: (rows,) int64 words in [0, 2^32); step: one step (one element) or one per row (rows,), integer. Returns
// (rows, columns) float32 uniforms in (0, 1): value (r, c) is hash(hash(hash(keys[r] ^ step * golden) ^ c) ^ keys[r])
// with 24 bits kept.
at::Tensor counter_uniform(const at::Tensor& keys, const at::Tensor& step, int64_t columns);

}  // namespace dalle_engine
