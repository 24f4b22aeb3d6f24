// Merging partial attentions of the same queries over disjoint key sets by their log-sum-exp.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <span>

#include "error.hpp"
#include "policy.hpp"

namespace fastattn {
namespace detail {

/// Folds one row's partial attention (part, part_lse) over a key set disjoint from the one
/// (out, lse) covers: with Z = e^lse and Z' = e^part_lse, out becomes (Z out + Z' part) / (Z + Z')
/// and lse becomes log(Z + Z'), computed relative to the larger lse so that nothing overflows
/// however large the scores. A part with lse = -inf (it saw no key) changes nothing; a NaN lse on
/// either side makes the row NaN.
template <class OutRow, class PartRow, class T>
void merge_row(OutRow&& out, T& lse, const PartRow& part, T part_lse) {
  constexpr T minus_inf = -std::numeric_limits<T>::infinity();
  if (std::isnan(lse)) return;
  if (std::isnan(part_lse)) {
    out.setConstant(std::numeric_limits<T>::quiet_NaN());
    lse = part_lse;
    return;
  }
  if (part_lse == minus_inf) return;
  if (lse == minus_inf) {
    out = part;
    lse = part_lse;
    return;
  }
  const T m = std::max(lse, part_lse);
  const T a = std::exp(lse - m), b = std::exp(part_lse - m);
  const T total = a + b;
  out = (a / total) * out + (b / total) * part;
  lse = m + std::log(total);
}

/// merge_row for rows [0, n) of out and part (lse[i], part_lse[i] the rows' log-sum-exps): the
/// weights of a block of rows at a time by Eigen's vectorised exp and log (a row at a time, two
/// exps and a log each were about half of the merge's cost at M = 64), then the rows. Rows whose
/// lse is -inf or NaN on either side take merge_row itself. The same result as merge_row row by
/// row, up to the rounding of the vectorised exp and log.
template <class Out, class Part, class T>
void merge_rows(Out& out, T* lse, const Part& part, const T* part_lse, index n) {
  using array = Eigen::Array<T, Eigen::Dynamic, 1>;
  constexpr index block = 128;
  constexpr T minus_inf = -std::numeric_limits<T>::infinity();
  alignas(64) T scratch[4 * block];
  for (index i0 = 0; i0 < n; i0 += block) {
    const index b = std::min(block, n - i0);
    const Eigen::Map<const array> a(lse + i0, b), p(part_lse + i0, b);
    Eigen::Map<array> wa(scratch, b), wb(scratch + block, b), merged(scratch + 2 * block, b),
        total(scratch + 3 * block, b);
    merged = a.max(p);  // the larger lse (the rows that use it have both finite)
    wa = (a - merged).exp();
    wb = (p - merged).exp();
    total = wa + wb;
    merged += total.log();
    wa /= total;
    wb /= total;
    for (index r = 0; r < b; ++r) {
      const index i = i0 + r;
      if (lse[i] > minus_inf && part_lse[i] > minus_inf) {
        out.row(i) = wa(r) * out.row(i) + wb(r) * part.row(i);
        lse[i] = merged(r);
      } else {
        merge_row(out.row(i), lse[i], part.row(i), part_lse[i]);
      }
    }
  }
}

}  // namespace detail

/// Combines two attentions of the same L queries over disjoint key sets into the attention over
/// their union: `out` and `lse` (L x M and L entries: the log-sum-exp of each row's scores, as
/// the front door returns it) are updated in place with `part` and `part_lse`. Exact when the
/// parts are exact; rows of a part that saw no key (lse = -inf) contribute nothing; no overflow
/// for large scores. A NaN part_lse makes the row and its lse NaN; a row whose lse is already
/// NaN is left as it is. The key sets must be disjoint (not checked).
/// Throws fastattn::invalid_argument (before changing anything) when part is not out's shape or
/// lse and part_lse do not both have one entry per row of out.
template <class T>
void merge_attention(view<T> out, std::span<T> lse, const_view<T> part,
                     std::span<const T> part_lse) {
  if (part.rows() != out.rows() || part.cols() != out.cols())
    detail::fail("part", "part must have out's shape ", out.rows(), " x ", out.cols(), ", got ",
                 part.rows(), " x ", part.cols());
  if (static_cast<index>(lse.size()) != out.rows() ||
      static_cast<index>(part_lse.size()) != out.rows())
    detail::fail("lse", "lse and part_lse must have one entry per row (", out.rows(), "), got ",
                 lse.size(), " and ", part_lse.size());
  detail::merge_rows(out, lse.data(), part, part_lse.data(), out.rows());
}

}  // namespace fastattn
