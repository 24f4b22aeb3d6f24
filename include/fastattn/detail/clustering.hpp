// The machinery clustered and improved_clustered share: knob descriptions, hashing plus Hamming
// k-means of the valid queries, centroids in query space, and the broadcast of per-cluster rows.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <string_view>
#include <vector>

#include "../policy.hpp"
#include "hamming_kmeans.hpp"
#include "hyperplane_hash.hpp"
#include "parallel.hpp"
#include "rng.hpp"

namespace fastattn::detail {

/// The clustering knobs of clustered and improved_clustered.
struct clustering_knobs {
  index clusters;
  int bits;
  int iterations;
  bool hash_bias;
};

/// The knob descriptions the clustering policies share (P has members clusters, bits,
/// iterations, hash_bias, seed).
template <class P>
constexpr auto clustering_knob_list() {
  return std::make_tuple(
      make_knob("clusters", &P::clusters,
                "number of query clusters C (clamped to the valid queries)", 1, 0xFFFFFFFF),
      make_knob("bits", &P::bits, "hash bits B of the hyperplane LSH", 1, 64),
      make_knob("iterations", &P::iterations,
                "Hamming k-means assignment passes (stops early at a fixed point)", 1,
                std::numeric_limits<int>::max()),
      make_knob("hash_bias", &P::hash_bias, "random thresholds on the hyperplanes (true/false)"),
      make_knob("seed", &P::seed, "seed of every random draw"));
}

/// Clusters for an off-diagonal block of the causal decomposition holding `rows` of the causal
/// problem's `of` queries (1 <= rows <= of): ceil(clusters sqrt(rows / of)), in [1, clusters]
/// (why the square root: detail/causal.hpp, causal_blocks). clusters >= of gives >= rows: every
/// query its own cluster, as in the whole problem.
inline index clusters_for_block(index clusters, index rows, index of) {
  const double scaled = std::ceil(static_cast<double>(clusters) *
                                  std::sqrt(static_cast<double>(rows) / static_cast<double>(of)));
  return std::clamp<index>(static_cast<index>(std::min(scaled, static_cast<double>(clusters))), 1,
                           clusters);
}

/// The crossover with dense of a clustering kernel with `clusters` clusters whose crossover the
/// benchmark measured at the default 100 clusters is `measured`: scaled by clusters / 100 (its
/// cost is linear in the clusters where exact attention's is quadratic in the size), and never
/// below 256, the smallest size the benchmark measures (no speed-up is claimed below it).
inline index crossover_at(index measured, index clusters) {
  const double scaled =
      std::ceil(static_cast<double>(measured) * static_cast<double>(clusters) / 100.0);
  return static_cast<index>(std::clamp(scaled, 256.0, 0x1p62));
}

/// Clusters of the valid queries: hash (hyperplane_hash), Hamming k-means (hamming_kmeans),
/// then the non-empty clusters renumbered 0..count()-1 in order of their k-means index, their
/// members listed in ascending query order, and their centroids in query space (the mean of the
/// members' raw queries). Scratch is kept in the object and sized once per run.
template <class T>
class query_clustering {
 public:
  /// Clusters rows [0, valid) of q into min(knobs.clusters, valid) k-means clusters, drawing from
  /// `gen` (hyperplanes first, then k-means). Preconditions: valid >= 1, knobs checked.
  void run(const_view<T> q, index valid, const clustering_knobs& knobs, rng& gen, int threads = 1) {
    const index E = q.cols();
    const index clusters = std::min(knobs.clusters, valid);
    const auto n = static_cast<std::size_t>(valid);

    hashes_.resize(n);
    hash_.draw(E, knobs.bits, knobs.hash_bias, gen);
    hash_(q.topRows(valid), hashes_.data(), threads);
    kmeans_.run(hashes_.data(), valid, clusters, knobs.bits, knobs.iterations, gen, threads);
    const std::vector<index>& assignment = kmeans_.assignment();

    // Counting sort of the queries by cluster; empty clusters are dropped.
    renumber_.assign(static_cast<std::size_t>(clusters), 0);
    for (const index c : assignment) ++renumber_[static_cast<std::size_t>(c)];
    offsets_.reserve(static_cast<std::size_t>(clusters) + 1);
    offsets_.assign(1, 0);
    for (auto& slot : renumber_) {
      const index size = slot;
      slot = size > 0 ? static_cast<index>(offsets_.size()) - 1 : -1;
      if (size > 0) offsets_.push_back(offsets_.back() + size);
    }
    const index count = static_cast<index>(offsets_.size()) - 1;
    members_.resize(n);
    cluster_.resize(n);
    cursor_.assign(offsets_.begin(), offsets_.end() - 1);
    for (index i = 0; i < valid; ++i) {
      const index j = renumber_[static_cast<std::size_t>(assignment[static_cast<std::size_t>(i)])];
      cluster_[static_cast<std::size_t>(i)] = j;
      members_[static_cast<std::size_t>(cursor_[static_cast<std::size_t>(j)]++)] = i;
    }

    // Centroids in query space: the mean of the members' raw queries, summed in query order
    // as sum_i q_i / n, so that no partial sum exceeds the largest member in magnitude but by
    // rounding (settle_overflow takes care of that rounding at the largest finite value). q is
    // streamed once in position order
    // (the C x E sums stay in cache; gathering each cluster's members was scattered reads);
    // on `threads` threads, each takes a range of clusters and adds its members in the
    // same order, so the sums do not depend on the count.
    centroids_.setZero(count, E);  // no allocation when the size repeats
    // Each task owns a range of clusters (a compare per query where j % tasks was a division).
    const index tasks = std::min<index>(std::max(threads, 1), count);
    parallel_for(threads, tasks, [&](index t) {
      const index first = t * count / tasks, last = (t + 1) * count / tasks;
      for (index i = 0; i < valid; ++i) {
        const index j = cluster_[static_cast<std::size_t>(i)];
        if (j >= first && j < last) centroids_.row(j) += q.row(i) / static_cast<T>(size(j));
      }
      for (index j = first; j < last; ++j) settle_overflow(q, j);
    });
  }

  /// Clusters the valid queries for a clustering policy p (knobs as in clustering_knob_list)
  /// with its random stream for this head.
  template <class P>
  void run(const P& p, const_view<T> q, const context& ctx) {
    rng gen(p.seed, ctx.stream);
    run(q, ctx.query_length, {p.clusters, p.bits, p.iterations, p.hash_bias}, gen, ctx.threads);
  }

  /// Non-empty clusters.
  index count() const noexcept { return static_cast<index>(offsets_.size()) - 1; }
  /// Cluster j's members are member(r) for r in [begin(j), end(j)), ascending.
  index begin(index j) const noexcept { return offsets_[static_cast<std::size_t>(j)]; }
  index end(index j) const noexcept { return offsets_[static_cast<std::size_t>(j) + 1]; }
  index size(index j) const noexcept { return end(j) - begin(j); }
  index member(index r) const noexcept { return members_[static_cast<std::size_t>(r)]; }
  /// Size of the largest cluster.
  index largest() const noexcept {
    index most = 0;
    for (index j = 0; j < count(); ++j) most = std::max(most, size(j));
    return most;
  }
  /// count() x E: the mean raw query of each cluster.
  const matrix<T>& centroids() const noexcept { return centroids_; }
  /// The hashes of the valid queries and the k-means that clustered them (for tests).
  const std::vector<std::uint64_t>& hashes() const noexcept { return hashes_; }
  const hamming_kmeans& kmeans() const noexcept { return kmeans_; }

  /// clusters()[i] = the cluster of valid query i, i < the valid queries (for passes over the
  /// queries in position order).
  const index* clusters() const noexcept { return cluster_.data(); }

  /// Writes row j of `rows` (count() x M) into the output row of every member of cluster j.
  /// The output is written in position order (the C rows stay in cache): by cluster, the
  /// members' rows were scattered writes across the whole output.
  template <class Rows>
  void broadcast(const Rows& rows, view<T> out, int threads = 1) const {
    const auto valid = static_cast<index>(cluster_.size());
    constexpr index chunk = 1024;
    parallel_for(threads, (valid + chunk - 1) / chunk, [&](index b) {
      for (index i = b * chunk; i < std::min(valid, (b + 1) * chunk); ++i)
        out.row(i) = rows.row(cluster_[static_cast<std::size_t>(i)]);
    });
  }

 private:
  // The sum of q_i / n stays within rounding of the members' range, but rounding can carry it
  // just past the largest finite value: three members at `max` give 3 fl(max / 3) > max, an
  // infinity, and a centroid of infinities scores NaN or -inf against the keys (the whole
  // cluster's rows NaN or zero). The mean of finite members is at most their largest magnitude,
  // so an infinity whose members are all finite becomes the largest finite value of its sign.
  // (An infinity or NaN among the members, possible with check_finite off, stays: it
  // propagates as it should.) Cost: one compare per centroid entry, and a walk over the
  // members only where an entry overflowed.
  void settle_overflow(const_view<T> q, index j) {
    auto centroid = centroids_.row(j);
    for (index e = 0; e < centroid.size(); ++e) {
      if (!std::isinf(centroid(e))) continue;
      bool finite = true;
      for (index r = begin(j); r < end(j) && finite; ++r) finite = std::isfinite(q(member(r), e));
      if (finite) centroid(e) = std::copysign(std::numeric_limits<T>::max(), centroid(e));
    }
  }

  std::vector<std::uint64_t> hashes_;
  hyperplane_hash<T> hash_;
  hamming_kmeans kmeans_;
  std::vector<index> renumber_;  // k-means cluster -> non-empty cluster (or -1)
  std::vector<index> offsets_;   // count + 1
  std::vector<index> cursor_;
  std::vector<index> members_;  // valid queries grouped by cluster
  std::vector<index> cluster_;  // valid query -> its cluster
  matrix<T> centroids_;
};

}  // namespace fastattn::detail
