// Improved clustered attention (Vyas, Katharopoulos, Fleuret 2020, section 3.3): clustered
// attention, plus exact attention of every query on its cluster's top-k keys.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <tuple>

#include "attention.hpp"
#include "detail/causal.hpp"
#include "detail/clustering.hpp"
#include "detail/flash_block.hpp"
#include "detail/parallel.hpp"
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
/// blocks of 64 centroids, by the fused kernel's register tiles on keys packed once; the
/// residual's weights below eps / (16 S) of the centroid's largest are dropped, at most eps / 16
/// of its total, and its P V product skips them when few remain, as on peaked attention) + O(C S)
/// top-k selection + 2 Lv k (E + M) (members against their cluster's k keys, in blocks of up to
/// 128 members). Linear in L and S for fixed C and k; extra memory O(S E) (the packed keys) +
/// O((64 + k) (S + E + M) + 128 k + Lv), never L x S whatever C and k are.
///
/// Padding, determinism and the clamp of `clusters` to the valid queries are as for clustered.
/// Causal attention runs by the recursive decomposition of detail/causal.hpp.
struct improved_clustered {
  static constexpr std::string_view name = "improved_clustered";  ///< its name in tools
  static constexpr bool is_exact = false;                         ///< exact only if topk >= Sv
  static constexpr bool supports_causal = true;                   ///< by decomposition
  static constexpr bool supports_exclusion = true;                ///< honours context::exclude
  /// Below this many queries (and keys) exact attention is faster (the benchmark's crossover).
  static constexpr index dense_crossover = 1024;

  /// Number of clusters C, in [1, 2^32 - 1]; clamped to the valid queries Lv (see
  /// clustered::clusters).
  index clusters = 100;
  /// Hash length B in bits, in [1, 64].
  int bits = 63;
  /// K-means assignment passes, in [1, INT_MAX] (see clustered::iterations).
  int iterations = 10;
  /// Whether the hyperplanes have random thresholds (see clustered::hash_bias).
  bool hash_bias = true;
  /// Seed of every random draw (split per head by ctx.stream), any value.
  std::uint64_t seed = 0;
  /// Keys per cluster attended exactly, >= 1 (32 in the paper); clamped to the valid keys Sv,
  /// where the kernel becomes exact.
  index topk = 32;

  /// The knobs on an off-diagonal block of the causal decomposition that holds `rows` of the
  /// causal problem's `of` queries: ceil(clusters sqrt(rows / of)) clusters, at least 1 (see
  /// detail/causal.hpp, causal_blocks); the other knobs unchanged.
  improved_clustered for_block(index rows, index of) const {
    improved_clustered p = *this;
    p.clusters = detail::clusters_for_block(clusters, rows, of);
    return p;
  }

  /// Below this many queries (and keys) exact attention is faster at these knobs:
  /// dense_crossover (measured at the default 100 clusters) scaled by clusters / 100, at least
  /// 256 (detail::crossover_at). The causal decomposition solves its blocks below it exactly.
  index crossover() const noexcept { return detail::crossover_at(dense_crossover, clusters); }

  /// The knobs and their ranges (clustered's plus topk), checked by the front door.
  static constexpr auto knobs() {
    return std::tuple_cat(
        detail::clustering_knob_list<improved_clustered>(),
        std::make_tuple(make_knob("topk", &improved_clustered::topk,
                                  "keys each cluster attends to exactly (clamped to S)", 1,
                                  std::numeric_limits<index>::max())));
  }

  /// Preconditions (ensured by the front door): knobs in range, Lv >= 1, Sv >= 1. `lse`, when
  /// not empty, receives each valid row's log normaliser: member i's output puts weight
  /// e^(s_il) / Z_i on each of its cluster's top-k keys l with Z_i = (sum over the top-k of
  /// e^(s_il)) / m_j, so log Z_i is returned (the exact log-sum-exp when topk >= S). Causal by the
  /// recursive decomposition of detail/causal.hpp (see for_block).
  template <class T>
  void compute(const_view<T> q, const_view<T> k, const_view<T> v, view<T> out, const context& ctx,
               std::span<T> lse = {}) const {
    if (ctx.causal) return detail::causal_blocks(*this, q, k, v, out, ctx, lse);
    const index Sv = ctx.key_length, Lv = ctx.query_length, E = q.cols(), M = v.cols();
    const detail::arena::scope scratch;  // the thread's reusable scratch: no allocation per call
    auto& groups = detail::workspace<detail::query_clustering<T>>();
    groups.run(*this, q, ctx);
    const index C = groups.count(), top = std::min(topk, Sv);
    const T scale = T(ctx.scale);
    const auto keys = k.topRows(Sv);
    const auto values = v.topRows(Sv);

    // Clusters are processed in blocks of `centroid_block`, and each cluster's members in blocks
    // of `member_block`, so the scratch is O((centroid_block + top) S + member_block top) whatever
    // C, the cluster sizes and topk are: never an L x S matrix, even with one cluster per query
    // and topk >= S.
    const index cb = std::min(C, centroid_block);
    const index bm = std::min(groups.largest(), member_block);
    // The keys, packed once for the centroid scores; the scores in rows padded for the kernel's
    // register tiles (detail::score_rows).
    const detail::score_rows<T> centroid_scores(k, Sv, ctx.threads);
    const index lds = centroid_scores.stride();
    T* const score_buffer = detail::arena::local().take<T>(
        static_cast<std::size_t>(centroid_scores.padded_rows(cb) * lds));
    Eigen::Map<matrix<T>, 0, Eigen::OuterStride<>> probabilities(score_buffer, cb, Sv,
                                                                 Eigen::OuterStride<>(lds));
    auto scaled_centroids = detail::scratch_matrix<T>(cb, E);
    index* const selected = detail::arena::local().take<index>(static_cast<std::size_t>(cb * top));
    T* const mass = detail::arena::local().take<T>(static_cast<std::size_t>(cb));
    auto residual = detail::scratch_matrix<T>(cb, M);
    // For context::exclude (banded's inner call): each cluster's top-k probabilities and
    // log-sum-exp.
    const bool excluding = ctx.exclude.has_value();
    T* const top_prob =
        detail::arena::local().take<T>(static_cast<std::size_t>(excluding ? cb * top : 0));
    // For the exclusion's pass over the rows in position order: each row's cluster and the mass
    // its cluster's centroid keeps on it after the top-k part of the band is removed.
    const index* const cluster_of = groups.clusters();
    T* const kept_top =
        detail::arena::local().take<T>(static_cast<std::size_t>(excluding ? Lv : 0));
    const index widest =
        excluding ? std::min<index>(Sv, ctx.exclude->upper - ctx.exclude->lower + 1) : 0;
    T* const centroid_lse = detail::arena::local().take<T>(static_cast<std::size_t>(cb));
    // The residual's dropped weights, and whether its P V may skip them (a NaN value, possible
    // with check_finite off, must still reach every row as 0 * NaN).
    const T drop = std::numeric_limits<T>::epsilon() / (T(16) * static_cast<T>(Sv));
    const bool values_finite =
        ctx.checked_finite || detail::flash::all_finite(v.data(), v.outerStride(), Sv, M);
    T* const normaliser = detail::arena::local().take<T>(static_cast<std::size_t>(cb));

    for (index c0 = 0; c0 < C; c0 += cb) {
      const index n = std::min(cb, C - c0);
      // Centroid scores (n x Sv), their top-k, then exp(score - peak) with the top-k zeroed.
      // Scale the centroids first: Eigen folds a scalar factor out of a product, and C K^T
      // unscaled could overflow where the scaled scores do not.
      scaled_centroids.topRows(n) = groups.centroids().middleRows(c0, n) * scale;
      // The products share ctx.threads and give the same result on any thread count.
      centroid_scores(const_view<T>(scaled_centroids.topRows(n)), n, score_buffer, ctx.threads);
      // Rows are independent: they share ctx.threads.
      detail::parallel_for(ctx.threads, n, [&](index j) {
        auto row = probabilities.row(j);
        index* chosen = selected + j * top;
        detail::workspace<detail::top_k<T>>()(row.data(), Sv, top, chosen);  // this thread's
        const T peak = row.maxCoeff();
        if (!(peak > -std::numeric_limits<T>::infinity())) {  // no finite score: zero row
          row.setZero();
          mass[j] = T(0);
          normaliser[j] = T(0);
          centroid_lse[j] = -std::numeric_limits<T>::infinity();
          if (excluding) std::fill(top_prob + j * top, top_prob + (j + 1) * top, T(0));
          return;
        }
        // The row keeps exp(score - peak); 1 / sum, the softmax's normalisation, is applied to
        // what is read from it (the mass, the top-k probabilities, the residual row).
        // Weights below eps / (16 S) of the peak are dropped (at most eps / 16 of the sum, within
        // the rounding; see flash_block::drop_below): on peaked attention the residual's P V
        // then reads only the few keys each centroid weighs.
        row = (row.array() - peak).exp();
        row = (row.array() < drop).select(T(0), row);
        const T sum = row.sum();
        normaliser[j] = T(1) / sum;
        centroid_lse[j] = peak + std::log(sum);
        T m = 0;
        for (index t = 0; t < top; ++t) {
          const T p = row(chosen[t]) * normaliser[j];
          m += p;
          if (excluding) top_prob[j * top + t] = p;
          row(chosen[t]) = T(0);
        }
        mass[j] = m;
      });
      // The centroid's attention on the keys outside its top-k.
      detail::weighted_values<T>(score_buffer, lds, n, const_view<T>(values), Sv,
                                 view<T>(residual.topRows(n)), ctx.threads, values_finite);
      for (index j = 0; j < n; ++j) residual.row(j) *= normaliser[j];

      // Members against their cluster's top-k keys: small products per block of members.
      // Clusters are independent (disjoint members): they share ctx.threads, each with the
      // executing thread's arena and slot table.
      detail::parallel_for(ctx.threads, n, [&](index j) {
        const detail::arena::scope cluster_scratch;
        auto& local = detail::arena::local();
        auto member_q = detail::scratch_matrix<T>(bm, E, local);
        auto top_keys = detail::scratch_matrix<T>(top, E, local);
        auto top_values = detail::scratch_matrix<T>(top, M, local);
        auto member_out = detail::scratch_matrix<T>(bm, M, local);
        const index* chosen = selected + j * top;
        for (index t = 0; t < top; ++t) {
          top_keys.row(t) = keys.row(chosen[t]);
          top_values.row(t) = values.row(chosen[t]);
        }
        // The members' scores against the top-k keys (packed once per cluster) by the fused
        // kernel's register tiles, their products with the top-k values likewise.
        const detail::score_rows<T> top_scores(const_view<T>(top_keys), top, 1);
        const index ldt = top_scores.stride();
        T* const member_scores =
            local.take<T>(static_cast<std::size_t>(top_scores.padded_rows(bm) * ldt));
        const T m = mass[j];
        const index first = groups.begin(c0 + j), last = groups.end(c0 + j);
        for (index r0 = first; r0 < last; r0 += bm) {
          const index rows = std::min(bm, last - r0);
          // The members' queries are scaled, not the keys: the front door bounds |scale| max|q|,
          // while scale k may overflow (and 0 * inf is NaN) where every score is finite.
          for (index r = 0; r < rows; ++r) member_q.row(r) = q.row(groups.member(r0 + r)) * scale;
          top_scores(const_view<T>(member_q.topRows(rows)), rows, member_scores, 1);
          Eigen::Map<matrix<T>, 0, Eigen::OuterStride<>> s(member_scores, rows, top,
                                                           Eigen::OuterStride<>(ldt));
          for (index r = 0; r < rows; ++r) {
            const index i = groups.member(r0 + r);
            auto row = s.row(r);
            T member_mass = m;  // m_i: the centroid's mass on the top-k keys this member sees
            if (excluding)
              kept_top[i] =
                  exclude_top_keys(ctx, i, Sv, chosen, top, top_prob + j * top, row, member_mass);
            const T peak = row.maxCoeff();
            T top_lse = -std::numeric_limits<T>::infinity();
            // (A NaN score, from a non-finite input with check_finite off, propagates.)
            const bool has_top = std::isnan(peak) || std::isnan(member_mass) ||
                                 (peak > -std::numeric_limits<T>::infinity() && member_mass > T(0));
            if (has_top) {
              row = (row.array() - peak).exp();
              const T sum = row.sum();
              row *= member_mass / sum;
              top_lse = peak + std::log(sum);
            } else {
              row.setZero();
            }
            if (!lse.empty()) {
              // The normaliser the output uses: that of the top-k part when it has one, else
              // the centroid's (times the mass kept, with an exclusion: the pass below).
              lse[static_cast<std::size_t>(i)] =
                  has_top ? top_lse - std::log(member_mass) : centroid_lse[j];
            }
          }
          detail::weighted_values<T>(member_scores, ldt, rows, const_view<T>(top_values), top,
                                     view<T>(member_out.topRows(rows)), 1);
          for (index r = 0; r < rows; ++r)
            out.row(groups.member(r0 + r)) = member_out.row(r) + residual.row(j);
        }
      });
      if (excluding)
        remove_residual_band(ctx, Lv, Sv, c0, n, cluster_of, kept_top, probabilities, normaliser,
                             values, widest, out, lse);
    }
  }

 private:
  // Removes from member i's top-k part the keys of its excluded band: their top-k scores become
  // -inf and their probability leaves the top-k mass m_i (`member_mass`). Returns the centroid's
  // mass on the keys the member still sees, as far as the top-k keys go: 1 minus theirs. The
  // cluster's top-k keys (`chosen`) are each tested against the band, one unsigned comparison
  // each (looking the band's keys up in a key -> slot table cost a load and a branch per key of
  // the band, and the table O(S) memory per thread).
  template <class T, class Row>
  static T exclude_top_keys(const context& ctx, index i, index Sv, const index* chosen, index top,
                            const T* top_prob, Row&& scores, T& member_mass) {
    const auto [first, last] =
        ctx.exclude->relative(ctx.query_offset, ctx.key_offset).keys_of(i, 1, Sv);
    const auto span = static_cast<std::uint64_t>(last - first);
    T gone = 0;
    for (index t = 0; t < top; ++t) {
      if (static_cast<std::uint64_t>(chosen[t] - first) < span) {
        scores(t) = -std::numeric_limits<T>::infinity();
        member_mass -= top_prob[t];
        gone += top_prob[t];
      }
    }
    member_mass = std::max(member_mass, T(0));
    return T(1) - gone;
  }

  // The rest of the exclusion for the members of clusters [c0, c0 + n) (the block whose
  // centroid rows `probabilities` holds, their top-k entries zero): the residual's share of each
  // member's band, sum p v with p the centroid's probability (row entry times `normaliser`), is
  // taken out of its output (top-k part plus residual) and the output renormalised by the mass
  // mu_i the member still sees, lse[i] += log mu_i. Over the rows in position order, in chunks
  // shared by ctx.threads (rows are independent): a row's band overlaps the previous row's, so
  // its value rows are still in L1 (by cluster, they came from L3: 0.6 ms of 4.1 at N = 4096).
  template <class T, class Probabilities, class Values>
  static void remove_residual_band(const context& ctx, index Lv, index Sv, index c0, index n,
                                   const index* cluster_of, const T* kept_top,
                                   const Probabilities& probabilities, const T* normaliser,
                                   const Values& values, index widest, view<T>& out,
                                   std::span<T> lse) {
    constexpr index chunk = 256;
    const T tiny = 16 * std::numeric_limits<T>::epsilon();
    detail::parallel_for(ctx.threads, (Lv + chunk - 1) / chunk, [&](index b) {
      const detail::arena::scope chunk_scratch;
      auto& local = detail::arena::local();
      T* const weights = local.take<T>(static_cast<std::size_t>(std::max<index>(widest, 1)));
      T* const removed = local.take<T>(static_cast<std::size_t>(values.cols()));
      std::int32_t* const weighed = local.take<std::int32_t>(static_cast<std::size_t>(widest + 16));
      for (index i = b * chunk; i < std::min(Lv, (b + 1) * chunk); ++i) {
        const index j = cluster_of[i] - c0;
        if (j < 0 || j >= n) continue;
        const auto [first, last] =
            ctx.exclude->relative(ctx.query_offset, ctx.key_offset).keys_of(i, 1, Sv);
        // Only the band's keys the residual weighs: its top-k entries and the weights dropped
        // as negligible are zeros (on peaked attention, most of the band). A zero weight on a
        // non-finite value (check_finite off) left the residual row NaN already.
        // (As whole-row expressions: Eigen vectorises the products and the sum, where a loop
        // that sums as it goes is one chain of dependent adds.)
        Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>> band_weights(weights, last - first);
        band_weights =
            probabilities.row(j).segment(first, last - first).array().transpose() * normaliser[j];
        const T gone = band_weights.sum();
        const index listed = detail::flash::list_weighed(weights, 0, last - first, weighed);
        detail::weighted_row_sum<T>(weights, detail::key_list{weighed, listed},
                                    values.data() + first * values.outerStride(),
                                    values.outerStride(), values.cols(), removed);
        const T kept = std::max(kept_top[i] - gone, T(0));  // mu_i
        auto o = out.row(i);
        if (kept > tiny) {
          o = (o - Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>(removed, values.cols())) /
              kept;
          if (!lse.empty()) lse[static_cast<std::size_t>(i)] += std::log(kept);
        } else {  // the member sees nothing but excluded keys
          o.setZero();
          if (!lse.empty()) lse[static_cast<std::size_t>(i)] = -std::numeric_limits<T>::infinity();
        }
      }
    });
  }

  static constexpr index centroid_block = 64;  // clusters whose S scores are held at once
  static constexpr index member_block = 128;   // member queries scored at once
};

}  // namespace fastattn
