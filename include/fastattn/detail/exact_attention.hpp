// Exact attention streamed over key blocks with the online softmax: the machinery of `dense`,
// shared with every kernel that needs exact attention of some rows (clustered's centroids, the
// band of `local`).
#pragma once

#include <algorithm>
#include <optional>

#include "../merge.hpp"
#include "../policy.hpp"
#include "online_softmax.hpp"
#include "scratch.hpp"

namespace fastattn::detail {

/// Tile sizes of the streamed exact attention.
struct tiles {
  index query_block = 128;  ///< queries per tile
  index key_block = 512;    ///< keys per tile
};

/// out.row(i) = softmax(scale q_i K^T + mask) V for i in [0, rows), over keys [0, keys), where
/// `visible` (when set) restricts query i to keys i + lower <= j <= i + upper; a row that sees no
/// key gets zeros. Key tiles outside every query's band are skipped, tiles inside every query's
/// band are not masked. When `lse` is given it receives log sum_j exp(scale q_i . k_j) per row
/// (-inf for a row that sees no key). Extra memory O(query_block (key_block + E + M)) from the
/// calling thread's arena: no rows x keys matrix.
template <class T>
void exact_attention(const_view<T> q, const_view<T> k, const_view<T> v, view<T> out, index rows,
                     index keys, double scale, std::optional<fastattn::band> visible, tiles t,
                     T* lse = nullptr) {
  if (rows == 0) return;
  const index bq = std::min(t.query_block, rows);
  const index bk = std::min(t.key_block, std::max<index>(keys, 1));
  const arena::scope scratch;
  online_softmax<T> softmax(bq, bk, v.cols());
  auto scaled_q = scratch_matrix<T>(bq, q.cols());
  const T s = static_cast<T>(scale);

  for (index i0 = 0; i0 < rows; i0 += bq) {
    const index n = std::min(bq, rows - i0);
    scaled_q.topRows(n) = q.middleRows(i0, n) * s;
    softmax.reset(n);
    const auto [first, last] = visible ? visible->keys_of(i0, n, keys) : std::pair<index, index>{0, keys};
    for (index j0 = first; j0 < last; j0 += bk) {
      const index cols = std::min(bk, last - j0);
      softmax.scores(cols).noalias() = scaled_q.topRows(n) * k.middleRows(j0, cols).transpose();
      // Only the tiles that cross the band's edges need a mask.
      const bool masked = visible && !visible->covers(i0, n, j0, cols);
      softmax.absorb(cols, v.middleRows(j0, cols),
                     masked ? std::optional<fastattn::band>(visible->relative(i0, j0)) : std::nullopt);
    }
    softmax.finish(out.middleRows(i0, n), lse ? lse + i0 : nullptr);
  }
}

/// As exact_attention, and without the keys of `exclude` (query i gives no weight to key j when
/// i + exclude->lower <= j <= i + exclude->upper, indices of this call): the visible keys are then
/// at most two bands, computed separately and merged by log-sum-exp. `lse` must not be null.
template <class T>
void exact_attention_excluding(const_view<T> q, const_view<T> k, const_view<T> v, view<T> out,
                               index rows, index keys, double scale, std::optional<band> visible,
                               std::optional<band> exclude, tiles t, T* lse) {
  const band all = visible.value_or(band{});
  if (!exclude) return exact_attention<T>(q, k, v, out, rows, keys, scale, visible, t, lse);
  const band below{all.lower, std::min(all.upper, exclude->lower - 1)};
  const band above{std::max(all.lower, exclude->upper + 1), all.upper};
  exact_attention<T>(q, k, v, out, rows, keys, scale, below, t, lse);
  if (above.lower > above.upper) return;
  const arena::scope scratch;
  auto part = scratch_matrix<T>(rows, v.cols());
  T* const part_lse = arena::local().take<T>(static_cast<std::size_t>(rows));
  exact_attention<T>(q, k, v, view<T>(part), rows, keys, scale, above, t, part_lse);
  for (index r = 0; r < rows; ++r) merge_row(out.row(r), lse[r], part.row(r), part_lse[r]);
}

}  // namespace fastattn::detail
