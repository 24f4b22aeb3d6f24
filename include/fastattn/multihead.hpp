// Batched multi-head driver: any attention policy over (batch, length, heads, dim) buffers.
#pragma once

#include <exception>
#include <span>
#include <vector>

#include "attention.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace fastattn {

/// A (batch, length, heads, dim) buffer in the layout a model's projections produce: token t of
/// sample b, head h, feature e is at data[b * batch_stride + t * token_stride + h * dim + e].
/// Strides default to a packed buffer; a larger `token_stride` views one slice of a fused
/// projection (e.g. the Q part of a (B, L, 3 * H * E) QKV buffer, with data offset to it).
template <class T>
struct tensor_view {
  T* data = nullptr;
  index batch = 0;
  index length = 0;
  index heads = 0;
  index dim = 0;
  index token_stride = 0;  ///< 0 means heads * dim
  index batch_stride = 0;  ///< 0 means length * token_stride

  index row_stride() const noexcept { return token_stride ? token_stride : heads * dim; }
  index sample_stride() const noexcept {
    return batch_stride ? batch_stride : length * row_stride();
  }
  /// Where head (b, h) starts. An empty tensor (length or dim 0) may have null data, and its
  /// heads are never read, so it gets `data` itself: no offset from a null pointer.
  T* head(index b, index h) const noexcept {
    if (length == 0 || dim == 0) return data;
    return data + b * sample_stride() + h * dim;
  }
};

/// Options of a multi-head call: the common options plus per-sample lengths and the thread count.
struct multihead_options {
  /// scale and causal apply to every head; key_length / query_length apply to every sample
  /// unless the per-sample spans below are given.
  options common{};
  std::span<const index> query_lengths{};  ///< empty, or one valid query length per sample
  std::span<const index> key_lengths{};    ///< empty, or one valid key length per sample
  int threads = 0;                         ///< OpenMP threads; 0 = OpenMP's default
};

namespace detail {

template <class T>
void check_tensor(const char* name, const tensor_view<T>& t) {
  if (t.batch < 0 || t.length < 0 || t.heads < 1 || t.dim < 0)
    fail(name, " must have batch >= 0, length >= 0, heads >= 1, dim >= 0; got (", t.batch, ", ",
         t.length, ", ", t.heads, ", ", t.dim, ")");
  if (t.token_stride != 0 && t.token_stride < t.heads * t.dim)
    fail(name, ".token_stride must be 0 or >= heads * dim = ", t.heads * t.dim, ", got ",
         t.token_stride);
  if (t.batch_stride != 0 && t.batch_stride < t.length * t.row_stride())
    fail(name, ".batch_stride must be 0 or >= length * token_stride = ", t.length * t.row_stride(),
         ", got ", t.batch_stride);
  if (t.data == nullptr && t.batch * t.length * t.heads * t.dim != 0)
    fail(name, ".data is null for a non-empty tensor");
}

template <class T>
auto head_map(const tensor_view<T>& t, index b, index h) {
  using plain = matrix<std::remove_const_t<T>>;
  using map_type =
      std::conditional_t<std::is_const_v<T>, Eigen::Map<const plain, 0, Eigen::OuterStride<>>,
                         Eigen::Map<plain, 0, Eigen::OuterStride<>>>;
  return map_type(t.head(b, h), t.length, t.dim, Eigen::OuterStride<>(t.row_stride()));
}

}  // namespace detail

/// Runs `policy` on every (sample, head) pair of q (B, L, H, E), k (B, S, H, E), v (B, S, H, M)
/// and writes out (B, L, H, M), in parallel over B x H with OpenMP when it is enabled. No input
/// is copied: each head is a strided view into the caller's buffer. Each (b, h) draws its random
/// numbers from (policy seed, stream = b * H + h), so the output does not depend on the thread
/// count or schedule. All shapes and lengths are checked before any work starts.
template <attention_policy Policy, class T>
void multihead_attention(const Policy& policy, tensor_view<const T> q, tensor_view<const T> k,
                         tensor_view<const T> v, tensor_view<T> out,
                         const multihead_options& opt = {}) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "fastattn: kernels are defined for float and double");
  detail::check_tensor("q", q);
  detail::check_tensor("k", k);
  detail::check_tensor("v", v);
  detail::check_tensor("out", out);
  if (k.batch != q.batch || v.batch != q.batch || out.batch != q.batch)
    detail::fail("q, k, v and out must have the same batch size: q ", q.batch, ", k ", k.batch,
                 ", v ", v.batch, ", out ", out.batch);
  if (k.heads != q.heads || v.heads != q.heads || out.heads != q.heads)
    detail::fail("q, k, v and out must have the same number of heads: q ", q.heads, ", k ", k.heads,
                 ", v ", v.heads, ", out ", out.heads);
  if (k.length != v.length)
    detail::fail("k and v must have the same length (S): k ", k.length, ", v ", v.length);
  if (out.length != q.length || out.dim != v.dim)
    detail::fail("out must be (B, L, H, M) = (", q.batch, ", ", q.length, ", ", q.heads, ", ",
                 v.dim, "), got (", out.batch, ", ", out.length, ", ", out.heads, ", ", out.dim,
                 ")");
  const auto B = static_cast<std::size_t>(q.batch);
  if (!opt.query_lengths.empty() && opt.query_lengths.size() != B)
    detail::fail("query_lengths must be empty or have one entry per sample (", q.batch, "), got ",
                 opt.query_lengths.size());
  if (!opt.key_lengths.empty() && opt.key_lengths.size() != B)
    detail::fail("key_lengths must be empty or have one entry per sample (", q.batch, "), got ",
                 opt.key_lengths.size());
  if (opt.threads < 0) detail::fail("threads must be >= 0, got ", opt.threads);

  const index H = q.heads;
  std::vector<context> contexts;
  contexts.reserve(B);
  for (index b = 0; b < q.batch; ++b) {
    options o = opt.common;
    if (!opt.query_lengths.empty()) o.query_length = opt.query_lengths[static_cast<std::size_t>(b)];
    if (!opt.key_lengths.empty()) o.key_length = opt.key_lengths[static_cast<std::size_t>(b)];
    try {
      contexts.push_back(detail::make_context(Policy::name, Policy::supports_causal, q.length,
                                              q.dim, k.length, k.dim, v.length, o));
    } catch (const invalid_argument& e) {
      detail::fail("sample ", b, ": ", std::string(e.what()).substr(10));  // drop "fastattn: "
    }
  }

  if (opt.common.check_finite)
    for (index b = 0; b < q.batch; ++b)
      for (index h = 0; h < H; ++h) {
        try {
          detail::check_inputs_finite(detail::head_map(q, b, h), detail::head_map(k, b, h),
                                      detail::head_map(v, b, h),
                                      contexts[static_cast<std::size_t>(b)]);
        } catch (const invalid_argument& e) {
          detail::fail("sample ", b, ", head ", h, ": ", std::string(e.what()).substr(10));
        }
      }

  const index tasks = q.batch * H;
  std::exception_ptr error;
#if defined(_OPENMP)
  const int threads = opt.threads > 0 ? opt.threads : omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (tasks > 1 && threads > 1)
#endif
  for (index task = 0; task < tasks; ++task) {
    const index b = task / H, h = task % H;
    try {
      context ctx = contexts[static_cast<std::size_t>(b)];
      ctx.stream = static_cast<std::uint64_t>(task);
      const auto qh = detail::head_map(q, b, h);
      const auto kh = detail::head_map(k, b, h);
      const auto vh = detail::head_map(v, b, h);
      auto oh = detail::head_map(out, b, h);
      const detail::serial_products_scope serial;
      policy.compute(const_view<T>(qh), const_view<T>(kh), const_view<T>(vh), view<T>(oh), ctx);
    } catch (...) {
#if defined(_OPENMP)
#pragma omp critical(fastattn_multihead_error)
#endif
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace fastattn
