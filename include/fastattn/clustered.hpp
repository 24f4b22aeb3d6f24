// Clustered attention (Vyas, Katharopoulos, Fleuret 2020): queries grouped by hashing plus
// Hamming k-means, one attention row per cluster centroid, broadcast to the members.
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>

#include "attention.hpp"
#include "detail/causal.hpp"
#include "detail/clustering.hpp"
#include "detail/exact_attention.hpp"
#include "detail/flash_block.hpp"
#include "detail/parallel.hpp"
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
///    softmax(scale c K^T + key mask) V is computed exactly (C x S scores, streamed by dense's
///    fused kernel; weights below eps / (16 S) of the row's largest are dropped, at most eps / 16
///    of its total, and the P V product skips them: on peaked attention most of it, see
///    detail::flash_block::drop_below).
/// 4. Every member query gets its centroid's row; padded query rows are zero.
///
/// Cost: 2 Lv E B (hashing) + O(passes Lv C) popcounts (passes <= iterations, fewer once k-means
/// reaches a fixed point) + O(Lv B) bit counting + 2 C S (E + M) (centroid attention) + O(Lv (E +
/// M)) (centroids and broadcast), i.e. linear in L and S for fixed C. No L x S matrix is formed;
/// extra memory O(Lv + C (E + M + B)).
///
/// Padding: queries at and beyond ctx.query_length take no part in hashing or clustering; keys at
/// and beyond ctx.key_length get zero weight and are never read (the front door zeroes padded
/// rows and handles the empty cases). Causal attention runs by the recursive decomposition of
/// detail/causal.hpp: exact diagonal blocks, ceil(C sqrt(r / L)) clusters on an off-diagonal
/// block of r rows (for_block).
///
/// Determinism: every random draw (hyperplanes, initial centroids, refills of empty clusters)
/// comes from detail::rng(seed, ctx.stream), so the same seed gives the same bits, and
/// multihead_attention gives the same output on any thread count.
struct clustered {
  static constexpr std::string_view name = "clustered";  ///< its name in tools and messages
  static constexpr bool is_exact = false;                ///< an approximation
  static constexpr bool supports_causal = true;          ///< by decomposition (see above)
  static constexpr bool supports_exclusion = true;       ///< honours context::exclude (banded)
  /// Below this many queries (and keys) exact attention is faster (the benchmark's crossover).
  static constexpr index dense_crossover = 256;

  /// Number of clusters C, in [1, 2^32 - 1]. More clusters: lower error, cost linear in C.
  /// When C exceeds the valid queries Lv, Lv clusters are used (each query can then be its own
  /// cluster).
  index clusters = 100;
  /// Hash length B in bits, in [1, 64] (63 in the paper: one 64-bit word per query).
  int bits = 63;
  /// K-means assignment passes, in [1, INT_MAX], with iterations - 1 centroid updates between them
  /// (1 = assign to the initial centroids only). Passes stop early, with the same result, once
  /// the clustering is a fixed point.
  int iterations = 10;
  /// Whether the hyperplanes have random thresholds (the paper's hashing); false gives sign
  /// hashing through the origin with the same hyperplanes.
  bool hash_bias = true;
  /// Seed of every random draw (split per head by ctx.stream), any value.
  std::uint64_t seed = 0;

  /// The knobs on an off-diagonal block of the causal decomposition that holds `rows` of the
  /// causal problem's `of` queries: ceil(clusters sqrt(rows / of)) clusters, at least 1 (see
  /// detail/causal.hpp, causal_blocks); the other knobs unchanged.
  clustered for_block(index rows, index of) const {
    clustered p = *this;
    p.clusters = detail::clusters_for_block(clusters, rows, of);
    return p;
  }

  /// Below this many queries (and keys) exact attention is faster at these knobs:
  /// dense_crossover (measured at the default 100 clusters) scaled by clusters / 100, at least
  /// 256 (detail::crossover_at). The causal decomposition solves its blocks below it exactly.
  index crossover() const noexcept { return detail::crossover_at(dense_crossover, clusters); }

  /// The knobs and their ranges, checked by the front door (see make_knob).
  static constexpr auto knobs() { return detail::clustering_knob_list<clustered>(); }

  /// Preconditions (ensured by the front door): knobs in range, Lv >= 1, Sv >= 1. `lse`, when
  /// not empty, receives each valid row's log normaliser: its centroid's log-sum-exp expanded to
  /// first order around the centroid (see below; 2 C S E more flops). Causal by the recursive
  /// decomposition of detail/causal.hpp (see for_block).
  template <class T>
  void compute(const_view<T> q, const_view<T> k, const_view<T> v, view<T> out, const context& ctx,
               std::span<T> lse = {}) const {
    if (ctx.causal) return detail::causal_blocks(*this, q, k, v, out, ctx, lse);
    const detail::arena::scope scratch;  // the thread's reusable scratch: no allocation per call
    auto& groups = detail::workspace<detail::query_clustering<T>>();
    groups.run(*this, q, ctx);

    // Attention of the centroids: exact, streamed over key blocks (C x S, never L x S).
    const index C = groups.count(), M = v.cols(), E = q.cols(), Sv = ctx.key_length,
                Lv = ctx.query_length;
    if (lse.empty()) {
      auto rows = detail::scratch_matrix<T>(C, M);
      detail::exact_attention<T>(
          const_view<T>(groups.centroids()), k, v, view<T>(rows), C, Sv, ctx.scale, std::nullopt,
          {detail::rows_per_thread(C, ctx.threads), 512, ctx.threads, true, ctx.checked_finite});
      groups.broadcast(rows, out, ctx.threads);
      return;
    }
    // With lse: each centroid also attends to the keys themselves ([V | K] as values), giving
    // the gradient of its log-sum-exp, scale * sum_j p_cj k_j; member i's normaliser is the
    // first-order expansion lse_c + scale (q_i - c) . kbar_c around its centroid (exact when the
    // member is the centroid; the members' mean equals the centroid's lse).
    // The keys as values are scaled by a power of two u with |u k| < 2 when max|k| > 1: the
    // front door bounds v so that its weighted sums cannot overflow, but it bounds k only
    // through the scores (|scale| max|q| max|k| E), so k may reach T's largest value, and a sum
    // of S such keys overflowed (NaN log-sum-exp under banded<clustered>; found by fuzz_wrappers).
    const T k_most = Sv > 0 && E > 0 ? k.topRows(Sv).cwiseAbs().maxCoeff() : T(0);
    const T k_unit = k_most > T(1) && std::isfinite(k_most)
                         ? std::ldexp(T(1), -static_cast<int>(std::ilogb(k_most)))
                         : T(1);
    auto values = detail::scratch_matrix<T>(Sv, M + E);
    values.leftCols(M) = v.topRows(Sv);
    values.rightCols(E) = k.topRows(Sv) * k_unit;
    auto rows = detail::scratch_matrix<T>(C, M + E);
    T* const row_lse = detail::arena::local().take<T>(static_cast<std::size_t>(C));
    detail::exact_attention<T>(
        const_view<T>(groups.centroids()), k, const_view<T>(values), view<T>(rows), C, Sv,
        ctx.scale, std::nullopt,
        {detail::rows_per_thread(C, ctx.threads), 512, ctx.threads, true, ctx.checked_finite},
        row_lse);
    groups.broadcast(rows.leftCols(M), out, ctx.threads);
    const T scale = static_cast<T>(ctx.scale);
    const T tiny = 16 * std::numeric_limits<T>::epsilon();
    // The weights the centroid attention dropped (eps / (16 Sv) of its row's largest, which is at
    // most 1 as a probability): the exclusion skips them too (at most widest of them, each below
    // eps / (16 Sv), are then left in the rest).
    const T drop = std::numeric_limits<T>::epsilon() / (T(16) * static_cast<T>(Sv));
    // The scaled centroids (scaled before any dot product, so that no unscaled q.k can overflow
    // where the scores do not) and each valid row's cluster.
    auto scaled_centroids = detail::scratch_matrix<T>(C, E);
    scaled_centroids = groups.centroids() * scale;
    const index* const cluster_of = groups.clusters();
    // With an exclusion, each column's range of v over the valid keys (see below).
    auto v_low = detail::scratch_vector<T>(ctx.exclude ? M : 0);
    auto v_high = detail::scratch_vector<T>(ctx.exclude ? M : 0);
    if (ctx.exclude) {
      v_low = v.topRows(Sv).colwise().minCoeff().transpose();
      v_high = v.topRows(Sv).colwise().maxCoeff().transpose();
    }
    // The centroid's weights on one member's excluded keys (at most the band's width of them).
    const index widest =
        ctx.exclude ? std::min<index>(Sv, ctx.exclude->upper - ctx.exclude->lower + 1) : 0;
    // Rows in position order, in chunks shared by ctx.threads (each row is independent, so the
    // result does not depend on the count): a row's excluded band then overlaps the previous
    // row's, and its key and value rows are still in L1; by cluster, the members' bands were
    // scattered and came from L3 (1.6 ms of 4.6 at N = 4096).
    constexpr index chunk = 256;
    detail::parallel_for(ctx.threads, (Lv + chunk - 1) / chunk, [&](index b) {
      const detail::arena::scope chunk_scratch;
      // Rows of `work`: 0, a correction [sum p v | sum p k]; 1, the member's gradient; 2, its
      // scaled offset from its centroid.
      auto work = detail::scratch_matrix<T>(3, M + E);
      auto weights = detail::scratch_vector<T>(std::max<index>(widest, 1));
      std::int32_t* const weighed =
          detail::arena::local().take<std::int32_t>(static_cast<std::size_t>(widest + 16));
      for (index i = b * chunk; i < std::min(Lv, (b + 1) * chunk); ++i) {
        const index j = cluster_of[i];
        const auto scaled_c = scaled_centroids.row(j);
        auto o = out.row(i);
        T kept = T(1);  // the centroid's probability mass on the keys this member may see
        auto grad = work.row(1).head(E);
        grad = rows.row(j).tail(E);
        if (ctx.exclude) {
          // Remove the excluded keys' share of the centroid's attention: o = (o_c - sum p v) /
          // (1 - sum p) over the excluded keys (at most the band's width of them).
          const auto [first, last] =
              ctx.exclude->relative(ctx.query_offset, ctx.key_offset).keys_of(i, 1, Sv);
          if (first < last) {
            const index n = last - first;
            auto correction = work.row(0);
            auto p = weights.head(n);
            // The centroid's weights on the band, and their sum with [V | K].
            detail::row_dots<T>(k.data() + first * k.outerStride(), n, k.outerStride(),
                                scaled_c.data(), E, p.data());
            // Only the weights the centroid's attention kept (it dropped those below drop, see
            // above): on peaked attention a few of the band's keys (NaN is kept).
            p = (p.array() - row_lse[j]).exp();
            p = (p.array() < drop).select(T(0), p);
            const T removed = p.sum();
            const index listed = detail::flash::list_weighed(p.data(), 0, n, weighed);
            detail::weighted_row_sum<T>(p.data(), detail::key_list{weighed, listed},
                                        values.data() + first * values.outerStride(),
                                        values.outerStride(), M + E, correction.data());
            kept = T(1) - std::min(removed, T(1));
            if (kept <= tiny) {  // the member sees nothing but excluded keys
              o.setZero();
              lse[static_cast<std::size_t>(i)] = -std::numeric_limits<T>::infinity();
              continue;
            }
            // The means of v and u k over the kept keys lie in each column's range of v and in
            // (-2, 2); the differences can round past them when little is kept (relative error
            // up to eps / kept), and are brought back (a NaN stays a NaN).
            o = (o - correction.leftCols(M)) / kept;
            for (index m = 0; m < M; ++m) o(m) = clamp_keep_nan(o(m), v_low(m), v_high(m));
            grad = (grad - correction.rightCols(E)) / kept;
            for (index e = 0; e < E; ++e) grad(e) = clamp_keep_nan(grad(e), T(-2), T(2));
          }
        }
        auto offset = work.row(2).head(E);
        offset = q.row(i) * scale - scaled_c;
        // |offset . grad| / u <= 2 |scale| max|q| 2 max|k| E, at most T's largest value by the
        // front door's bound on the scores (max / 4); kept in [-max/2, max/2] against rounding.
        constexpr T bound = std::numeric_limits<T>::max() / 2;
        const T first_order = std::clamp(offset.dot(grad) / k_unit, -bound, bound);
        lse[static_cast<std::size_t>(i)] = row_lse[j] + std::log(kept) + first_order;
      }
    });
  }

 private:
  // x brought into [low, high]; a NaN stays a NaN (both comparisons are false). Not std::clamp:
  // the bounds come from v and may be NaN with check_finite off, which std::clamp forbids.
  template <class T>
  static T clamp_keep_nan(T x, T low, T high) noexcept {
    return x < low ? low : (x > high ? high : x);
  }
};

}  // namespace fastattn
