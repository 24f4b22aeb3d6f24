// The clustering machinery under clustered and improved_clustered: hyperplane hashing (bit
// semantics, threshold column, hash_bias), Hamming k-means (initialisation, assignment ties,
// majority vote, iterations semantics, planted groups, termination with fewer distinct hashes than
// clusters) and the top-k selection.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <fastattn/detail/clustering.hpp>
#include <fastattn/detail/hamming_kmeans.hpp>
#include <fastattn/detail/hyperplane_hash.hpp>
#include <fastattn/detail/topk.hpp>

#include "reference.hpp"

namespace fa = fastattn;

namespace {

using fa::index;
using fa::detail::hamming_kmeans;
using fa::detail::hyperplane_hash;
using fa::detail::rng;
using fa::testing::gaussian;

// The hyperplanes drawn by hand in the documented order: row b = [a_b (E values), t_b].
fa::testing::matd draw_planes(std::uint64_t seed, std::uint64_t stream, index E, int B) {
  rng gen(seed, stream);
  fa::testing::matd planes(B, E + 1);
  for (int b = 0; b < B; ++b)
    for (index e = 0; e <= E; ++e) planes(b, e) = gen.normal();
  return planes;
}

template <class T>
class HashTyped : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(HashTyped, Scalars);

TYPED_TEST(HashTyped, BitIsProjectionAboveThreshold) {
  using T = TypeParam;
  for (const int B : {1, 5, 63, 64}) {
    const index E = 7, n = 300;
    const auto planes = draw_planes(3, 1, E, B);
    rng gen(3, 1);
    hyperplane_hash<T> hash(E, B, true, gen);
    ASSERT_EQ(hash.bits(), B);
    for (int b = 0; b < B; ++b) {
      EXPECT_EQ(hash.thresholds()(b), static_cast<T>(planes(b, E)));
      for (index e = 0; e < E; ++e) EXPECT_EQ(hash.planes()(e, b), static_cast<T>(planes(b, e)));
    }
    // Queries of norm ~1, comparable to the thresholds, so the threshold column matters.
    const auto q = gaussian<T>(n, E, 17, 0.4);
    std::vector<std::uint64_t> h(static_cast<std::size_t>(n));
    hash(q, h.data());
    int checked = 0, threshold_decided = 0;
    for (index i = 0; i < n; ++i) {
      if (B < 64) {
        EXPECT_EQ(h[static_cast<std::size_t>(i)] >> B, 0u) << "bits above B must be zero";
      }
      for (int b = 0; b < B; ++b) {
        double dot = 0;
        for (index e = 0; e < E; ++e) dot += static_cast<double>(q(i, e)) * planes(b, e);
        const double t = planes(b, E);
        if (std::abs(dot - t) < 1e-4) continue;  // too close to call in float
        const bool bit = (h[static_cast<std::size_t>(i)] >> b) & 1u;
        EXPECT_EQ(bit, dot > t) << "query " << i << " bit " << b;
        ++checked;
        threshold_decided += (dot > t) != (dot > 0) ? 1 : 0;
      }
    }
    EXPECT_GT(checked, n * B * 9 / 10);
    if (B >= 5) {
      EXPECT_GT(threshold_decided, 0) << "test data never exercised the threshold";
    }
  }
}

TYPED_TEST(HashTyped, NoBiasZeroesThresholdsKeepsHyperplanes) {
  using T = TypeParam;
  const index E = 12, n = 200;
  const int B = 40;
  rng with_gen(9, 4), without_gen(9, 4);
  hyperplane_hash<T> with(E, B, true, with_gen), without(E, B, false, without_gen);
  EXPECT_EQ(with.planes(), without.planes());
  EXPECT_TRUE((without.thresholds().array() == T(0)).all());
  EXPECT_FALSE((with.thresholds().array() == T(0)).all());
  // Both consumed the same draws.
  EXPECT_EQ(with_gen(), without_gen());
  // Sign hashing: bit b is q . a_b > 0, so -q has the complementary bits.
  const auto q = gaussian<T>(n, E, 5);
  const fa::matrix<T> minus_q = -q;
  std::vector<std::uint64_t> h(static_cast<std::size_t>(n)), hm(static_cast<std::size_t>(n));
  without(q, h.data());
  without(minus_q, hm.data());
  const std::uint64_t all = (std::uint64_t{1} << B) - 1;
  for (std::size_t i = 0; i < h.size(); ++i) EXPECT_EQ(h[i] ^ hm[i], all) << i;
  // The zero vector: no bit without thresholds; bit b = (0 > t_b) with them.
  const fa::matrix<T> zero = fa::matrix<T>::Zero(1, E);
  std::uint64_t hz = 1, hzb = 0;
  without(zero, &hz);
  with(zero, &hzb);
  EXPECT_EQ(hz, 0u);
  std::uint64_t expected = 0;
  for (int b = 0; b < B; ++b)
    expected |= static_cast<std::uint64_t>(with.thresholds()(b) < T(0)) << b;
  EXPECT_EQ(hzb, expected);
}

TEST(Hash, ManyRowsUseBlocksConsistently) {
  // More rows than one projection block: every row hashes as it does alone.
  const index E = 9, n = 3 * hyperplane_hash<double>::block + 17;
  rng gen(1);
  hyperplane_hash<double> hash(E, 63, true, gen);
  const auto q = gaussian<double>(n, E, 2);
  std::vector<std::uint64_t> all(static_cast<std::size_t>(n));
  hash(q, all.data());
  for (const index i : {index{0}, index{255}, index{256}, index{600}, n - 1}) {
    std::uint64_t one = 0;
    hash(q.middleRows(i, 1), &one);
    EXPECT_EQ(one, all[static_cast<std::size_t>(i)]) << i;
  }
}

// ---------------------------------------------------------------------------------------------
// Hamming k-means.

std::uint64_t mask(int bits) {
  return bits == 64 ? ~std::uint64_t{0} : (std::uint64_t{1} << bits) - 1;
}

index nearest(std::uint64_t h, const std::vector<std::uint64_t>& centroids) {
  index best = 0;
  for (std::size_t j = 1; j < centroids.size(); ++j)
    if (std::popcount(h ^ centroids[j]) <
        std::popcount(h ^ centroids[static_cast<std::size_t>(best)]))
      best = static_cast<index>(j);
  return best;
}

// The initial centroids as documented: a partial Fisher-Yates shuffle with rng::below.
std::vector<std::uint64_t> initial_centroids(const std::vector<std::uint64_t>& hashes, index C,
                                             rng& gen) {
  const auto n = static_cast<index>(hashes.size());
  std::vector<index> order(hashes.size());
  std::iota(order.begin(), order.end(), index{0});
  std::vector<std::uint64_t> centroids;
  for (index c = 0; c < C; ++c) {
    const auto pick = c + static_cast<index>(gen.below(static_cast<std::uint64_t>(n - c)));
    std::swap(order[static_cast<std::size_t>(c)], order[static_cast<std::size_t>(pick)]);
    centroids.push_back(hashes[static_cast<std::size_t>(order[static_cast<std::size_t>(c)])]);
  }
  return centroids;
}

std::vector<std::uint64_t> random_hashes(index n, int bits, std::uint64_t seed, int distinct = 0) {
  std::mt19937_64 gen(seed);
  std::vector<std::uint64_t> pool;
  for (int i = 0; i < distinct; ++i) pool.push_back(gen() & mask(bits));
  std::vector<std::uint64_t> h(static_cast<std::size_t>(n));
  for (auto& x : h) x = distinct > 0 ? pool[gen() % pool.size()] : gen() & mask(bits);
  return h;
}

TEST(HammingKmeans, OneIterationAssignsToInitialCentroidsWithLowestIndexTies) {
  for (const int distinct : {0, 6}) {  // 6 distinct hashes: duplicated centroids, many ties
    const auto hashes = random_hashes(500, 20, 7 + static_cast<std::uint64_t>(distinct), distinct);
    const index C = 9;
    rng gen(11, 2), replay(11, 2);
    hamming_kmeans km;
    km.run(hashes.data(), 500, C, 20, 1, gen);
    const auto init = initial_centroids(hashes, C, replay);
    EXPECT_EQ(km.centroids(), init);
    EXPECT_EQ(km.passes(), 1);
    for (std::size_t i = 0; i < hashes.size(); ++i)
      ASSERT_EQ(km.assignment()[i], nearest(hashes[i], init)) << "hash " << i;
    // iterations = 1 draws nothing after the initialisation.
    EXPECT_EQ(gen(), replay());
  }
}

TEST(HammingKmeans, UpdateIsPerBitMajorityWithTiesToZero) {
  // Two hashes in one cluster: bits where they agree are kept, bits where they differ tie -> 0.
  const std::vector<std::uint64_t> hashes = {0b1011'0110, 0b1101'0011};
  rng gen(1);
  hamming_kmeans km;
  km.run(hashes.data(), 2, 1, 8, 2, gen);
  EXPECT_EQ(km.centroids(), std::vector<std::uint64_t>{0b1001'0010});
  // Three hashes: a strict majority of 2 to 1 per bit.
  const std::vector<std::uint64_t> three = {0b1100, 0b1010, 0b0110};
  km.run(three.data(), 3, 1, 4, 2, gen);
  EXPECT_EQ(km.centroids(), std::vector<std::uint64_t>{0b1110});

  // Many clusters: the second pass's centroids are the majority votes of the first pass's
  // clusters (all hashes distinct, so no cluster is empty and no refill is drawn).
  const auto many = random_hashes(400, 63, 3);
  const index C = 12;
  rng one_gen(5), two_gen(5);
  hamming_kmeans one, two;
  one.run(many.data(), 400, C, 63, 1, one_gen);
  two.run(many.data(), 400, C, 63, 2, two_gen);
  std::vector<std::uint64_t> expected(static_cast<std::size_t>(C));
  for (index c = 0; c < C; ++c) {
    int size = 0;
    std::vector<int> ones(63, 0);
    for (std::size_t i = 0; i < many.size(); ++i) {
      if (one.assignment()[i] != c) continue;
      ++size;
      for (int b = 0; b < 63; ++b)
        ones[static_cast<std::size_t>(b)] += static_cast<int>((many[i] >> b) & 1u);
    }
    ASSERT_GT(size, 0);
    for (int b = 0; b < 63; ++b)
      if (2 * ones[static_cast<std::size_t>(b)] > size)
        expected[static_cast<std::size_t>(c)] |= std::uint64_t{1} << b;
  }
  EXPECT_EQ(two.centroids(), expected);
  for (std::size_t i = 0; i < many.size(); ++i)
    ASSERT_EQ(two.assignment()[i], nearest(many[i], expected));
}

// Sum of Hamming distances of every hash to its centroid.
long objective(const std::vector<std::uint64_t>& hashes, const hamming_kmeans& km) {
  long total = 0;
  for (std::size_t i = 0; i < hashes.size(); ++i)
    total +=
        std::popcount(hashes[i] ^ km.centroids()[static_cast<std::size_t>(km.assignment()[i])]);
  return total;
}

TEST(HammingKmeans, MoreIterationsNeverIncreaseTheObjective) {
  const auto hashes = random_hashes(1000, 63, 21);
  long previous = std::numeric_limits<long>::max();
  for (int iterations = 1; iterations <= 10; ++iterations) {
    rng gen(8);
    hamming_kmeans km;
    km.run(hashes.data(), 1000, 30, 63, iterations, gen);
    EXPECT_LE(km.passes(), iterations);
    const long now = objective(hashes, km);
    EXPECT_LE(now, previous) << "iterations = " << iterations;
    previous = now;
  }
}

// Groups of hashes within a few bits of far-apart centres.
struct planted {
  std::vector<std::uint64_t> hashes;
  std::vector<int> group;
};

planted plant(int groups, int per_group, int flips, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::vector<std::uint64_t> centres;
  while (static_cast<int>(centres.size()) < groups) {
    const std::uint64_t c = gen() & mask(63);
    bool far = true;
    for (const auto other : centres) far = far && std::popcount(c ^ other) >= 20;
    if (far) centres.push_back(c);
  }
  planted p;
  for (int i = 0; i < groups * per_group; ++i) {
    const int g = static_cast<int>(gen() % static_cast<std::uint64_t>(groups));
    std::uint64_t h = centres[static_cast<std::size_t>(g)];
    for (int f = 0; f < flips; ++f) h ^= std::uint64_t{1} << (gen() % 63);
    p.hashes.push_back(h);
    p.group.push_back(g);
  }
  return p;
}

TEST(HammingKmeans, RecoversPlantedGroups) {
  // 8 groups, 5 x as many clusters: every group gets a centroid, so no cluster may mix groups.
  for (std::uint64_t seed = 0; seed < 5; ++seed) {
    const auto p = plant(8, 60, 3, 100 + seed);
    rng gen(seed);
    hamming_kmeans km;
    const auto n = static_cast<index>(p.hashes.size());
    km.run(p.hashes.data(), n, 40, 63, 10, gen);
    std::vector<int> owner(40, -1);
    std::set<int> groups_seen;
    for (std::size_t i = 0; i < p.hashes.size(); ++i) {
      int& o = owner[static_cast<std::size_t>(km.assignment()[i])];
      if (o == -1) o = p.group[i];
      ASSERT_EQ(o, p.group[i]) << "cluster " << km.assignment()[i] << " mixes groups, seed "
                               << seed;
      groups_seen.insert(p.group[i]);
    }
    EXPECT_EQ(groups_seen.size(), 8u);
  }
  // As many clusters as groups, exact: with hashes identical within a group, every seed here
  // ends with one cluster per group (duplicate initial centroids leave clusters empty, and the
  // refills from the generator find the missing groups).
  for (std::uint64_t seed = 0; seed < 5; ++seed) {
    const auto p = plant(5, 40, 0, 200 + seed);
    rng gen(seed);
    hamming_kmeans km;
    km.run(p.hashes.data(), static_cast<index>(p.hashes.size()), 5, 63, 10, gen);
    std::vector<int> owner(5, -1);
    for (std::size_t i = 0; i < p.hashes.size(); ++i) {
      int& o = owner[static_cast<std::size_t>(km.assignment()[i])];
      if (o == -1) o = p.group[i];
      ASSERT_EQ(o, p.group[i]) << "seed " << seed;
    }
  }
}

TEST(HammingKmeans, FixedPointStopsEarlyWithIdenticalResult) {
  const auto p = plant(6, 50, 2, 77);
  const auto n = static_cast<index>(p.hashes.size());
  rng a_gen(4), b_gen(4);
  hamming_kmeans a, b;
  a.run(p.hashes.data(), n, 30, 63, 10, a_gen);
  b.run(p.hashes.data(), n, 30, 63, 1000, b_gen);
  EXPECT_LT(b.passes(), 1000);
  EXPECT_EQ(a.assignment(), b.assignment());
  EXPECT_EQ(a.centroids(), b.centroids());
}

// Large enough for the moves to be counted by several threads (n >= 2 x 4096, per-thread counts
// within their budget): every thread count gives the same passes, refills, clusters, centroids
// and generator state as one thread.
TEST(HammingKmeans, SameRunOnAnyThreadCount) {
  const auto p = plant(40, 210, 6, 91);  // 8400 hashes in 40 noisy groups: many moves per pass
  const auto n = static_cast<index>(p.hashes.size());
  for (const auto& [C, iterations] : {std::pair<index, int>{40, 6}, {300, 6}}) {
    rng one_gen(static_cast<std::uint64_t>(C), 3);
    hamming_kmeans one;
    one.run(p.hashes.data(), n, C, 63, iterations, one_gen);
    ASSERT_GE(one.passes(), 2) << "C " << C;  // a later pass moves hashes between clusters
    for (const int threads : {2, 3}) {
      SCOPED_TRACE(::testing::Message() << "C " << C << " threads " << threads);
      rng gen(static_cast<std::uint64_t>(C), 3);
      hamming_kmeans km;
      km.run(p.hashes.data(), n, C, 63, iterations, gen, threads);
      EXPECT_EQ(km.passes(), one.passes());
      EXPECT_EQ(km.refills(), one.refills());
      EXPECT_EQ(km.assignment(), one.assignment());
      EXPECT_EQ(km.centroids(), one.centroids());
      rng copy = one_gen;
      EXPECT_EQ(gen(), copy());
    }
  }
}

TEST(HammingKmeans, ClusterPerHashWhenClustersEqualsCount) {
  const auto hashes = random_hashes(50, 63, 9);
  rng gen(2);
  hamming_kmeans km;
  km.run(hashes.data(), 50, 50, 63, 10, gen);
  std::set<index> used(km.assignment().begin(), km.assignment().end());
  EXPECT_EQ(used.size(), 50u);
}

// Fewer distinct hashes than clusters (issue 10, item 9): some clusters are empty for good, and
// refilling them with copies of existing centroids used to defeat the fixed-point test, so the
// loop ran all `iterations` passes (hours at INT_MAX). The pass counts below are asserted at a
// moderate iteration count first, so that a regression fails instead of hanging.

// Checks a run that stopped at a fixed point with fewer distinct hashes than clusters: every
// hash is assigned to its nearest centroid (lowest index on ties), sits on it, and each distinct
// hash has a cluster of its own.
void expect_one_cluster_per_distinct_hash(const std::vector<std::uint64_t>& hashes,
                                          const hamming_kmeans& km, index C) {
  ASSERT_EQ(km.assignment().size(), hashes.size());
  ASSERT_EQ(km.centroids().size(), static_cast<std::size_t>(C));
  std::map<index, std::uint64_t> value_of;  // cluster -> its one distinct hash
  std::map<std::uint64_t, index> cluster_of;
  for (std::size_t i = 0; i < hashes.size(); ++i) {
    const index c = km.assignment()[i];
    ASSERT_GE(c, 0);
    ASSERT_LT(c, C);
    ASSERT_EQ(c, nearest(hashes[i], km.centroids())) << "hash " << i;
    ASSERT_EQ(km.centroids()[static_cast<std::size_t>(c)], hashes[i]) << "hash " << i;
    ASSERT_EQ(value_of.emplace(c, hashes[i]).first->second, hashes[i]) << "cluster " << c;
    ASSERT_EQ(cluster_of.emplace(hashes[i], c).first->second, c) << "hash " << i;
  }
  EXPECT_EQ(value_of.size(), std::set<std::uint64_t>(hashes.begin(), hashes.end()).size());
}

TEST(HammingKmeans, RepeatedHashesReachFixedPointInFewPasses) {
  // 300 queries of 7 distinct rows, 100 clusters: at most 7 clusters can ever be non-empty.
  const auto hashes = random_hashes(300, 63, 31, 7);
  ASSERT_EQ(std::set<std::uint64_t>(hashes.begin(), hashes.end()).size(), 7u);
  for (std::uint64_t seed = 0; seed < 8; ++seed) {
    rng gen(seed);
    hamming_kmeans km;
    km.run(hashes.data(), 300, 100, 63, 1000, gen);
    ASSERT_LE(km.passes(), 10) << "seed " << seed;
    expect_one_cluster_per_distinct_hash(hashes, km, 100);
  }
  // One rare hash among 299 copies of another: usually no initial centroid, so it shares the
  // common hash's cluster until a refill (which must pick it, the only non-centroid) splits it.
  std::vector<std::uint64_t> rare(300, 0x5555'5555'5555'5555u);
  rare[123] = 0x0F0F'0F0F'0F0F'0F0Fu;
  int refilled = 0;
  for (std::uint64_t seed = 0; seed < 8; ++seed) {
    rng gen(seed);
    hamming_kmeans km;
    km.run(rare.data(), 300, 100, 63, 1000, gen);
    ASSERT_LE(km.passes(), 10) << "seed " << seed;
    EXPECT_LE(km.refills(), 1);
    refilled += static_cast<int>(km.refills());
    expect_one_cluster_per_distinct_hash(rare, km, 100);
  }
  EXPECT_GT(refilled, 0) << "no seed exercised the refill";
}

TEST(HammingKmeans, RepeatedHashesFinishWithMaximalIterations) {
  const auto hashes = random_hashes(300, 63, 31, 7);
  const int huge = std::numeric_limits<int>::max();
  for (const index C : {index{100}, index{300}}) {
    rng guard_gen(3), gen(3);
    hamming_kmeans guard, km;
    guard.run(hashes.data(), 300, C, 63, 1000, guard_gen);
    ASSERT_LE(guard.passes(), 10) << "would not stop early: not running the INT_MAX case";
    km.run(hashes.data(), 300, C, 63, huge, gen);
    EXPECT_LE(km.passes(), 10);
    expect_one_cluster_per_distinct_hash(hashes, km, C);
    // The fixed point is the result of running every pass: identical to the guard's run.
    EXPECT_EQ(km.passes(), guard.passes());
    EXPECT_EQ(km.assignment(), guard.assignment());
    EXPECT_EQ(km.centroids(), guard.centroids());
    EXPECT_EQ(gen(), guard_gen());
  }
}

// Duplicate patterns: how the n hashes are drawn from a pool of `distinct` values.
enum class duplicates { uniform, skewed, blocked, near };

std::vector<std::uint64_t> duplicated_hashes(index n, int bits, int distinct, duplicates pattern,
                                             std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::vector<std::uint64_t> pool;
  const std::uint64_t centre = gen() & mask(bits);
  for (int v = 0; v < distinct; ++v) {
    std::uint64_t x = gen() & mask(bits);
    if (pattern == duplicates::near) {  // within 3 bits of one centre: votes mix values
      x = centre;
      for (int f = 0; f < 3; ++f) x ^= std::uint64_t{1} << (gen() % static_cast<unsigned>(bits));
    }
    pool.push_back(x);
  }
  std::vector<std::uint64_t> h(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < h.size(); ++i) {
    std::size_t v = gen() % pool.size();
    if (pattern == duplicates::skewed) v = std::min(v, gen() % pool.size());  // favours low v
    if (pattern == duplicates::skewed && gen() % 2 == 0) v = 0;               // one dominates
    if (pattern == duplicates::blocked) v = i * pool.size() / h.size();       // contiguous runs
    h[i] = pool[v];
  }
  return h;
}

class HammingKmeansFewDistinct : public ::testing::TestWithParam<int> {};

TEST_P(HammingKmeansFewDistinct, TerminatesWithAValidAssignment) {
  const int distinct = GetParam();
  const index n = 300, C = 100;
  for (const duplicates pattern :
       {duplicates::uniform, duplicates::skewed, duplicates::blocked, duplicates::near}) {
    for (const int bits : {8, 63}) {
      for (std::uint64_t seed = 0; seed < 6; ++seed) {
        SCOPED_TRACE(::testing::Message() << "pattern " << static_cast<int>(pattern) << " bits "
                                          << bits << " seed " << seed);
        const auto hashes = duplicated_hashes(n, bits, distinct, pattern, 1000 * seed + 7);
        ASSERT_LT(std::set<std::uint64_t>(hashes.begin(), hashes.end()).size(),
                  static_cast<std::size_t>(C));
        rng gen(seed, 5), again_gen(seed, 5), first_gen(seed, 5);
        hamming_kmeans km, again, first;
        km.run(hashes.data(), n, C, bits, 1000, gen);
        ASSERT_LE(km.passes(), 10);
        expect_one_cluster_per_distinct_hash(hashes, km, C);
        // Refills are bounded by the objective after the first pass (each lowers it by >= 1).
        first.run(hashes.data(), n, C, bits, 1, first_gen);
        EXPECT_LE(km.refills(), objective(hashes, first));
        // Deterministic: the same seed gives the same run and leaves the generator in the same
        // state.
        again.run(hashes.data(), n, C, bits, 1000, again_gen);
        EXPECT_EQ(again.passes(), km.passes());
        EXPECT_EQ(again.refills(), km.refills());
        EXPECT_EQ(again.assignment(), km.assignment());
        EXPECT_EQ(again.centroids(), km.centroids());
        EXPECT_EQ(again_gen(), gen());
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(DistinctCounts, HammingKmeansFewDistinct, ::testing::Values(1, 2, 7, 50),
                         [](const ::testing::TestParamInfo<int>& param) {
                           return "distinct" + std::to_string(param.param);
                         });

// ---------------------------------------------------------------------------------------------
// Clustering in query space.

TEST(QueryClustering, MembersPartitionValidQueriesAndCentroidsAreMeans) {
  const index L = 300, Lv = 250, E = 6;
  auto q = gaussian<double>(L, E, 3);
  q.bottomRows(L - Lv).setConstant(std::numeric_limits<double>::quiet_NaN());
  rng gen(1);
  fa::detail::query_clustering<double> groups;
  groups.run(fa::const_view<double>(q), Lv, {20, 63, 10, true}, gen);
  ASSERT_GE(groups.count(), 1);
  ASSERT_LE(groups.count(), 20);
  std::vector<int> seen(static_cast<std::size_t>(Lv), 0);
  for (index j = 0; j < groups.count(); ++j) {
    ASSERT_GT(groups.size(j), 0);
    Eigen::RowVectorXd mean = Eigen::RowVectorXd::Zero(E);
    for (index r = groups.begin(j); r < groups.end(j); ++r) {
      const index i = groups.member(r);
      ASSERT_GE(i, 0);
      ASSERT_LT(i, Lv);
      if (r > groups.begin(j)) {
        EXPECT_LT(groups.member(r - 1), i);
      }
      ++seen[static_cast<std::size_t>(i)];
      mean += q.row(i);
    }
    mean /= static_cast<double>(groups.size(j));
    EXPECT_LT((groups.centroids().row(j) - mean).norm(), 1e-12);
  }
  EXPECT_TRUE(std::all_of(seen.begin(), seen.end(), [](int s) { return s == 1; }));
  EXPECT_TRUE(groups.centroids().allFinite());
}

// ---------------------------------------------------------------------------------------------
// Top-k selection.

template <class T>
std::vector<index> brute_top_k(const std::vector<T>& v, index k) {
  auto key = [](T x) { return x != x ? -std::numeric_limits<T>::infinity() : x; };
  std::vector<index> idx(v.size());
  std::iota(idx.begin(), idx.end(), index{0});
  std::stable_sort(idx.begin(), idx.end(), [&](index a, index b) {
    return key(v[static_cast<std::size_t>(a)]) > key(v[static_cast<std::size_t>(b)]);
  });
  idx.resize(static_cast<std::size_t>(std::min<index>(k, static_cast<index>(v.size()))));
  std::sort(idx.begin(), idx.end());
  return idx;
}

// Float and double (their packets differ: 16 and 8 lanes under AVX-512, so a 32-value chunk is
// 2 or 4 packets), every chunk position of NaN, ties and infinities.
template <class T>
void check_top_k_matches_sorting() {
  std::mt19937_64 gen(5);
  fa::detail::top_k<T> select;
  const T nan = std::numeric_limits<T>::quiet_NaN(), inf = std::numeric_limits<T>::infinity();
  for (int trial = 0; trial < 400; ++trial) {
    const index n = std::uniform_int_distribution<index>(0, 700)(gen);
    const index k = std::uniform_int_distribution<index>(0, 80)(gen);
    const int kind = trial % 6;
    std::vector<T> v(static_cast<std::size_t>(n));
    for (auto& x : v) {
      switch (kind) {
        case 0:
          x = std::normal_distribution<T>()(gen);
          break;
        case 1:
          x = static_cast<T>(gen() % 4);
          break;  // heavy ties
        case 2:
          x = gen() % 3 == 0 ? nan : static_cast<T>(gen() % 5);
          break;
        case 3:
          x = gen() % 2 == 0 ? -inf : (gen() % 7 == 0 ? nan : T(1));
          break;
        case 4:  // mostly NaN (whole chunks of it), a few values, +inf among them
          x = gen() % 9 != 0 ? nan : (gen() % 4 == 0 ? inf : std::normal_distribution<T>()(gen));
          break;
        default:
          x = static_cast<T>(&x - v.data());
          break;  // sorted ascending
      }
    }
    if (kind == 5 && trial % 2 == 0) std::reverse(v.begin(), v.end());
    std::vector<index> got(static_cast<std::size_t>(std::min(k, n)));
    select(v.data(), n, k, got.data());
    ASSERT_EQ(got, brute_top_k(v, k)) << "trial " << trial << " n=" << n << " k=" << k;
  }
}

TEST(TopK, MatchesSortingWithTiesAndNaN) {
  check_top_k_matches_sorting<float>();
  check_top_k_matches_sorting<double>();
}

}  // namespace
