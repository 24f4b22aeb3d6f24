// fastattn: header-only attention kernels on Eigen.
//
// This header is the front door: the common options, argument and value validation, and
// `attention()`, which owns everything every kernel shares (shapes, lengths, knobs, finiteness and
// magnitude checks, aliasing, padded rows, empty cases) so that a kernel's `compute` is only its
// algorithm. What a kernel is (the concept, its knobs) is policy.hpp; the errors are error.hpp;
// kernels live one per header; the batched multi-head driver is multihead.hpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>

#include <Eigen/Core>

#include "error.hpp"
#include "detail/causal.hpp"
#include "detail/parallel.hpp"
#include "detail/scratch.hpp"
#include "policy.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace fastattn {

/// Options every kernel understands. Lengths left empty mean "all rows are valid".
struct options {
  /// Multiplies q.k before the softmax. Default: 1 / sqrt(E). Must be finite, and 0 or a normal
  /// number of the scalar type T (|scale| in [numeric_limits<T>::min(), max()]), else the call
  /// throws.
  std::optional<double> scale{};
  /// Keys at index >= key_length are padding: they get zero weight. 0 <= key_length <= S, else
  /// the call throws.
  std::optional<index> key_length{};
  /// Queries at index >= query_length are padding: their output rows are zero and they take no
  /// part in clustering or hashing. 0 <= query_length <= L, else the call throws.
  std::optional<index> query_length{};
  /// Query i sees keys j <= i only. The call throws for a kernel that is not `causal_capable`
  /// (neither `supports_causal` nor `provides_lse`); one that provides_lse only is made causal
  /// by the front door's recursive decomposition.
  bool causal = false;
  /// Input policy. When true (the default) the front door scans the valid rows of q, k and v
  /// (O((L + S) E) reads, a fraction of a percent of any kernel's cost) and throws
  /// invalid_argument
  /// - naming the tensor, row and column of the first NaN or infinity;
  /// - when the values are finite but large enough that the kernel's arithmetic could overflow:
  ///   |scale| max|q| max|k| E (a bound on every score) or |scale| max|q| above max/4 of the
  ///   scalar type, or max|v| above max / (4 max(S, 1024)) (a bound on every weighted sum);
  ///   inside these bounds every kernel's output is finite.
  /// When false nothing is checked: every kernel then propagates a non-finite q or k entry to
  /// the output rows whose softmax it enters (for the approximate kernels, at least the rows of
  /// the query's cluster; never a silent zero), and a non-finite v row to the rows that see it
  /// (with causal masking, also to earlier rows of the same query x key tile, since a masked
  /// weight of 0 times NaN is NaN). Padding rows are never read, so they may hold anything in
  /// either mode.
  bool check_finite = true;
};

namespace detail {

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
  serial_products_scope() {}  // NOLINT(modernize-use-equals-default): a scope object, not trivial
#endif
 public:
  serial_products_scope(const serial_products_scope&) = delete;
  serial_products_scope& operator=(const serial_products_scope&) = delete;
};

/// Validates the shapes of one head (q L x E, k S x Ek, v Sv_rows x M) and resolves the options
/// for scalar type T. `name` is the kernel's name.
template <class T>
context make_context(std::string_view name, bool supports_causal, index L, index E, index S,
                     index Ek, index Sv_rows, const options& opt, std::uint64_t stream = 0) {
  if (E != Ek)
    fail("k", "q and k must have the same number of columns (E): q is ", L, " x ", E, ", k is ", S,
         " x ", Ek);
  if (Sv_rows != S)
    fail("v", "v must have as many rows as k (S): k has ", S, " rows, v has ", Sv_rows);
  if (E < 1) fail("q", "the feature dimension E must be at least 1, got E = ", E);
  context ctx{};
  ctx.query_length = opt.query_length.value_or(L);
  ctx.key_length = opt.key_length.value_or(S);
  if (ctx.query_length < 0 || ctx.query_length > L)
    fail("query_length", "query_length must be in [0, L = ", L, "], got ", ctx.query_length);
  if (ctx.key_length < 0 || ctx.key_length > S)
    fail("key_length", "key_length must be in [0, S = ", S, "], got ", ctx.key_length);
  ctx.scale = opt.scale.value_or(1.0 / std::sqrt(static_cast<double>(E)));
  if (!std::isfinite(ctx.scale) ||
      std::abs(ctx.scale) > static_cast<double>(std::numeric_limits<T>::max()))
    fail("scale", "scale must be finite and representable in ", sizeof(T) == 4 ? "float" : "double",
         " (|scale| <= ", std::numeric_limits<T>::max(), "): ", ctx.scale, " overflows it");
  if (ctx.scale != 0 && std::abs(ctx.scale) < static_cast<double>(std::numeric_limits<T>::min()))
    fail("scale", "scale must be 0 or a normal ", sizeof(T) == 4 ? "float" : "double",
         " (|scale| >= ", std::numeric_limits<T>::min(), "): ", ctx.scale, " underflows it");
  if (opt.causal && !supports_causal)
    fail("causal", "causal = true is not supported by the '", name,
         "' kernel (its supports_causal is false and it returns no log-sum-exp)");
  ctx.causal = opt.causal;
  ctx.stream = stream;
  return ctx;
}

/// Over `rows` rows of `cols` values (row r at data + r stride): the largest |x|, and through
/// `finite` whether every x is finite. Packets with four independent accumulators (one
/// dependency chain made the pass latency-bound: 0.7 ms of a 11 ms clustered call at N = 16384);
/// finiteness by summing x - x, 0 for a finite x and NaN otherwise, so no compare sits on the
/// chain. The maximum of the finite values is exact, so it does not depend on the order.
template <class T>
T max_abs_rows(const T* data, index stride, index rows, index cols, bool& finite) {
  namespace ei = Eigen::internal;
  using P = typename ei::packet_traits<T>::type;
  constexpr index size = ei::packet_traits<T>::size;
  P m[4], z[4];
  for (int a = 0; a < 4; ++a) m[a] = z[a] = ei::pset1<P>(T(0));
  T ms = 0, zs = 0;
  for (index r = 0; r < rows; ++r) {
    const T* const x = data + r * stride;
    index c = 0;
    for (; c + 4 * size <= cols; c += 4 * size)
      for (int a = 0; a < 4; ++a) {
        const P p = ei::ploadu<P>(x + c + a * size);
        m[a] = ei::pmax(m[a], ei::pabs(p));
        z[a] = ei::padd(z[a], ei::psub(p, p));
      }
    for (; c + size <= cols; c += size) {
      const P p = ei::ploadu<P>(x + c);
      m[0] = ei::pmax(m[0], ei::pabs(p));
      z[0] = ei::padd(z[0], ei::psub(p, p));
    }
    for (; c < cols; ++c) {
      ms = std::max(ms, std::abs(x[c]));
      zs += x[c] - x[c];
    }
  }
  const T zero = ei::predux(ei::padd(ei::padd(z[0], z[1]), ei::padd(z[2], z[3]))) + zs;
  finite = zero == T(0);
  return std::max(ei::predux_max(ei::pmax(ei::pmax(m[0], m[1]), ei::pmax(m[2], m[3]))), ms);
}

/// The largest |x| among the first `rows` rows of m (row-major); throws invalid_argument naming
/// `tensor`, the row and the column of the first non-finite value.
template <class Matrix>
double checked_max_abs(const char* tensor, const Matrix& m, index rows, int threads = 1) {
  using T = typename Matrix::Scalar;
  static_assert(Matrix::IsRowMajor, "checked_max_abs reads rows");
  if (rows == 0 || m.cols() == 0) return 0.0;
  const auto valid = m.topRows(rows);
  // By chunks of rows on `threads` threads (a maximum is exact: the same on any count).
  constexpr index chunk = 4096;
  const index chunks = (rows + chunk - 1) / chunk;
  const arena::scope scratch;
  T* const part = arena::local().take<T>(static_cast<std::size_t>(chunks));
  bool* const ok = arena::local().take<bool>(static_cast<std::size_t>(chunks));
  parallel_for(threads, chunks, [&](index c) {
    bool finite = true;
    part[c] = max_abs_rows<T>(m.data() + c * chunk * m.outerStride(), m.outerStride(),
                              std::min(chunk, rows - c * chunk), m.cols(), finite);
    ok[c] = finite;
  });
  T largest = part[0];
  bool finite = ok[0];
  for (index c = 1; c < chunks; ++c) {
    largest = std::max(largest, part[c]);
    finite = finite && ok[c];
  }
  if (!finite) {
    for (index r = 0; r < rows; ++r) {
      if (valid.row(r).allFinite()) continue;
      for (index c = 0; c < valid.cols(); ++c)
        if (!std::isfinite(static_cast<double>(valid(r, c))))
          fail(tensor, tensor, " has a non-finite value (", static_cast<double>(valid(r, c)),
               ") at row ", r, ", column ", c);
    }
  }
  return static_cast<double>(largest);
}

/// The front door's value check (options::check_finite): finiteness of the valid rows and the
/// magnitude bounds under which no kernel's arithmetic overflows.
template <class T>
void check_values(const const_view<T>& q, const const_view<T>& k, const const_view<T>& v,
                  const context& ctx) {
  const double mq = checked_max_abs("q", q, ctx.query_length, ctx.threads);
  const double mk = checked_max_abs("k", k, ctx.key_length, ctx.threads);
  const double mv = checked_max_abs("v", v, ctx.key_length, ctx.threads);
  const double limit = static_cast<double>(std::numeric_limits<T>::max()) / 4;
  const double scale = std::abs(ctx.scale);
  const double scores = scale * mq * mk * static_cast<double>(q.cols());
  if (scale * mq > limit || scores > limit)
    fail("q", "the scores could overflow ", sizeof(T) == 4 ? "float" : "double",
         ": |scale| max|q| max|k| E = ", scale, " * ", mq, " * ", mk, " * ", q.cols(), " = ",
         scores, " exceeds ", limit, " (max/4); rescale q or k, or use a wider scalar type");
  const double keys = static_cast<double>(std::max<index>(ctx.key_length, 1024));
  if (mv * keys > limit)
    fail("v", "the weighted sums of v could overflow ", sizeof(T) == 4 ? "float" : "double",
         ": max|v| = ", mv, " exceeds max / (4 max(S, 1024)) = ", limit / keys);
}

/// Whether the element sets of two row-major strided blocks of T (rows x cols, row stride) share
/// an element. Exact when the strides are equal (the usual case: heads of one buffer) or either
/// block has one row; otherwise whether their address ranges intersect.
template <class T>
bool blocks_overlap(const T* a, index a_rows, index a_cols, index a_stride, const T* b,
                    index b_rows, index b_cols, index b_stride) {
  if (a_rows == 0 || a_cols == 0 || b_rows == 0 || b_cols == 0) return false;
  const auto begin_a = reinterpret_cast<std::uintptr_t>(a);
  const auto begin_b = reinterpret_cast<std::uintptr_t>(b);
  const auto end_a =
      begin_a + static_cast<std::uintptr_t>((a_rows - 1) * a_stride + a_cols) * sizeof(T);
  const auto end_b =
      begin_b + static_cast<std::uintptr_t>((b_rows - 1) * b_stride + b_cols) * sizeof(T);
  if (end_a <= begin_b || end_b <= begin_a) return false;
  if ((begin_b - begin_a) % sizeof(T) != 0) return true;
  // A block of one row is the contiguous range of its elements whatever its stride (Eigen's Ref
  // gives a one-row view the stride cols, whatever the buffer's): exact against any block.
  if (a_rows == 1 || b_rows == 1) {
    if (a_rows == 1 && b_rows == 1) return true;  // two ranges, and they intersect
    if (b_rows == 1)
      return blocks_overlap(b, b_rows, b_cols, b_stride, a, a_rows, a_cols, a_stride);
    // a = [0, a_cols); b's row r = [d + r s, d + r s + c), in elements from a. The first row
    // that ends past 0 is the only one that can start before a_cols (later rows start later).
    const auto d = static_cast<index>(static_cast<std::intptr_t>(begin_b - begin_a) /
                                      static_cast<std::intptr_t>(sizeof(T)));
    const index s = b_stride, c = b_cols, need = -d - c;  // row r ends past 0: r s > need
    const index r0 = need < 0 ? 0 : need / s + 1;
    return r0 < b_rows && d + r0 * s < a_cols;
  }
  if (a_stride != b_stride || a_cols > a_stride || b_cols > b_stride) return true;
  // Equal strides s: element (r1, c1) of a is element (r2, c2) of b when
  // (r1 - r2) s + (c1 - c2) = d, d = b - a in elements, c1 - c2 in (-b_cols, a_cols).
  const auto d = static_cast<index>(static_cast<std::intptr_t>(begin_b - begin_a) /
                                    static_cast<std::intptr_t>(sizeof(T)));
  const index s = a_stride;
  const index base = d >= 0 ? d / s : -((-d + s - 1) / s);  // floor(d / s)
  for (index delta = base; delta <= base + 1; ++delta) {    // r1 - r2
    if (delta > a_rows - 1 || delta < -(b_rows - 1)) continue;
    const index diff = d - delta * s;  // c1 - c2
    if (diff > -b_cols && diff < a_cols) return true;
  }
  return false;
}

template <class T>
bool views_overlap(const const_view<T>& a, const T* b, index b_rows, index b_cols, index b_stride) {
  return blocks_overlap(a.data(), a.rows(), a.cols(), a.outerStride(), b, b_rows, b_cols, b_stride);
}

/// Throws when `out` shares memory with q, k or v: a kernel reads its inputs after it has
/// started writing its output, so in-place attention is refused rather than computed wrong.
template <class T>
void check_no_alias(const const_view<T>& q, const const_view<T>& k, const const_view<T>& v,
                    const view<T>& out) {
  const char* names[] = {"q", "k", "v"};
  const const_view<T>* inputs[] = {&q, &k, &v};
  for (int i = 0; i < 3; ++i)
    if (views_overlap(*inputs[i], out.data(), out.rows(), out.cols(), out.outerStride()))
      fail("out", "out shares memory with ", names[i],
           "; attention cannot run in place: write the output to a separate buffer");
}

/// Runs the kernel on a validated head with Lv, Sv >= 1, making causal attention by decomposition
/// for a policy with log-sum-exp that does not do it itself.
template <class Policy, class T>
void compute_head(const Policy& policy, const const_view<T>& q, const const_view<T>& k,
                  const const_view<T>& v, view<T> out, const context& ctx, std::span<T> lse) {
  if constexpr (provides_lse<Policy>) {
    if (ctx.causal && !Policy::supports_causal)
      causal_blocks(policy, q, k, v, out, ctx, lse);
    else
      policy.compute(q, k, v, out, ctx, lse);
  } else {
    policy.compute(q, k, v, out, ctx);
  }
}

/// What the front door and the multi-head driver do for one validated head: zero the padded
/// rows, handle the empty cases, make causal attention by decomposition for a policy that does
/// not do it itself, and run the kernel on the rest. `lse` (empty, or one entry per row) gets
/// -inf on padded and keyless rows.
template <class Policy, class T>
void run_head(const Policy& policy, const const_view<T>& q, const const_view<T>& k,
              const const_view<T>& v, view<T> out, const context& ctx, std::span<T> lse = {}) {
  constexpr T minus_inf = -std::numeric_limits<T>::infinity();
  // (An output with no columns may have null data: no row offset is taken from it.)
  if (out.cols() > 0 && ctx.query_length < out.rows())
    out.bottomRows(out.rows() - ctx.query_length).setZero();
  if (!lse.empty()) std::fill(lse.begin() + ctx.query_length, lse.end(), minus_inf);
  if (ctx.query_length == 0) return;
  if (out.cols() == 0) return;  // nothing to compute (lse needs M >= 1: checked by the callers)
  if (ctx.key_length == 0) {    // no visible key: zero rows
    out.topRows(ctx.query_length).setZero();
    if (!lse.empty()) std::fill(lse.begin(), lse.begin() + ctx.query_length, minus_inf);
    return;
  }
  compute_head(policy, q, k, v, out, ctx,
               lse.empty() ? lse : lse.first(static_cast<std::size_t>(ctx.query_length)));
}

}  // namespace detail

/// Runs `policy` on one head and writes the L x M result into `out` without allocating it.
/// q is L x E with E >= 1, k is S x E, v is S x M, all float or all double (any Eigen layout;
/// row-major inputs are used in place, others are copied once, O(N d)). `out` is a row-major
/// L x M matrix or a strided row-major view that shares no memory with q, k or v.
/// Throws fastattn::invalid_argument (before any work) on wrong shapes (E = 0 included), lengths
/// or `scale` outside their ranges (see `options`), a knob outside its range or rejected by the
/// policy's `validate()`, `causal` on a kernel that is not `causal_capable`, `out` overlapping an
/// input, and, with `check_finite`, non-finite or overflowing values (see `options`).
template <attention_policy Policy, class DQ, class DK, class DV>
void attention(const Policy& policy, const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
               const Eigen::MatrixBase<DV>& v, view<typename DQ::Scalar> out,
               const options& opt = {}) {
  attention(policy, q, k, v, out, std::span<typename DQ::Scalar>{}, opt);
}

/// As above, and writes into `lse` (L entries) each row's log-sum-exp of its scores,
/// log sum_j exp(scale q_i . k_j) over the keys it sees (for an approximate kernel, the log of the
/// normaliser its approximation uses; -inf for padded rows and rows that see no key). An empty
/// `lse` asks for nothing. Throws as above, and, when lse is not empty, if the policy does not
/// `provides_lse`, lse.size() != L, or M = 0.
template <attention_policy Policy, class DQ, class DK, class DV>
void attention(const Policy& policy, const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
               const Eigen::MatrixBase<DV>& v, view<typename DQ::Scalar> out,
               std::span<typename DQ::Scalar> lse, const options& opt = {}) {
  using Scalar = typename DQ::Scalar;
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "fastattn: kernels are defined for float and double");
  static_assert(
      std::is_same_v<Scalar, typename DK::Scalar> && std::is_same_v<Scalar, typename DV::Scalar>,
      "fastattn: q, k and v must have the same scalar type");
  context ctx = detail::make_context<Scalar>(Policy::name, causal_capable<Policy>, q.rows(),
                                             q.cols(), k.rows(), k.cols(), v.rows(), opt);
  validate(policy);
  validate_streams(policy, 1);
  if (out.rows() != q.rows() || out.cols() != v.cols())
    detail::fail("out", "out must be L x M = ", q.rows(), " x ", v.cols(), ", got ", out.rows(),
                 " x ", out.cols());
  if (!lse.empty()) {
    if constexpr (!provides_lse<Policy>)
      detail::fail("lse", "the '", Policy::name, "' kernel does not return a log-sum-exp");
    if (static_cast<index>(lse.size()) != q.rows())
      detail::fail("lse", "lse must have one entry per query row (L = ", q.rows(), "), got ",
                   lse.size());
    if (v.cols() == 0)
      detail::fail("v", "v must have at least one column (M >= 1) when a log-sum-exp is asked for");
  }
  const const_view<Scalar> qv(q.derived()), kv(k.derived()), vv(v.derived());
  detail::check_no_alias(qv, kv, vv, out);
  if (opt.check_finite) {
    detail::check_values(qv, kv, vv, ctx);
    ctx.checked_finite = true;
  }
  const detail::serial_products_scope serial;
  detail::run_head(policy, qv, kv, vv, out, ctx, lse);
}

/// Runs `policy` on one head: returns softmax(scale * q k^T) v, or the kernel's approximation of
/// it, as an L x M matrix with q's storage order. q is L x E, k is S x E, v is S x M, all float or
/// all double. Throws as the overload that takes `out` (never about `out`).
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

/// Frees the calling thread's kernel scratch, arena and workspaces (fastattn keeps them between
/// calls so that repeated calls allocate nothing). Call it outside any kernel, e.g. after a long
/// sequence is done; while the thread's arena is in use (inside a kernel) it frees nothing.
inline void release_scratch() noexcept { detail::arena::local().release_all(); }

/// Bytes the calling thread's scratch arena currently reserves (the per-thread workspaces'
/// vectors, which `release_scratch` also frees, are not counted).
inline std::size_t scratch_bytes() noexcept { return detail::arena::local().capacity(); }

}  // namespace fastattn
