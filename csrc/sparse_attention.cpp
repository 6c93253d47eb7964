// CPU forward and backward of DALL-E sparse attention.
//
// Work is split into query blocks that share one key set:
//   - text blocks: up to kTextBlock consecutive text queries over the text keys [0, end of block), causal;
//     for the "full" pattern the whole sequence is handled this way;
//   - image blocks: whole grid rows (grid columns for axial_col) of image queries over all text keys plus the
//     "local" image keys their pattern can reach: the own row or column, or for the conv patterns each query's window.
// Scores of a block are GEMMs on strided row views of q and k (a grid column is a matrix with a row stride of
// fmap_size * dim_head), so nothing is gathered. A conv window holds only kernel_size keys of each of its rows, so
// GEMMs over whole window rows would compute mostly masked scores, and GEMMs per window are too small to pay for their
// calls: a conv query's local keys are instead its window's slots, keys at fixed offsets from it, each scored with a
// dot product on the rows of k and v in place. Local keys are masked exactly with a precomputed additive bias built
// from the same predicates as kernels/masks.py (window slots off the grid are masked and never read); text keys need
// no mask (image queries see all of them) or a causal prefix (text queries).
//
// The backward recomputes the scores and, as every query's keys lie in one block, each row's softmax exactly as the
// forward did (so it needs neither out nor lse). Per query block it forms P and dS = P * (dP - rowsum(P * dP)) and
// dQ; dK = scale * dS^T Q and dV = P^T dO sum over the blocks whose keys include theirs. Without atomics and
// deterministically, in one of two schedules:
//   - with at least two (batch, head) pairs per thread, each thread takes whole heads and runs their blocks in order,
//     P and dS of one block at a time in scratch that stays in cache, adding each block's dK and dV terms as it goes
//     (GEMMs for text keys and axial lines, key by key for window slots): 7-20 % faster than the other schedule
//     (bench/RESULTS.md), which writes seq x text_cols buffers per head and reads them back;
//   - otherwise, two phases parallel within a head:
//     1. per query block: P and dS into buffers (text part by query position, local part per block) and dQ;
//     2. per key range: for chunks of text keys one GEMM over every query that can see them, and for each grid line
//        of image keys the blocks whose local keys contain it (conv patterns: key by key, from the queries whose
//        window slots hold it).
//     The buffers hold queries x text keys plus the local parts, never seq x seq (except for "full", which is dense).
// A head's sums follow the schedule, so results can differ by rounding between thread counts, never between runs.
// All arithmetic is float32 (float64 for float64 inputs); bfloat16/float16 inputs are converted up front.

#include "sparse_attention.h"
#include "vector_math.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <climits>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// The BLAS inside libtorch (MKL on x86 wheels) exports the Fortran GEMMs. They are declared weak so the extension still
// loads against a torch that does not export them; gemm() then goes through at::addmm_out (slower: dispatcher calls).
// Defining DALLE_ENGINE_NO_DIRECT_BLAS forces that fallback (to test it).
#if defined(__GNUC__) && defined(__ELF__) && !defined(DALLE_ENGINE_NO_DIRECT_BLAS)
#define DALLE_ENGINE_WEAK_BLAS 1
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}
#endif

namespace dalle_engine {
namespace {

constexpr int64_t kTextBlock = 64;         // text queries per block
constexpr int64_t kMinImageQueries = 32;   // image blocks take whole rows, several when rows are shorter than this
constexpr int64_t kTextChunk = 64;         // text keys per backward dK/dV work item
constexpr int64_t kBufferBudget = int64_t{256} << 20;  // bytes of backward P/dS buffers held at once

// ---------------------------------------------------------------------------------------------------------------
// GEMM on row-major strided matrices.

// C (m x n) = alpha * op(A) * op(B) + beta * C, all row-major with leading dimensions (elements between rows);
// op(A) is m x k, op(B) is k x n. beta == 0 never reads C.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
#ifdef DALLE_ENGINE_WEAK_BLAS
  const bool fits = std::max({m, n, k, lda, ldb, ldc}) <= INT_MAX;
  const bool have_blas = std::is_same_v<T, float> ? sgemm_ != nullptr : dgemm_ != nullptr;
  if (fits && have_blas) {
    // Column-major BLAS sees each row-major matrix transposed, so ask it for C^T = op(B)^T op(A)^T.
    const char op_b = trans_b ? 'T' : 'N', op_a = trans_a ? 'T' : 'N';
    const int rows = static_cast<int>(n), cols = static_cast<int>(m), inner = static_cast<int>(k);
    const int ld_b = static_cast<int>(ldb), ld_a = static_cast<int>(lda), ld_c = static_cast<int>(ldc);
    if constexpr (std::is_same_v<T, float>) {
      sgemm_(&op_b, &op_a, &rows, &cols, &inner, &alpha, b, &ld_b, a, &ld_a, &beta, c, &ld_c);
    } else {
      dgemm_(&op_b, &op_a, &rows, &cols, &inner, &alpha, b, &ld_b, a, &ld_a, &beta, c, &ld_c);
    }
    return;
  }
#endif
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto view = [&](const T* data, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    at::Tensor stored = at::from_blob(const_cast<T*>(data), {trans ? cols : rows, trans ? rows : cols}, {ld, 1},
                                      options);
    return trans ? stored.t() : stored;
  };
  at::Tensor result = at::from_blob(c, {m, n}, {ldc, 1}, options);
  at::addmm_out(result, result, view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b), beta, alpha);
}

// ---------------------------------------------------------------------------------------------------------------
// Row arithmetic, written as plain loops the compiler vectorises.


template <typename T>
DALLE_ENGINE_INLINE T row_max(const T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

template <typename T>
DALLE_ENGINE_INLINE void add_bias(T* x, const float* bias, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] += static_cast<T>(bias[j]);
}

// ds <- p * (ds - delta): the softmax backward, ds holding dP on entry.
template <typename T>
DALLE_ENGINE_INLINE void softmax_grad(const T* p, T* ds, int64_t n, T delta) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) ds[j] = p[j] * (ds[j] - delta);
}

template <typename T>
DALLE_ENGINE_INLINE T dot(const T* a, const T* b, int64_t n) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

template <typename T>
DALLE_ENGINE_INLINE void scale_row(T* x, int64_t n, T factor) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= factor;
}

// y += a * x.
template <typename T>
DALLE_ENGINE_INLINE void axpy(T* y, T a, const T* x, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}

// The window of one conv query (see Plan::window): `rows` points at the query's own row of a seq x dim matrix and slot
// s is the row offsets[s] rows from it. Slots with a nonzero bias are skipped: they may lie off the grid.

// out[s] = factor * x . (row of slot s); 0 for skipped slots, which the bias masks.
template <typename T>
DALLE_ENGINE_INLINE void window_dots(const T* x, const T* rows, const int64_t* offsets, const float* bias,
                                     int64_t slots, int64_t dim, T factor, T* out) {
  for (int64_t s = 0; s < slots; ++s) out[s] = bias[s] == 0 ? factor * dot(x, rows + offsets[s] * dim, dim) : T(0);
}

// acc += factor * sum over slots of weights[s] * (row of slot s).
template <typename T>
DALLE_ENGINE_INLINE void window_sum(const T* weights, const T* rows, const int64_t* offsets, const float* bias,
                                    int64_t slots, int64_t dim, T factor, T* acc) {
  for (int64_t s = 0; s < slots; ++s) {
    if (bias[s] == 0) axpy(acc, factor * weights[s], rows + offsets[s] * dim, dim);
  }
}

// A row of a block's scores: `visible` text scores (the rest of the text part, up to `text_end`, is masked) and `nl`
// local scores masked by the additive `bias` (0 or -inf).

// Forward: the row becomes e^(s - max) (masked entries 0); returns {max, sum}.
template <typename T>
DALLE_ENGINE_INLINE std::pair<T, T> softmax_forward_row(T* text, int64_t visible, int64_t text_end, T* local,
                                                        const float* bias, int64_t nl) {
  if (nl > 0) add_bias(local, bias, nl);
  const T top = std::max(row_max(text, visible), row_max(local, nl));
  const T sum = exp_shifted(text, visible, top) + exp_shifted(local, nl, top);
  std::fill(text + visible, text + text_end, T(0));
  return {top, sum};
}

// Backward: p holds the scores and ds holds dP on entry; they become P and dS = P * (dP - rowsum(P * dP)).
template <typename T>
DALLE_ENGINE_INLINE void softmax_backward_row(T* p, T* ds, int64_t visible, int64_t text_end, T* p_local,
                                              T* ds_local, const float* bias, int64_t nl) {
  const T sum = softmax_forward_row(p, visible, text_end, p_local, bias, nl).second;
  scale_row(p, visible, T(1) / sum);
  scale_row(p_local, nl, T(1) / sum);
  // rowsum(P * dP) is the sum plain autograd forms (rather than rowsum(dout * out)), so its rounding matches the dP
  // it is subtracted from.
  const T delta = dot(p, ds, visible) + dot(p_local, ds_local, nl);
  softmax_grad(p, ds, visible, delta);
  std::fill(ds + visible, ds + text_end, T(0));
  softmax_grad(p_local, ds_local, nl, delta);
}


// The float rows run the build for cpu_isa() (see vector_math.h); double rows need no vector exp.
std::pair<float, float> softmax_forward_row(float* text, int64_t visible, int64_t text_end, float* local,
                                            const float* bias, int64_t nl) {
  std::pair<float, float> result;
  with_cpu_isa([&]() DALLE_ENGINE_INLINE_LAMBDA {
    result = softmax_forward_row<float>(text, visible, text_end, local, bias, nl);
  });
  return result;
}

void softmax_backward_row(float* p, float* ds, int64_t visible, int64_t text_end, float* p_local, float* ds_local,
                          const float* bias, int64_t nl) {
  with_cpu_isa([&]() DALLE_ENGINE_INLINE_LAMBDA {
    softmax_backward_row<float>(p, ds, visible, text_end, p_local, ds_local, bias, nl);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Geometry and the mask predicates of kernels/masks.py.

enum class Pattern { kFull, kAxialRow, kAxialCol, kConvLike, kConvLikeCentered };

Pattern parse_pattern(std::string_view name) {
  if (name == "full") return Pattern::kFull;
  if (name == "axial_row") return Pattern::kAxialRow;
  if (name == "axial_col") return Pattern::kAxialCol;
  if (name == "conv_like") return Pattern::kConvLike;
  if (name == "conv_like_centered") return Pattern::kConvLikeCentered;
  TORCH_CHECK(false, "unknown attention pattern '", name,
              "'; valid patterns: full, axial_row, axial_col, conv_like, conv_like_centered");
}

struct Geometry {
  Pattern pattern;
  int64_t text_len, fmap_size, kernel_size, dilation, seq_len;
};

bool on_lattice(int64_t delta, int64_t lo, int64_t hi, int64_t dilation) {
  return delta >= lo && delta <= hi && delta % dilation == 0;
}

// Whether query position q may attend to key position k (kernels.masks.allowed).
bool allowed(const Geometry& g, int64_t q, int64_t k) {
  if (k > q) return false;
  if (k < g.text_len) return true;
  const int64_t f = g.fmap_size, tq = q - g.text_len, tk = k - g.text_len;
  const int64_t dr = tq / f - tk / f, dc = tq % f - tk % f;
  switch (g.pattern) {
    case Pattern::kFull:
      return tk <= tq;
    case Pattern::kAxialRow:
      return dr == 0 && tk % f <= tq % f;
    case Pattern::kAxialCol:
      return dc == 0 && tk / f <= tq / f;
    case Pattern::kConvLike: {
      const int64_t reach = (g.kernel_size - 1) * g.dilation;
      return on_lattice(dr, 0, reach, g.dilation) && on_lattice(dc, 0, reach, g.dilation);
    }
    case Pattern::kConvLikeCentered: {
      const int64_t reach = (g.kernel_size / 2) * g.dilation;
      return on_lattice(dr, -reach, reach, g.dilation) && on_lattice(dc, -reach, reach, g.dilation) && tk <= tq;
    }
  }
  return false;
}

// ---------------------------------------------------------------------------------------------------------------
// The block plan: depends on the geometry only, shared by every (batch, head).

struct Span {  // sequence positions start, start + stride, ... (count of them)
  int64_t start, stride, count;
};

struct Segment {  // local keys that form one strided matrix, stored from `column` on in the block's local part
  Span keys;
  int64_t column;
};

struct Block {
  Span queries;
  int64_t text_keys = 0;      // keys [0, text_keys) come first in the block's scores
  bool text_causal = false;   // text block: key j is allowed for query i iff j <= i
  int64_t local_keys = 0;     // image keys after the text keys, from `segments` or the window slots
  std::vector<Segment> segments;
  bool window = false;        // conv pattern: each query's local keys are its window slots (Plan::window)
  int64_t bias_offset = 0;    // its (queries, local_keys) additive mask (0 or -inf) in Plan::bias
  int64_t local_offset = 0;   // its (queries, local_keys) matrices in the backward's local buffers
};

struct KeyLine {  // one grid row (grid column for axial_col) of image keys
  Span keys;
  std::vector<std::pair<int64_t, int64_t>> uses;  // (block, column of the line in that block's local keys)
};

struct Plan {
  int64_t text_cols = 0;  // text keys: [0, text_cols); the backward's text buffers are seq x text_cols
  std::vector<Block> blocks;
  std::vector<KeyLine> lines;
  std::vector<int64_t> window;  // conv patterns: offset of each window slot's key from the query's position
  std::vector<float> bias;
  int64_t local_size = 0;
};

Plan make_plan(const Geometry& g) {
  Plan plan;
  const int64_t seq = g.seq_len, text = g.text_len, f = g.fmap_size;
  const bool dense = g.pattern == Pattern::kFull;
  plan.text_cols = dense ? seq : std::min(text, seq);
  for (int64_t i0 = 0; i0 < plan.text_cols; i0 += kTextBlock) {
    const int64_t i1 = std::min(i0 + kTextBlock, plan.text_cols);
    Block block;
    block.queries = {i0, 1, i1 - i0};
    block.text_keys = i1;
    block.text_causal = true;
    plan.blocks.push_back(std::move(block));
  }
  if (dense || seq <= text) return plan;

  const int64_t num_image = seq - text;
  const bool columns = g.pattern == Pattern::kAxialCol;
  if (columns) {
    for (int64_t c = 0; c < std::min(f, num_image); ++c) {
      plan.lines.push_back({{text + c, f, (num_image - c + f - 1) / f}, {}});
    }
  } else {
    for (int64_t r = 0; r * f < num_image; ++r) {
      plan.lines.push_back({{text + r * f, 1, std::min(f, num_image - r * f)}, {}});
    }
  }
  // Conv window slots: rows dr above the query (0 last) by columns dc on the dilation lattice, leaving out those off
  // the grid for every query and, in the query's own row, those after it. So every offset is <= 0.
  std::vector<std::pair<int64_t, int64_t>> slots;  // (dr, dc)
  if (g.pattern == Pattern::kConvLike || g.pattern == Pattern::kConvLikeCentered) {
    const int64_t half = (g.kernel_size / 2) * g.dilation;
    const int64_t reach = g.pattern == Pattern::kConvLike ? (g.kernel_size - 1) * g.dilation : half;
    const int64_t right = g.pattern == Pattern::kConvLike ? 0 : half;
    for (int64_t dr = -reach; dr <= 0; dr += g.dilation) {
      for (int64_t dc = -reach; dc <= right; dc += g.dilation) {
        if (-dr < f && std::abs(dc) < f && (dr < 0 || dc <= 0)) {
          slots.emplace_back(dr, dc);
          plan.window.push_back(dr * f + dc);
        }
      }
    }
  }
  const int64_t num_lines = static_cast<int64_t>(plan.lines.size());
  const int64_t lines_per_block = columns ? 1 : std::max<int64_t>(1, (kMinImageQueries + f - 1) / f);
  const float masked = -std::numeric_limits<float>::infinity();
  for (int64_t first = 0; first < num_lines; first += lines_per_block) {
    const int64_t last = std::min(first + lines_per_block, num_lines) - 1;
    const int64_t index = static_cast<int64_t>(plan.blocks.size());
    Block block;
    const Span& begin = plan.lines[first].keys;
    const Span& end = plan.lines[last].keys;
    block.queries = columns ? begin : Span{begin.start, 1, end.start + end.count - begin.start};
    block.text_keys = text;
    block.window = !slots.empty();
    block.local_keys = static_cast<int64_t>(slots.size());
    for (int64_t line = first; line <= last && !block.window; ++line) {  // axial: the block's own lines
      const Span& keys = plan.lines[line].keys;
      plan.lines[line].uses.emplace_back(index, block.local_keys);
      Segment* prev = block.segments.empty() ? nullptr : &block.segments.back();
      if (prev != nullptr && prev->keys.stride == 1 && keys.stride == 1 &&
          prev->keys.start + prev->keys.count == keys.start) {
        prev->keys.count += keys.count;  // consecutive rows are one contiguous matrix
      } else {
        block.segments.push_back({keys, block.local_keys});
      }
      block.local_keys += keys.count;
    }
    block.bias_offset = static_cast<int64_t>(plan.bias.size());
    for (int64_t i = 0; i < block.queries.count; ++i) {
      const int64_t q = block.queries.start + i * block.queries.stride;
      const int64_t row = (q - text) / f, col = (q - text) % f;
      for (const auto& [dr, dc] : slots) {
        const bool on_grid = row + dr >= 0 && col + dc >= 0 && col + dc < f;
        plan.bias.push_back(on_grid && allowed(g, q, q + dr * f + dc) ? 0.0f : masked);
      }
      for (const Segment& seg : block.segments) {
        for (int64_t j = 0; j < seg.keys.count; ++j) {
          plan.bias.push_back(allowed(g, q, seg.keys.start + j * seg.keys.stride) ? 0.0f : masked);
        }
      }
    }
    block.local_offset = plan.local_size;
    plan.local_size += block.queries.count * block.local_keys;
    plan.blocks.push_back(std::move(block));
  }
  return plan;
}

// Plans depend on the geometry only and a training step asks for the same few again and again (one per pattern, for
// forward and backward), so the last few are kept.
std::shared_ptr<const Plan> cached_plan(const Geometry& g) {
  using Key = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t>;
  constexpr size_t kCapacity = 16;
  static std::mutex mutex;
  static std::map<Key, std::shared_ptr<const Plan>> cache;
  const Key key{static_cast<int>(g.pattern), g.text_len, g.fmap_size, g.kernel_size, g.dilation, g.seq_len};
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  if (cache.size() >= kCapacity) cache.clear();
  auto plan = std::make_shared<const Plan>(make_plan(g));
  cache.emplace(key, plan);
  return plan;
}

// ---------------------------------------------------------------------------------------------------------------
// Parallel driver: items are claimed one at a time from a shared counter (dynamic scheduling: blocks differ in
// cost), each worker owning its scratch space.

template <typename Scratch, typename Fn>
void parallel_items(int64_t count, const Fn& fn) {
  if (count <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), count);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch scratch;
    for (int64_t item = next++; item < count; item = next++) fn(item, scratch);
  });
}

// Uninitialised storage aligned to a cache line: every element is written before it is read, and a fixed alignment
// keeps BLAS results reproducible from run to run (its code path can depend on alignment).
template <typename T>
class Buffer {
 public:
  T* data() { return data_.get(); }
  T* resize(int64_t size) {
    if (size > capacity_) {
      data_.reset(static_cast<T*>(::operator new[](size * sizeof(T), std::align_val_t{64})));
      capacity_ = size;
    }
    return data_.get();
  }

 private:
  struct Free {
    void operator()(T* p) const { ::operator delete[](p, std::align_val_t{64}); }
  };
  std::unique_ptr<T, Free> data_;
  int64_t capacity_ = 0;
};

template <typename T>
struct Scratch {
  Buffer<T> scores;
  Buffer<T> row_scale;
};

// One (batch, head): pointers to its seq x dim matrices.
template <typename T>
struct Head {
  const T* q;
  const T* k;
  const T* v;
  const T* dout;
};

// Number of text keys query row i of the block may see.
inline int64_t visible_text(const Block& block, int64_t position) {
  return block.text_causal ? std::min(block.text_keys, position + 1) : block.text_keys;
}

template <typename T>
void forward_block(const Plan& plan, const Block& block, const Head<T>& h, T* out, T* lse, int64_t dim, T scale,
                   Scratch<T>& scratch) {
  const int64_t nq = block.queries.count, nt = block.text_keys, nl = block.local_keys, cols = nt + nl;
  const int64_t ld = block.queries.stride * dim;
  const T* q = h.q + block.queries.start * dim;
  T* scores = scratch.scores.resize(nq * cols);
  T* row_scale = scratch.row_scale.resize(nq);
  gemm<T>(false, true, nq, nt, dim, scale, q, ld, h.k, dim, 0, scores, cols);
  for (const Segment& seg : block.segments) {
    gemm<T>(false, true, nq, seg.keys.count, dim, scale, q, ld, h.k + seg.keys.start * dim, seg.keys.stride * dim,
            0, scores + nt + seg.column, cols);
  }
  const float* bias = plan.bias.data() + block.bias_offset;
  if (block.window) {  // window blocks are whole grid rows: query i is at position queries.start + i
    with_cpu_isa([&]() DALLE_ENGINE_INLINE_LAMBDA {
      for (int64_t i = 0; i < nq; ++i) {
        window_dots(q + i * dim, h.k + (block.queries.start + i) * dim, plan.window.data(), bias + i * nl, nl, dim,
                    scale, scores + i * cols + nt);
      }
    });
  }
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t position = block.queries.start + i * block.queries.stride;
    const int64_t visible = visible_text(block, position);
    T* text = scores + i * cols;
    const auto [top, sum] = softmax_forward_row(text, visible, nt, text + nt, bias + i * nl, nl);
    lse[position] = top + std::log(sum);
    row_scale[i] = T(1) / sum;
  }
  T* o = out + block.queries.start * dim;
  gemm<T>(false, false, nq, dim, nt, 1, scores, cols, h.v, dim, 0, o, ld);
  for (const Segment& seg : block.segments) {
    gemm<T>(false, false, nq, dim, seg.keys.count, 1, scores + nt + seg.column, cols, h.v + seg.keys.start * dim,
            seg.keys.stride * dim, 1, o, ld);
  }
  if (block.window) {
    with_cpu_isa([&]() DALLE_ENGINE_INLINE_LAMBDA {
      for (int64_t i = 0; i < nq; ++i) {
        window_sum(scores + i * cols + nt, h.v + (block.queries.start + i) * dim, plan.window.data(), bias + i * nl,
                   nl, dim, T(1), o + i * dim);
      }
    });
  }
  for (int64_t i = 0; i < nq; ++i) scale_row(o + i * ld, dim, row_scale[i]);
}

// Backward buffers of one (batch, head): P and dS for queries x text keys (rows by query position) and for each
// block's local keys.
template <typename T>
struct Buffers {
  T* text_p;
  T* text_ds;
  T* local_p;
  T* local_ds;
};

// Where a block's P and dS go: text parts (row i at i * ld_text, text_cols wide) and local parts (queries x local keys).
template <typename T>
struct BlockBuffers {
  T* text_p;
  T* text_ds;
  int64_t ld_text;
  T* local_p;
  T* local_ds;
};

// The block's part of the head's buffers (rows by query position).
template <typename T>
BlockBuffers<T> in_buffers(const Plan& plan, const Block& block, const Buffers<T>& buf) {
  const int64_t first = block.queries.start * plan.text_cols;
  return {buf.text_p + first, buf.text_ds + first, block.queries.stride * plan.text_cols,
          buf.local_p + block.local_offset, buf.local_ds + block.local_offset};
}

// Phase 1: P and dS of the block into `out`, and dQ of its queries.
template <typename T>
void backward_block(const Plan& plan, const Block& block, const Head<T>& h, const BlockBuffers<T>& out, T* dq,
                    int64_t dim, T scale) {
  const int64_t nq = block.queries.count, nt = block.text_keys, nl = block.local_keys, tc = plan.text_cols;
  const int64_t ld = block.queries.stride * dim, ld_text = out.ld_text;
  const T* q = h.q + block.queries.start * dim;
  const T* dout = h.dout + block.queries.start * dim;
  T* text_p = out.text_p;
  T* text_ds = out.text_ds;
  T* local_p = out.local_p;
  T* local_ds = out.local_ds;
  gemm<T>(false, true, nq, nt, dim, scale, q, ld, h.k, dim, 0, text_p, ld_text);
  gemm<T>(false, true, nq, nt, dim, 1, dout, ld, h.v, dim, 0, text_ds, ld_text);
  for (const Segment& seg : block.segments) {
    const int64_t offset = seg.keys.start * dim, ld_key = seg.keys.stride * dim;
    gemm<T>(false, true, nq, seg.keys.count, dim, scale, q, ld, h.k + offset, ld_key, 0, local_p + seg.column, nl);
    gemm<T>(false, true, nq, seg.keys.count, dim, 1, dout, ld, h.v + offset, ld_key, 0, local_ds + seg.column, nl);
  }
  const float* bias = plan.bias.data() + block.bias_offset;
  if (block.window) {  // whole grid rows, as in the forward
    with_cpu_isa([&]() DALLE_ENGINE_INLINE_LAMBDA {
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t at = (block.queries.start + i) * dim;
        window_dots(q + i * dim, h.k + at, plan.window.data(), bias + i * nl, nl, dim, scale, local_p + i * nl);
        window_dots(dout + i * dim, h.v + at, plan.window.data(), bias + i * nl, nl, dim, T(1), local_ds + i * nl);
      }
    });
  }
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t position = block.queries.start + i * block.queries.stride;
    const int64_t visible = visible_text(block, position);
    T* p = text_p + i * ld_text;
    T* ds = text_ds + i * ld_text;
    // Every key of the row is in this block, so its softmax is recomputed as the forward did it (max, sum) rather
    // than as e^(s - lse): lse rounded to float would cost P up to ulp(lse) of relative error.
    softmax_backward_row(p, ds, visible, tc, local_p + i * nl, local_ds + i * nl, bias + i * nl, nl);
  }
  T* dq_block = dq + block.queries.start * dim;
  gemm<T>(false, false, nq, dim, nt, scale, text_ds, ld_text, h.k, dim, 0, dq_block, ld);
  for (const Segment& seg : block.segments) {
    gemm<T>(false, false, nq, dim, seg.keys.count, scale, local_ds + seg.column, nl, h.k + seg.keys.start * dim,
            seg.keys.stride * dim, 1, dq_block, ld);
  }
  if (block.window) {
    with_cpu_isa([&]() DALLE_ENGINE_INLINE_LAMBDA {
      for (int64_t i = 0; i < nq; ++i) {
        window_sum(local_ds + i * nl, h.k + (block.queries.start + i) * dim, plan.window.data(), bias + i * nl, nl,
                   dim, scale, dq_block + i * dim);
      }
    });
  }
}

// Phase 2, text keys [first, first + kTextChunk): every query at or after `first` may see them.
template <typename T>
void backward_text_keys(const Plan& plan, int64_t first, int64_t seq, const Head<T>& h, const Buffers<T>& buf,
                        T* dk, T* dv, int64_t dim, T scale) {
  const int64_t tc = plan.text_cols, count = std::min(kTextChunk, tc - first), rows = seq - first;
  const int64_t offset = first * tc + first;
  gemm<T>(true, false, count, dim, rows, scale, buf.text_ds + offset, tc, h.q + first * dim, dim, 0,
          dk + first * dim, dim);
  gemm<T>(true, false, count, dim, rows, 1, buf.text_p + offset, tc, h.dout + first * dim, dim, 0, dv + first * dim,
          dim);
}

// Phase 2, one grid line of image keys: summed over the blocks whose local keys contain it.
template <typename T>
void backward_line_keys(const Plan& plan, const KeyLine& line, const Head<T>& h, const Buffers<T>& buf, T* dk,
                        T* dv, int64_t dim, T scale) {
  const int64_t ld_key = line.keys.stride * dim;
  T* dk_line = dk + line.keys.start * dim;
  T* dv_line = dv + line.keys.start * dim;
  T beta = 0;
  for (const auto& [index, column] : line.uses) {
    const Block& block = plan.blocks[index];
    const int64_t nq = block.queries.count, nl = block.local_keys, ld = block.queries.stride * dim;
    const int64_t offset = block.local_offset + column;
    gemm<T>(true, false, line.keys.count, dim, nq, scale, buf.local_ds + offset, nl,
            h.q + block.queries.start * dim, ld, beta, dk_line, ld_key);
    gemm<T>(true, false, line.keys.count, dim, nq, 1, buf.local_p + offset, nl, h.dout + block.queries.start * dim,
            ld, beta, dv_line, ld_key);
    beta = 1;
  }
}

// Phase 2, one grid row of image keys of a conv pattern: key j is in slot s of query j - window[s] (a later one). As
// window blocks cover the image queries in order, that query's bias and P and dS of slot s are at
// (query - text_cols) * slots + s (text_cols = text_len here).
template <typename T>
void backward_window_keys(const Plan& plan, const KeyLine& line, int64_t seq, const Head<T>& h, const Buffers<T>& buf,
                          T* dk, T* dv, int64_t dim, T scale) {
  const int64_t slots = static_cast<int64_t>(plan.window.size());
  with_cpu_isa([&]() DALLE_ENGINE_INLINE_LAMBDA {
    for (int64_t key = line.keys.start; key < line.keys.start + line.keys.count; ++key) {
      T* dk_key = dk + key * dim;
      T* dv_key = dv + key * dim;
      std::fill_n(dk_key, dim, T(0));
      std::fill_n(dv_key, dim, T(0));
      for (int64_t s = 0; s < slots; ++s) {
        const int64_t query = key - plan.window[s];
        const int64_t at = (query - plan.text_cols) * slots + s;
        if (query >= seq || plan.bias[at] != 0) continue;
        axpy(dk_key, scale * buf.local_ds[at], h.q + query * dim, dim);
        axpy(dv_key, buf.local_p[at], h.dout + query * dim, dim);
      }
    }
  });
}

// A thread's space for one block's P and dS while it runs whole heads.
template <typename T>
struct HeadScratch {
  Buffer<T> text_p, text_ds, local_p, local_ds;
};

// A whole head, block after block in one thread, each block's P and dS in scratch that stays in cache: its queries'
// contributions to dK and dV are added as the block is done (text keys and axial lines by GEMMs, window slots key by
// key), in block order, so the sums are deterministic.
template <typename T>
void backward_head(const Plan& plan, int64_t seq, const Head<T>& h, T* dq, T* dk, T* dv, int64_t dim, T scale,
                   HeadScratch<T>& scratch) {
  std::fill_n(dk, seq * dim, T(0));
  std::fill_n(dv, seq * dim, T(0));
  const int64_t tc = plan.text_cols, slots = static_cast<int64_t>(plan.window.size());
  for (const Block& block : plan.blocks) {
    const int64_t nq = block.queries.count, nt = block.text_keys, nl = block.local_keys;
    const BlockBuffers<T> out{scratch.text_p.resize(nq * tc), scratch.text_ds.resize(nq * tc), tc,
                              scratch.local_p.resize(std::max<int64_t>(1, nq * nl)),
                              scratch.local_ds.resize(std::max<int64_t>(1, nq * nl))};
    backward_block(plan, block, h, out, dq, dim, scale);
    const int64_t ld = block.queries.stride * dim;
    const T* q = h.q + block.queries.start * dim;
    const T* dout = h.dout + block.queries.start * dim;
    gemm<T>(true, false, nt, dim, nq, scale, out.text_ds, tc, q, ld, 1, dk, dim);
    gemm<T>(true, false, nt, dim, nq, 1, out.text_p, tc, dout, ld, 1, dv, dim);
    for (const Segment& seg : block.segments) {
      const int64_t offset = seg.keys.start * dim, ld_key = seg.keys.stride * dim;
      gemm<T>(true, false, seg.keys.count, dim, nq, scale, out.local_ds + seg.column, nl, q, ld, 1, dk + offset,
              ld_key);
      gemm<T>(true, false, seg.keys.count, dim, nq, 1, out.local_p + seg.column, nl, dout, ld, 1, dv + offset,
              ld_key);
    }
    if (block.window) {
      const float* bias = plan.bias.data() + block.bias_offset;
      with_cpu_isa([&]() DALLE_ENGINE_INLINE_LAMBDA {
        for (int64_t i = 0; i < nq; ++i) {
          const int64_t query = block.queries.start + i;
          for (int64_t s = 0; s < slots; ++s) {
            if (bias[i * nl + s] != 0) continue;
            const int64_t key = query + plan.window[s];
            axpy(dk + key * dim, scale * out.local_ds[i * nl + s], q + i * dim, dim);
            axpy(dv + key * dim, out.local_p[i * nl + s], dout + i * dim, dim);
          }
        }
      });
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Entry points.

at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

Geometry check_arguments(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, std::string_view pattern,
                         int64_t text_len, int64_t fmap_size, int64_t kernel_size, int64_t dilation) {
  TORCH_CHECK(q.dim() == 4, "q, k, v must be (batch, heads, seq, dim_head), got q of shape ", q.sizes());
  TORCH_CHECK(q.sizes() == k.sizes() && q.sizes() == v.sizes(), "q, k, v shapes differ: ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "q, k, v must be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "dalle_engine_cpu kernels need CPU tensors, got ", q.device());
  TORCH_CHECK(text_len >= 1 && fmap_size >= 1 && kernel_size >= 1 && dilation >= 1,
              "text_len, fmap_size, kernel_size and dilation must be >= 1, got ", text_len, ", ", fmap_size, ", ",
              kernel_size, ", ", dilation);
  const int64_t seq = q.size(2);
  const int64_t max_len = text_len + fmap_size * fmap_size;
  TORCH_CHECK(seq >= 1 && seq <= max_len, "seq_len must be in 1..", max_len, " (text_len ", text_len, " + fmap_size ",
              fmap_size, "**2), got ", seq);
  TORCH_CHECK(q.size(3) >= 1, "dim_head must be >= 1");
  return {parse_pattern(pattern), text_len, fmap_size, kernel_size, dilation, seq};
}

template <typename T>
void run_forward(const Plan& plan, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                 at::Tensor& lse, T scale) {
  const int64_t heads = q.size(0) * q.size(1), seq = q.size(2), dim = q.size(3);
  const int64_t num_blocks = static_cast<int64_t>(plan.blocks.size());
  const T* q_data = q.data_ptr<T>();
  const T* k_data = k.data_ptr<T>();
  const T* v_data = v.data_ptr<T>();
  T* out_data = out.data_ptr<T>();
  T* lse_data = lse.data_ptr<T>();
  parallel_items<Scratch<T>>(heads * num_blocks, [&](int64_t item, Scratch<T>& scratch) {
    const int64_t head = item / num_blocks, offset = head * seq * dim;
    const Head<T> h{q_data + offset, k_data + offset, v_data + offset, nullptr};
    forward_block(plan, plan.blocks[item % num_blocks], h, out_data + offset, lse_data + head * seq, dim, scale,
                  scratch);
  });
}

template <typename T>
void run_backward(const Plan& plan, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& dout, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, T scale) {
  const int64_t heads = q.size(0) * q.size(1), seq = q.size(2), dim = q.size(3);
  const int64_t num_blocks = static_cast<int64_t>(plan.blocks.size());
  const auto head_view = [&](int64_t head) {
    const int64_t offset = head * seq * dim;
    return Head<T>{q.data_ptr<T>() + offset, k.data_ptr<T>() + offset, v.data_ptr<T>() + offset,
                   dout.data_ptr<T>() + offset};
  };
  const int64_t threads = at::get_num_threads();
  if (heads >= 2 * threads) {  // enough heads to share out: each thread takes whole heads
    parallel_items<HeadScratch<T>>(heads, [&](int64_t head, HeadScratch<T>& scratch) {
      const int64_t offset = head * seq * dim;
      backward_head(plan, seq, head_view(head), dq.data_ptr<T>() + offset, dk.data_ptr<T>() + offset,
                    dv.data_ptr<T>() + offset, dim, scale, scratch);
    });
    return;
  }

  const int64_t text_chunks = (plan.text_cols + kTextChunk - 1) / kTextChunk;
  const int64_t key_items = text_chunks + static_cast<int64_t>(plan.lines.size());
  const int64_t text_size = seq * plan.text_cols, per_head = 2 * (text_size + plan.local_size);
  // Heads per group: enough blocks to keep every thread busy, within the buffer budget.
  int64_t group = std::min(heads, std::max<int64_t>(1, (4 * threads + num_blocks - 1) / num_blocks));
  group = std::max<int64_t>(1, std::min<int64_t>(group, kBufferBudget / (per_head * int64_t{sizeof(T)})));
  Buffer<T> storage;
  storage.resize(group * per_head);

  const auto buffers = [&](int64_t slot) {
    T* base = storage.data() + slot * per_head;
    return Buffers<T>{base, base + text_size, base + 2 * text_size, base + 2 * text_size + plan.local_size};
  };
  for (int64_t first = 0; first < heads; first += group) {
    const int64_t count = std::min(group, heads - first);
    parallel_items<int>(count * num_blocks, [&](int64_t item, int&) {
      const int64_t slot = item / num_blocks, head = first + slot;
      const Block& block = plan.blocks[item % num_blocks];
      backward_block(plan, block, head_view(head), in_buffers(plan, block, buffers(slot)),
                     dq.data_ptr<T>() + head * seq * dim, dim, scale);
    });
    parallel_items<int>(count * key_items, [&](int64_t item, int&) {
      const int64_t slot = item / key_items, head = first + slot, key_item = item % key_items;
      T* dk_head = dk.data_ptr<T>() + head * seq * dim;
      T* dv_head = dv.data_ptr<T>() + head * seq * dim;
      if (key_item < text_chunks) {
        backward_text_keys(plan, key_item * kTextChunk, seq, head_view(head), buffers(slot), dk_head, dv_head, dim,
                           scale);
      } else {
        const KeyLine& line = plan.lines[key_item - text_chunks];
        if (plan.window.empty()) {
          backward_line_keys(plan, line, head_view(head), buffers(slot), dk_head, dv_head, dim, scale);
        } else {
          backward_window_keys(plan, line, seq, head_view(head), buffers(slot), dk_head, dv_head, dim, scale);
        }
      }
    });
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sparse_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, std::string_view pattern, int64_t text_len,
    int64_t fmap_size, int64_t kernel_size, int64_t dilation, double scale) {
  const Geometry geometry = check_arguments(q, k, v, pattern, text_len, fmap_size, kernel_size, dilation);
  const auto compute = compute_type(q);
  const at::Tensor qc = q.to(compute).contiguous(), kc = k.to(compute).contiguous(), vc = v.to(compute).contiguous();
  at::Tensor out = at::empty(q.sizes(), qc.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, qc.options());
  if (q.numel() > 0) {
    const auto plan = cached_plan(geometry);
    if (compute == at::kDouble) {
      run_forward<double>(*plan, qc, kc, vc, out, lse, scale);
    } else {
      run_forward<float>(*plan, qc, kc, vc, out, lse, static_cast<float>(scale));
    }
  }
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_bwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& dout, std::string_view pattern, int64_t text_len, int64_t fmap_size, int64_t kernel_size,
    int64_t dilation, double scale) {
  const Geometry geometry = check_arguments(q, k, v, pattern, text_len, fmap_size, kernel_size, dilation);
  TORCH_CHECK(out.sizes() == q.sizes() && dout.sizes() == q.sizes(), "out and dout must have q's shape ", q.sizes(),
              ", got ", out.sizes(), " and ", dout.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.sizes() == q.sizes().slice(0, 3), "lse must be (batch, heads, seq), got ",
              lse.sizes());
  TORCH_CHECK(out.device().is_cpu() && lse.device().is_cpu() && dout.device().is_cpu(),
              "dalle_engine_cpu kernels need CPU tensors");
  const auto compute = compute_type(q);
  const auto to_compute = [&](const at::Tensor& t) { return t.to(compute).contiguous(); };
  const at::Tensor qc = to_compute(q), kc = to_compute(k), vc = to_compute(v);
  const at::Tensor dc = to_compute(dout);
  at::Tensor dq = at::empty(q.sizes(), qc.options());
  at::Tensor dk = at::empty(q.sizes(), qc.options());
  at::Tensor dv = at::empty(q.sizes(), qc.options());
  if (q.numel() > 0) {
    const auto plan = cached_plan(geometry);
    if (compute == at::kDouble) {
      run_backward<double>(*plan, qc, kc, vc, dc, dq, dk, dv, scale);
    } else {
      run_backward<float>(*plan, qc, kc, vc, dc, dq, dk, dv, static_cast<float>(scale));
    }
  }
  const auto dtype = q.scalar_type();
  return {dq.to(dtype), dk.to(dtype), dv.to(dtype)};
}

}  // namespace dalle_engine
