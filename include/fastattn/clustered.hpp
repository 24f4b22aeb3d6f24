// Clustered attention (Vyas, Katharopoulos, Fleuret 2020): queries grouped by hashing plus
// Hamming k-means, one attention row per cluster centroid, broadcast to the members.
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string_view>

#include "attention.hpp"
#include "detail/clustering.hpp"
#include "detail/exact_attention.hpp"
#include "detail/scratch.hpp"

namespace fastattn {

/// Clustered attention: an approximation of softmax(scale Q K^T) V that computes attention for
/// C query centroids only.
///
/// 1. The valid queries are hashed with `bits` random hyperplanes with thresholds
///    (bit b of q is q . a_b > t_b, entries N(0, 1)).
/// 2. The hashes are clustered by k-means in Hamming space (`iterations` assignment passes,
///    majority-vote updates, initial centroids the hashes of C distinct random valid queries,
///    empty clusters re-seeded by the k-means++ rule; see detail::hamming_kmeans).
/// 3. Each cluster's centroid is the mean of its members' raw queries; its attention row
///    softmax(scale c K^T + key mask) V is computed exactly (C x S scores, streamed by dense).
/// 4. Every member query gets its centroid's row; padded query rows are zero.
///
/// Cost: 2 Lv E B (hashing) + O(passes Lv C) popcounts (passes <= iterations, fewer once k-means
/// reaches a fixed point) + O(Lv B) bit counting + 2 C S (E + M) (centroid attention) + O(Lv (E +
/// M)) (centroids and broadcast), i.e. linear in L and S for fixed C. No L x S matrix is formed;
/// extra memory O(Lv + C (E + M + B)).
///
/// Padding: queries at and beyond ctx.query_length take no part in hashing or clustering; keys at
/// and beyond ctx.key_length get zero weight and are never read (the front door zeroes padded
/// rows and handles the empty cases). Not causal: `supports_causal` is false.
///
/// Determinism: every random draw (hyperplanes, initial centroids, refills of empty clusters)
/// comes from detail::rng(seed, ctx.stream), so the same seed gives the same bits, and
/// multihead_attention gives the same output on any thread count.
struct clustered {
  static constexpr std::string_view name = "clustered";
  static constexpr bool is_exact = false;
  static constexpr bool supports_causal = false;

  /// Number of clusters C, in [1, 2^32 - 1]. More clusters: lower error, cost linear in C. When C exceeds the
  /// valid queries Lv, Lv clusters are used (each query can then be its own cluster).
  index clusters = 100;
  /// Hash length B in bits, in [1, 64] (63 in the paper: one 64-bit word per query).
  int bits = 63;
  /// K-means assignment passes, >= 1, with iterations - 1 centroid updates between them
  /// (1 = assign to the initial centroids only). Passes stop early, with the same result, once
  /// the clustering is a fixed point.
  int iterations = 10;
  /// Whether the hyperplanes have random thresholds (the paper's hashing); false gives sign
  /// hashing through the origin with the same hyperplanes.
  bool hash_bias = true;
  /// Seed of every random draw (split per head by ctx.stream).
  std::uint64_t seed = 0;

  static constexpr auto knobs() { return detail::clustering_knob_list<clustered>(); }

  /// Preconditions (ensured by the front door): knobs in range, Lv >= 1, Sv >= 1.
  template <class T>
  void compute(const_view<T> q, const_view<T> k, const_view<T> v, view<T> out,
               const context& ctx) const {
    const detail::arena::scope scratch;  // the thread's reusable scratch: no allocation per call
    auto& groups = detail::workspace<detail::query_clustering<T>>();
    groups.run(*this, q, ctx);

    // Attention of the centroids: exact, streamed over key blocks (C x S, never L x S).
    const index C = groups.count();
    auto rows = detail::scratch_matrix<T>(C, v.cols());
    detail::exact_attention<T>(const_view<T>(groups.centroids()), k, v, view<T>(rows), C,
                               ctx.key_length, ctx.scale, std::nullopt, {std::min<index>(C, 128), 512});
    groups.broadcast(rows, out);
  }
};

}  // namespace fastattn
