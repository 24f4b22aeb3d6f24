// Exact attention, streamed over key blocks with an online softmax.
#pragma once

#include <algorithm>
#include <optional>
#include <string_view>

#include "attention.hpp"
#include "detail/online_softmax.hpp"
#include "detail/scratch.hpp"

namespace fastattn {

/// Exact attention: O = softmax(scale * Q K^T + masks) V.
///
/// Queries are processed in blocks of `query_block` rows; for each block the keys are streamed in
/// blocks of `key_block` rows through an online softmax, so the extra memory is
/// O(query_block * (key_block + M + E)) whatever L and S are: no L x S matrix is ever formed. The
/// scratch comes from the calling thread's reusable arena (detail/scratch.hpp), so repeated calls
/// allocate nothing.
/// Cost: 4 L S E flops for E = M (2 L S E for Q K^T, 2 L S M for P V) plus L S exponentials;
/// causal halves both. Supports key and query padding and causal masking; a row with no visible
/// key outputs zeros.
struct dense {
  static constexpr std::string_view name = "dense";
  static constexpr bool is_exact = true;
  static constexpr bool supports_causal = true;

  // Defaults tuned on an AVX-512 core at E = M = 64 (a 128 x 512 float score tile is 256 KiB).
  index query_block = 128;  ///< queries per block, >= 1
  index key_block = 512;    ///< keys per block, >= 1

  template <class T>
  void compute(const_view<T> q, const_view<T> k, const_view<T> v, view<T> out,
               const context& ctx) const {
    if (query_block < 1 || key_block < 1)
      detail::fail("dense: query_block and key_block must be >= 1, got query_block = ", query_block,
                   ", key_block = ", key_block);
    const index Lv = ctx.query_length, Sv = ctx.key_length;
    out.bottomRows(out.rows() - Lv).setZero();
    if (Lv == 0) return;

    const index bq = std::min(query_block, Lv);
    const index bk = std::min(key_block, std::max<index>(Sv, 1));
    const detail::arena::scope scratch;
    detail::online_softmax<T> softmax(bq, bk, v.cols());
    auto scaled_q = detail::scratch_matrix<T>(bq, q.cols());
    const T scale = static_cast<T>(ctx.scale);

    for (index i0 = 0; i0 < Lv; i0 += bq) {
      const index rows = std::min(bq, Lv - i0);
      scaled_q.topRows(rows) = q.middleRows(i0, rows) * scale;
      softmax.reset(rows);
      const index key_end = ctx.causal ? std::min(Sv, i0 + rows) : Sv;
      for (index j0 = 0; j0 < key_end; j0 += bk) {
        const index cols = std::min(bk, key_end - j0);
        softmax.scores(cols).noalias() =
            scaled_q.topRows(rows) * k.middleRows(j0, cols).transpose();
        // Only the blocks that reach past the diagonal need the causal mask.
        const bool diagonal = ctx.causal && j0 + cols - 1 > i0;
        softmax.absorb(cols, v.middleRows(j0, cols),
                       diagonal ? std::optional<index>(i0 - j0) : std::nullopt);
      }
      softmax.finish(out.middleRows(i0, rows));
    }
  }
};

}  // namespace fastattn
