// Registers the CPU kernels as torch.ops.dalle_engine_cpu.*; kernels/cpp.py loads this library, adds their fake
// (meta) implementations and wraps the sparse attention pair in an autograd.Function.

#include <torch/library.h>

#include "counter_noise.h"
#include "cross_entropy.h"
#include "decode_attention.h"
#include "decode_layer.h"
#include "geglu.h"
#include "small_linear.h"
#include "sparse_attention.h"
#include "vector_math.h"

#include <c10/util/Exception.h>

#include <string>

namespace {

std::string cpu_isa() { return dalle_engine::isa_name(dalle_engine::cpu_isa()); }

std::string best_cpu_isa() { return dalle_engine::isa_name(dalle_engine::best_cpu_isa()); }

// Returns the instruction set it replaces.
std::string set_cpu_isa(const std::string& name) {
  dalle_engine::Isa isa;
  TORCH_CHECK(dalle_engine::isa_from_name(name, isa),
              "set_cpu_isa: the instruction set must be avx512, avx2 or baseline, got '", name, "'");
  TORCH_CHECK(static_cast<int>(isa) <= static_cast<int>(dalle_engine::best_cpu_isa()),
              "set_cpu_isa: this CPU (or build) has no ", name, "; the best it has is ", best_cpu_isa());
  const std::string before = cpu_isa();
  dalle_engine::set_cpu_isa(isa);
  return before;
}

}  // namespace

TORCH_LIBRARY(dalle_engine_cpu, m) {
  m.def(
      "sparse_attention_fwd(Tensor q, Tensor k, Tensor v, str pattern, int text_len, int fmap_size, "
      "int kernel_size, int dilation, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "sparse_attention_bwd(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor dout, str pattern, "
      "int text_len, int fmap_size, int kernel_size, int dilation, float scale) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor pos, str pattern, int text_len, int fmap_size, "
      "int kernel_size, int dilation, float scale) -> Tensor");
  m.def("small_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? scale=None) -> Tensor");
  m.def(
      "decode_layer(Tensor x, Tensor?[] attn, Tensor?[] ff, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor pos, "
      "Tensor? rotary_cos, Tensor? rotary_sin, Tensor(c!)? ring_attn, Tensor(d!)? ring_ff, Tensor? shift_weights, "
      "str pattern, int text_len, int fmap_size, int kernel_size, int dilation, float eps, bool reversible) -> Tensor");
  m.class_<dalle_engine::DecodeStack>("DecodeStack")
      .def(torch::init<const c10::List<std::optional<at::Tensor>>&, const std::vector<std::string>&,
                       const std::vector<int64_t>&, std::optional<at::Tensor>, std::optional<at::Tensor>,
                       std::optional<at::Tensor>, double, bool>())
      .def("step", &dalle_engine::DecodeStack::step)
      .def("set_head", &dalle_engine::DecodeStack::set_head)
      .def("logits", &dalle_engine::DecodeStack::logits);
  m.def("counter_uniform(Tensor keys, Tensor step, int columns) -> Tensor");
  m.def("geglu_fwd(Tensor x, Tensor? bias=None) -> Tensor");
  m.def("geglu_bwd(Tensor x, Tensor? bias, Tensor grad) -> (Tensor, Tensor)");
  m.def("cross_entropy_rows(Tensor(a!) logits, Tensor? bias, Tensor target, bool grad) -> Tensor");
  // The instruction set the row kernels run (see vector_math.h).
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("best_cpu_isa() -> str", &best_cpu_isa);
  m.def("set_cpu_isa(str name) -> str", &set_cpu_isa);
}

TORCH_LIBRARY_IMPL(dalle_engine_cpu, CPU, m) {
  m.impl("sparse_attention_fwd", &dalle_engine::sparse_attention_fwd);
  m.impl("sparse_attention_bwd", &dalle_engine::sparse_attention_bwd);
  m.impl("decode_attention", &dalle_engine::decode_attention);
  m.impl("small_linear", &dalle_engine::small_linear);
  m.impl("decode_layer", &dalle_engine::decode_layer);
  m.impl("counter_uniform", &dalle_engine::counter_uniform);
  m.impl("geglu_fwd", &dalle_engine::geglu_fwd);
  m.impl("geglu_bwd", &dalle_engine::geglu_bwd);
  m.impl("cross_entropy_rows", &dalle_engine::cross_entropy_rows);
}
