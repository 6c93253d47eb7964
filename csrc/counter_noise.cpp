// The sampler's counter-based uniforms on a CPU: the same 32-bit hashes as engine/sampling/noise.py, which spells
// each 32-bit multiply as ~6 int64 tensor operations; here they are native uint32 arithmetic, one pass over the
// output instead of ~55 tensor operations per decode step.

#include "counter_noise.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>

namespace dalle_engine {
namespace {

constexpr uint32_t kGolden = 0x9E3779B9u;

// Wellons' "lowbias32", as noise.hash32.
inline uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

}  // namespace

at::Tensor counter_uniform(const at::Tensor& keys, const at::Tensor& step, int64_t columns) {
  TORCH_CHECK(keys.dim() == 1 && keys.scalar_type() == at::kLong && keys.device().is_cpu(),
              "counter_uniform: keys must be a (rows,) int64 CPU tensor, got ", keys.scalar_type(), " ", keys.sizes(),
              " on ", keys.device());
  const int64_t rows = keys.size(0);
  TORCH_CHECK(step.device().is_cpu() && at::isIntegralType(step.scalar_type(), /*includeBool=*/false) &&
                  (step.numel() == 1 || (step.dim() == 1 && step.size(0) == rows)),
              "counter_uniform: step must be one CPU integer or one per row (", rows, ",), got ", step.scalar_type(),
              " ", step.sizes());
  TORCH_CHECK(columns >= 0, "counter_uniform: columns must be >= 0, got ", columns);
  const at::Tensor k = keys.contiguous(), s = step.to(at::kLong).contiguous().view(-1);
  const int64_t* key_data = k.const_data_ptr<int64_t>();
  const int64_t* step_data = s.const_data_ptr<int64_t>();
  const bool per_row = s.numel() != 1;
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(key_data[r] >= 0 && key_data[r] <= 0xFFFFFFFFll, "counter_uniform: keys must lie in [0, 2^32), got ",
                key_data[r]);
  }
  at::Tensor out = at::empty({rows, columns}, keys.options().dtype(at::kFloat));
  float* out_data = out.mutable_data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(columns, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const auto key = static_cast<uint32_t>(key_data[r]);
      const auto step_word = hash32(key ^ (static_cast<uint32_t>(step_data[per_row ? r : 0]) * kGolden));
      float* row = out_data + r * columns;
      for (int64_t c = 0; c < columns; ++c) {
        const uint32_t word = hash32(hash32(step_word ^ static_cast<uint32_t>(c)) ^ key);
        row[c] = (static_cast<float>(word >> 8) + 0.5f) * 0x1p-24f;  // 24 bits: exact in float32
      }
    }
  });
  return out;
}

}  // namespace dalle_engine
