// fastattn: header-only attention kernels on Eigen.
//
// This header states what every kernel shares: the policy concept, the common options, the error
// type, argument validation and the `attention()` front door. Kernels live one per header
// (dense.hpp, clustered.hpp, improved_clustered.hpp, smyrf.hpp); the batched multi-head driver is
// multihead.hpp.
#pragma once

#include <cmath>
#include <concepts>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

#include <Eigen/Core>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace fastattn {

using index = Eigen::Index;

/// The one exception type fastattn throws for caller errors (shapes, options, lengths). Its
/// message always names the argument and the offending values.
class invalid_argument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// Row-major dense matrix: rows are tokens, so one token's features are contiguous.
template <class T>
using matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Read-only view of a row-major matrix whose rows may be strided (one head inside a
/// (batch, length, heads, dim) buffer is such a view). Features within a row are contiguous.
template <class T>
using const_view = Eigen::Ref<const matrix<T>, 0, Eigen::OuterStride<>>;

/// Writable counterpart of `const_view`.
template <class T>
using view = Eigen::Ref<matrix<T>, 0, Eigen::OuterStride<>>;

/// Options every kernel understands. Lengths left empty mean "all rows are valid".
struct options {
  /// Multiplies q.k before the softmax. Default: 1 / sqrt(E).
  std::optional<double> scale{};
  /// Keys at index >= key_length are padding: they get zero weight. 0 <= key_length <= S.
  std::optional<index> key_length{};
  /// Queries at index >= query_length are padding: their output rows are zero and they take no
  /// part in clustering or hashing. 0 <= query_length <= L.
  std::optional<index> query_length{};
  /// Query i sees keys j <= i only. Kernels whose `supports_causal` is false throw if asked.
  bool causal = false;
  /// Non-finite policy. When true (the default) the front door scans the valid rows of q, k and v
  /// (O((L + S) E) reads, a fraction of a percent of any kernel's cost) and throws
  /// invalid_argument naming the tensor, row and column of the first NaN or infinity. When
  /// false nothing is checked: dense then propagates a non-finite q or k entry to exactly the
  /// output rows whose softmax it enters, and a non-finite v row to the rows that see it (with
  /// causal masking, also to earlier rows of the same query x key tile, since a masked weight of
  /// 0 times NaN is NaN); the approximate kernels propagate to whole clusters. Padding rows are
  /// never read, so they may hold anything in either mode.
  bool check_finite = true;
};

/// Options after validation against the shapes: what a kernel's `compute` receives.
struct context {
  double scale;          ///< resolved scale
  index query_length;    ///< valid queries, Lv (rows [Lv, L) of the output must be zero)
  index key_length;      ///< valid keys, Sv
  bool causal;           ///< query i sees keys j <= i
  std::uint64_t stream;  ///< which (batch, head) this is: kernels derive their random draws
                         ///< from (seed, stream) so results do not depend on scheduling
};

/// What a kernel policy provides. Built-in policies are `dense`, `clustered`,
/// `improved_clustered` and `smyrf`; a user type that satisfies this concept works everywhere
/// they do (`attention()`, `multihead_attention()`).
///
/// - `P::name`: a `std::string_view`, the kernel's name in benchmarks and tools;
/// - `P::is_exact`: true when the output equals softmax(s Q K^T) V up to rounding;
/// - `P::supports_causal`: whether `context::causal` may be true;
/// - `p.compute(q, k, v, out, ctx)` for float and double: writes the L x M output into `out`.
///   Shapes and lengths are already validated when it is called; rows of `out` at and beyond
///   `ctx.query_length` must be written as zeros.
template <class P>
concept attention_policy = std::copy_constructible<P> &&
    requires(const P& p, const_view<float> qf, view<float> of, const_view<double> qd,
             view<double> od, const context& ctx) {
  { P::name } -> std::convertible_to<std::string_view>;
  {std::bool_constant<P::is_exact>{}};
  {std::bool_constant<P::supports_causal>{}};
  p.compute(qf, qf, qf, of, ctx);
  p.compute(qd, qd, qd, od, ctx);
};

namespace detail {

template <class... Parts>
[[noreturn]] inline void fail(const Parts&... parts) {
  std::string message = "fastattn: ";
  auto append = [&message](const auto& part) {
    if constexpr (std::is_arithmetic_v<std::decay_t<decltype(part)>>)
      message += std::to_string(part);
    else
      message += part;
  };
  (append(parts), ...);
  throw invalid_argument(message);
}

/// Keeps Eigen's products inside a kernel on the calling thread. fastattn parallelises over
/// heads (multihead.hpp); with OpenMP enabled, Eigen would otherwise open a parallel region for
/// every small block product of a kernel, which costs more than the product. Sets the calling
/// thread's OpenMP thread count to 1 for the scope and restores it (other threads are not
/// affected). An explicit Eigen::setNbThreads(n) by the user takes precedence, as in Eigen.
class serial_products_scope {
 public:
#if defined(_OPENMP)
  serial_products_scope() : previous_(omp_get_max_threads()) { omp_set_num_threads(1); }
  ~serial_products_scope() { omp_set_num_threads(previous_); }

 private:
  int previous_;
#else
  serial_products_scope() = default;
#endif
 public:
  serial_products_scope(const serial_products_scope&) = delete;
  serial_products_scope& operator=(const serial_products_scope&) = delete;
};

/// Validates the shapes of one head and resolves the options. `name` is the kernel's name.
inline context make_context(std::string_view name, bool supports_causal, index L, index E, index S,
                            index Ek, index Sv_rows, const options& opt, std::uint64_t stream = 0) {
  const std::string kernel(name);
  if (E != Ek)
    fail("q and k must have the same number of columns (E): q is ", L, " x ", E, ", k is ", S,
         " x ", Ek);
  if (Sv_rows != S) fail("v must have as many rows as k (S): k has ", S, " rows, v has ", Sv_rows);
  if (E < 1) fail("the feature dimension E must be at least 1, got E = ", E);
  context ctx{};
  ctx.query_length = opt.query_length.value_or(L);
  ctx.key_length = opt.key_length.value_or(S);
  if (ctx.query_length < 0 || ctx.query_length > L)
    fail("query_length must be in [0, L = ", L, "], got ", ctx.query_length);
  if (ctx.key_length < 0 || ctx.key_length > S)
    fail("key_length must be in [0, S = ", S, "], got ", ctx.key_length);
  ctx.scale = opt.scale.value_or(1.0 / std::sqrt(static_cast<double>(E)));
  if (!std::isfinite(ctx.scale)) fail("scale must be finite, got ", opt.scale.value_or(0.0));
  if (opt.causal && !supports_causal)
    fail("causal = true is not supported by the '", kernel,
         "' kernel (its supports_causal is false); use dense for causal attention");
  ctx.causal = opt.causal;
  ctx.stream = stream;
  return ctx;
}

/// Throws invalid_argument naming `tensor`, the row and the column of the first non-finite
/// value among the first `rows` rows of m.
template <class Matrix>
void check_finite(const char* tensor, const Matrix& m, index rows) {
  // x * 0 is 0 for finite x and NaN otherwise: one vectorised reduction, no branch per value.
  using T = typename Matrix::Scalar;
  if (rows == 0 || !std::isnan(static_cast<double>((m.topRows(rows).array() * T(0)).sum()))) return;
  for (index r = 0; r < rows; ++r) {
    const auto row = m.row(r);
    if (row.allFinite()) continue;
    for (index c = 0; c < row.size(); ++c)
      if (!std::isfinite(static_cast<double>(row(c))))
        fail(tensor, " has a non-finite value (", std::to_string(static_cast<double>(row(c))),
             ") at row ", r, ", column ", c,
             "; pass options.check_finite = false to skip this check");
  }
}

/// The front door's data check: valid rows of q, k and v (padding is never read).
template <class Q, class K, class V>
void check_inputs_finite(const Q& q, const K& k, const V& v, const context& ctx) {
  check_finite("q", q, ctx.query_length);
  check_finite("k", k, ctx.key_length);
  check_finite("v", v, ctx.key_length);
}

}  // namespace detail

/// Runs `policy` on one head and writes the L x M result into `out` without allocating it.
/// q is L x E, k is S x E, v is S x M (any Eigen layout; row-major inputs are used in place,
/// others are copied once, O(N d)). `out` is a row-major L x M matrix or a strided row-major view.
template <attention_policy Policy, class DQ, class DK, class DV>
void attention(const Policy& policy, const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
               const Eigen::MatrixBase<DV>& v, view<typename DQ::Scalar> out,
               const options& opt = {}) {
  using Scalar = typename DQ::Scalar;
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "fastattn: kernels are defined for float and double");
  static_assert(
      std::is_same_v<Scalar, typename DK::Scalar> && std::is_same_v<Scalar, typename DV::Scalar>,
      "fastattn: q, k and v must have the same scalar type");
  const context ctx = detail::make_context(Policy::name, Policy::supports_causal, q.rows(),
                                           q.cols(), k.rows(), k.cols(), v.rows(), opt);
  if (out.rows() != q.rows() || out.cols() != v.cols())
    detail::fail("out must be L x M = ", q.rows(), " x ", v.cols(), ", got ", out.rows(), " x ",
                 out.cols());
  const const_view<Scalar> qv(q.derived()), kv(k.derived()), vv(v.derived());
  if (opt.check_finite) detail::check_inputs_finite(qv, kv, vv, ctx);
  const detail::serial_products_scope serial;
  policy.compute(qv, kv, vv, out, ctx);
}

/// Runs `policy` on one head: returns softmax(scale * q k^T) v, or the kernel's approximation of
/// it, as an L x M matrix with q's storage order. q is L x E, k is S x E, v is S x M, all float or
/// all double.
template <attention_policy Policy, class DQ, class DK, class DV>
auto attention(const Policy& policy, const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
               const Eigen::MatrixBase<DV>& v, const options& opt = {}) {
  using Scalar = typename DQ::Scalar;
  matrix<Scalar> out(q.rows(), v.cols());
  attention(policy, q, k, v, view<Scalar>(out), opt);
  if constexpr (DQ::IsRowMajor) {
    return out;
  } else {
    return Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>(out);
  }
}

}  // namespace fastattn
