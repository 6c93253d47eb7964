// One transformer layer of a KV-cache decode step in one call: PreNorm, token shift, QKV, rotary, cache write, decode
// attention, output projection, sandwich norm, LayerScale and residual, then the same around the GEGLU feed-forward.
//
// An eager decode step is otherwise ~50 PyTorch operations per layer on (batch, dim) rows, each a few microseconds of
// dispatch against microseconds of work: the step's time was the operations' count, not its arithmetic. ATen's own
// LayerNorm and GELU cost the same way (float32 GELU goes through a oneDNN primitive: ~20 us for a few thousand
// values). Here the products and the attention are the small_linear and decode_attention kernels (each weight read
// once for all rows) and everything else plain loops over the rows, vectorised for the CPU's instruction set. Every
// row is computed alone and in a fixed order, so a row's result never depends on the batch. Results agree with the
// layer-by-layer step to rounding: its norms and GELU round differently.

#include "decode_layer.h"
#include "decode_attention.h"
#include "packed_linear.h"
#include "small_linear.h"
#include "vector_math.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cmath>
#include <vector>

namespace dalle_engine {
namespace {

// A branch's tensors, in the order of the op's lists (see decode_layer.h).
enum Slot { kNormW, kNormB, kInW, kInB, kInScale, kOutW, kOutB, kOutScale, kNormOutW, kNormOutB, kLayerScale, kSlots };

struct Branch {
  std::optional<at::Tensor> t[kSlots];

  const at::Tensor& operator[](Slot s) const { return *t[s]; }
  const std::optional<at::Tensor>& opt(Slot s) const { return t[s]; }
};

// Per-position rows (rotary angles, token-shift weights): batch row b reads row rows[b] of table (null: none).
struct Table {
  const at::Tensor* table;
  std::vector<int64_t> rows;
};

Branch unpack(const c10::List<std::optional<at::Tensor>>& list, const char* name, int64_t dim) {
  TORCH_CHECK(static_cast<int64_t>(list.size()) == kSlots, "decode_layer: ", name, " needs ", int64_t{kSlots},
              " tensors (norm weight, norm bias, input weight, input bias, input scale, output weight, output bias, "
              "output scale, sandwich norm weight, sandwich norm bias, LayerScale), got ", list.size());
  Branch branch;
  for (int64_t i = 0; i < kSlots; ++i) branch.t[i] = list.get(i);
  for (Slot s : {kNormW, kNormB, kInW, kOutW, kLayerScale}) {
    TORCH_CHECK(branch.t[s].has_value(), "decode_layer: ", name, " tensor ", int64_t{s}, " is required");
  }
  TORCH_CHECK(branch.t[kNormOutW].has_value() == branch.t[kNormOutB].has_value(), "decode_layer: ", name,
              "'s sandwich norm needs both its weight and its bias");
  TORCH_CHECK(out_features(branch[kOutW]) == dim, "decode_layer: ", name, "'s output weight must have ", dim,
              " output features, got ", out_features(branch[kOutW]));
  for (Slot s : {kNormW, kNormB, kNormOutW, kNormOutB, kLayerScale}) {
    if (!branch.t[s].has_value()) continue;
    TORCH_CHECK(branch[s].dim() == 1 && branch[s].size(0) == dim && branch[s].is_contiguous(), "decode_layer: ", name,
                " tensor ", int64_t{s}, " must be contiguous (", dim, ",), got ", branch[s].sizes());
  }
  return branch;
}

// Each row's position, range-checked.
std::vector<int64_t> row_positions(const at::Tensor& pos, int64_t batch, int64_t max_seq) {
  TORCH_CHECK(pos.device().is_cpu() && at::isIntegralType(pos.scalar_type(), /*includeBool=*/false),
              "decode_layer: pos must be a CPU integer tensor, got ", pos.scalar_type(), " on ", pos.device());
  const bool per_row = pos.numel() != 1;
  TORCH_CHECK(!per_row || (pos.dim() == 1 && pos.size(0) == batch), "decode_layer: pos must hold one position or one "
              "per row (shape (", batch, ",)), got shape ", pos.sizes());
  const at::Tensor p = pos.to(at::kLong).contiguous();
  std::vector<int64_t> rows(batch);
  for (int64_t b = 0; b < batch; ++b) {
    rows[b] = p.const_data_ptr<int64_t>()[per_row ? b : 0];
    TORCH_CHECK(rows[b] >= 0 && rows[b] < max_seq, "decode_layer: pos must lie in [0, ", max_seq, "), got ", rows[b]);
  }
  return rows;
}

// Token shift of normed rows h (batch, dim), in place: each row is written into its ring at slot pos % size, then
// becomes h * w0 + (previous token) * w1 + (token a grid row above) * w2, read from the ring (see shift_step in
// engine/model/transformer.py).
template <typename scalar_t>
void shift_rows(at::Tensor& h, const at::Tensor& ring, const Table& weights, const std::vector<int64_t>& pos) {
  const int64_t batch = h.size(0), dim = h.size(1), size = ring.size(1);
  scalar_t* rows = h.mutable_data_ptr<scalar_t>();
  scalar_t* ring_data = ring.mutable_data_ptr<scalar_t>();
  const scalar_t* w_data = weights.table->const_data_ptr<scalar_t>();
  for (int64_t b = 0; b < batch; ++b) {
    scalar_t* row = rows + b * dim;
    scalar_t* slots = ring_data + b * ring.stride(0);
    const int64_t p = pos[b];
    scalar_t* own = slots + (p % size) * ring.stride(1);
    const scalar_t* prev = slots + ((p + size - 1) % size) * ring.stride(1);
    const scalar_t* above = slots + ((p + 1) % size) * ring.stride(1);  // p - fmap_size, as size = fmap_size + 1
    const scalar_t* w = w_data + weights.rows[b] * 3 * dim;
    for (int64_t j = 0; j < dim; ++j) own[j] = row[j];
    for (int64_t j = 0; j < dim; ++j) row[j] = row[j] * w[j] + prev[j] * w[dim + j] + above[j] * w[2 * dim + j];
  }
}

// Rotary on the first rot features of every head's query, key and value in qkv (batch, 3 * heads * dim_head), in
// place (pairs (2i, 2i + 1) turned by the row's angles, as apply_rotary), then each row's key and value written into
// the caches at its position.
template <typename scalar_t>
void rotate_and_cache(at::Tensor& qkv, const Table& cos, const Table& sin, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, const std::vector<int64_t>& pos) {
  const int64_t batch = qkv.size(0), heads = k_cache.size(1), dim_head = k_cache.size(3);
  const int64_t inner = heads * dim_head, rot = cos.table != nullptr ? cos.table->size(1) : 0;
  scalar_t* data = qkv.mutable_data_ptr<scalar_t>();
  const scalar_t* cos_data = rot ? cos.table->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* sin_data = rot ? sin.table->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* caches[2] = {k_cache.mutable_data_ptr<scalar_t>(), v_cache.mutable_data_ptr<scalar_t>()};
  const at::IntArrayRef strides[2] = {k_cache.strides(), v_cache.strides()};
  for (int64_t b = 0; b < batch; ++b) {
    const scalar_t* c = cos_data + (rot ? cos.rows[b] : 0) * rot;
    const scalar_t* s = sin_data + (rot ? sin.rows[b] : 0) * rot;
    for (int64_t part = 0; part < 3; ++part) {
      for (int64_t h = 0; h < heads; ++h) {
        scalar_t* x = data + b * 3 * inner + part * inner + h * dim_head;
        for (int64_t i = 0; i < rot; i += 2) {
          const scalar_t x0 = x[i], x1 = x[i + 1];
          x[i] = x0 * c[i] + -x1 * s[i];
          x[i + 1] = x1 * c[i + 1] + x0 * s[i + 1];
        }
        if (part == 0) continue;
        const at::IntArrayRef st = strides[part - 1];
        scalar_t* slot = caches[part - 1] + b * st[0] + h * st[1] + pos[b] * st[2];
        for (int64_t j = 0; j < dim_head; ++j) slot[j] = x[j];
      }
    }
  }
}

// LayerNorm of each row of x (rows x dim, row stride x_stride) into out (contiguous; may be x itself when x is):
// two passes, the mean and then the variance about it.
template <typename scalar_t>
DALLE_ENGINE_INLINE void layer_norm_rows(const scalar_t* x, int64_t x_stride, int64_t rows, int64_t dim,
                                         const scalar_t* weight, const scalar_t* bias, scalar_t eps, scalar_t* out) {
  for (int64_t b = 0; b < rows; ++b) {
    const scalar_t* row = x + b * x_stride;
    scalar_t sum = 0, squares = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < dim; ++j) sum += row[j];
    const scalar_t mean = sum / static_cast<scalar_t>(dim);
#pragma omp simd reduction(+ : squares)
    for (int64_t j = 0; j < dim; ++j) squares += (row[j] - mean) * (row[j] - mean);
    const scalar_t rstd = scalar_t(1) / std::sqrt(squares / static_cast<scalar_t>(dim) + eps);
    scalar_t* dest = out + b * dim;
#pragma omp simd
    for (int64_t j = 0; j < dim; ++j) dest[j] = (row[j] - mean) * rstd * weight[j] + bias[j];
  }
}

// GEGLU of the feed-forward's input projection in (rows x 2 * hidden): out = first half * GELU(second half).
template <typename scalar_t>
DALLE_ENGINE_INLINE void geglu_rows(const scalar_t* in, int64_t rows, int64_t hidden, scalar_t* out) {
  for (int64_t b = 0; b < rows; ++b) {
    const scalar_t* a = in + b * 2 * hidden;
    const scalar_t* gate = a + hidden;
    scalar_t* dest = out + b * hidden;
#pragma omp simd
    for (int64_t j = 0; j < hidden; ++j) dest[j] = a[j] * gelu(gate[j]);
  }
}

// PreNorm's norm of the rows x (a column slice or all of a (batch, ...) tensor), then the token shift.
template <typename scalar_t>
at::Tensor normed_input(const at::Tensor& x, const Branch& branch, const std::vector<int64_t>& pos,
                        const std::optional<at::Tensor>& ring, const Table& shift_weights, double eps) {
  at::Tensor h = at::empty({x.size(0), x.size(1)}, x.options());
  with_cpu_isa([&]() DALLE_ENGINE_INLINE_LAMBDA {
    layer_norm_rows(x.const_data_ptr<scalar_t>(), x.stride(0), x.size(0), x.size(1),
                    branch[kNormW].const_data_ptr<scalar_t>(), branch[kNormB].const_data_ptr<scalar_t>(),
                    static_cast<scalar_t>(eps), h.mutable_data_ptr<scalar_t>());
  });
  if (ring.has_value()) shift_rows<scalar_t>(h, *ring, shift_weights, pos);
  return h;
}

// The output projection of a branch and its sandwich norm (in place), if any.
template <typename scalar_t>
at::Tensor project_out(const at::Tensor& x, const Branch& branch, double eps) {
  at::Tensor out = small_linear(x, branch[kOutW], branch.opt(kOutB), branch.opt(kOutScale));
  if (branch.opt(kNormOutW).has_value()) {
    scalar_t* data = out.mutable_data_ptr<scalar_t>();
    with_cpu_isa([&]() DALLE_ENGINE_INLINE_LAMBDA {
      layer_norm_rows(data, out.size(1), out.size(0), out.size(1), branch[kNormOutW].const_data_ptr<scalar_t>(),
                      branch[kNormOutB].const_data_ptr<scalar_t>(), static_cast<scalar_t>(eps), data);
    });
  }
  return out;
}

struct Geometry {
  std::string_view pattern;
  int64_t text_len, fmap_size, kernel_size, dilation;
};

template <typename scalar_t>
at::Tensor attention_branch(const at::Tensor& x, const Branch& branch, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& pos_tensor, const std::vector<int64_t>& pos,
                            const Table& cos, const Table& sin, const std::optional<at::Tensor>& ring,
                            const Table& shift_weights, const Geometry& g, double eps) {
  const at::Tensor h = normed_input<scalar_t>(x, branch, pos, ring, shift_weights, eps);
  at::Tensor qkv = small_linear(h, branch[kInW], branch.opt(kInB), branch.opt(kInScale));
  rotate_and_cache<scalar_t>(qkv, cos, sin, k_cache, v_cache, pos);
  const int64_t batch = x.size(0), heads = k_cache.size(1), dim_head = k_cache.size(3);
  const at::Tensor q = qkv.as_strided({batch, heads, dim_head}, {3 * heads * dim_head, dim_head, 1});
  const at::Tensor out = decode_attention(q, k_cache, v_cache, pos_tensor, g.pattern, g.text_len, g.fmap_size,
                                          g.kernel_size, g.dilation, std::pow(static_cast<double>(dim_head), -0.5));
  return project_out<scalar_t>(out.view({batch, heads * dim_head}), branch, eps);
}

template <typename scalar_t>
at::Tensor feed_forward_branch(const at::Tensor& x, const Branch& branch, const std::vector<int64_t>& pos,
                               const std::optional<at::Tensor>& ring, const Table& shift_weights, double eps) {
  const at::Tensor h = normed_input<scalar_t>(x, branch, pos, ring, shift_weights, eps);
  const at::Tensor in = small_linear(h, branch[kInW], branch.opt(kInB), branch.opt(kInScale));
  const int64_t hidden = in.size(1) / 2;
  at::Tensor geglu = at::empty({in.size(0), hidden}, in.options());
  with_cpu_isa([&]() DALLE_ENGINE_INLINE_LAMBDA {
    geglu_rows(in.const_data_ptr<scalar_t>(), in.size(0), hidden, geglu.mutable_data_ptr<scalar_t>());
  });
  return project_out<scalar_t>(geglu, branch, eps);
}

// y = res + out * layer_scale, row by row (y may be res itself, or a column slice of a wider tensor).
template <typename scalar_t>
void add_scaled(at::Tensor& y, const at::Tensor& res, const at::Tensor& out, const at::Tensor& layer_scale) {
  const int64_t batch = out.size(0), dim = out.size(1);
  const scalar_t* r = res.const_data_ptr<scalar_t>();
  const scalar_t* o = out.const_data_ptr<scalar_t>();
  const scalar_t* ls = layer_scale.const_data_ptr<scalar_t>();
  scalar_t* dest = y.mutable_data_ptr<scalar_t>();
  const int64_t y_stride = y.stride(0), res_stride = res.stride(0);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t j = 0; j < dim; ++j) {
      const scalar_t scaled = o[b * dim + j] * ls[j];
      dest[b * y_stride + j] = r[b * res_stride + j] + scaled;
    }
  }
}

void check_rows(const at::Tensor& t, const char* name, at::IntArrayRef sizes, at::ScalarType dtype) {
  TORCH_CHECK(t.sizes() == sizes, "decode_layer: ", name, " must be ", sizes, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype && t.device().is_cpu(), "decode_layer: ", name, " must be a ", dtype,
              " CPU tensor, got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, "decode_layer: ", name, " must have unit stride along its last "
              "dim, got strides ", t.strides());
}

// The checks of one layer's arguments beyond its branches (checked by unpack): x (dim features, or 2 * dim for a
// reversible layer), the caches, the rotary tables (rows of rot angles) and the token-shift rings and weights.
void check_layer(const at::Tensor& x, const Branch& attn, int64_t dim, const at::Tensor& k_cache,
                 const at::Tensor& v_cache, const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                 const std::optional<at::Tensor>& ring_attn, const std::optional<at::Tensor>& ring_ff,
                 const std::optional<at::Tensor>& shift_weights, int64_t fmap_size, bool reversible) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() && (dtype == at::kFloat || dtype == at::kDouble),
              "decode_layer: x must be a (batch, dim) float32 or float64 CPU tensor, got ", x.scalar_type(), " ",
              x.sizes(), " on ", x.device());
  TORCH_CHECK(x.size(1) == (reversible ? 2 : 1) * dim, "decode_layer: x must have ", (reversible ? 2 : 1) * dim,
              " features", reversible ? " (a reversible layer's two streams)" : "", ", got ", x.size(1));
  const int64_t batch = x.size(0);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == batch, "decode_layer: k_cache must be (", batch,
              ", heads, max_seq, dim_head), got ", k_cache.sizes());
  check_rows(k_cache, "k_cache", k_cache.sizes(), dtype);
  check_rows(v_cache, "v_cache", k_cache.sizes(), dtype);
  const int64_t heads = k_cache.size(1), dim_head = k_cache.size(3);
  TORCH_CHECK(out_features(attn[kInW]) == 3 * heads * dim_head, "decode_layer: the QKV weight must have 3 * "
              "heads * dim_head = ", 3 * heads * dim_head, " output features, got ", out_features(attn[kInW]));
  TORCH_CHECK(cos.has_value() == sin.has_value(), "decode_layer: rotary needs both cos and sin");
  if (cos.has_value()) {
    const int64_t rot = cos->size(-1);
    TORCH_CHECK(cos->dim() == 2 && rot % 2 == 0 && rot <= dim_head, "decode_layer: rotary_cos must be (rows, an "
                "even rot <= dim_head), got ", cos->sizes());
    check_rows(*cos, "rotary_cos", cos->sizes(), dtype);
    check_rows(*sin, "rotary_sin", cos->sizes(), dtype);
    TORCH_CHECK(cos->is_contiguous() && sin->is_contiguous(), "decode_layer: rotary must be contiguous");
  }
  const bool shift = shift_weights.has_value();
  TORCH_CHECK(ring_attn.has_value() == shift && ring_ff.has_value() == shift,
              "decode_layer: token shift needs both rings and the shift weights");
  if (shift) {
    TORCH_CHECK(ring_attn->dim() == 3 && ring_attn->size(0) == batch && ring_attn->size(1) == fmap_size + 1,
                "decode_layer: ring_attn must be (", batch, ", ", fmap_size + 1, ", ", dim, "), got ",
                ring_attn->sizes());
    check_rows(*ring_attn, "ring_attn", {batch, fmap_size + 1, dim}, dtype);
    check_rows(*ring_ff, "ring_ff", {batch, fmap_size + 1, dim}, dtype);
    TORCH_CHECK(shift_weights->dim() == 3 && shift_weights->is_contiguous(),
                "decode_layer: shift_weights must be contiguous (rows, 3, dim)");
    check_rows(*shift_weights, "shift_weights", {shift_weights->size(0), 3, dim}, dtype);
  }
}

// Table rows for each batch row: one row for all, one per batch row, or (positions) the row at each one's position.
Table table(const std::optional<at::Tensor>& t, const char* name, int64_t batch) {
  if (!t.has_value()) return {nullptr, {}};
  TORCH_CHECK(t->size(0) == 1 || t->size(0) == batch, "decode_layer: ", name, " must have 1 or batch = ", batch,
              " rows, got ", t->size(0));
  std::vector<int64_t> rows(batch);
  for (int64_t b = 0; b < batch; ++b) rows[b] = t->size(0) == 1 ? 0 : b;
  return {&*t, std::move(rows)};
}

Table table_at(const std::optional<at::Tensor>& t, const char* name, const std::vector<int64_t>& pos) {
  if (!t.has_value()) return {nullptr, {}};
  for (const int64_t p : pos) {
    TORCH_CHECK(p < t->size(0), "decode_layer: ", name, " has no row for position ", p, " (", t->size(0), " rows)");
  }
  return {&*t, pos};
}

// One checked layer. Non-reversible: y1 = x + f(x), y = y1 + g(y1). Reversible, streams (x1, x2): y1 = x1 + f(x2),
// y2 = x2 + g(y1).
at::Tensor run_layer(const at::Tensor& x, const Branch& attn, const Branch& ff, int64_t dim, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const at::Tensor& pos_tensor, const std::vector<int64_t>& pos,
                     const Table& cos, const Table& sin, const std::optional<at::Tensor>& ring_attn,
                     const std::optional<at::Tensor>& ring_ff, const Table& shift_weights, const Geometry& g,
                     double eps, bool reversible) {
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  const at::Tensor f_in = reversible ? xc.narrow(1, dim, dim) : xc;
  const at::Tensor f_res = reversible ? xc.narrow(1, 0, dim) : xc;
  at::Tensor y1 = reversible ? y.narrow(1, 0, dim) : y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "decode_layer", [&] {
    const at::Tensor f = attention_branch<scalar_t>(f_in, attn, k_cache, v_cache, pos_tensor, pos, cos, sin, ring_attn,
                                                    shift_weights, g, eps);
    add_scaled<scalar_t>(y1, f_res, f, attn[kLayerScale]);
    const at::Tensor g_out = feed_forward_branch<scalar_t>(y1, ff, pos, ring_ff, shift_weights, eps);
    at::Tensor y2 = reversible ? y.narrow(1, dim, dim) : y;
    add_scaled<scalar_t>(y2, reversible ? f_in : y1, g_out, ff[kLayerScale]);
  });
  return y;
}

}  // namespace

at::Tensor decode_layer(const at::Tensor& x, const c10::List<std::optional<at::Tensor>>& attn,
                        const c10::List<std::optional<at::Tensor>>& ff, const at::Tensor& k_cache,
                        const at::Tensor& v_cache, const at::Tensor& pos_tensor,
                        const std::optional<at::Tensor>& rotary_cos, const std::optional<at::Tensor>& rotary_sin,
                        const std::optional<at::Tensor>& ring_attn, const std::optional<at::Tensor>& ring_ff,
                        const std::optional<at::Tensor>& shift_weights, std::string_view pattern, int64_t text_len,
                        int64_t fmap_size, int64_t kernel_size, int64_t dilation, double eps, bool reversible) {
  TORCH_CHECK(x.dim() == 2, "decode_layer: x must be a (batch, dim) float32 or float64 CPU tensor, got ",
              x.scalar_type(), " ", x.sizes(), " on ", x.device());
  TORCH_CHECK(!reversible || x.size(1) % 2 == 0, "decode_layer: a reversible layer's x holds two streams of dim "
              "features, got ", x.size(1), " features");
  const int64_t batch = x.size(0), dim = reversible ? x.size(1) / 2 : x.size(1);
  const Branch attn_branch = unpack(attn, "attn", dim), ff_branch = unpack(ff, "ff", dim);
  check_layer(x, attn_branch, dim, k_cache, v_cache, rotary_cos, rotary_sin, ring_attn, ring_ff, shift_weights,
              fmap_size, reversible);
  const std::vector<int64_t> pos = row_positions(pos_tensor, batch, k_cache.size(2));
  return run_layer(x, attn_branch, ff_branch, dim, k_cache, v_cache, pos_tensor, pos,
                   table(rotary_cos, "rotary_cos", batch), table(rotary_sin, "rotary_sin", batch), ring_attn, ring_ff,
                   table(shift_weights, "shift_weights", batch), {pattern, text_len, fmap_size, kernel_size, dilation},
                   eps, reversible);
}

// A layer of the stack: its branches and pattern geometry, checked once.
struct DecodeStack::Layer {
  Branch attn, ff;
  std::string pattern;
  int64_t text_len, fmap_size, kernel_size, dilation;
};

DecodeStack::DecodeStack(const c10::List<std::optional<at::Tensor>>& tensors, const std::vector<std::string>& patterns,
                         const std::vector<int64_t>& geometry, std::optional<at::Tensor> rotary_cos,
                         std::optional<at::Tensor> rotary_sin, std::optional<at::Tensor> shift_weights, double eps,
                         bool reversible)
    : cos_(std::move(rotary_cos)), sin_(std::move(rotary_sin)), shift_weights_(std::move(shift_weights)), eps_(eps),
      reversible_(reversible) {
  const int64_t depth = static_cast<int64_t>(patterns.size());
  TORCH_CHECK(depth >= 1 && static_cast<int64_t>(tensors.size()) == 2 * kSlots * depth &&
              static_cast<int64_t>(geometry.size()) == 4 * depth, "DecodeStack: ", depth, " layers need ",
              2 * kSlots * depth, " tensors and ", 4 * depth, " geometry values, got ", tensors.size(), " and ",
              geometry.size());
  const std::optional<at::Tensor> norm = tensors.get(kNormW);
  TORCH_CHECK(norm.has_value() && norm->dim() == 1, "DecodeStack: the first tensor must be a norm weight (dim,)");
  dim_ = norm->size(0);
  for (int64_t i = 0; i < depth; ++i) {
    c10::List<std::optional<at::Tensor>> branches[2];
    for (int64_t j = 0; j < 2 * kSlots; ++j) branches[j / kSlots].push_back(tensors.get(2 * kSlots * i + j));
    layers_.push_back({unpack(branches[0], "attn", dim_), unpack(branches[1], "ff", dim_), patterns[i],
                       geometry[4 * i], geometry[4 * i + 1], geometry[4 * i + 2], geometry[4 * i + 3]});
  }
}

DecodeStack::~DecodeStack() = default;

at::Tensor DecodeStack::step(const at::Tensor& x, const std::vector<at::Tensor>& caches,
                             const std::vector<at::Tensor>& rings, const at::Tensor& pos_tensor) const {
  const size_t depth = layers_.size();
  TORCH_CHECK(caches.size() == 2 * depth && (rings.empty() || rings.size() == 2 * depth),
              "DecodeStack.step: ", depth, " layers need ", 2 * depth, " caches (k, v per layer) and ", 2 * depth,
              " rings or none, got ", caches.size(), " and ", rings.size());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == dim_, "DecodeStack.step: x must be (batch, ", dim_, "), got ", x.sizes());
  const int64_t batch = x.size(0);
  TORCH_CHECK(caches[0].dim() == 4, "DecodeStack.step: the caches must be (batch, heads, max_seq, dim_head), got ",
              caches[0].sizes());
  const std::vector<int64_t> pos = row_positions(pos_tensor, batch, caches[0].size(2));
  const Table cos = table_at(cos_, "rotary_cos", pos), sin = table_at(sin_, "rotary_sin", pos);
  const Table shift = table_at(shift_weights_, "shift_weights", pos);
  at::Tensor h = reversible_ ? at::cat({x, x}, 1) : x;
  for (size_t i = 0; i < depth; ++i) {
    const Layer& layer = layers_[i];
    const at::Tensor &k = caches[2 * i], &v = caches[2 * i + 1];
    const std::optional<at::Tensor> ring_attn = rings.empty() ? std::nullopt : std::optional(rings[2 * i]);
    const std::optional<at::Tensor> ring_ff = rings.empty() ? std::nullopt : std::optional(rings[2 * i + 1]);
    check_layer(h, layer.attn, dim_, k, v, cos_, sin_, ring_attn, ring_ff, shift_weights_, layer.fmap_size,
                reversible_);
    TORCH_CHECK(k.size(2) == caches[0].size(2), "DecodeStack.step: every layer's cache must have one max_seq");
    h = run_layer(h, layer.attn, layer.ff, dim_, k, v, pos_tensor, pos, cos, sin, ring_attn, ring_ff, shift,
                  {layer.pattern, layer.text_len, layer.fmap_size, layer.kernel_size, layer.dilation}, eps_,
                  reversible_);
  }
  // The two streams' mean, as the layer-by-layer step takes it.
  return reversible_ ? at::stack({h.narrow(1, 0, dim_), h.narrow(1, dim_, dim_)}).mean(0) : h;
}

struct DecodeStack::Head {
  at::Tensor norm_weight, norm_bias, weight;
  std::optional<at::Tensor> bias, scale;
  double eps;
  bool divide_max;
};

void DecodeStack::set_head(const at::Tensor& norm_weight, const at::Tensor& norm_bias, double eps,
                           const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& scale, bool divide_max) {
  for (const at::Tensor* t : {&norm_weight, &norm_bias}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == dim_ && t->is_contiguous() && t->device().is_cpu(),
                "DecodeStack.set_head: the norm's weight and bias must be contiguous (", dim_, ",) CPU tensors, got ",
                t->sizes());
  }
  TORCH_CHECK(norm_bias.scalar_type() == norm_weight.scalar_type(), "DecodeStack.set_head: the norm's weight and "
              "bias must share a dtype");
  TORCH_CHECK((weight.dim() == 2 || weight.dim() == 3) && weight.size(1) == dim_, "DecodeStack.set_head: the "
              "projection must take ", dim_, " features, got a weight of shape ", weight.sizes());
  head_ = std::make_unique<const Head>(Head{norm_weight, norm_bias, weight, bias, scale, eps, divide_max});
}

at::Tensor DecodeStack::logits(const at::Tensor& x, const std::vector<at::Tensor>& caches,
                               const std::vector<at::Tensor>& rings, const at::Tensor& pos) const {
  TORCH_CHECK(head_ != nullptr, "DecodeStack.logits: the stack has no head (set_head)");
  at::Tensor h = step(x, caches, rings, pos);
  TORCH_CHECK(h.scalar_type() == head_->norm_weight.scalar_type(), "DecodeStack.logits: the head's norm is ",
              head_->norm_weight.scalar_type(), ", the rows ", h.scalar_type());
  if (head_->divide_max) h = h / at::amax(h, {-1}, /*keepdim=*/true);  // as DALLE._transform
  h = h.contiguous();
  at::Tensor normed = at::empty_like(h);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "decode_logits", [&] {
    with_cpu_isa([&]() DALLE_ENGINE_INLINE_LAMBDA {
      layer_norm_rows(h.const_data_ptr<scalar_t>(), dim_, h.size(0), dim_,
                      head_->norm_weight.const_data_ptr<scalar_t>(), head_->norm_bias.const_data_ptr<scalar_t>(),
                      static_cast<scalar_t>(head_->eps), normed.mutable_data_ptr<scalar_t>());
    });
  });
  return small_linear(normed, head_->weight, head_->bias, head_->scale);
}

}  // namespace dalle_engine
