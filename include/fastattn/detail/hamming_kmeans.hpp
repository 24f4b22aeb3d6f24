// K-means in Hamming space over 64-bit hashes (clustered attention, step 2).
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <vector>

#include "../attention.hpp"
#include "parallel.hpp"
#include "rng.hpp"

namespace fastattn::detail {

/// Lloyd's algorithm on B-bit hashes with the Hamming distance popcount(h xor c).
///
/// - Initial centroids: the hashes of C distinct indices drawn uniformly from [0, n) (a partial
///   Fisher-Yates shuffle with `gen.below`).
/// - `iterations` assignment passes with `iterations - 1` centroid updates between them (the
///   reference's loop): iterations = 1 assigns every hash to the initial centroids only.
/// - Assignment: argmin over clusters of popcount(h xor c_j), ties to the lowest j.
/// - Update: per bit, the majority vote of the members' bits (a tie gives 0), from per-cluster bit
///   counts: gathered in one pass over the hashes, O(n B), then kept up to date by the
///   assignment passes (a hash that changes cluster moves its bits), so later updates cost
///   O(C B) plus O(B) per moved hash.
/// - Empty clusters (**ours**; the reference draws a random word from an unseedable generator,
///   which almost never attracts a member at B = 63): after the votes, each empty cluster in
///   index order gets the hash of a query drawn from `gen` among the *candidates*, the queries
///   whose hash is not already a centroid (neither a vote of this update nor an earlier refill),
///   with probability proportional to its squared Hamming distance to its own cluster's new
///   centroid, lowered to its distance to each refill as that is picked (the k-means++ seeding
///   rule, the own centroid standing in for the nearest one). So a group of queries that shares a
///   centroid with another group, or has none, is found quickly. When no candidate is left (every
///   distinct hash already is a centroid, as always happens once the C clusters outnumber the
///   distinct hashes), the remaining empty clusters stay empty, keep their centroids and draw
///   nothing. (A copy of an existing centroid splits no group: ties go to the lowest index, so it
///   takes over that centroid's members or none. Drawing such copies at every update changed the
///   centroids forever and defeated the fixed-point test below: issue 10.)
///   O(n log C) per update with an empty cluster, plus O(n) per refill.
/// - Stopping: when an assignment pass changes nothing, the remaining passes are skipped; the
///   result is bit-identical to running them (generator state included). Why, and why this
///   always happens (termination): let J = sum_i popcount(h_i xor c_{a_i}) after a pass, and
///   S = sum_i a_i.
///   * J never increases from one pass to the next: the votes minimise every non-empty cluster's
///     share of J (per bit, the majority is optimal; bits at or above `bits` are 0 in every hash
///     and every vote); empty clusters hold no query, so neither their refills nor their old
///     centroids enter J; and the next pass moves each hash to a centroid no farther than its
///     own, ties to the lowest index.
///   * If J stays equal, every hash that moved did so at equal distance, so to a lower index, and
///     S decreases. So (J, S) decreases lexicographically with every pass that changes an
///     assignment; it takes at most (n B + 1)(n (C - 1) + 1) values, so within that many passes
///     (in practice a handful) one changes nothing and the loop stops.
///   * A refill always changes an assignment: the picked hash is no centroid, so it sits at
///     distance >= 1 from its own cluster's centroid and 0 from the refill. So a pass that
///     changes nothing follows an update that refilled nothing, i.e. found no candidate (or no
///     empty cluster); the next update would take the same votes from the same members, again
///     find no candidate and draw nothing: the centroids are a fixed point.
///   * Refill bound: each refill lowers J by >= 1 at the next pass (the picked hash's term drops
///     from >= 1 to 0, and one update's picks are distinct hashes), so a run makes at most
///     J(first pass) <= n B refills in all (`refills()`), and at most min(empty clusters,
///     distinct hashes that are not centroids) per update.
///
/// Cost: O(passes n C) popcounts + O(n B + moves B + passes C B) counting + O(n log C) per update
/// with an empty cluster + O(n) per refill; memory O(n + C B) (and per-thread move counts, at most
/// 4 MiB, on several threads).
class hamming_kmeans {
 public:
  /// Clusters hashes[0..n). Preconditions: 1 <= clusters <= n, clusters < 2^32,
  /// 1 <= bits <= 64, iterations >= 1, and every hash has no bit set at or above `bits`.
  void run(const std::uint64_t* hashes, index n, index clusters, int bits, int iterations, rng& gen,
           int threads = 1) {
    const auto count = static_cast<std::size_t>(clusters);
    centroids_.resize(count);
    sizes_.assign(count, 0u);
    bit_counts_.assign(count * 64, 0u);
    assignment_.assign(static_cast<std::size_t>(n), -1);

    // Initial centroids: C distinct indices drawn uniformly (partial Fisher-Yates shuffle).
    order_.resize(static_cast<std::size_t>(n));
    for (index i = 0; i < n; ++i) order_[static_cast<std::size_t>(i)] = i;
    for (index c = 0; c < clusters; ++c) {
      const auto pick = c + static_cast<index>(gen.below(static_cast<std::uint64_t>(n - c)));
      std::swap(order_[static_cast<std::size_t>(c)], order_[static_cast<std::size_t>(pick)]);
      centroids_[static_cast<std::size_t>(c)] = hashes[order_[static_cast<std::size_t>(c)]];
    }

    // The first pass always changes (every slot starts at -1); after it, a pass that changes
    // nothing is a fixed point (see the class comment), and one is reached in finitely many passes.
    passes_ = 0;
    refills_ = 0;
    for (int pass = 0; pass < iterations; ++pass) {
      const bool changed = assign(hashes, n, threads);
      ++passes_;
      if (pass + 1 == iterations || !changed) break;
      refills_ += update(hashes, n, bits, gen);
    }
  }

  /// Cluster of each hash, in [0, clusters).
  const std::vector<index>& assignment() const noexcept { return assignment_; }
  /// The centroids the last assignment pass used.
  const std::vector<std::uint64_t>& centroids() const noexcept { return centroids_; }
  /// Assignment passes actually run (<= iterations; fewer when a fixed point was reached).
  int passes() const noexcept { return passes_; }
  /// Empty clusters refilled over the run (<= the objective after the first pass <= n * bits).
  index refills() const noexcept { return refills_; }

 private:
  // One assignment pass; returns whether any hash changed cluster. The nearest centroids are
  // found on `threads` threads (chunks of hashes, each independent), then stored in order.
  bool assign(const std::uint64_t* hashes, index n, int threads) {
    const std::uint64_t* centroids = centroids_.data();
    const auto clusters = static_cast<std::uint64_t>(centroids_.size());
    nearest_.resize(static_cast<std::size_t>(n));
    std::uint64_t* const nearest = nearest_.data();
    // Keys (distance << 32 | cluster): the minimum key is the nearest centroid with the lowest
    // index, a plain min-reduction. Blocks of `lanes` hashes against one centroid at a time: the
    // inner loop is what the compiler vectorises (vpopcntq and vpminuq with AVX-512).
    constexpr index lanes = 16, chunk = 64 * lanes;
    parallel_for(threads, (n + chunk - 1) / chunk, [&](index c) {
      const index begin = c * chunk, end = std::min(n, begin + chunk);
      index i = begin;
      for (; i + lanes <= end; i += lanes) {
        std::uint64_t best[lanes], h[lanes];
        for (index t = 0; t < lanes; ++t) {
          best[t] = ~std::uint64_t{0};
          h[t] = hashes[i + t];
        }
        for (std::uint64_t j = 0; j < clusters; ++j) {
          const std::uint64_t cj = centroids[j];
          for (index t = 0; t < lanes; ++t)
            best[t] =
                std::min(best[t], (static_cast<std::uint64_t>(std::popcount(h[t] ^ cj)) << 32) | j);
        }
        for (index t = 0; t < lanes; ++t) nearest[i + t] = best[t];
      }
      for (; i < end; ++i) {
        const std::uint64_t h = hashes[i];
        std::uint64_t best = ~std::uint64_t{0};
        for (std::uint64_t j = 0; j < clusters; ++j)
          best = std::min(best,
                          (static_cast<std::uint64_t>(std::popcount(h ^ centroids[j])) << 32) | j);
        nearest[i] = best;
      }
    });
    return apply_moves(hashes, n, threads);
  }

  // Stores the pass's clusters and brings the per-cluster sizes and bit counts up to date by the
  // hashes that changed cluster (the assignment passes keep them, so after the first pass only
  // those cost anything, instead of a full O(n B) recount per update); returns whether any did.
  // On several threads: each task takes a range of hashes and counts its moves into its own
  // deltas (clusters x 64), added up after; integer counts, so the same on any thread count.
  // (On one thread they were a serial eighth of a 1.15 ms k-means at n = 16384, C = 100,
  // mostly in the first pass, which moves every hash.) The deltas are used while they stay small
  // (at most 4 MiB in all) and the hashes many; otherwise one thread counts.
  bool apply_moves(const std::uint64_t* hashes, index n, int threads) {
    const auto clusters = centroids_.size();
    const std::size_t per_task = clusters * 65;  // 64 bit counts and a size per cluster
    index tasks = std::min<index>(std::max(threads, 1), n / 4096);
    if (per_task * static_cast<std::size_t>(std::max<index>(tasks, 1)) * sizeof(std::uint32_t) >
        (std::size_t{4} << 20))
      tasks = 1;
    if (tasks <= 1) return move_range(hashes, 0, n, sizes_.data(), bit_counts_.data());
    deltas_.assign(per_task * static_cast<std::size_t>(tasks), 0u);
    changed_.assign(static_cast<std::size_t>(tasks), 0);
    parallel_for(threads, tasks, [&](index t) {
      std::uint32_t* const own = deltas_.data() + per_task * static_cast<std::size_t>(t);
      changed_[static_cast<std::size_t>(t)] =
          move_range(hashes, t * n / tasks, (t + 1) * n / tasks, own, own + clusters) ? 1 : 0;
    });
    // Unsigned sums wrap: a delta of -1 is 2^32 - 1, and every final count is in range.
    for (index t = 0; t < tasks; ++t) {
      const std::uint32_t* const own = deltas_.data() + per_task * static_cast<std::size_t>(t);
      for (std::size_t c = 0; c < clusters; ++c) sizes_[c] += own[c];
      for (std::size_t b = 0; b < clusters * 64; ++b) bit_counts_[b] += own[clusters + b];
    }
    return std::find(changed_.begin(), changed_.end(), 1) != changed_.end();
  }

  // The moves of hashes [begin, end) into sizes (clusters) and counts (clusters x 64): a hash
  // whose nearest cluster is not its own leaves it (unless it had none, in the first pass) and
  // enters the nearest. Returns whether any moved.
  bool move_range(const std::uint64_t* hashes, index begin, index end, std::uint32_t* sizes,
                  std::uint32_t* counts) {
    bool changed = false;
    for (index i = begin; i < end; ++i) {
      const auto cluster = static_cast<index>(nearest_[static_cast<std::size_t>(i)] & 0xFFFFFFFFu);
      auto& slot = assignment_[static_cast<std::size_t>(i)];
      if (slot == cluster) continue;
      if (slot >= 0) {
        --sizes[slot];
        count_bits<-1>(hashes[i], counts + slot * 64);
      }
      ++sizes[cluster];
      count_bits<+1>(hashes[i], counts + cluster * 64);
      slot = cluster;
      changed = true;
    }
    return changed;
  }

  // counts[b] += Sign * (bit b of h), b < 64: by 32-bit halves, shifted per lane (the form
  // compilers vectorise: 4 packets of shifts, masks and adds with AVX-512).
  template <int Sign>
  static void count_bits(std::uint64_t h, std::uint32_t* counts) noexcept {
    const auto lo = static_cast<std::uint32_t>(h), hi = static_cast<std::uint32_t>(h >> 32);
    for (std::uint32_t b = 0; b < 32; ++b) {
      if constexpr (Sign > 0)
        counts[b] += (lo >> b) & 1u;
      else
        counts[b] -= (lo >> b) & 1u;
    }
    for (std::uint32_t b = 0; b < 32; ++b) {
      if constexpr (Sign > 0)
        counts[32 + b] += (hi >> b) & 1u;
      else
        counts[32 + b] -= (hi >> b) & 1u;
    }
  }

  // Majority-vote update from the maintained bit counts, then the refills; returns how many empty
  // clusters were refilled.
  index update(const std::uint64_t* hashes, index n, int bits, rng& gen) {
    bool empty = false;
    for (std::size_t c = 0; c < centroids_.size(); ++c) {
      if (sizes_[c] == 0) {
        empty = true;
        continue;
      }
      const std::uint32_t* counts = bit_counts_.data() + c * 64;
      std::uint64_t centroid = 0;
      for (int b = 0; b < bits; ++b)
        centroid |=
            static_cast<std::uint64_t>(2 * static_cast<std::uint64_t>(counts[b]) > sizes_[c]) << b;
      centroids_[c] = centroid;
    }
    return empty ? refill(hashes, n, gen) : 0;
  }

  // Gives empty clusters, in index order, the hash of a candidate query (one whose hash is no
  // centroid yet) drawn with probability proportional to its squared distance to its own
  // cluster's centroid, lowered to its distance to each refill as that is picked (the k-means++
  // rule); a query at distance 0 is no candidate. Stops when no candidate is left: the remaining
  // empty clusters stay as they are. Returns how many clusters it refilled.
  index refill(const std::uint64_t* hashes, index n, rng& gen) {
    // The centroids already taken: the votes of the non-empty clusters, in an open-addressing
    // set (a probe or two per query; a binary search over them mispredicted its way through
    // most of this function's time).
    taken_.clear();
    for (std::size_t c = 0; c < centroids_.size(); ++c)
      if (sizes_[c] != 0) taken_.insert(centroids_[c]);
    distances_.resize(static_cast<std::size_t>(n));
    std::uint64_t total = 0;
    for (index i = 0; i < n; ++i) {
      const std::uint64_t h = hashes[i];
      const auto c = static_cast<std::size_t>(assignment_[static_cast<std::size_t>(i)]);
      auto d = static_cast<std::uint64_t>(std::popcount(h ^ centroids_[c]));
      // Another cluster's centroid already (its own one is d = 0): no candidate either.
      if (d != 0 && taken_.contains(h)) d = 0;
      distances_[static_cast<std::size_t>(i)] = d * d;
      total += d * d;
    }
    index refilled = 0;
    for (std::size_t c = 0; c < centroids_.size() && total != 0; ++c) {
      if (sizes_[c] != 0) continue;
      index pick = 0;
      std::uint64_t target = gen.below(total);
      while (target >= distances_[static_cast<std::size_t>(pick)])
        target -= distances_[static_cast<std::size_t>(pick++)];
      const std::uint64_t centroid = hashes[pick];
      centroids_[c] = centroid;
      ++refilled;
      // Every copy of the pick drops to 0: the picks of one update are distinct hashes.
      total = 0;
      for (index i = 0; i < n; ++i) {
        const auto d = static_cast<std::uint64_t>(std::popcount(hashes[i] ^ centroid));
        auto& slot = distances_[static_cast<std::size_t>(i)];
        slot = std::min(slot, d * d);
        total += slot;
      }
    }
    return refilled;
  }

  std::vector<std::uint64_t> centroids_;
  std::vector<std::uint64_t> distances_;
  // A set of 64-bit words with open addressing and linear probing: the centroids of the
  // non-empty clusters during a refill.
  class word_set {
   public:
    void clear() {  // keeps the slots: no allocation once they are large enough
      std::fill(used_.begin(), used_.end(), static_cast<unsigned char>(0));
      count_ = 0;
    }
    void insert(std::uint64_t w) {
      if (2 * (count_ + 1) > slots_.size()) grow();
      place(w);
    }
    bool contains(std::uint64_t w) const noexcept {
      if (slots_.empty()) return false;
      for (std::size_t s = slot(w);; s = (s + 1) & (slots_.size() - 1)) {
        if (!used_[s]) return false;
        if (slots_[s] == w) return true;
      }
    }

   private:
    std::size_t slot(std::uint64_t w) const noexcept {
      return static_cast<std::size_t>((w * 0x9E3779B97F4A7C15ULL) >> shift_);
    }
    void place(std::uint64_t w) {
      std::size_t s = slot(w);
      for (; used_[s]; s = (s + 1) & (slots_.size() - 1))
        if (slots_[s] == w) return;
      slots_[s] = w;
      used_[s] = 1;
      ++count_;
    }
    void grow() {
      std::vector<std::uint64_t> old;
      for (std::size_t s = 0; s < slots_.size(); ++s)
        if (used_[s]) old.push_back(slots_[s]);
      const std::size_t size = std::max<std::size_t>(64, 4 * slots_.size());
      slots_.assign(size, 0);
      used_.assign(size, 0);
      shift_ = 64 - std::countr_zero(size);
      count_ = 0;
      for (const std::uint64_t w : old) place(w);
    }
    std::vector<std::uint64_t> slots_;
    std::vector<unsigned char> used_;
    std::size_t count_ = 0;
    int shift_ = 64;
  };

  word_set taken_;  // centroids of the non-empty clusters (refill)
  std::vector<std::uint32_t> sizes_;
  std::vector<std::uint32_t> bit_counts_;  // clusters x 64
  std::vector<index> assignment_;
  std::vector<index> order_;
  std::vector<std::uint64_t> nearest_;  // per hash: (distance << 32 | cluster) of this pass
  std::vector<std::uint32_t> deltas_;   // per task of apply_moves: sizes, then bit counts
  std::vector<char> changed_;           // per task of apply_moves: whether a hash moved
  int passes_ = 0;
  index refills_ = 0;
};

}  // namespace fastattn::detail
