// Exact attention streamed over key blocks with the online softmax, by the fused block kernel
// (flash_block.hpp): the machinery of `dense`, shared with every kernel that needs exact attention
// of some rows (clustered's centroids, the band of `local`, the guard's sampled rows).
#pragma once

#include <algorithm>
#include <optional>

#include "../merge.hpp"
#include "../policy.hpp"
#include "band_attention.hpp"
#include "flash_block.hpp"
#include "scratch.hpp"

namespace fastattn::detail {

/// Tile sizes of the streamed exact attention.
struct tiles {
  index query_block = 128;  ///< queries per tile
  index key_block = 512;    ///< keys per tile
  int threads = 1;          ///< threads sharing the query blocks (the result does not change)
  /// Whether weights below eps / (16 keys) of a row's largest may be dropped (at most eps / 16
  /// of the row's total, within exact attention's rounding), and each row's P V then skip them
  /// when few are left: on peaked attention most of the P V product. Off for dense and local
  /// (the exact kernels keep every weight); on for the few rows of clustered's centroids and the
  /// guard's exact rows. See flash_block::drop_below.
  bool drop_negligible = false;
  /// Whether v's rows are known finite (context::checked_finite): dropped weights are then
  /// skipped without checking them (see flash_block::drop_below).
  bool finite_values = false;
};

/// Query rows per block for `rows` rows on `threads` threads: all of them in one block when
/// there are at most `most` (the fused kernel then shares the block's key blocks among the
/// threads), otherwise at most `most` and small enough that every thread gets a block. Whether
/// the rows make one block does not depend on `threads`, and among several blocks a row's result
/// does not depend on them (each row's scores, softmax and accumulation see the same key blocks
/// in the same order), so this choice never changes the output.
inline index rows_per_thread(index rows, int threads, index most = 128) {
  if (rows <= most) return std::max<index>(rows, 1);
  const index share = (rows + threads - 1) / std::max(threads, 1);
  return std::clamp<index>((share + 7) / 8 * 8, 1, most);
}

/// out.row(i) = softmax(scale q_i K^T + mask) V for i in [0, rows), over keys [0, keys), where
/// `visible` (when set) restricts query i to keys i + lower <= j <= i + upper; a row that sees no
/// key gets zeros. Key tiles outside every query's band are skipped, tiles inside every query's
/// band are not masked. When `lse` is given it receives log sum_j exp(scale q_i . k_j) per row
/// (-inf for a row that sees no key). Extra memory O(keys E + query_block (key_block + E + M))
/// (the keys packed once, and one block's state) from the calling thread's arena: no rows x keys
/// matrix.
template <class T>
void exact_attention(const_view<T> q, const_view<T> k, const_view<T> v, view<T> out, index rows,
                     index keys, double scale, std::optional<fastattn::band> visible, tiles t,
                     T* lse = nullptr) {
  if (rows == 0) return;
  // A narrow band (local's window, banded's): diagonal by diagonal, no score outside it.
  if (visible && !t.drop_negligible && goes_by_diagonals(*visible))
    return band_attention<T>(q, k, v, out, rows, keys, scale, *visible, t.threads, lse);
  with_flash_geometry<T>(v.cols(), [&]<class G>(G) {
    flash_attention<G>(q, k, v, out, rows, keys, scale, visible, t.query_block, t.key_block,
                       t.threads, lse, t.drop_negligible, t.finite_values);
  });
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
