// Products of a handful of rows with a weight packed along output features.
//
// Stored as (out, in), a weight is multiplied row by row as dot products along in features: each (row, output) ends
// with a sum across the vector's lanes, and an int8 weight is converted to float in a scratch copy first, so the
// products ran at ~20 GMAC/s per core, a third of what the core can do. Packed as (out / 16, in, 16), the 16 outputs
// of a group are the 16 lanes of a vector: for each in feature, one load (and conversion) of the group's 16 weights
// and one multiply-add per row with that row's x broadcast. Nothing is summed across lanes and each weight is
// converted once, in registers: 35-70 GMAC/s per core on AVX-512, 30-47 on AVX2, 1.5-2.7x the (out, in) kernel at 4
// rows (measured on one core at in = 256 and 1024, int8 and float32 weights).
//
// Each lane adds its products in order of in feature, restarting every kSumBlock features and adding the block sums
// up: one add chain of in products had ~2.5x the error of F.linear at in = 256; in blocks of 32, it has about the
// (out, in) kernel's (~1.1x F.linear's at in <= 1024, 0.7x at 4096). A (row, output) sum is computed alike whatever
// the rows and group blocks around it, so a row's result never depends on the batch; AVX-512 and AVX2 run the same
// multiply-adds in the same order, and agree bit for bit.

#include "intrinsics.h"  // first (see there)
#include "packed_linear.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace dalle_engine {
namespace {

constexpr int64_t kLanes = kPackLanes;
// Groups a task walks at a time: 4 groups by 4 rows are 16 AVX-512 accumulators, enough independent add chains to
// keep both multiply-add units busy; the block's weights (16 KiB int8, 64 KiB float32 at in = 256) are then re-read
// from cache by each further tile of rows.
constexpr int64_t kGroupBlock = 4;
constexpr int64_t kRowBlock = 4;
constexpr int64_t kSumBlock = 32;
// Multiply-adds a parallel task should hold at least, so that small products do not pay for waking threads.
constexpr int64_t kMinTaskWork = int64_t{1} << 17;

// sums[r][g * kLanes + l] = sum over i of x[r][i] * packed[g][i][l], for R rows and NG groups. The generic build
// (float64, float16 weights, machines without AVX2).
template <int R, int NG, typename acc_t, typename w_t>
void tile_generic(const w_t* packed, int64_t in, const acc_t* x, int64_t x_stride,
                  acc_t (&sums)[kRowBlock][kGroupBlock * kLanes]) {
  for (int r = 0; r < R; ++r) std::fill_n(sums[r], NG * kLanes, acc_t(0));
  for (int64_t begin = 0; begin < in; begin += kSumBlock) {
    const int64_t end = std::min(in, begin + kSumBlock);
    for (int g = 0; g < NG; ++g) {
      acc_t block[R][kLanes] = {};
      for (int64_t i = begin; i < end; ++i) {
        const w_t* w = packed + (g * in + i) * kLanes;
        for (int r = 0; r < R; ++r) {
          const acc_t xv = x[r * x_stride + i];
#pragma omp simd
          for (int64_t l = 0; l < kLanes; ++l) block[r][l] += xv * static_cast<acc_t>(w[l]);
        }
      }
      for (int r = 0; r < R; ++r) {
        for (int64_t l = 0; l < kLanes; ++l) sums[r][g * kLanes + l] += block[r][l];
      }
    }
  }
}

#if DALLE_ENGINE_ISA_BUILDS
// 16 weights of one in feature, exactly as float32.
DALLE_ENGINE_AVX512 DALLE_ENGINE_INLINE __m512 load16(const float* w) { return _mm512_loadu_ps(w); }
DALLE_ENGINE_AVX512 DALLE_ENGINE_INLINE __m512 load16(const int8_t* w) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
}
DALLE_ENGINE_AVX512 DALLE_ENGINE_INLINE __m512 load16(const at::BFloat16* w) {  // bfloat16: float32's top half
  const __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}

template <int R, int NG, typename w_t>
DALLE_ENGINE_AVX512 void tile_avx512(const w_t* packed, int64_t in, const float* x, int64_t x_stride,
                                     float (&sums)[kRowBlock][kGroupBlock * kLanes]) {
  for (int64_t begin = 0; begin < in; begin += kSumBlock) {
    const int64_t end = std::min(in, begin + kSumBlock);
    __m512 acc[R][NG];
    for (int r = 0; r < R; ++r) {
      for (int g = 0; g < NG; ++g) acc[r][g] = _mm512_setzero_ps();
    }
    for (int64_t i = begin; i < end; ++i) {
      __m512 w[NG];
      for (int g = 0; g < NG; ++g) w[g] = load16(packed + (g * in + i) * kLanes);
      for (int r = 0; r < R; ++r) {
        const __m512 xv = _mm512_set1_ps(x[r * x_stride + i]);
        for (int g = 0; g < NG; ++g) acc[r][g] = _mm512_fmadd_ps(xv, w[g], acc[r][g]);
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int g = 0; g < NG; ++g) {
        float* s = sums[r] + g * kLanes;
        _mm512_storeu_ps(s, begin == 0 ? acc[r][g] : _mm512_add_ps(_mm512_loadu_ps(s), acc[r][g]));
      }
    }
  }
}

// 8 weights of one in feature (half a group), exactly as float32.
DALLE_ENGINE_AVX2 DALLE_ENGINE_INLINE __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
DALLE_ENGINE_AVX2 DALLE_ENGINE_INLINE __m256 load8(const int8_t* w) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
}
DALLE_ENGINE_AVX2 DALLE_ENGINE_INLINE __m256 load8(const at::BFloat16* w) {
  const __m256i bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
}

// One group at a time: 16 registers hold 2 halves by 4 rows of accumulators, the weights and x.
template <int R, int NG, typename w_t>
DALLE_ENGINE_AVX2 void tile_avx2(const w_t* packed, int64_t in, const float* x, int64_t x_stride,
                                 float (&sums)[kRowBlock][kGroupBlock * kLanes]) {
  for (int g = 0; g < NG; ++g) {
    const w_t* group = packed + g * in * kLanes;
    for (int64_t begin = 0; begin < in; begin += kSumBlock) {
      const int64_t end = std::min(in, begin + kSumBlock);
      __m256 lo[R], hi[R];
      for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
      for (int64_t i = begin; i < end; ++i) {
        const __m256 w_lo = load8(group + i * kLanes), w_hi = load8(group + i * kLanes + 8);
        for (int r = 0; r < R; ++r) {
          const __m256 xv = _mm256_set1_ps(x[r * x_stride + i]);
          lo[r] = _mm256_fmadd_ps(xv, w_lo, lo[r]);
          hi[r] = _mm256_fmadd_ps(xv, w_hi, hi[r]);
        }
      }
      for (int r = 0; r < R; ++r) {
        float* s = sums[r] + g * kLanes;
        _mm256_storeu_ps(s, begin == 0 ? lo[r] : _mm256_add_ps(_mm256_loadu_ps(s), lo[r]));
        _mm256_storeu_ps(s + 8, begin == 0 ? hi[r] : _mm256_add_ps(_mm256_loadu_ps(s + 8), hi[r]));
      }
    }
  }
}
#endif

// The instruction set's tile where it has one for these types, else the generic one.
template <int R, int NG, typename acc_t, typename w_t>
void tile(Isa isa, const w_t* packed, int64_t in, const acc_t* x, int64_t x_stride,
          acc_t (&sums)[kRowBlock][kGroupBlock * kLanes]) {
#if DALLE_ENGINE_ISA_BUILDS
  if constexpr (std::is_same_v<acc_t, float> && !std::is_same_v<w_t, at::Half>) {
    if (isa == Isa::kAvx512) return tile_avx512<R, NG>(packed, in, x, x_stride, sums);
    if (isa == Isa::kAvx2) return tile_avx2<R, NG>(packed, in, x, x_stride, sums);
  }
#endif
  (void)isa;
  tile_generic<R, NG>(packed, in, x, x_stride, sums);
}

// y rows [0, rows) by output groups [g0, g0 + NG): the sums, times the int8 scale, plus the bias.
template <int NG, typename scalar_t, typename acc_t, typename w_t>
void groups(Isa isa, const w_t* packed, int64_t in, const acc_t* x, int64_t x_stride, int64_t rows, int64_t g0,
            const scalar_t* bias, const float* scale, scalar_t* y, int64_t out) {
  const w_t* block = packed + g0 * in * kLanes;
  acc_t sums[kRowBlock][kGroupBlock * kLanes];
  for (int64_t r = 0; r < rows;) {
    const acc_t* xr = x + r * x_stride;
    int64_t n;
    if (rows - r >= 4) {
      tile<4, NG>(isa, block, in, xr, x_stride, sums), n = 4;
    } else if (rows - r >= 2) {
      tile<2, NG>(isa, block, in, xr, x_stride, sums), n = 2;
    } else {
      tile<1, NG>(isa, block, in, xr, x_stride, sums), n = 1;
    }
    const int64_t o0 = g0 * kLanes;
    for (int64_t j = 0; j < n; ++j) {
      scalar_t* yr = y + (r + j) * out + o0;
      for (int64_t o = 0; o < NG * kLanes; ++o) {
        acc_t v = sums[j][o];
        if (scale != nullptr) v *= static_cast<acc_t>(scale[o0 + o]);
        if (bias != nullptr) v += static_cast<acc_t>(bias[o0 + o]);
        yr[o] = static_cast<scalar_t>(v);
      }
    }
    r += n;
  }
}

template <typename scalar_t, typename w_t>
void run(const at::Tensor& x, const at::Tensor& packed, const scalar_t* bias, const float* scale, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = x.size(0), in = x.size(1), n_groups = packed.size(0), out = y.size(1);
  const acc_t* x_data = x.const_data_ptr<acc_t>();
  const w_t* w_data = packed.const_data_ptr<w_t>();
  scalar_t* y_data = y.mutable_data_ptr<scalar_t>();
  const int64_t x_stride = x.stride(0);
  const int64_t blocks = (n_groups + kGroupBlock - 1) / kGroupBlock;
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, kGroupBlock * kLanes * in * rows));
  const Isa isa = cpu_isa();
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin * kGroupBlock; g < std::min(end * kGroupBlock, n_groups);) {
      if (n_groups - g >= kGroupBlock) {
        groups<kGroupBlock>(isa, w_data, in, x_data, x_stride, rows, g, bias, scale, y_data, out);
        g += kGroupBlock;
      } else {
        groups<1>(isa, w_data, in, x_data, x_stride, rows, g, bias, scale, y_data, out);
        g += 1;
      }
    }
  });
}

}  // namespace

void packed_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias, const at::Tensor& scale,
                   at::Tensor& y) {
  const auto w_dtype = packed.scalar_type();
  const float* sc = scale.defined() ? scale.const_data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "packed_linear", [&] {
    const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    if (w_dtype == at::kChar) {
      run<scalar_t, int8_t>(x, packed, b, sc, y);
    } else if (w_dtype == y.scalar_type()) {
      run<scalar_t, scalar_t>(x, packed, b, sc, y);
    } else if constexpr (std::is_same_v<scalar_t, float>) {
      if (w_dtype == at::kBFloat16) {
        run<scalar_t, at::BFloat16>(x, packed, b, sc, y);
      } else {
        run<scalar_t, at::Half>(x, packed, b, sc, y);
      }
    }
  });
}

}  // namespace dalle_engine
