// Vectorisation helpers shared by the CPU kernels: an always-inline marker, builds of the row kernels for each x86
// instruction set picked at run time, and a branch-free exp the compiler can vectorise.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <string_view>

// Row helpers are inlined into each build of the kernels that use them (see with_cpu_isa below).
#if defined(__GNUC__)
#define DALLE_ENGINE_INLINE inline __attribute__((always_inline))
#else
#define DALLE_ENGINE_INLINE inline
#endif

// e^x to about 1 ulp for x <= 88, exactly 0 below -87 (where e^x is under FLT_MIN) and for -inf. Written without
// branches or calls so the loops around it vectorise (libm's expf does not).
// e^x = 2^n * e^r with n = round(x / ln 2) and |r| <= ln(2) / 2; e^r by its Taylor series to degree 7, whose
// truncation error (0.35^8 / 8! ~ 5e-9) is below float rounding.
DALLE_ENGINE_INLINE float exp_fast(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;         // few mantissa bits: n * kLn2Hi is exact
  constexpr float kLn2Lo = 1.42860682028622680e-6f;    // ln 2 - kLn2Hi
  constexpr float kRound = 12582912.0f;                 // 1.5 * 2^23: adding it rounds to an integer
  const float clamped = std::min(std::max(x, -100.0f), 88.0f);
  const float n = (clamped * kLog2e + kRound) - kRound;
  const float r = (clamped - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = 1.0f + (r + r * r * p);  // the 1 added last: about 1 ulp at worst (0.98 measured over [-87, 0])
  const float two_n = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return x < -87.0f ? 0.0f : p * two_n;
}

DALLE_ENGINE_INLINE double exp_fast(double x) { return std::exp(x); }

// x <- e^(x - shift) over n values, returning their sum: a softmax's numerators and denominator.
template <typename T>
DALLE_ENGINE_INLINE T exp_shifted(T* x, int64_t n, T shift) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const T e = exp_fast(x[j] - shift);
    x[j] = e;
    sum += e;
  }
  return sum;
}

// The exact (erf) GELU, x / 2 * (1 + erf(x / sqrt 2)), written around the tail erfc(|z|), z = x / sqrt 2: for x < 0
// GELU is x / 2 * erfc(|z|), for x >= 0 it is x - x / 2 * erfc(|z|), so neither subtracts two values near each other.
// float: erfc(z) = e^(-z^2) * P(t), t = 1 / (1 + 0.3275911 z) (the substitution of Abramowitz & Stegun 7.1.26), P of
// degree 10 fitted here to erfc(z) e^(z^2) for z in [0, 10] within 6e-10 relative: the GELU is then within a few
// float32 ulps (ATen's vectorised erf, the degree-5 formula, is off by up to 1.5e-7 absolute). Branch-free, so it
// vectorises, unlike libm's erf. double: libm's erfc.

// erfc(z) / 2 for z = |x| / sqrt 2, given gauss = e^(-z^2).
DALLE_ENGINE_INLINE float half_erfc(float z, float gauss) {
  const float t = 1.0f / (1.0f + 0.3275911f * z);
  float p = 6.4361261228e-02f;
  p = p * t - 3.6244560304e-01f;
  p = p * t + 7.4484001960e-01f;
  p = p * t - 7.3616856052e-01f;
  p = p * t + 6.7021147971e-01f;
  p = p * t - 1.5842292839e-01f;
  p = p * t + 2.5263933014e-01f;
  p = p * t + 1.5219323824e-01f;
  p = p * t + 1.8826116765e-01f;
  p = p * t + 1.8451857860e-01f;
  p = p * t + 1.2017384435e-05f;
  return 0.5f * (p * gauss);
}

DALLE_ENGINE_INLINE double half_erfc(double z, double) { return 0.5 * std::erfc(z); }

template <typename T>
DALLE_ENGINE_INLINE T gelu(T x) {
  const T z = std::fabs(x) * T(0.70710678118654752440);
  const T half_tail = x * half_erfc(z, exp_fast(-z * z));
  return x < T(0) ? half_tail : x - half_tail;
}

// GELU'(x) = Phi(x) + x phi(x): the normal CDF, from the same tail (Phi(x) = erfc(z) / 2 for x < 0, 1 - erfc(z) / 2
// otherwise), plus x times the normal density e^(-z^2) / sqrt(2 pi).
template <typename T>
DALLE_ENGINE_INLINE T gelu_grad(T x) {
  const T z = std::fabs(x) * T(0.70710678118654752440);
  const T gauss = exp_fast(-z * z);
  const T tail = half_erfc(z, gauss);
  return (x < T(0) ? tail : T(1) - tail) + x * gauss * T(0.39894228040143267794);
}

// Row kernels are built three times, for AVX-512, for AVX2 and for the baseline x86-64 (SSE2), and each call runs the
// build for the instruction set cpu_isa() names: the best this CPU has, unless DALLE_ENGINE_CPU_ISA (avx512, avx2 or
// baseline; another value warns) or set_cpu_isa() asks for a lower one, e.g. to measure or test an AVX2-only machine
// on an AVX-512 one. The row arithmetic, exp above all, is a large part of their time, and the baseline build only
// uses SSE2. A build differs from another in vector width, so in the order of its sums: results agree to rounding,
// not bit for bit, across instruction sets (within one they never depend on the batch). GCC on x86-64 Linux only;
// elsewhere one build.
//
// with_cpu_isa(f) runs f, a lambda marked DALLE_ENGINE_INLINE_LAMBDA whose kernels are all DALLE_ENGINE_INLINE, inlined
// into a function compiled for the chosen instruction set.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DALLE_ENGINE_ISA_BUILDS 1
#define DALLE_ENGINE_INLINE_LAMBDA __attribute__((always_inline))
#else
#define DALLE_ENGINE_ISA_BUILDS 0
#define DALLE_ENGINE_INLINE_LAMBDA
#endif

namespace dalle_engine {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

Isa cpu_isa();          // what the kernels run now
Isa best_cpu_isa();     // the best this CPU (and this build) has
void set_cpu_isa(Isa);  // at most best_cpu_isa() (checked by the caller)
const char* isa_name(Isa);  // "avx512", "avx2" or "baseline"
bool isa_from_name(std::string_view name, Isa& isa);  // false for any other name

#if DALLE_ENGINE_ISA_BUILDS
template <typename F>
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"))) void run_avx512(F& f) {
  f();
}
template <typename F>
__attribute__((target("avx2,fma"))) void run_avx2(F& f) {
  f();
}
#endif

template <typename F>
DALLE_ENGINE_INLINE void with_cpu_isa(F&& f) {
#if DALLE_ENGINE_ISA_BUILDS
  switch (cpu_isa()) {
    case Isa::kAvx512:
      run_avx512(f);
      return;
    case Isa::kAvx2:
      run_avx2(f);
      return;
    case Isa::kBaseline:
      break;
  }
#endif
  f();
}

}  // namespace dalle_engine
