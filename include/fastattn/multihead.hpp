// Batched multi-head driver: any attention policy over (batch, length, heads, dim) buffers.
#pragma once

#include <algorithm>
#include <exception>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "attention.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace fastattn {

/// A (batch, length, heads, dim) tensor in any strided layout: token t of sample b, head h,
/// feature e is at data[b * batch_stride + t * token_stride + h * head_stride + e].
/// The strides default to a packed (B, L, H, E) buffer, the layout a model's projections produce:
/// head_stride = dim, token_stride = heads * head_stride, batch_stride = the larger of
/// length * token_stride (token-major layouts, fused projections included) and
/// heads * head_stride (head-major layouts). A
/// larger `token_stride` views one slice of a fused projection (e.g. the Q part of a
/// (B, L, 3 * H * E) QKV buffer, with data offset to it); `head_stride = length * dim` with
/// `token_stride = dim` views a (B, H, L, E) buffer, such as (H, L, E) arrays with B = 1.
/// multihead_attention throws fastattn::invalid_argument (naming the tensor) unless batch,
/// length, dim >= 0, heads >= 1, every stride >= 0, data is not null when the tensor has an
/// element, and every offset addressed fits in an index; for `out`, also unless its elements are
/// distinct (no two heads or tokens overlap).
template <class T>
struct tensor_view {
  T* data = nullptr;       ///< element (0, 0, 0, 0); may be null when the tensor has no element
  index batch = 0;         ///< samples B, >= 0
  index length = 0;        ///< tokens per sample (L or S), >= 0
  index heads = 0;         ///< heads H, >= 1
  index dim = 0;           ///< features per head (E or M), >= 0
  index token_stride = 0;  ///< 0 means heads * head_stride
  index batch_stride = 0;  ///< 0 means one sample's span (see above)
  index head_stride = 0;   ///< 0 means dim

  /// The head stride in effect (head_stride, or dim when it is 0).
  index head_step() const noexcept { return head_stride ? head_stride : dim; }
  /// The token stride in effect (token_stride, or heads * head_step() when it is 0).
  index row_stride() const noexcept { return token_stride ? token_stride : heads * head_step(); }
  /// The batch stride in effect (batch_stride, or the default above when it is 0).
  index sample_stride() const noexcept {
    return batch_stride ? batch_stride : std::max(length * row_stride(), heads * head_step());
  }
  /// Where head (b, h) starts, for 0 <= b < batch and 0 <= h < heads (not checked). An empty
  /// tensor (length or dim 0) may have null data, and its heads are never read, so it gets
  /// `data` itself: no offset from a null pointer.
  T* head(index b, index h) const noexcept {
    if (length == 0 || dim == 0) return data;
    return data + b * sample_stride() + h * head_step();
  }
};

/// Options of a multi-head call: the common options plus per-sample lengths and the thread count.
struct multihead_options {
  /// scale and causal apply to every head; key_length / query_length apply to every sample
  /// unless the per-sample spans below are given.
  options common{};
  std::span<const index> query_lengths{};  ///< empty, or one length in [0, L] per sample
  std::span<const index> key_lengths{};    ///< empty, or one length in [0, S] per sample
  /// OpenMP threads, in [0, max_threads]; 0 = OpenMP's default. Ignored without OpenMP.
  int threads = 0;
  static constexpr int max_threads = 1024;  ///< the largest `threads` accepted
};

namespace detail {

/// Checks a tensor's extents and strides: every offset it addresses must fit in an index (no
/// product of extents and strides may overflow), its data must not be null when it is non-empty,
/// and, for an output (`writable`), no two of its elements may be the same memory.
template <class T>
void check_tensor(const char* name, const tensor_view<T>& t, bool writable) {
  if (t.batch < 0 || t.length < 0 || t.heads < 1 || t.dim < 0)
    fail(name, name, " must have batch >= 0, length >= 0, heads >= 1, dim >= 0; got (", t.batch,
         ", ", t.length, ", ", t.heads, ", ", t.dim, ")");
  if (t.token_stride < 0 || t.batch_stride < 0 || t.head_stride < 0)
    fail(name, name, " strides must be >= 0 (0 = packed), got token_stride ", t.token_stride,
         ", batch_stride ", t.batch_stride, ", head_stride ", t.head_stride);
  const auto elements = checked_product(t.batch, t.length, t.heads, t.dim);
  if (!elements)
    fail(name, name, " has (", t.batch, ", ", t.length, ", ", t.heads, ", ", t.dim,
         ") elements: more than an index can count");
  if (*elements == 0) return;
  if (t.data == nullptr) fail(name, name, ".data is null for a non-empty tensor");
  // The largest offset addressed, with checked arithmetic (the default strides are sums and
  // products of the extents, so they are checked too).
  auto overflow = [&] {
    fail(name, name, "'s extents and strides address more elements than an index can count");
  };
  const auto packed_row = checked_mul(t.heads, t.head_step());
  if (!packed_row) overflow();
  const index ts = t.token_stride ? t.token_stride : *packed_row;
  const auto heads_span = checked_mul(t.heads - 1, t.head_step());
  const auto rows_span = checked_mul(t.length - 1, ts);
  const auto packed_sample = checked_mul(t.length, ts);
  index sample_span = 0;  // one sample's extent
  if (!heads_span || !rows_span || !packed_sample ||
      __builtin_add_overflow(*heads_span, *rows_span, &sample_span) ||
      __builtin_add_overflow(sample_span, t.dim, &sample_span))
    overflow();
  const index bs = t.batch_stride ? t.batch_stride : std::max(*packed_sample, *packed_row);
  const auto samples_span = checked_mul(t.batch - 1, bs);
  index last = 0;
  if (!samples_span || __builtin_add_overflow(*samples_span, sample_span, &last)) overflow();
  if (!writable) return;
  // An output must not write one element twice: with its (stride, extent) pairs sorted by
  // stride, each stride must clear the span of the ones below it (a nested layout).
  struct axis {
    index stride, extent;
  };
  axis axes[] = {
      {t.head_step(), t.heads}, {t.row_stride(), t.length}, {t.sample_stride(), t.batch}};
  std::sort(std::begin(axes), std::end(axes),
            [](const axis& a, const axis& b) { return a.stride < b.stride; });
  index span = t.dim;
  for (const axis& a : axes) {
    if (a.extent <= 1) continue;
    if (a.stride < span)
      fail(name, name, "'s strides make heads or tokens overlap (token_stride ", t.row_stride(),
           ", head_stride ", t.head_step(), ", batch_stride ", t.sample_stride(), ", dim ", t.dim,
           "): an output's elements must be distinct");
    span = a.stride * a.extent;  // no overflow: bounded by the offset checked above
  }
}

template <class T>
auto head_map(const tensor_view<T>& t, index b, index h) {
  using plain = matrix<std::remove_const_t<T>>;
  using map_type =
      std::conditional_t<std::is_const_v<T>, Eigen::Map<const plain, 0, Eigen::OuterStride<>>,
                         Eigen::Map<plain, 0, Eigen::OuterStride<>>>;
  return map_type(t.head(b, h), t.length, t.dim, Eigen::OuterStride<>(t.row_stride()));
}

/// Throws when an element of `out` is also an element of `in` (exact per head; when the heads
/// are too many to compare pairwise, whether the two tensors' address ranges intersect).
template <class T>
void check_tensor_no_alias(const char* name, const tensor_view<const T>& in,
                           const tensor_view<T>& out) {
  auto range = [](const auto& t) {
    const auto* first = reinterpret_cast<const char*>(t.data);
    const index last = (t.batch - 1) * t.sample_stride() + (t.length - 1) * t.row_stride() +
                       (t.heads - 1) * t.head_step() + t.dim;
    return std::pair{first, first + last * static_cast<index>(sizeof(T))};
  };
  if (in.batch * in.length * in.heads * in.dim == 0 ||
      out.batch * out.length * out.heads * out.dim == 0)
    return;
  const auto [in_begin, in_end] = range(in);
  const auto [out_begin, out_end] = range(out);
  if (in_end <= out_begin || out_end <= in_begin) return;
  const index in_heads = in.batch * in.heads, out_heads = out.batch * out.heads;
  bool overlap = in_heads * out_heads > (index{1} << 22);
  for (index i = 0; !overlap && i < in_heads; ++i)
    for (index o = 0; !overlap && o < out_heads; ++o)
      overlap = blocks_overlap<T>(in.head(i / in.heads, i % in.heads), in.length, in.dim,
                                  in.row_stride(), out.head(o / out.heads, o % out.heads),
                                  out.length, out.dim, out.row_stride());
  if (overlap)
    fail("out", "out shares memory with ", name,
         "; attention cannot run in place: write the output to a separate buffer");
}

}  // namespace detail

/// Runs `policy` on every (sample, head) pair of q (B, L, H, E), k (B, S, Hkv, E),
/// v (B, S, Hkv, M) and writes out (B, L, H, M), in parallel over B x H with OpenMP when it is
/// enabled. Hkv divides H: query head h attends with key/value head h / (H / Hkv) (grouped-query
/// attention; Hkv = 1 is multi-query attention, Hkv = H the usual case). No input is copied:
/// each head is a strided view into the caller's buffer. Each (b, h) draws its random
/// numbers from (policy seed, stream = b * H + h), so the output does not depend on the thread
/// count or schedule.
/// Everything is checked before any work starts, on the calling thread: shapes, strides (no
/// offset may overflow, out's elements must be distinct), lengths, the policy's knobs, `threads`,
/// out sharing memory with an input, and (with common.check_finite) the values of every head.
/// Throws fastattn::invalid_argument on a violation, as `attention` does for one head, plus:
/// tensor extents or strides out of range (see tensor_view), batch sizes that differ, heads that
/// do not match (out's = q's, v's = k's, k's dividing q's), k and v lengths that differ, per-sample
/// spans of the wrong size, `threads` out of range. An error about one sample's lengths or options
/// carries `sample()`, about one head's values `sample()` and `head()` (the sample is omitted when
/// B = 1); shape errors carry neither. A policy that cannot run B * H heads (guarded's `report`
/// shorter than B * H) is refused before any work, naming its argument (see validate_streams).
/// With B = 0 the per-sample checks (q and k dims, scale, lengths, causal) do not run.
template <attention_policy Policy, class T>
void multihead_attention(const Policy& policy, tensor_view<const T> q, tensor_view<const T> k,
                         tensor_view<const T> v, tensor_view<T> out,
                         const multihead_options& opt = {}) {
  multihead_attention(policy, q, k, v, out, opt, std::span<T>{});
}

/// As above, and writes each row's log-sum-exp (see `attention`) into `lse`, B x H x L entries in
/// that order (head (b, h)'s L entries at (b H + h) L); empty: not asked. Throws as above, and,
/// when lse is not empty, if the policy does not `provides_lse`, lse.size() != B H L, or M = 0.
template <attention_policy Policy, class T>
void multihead_attention(const Policy& policy, tensor_view<const T> q, tensor_view<const T> k,
                         tensor_view<const T> v, tensor_view<T> out, const multihead_options& opt,
                         std::span<T> lse) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "fastattn: kernels are defined for float and double");
  validate(policy);
  detail::check_tensor("q", q, false);
  detail::check_tensor("k", k, false);
  detail::check_tensor("v", v, false);
  detail::check_tensor("out", out, true);
  if (k.batch != q.batch || v.batch != q.batch || out.batch != q.batch)
    detail::fail("batch", "q, k, v and out must have the same batch size: q ", q.batch, ", k ",
                 k.batch, ", v ", v.batch, ", out ", out.batch);
  if (out.heads != q.heads || v.heads != k.heads || q.heads % k.heads != 0)
    detail::fail("heads",
                 "out must have q's heads, v k's heads, and k's heads must divide q's (grouped-"
                 "query attention): q ",
                 q.heads, ", k ", k.heads, ", v ", v.heads, ", out ", out.heads);
  validate_streams(policy, q.batch * q.heads);
  if (k.length != v.length)
    detail::fail("v", "k and v must have the same length (S): k ", k.length, ", v ", v.length);
  if (out.length != q.length || out.dim != v.dim)
    detail::fail("out", "out must be (B, L, H, M) = (", q.batch, ", ", q.length, ", ", q.heads,
                 ", ", v.dim, "), got (", out.batch, ", ", out.length, ", ", out.heads, ", ",
                 out.dim, ")");
  const auto B = static_cast<std::size_t>(q.batch);
  if (!opt.query_lengths.empty() && opt.query_lengths.size() != B)
    detail::fail("query_lengths", "query_lengths must be empty or have one entry per sample (",
                 q.batch, "), got ", opt.query_lengths.size());
  if (!opt.key_lengths.empty() && opt.key_lengths.size() != B)
    detail::fail("key_lengths", "key_lengths must be empty or have one entry per sample (", q.batch,
                 "), got ", opt.key_lengths.size());
  if (opt.threads < 0 || opt.threads > multihead_options::max_threads)
    detail::fail("threads", "threads must be in [0, ", multihead_options::max_threads, "], got ",
                 opt.threads);
  if (!lse.empty()) {
    if constexpr (!provides_lse<Policy>)
      detail::fail("lse", "the '", Policy::name, "' kernel does not return a log-sum-exp");
    const auto entries = detail::checked_product(q.batch, q.heads, q.length);
    if (!entries || static_cast<index>(lse.size()) != *entries)
      detail::fail("lse", "lse must have B H L = ", q.batch, " * ", q.heads, " * ", q.length,
                   " entries, got ", lse.size());
    if (v.dim == 0)
      detail::fail("v", "v must have at least one column (M >= 1) when a log-sum-exp is asked for");
  }
  detail::check_tensor_no_alias("q", q, out);
  detail::check_tensor_no_alias("k", k, out);
  detail::check_tensor_no_alias("v", v, out);

  const index H = q.heads, group = q.heads / k.heads;  // query heads per key/value head
  auto located = [&](const invalid_argument& e, index b, std::optional<index> h) {
    return e.at(q.batch == 1 ? std::nullopt : std::optional<index>(b), h);
  };
  std::vector<context> contexts;
  contexts.reserve(B);
  for (index b = 0; b < q.batch; ++b) {
    options o = opt.common;
    if (!opt.query_lengths.empty()) o.query_length = opt.query_lengths[static_cast<std::size_t>(b)];
    if (!opt.key_lengths.empty()) o.key_length = opt.key_lengths[static_cast<std::size_t>(b)];
    try {
      contexts.push_back(detail::make_context<T>(Policy::name, causal_capable<Policy>, q.length,
                                                 q.dim, k.length, k.dim, v.length, o));
    } catch (const invalid_argument& e) {
      throw located(e, b, std::nullopt);
    }
  }

  const index tasks = q.batch * H;
#if defined(_OPENMP)
  const int threads = opt.threads > 0 ? opt.threads : omp_get_max_threads();
#else
  const int threads = 1;
#endif
  // Fewer heads than threads (one long sequence): each head gets the idle threads for its own
  // checks, query blocks and clusters (detail/parallel.hpp; the result does not depend on them).
  const int inner = tasks > 0 && tasks < threads ? static_cast<int>(threads / tasks) : 1;
  for (auto& ctx : contexts) ctx.threads = inner;

  if (opt.common.check_finite)
    for (index b = 0; b < q.batch; ++b)
      for (index h = 0; h < H; ++h) {
        try {
          detail::check_values<T>(detail::head_map(q, b, h), detail::head_map(k, b, h / group),
                                  detail::head_map(v, b, h / group),
                                  contexts[static_cast<std::size_t>(b)]);
        } catch (const invalid_argument& e) {
          throw located(e, b, h);
        }
      }
  for (auto& ctx : contexts) ctx.checked_finite = opt.common.check_finite;

  // Heads on the threads (dynamically: heads differ in cost), each in its own try (allocation
  // failures; policies are checked before this point), the first failure rethrown. One head
  // opens no parallel region here: a region of one thread would make the head's own regions
  // nested ones, which OpenMP runtimes may serve with new threads each time.
  detail::parallel_for(tasks > 1 ? threads : 1, tasks, [&](index task) {
    const index b = task / H, h = task % H;
    context ctx = contexts[static_cast<std::size_t>(b)];
    ctx.stream = static_cast<std::uint64_t>(task);
    const detail::serial_products_scope serial;
    detail::run_head(policy, const_view<T>(detail::head_map(q, b, h)),
                     const_view<T>(detail::head_map(k, b, h / group)),
                     const_view<T>(detail::head_map(v, b, h / group)),
                     view<T>(detail::head_map(out, b, h)), ctx,
                     lse.empty() ? lse
                                 : lse.subspan(static_cast<std::size_t>(task * q.length),
                                               static_cast<std::size_t>(q.length)));
  });
}

}  // namespace fastattn
