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
    cursor_.assign(offsets_.begin(), offsets_.end() - 1);
    for (index i = 0; i < valid; ++i) {
      const auto j = static_cast<std::size_t>(
          renumber_[static_cast<std::size_t>(assignment[static_cast<std::size_t>(i)])]);
      members_[static_cast<std::size_t>(cursor_[j]++)] = i;
    }

    // Centroids in query space: the mean of the members' raw queries, summed in query order
    // (q is streamed once, the C x E sums stay in cache) as sum_i q_i / n, so that no partial
    // sum exceeds the largest member in magnitude: a centroid never overflows when its members
    // do not.
    // A cluster's members are listed in query order (the counting sort is stable), so summing
    // them cluster by cluster adds the same terms in the same order: clusters share `threads`.
    centroids_.resize(count, E);  // no allocation when the size repeats
    parallel_for(threads, count, [&](index j) {
      auto c = centroids_.row(j);
      c.setZero();
      const T members = static_cast<T>(size(j));
      for (index r = begin(j); r < end(j); ++r) c += q.row(member(r)) / members;
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

  /// cluster[i] = the cluster of valid query i, i < the valid queries (for passes over the
  /// queries in position order).
  void clusters_of(index* cluster) const noexcept {
    for (index j = 0; j < count(); ++j)
      for (index r = begin(j); r < end(j); ++r) cluster[member(r)] = j;
  }

  /// Writes row j of `rows` (count() x M) into the output row of every member of cluster j.
  template <class Rows>
  void broadcast(const Rows& rows, view<T> out, int threads = 1) const {
    parallel_for(threads, count(), [&](index j) {
      for (index r = begin(j); r < end(j); ++r) out.row(member(r)) = rows.row(j);
    });
  }

 private:
  std::vector<std::uint64_t> hashes_;
  hyperplane_hash<T> hash_;
  hamming_kmeans kmeans_;
  std::vector<index> renumber_;  // k-means cluster -> non-empty cluster (or -1)
  std::vector<index> offsets_;   // count + 1
  std::vector<index> cursor_;
  std::vector<index> members_;  // valid queries grouped by cluster
  matrix<T> centroids_;
};

}  // namespace fastattn::detail
