// x86 intrinsics for the hand-vectorised kernels, and the target attributes of their instruction sets (the builds
// with_cpu_isa runs, vector_math.h). Include it first: GCC 12 warns that the AVX-512 intrinsics' own placeholder
// operands "may be used uninitialized" wherever they are inlined (GCC bug 105593, fixed in GCC 13), and the warning
// must be off before immintrin.h is first included.
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "vector_math.h"

#if DALLE_ENGINE_ISA_BUILDS
#include <immintrin.h>

#define DALLE_ENGINE_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))
#define DALLE_ENGINE_AVX2 __attribute__((target("avx2,fma")))
// A lambda inside a DALLE_ENGINE_AVX512 function (lambdas do not inherit their function's target).
#define DALLE_ENGINE_AVX512_LAMBDA __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))
#endif
