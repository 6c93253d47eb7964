// CPU linear layer for a handful of rows: y = x @ weight^T + bias.
//
// With few rows the product does only `rows` multiply-adds per weight element, so its time is the time to stream the
// weight from memory. The output features are split into one contiguous chunk per thread, so each thread streams one
// contiguous block of the weight. A chunk is walked kOutBlock weight rows at a time, prefetching the next block: the
// block is read from memory once, by the first row tile, and re-read from L1/L2 by the others. A tile multiplies the
// block with kRowBlock rows of x (converted to the compute type up front; small enough to stay in cache), as dot
// products vectorised along in features.
//
// The weight may also be stored in fewer bits than x (weight-only quantisation, for sampling): bfloat16 or float16
// beside float32 x, or int8 with a float32 scale per output feature, y = (x @ q^T) * scale + bias. Either way each
// weight element is converted exactly to the compute type as it is loaded, so the product reads a quarter (int8) or
// half (16-bit) of the bytes of a float32 weight and computes exactly what float32 would on the converted weight.

#include "small_linear.h"
#include "packed_linear.h"
#include "vector_math.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace dalle_engine {
namespace {

// A tile is kOutBlock weight rows by kRowBlock rows of x: 8 independent accumulators (add chains), enough to hide
// the add latency and few enough to stay in registers. An odd last row takes a one-row tile: cheaper than a 2-row
// tile that repeats it, which matters when the weight comes from cache.
constexpr int64_t kOutBlock = 4;
constexpr int64_t kRowBlock = 2;

// Many rows (a prefill, or a large batch decoded row by row) are taken kRowTile at a time, so that the tile of x
// stays in cache while every weight block of a task passes over it, rather than all of x streaming past each block.
// Each (row, output) dot product is computed alike in any tile, so a row's result never depends on the other rows.
constexpr int64_t kRowTile = 64;

// When a block starts, the first kPrefetchBytes of each row of the next block are prefetched. The hardware
// prefetchers stop at 4 KiB pages and the 4 rows of a block are 4 short interleaved streams (at in = 256, one page
// per block), so without this every block would start with cache misses; measured 1.3-1.6x faster for weights out
// of cache at in = 256, neutral at in >= 1024 (where the rows themselves are long streams).
constexpr int64_t kPrefetchBytes = 1024;
constexpr int64_t kCacheLine = 64;

DALLE_ENGINE_INLINE void prefetch(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p);
#else
  (void)p;
#endif
}

// Dot products are summed kSumBlock in features at a time and the block sums added up, so each simd lane's add chain
// holds at most kSumBlock / lanes terms, not in / lanes: the rounding error then hardly grows with the row length. At
// in = 4096 one chain per lane had 1.4x the mean error of F.linear; in blocks of 512 it has 0.6x, at no measurable
// cost (smaller blocks cost time: the block sums are horizontal adds).
constexpr int64_t kSumBlock = 512;

// s[o][r] = dot(w[o], x_r) over [begin, end), the weight converted to the compute type on load.
template <typename acc_t, typename w_t>
DALLE_ENGINE_INLINE void block_2rows(const w_t* const (&w)[kOutBlock], const acc_t* x0, const acc_t* x1, int64_t begin,
                                     int64_t end, acc_t (&s)[kOutBlock][kRowBlock]) {
  const w_t *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
  // Named scalars rather than an array: GCC keeps simd reductions of scalars in registers, not those of arrays.
  acc_t s00 = 0, s01 = 0, s10 = 0, s11 = 0, s20 = 0, s21 = 0, s30 = 0, s31 = 0;
#pragma omp simd reduction(+ : s00, s01, s10, s11, s20, s21, s30, s31)
  for (int64_t i = begin; i < end; ++i) {
    const acc_t a0 = static_cast<acc_t>(w0[i]), a1 = static_cast<acc_t>(w1[i]);
    const acc_t a2 = static_cast<acc_t>(w2[i]), a3 = static_cast<acc_t>(w3[i]);
    const acc_t b0 = x0[i], b1 = x1[i];
    s00 += a0 * b0;
    s01 += a0 * b1;
    s10 += a1 * b0;
    s11 += a1 * b1;
    s20 += a2 * b0;
    s21 += a2 * b1;
    s30 += a3 * b0;
    s31 += a3 * b1;
  }
  s[0][0] = s00, s[0][1] = s01, s[1][0] = s10, s[1][1] = s11;
  s[2][0] = s20, s[2][1] = s21, s[3][0] = s30, s[3][1] = s31;
}

// s[o][r] = dot(w[o], x_r) over [begin, end) for 4 rows: 16 accumulators, each weight and x element loaded once for
// 4 products (the 2-row tile loads each weight element once for 2).
template <typename acc_t, typename w_t>
DALLE_ENGINE_INLINE void block_4rows(const w_t* const (&w)[kOutBlock], const acc_t* const (&x)[4], int64_t begin,
                                     int64_t end, acc_t (&s)[kOutBlock][4]) {
  const w_t *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
  const acc_t *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
  acc_t s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
  acc_t s20 = 0, s21 = 0, s22 = 0, s23 = 0, s30 = 0, s31 = 0, s32 = 0, s33 = 0;
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)
  for (int64_t i = begin; i < end; ++i) {
    const acc_t a0 = static_cast<acc_t>(w0[i]), a1 = static_cast<acc_t>(w1[i]);
    const acc_t a2 = static_cast<acc_t>(w2[i]), a3 = static_cast<acc_t>(w3[i]);
    const acc_t b0 = x0[i], b1 = x1[i], b2 = x2[i], b3 = x3[i];
    s00 += a0 * b0, s01 += a0 * b1, s02 += a0 * b2, s03 += a0 * b3;
    s10 += a1 * b0, s11 += a1 * b1, s12 += a1 * b2, s13 += a1 * b3;
    s20 += a2 * b0, s21 += a2 * b1, s22 += a2 * b2, s23 += a2 * b3;
    s30 += a3 * b0, s31 += a3 * b1, s32 += a3 * b2, s33 += a3 * b3;
  }
  s[0][0] = s00, s[0][1] = s01, s[0][2] = s02, s[0][3] = s03, s[1][0] = s10, s[1][1] = s11, s[1][2] = s12;
  s[1][3] = s13, s[2][0] = s20, s[2][1] = s21, s[2][2] = s22, s[2][3] = s23, s[3][0] = s30, s[3][1] = s31;
  s[3][2] = s32, s[3][3] = s33;
}

// s[o] = dot(w[o], x0) over [begin, end).
template <typename acc_t, typename w_t>
DALLE_ENGINE_INLINE void block_1row(const w_t* const (&w)[kOutBlock], const acc_t* x0, int64_t begin, int64_t end,
                                    acc_t (&s)[kOutBlock]) {
  const w_t *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
  acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t i = begin; i < end; ++i) {
    const acc_t b = x0[i];
    s0 += static_cast<acc_t>(w0[i]) * b;
    s1 += static_cast<acc_t>(w1[i]) * b;
    s2 += static_cast<acc_t>(w2[i]) * b;
    s3 += static_cast<acc_t>(w3[i]) * b;
  }
  s[0] = s0, s[1] = s1, s[2] = s2, s[3] = s3;
}

// s[o][r] = dot(w[o], x_r) over [0, in), summed by blocks.
template <typename acc_t, typename w_t>
DALLE_ENGINE_INLINE void tile_2rows(const w_t* const (&w)[kOutBlock], const acc_t* x0, const acc_t* x1, int64_t in,
                                    acc_t (&s)[kOutBlock][kRowBlock]) {
  block_2rows(w, x0, x1, 0, std::min(in, kSumBlock), s);
  for (int64_t begin = kSumBlock; begin < in; begin += kSumBlock) {
    acc_t part[kOutBlock][kRowBlock];
    block_2rows(w, x0, x1, begin, std::min(in, begin + kSumBlock), part);
    for (int64_t k = 0; k < kOutBlock; ++k) s[k][0] += part[k][0], s[k][1] += part[k][1];
  }
}

// s[o][r] = dot(w[o], x_r) over [0, in) for 4 rows, summed by blocks.
template <typename acc_t, typename w_t>
DALLE_ENGINE_INLINE void tile_4rows(const w_t* const (&w)[kOutBlock], const acc_t* const (&x)[4], int64_t in,
                                    acc_t (&s)[kOutBlock][4]) {
  block_4rows(w, x, 0, std::min(in, kSumBlock), s);
  for (int64_t begin = kSumBlock; begin < in; begin += kSumBlock) {
    acc_t part[kOutBlock][4];
    block_4rows(w, x, begin, std::min(in, begin + kSumBlock), part);
    for (int64_t k = 0; k < kOutBlock; ++k) {
      for (int64_t r = 0; r < 4; ++r) s[k][r] += part[k][r];
    }
  }
}

// s[o] = dot(w[o], x0) over [0, in), summed by blocks.
template <typename acc_t, typename w_t>
DALLE_ENGINE_INLINE void tile_1row(const w_t* const (&w)[kOutBlock], const acc_t* x0, int64_t in,
                                   acc_t (&s)[kOutBlock]) {
  block_1row(w, x0, 0, std::min(in, kSumBlock), s);
  for (int64_t begin = kSumBlock; begin < in; begin += kSumBlock) {
    acc_t part[kOutBlock];
    block_1row(w, x0, begin, std::min(in, begin + kSumBlock), part);
    for (int64_t k = 0; k < kOutBlock; ++k) s[k] += part[k];
  }
}

// A dot product's output: times the feature's scale for int8 weights, plus its bias.
template <bool kScaled, typename acc_t>
DALLE_ENGINE_INLINE acc_t finish(acc_t dot, acc_t scale, acc_t bias) {
  if constexpr (kScaled) {
    return dot * scale + bias;
  } else {
    return dot + bias;
  }
}

// y[r][o + k] = dot(w[k], x row r) (* sc[k] for int8 weights) + b[k] for every row r and k < n.
template <bool kScaled, typename scalar_t, typename acc_t, typename w_t>
DALLE_ENGINE_INLINE void block_rows(const w_t* const (&w)[kOutBlock], const acc_t (&sc)[kOutBlock],
                                    const acc_t (&b)[kOutBlock], int64_t n, const acc_t* x, int64_t x_stride,
                                    int64_t rows, int64_t in, scalar_t* y, int64_t y_stride) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    acc_t s[kOutBlock][4];
    const acc_t* const xs[4] = {x + r * x_stride, x + (r + 1) * x_stride, x + (r + 2) * x_stride,
                                x + (r + 3) * x_stride};
    tile_4rows(w, xs, in, s);
    for (int64_t k = 0; k < n; ++k) {
      for (int64_t j = 0; j < 4; ++j) y[(r + j) * y_stride + k] = static_cast<scalar_t>(finish<kScaled>(s[k][j], sc[k], b[k]));
    }
  }
  for (; r + kRowBlock <= rows; r += kRowBlock) {
    acc_t s[kOutBlock][kRowBlock];
    tile_2rows(w, x + r * x_stride, x + (r + 1) * x_stride, in, s);
    for (int64_t k = 0; k < n; ++k) {
      y[r * y_stride + k] = static_cast<scalar_t>(finish<kScaled>(s[k][0], sc[k], b[k]));
      y[(r + 1) * y_stride + k] = static_cast<scalar_t>(finish<kScaled>(s[k][1], sc[k], b[k]));
    }
  }
  if (r < rows) {
    acc_t s[kOutBlock];
    tile_1row(w, x + r * x_stride, in, s);
    for (int64_t k = 0; k < n; ++k) y[r * y_stride + k] = static_cast<scalar_t>(finish<kScaled>(s[k], sc[k], b[k]));
  }
}

// Output features [begin, end) of every row. A partial last block repeats its last weight row (from L1; the results
// are dropped). converted: kOutBlock * in elements of scratch for a block stored in another type than the compute
// type, which is converted once there when more than one tile reads it (null: read the weight as it is). scale: one
// per output feature for int8 weights, else null.
template <typename scalar_t, typename acc_t, typename w_t>
DALLE_ENGINE_INLINE void linear_chunk(const w_t* weight, int64_t w_stride, const acc_t* x, int64_t x_stride,
                                             int64_t rows, int64_t in, const scalar_t* bias, const float* scale,
                                             scalar_t* y, int64_t out, int64_t begin, int64_t end,
                                             acc_t* converted) {
  constexpr bool kScaled = std::is_same_v<w_t, int8_t>;
  const int64_t prefetch_bytes = std::min<int64_t>(kPrefetchBytes, in * sizeof(w_t));
  for (int64_t o = begin; o < end; o += kOutBlock) {
    const int64_t n = std::min(kOutBlock, end - o);
    for (int64_t k = 0; k < std::min(kOutBlock, end - o - kOutBlock); ++k) {
      const char* next = reinterpret_cast<const char*>(weight + (o + kOutBlock + k) * w_stride);
      for (int64_t byte = 0; byte < prefetch_bytes; byte += kCacheLine) prefetch(next + byte);
    }
    const w_t* w[kOutBlock];
    acc_t b[kOutBlock], sc[kOutBlock];
    for (int64_t k = 0; k < kOutBlock; ++k) {
      w[k] = weight + (o + std::min(k, n - 1)) * w_stride;
      b[k] = bias == nullptr || k >= n ? acc_t(0) : static_cast<acc_t>(bias[o + k]);
      sc[k] = kScaled && k < n ? static_cast<acc_t>(scale[o + k]) : acc_t(1);
    }
    if constexpr (!std::is_same_v<w_t, acc_t>) {
      if (converted != nullptr) {
        const acc_t* wc[kOutBlock];
        for (int64_t k = 0; k < kOutBlock; ++k) {
          acc_t* row = converted + k * in;
#pragma omp simd
          for (int64_t i = 0; i < in; ++i) row[i] = static_cast<acc_t>(w[k][i]);
          wc[k] = row;
        }
        block_rows<kScaled>(wc, sc, b, n, x, x_stride, rows, in, y + o, out);
        continue;
      }
    }
    block_rows<kScaled>(w, sc, b, n, x, x_stride, rows, in, y + o, out);
  }
}

// Multiply-adds a parallel task should hold at least, so that small products do not pay for waking threads (a few
// us; measured break-even on 2 cores: 2 x 2^16, e.g. 128 x 256 weights at 4 rows or 512 x 256 at 1 row).
constexpr int64_t kMinTaskWork = int64_t{1} << 16;

template <typename scalar_t, typename w_t>
void run(const at::Tensor& x, const at::Tensor& weight, const scalar_t* bias, const float* scale, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = x.size(0), in = x.size(1), out = weight.size(0);
  const acc_t* x_data = x.const_data_ptr<acc_t>();
  const w_t* w_data = weight.const_data_ptr<w_t>();
  scalar_t* y_data = y.mutable_data_ptr<scalar_t>();
  const int64_t x_stride = x.stride(0), w_stride = weight.stride(0);
  const int64_t blocks = (out + kOutBlock - 1) / kOutBlock;
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, kOutBlock * in * rows));
  const bool convert = !std::is_same_v<w_t, acc_t>;
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> converted(convert ? kOutBlock * in : 0);
    with_cpu_isa([&]() DALLE_ENGINE_INLINE_LAMBDA {
      for (int64_t first = 0; first < rows; first += kRowTile) {
        linear_chunk<scalar_t, acc_t, w_t>(w_data, w_stride, x_data + first * x_stride, x_stride,
                                           std::min(kRowTile, rows - first), in, bias, scale, y_data + first * out,
                                           out, begin * kOutBlock, std::min(end * kOutBlock, out),
                                           convert ? converted.data() : nullptr);
      }
    });
  });
}

}  // namespace

at::Tensor small_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& scale) {
  const bool packed = weight.dim() == 3;
  TORCH_CHECK(x.dim() == 2 && (weight.dim() == 2 || packed),
              "small_linear: x must be (rows, in) and weight (out, in) or packed (out / ", kPackLanes, ", in, ",
              kPackLanes, "), got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(!packed || (weight.size(2) == kPackLanes && weight.is_contiguous()),
              "small_linear: a packed weight must be contiguous, (out / ", kPackLanes, ", in, ", kPackLanes,
              "), got ", weight.sizes(), " with strides ", weight.strides());
  TORCH_CHECK(x.size(1) == weight.size(1), "small_linear: x has ", x.size(1), " features but weight expects ",
              weight.size(1), " (x ", x.sizes(), ", weight ", weight.sizes(), ")");
  const auto dtype = x.scalar_type(), w_dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "small_linear: x must be float32, float64, bfloat16 or float16, got ", dtype);
  const bool int8 = w_dtype == at::kChar;
  const bool narrower = (w_dtype == at::kBFloat16 || w_dtype == at::kHalf) && dtype == at::kFloat;
  TORCH_CHECK(w_dtype == dtype || int8 || narrower, "small_linear: weight must have x's dtype ", dtype,
              ", or be int8 (with a scale), or bfloat16 / float16 beside float32 x; got ", w_dtype);
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "small_linear needs CPU tensors, got ", x.device(),
              " and ", weight.device());
  // Reading the weight in place is the point of the kernel: a copy would cost as much as the product.
  TORCH_CHECK(weight.size(1) <= 1 || weight.stride(1) == 1 || packed,
              "small_linear: weight must have unit stride along in features, got strides ", weight.strides());
  const int64_t out_features = dalle_engine::out_features(weight);
  at::Tensor b, sc;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK(b.dim() == 1 && b.size(0) == out_features, "small_linear: bias must be (", out_features, ",), got ",
                b.sizes());
    TORCH_CHECK(b.scalar_type() == dtype, "small_linear: bias must have x's dtype ", dtype, ", got ",
                b.scalar_type());
    TORCH_CHECK(b.device().is_cpu(), "small_linear needs CPU tensors, got bias on ", b.device());
  }
  TORCH_CHECK(int8 == scale.has_value(), "small_linear: ",
              int8 ? "int8 weights need a scale per output feature" : "a scale goes only with int8 weights");
  if (int8) {
    sc = scale->contiguous();
    TORCH_CHECK(sc.dim() == 1 && sc.size(0) == out_features && sc.scalar_type() == at::kFloat && sc.device().is_cpu(),
                "small_linear: scale must be a float32 CPU tensor of shape (", out_features, ",), got ",
                sc.scalar_type(), " ", sc.sizes(), " on ", sc.device());
  }

  at::Tensor y = at::empty({x.size(0), out_features}, x.options());
  if (y.numel() == 0) return y;
  // x in the compute type with unit stride along features (no copy for float32 / float64 rows that have it).
  at::Tensor xc = x.to(at::toOpMathType(dtype));
  if (xc.size(1) > 1 && xc.stride(1) != 1) xc = xc.contiguous();
  if (packed) {
    packed_linear(xc, weight, b, sc, y);
    return y;
  }
  const float* sc_data = int8 ? sc.const_data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "small_linear", [&] {
    const scalar_t* b_data = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    if (int8) {
      run<scalar_t, int8_t>(xc, weight, b_data, sc_data, y);
    } else if (w_dtype == dtype) {
      run<scalar_t, scalar_t>(xc, weight, b_data, nullptr, y);
    } else if constexpr (std::is_same_v<scalar_t, float>) {
      if (w_dtype == at::kBFloat16) {
        run<scalar_t, at::BFloat16>(xc, weight, b_data, nullptr, y);
      } else {
        run<scalar_t, at::Half>(xc, weight, b_data, nullptr, y);
      }
    }
  });
  return y;
}

}  // namespace dalle_engine
