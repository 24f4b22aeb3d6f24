// Improved clustered attention (Vyas, Katharopoulos, Fleuret 2020, section 3.3): clustered
// attention, plus exact attention of every query on its cluster's top-k keys.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string_view>
#include <tuple>
#include <vector>

#include "attention.hpp"
#include "detail/clustering.hpp"
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
/// Cost: clustered's hashing and k-means + 2 C S (E + M) (centroid scores and residual rows, in
/// blocks of 64 centroids) + O(C S) top-k selection + 2 Lv k (E + M) (members against their
/// cluster's k keys, in blocks of up to 128 members). Linear in L and S for fixed C and k; extra
/// memory O((64 + k) (S + E + M) + 128 k + Lv), never L x S whatever C and k are.
///
/// Padding, determinism and the clamp of `clusters` to the valid queries are as for clustered.
/// Not causal: `supports_causal` is false.
struct improved_clustered {
  static constexpr std::string_view name = "improved_clustered";
  static constexpr bool is_exact = false;
  static constexpr bool supports_causal = false;

  /// Number of clusters C, in [1, 2^32 - 1]; clamped to the valid queries Lv (see clustered::clusters).
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

  static constexpr auto knobs() {
    return std::tuple_cat(
        detail::clustering_knob_list<improved_clustered>(),
        std::make_tuple(make_knob("topk", &improved_clustered::topk,
                                  "keys each cluster attends to exactly (clamped to S)", 1,
                                  std::numeric_limits<index>::max())));
  }

  /// Preconditions (ensured by the front door): knobs in range, Lv >= 1, Sv >= 1.
  template <class T>
  void compute(const_view<T> q, const_view<T> k, const_view<T> v, view<T> out,
               const context& ctx) const {
    const index Sv = ctx.key_length, E = q.cols(), M = v.cols();
    const detail::arena::scope scratch;  // the thread's reusable scratch: no allocation per call
    auto& groups = detail::workspace<detail::query_clustering<T>>();
    groups.run(*this, q, ctx);
    const index C = groups.count(), top = std::min(topk, Sv);
    const T scale = T(ctx.scale);
    const auto keys = k.topRows(Sv);
    const auto values = v.topRows(Sv);
    auto& select = detail::workspace<detail::top_k<T>>();

    // Clusters are processed in blocks of `centroid_block`, and each cluster's members in blocks
    // of `member_block`, so the scratch is O((centroid_block + top) S + member_block top) whatever
    // C, the cluster sizes and topk are: never an L x S matrix, even with one cluster per query
    // and topk >= S.
    const index cb = std::min(C, centroid_block);
    const index bm = std::min(groups.largest(), member_block);
    auto probabilities = detail::scratch_matrix<T>(cb, Sv);
    index* const selected = detail::arena::local().take<index>(static_cast<std::size_t>(cb * top));
    T* const mass = detail::arena::local().take<T>(static_cast<std::size_t>(cb));
    auto residual = detail::scratch_matrix<T>(cb, M);
    auto member_q = detail::scratch_matrix<T>(bm, E);
    auto top_keys = detail::scratch_matrix<T>(top, E);
    auto top_values = detail::scratch_matrix<T>(top, M);
    auto scores = detail::scratch_matrix<T>(bm, top);
    auto member_out = detail::scratch_matrix<T>(bm, M);

    for (index c0 = 0; c0 < C; c0 += cb) {
      const index n = std::min(cb, C - c0);
      // Centroid scores (n x Sv), their top-k, then probabilities with the top-k zeroed.
      probabilities.topRows(n).noalias() =
          (groups.centroids().middleRows(c0, n) * scale) * keys.transpose();
      for (index j = 0; j < n; ++j) {
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
      residual.topRows(n).noalias() = probabilities.topRows(n) * values;

      // Members against their cluster's top-k keys: small products per block of members.
      for (index j = 0; j < n; ++j) {
        const index* chosen = selected + j * top;
        for (index t = 0; t < top; ++t) {
          top_keys.row(t) = keys.row(chosen[t]) * scale;
          top_values.row(t) = values.row(chosen[t]);
        }
        const T m = mass[j];
        const index first = groups.begin(c0 + j), last = groups.end(c0 + j);
        for (index r0 = first; r0 < last; r0 += bm) {
          const index rows = std::min(bm, last - r0);
          for (index r = 0; r < rows; ++r) member_q.row(r) = q.row(groups.member(r0 + r));
          auto s = scores.topRows(rows);
          s.noalias() = member_q.topRows(rows) * top_keys.transpose();
          for (index r = 0; r < rows; ++r) {
            auto row = s.row(r);
            row = (row.array() - row.maxCoeff()).exp();
            row *= m / row.sum();
          }
          member_out.topRows(rows).noalias() = s * top_values;
          for (index r = 0; r < rows; ++r)
            out.row(groups.member(r0 + r)) = member_out.row(r) + residual.row(j);
        }
      }
    }
  }

 private:
  static constexpr index centroid_block = 64;  // clusters whose S scores are held at once
  static constexpr index member_block = 128;   // member queries scored at once
};

}  // namespace fastattn
