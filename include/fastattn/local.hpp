// Local (sliding-window) attention: exact attention to the keys within a window of each query.
#pragma once

#include <algorithm>
#include <span>
#include <string_view>
#include <tuple>

#include "attention.hpp"
#include "detail/exact_attention.hpp"

namespace fastattn {

/// Local attention: query i attends exactly, with its own scores, to the keys j with
/// |i - j| <= window (with causal: i - window <= j <= i), and to no other key. It equals exact
/// attention when window >= max(L, S), and is what positional heads (previous token, next token)
/// compute. It shares the band machinery of dense (detail/exact_attention.hpp): a band of at
/// most 64 keys a row (window <= 31, or <= 63 when causal) goes diagonal by diagonal
/// (detail/band_attention.hpp: no score outside the band is computed), a wider one by query
/// blocks of b = clamp(window, 16, 64) rows, each streaming only its b + 2 window keys.
///
/// Cost: 2 Lv (2 window + 1) (E + M) flops on the diagonal path, at most 2 Lv (b + 2 window)
/// (E + M) on the blocked one: O(N window d). Extra memory: the keys transposed or packed once,
/// O((L + S) E), and per thread O(64 (64 + window + E + M)). Keys at and beyond key_length are
/// never seen; a query whose window holds no valid key outputs zeros (lse -inf).
struct local {
  static constexpr std::string_view name = "local";  ///< its name in tools and messages
  static constexpr bool is_exact = false;            ///< exact on its window only
  static constexpr bool supports_causal = true;      ///< natively (the window's earlier side)

  index window = 16;  ///< keys seen on each side, in [0, 2^30] (earlier side only if causal)

  /// The knob and its range, checked by the front door (see make_knob).
  static constexpr auto knobs() {
    return std::make_tuple(make_knob("window", &local::window,
                                     "keys seen on each side of a query (earlier only if causal)",
                                     0, index{1} << 30));
  }

  /// The band of keys each query sees, in positions (key - query).
  static constexpr band visible(index window, bool causal) noexcept {
    return {-window, causal ? 0 : window};
  }

  /// Preconditions (ensured by the front door): window in range, Lv >= 1, Sv >= 1. `lse`, when
  /// not empty, receives each row's log-sum-exp over its window.
  template <class T>
  void compute(const_view<T> q, const_view<T> k, const_view<T> v, view<T> out, const context& ctx,
               std::span<T> lse = {}) const {
    const band b = visible(window, ctx.causal);
    const index shift = ctx.query_offset - ctx.key_offset;  // rows and keys at other positions
    // Query blocks of about the window (16 to 64 rows): a block then streams block + 2 window
    // keys, a third more than the 2 window + 1 each query needs, in products small enough for
    // the online softmax's unpacked path (at window 16, blocks of 16 took 0.8x the time of
    // blocks of 32).
    const index bq = std::clamp<index>(window, 16, 64);
    detail::exact_attention<T>(q, k, v, out, ctx.query_length, ctx.key_length, ctx.scale,
                               band{b.lower + shift, b.upper + shift},
                               {bq, std::min<index>(bq + 2 * window, 8192), ctx.threads},
                               lse.empty() ? nullptr : lse.data());
  }
};

}  // namespace fastattn
