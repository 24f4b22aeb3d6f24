// Error you can see and bound: any kernel, plus a run-time estimate of its relative error from a
// sample of rows computed exactly, and an exact fallback for the heads whose estimate is too large.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string_view>
#include <tuple>

#include "attention.hpp"
#include "dense.hpp"
#include "detail/exact_attention.hpp"
#include "detail/exact_rows.hpp"
#include "detail/rng.hpp"
#include "detail/scratch.hpp"

namespace fastattn {

/// What `guarded` reports for one head: an estimate of the head's relative error
/// ||O_kernel - O_exact||_F / ||O_exact||_F over its valid rows, with an interval.
///
/// - `samples` > 0 and < the valid queries: a sampled estimate; [lower, upper] is an approximate
///   `confidence` interval (see `guarded` for the estimator and what its coverage was measured
///   to be).
/// - `samples` = the valid queries: every row was computed exactly; `error` is the true error
///   (up to the scalar type's rounding) and lower = upper = error.
/// - `samples` = 0: the head never ran the kernel (fewer valid queries than `min_length`, so
///   dense attention was computed directly): error 0, interval [0, 0].
/// - `fell_back`: the kernel's output was replaced by dense attention's because `error` exceeded
///   the tolerance; `error` and the interval still describe the kernel's output that was
///   discarded (the head's output is now exact).
/// The entry of a head with no valid query or no valid key is left as it was (the front door calls
/// no kernel for such a head): value-initialise the span to tell these apart (confidence = 0).
struct error_estimate {
  double error = 0;        ///< point estimate of the relative error (0 when the head is exact)
  double lower = 0;        ///< lower end of the interval
  double upper = 0;        ///< upper end of the interval (+inf when it cannot be bounded)
  double confidence = 0;   ///< nominal coverage of [lower, upper] (0.95; 1 when exact)
  index samples = 0;       ///< rows drawn (with replacement) and computed exactly
  bool fell_back = false;  ///< the head's output is dense attention's, not the kernel's
};

namespace detail {

/// Upper 97.5% point of Student's t with `df` >= 2 (possibly fractional) degrees of freedom:
/// the Cornish-Fisher expansion of Abramowitz and Stegun 26.7.5 (within 1% at df = 2, 0.01% from
/// df = 10).
inline double student_t975(double df) noexcept {
  constexpr double z = 1.959963984540054;
  const double z2 = z * z, z3 = z2 * z, z5 = z3 * z2, z7 = z5 * z2, z9 = z7 * z2;
  const double g1 = (z3 + z) / 4;
  const double g2 = (5 * z5 + 16 * z3 + 3 * z) / 96;
  const double g3 = (3 * z7 + 19 * z5 + 17 * z3 - 15 * z) / 384;
  const double g4 = (79 * z9 + 776 * z7 + 1482 * z5 - 1920 * z3 - 945 * z) / 92160;
  const double u = 1 / df;
  return z + u * (g1 + u * (g2 + u * (g3 + u * g4)));
}

/// The largest magnitude in `rows` (0 when empty; NaN may or may not be seen).
template <class Rows>
double largest_magnitude(const Rows& rows) {
  return rows.size() > 0 ? static_cast<double>(rows.cwiseAbs().maxCoeff()) : 0.0;
}

/// A power of two u with u most in [1, 2), for the rows' largest magnitude `most`: the squared
/// norms of u x and u (a - x) neither overflow (double rows past 1e154: the front door allows
/// values up to max / 4096) nor underflow (rows below 1e-154, where a wrong row would square to
/// an error of 0), and the ratio of two of them does not change. 1 when `most` is 0 or not
/// finite (a NaN must reach the estimate, and does through the rows themselves). At most 2^900,
/// for denormal rows (2^-1074 times 2^900 still squares to a normal double).
inline double norm_unit(double most) noexcept {
  return most > 0 && std::isfinite(most) ? std::ldexp(1.0, std::min(900, -std::ilogb(most))) : 1.0;
}

/// An estimate of a relative error and its interval.
struct ratio_estimate {
  double error = 0, lower = 0, upper = 0;
};

/// The sampled estimator of `guarded` (documented there): n weighted draws, draw t with squared
/// error e_t, squared exact norm x_t and selection probability p_t, estimate
/// sqrt(sum_i e_i / sum_i x_i) over the population. The caller provides room for n draws.
class ratio_accumulator {
 public:
  ratio_accumulator(double* y, double* w) : y_(y), w_(w) {}

  /// Adds `count` draws of one row.
  void add(double e, double x, double p, index count) {
    for (index c = 0; c < count; ++c) {
      y_[n_] = e / p;
      w_[n_] = x / p;
      ++n_;
    }
  }

  /// The estimate of the population's sqrt(sum e / sum x) and its interval (see `guarded`).
  ratio_estimate finish() const {
    constexpr double inf = std::numeric_limits<double>::infinity();
    double sy = 0, sw = 0;
    for (index t = 0; t < n_; ++t) {
      sy += y_[t];
      sw += w_[t];
    }
    if (std::isnan(sy) || std::isnan(sw)) return {sy + sw, sy + sw, sy + sw};  // NaN
    if (!(sw > 0)) {  // the sampled exact rows are all zero: no relative scale
      const double e = sy > 0 ? inf : 0.0;
      return {e, 0, e};
    }
    const double r = sy / sw;
    if (!(r > 0)) return {std::sqrt(r), std::sqrt(r), std::sqrt(r)};  // 0, or NaN
    if (n_ < 2) return {std::sqrt(r), 0, inf};
    // Linearised residuals d_t = y_t - r w_t: Var(r) ~ s_d^2 / (n wbar^2).
    double m2 = 0, m4 = 0;
    for (index t = 0; t < n_; ++t) {
      const double d = y_[t] - r * w_[t], d2 = d * d;
      m2 += d2;
      m4 += d2 * d2;
    }
    const auto n = static_cast<double>(n_);
    const double wbar = sw / n;
    const double se = std::sqrt(m2 / (n - 1) / n) / wbar;
    m2 /= n;
    m4 /= n;
    const double kurtosis = m2 > 0 ? std::max(0.0, m4 / (m2 * m2) - 3) : 0.0;
    const double df = std::max(2.0, 2 / (2 / (n - 1) + kurtosis / n));
    const double spread = student_t975(df) * se / r;  // on the log scale
    return {std::sqrt(r), std::sqrt(r * std::exp(-spread)), std::sqrt(r * std::exp(spread))};
  }

 private:
  double* y_;
  double* w_;
  index n_ = 0;
};

}  // namespace detail

/// `guarded<P>`: kernel P with a run-time estimate of its error and an exact fallback.
///
/// **What it does, per head** (Lv valid queries, Sv valid keys, M value columns):
/// 1. Lv < `min_length`: dense attention, exactly as `fastattn::dense{}` computes it; P does not
///    run (below the crossover dense is both faster and exact). The report says samples = 0,
///    error 0, confidence 1.
/// 2. Otherwise P runs. When an estimate is asked for (a `report` span is given or `tolerance`
///    is finite), `samples` rows are drawn and computed exactly (detail::exact_rows: the rows
///    are the lanes of the score tiles; causal rows see keys j <= i, padded keys none; weights
///    below eps / (16 Sv) of a row's largest are dropped, at most eps / 16 of its total, and the
///    P V product skips them) and the head's relative error is estimated (below).
/// 3. When the estimate exceeds `tolerance` (or is NaN), the head is recomputed by dense's
///    algorithm with dense's default tiles (128 x 512): its output (and log-sum-exp) are then bit
///    for bit those of `fastattn::dense{}`; report.fell_back = true.
/// Nothing else is added: with an infinite tolerance and no report, guarded<P> is P (plus the
/// min_length switch).
///
/// **The estimator.** Let a_i be P's output row, o_i the exact row, e_i = ||a_i - o_i||^2 and
/// x_i = ||o_i||^2; the error is R = sqrt(sum_i e_i / sum_i x_i) over the Lv valid rows.
/// - Sampling design: n = `samples` rows are drawn independently, with replacement, row i with
///   probability p_i = (||a_i||^2 / sum_j ||a_j||^2 + 1 / Lv) / 2: half proportional to the
///   kernel's own output norm (which is known for every row at no cost and tracks x_i, so the
///   per-row squared errors, which scale with x_i, are evened out), half uniform ("defensive"
///   mixture: p_i >= 1 / (2 Lv), so the variance is at most about twice that of uniform
///   sampling with replacement whatever the output norms are). A row drawn twice is computed once
///   and counted twice.
/// - Point estimate (Hansen-Hurwitz ratio): r = sum_t (e_t / p_t) / sum_t (x_t / p_t) over the
///   draws, error = sqrt(r). Consistent; its bias is O(1/n).
/// - Interval: the delta method on log r, with d_t = (e_t - r x_t) / p_t,
///   se(r) = sqrt(sum d_t^2 / (n (n - 1))) / mean_t(x_t / p_t), and a Student-t quantile whose
///   degrees of freedom are matched to the sample's excess kurtosis k of d (Satterthwaite:
///   Var(s^2) ~ sigma^4 (2 / (n - 1) + k / n), df = 2 / (2 / (n - 1) + k / n), at least 2):
///   r exp(+-t_{0.975, df} se(r) / r), then square roots. The log scale makes the interval
///   asymmetric (per-row errors are right-skewed) and never negative; the kurtosis-matched df
///   widens it when a few draws dominate.
/// - samples >= Lv: every row is computed exactly; error is the true error and the interval has
///   zero width. All sampled exact rows zero: error +inf (or 0 when the sampled errors are zero).
///   samples = 1: the interval is [0, +inf] (unless the drawn row has no error).
///
/// **How good it is** (measured at n = 32 with 200 seeds per head on heads of N = 512 and 1024:
/// peaked, iid gaussian and neighbour-offset inputs and two mixtures, under clustered C = 10 and
/// 100, improved_clustered C = 10 k = 8, C = 25 k = 32 and C = 100 k = 32, smyrf 1 x 16 and
/// 2 x 64: 21000 trials per N; tests/test_guarded.cpp re-measures a subset): the interval covered
/// the true error in 93.6-95.5% of the trials per input kind and per kernel (94.4% and 94.9% over
/// all). The estimate was within 25% of the true error in 95.5% (N = 512) and 97.6% (N = 1024) of
/// the trials whose error exceeds 0.02, in at least 90% per input kind, but in only 79-92% for
/// improved_clustered with topk = 32 at N = 512, whose error sits in the ~5% of rows where the
/// cluster's top-k misses the row's own heavy keys. With n = 64: coverage 94-96%, within 25% in
/// 99%. Uniform sampling without replacement was within 25% in 72-100% per kernel, and its
/// normal interval covered 82-94%: weighting the draws by the output norms and the log-t interval
/// close most of that gap.
///
/// It is unreliable, as any estimate from n rows must be, when the error sits in fewer than about
/// 1 / n of the rows and the kernel's output norms do not point to them: a sample that misses
/// them reports a small error with a narrow interval. Example: causal attention through the
/// front door's decomposition on a head that attends to fixed neighbours is exact except on the
/// ~N / 128 rows at block boundaries (coverage 11% at N = 1024, n = 32); give such heads an exact
/// band (banded<P>) or more samples.
///
/// **Cost**: P's cost, plus, when an estimate is asked for, O(Lv M) for the output norms and
/// O(n Sv (E + M)) for the exact rows (n = 32 at L = S = 4096: 0.8% of dense attention's work;
/// on the benchmark's peaked inputs, where the rows exponentiate and multiply only the weights
/// they keep, 8-15% of the approximate kernels' time, clustered's the most: see the README),
/// plus dense's cost for a head that falls back. Scratch O(Lv + n (E + M)) from the thread's arena
/// (O(Lv M) when samples >= Lv).
///
/// **Reports**: `report`, when not empty, receives one `error_estimate` per head, at index
/// ctx.stream: the front door uses stream 0 (report needs >= 1 entry), multihead_attention uses
/// b * H + h, so give it B * H entries (head (b, h) writes report[b * H + h]). A head whose
/// stream is outside the span throws invalid_argument naming "report" (in multihead_attention,
/// after the other heads have run: out is then unspecified). Heads with no valid query or key
/// are not computed and leave their entry untouched (value-initialise the span).
///
/// **Determinism**: the draws come from `seed` and ctx.stream through the library's generator
/// (detail/rng.hpp) on a stream distinct from P's own draws even when the seeds are equal: the
/// same seed gives the same sample, estimate and output on any thread count.
///
/// Name and flags: it is P (`name` is P's, `is_exact` is P's); its knobs are `tolerance`,
/// `samples`, `min_length` and `seed`; validate() checks P's. supports_causal when P can be
/// causal natively or through the front door's decomposition (P's log-sum-exp), which guarded
/// then applies to P; it returns a log-sum-exp when P does (dense's exact one when it falls back
/// or runs dense).
template <class Inner>
struct guarded {
  static_assert(attention_policy<Inner>, "fastattn::guarded wraps an attention policy");
  static constexpr std::string_view name = Inner::name;           ///< P's name
  static constexpr bool is_exact = Inner::is_exact;               ///< P's
  static constexpr bool supports_causal = causal_capable<Inner>;  ///< natively or by decomposition
  /// Nominal coverage of the reported intervals.
  static constexpr double confidence = 0.95;

  Inner inner{};  ///< the kernel
  /// A head whose estimated relative error exceeds this (or is NaN) is recomputed exactly, in
  /// [0, +inf] (not NaN); +inf (the default): estimate only, never fall back.
  double tolerance = std::numeric_limits<double>::infinity();
  index samples = 32;  ///< rows drawn and computed exactly per head, in [1, 2^20]
  /// Valid queries below which dense attention is used without running the kernel, in
  /// [0, max index] (default: crossover(inner), the measured crossover at inner's knobs: for
  /// the clustering kernels it grows with their clusters, see policy.hpp).
  index min_length = fastattn::crossover(inner);
  std::uint64_t seed = 0;  ///< seed of the sampled rows (split per head by ctx.stream)
  /// Where each head's estimate goes (report[ctx.stream]); empty: no report. Not a knob. For
  /// multihead_attention it needs B * H entries; too short a span makes compute throw.
  std::span<error_estimate> report{};

  /// The knobs (tolerance, samples, min_length, seed) and their ranges, checked by the front door.
  static constexpr auto knobs() {
    return std::make_tuple(
        make_knob("tolerance", &guarded::tolerance,
                  "recompute a head exactly when its estimated relative error exceeds this "
                  "(inf: estimate only)",
                  0.0, std::numeric_limits<double>::infinity()),
        make_knob("samples", &guarded::samples,
                  "query rows per head computed exactly to estimate the error", 1, index{1} << 20),
        make_knob("min_length", &guarded::min_length,
                  "valid queries below which dense attention is used instead of the kernel", 0,
                  std::numeric_limits<index>::max()),
        make_knob("seed", &guarded::seed, "seed of the rows sampled for the error estimate"));
  }

  /// Checks the inner kernel's knobs (the front door checks guarded's own): throws
  /// fastattn::invalid_argument as fastattn::validate(inner) does.
  void validate() const { fastattn::validate(inner); }

  /// Throws fastattn::invalid_argument naming "report" when report is not empty and has fewer
  /// than `streams` entries, and as validate_streams(inner, streams) does (the front door and
  /// multihead_attention call it before any work).
  void validate_streams(index streams) const {
    if (!report.empty() && static_cast<index>(report.size()) < streams)
      detail::fail("report", "guarded: report has ", report.size(), " entries for ", streams,
                   " heads: report needs one entry per head (B * H for multihead_attention, head "
                   "(b, h) at b * H + h)");
    fastattn::validate_streams(inner, streams);
  }

  /// Preconditions (ensured by the front door): knobs in range, Lv >= 1, Sv >= 1. Throws
  /// invalid_argument naming "report" when report is not empty and ctx.stream is outside it.
  template <class T>
  void compute(const_view<T> q, const_view<T> k, const_view<T> v, view<T> out,
               const context& ctx) const {
    run<T>(q, k, v, out, ctx, {});
  }

  /// As above; `lse`, when not empty, receives each valid row's log-sum-exp: P's when P's output
  /// is kept, dense's when the head runs dense. Only when P `provides_lse`. Throws as above.
  template <class T>
  void compute(const_view<T> q, const_view<T> k, const_view<T> v, view<T> out, const context& ctx,
               std::span<T> lse) const requires provides_lse<Inner> {
    run<T>(q, k, v, out, ctx, lse);
  }

  /// The estimate of P's error on one head, as compute makes it: `approx` holds P's output rows
  /// [0, ctx.query_length) for q, k, v and ctx; the draws depend on `seed` and ctx.stream.
  /// fell_back is false. Preconditions as for compute, and `approx` has at least
  /// ctx.query_length rows of v's width. Does not use `report` or `tolerance`; does not throw
  /// invalid_argument.
  template <class T>
  error_estimate estimate(const const_view<T>& q, const const_view<T>& k, const const_view<T>& v,
                          const const_view<T>& approx, const context& ctx) const {
    const index Lv = ctx.query_length, Sv = ctx.key_length, M = v.cols();
    const dense exact{};
    const detail::arena::scope scratch;
    if (samples >= Lv) {  // every row: the true error
      auto rows = detail::scratch_matrix<T>(Lv, M);
      exact.compute(q, k, v, view<T>(rows), ctx);
      double se = 0, sx = 0;
      const double unit = detail::norm_unit(
          std::max(detail::largest_magnitude(approx.topRows(Lv)), detail::largest_magnitude(rows)));
      for (index i = 0; i < Lv; ++i) {
        const auto x = (rows.row(i).template cast<double>() * unit).eval();
        se += ((approx.row(i).template cast<double>() * unit) - x).squaredNorm();
        sx += x.squaredNorm();
      }
      const double error =
          sx > 0 ? std::sqrt(se / sx) : (se > 0 ? std::numeric_limits<double>::infinity() : se);
      return {error, error, error, 1.0, Lv, false};
    }

    // Selection probabilities p_i = (||a_i||^2 / A + 1 / Lv) / 2 and their running sums (uniform
    // when A is 0 or not finite).
    auto& arena = detail::arena::local();
    double* const p = arena.take<double>(static_cast<std::size_t>(Lv));
    double* const cumulative = arena.take<double>(static_cast<std::size_t>(Lv));
    // p[i] = ||u a_i||^2 and their sum: in T when u = 1 (a sum of M squares in T suffices for a
    // probability), else in double.
    auto squared_norms = [&](double unit) {
      double sum = 0;
      for (index i = 0; i < Lv; ++i) {
        p[i] = unit == 1.0 ? static_cast<double>(approx.row(i).squaredNorm())
                           : (approx.row(i).template cast<double>() * unit).squaredNorm();
        sum += p[i];
      }
      return sum;
    };
    double total = squared_norms(1.0);
    // Squares past T's range, or so small that they lost their digits (T's smallest normal
    // number is 1e-38 in float), would make the draws depend on the values' magnitude: again,
    // with the rows scaled by a power of two (not in the common case).
    if (!(std::isfinite(total) && total > 1e-30)) {
      const double unit = detail::norm_unit(detail::largest_magnitude(approx.topRows(Lv)));
      if (unit != 1.0) total = squared_norms(unit);
    }
    const bool by_norm = total > 0 && std::isfinite(total);
    const double uniform = 1 / static_cast<double>(Lv), half_share = by_norm ? 0.5 / total : 0;
    double running = 0;
    for (index i = 0; i < Lv; ++i) {
      p[i] = by_norm ? half_share * p[i] + 0.5 * uniform : uniform;
      running += p[i];
      cumulative[i] = running;
    }
    // Draws: u uniform in [0, sum p), row = first i with cumulative[i] > u; sorted, and the
    // distinct rows with their multiplicities.
    const index n = samples;
    index* const drawn = arena.take<index>(static_cast<std::size_t>(n));
    index* const counts = arena.take<index>(static_cast<std::size_t>(n));
    detail::rng gen(seed ^ sample_stream_tag, ctx.stream);
    for (index t = 0; t < n; ++t) {
      const double u = gen.uniform() * running;
      drawn[t] =
          std::min<index>(std::upper_bound(cumulative, cumulative + Lv, u) - cumulative, Lv - 1);
    }
    std::sort(drawn, drawn + n);
    index unique = 0;
    for (index t = 0; t < n; ++t) {
      if (unique > 0 && drawn[unique - 1] == drawn[t]) {
        ++counts[unique - 1];
      } else {
        drawn[unique] = drawn[t];
        counts[unique++] = 1;
      }
    }

    // The drawn rows, exactly (detail/exact_rows.hpp: the few rows are the lanes of the score
    // tiles, the keys read where they lie; causal row i sees keys [0, min(i + 1, Sv))). The
    // values' finiteness lets P V skip the dropped weights.
    auto rows = detail::scratch_matrix<T>(unique, M);
    index* const ends = ctx.causal ? arena.take<index>(static_cast<std::size_t>(unique)) : nullptr;
    if (ends)
      for (index r = 0; r < unique; ++r) ends[r] = std::min(drawn[r] + 1, Sv);
    const bool finite =
        ctx.checked_finite || detail::flash::all_finite(v.data(), v.outerStride(), Sv, M);
    detail::exact_rows<T>(q, drawn, ends, unique, k, v, Sv, ctx.scale, view<T>(rows), ctx.threads,
                          finite);

    double* const y = arena.take<double>(static_cast<std::size_t>(n));
    double* const w = arena.take<double>(static_cast<std::size_t>(n));
    detail::ratio_accumulator acc(y, w);
    double most = detail::largest_magnitude(rows);
    for (index r = 0; r < unique; ++r)
      most = std::max(most, detail::largest_magnitude(approx.row(drawn[r])));
    const double unit = detail::norm_unit(most);
    for (index r = 0; r < unique; ++r) {
      const index i = drawn[r];
      const auto x = (rows.row(r).template cast<double>() * unit).eval();
      const double e = ((approx.row(i).template cast<double>() * unit) - x).squaredNorm();
      acc.add(e, x.squaredNorm(), p[i], counts[r]);
    }
    const detail::ratio_estimate r = acc.finish();
    return {r.error, r.lower, r.upper, confidence, n, false};
  }

 private:
  // Distinguishes the sample's generator from the inner kernel's rng(seed, stream).
  static constexpr std::uint64_t sample_stream_tag = 0x9A4D5E0C3B1F7265ULL;

  template <class T>
  void run(const const_view<T>& q, const const_view<T>& k, const const_view<T>& v, view<T> out,
           const context& ctx, std::span<T> lse) const {
    if (!report.empty() && ctx.stream >= report.size())
      detail::fail("report", "guarded: report has ", report.size(),
                   " entries but this head's stream is ", ctx.stream,
                   ": report needs one entry per head (B * H for multihead_attention, head (b, h) "
                   "at b * H + h)");
    const dense exact{};
    error_estimate est{};
    if (ctx.query_length < min_length) {
      exact.compute(q, k, v, out, ctx, lse);
      est.confidence = 1.0;
    } else {
      detail::compute_head(inner, q, k, v, out, ctx, lse);
      const bool guarding = tolerance < std::numeric_limits<double>::infinity();
      if (report.empty() && !guarding) return;
      est = estimate<T>(q, k, v, const_view<T>(out), ctx);
      if (guarding && !(est.error <= tolerance)) {
        exact.compute(q, k, v, out, ctx, lse);
        est.fell_back = true;
      }
    }
    if (!report.empty()) report[static_cast<std::size_t>(ctx.stream)] = est;
  }
};

/// Whether P is a `guarded<...>` (for code that reads its report or its inner kernel).
template <class P>
inline constexpr bool is_guarded = false;
template <class Inner>
inline constexpr bool is_guarded<guarded<Inner>> = true;

}  // namespace fastattn
