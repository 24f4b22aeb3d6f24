// Exact attention, streamed over key blocks with an online softmax.
#pragma once

#include <optional>
#include <span>
#include <string_view>
#include <tuple>

#include "attention.hpp"
#include "detail/exact_attention.hpp"

namespace fastattn {

/// Exact attention: O = softmax(scale * Q K^T + masks) V.
///
/// The fused block kernel (detail/flash_block.hpp): the keys are packed once as K^T panels, then
/// queries are processed in blocks of `query_block` rows, each streaming the keys in blocks of
/// `key_block` through register tiles of Q K^T, the online softmax and P V, so the extra memory
/// is O(S E + query_block (key_block + M + E)) whatever L and S are: no L x S matrix is ever
/// formed. Query blocks are shared by context::threads. The scratch comes from the calling
/// thread's reusable arena (detail/scratch.hpp), so repeated calls allocate nothing.
/// Cost: 4 L S E flops for E = M (2 L S E for Q K^T, 2 L S M for P V) plus L S exponentials;
/// causal skips the key blocks above the diagonal (about half). A row with no visible key
/// outputs zeros.
struct dense {
  static constexpr std::string_view name = "dense";  ///< its name in tools and messages
  static constexpr bool is_exact = true;             ///< exact, up to rounding
  static constexpr bool supports_causal = true;      ///< natively, skipping masked blocks

  // Defaults tuned on an AVX-512 core at E = M = 64 (a 128 x 512 float score tile is 256 KiB).
  index query_block = 128;  ///< queries per block, in [1, 4096]
  index key_block = 512;    ///< keys per block, in [1, 65536]

  /// The knobs and their ranges, checked by the front door (see make_knob).
  static constexpr auto knobs() {
    return std::make_tuple(
        make_knob("query_block", &dense::query_block, "queries per block", 1, 4096),
        make_knob("key_block", &dense::key_block,
                  "keys per block streamed through the online softmax", 1, 65536));
  }

  /// Checks across knobs. Throws fastattn::invalid_argument (naming key_block) when the score
  /// tile query_block x key_block exceeds 2^24 entries.
  void validate() const {
    if (query_block * key_block > (index{1} << 24))
      detail::fail("key_block", "dense: query_block * key_block must be at most 2^24 (a 64 MiB ",
                   "float score tile), got ", query_block, " * ", key_block);
  }

  /// Preconditions (ensured by the front door): knobs in range, Lv >= 1, Sv >= 1.
  /// `lse`, when not empty, receives each valid row's log-sum-exp of its visible scores.
  template <class T>
  void compute(const_view<T> q, const_view<T> k, const_view<T> v, view<T> out, const context& ctx,
               std::span<T> lse = {}) const {
    detail::exact_attention<T>(q, k, v, out, ctx.query_length, ctx.key_length, ctx.scale,
                               ctx.causal ? std::optional(band::causal()) : std::nullopt,
                               {query_block, key_block, ctx.threads},
                               lse.empty() ? nullptr : lse.data());
  }
};

}  // namespace fastattn
