// Improved clustered attention (Vyas, Katharopoulos, Fleuret 2020, section 3.3): clustered
// attention, plus exact attention of every query on its cluster's top-k keys.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string_view>
#include <vector>

#include "attention.hpp"
#include "detail/clustering.hpp"
#include "detail/rng.hpp"
#include "detail/scratch.hpp"
#include "detail/topk.hpp"

namespace fastattn {

/// Improved clustered attention. After clustering the valid queries exactly as `clustered` does
/// (same hashing, same k-means, same centroids for the same seed), for each cluster j with
/// centroid probabilities A_c[j] = softmax(scale c_j K^T + key mask):
///
/// - T_j = the k = min(topk, Sv) keys with the largest centroid scores (ties to the lower key
///   index; padded keys never qualify), m_j = sum of A_c[j, l] over l in T_j;
/// - every member query i gets
///   O_i = m_j sum_{l in T_j} softmax_l(scale q_i . k_l) v_l + sum_{l not in T_j} A_c[j, l] v_l,
///   i.e. exact attention on T_j rescaled to the centroid's mass there, and the centroid's
///   attention on the other keys (not renormalised). The second term is computed directly (the
///   centroid row with T_j zeroed, times V), not as a difference, so it loses no precision.
///
/// Its L1 distance to the exact attention row is never larger than clustered's (paper, appendix),
/// and topk >= Sv makes it exact whatever the clustering.
///
/// Cost: clustered's hashing and k-means + 2 C S (E + M) (centroid scores and residual rows, the
/// C x S probabilities are kept) + O(C S) top-k selection + 2 Lv k (E + M) (members against their
/// cluster's k keys, one (members x E) * (E x k) product per cluster). Linear in L and S for fixed
/// C and k; extra memory O(C S + Lv + largest cluster x (k + E + M)), never L x S.
///
/// Padding, determinism and the clamp of `clusters` to the valid queries are as for clustered.
/// Not causal: `supports_causal` is false.
struct improved_clustered {
  static constexpr std::string_view name = "improved_clustered";
  static constexpr bool is_exact = false;
  static constexpr bool supports_causal = false;

  /// Number of clusters C, >= 1; clamped to the valid queries Lv (see clustered::clusters).
  index clusters = 100;
  /// Hash length B in bits, in [1, 64].
  int bits = 63;
  /// K-means assignment passes, >= 1 (see clustered::iterations).
  int iterations = 10;
  /// Whether the hyperplanes have random thresholds (see clustered::hash_bias).
  bool hash_bias = true;
  /// Seed of every random draw (split per head by ctx.stream).
  std::uint64_t seed = 0;
  /// Keys per cluster attended exactly, >= 1 (32 in the paper); clamped to the valid keys Sv,
  /// where the kernel becomes exact.
  index topk = 32;

  template <class T>
  void compute(const_view<T> q, const_view<T> k, const_view<T> v, view<T> out,
               const context& ctx) const {
    const detail::clustering_knobs knobs{clusters, bits, iterations, hash_bias};
    detail::check_clustering_knobs(name, knobs);
    if (topk < 1) detail::fail(name, ": topk must be >= 1, got topk = ", topk);
    const index Lv = ctx.query_length, Sv = ctx.key_length;
    const index E = q.cols(), M = v.cols();
    out.bottomRows(out.rows() - Lv).setZero();
    if (Lv == 0) return;
    if (Sv == 0) {  // no visible key: zero rows, as dense
      out.topRows(Lv).setZero();
      return;
    }

    const detail::arena::scope scratch;  // the thread's reusable scratch: no allocation per call
    detail::rng gen(seed, ctx.stream);
    detail::query_clustering<T> groups;
    groups.run(q, Lv, knobs, gen);
    const index C = groups.count(), top = std::min(topk, Sv);
    const T scale = T(ctx.scale);
    const auto keys = k.topRows(Sv);
    const auto values = v.topRows(Sv);

    // Centroid scores (C x Sv), their top-k, then probabilities with the top-k zeroed.
    auto probabilities = detail::scratch_matrix<T>(C, Sv);
    probabilities.noalias() = (groups.centroids() * scale) * keys.transpose();
    index* const selected = detail::arena::local().take<index>(static_cast<std::size_t>(C * top));
    T* const mass = detail::arena::local().take<T>(static_cast<std::size_t>(C));
    detail::top_k<T> select;
    for (index j = 0; j < C; ++j) {
      auto row = probabilities.row(j);
      index* chosen = selected + j * top;
      select(row.data(), Sv, top, chosen);
      const T peak = row.maxCoeff();
      if (!(peak > -std::numeric_limits<T>::infinity())) {  // no finite score: zero row
        row.setZero();
        mass[j] = T(0);
        continue;
      }
      row = (row.array() - peak).exp();
      row /= row.sum();
      T m = 0;
      for (index t = 0; t < top; ++t) {
        m += row(chosen[t]);
        row(chosen[t]) = T(0);
      }
      mass[j] = m;
    }
    // The centroid's attention on the keys outside its top-k.
    auto residual = detail::scratch_matrix<T>(C, M);
    residual.noalias() = probabilities * values;

    // Members against their cluster's top-k keys: one small product per cluster.
    const index most = groups.largest();
    auto member_q = detail::scratch_matrix<T>(most, E);
    auto top_keys = detail::scratch_matrix<T>(top, E);
    auto top_values = detail::scratch_matrix<T>(top, M);
    auto scores = detail::scratch_matrix<T>(most, top);
    auto member_out = detail::scratch_matrix<T>(most, M);
    for (index j = 0; j < C; ++j) {
      const index n = groups.size(j), first = groups.begin(j);
      const index* chosen = selected + j * top;
      for (index t = 0; t < top; ++t) {
        top_keys.row(t) = keys.row(chosen[t]) * scale;
        top_values.row(t) = values.row(chosen[t]);
      }
      for (index r = 0; r < n; ++r) member_q.row(r) = q.row(groups.member(first + r));
      auto s = scores.topRows(n);
      s.noalias() = member_q.topRows(n) * top_keys.transpose();
      const T m = mass[j];
      for (index r = 0; r < n; ++r) {
        auto row = s.row(r);
        row = (row.array() - row.maxCoeff()).exp();
        row *= m / row.sum();
      }
      member_out.topRows(n).noalias() = s * top_values;
      for (index r = 0; r < n; ++r)
        out.row(groups.member(first + r)) = member_out.row(r) + residual.row(j);
    }
  }
};

}  // namespace fastattn
