// A fifth kernel, written as a user would write one: against fastattn's public concept only
// (policy.hpp: const_view, view, context, make_knob) and Eigen, with no detail/ header. The typed
// suites (test_attention, test_edge_cases, test_determinism) run it beside the kernels of
// fastattn::kernels, which shows that a user policy works everywhere a built-in one does: the front
// door, the multi-head driver, knob validation, padding, determinism across threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include <Eigen/Core>
#include <fastattn/policy.hpp>

namespace user_kernels {

/// Key sampling: every valid query of a head attends exactly to the same `keys` valid keys, drawn
/// uniformly without replacement from (seed, context::stream), so each (batch, head) draws its
/// own keys and the result does not depend on scheduling. O(Lv keys (E + M)) time, an Lv x keys
/// score matrix. Exact (up to rounding) when keys >= Sv. Every output row is a convex combination
/// of valid value rows. Not causal.
struct key_sample {
  static constexpr std::string_view name = "key_sample";
  static constexpr bool is_exact = false;
  static constexpr bool supports_causal = false;

  fastattn::index keys = 64;  ///< keys every query attends to, in [1, 2^31]; clamped to Sv
  std::uint64_t seed = 0;     ///< seed of the draw

  static constexpr auto knobs() {
    return std::make_tuple(
        fastattn::make_knob("keys", &key_sample::keys,
                            "keys every query attends to (clamped to the valid keys)", 1,
                            fastattn::index{1} << 31),
        fastattn::make_knob("seed", &key_sample::seed, "seed of the key draw"));
  }

  /// Preconditions (the front door's): knobs in range, Lv >= 1, Sv >= 1. Writes rows [0, Lv).
  template <class T>
  void compute(fastattn::const_view<T> q, fastattn::const_view<T> k, fastattn::const_view<T> v,
               fastattn::view<T> out, const fastattn::context& ctx) const {
    using fastattn::index;
    const index Lv = ctx.query_length, Sv = ctx.key_length, m = std::min(keys, Sv);
    // A partial Fisher-Yates shuffle of [0, Sv) driven by splitmix64 over (seed, stream); the
    // chosen keys in ascending order, so keys >= Sv is plain attention.
    std::vector<index> order(static_cast<std::size_t>(Sv));
    std::iota(order.begin(), order.end(), index{0});
    std::uint64_t state = seed ^ (ctx.stream * 0xD1B54A32D192ED03ULL + 0x632BE59BD9B4E019ULL);
    auto next = [&state] {
      std::uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
      return z ^ (z >> 31);
    };
    for (index t = 0; t < m; ++t) {
      const auto pick = t + static_cast<index>(next() % static_cast<std::uint64_t>(Sv - t));
      std::swap(order[static_cast<std::size_t>(t)], order[static_cast<std::size_t>(pick)]);
    }
    std::sort(order.begin(), order.begin() + m);

    fastattn::matrix<T> sampled_k(m, k.cols()), sampled_v(m, v.cols());
    for (index t = 0; t < m; ++t) {
      sampled_k.row(t) = k.row(order[static_cast<std::size_t>(t)]);
      sampled_v.row(t) = v.row(order[static_cast<std::size_t>(t)]);
    }
    fastattn::matrix<T> weights =
        (q.topRows(Lv) * static_cast<T>(ctx.scale)) * sampled_k.transpose();
    for (index i = 0; i < Lv; ++i) {
      auto row = weights.row(i);
      row = (row.array() - row.maxCoeff()).exp();
      row /= row.sum();
    }
    out.topRows(Lv).noalias() = weights * sampled_v;
  }
};

}  // namespace user_kernels
