// The instruction set the row kernels run (see with_cpu_isa in vector_math.h): chosen once from the CPU and
// DALLE_ENGINE_CPU_ISA, changed by set_cpu_isa.

#include "vector_math.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace dalle_engine {
namespace {

Isa detect() {
#if DALLE_ENGINE_ISA_BUILDS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

Isa initial() {
  const Isa best = best_cpu_isa();
  const char* requested = std::getenv("DALLE_ENGINE_CPU_ISA");
  if (requested == nullptr || *requested == '\0') return best;
  // A tuning knob read in the middle of a run: a bad value warns and runs the best build rather than failing.
  Isa isa;
  if (!isa_from_name(requested, isa)) {
    TORCH_WARN("DALLE_ENGINE_CPU_ISA must be avx512, avx2 or baseline, got '", requested, "': running ",
               isa_name(best));
    return best;
  }
  if (static_cast<int>(isa) > static_cast<int>(best)) {
    TORCH_WARN("DALLE_ENGINE_CPU_ISA=", requested, " is more than this CPU (or build) has: running ", isa_name(best));
    return best;
  }
  return isa;
}

std::atomic<int>& current() {
  static std::atomic<int> isa{static_cast<int>(initial())};
  return isa;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kBaseline:
      break;
  }
  return "baseline";
}

bool isa_from_name(std::string_view name, Isa& isa) {
  for (const Isa candidate : {Isa::kAvx512, Isa::kAvx2, Isa::kBaseline}) {
    if (name == isa_name(candidate)) {
      isa = candidate;
      return true;
    }
  }
  return false;
}

Isa best_cpu_isa() {
  static const Isa best = detect();
  return best;
}

Isa cpu_isa() { return static_cast<Isa>(current().load(std::memory_order_relaxed)); }

void set_cpu_isa(Isa isa) { current().store(static_cast<int>(isa), std::memory_order_relaxed); }

}  // namespace dalle_engine
