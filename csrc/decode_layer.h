// CPU kernel for one transformer layer of a KV-cache decode step, fused into one call (engine/model/transformer.py's
// Layer on one position per row, as engine/model/fused_decode.py passes it).
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <torch/custom_class.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace dalle_engine {

// x: (batch, dim), or (batch, 2 * dim) for a reversible layer (its two streams side by side); float32 or float64.
// attn, ff: each branch's 11 tensors, in this order: norm weight, norm bias, input weight, input bias, input scale,
// output weight, output bias, output scale, sandwich norm weight, sandwich norm bias, LayerScale (absent ones None;
// the attention's input is its fused QKV projection, the feed-forward's the GEGLU projection). The weights may be
// stored as small_linear takes them (int8 with a scale, bfloat16 / float16 beside float32 x).
// k_cache, v_cache: (batch, heads, max_seq, dim_head), written at each row's position; pos: one position for every
// row or one per row (batch,). rotary_cos, rotary_sin: (1 or batch, rot), the positions' angles (None: no rotary).
// ring_attn, ring_ff: (batch, fmap_size + 1, dim) token-shift rings and shift_weights (1 or batch, 3, dim) (all None:
// no token shift). All of x's dtype, except the stored weights. Returns the layer's output, x's shape.
at::Tensor decode_layer(const at::Tensor& x, const c10::List<std::optional<at::Tensor>>& attn,
                        const c10::List<std::optional<at::Tensor>>& ff, const at::Tensor& k_cache,
                        const at::Tensor& v_cache, const at::Tensor& pos, const std::optional<at::Tensor>& rotary_cos,
                        const std::optional<at::Tensor>& rotary_sin, const std::optional<at::Tensor>& ring_attn,
                        const std::optional<at::Tensor>& ring_ff, const std::optional<at::Tensor>& shift_weights,
                        std::string_view pattern, int64_t text_len, int64_t fmap_size, int64_t kernel_size,
                        int64_t dilation, double eps, bool reversible);

// A whole decode step's layers, held in C++ (torch.classes.dalle_engine_cpu.DecodeStack): decode_layer per layer, but
// its tensors are passed and checked once, not at every step (passing a layer's ~25 tensors through the dispatcher
// cost about as much as its normed inputs, rotary, GELU and residuals). tensors: each layer's attn then ff branch
// tensors as decode_layer takes them, layer after layer; patterns and geometry (text_len, fmap_size, kernel_size,
// dilation) per layer; rotary_cos, rotary_sin: (max_seq, rot) tables of every position's angles, or None;
// shift_weights: the (max_seq, 3, dim) token-shift table, or None.
class DecodeStack : public torch::CustomClassHolder {
 public:
  DecodeStack(const c10::List<std::optional<at::Tensor>>& tensors, const std::vector<std::string>& patterns,
              const std::vector<int64_t>& geometry, std::optional<at::Tensor> rotary_cos,
              std::optional<at::Tensor> rotary_sin, std::optional<at::Tensor> shift_weights, double eps,
              bool reversible);
  ~DecodeStack() override;

  // x (batch, dim) through every layer at positions pos (one, or one per row): caches k0, v0, k1, v1, ...; rings
  // ring_attn0, ring_ff0, ... (token shift), else empty. Returns (batch, dim); a reversible stack takes the mean of
  // its two streams, as the layer-by-layer step does.
  at::Tensor step(const at::Tensor& x, const std::vector<at::Tensor>& caches, const std::vector<at::Tensor>& rings,
                  const at::Tensor& pos) const;

  // The output head of logits: with divide_max each row divided by its largest value (a stable model's DivideMax),
  // then LayerNorm (norm_weight, norm_bias, eps) and the projection (weight as small_linear takes it, bias, scale).
  void set_head(const at::Tensor& norm_weight, const at::Tensor& norm_bias, double eps, const at::Tensor& weight,
                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale, bool divide_max);

  // step, then the head: the logits (batch, out features of the head's weight).
  at::Tensor logits(const at::Tensor& x, const std::vector<at::Tensor>& caches, const std::vector<at::Tensor>& rings,
                    const at::Tensor& pos) const;

 private:
  struct Layer;
  struct Head;
  std::vector<Layer> layers_;
  std::unique_ptr<const Head> head_;
  std::optional<at::Tensor> cos_, sin_, shift_weights_;
  int64_t dim_ = 0;
  double eps_;
  bool reversible_;
};

}  // namespace dalle_engine
