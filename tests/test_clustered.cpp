// clustered against the float64 oracle: exact cases (repeated queries, one cluster per query),
// padding, edge sizes, hash_bias, error vs clusters. Knob validation, empty cases, causal refusal
// and determinism across threads are the typed suites' (test_attention, test_determinism).
#include "common.hpp"

#include <algorithm>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

using fa::index;
using namespace fa::testing;

// G distinct queries (far apart), each repeated, in shuffled order.
template <class T>
fa::matrix<T> repeated_queries(index groups, index L, index E, std::uint64_t seed,
                               std::vector<index>* group_of = nullptr) {
  const auto distinct = gaussian<T>(groups, E, seed, 2.0);
  std::mt19937_64 gen(seed + 1);
  std::vector<index> g(static_cast<std::size_t>(L));
  for (index i = 0; i < L; ++i) g[static_cast<std::size_t>(i)] = i % groups;  // every group used
  std::shuffle(g.begin(), g.end(), gen);
  fa::matrix<T> q(L, E);
  for (index i = 0; i < L; ++i) q.row(i) = distinct.row(g[static_cast<std::size_t>(i)]);
  if (group_of) *group_of = g;
  return q;
}

template <class T>
class ClusteredTyped : public ::testing::Test {};
TYPED_TEST_SUITE(ClusteredTyped, fa::testing::scalars);

TYPED_TEST(ClusteredTyped, RepeatedDistinctQueriesGiveDenseOutput) {
  using T = TypeParam;
  for (std::uint64_t seed = 0; seed < 5; ++seed) {
    const index G = 7, L = 150, S = 120, E = 16, M = 10;
    const auto q = repeated_queries<T>(G, L, E, 40 + seed);
    const auto k = gaussian<T>(S, E, 50 + seed), v = gaussian<T>(S, M, 60 + seed);
    const fa::clustered policy{.clusters = G, .seed = seed};
    const auto o = fa::attention(policy, q, k, v);
    EXPECT_LT(relative_error(o, reference_attention(q, k, v)), tolerance<T>()) << "seed " << seed;
  }
}

TYPED_TEST(ClusteredTyped, OneClusterPerQueryIsExactAndClustersClamp) {
  using T = TypeParam;
  // clusters > L clamps to L; with distinct hashes every query is its own cluster, centroid
  // = the query itself, so the output is exact attention.
  const index L = 60, S = 80, E = 12, M = 7;
  const auto q = gaussian<T>(L, E, 1), k = gaussian<T>(S, E, 2), v = gaussian<T>(S, M, 3);
  for (const index C : {L, L + 1, index{100000}}) {
    const auto o = fa::attention(fa::clustered{.clusters = C}, q, k, v);
    EXPECT_LT(relative_error(o, reference_attention(q, k, v)), tolerance<T>()) << "C=" << C;
  }
}

TYPED_TEST(ClusteredTyped, OneClusterBroadcastsTheMeanQuerysAttention) {
  using T = TypeParam;
  const index L = 40, S = 30, E = 5, M = 4;
  const auto q = gaussian<T>(L, E, 4), k = gaussian<T>(S, E, 5), v = gaussian<T>(S, M, 6);
  const auto o = fa::attention(fa::clustered{.clusters = 1}, q, k, v);
  const fa::testing::matd mean = q.template cast<double>().colwise().mean();
  const auto expected = reference_attention(mean, k, v, {.scale = 1.0 / std::sqrt(5.0)});
  for (index i = 0; i < L; ++i)
    EXPECT_LT(relative_error(o.row(i), expected.row(0)), tolerance<T>() * 10) << i;
}

TYPED_TEST(ClusteredTyped, PaddingEqualsKernelOnUnpaddedPrefix) {
  using T = TypeParam;
  const index L = 90, S = 110, E = 8, M = 6, Lv = 61, Sv = 77;
  auto in = make_peaked<T>(L, S, E, M, 9, 5);
  const fa::clustered policy{.clusters = 10, .seed = 3};
  const fa::matrix<T> q0 = in.q.topRows(Lv), k0 = in.k.topRows(Sv), v0 = in.v.topRows(Sv);
  const auto prefix = fa::attention(policy, q0, k0, v0);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  in.q.bottomRows(L - Lv).setConstant(nan);
  in.k.bottomRows(S - Sv).setConstant(nan);
  in.v.bottomRows(S - Sv).setConstant(std::numeric_limits<T>::infinity());
  const auto o = fa::attention(policy, in.q, in.k, in.v, {.key_length = Sv, .query_length = Lv});
  ASSERT_TRUE(o.allFinite());
  EXPECT_EQ(fa::matrix<T>(o.topRows(Lv)), prefix);
  EXPECT_TRUE((o.bottomRows(L - Lv).array() == T(0)).all());
  // And it is an approximation of the masked reference, not something else.
  const auto ref = reference_attention(q0, k0, v0);
  EXPECT_LT(relative_error(prefix, ref), 0.5);
}

TYPED_TEST(ClusteredTyped, EdgeSizes) {
  using T = TypeParam;
  const auto q1 = gaussian<T>(1, 3, 1), k1 = gaussian<T>(1, 3, 2), v1 = gaussian<T>(1, 4, 3);
  // L = 1, S = 1: the only key gets all the weight.
  const auto o1 = fa::attention(fa::clustered{}, q1, k1, v1);
  EXPECT_LT(relative_error(o1, v1), tolerance<T>());
  const auto q = gaussian<T>(20, 3, 4), k = gaussian<T>(15, 3, 5), v = gaussian<T>(15, 4, 6);
  // Sv = 1.
  const auto o = fa::attention(fa::clustered{.clusters = 3}, q, k, v, {.key_length = 1});
  for (index i = 0; i < 20; ++i) EXPECT_LT(relative_error(o.row(i), v.row(0)), tolerance<T>());
  // bits = 1 and bits = 64, iterations = 1, and sign hashing through the origin.
  for (const int bits : {1, 64}) {
    const auto ob =
        fa::attention(fa::clustered{.clusters = 4, .bits = bits, .iterations = 1}, q, k, v);
    EXPECT_TRUE(ob.allFinite());
  }
  EXPECT_TRUE(fa::attention(fa::clustered{.clusters = 4, .hash_bias = false}, q, k, v).allFinite());
}

TEST(Clustered, ErrorFallsAsClustersGrow) {
  // Peaked inputs (16 centres), mean over seeds: more clusters, lower error.
  const index N = 512, E = 32;
  std::vector<fa::testing::peaked_inputs<float>> inputs;
  std::vector<fa::testing::matd> refs;
  for (std::uint64_t s = 0; s < 4; ++s) {
    inputs.push_back(make_peaked<float>(N, N, E, E, 70 + s));
    refs.push_back(reference_attention(inputs.back().q, inputs.back().k, inputs.back().v));
  }
  std::vector<double> mean;
  for (const index C : {4, 16, 64, 256}) {
    double total = 0;
    for (std::size_t s = 0; s < inputs.size(); ++s) {
      const auto& in = inputs[s];
      const fa::clustered policy{.clusters = C, .seed = s};
      total += relative_error(fa::attention(policy, in.q, in.k, in.v), refs[s]);
    }
    mean.push_back(total / static_cast<double>(inputs.size()));
  }
  for (std::size_t i = 1; i < mean.size(); ++i) EXPECT_LT(mean[i], mean[i - 1]) << i;
  EXPECT_LT(mean.back(), 0.2);
  EXPECT_GT(mean.front(), 0.3);
}

}  // namespace
