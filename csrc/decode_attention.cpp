// CPU KV-cache decode attention: one query per (batch, head), row b at sequence position pos[b] (one position for
// every row, or one per row for continuous batching).
//
// A decode step runs once per layer per generated token, so the kernel reads only the keys the pattern allows, in
// spans of the cache: the visible text keys as one contiguous run, then the image keys of the pattern's window row by
// row (a row is a run of positions on the window's column lattice). Per (batch, head) it makes three passes over those
// keys: scores q.k * scale (and their max), e^(s - max) (and their sum), then sum(e * v) / sum. Keys and values are
// read in place, through the cache's strides and in their storage dtype (converted on load), so no pass ever touches
// the rest of the cache. The work is split over batch * heads; each task owns one small scratch buffer, sized for the
// row with the most keys. Every (batch, head) is computed alone, in the same order whatever the other rows' positions,
// so a row's result is bitwise the same in any batch.

#include "intrinsics.h"  // first (see there)
#include "decode_attention.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace dalle_engine {
namespace {

enum class Pattern { kFull, kAxialRow, kAxialCol, kConvLike, kConvLikeCentered };

Pattern parse_pattern(std::string_view name) {
  if (name == "full") return Pattern::kFull;
  if (name == "axial_row") return Pattern::kAxialRow;
  if (name == "axial_col") return Pattern::kAxialCol;
  if (name == "conv_like") return Pattern::kConvLike;
  if (name == "conv_like_centered") return Pattern::kConvLikeCentered;
  TORCH_CHECK(false, "unknown attention pattern '", name,
              "'; valid patterns: full, axial_row, axial_col, conv_like, conv_like_centered");
}

// Rows row_lo, row_lo + row_step, ..., row_hi and columns col_lo, ..., col_hi (col_step apart) of the grid.
struct Window {
  int64_t row_lo, row_hi, row_step, col_lo, col_hi, col_step;
};

// The image keys of image query t as a lattice window, clipped to the grid; on row_hi, the query's own row, only
// columns <= t % fmap_size are causal. Keep in sync with kernels.masks.image_key_window, which the tests check against
// the mask predicates.
Window image_key_window(Pattern pattern, int64_t t, int64_t fmap_size, int64_t kernel_size, int64_t dilation) {
  const int64_t r = t / fmap_size, c = t % fmap_size, last = fmap_size - 1;
  switch (pattern) {
    case Pattern::kFull:
      return {0, r, 1, 0, last, 1};
    case Pattern::kAxialRow:
      return {r, r, 1, 0, c, 1};
    case Pattern::kAxialCol:
      return {0, r, 1, c, c, 1};
    case Pattern::kConvLike:
    case Pattern::kConvLikeCentered:
      break;
  }
  const int64_t d = dilation;
  const bool corner = pattern == Pattern::kConvLike;  // the query is the window's bottom-right corner
  const int64_t up = (corner ? kernel_size - 1 : kernel_size / 2) * d;  // reach above and to the left
  const int64_t right = corner ? 0 : (kernel_size / 2) * d;
  // Clip to the grid, staying on the query's lattice (cells an exact multiple of d away).
  return {r - std::min(up, r) / d * d, r, d, c - std::min(up, c) / d * d, c + std::min(right, last - c) / d * d, d};
}

// The keys query pos may see, as spans of cache positions.
struct KeySet {
  int64_t text_keys;  // keys [0, text_keys)
  bool image;         // plus the window's image keys (image queries only)
  int64_t text_len, fmap_size, query_col;
  Window window;

  // Calls fn(first position, position stride, count) for each span, in a fixed order.
  template <typename Fn>
  DALLE_ENGINE_INLINE void for_each_span(const Fn& fn) const {
    fn(int64_t{0}, int64_t{1}, text_keys);
    if (!image) return;
    const Window& w = window;
    for (int64_t row = w.row_lo; row <= w.row_hi; row += w.row_step) {
      const int64_t col_hi = row == w.row_hi ? std::min(w.col_hi, query_col) : w.col_hi;
      fn(text_len + row * fmap_size + w.col_lo, w.col_step, (col_hi - w.col_lo) / w.col_step + 1);
    }
  }

  int64_t count() const {
    int64_t total = 0;
    for_each_span([&](int64_t, int64_t, int64_t n) { total += n; });
    return total;
  }
};

KeySet key_set(Pattern pattern, int64_t pos, int64_t text_len, int64_t fmap_size, int64_t kernel_size,
               int64_t dilation) {
  if (pos < text_len) return {pos + 1, false, text_len, fmap_size, 0, {}};
  const int64_t t = pos - text_len;
  return {text_len, true, text_len, fmap_size, t % fmap_size,
          image_key_window(pattern, t, fmap_size, kernel_size, dilation)};
}

// Row arithmetic in the compute type acc_t on rows stored as scalar_t: plain loops the compiler vectorises, inlined
// into each instruction set's build of attend.
template <typename acc_t, typename scalar_t>
DALLE_ENGINE_INLINE acc_t dot(const acc_t* a, const scalar_t* b, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += a[j] * static_cast<acc_t>(b[j]);
  return sum;
}

template <typename acc_t, typename scalar_t>
DALLE_ENGINE_INLINE void axpy(acc_t* y, acc_t alpha, const scalar_t* x, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] += alpha * static_cast<acc_t>(x[j]);
}

// One (batch, head). k and v point at the head's position 0, k_step and v_step are their position strides (elements);
// scratch holds 2 * dim + keys.count() elements.
template <typename scalar_t, typename acc_t>
DALLE_ENGINE_INLINE void attend(const KeySet& keys, const scalar_t* q, const scalar_t* k, int64_t k_step,
                                       const scalar_t* v, int64_t v_step, scalar_t* out, int64_t dim, acc_t scale,
                                       acc_t* scratch) {
  acc_t* query = scratch;
  acc_t* acc = scratch + dim;
  acc_t* probs = scratch + 2 * dim;
  for (int64_t j = 0; j < dim; ++j) query[j] = static_cast<acc_t>(q[j]);

  int64_t n = 0;
  acc_t top = -std::numeric_limits<acc_t>::infinity();
  keys.for_each_span([&](int64_t first, int64_t stride, int64_t count) DALLE_ENGINE_INLINE_LAMBDA {
    const scalar_t* row = k + first * k_step;
    for (int64_t i = 0; i < count; ++i, row += stride * k_step) {
      const acc_t s = dot(query, row, dim) * scale;
      probs[n++] = s;
      top = std::max(top, s);
    }
  });
  const acc_t sum = exp_shifted(probs, n, top);

  std::fill(acc, acc + dim, acc_t(0));
  n = 0;
  keys.for_each_span([&](int64_t first, int64_t stride, int64_t count) DALLE_ENGINE_INLINE_LAMBDA {
    const scalar_t* row = v + first * v_step;
    for (int64_t i = 0; i < count; ++i, row += stride * v_step) axpy(acc, probs[n++], row, dim);
  });
  const acc_t inv_sum = acc_t(1) / sum;
  for (int64_t j = 0; j < dim; ++j) out[j] = static_cast<scalar_t>(acc[j] * inv_sum);
}

#if DALLE_ENGINE_ISA_BUILDS
// attend for float32 on AVX-512, heads of 16, 32, 48 or 64 features. Scoring a key is a dot product of a few vectors
// whose lanes must then be summed: one horizontal sum per key cost more than the key's multiply-adds. Here 16 keys
// are scored at once and their 16 accumulators summed across lanes together, by a butterfly of shuffles and adds
// shared by all 16; the output's accumulators stay in registers over all the values.

// kOrder[t]: the key accumulated in register t, so that the butterfly's sums come out in key order.
constexpr int kOrder[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};

// q . k_i for the 16 keys k_i = k + i * key_stride.
DALLE_ENGINE_AVX512 inline __m512 block_scores(const float* q, const float* k, int64_t key_stride, int64_t dim) {
  __m512 a[16];
  for (int t = 0; t < 16; ++t) {
    const float* key = k + kOrder[t] * key_stride;
    a[t] = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(key));
    for (int64_t d = 16; d < dim; d += 16) {
      a[t] = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(key + d), a[t]);
    }
  }
  // Halve the registers four times, each time adding the two halves of a pair of sums side by side.
  __m512 b[8], c[4], e[2];
  for (int t = 0; t < 8; ++t) {
    b[t] = _mm512_add_ps(_mm512_shuffle_f32x4(a[t], a[t + 8], 0x44), _mm512_shuffle_f32x4(a[t], a[t + 8], 0xEE));
  }
  for (int t = 0; t < 4; ++t) {
    c[t] = _mm512_add_ps(_mm512_shuffle_f32x4(b[t], b[t + 4], 0x88), _mm512_shuffle_f32x4(b[t], b[t + 4], 0xDD));
  }
  for (int t = 0; t < 2; ++t) {
    e[t] = _mm512_add_ps(_mm512_shuffle_ps(c[t], c[t + 2], 0x44), _mm512_shuffle_ps(c[t], c[t + 2], 0xEE));
  }
  return _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], 0x88), _mm512_shuffle_ps(e[0], e[1], 0xDD));
}

// attend's three passes; kVecs = dim / 16.
template <int kVecs>
DALLE_ENGINE_AVX512 void attend_avx512(const KeySet& keys, const float* q, const float* k, int64_t k_step,
                                       const float* v, int64_t v_step, float* out, float scale, float* probs) {
  constexpr int64_t dim = 16 * kVecs;
  int64_t n = 0;
  float top = -std::numeric_limits<float>::infinity();
  keys.for_each_span([&](int64_t first, int64_t stride, int64_t count) DALLE_ENGINE_AVX512_LAMBDA {
    const float* row = k + first * k_step;
    const int64_t key_stride = stride * k_step;
    int64_t i = 0;
    for (; i + 16 <= count; i += 16, row += 16 * key_stride, n += 16) {
      const __m512 s = _mm512_mul_ps(block_scores(q, row, key_stride, dim), _mm512_set1_ps(scale));
      _mm512_storeu_ps(probs + n, s);
      top = std::max(top, _mm512_reduce_max_ps(s));
    }
    for (; i < count; ++i, row += key_stride) {
      __m512 a = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(row));
      for (int j = 1; j < kVecs; ++j) {
        a = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * j), _mm512_loadu_ps(row + 16 * j), a);
      }
      const float s = _mm512_reduce_add_ps(a) * scale;
      probs[n++] = s;
      top = std::max(top, s);
    }
  });
  const float sum = exp_shifted(probs, n, top);
  std::fill(out, out + dim, 0.0f);
  n = 0;
  keys.for_each_span([&](int64_t first, int64_t stride, int64_t count) DALLE_ENGINE_AVX512_LAMBDA {
    __m512 acc[kVecs];  // in registers over the span
    for (int j = 0; j < kVecs; ++j) acc[j] = _mm512_loadu_ps(out + 16 * j);
    const float* row = v + first * v_step;
    for (int64_t i = 0; i < count; ++i, row += stride * v_step) {
      const __m512 p = _mm512_set1_ps(probs[n++]);
      for (int j = 0; j < kVecs; ++j) acc[j] = _mm512_fmadd_ps(p, _mm512_loadu_ps(row + 16 * j), acc[j]);
    }
    for (int j = 0; j < kVecs; ++j) _mm512_storeu_ps(out + 16 * j, acc[j]);
  });
  const __m512 inv_sum = _mm512_set1_ps(1.0f / sum);
  for (int j = 0; j < kVecs; ++j) _mm512_storeu_ps(out + 16 * j, _mm512_mul_ps(_mm512_loadu_ps(out + 16 * j), inv_sum));
}

// attend_avx512 for a head of dim features, if it takes it: false otherwise.
bool attend_wide(const KeySet& keys, const float* q, const float* k, int64_t k_step, const float* v, int64_t v_step,
                 float* out, int64_t dim, float scale, float* probs) {
  switch (dim) {
    case 16:
      return attend_avx512<1>(keys, q, k, k_step, v, v_step, out, scale, probs), true;
    case 32:
      return attend_avx512<2>(keys, q, k, k_step, v, v_step, out, scale, probs), true;
    case 48:
      return attend_avx512<3>(keys, q, k, k_step, v, v_step, out, scale, probs), true;
    case 64:
      return attend_avx512<4>(keys, q, k, k_step, v, v_step, out, scale, probs), true;
    default:
      return false;
  }
}
#endif

// Multiply-adds a parallel task should hold at least, so that small steps do not pay for waking threads.
constexpr int64_t kMinTaskWork = int64_t{1} << 15;

// keys: one KeySet per batch row.
template <typename scalar_t>
void run(const std::vector<KeySet>& keys, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
         at::Tensor& out, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2), count = batch * heads;
  int64_t max_keys = 0, total_keys = 0;
  for (const KeySet& row : keys) {
    const int64_t n = row.count();
    max_keys = std::max(max_keys, n);
    total_keys += n;
  }
  const scalar_t* q_data = q.const_data_ptr<scalar_t>();
  const scalar_t* k_data = k.const_data_ptr<scalar_t>();
  const scalar_t* v_data = v.const_data_ptr<scalar_t>();
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides();
  // Tasks of about kMinTaskWork multiply-adds at the rows' mean key count (a grain only groups (batch, head) pairs;
  // it never changes what one computes).
  const int64_t mean_keys = std::max<int64_t>(1, total_keys / batch);
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / (2 * mean_keys * dim));
#if DALLE_ENGINE_ISA_BUILDS
  // float32 heads of 16-64 features on AVX-512: attend_avx512 (rows have unit stride: rows_contiguous).
  const bool wide = std::is_same_v<scalar_t, float> && cpu_isa() == Isa::kAvx512 && dim % 16 == 0 && dim <= 64;
#else
  constexpr bool wide = false;
#endif
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(2 * dim + max_keys);
#if DALLE_ENGINE_ISA_BUILDS
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (wide) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t b = i / heads, h = i % heads;
          attend_wide(keys[b], q_data + b * qs[0] + h * qs[1], k_data + b * ks[0] + h * ks[1], ks[2],
                      v_data + b * vs[0] + h * vs[1], vs[2], out_data + i * dim, dim, static_cast<float>(scale),
                      scratch.data());
        }
        return;
      }
    }
#endif
    with_cpu_isa([&]() DALLE_ENGINE_INLINE_LAMBDA {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / heads, h = i % heads;
        attend<scalar_t, acc_t>(keys[b], q_data + b * qs[0] + h * qs[1], k_data + b * ks[0] + h * ks[1], ks[2],
                                v_data + b * vs[0] + h * vs[1], vs[2], out_data + i * dim, dim,
                                static_cast<acc_t>(scale), scratch.data());
      }
    });
  });
}

// The tensor itself when its last dim is contiguous (what the row loops need), else a contiguous copy.
at::Tensor rows_contiguous(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& pos_tensor, std::string_view pattern, int64_t text_len, int64_t fmap_size,
                            int64_t kernel_size, int64_t dilation, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "q must be (batch, heads, dim_head) and k_cache, v_cache one (batch, heads, max_seq, dim_head) shape, "
              "got ", q.sizes(), ", ", k_cache.sizes(), ", ", v_cache.sizes());
  TORCH_CHECK(q.size(0) == k_cache.size(0) && q.size(1) == k_cache.size(1) && q.size(2) == k_cache.size(3),
              "q ", q.sizes(), " does not match the cache ", k_cache.sizes());
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q and the caches must share one dtype, got ", q.scalar_type(), ", ", k_cache.scalar_type(), ", ",
              v_cache.scalar_type());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "q and the caches must be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "dalle_engine_cpu kernels need CPU tensors, got ", q.device(), ", ", k_cache.device(), ", ",
              v_cache.device());
  TORCH_CHECK(text_len >= 1 && fmap_size >= 1 && kernel_size >= 1 && dilation >= 1,
              "text_len, fmap_size, kernel_size and dilation must be >= 1, got ", text_len, ", ", fmap_size, ", ",
              kernel_size, ", ", dilation);
  const int64_t max_seq = k_cache.size(2), max_len = text_len + fmap_size * fmap_size;
  TORCH_CHECK(max_seq >= 1 && max_seq <= max_len, "max_seq must be in 1..", max_len, " (text_len ", text_len,
              " + fmap_size ", fmap_size, "**2), got ", max_seq);
  TORCH_CHECK(q.size(2) >= 1, "dim_head must be >= 1");
  TORCH_CHECK(pos_tensor.device().is_cpu() && at::isIntegralType(pos_tensor.scalar_type(), /*includeBool=*/false),
              "pos must be a CPU integer tensor, got ", pos_tensor.scalar_type(), " on ", pos_tensor.device());
  // One element: every row at that position; else one position per row.
  const int64_t batch = q.size(0);
  const bool per_row = pos_tensor.numel() != 1;
  TORCH_CHECK(!per_row || (pos_tensor.dim() == 1 && pos_tensor.size(0) == batch),
              "pos must hold one position (one element) or one per row (shape (batch,) = (", batch, ",)), got shape ",
              pos_tensor.sizes());
  const at::Tensor pos_long = pos_tensor.to(at::kLong).contiguous();
  const int64_t* pos = pos_long.const_data_ptr<int64_t>();
  if (!per_row) TORCH_CHECK(pos[0] >= 0 && pos[0] < max_seq, "pos must lie in [0, ", max_seq, "), got ", pos[0]);
  const Pattern parsed = parse_pattern(pattern);
  std::vector<KeySet> keys;
  keys.reserve(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t row_pos = pos[per_row ? b : 0];
    TORCH_CHECK(!per_row || (row_pos >= 0 && row_pos < max_seq), "pos[", b, "] must lie in [0, ", max_seq, "), got ",
                row_pos);
    keys.push_back(key_set(parsed, row_pos, text_len, fmap_size, kernel_size, dilation));
  }

  at::Tensor out = at::empty(q.sizes(), q.options());
  if (out.numel() == 0) return out;
  const at::Tensor qr = rows_contiguous(q), kr = rows_contiguous(k_cache), vr = rows_contiguous(v_cache);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "decode_attention",
                                  [&] { run<scalar_t>(keys, qr, kr, vr, out, scale); });
  return out;
}

}  // namespace dalle_engine
