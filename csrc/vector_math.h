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
