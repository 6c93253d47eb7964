// Vectorisation helpers shared by the CPU kernels: an always-inline marker, AVX2 clones picked at load time, and a
// branch-free exp the compiler can vectorise.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

// Row helpers are inlined into each build of the kernels that use them (their AVX2 clone included).
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

// Row kernels also get an AVX2 build picked at load time (function multi-versioning): the row arithmetic, exp above
// all, is a large part of their time, and the baseline x86-64 build only uses SSE2. GCC only: Clang cannot clone
// templates.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DALLE_ENGINE_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define DALLE_ENGINE_VECTOR_CLONES
#endif
