// An exact local band for any kernel that returns its log-sum-exp: positional heads stay exact.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <span>
#include <string_view>
#include <tuple>

#include "attention.hpp"
#include "local.hpp"
#include "merge.hpp"

namespace fastattn {

/// `banded<P>`: the keys within `window` positions of each query (earlier ones only when causal)
/// get the query's own exact scores; every other key comes from the kernel P; the two parts are
/// merged by log-sum-exp (merge.hpp). A head that attends to fixed neighbours (i - 1, i + 1) is
/// then exact up to rounding whatever P's clustering does, while content-based attention keeps
/// P's cost.
///
/// How the parts stay disjoint: a P with `supports_exclusion` (clustered, improved_clustered,
/// smyrf) is called with context::exclude set to the band, and gives those keys zero weight
/// itself (causal too: its decomposition excludes them in every block). For any other P with
/// log-sum-exp, the band's exact contribution is subtracted from P's normaliser:
/// Z_rest = Z_P - Z_band, O_rest = (Z_P O_P - Z_band O_band) / Z_rest (dropped when Z_rest <= 0):
/// exact when P is exact, an approximation otherwise.
///
/// Cost: P's cost plus local's, O(N window d), plus O(N window (E + M)) for the exclusion.
/// Name and flags: it is P (`name` is P's); its knobs are P's (in `inner`, checked by validate())
/// plus `window` (`knobs()` lists `window` only). P must satisfy `provides_lse` (a static_assert).
template <class Inner>
struct banded {
  static_assert(provides_lse<Inner>,
                "fastattn::banded needs a kernel that returns its log-sum-exp");
  static constexpr std::string_view name = Inner::name;  ///< P's name
  static constexpr bool is_exact = Inner::is_exact;      ///< exact when P is
  static constexpr bool supports_causal = true;          ///< P natively or by decomposition

  Inner inner{};      ///< the kernel for the keys outside the band
  index window = 16;  ///< keys within this distance of a query are exact, in [0, 2^30]

  /// The `window` knob and its range, checked by the front door (see make_knob).
  static constexpr auto knobs() {
    return std::make_tuple(make_knob("window", &banded::window,
                                     "exact local band: keys within W positions of a query", 0,
                                     index{1} << 30));
  }

  /// Checks the inner kernel's knobs (the front door checks `window`): throws
  /// fastattn::invalid_argument as fastattn::validate(inner) does.
  void validate() const { fastattn::validate(inner); }

  /// Throws as validate_streams(inner, streams) does (a guarded kernel inside the band).
  void validate_streams(index streams) const { fastattn::validate_streams(inner, streams); }

  /// Preconditions (ensured by the front door): knobs in range, Lv >= 1, Sv >= 1. `lse`, when
  /// not empty, receives each row's log normaliser (band and rest together).
  template <class T>
  void compute(const_view<T> q, const_view<T> k, const_view<T> v, view<T> out, const context& ctx,
               std::span<T> lse = {}) const {
    const index Lv = ctx.query_length;
    const detail::arena::scope scratch;
    T* const row_lse =
        lse.empty() ? detail::arena::local().take<T>(static_cast<std::size_t>(Lv)) : lse.data();
    const auto rows_lse = std::span<T>(row_lse, static_cast<std::size_t>(Lv));
    // The band, exactly.
    const local near{.window = window};
    near.compute(q, k, v, out, ctx, rows_lse);
    // The rest, from the kernel.
    auto part = detail::scratch_matrix<T>(Lv, v.cols());
    T* const part_lse = detail::arena::local().take<T>(static_cast<std::size_t>(Lv));
    const auto parts_lse = std::span<T>(part_lse, static_cast<std::size_t>(Lv));
    context rest = ctx;
    if constexpr (supports_exclusion<Inner>) {
      rest.exclude = local::visible(window, ctx.causal);
      detail::compute_head(inner, q, k, v, view<T>(part), rest, parts_lse);
    } else {
      detail::compute_head(inner, q, k, v, view<T>(part), rest, parts_lse);
      subtract_band(part, parts_lse, out, rows_lse);
    }
    detail::merge_rows(out, row_lse, part, part_lse, Lv);
  }

 private:
  // part := (Z_P O_P - Z_band O_band) / (Z_P - Z_band), its lse log(Z_P - Z_band); -inf when
  // nothing is left.
  template <class T, class Part>
  static void subtract_band(Part& part, std::span<T> part_lse, const view<T>& band_out,
                            std::span<T> band_lse) {
    constexpr T minus_inf = -std::numeric_limits<T>::infinity();
    for (index i = 0; i < part.rows(); ++i) {
      const auto r = static_cast<std::size_t>(i);
      if (!(band_lse[r] > minus_inf) || std::isnan(part_lse[r])) continue;
      const T ratio = std::exp(band_lse[r] - part_lse[r]);  // Z_band / Z_P
      if (!(ratio < T(1) - 16 * std::numeric_limits<T>::epsilon())) {
        part.row(i).setZero();
        part_lse[r] = minus_inf;
        continue;
      }
      part.row(i) = (part.row(i) - ratio * band_out.row(i)) / (T(1) - ratio);
      part_lse[r] += std::log1p(-ratio);
    }
  }
};

/// Whether P is a `banded<...>` (for code that reads its inner kernel).
template <class P>
inline constexpr bool is_banded = false;
template <class Inner>
inline constexpr bool is_banded<banded<Inner>> = true;

}  // namespace fastattn
