// clustered against the float64 oracle and dense: exact cases (repeated queries, one cluster per
// query), padding, edge sizes, determinism across threads, knob validation, error vs clusters.
#include <gtest/gtest.h>

#include <algorithm>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <fastattn/clustered.hpp>
#include <fastattn/dense.hpp>
#include <fastattn/multihead.hpp>

#include "reference.hpp"

namespace fa = fastattn;

namespace {

// Eigen's own GEMM threading (on under OpenMP) spins against the kernels' single-threaded use
// on a loaded machine; the kernels are measured and tested one thread per head.
[[maybe_unused]] const bool eigen_single_threaded = (Eigen::setNbThreads(1), true);

using fa::index;
using fa::testing::gaussian;
using fa::testing::make_peaked;
using fa::testing::reference_attention;
using fa::testing::relative_error;

static_assert(fa::attention_policy<fa::clustered>);
static_assert(!fa::clustered::is_exact && !fa::clustered::supports_causal);

template <class T>
constexpr double tolerance() {
  return std::is_same_v<T, float> ? 1e-5 : 1e-12;
}

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
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(ClusteredTyped, Scalars);

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
  // Lv = 0 and Sv = 0: zero outputs.
  EXPECT_TRUE((fa::attention(fa::clustered{}, q, k, v, {.query_length = 0}).array() == T(0)).all());
  EXPECT_TRUE((fa::attention(fa::clustered{}, q, k, v, {.key_length = 0}).array() == T(0)).all());
  // Sv = 1.
  const auto o = fa::attention(fa::clustered{.clusters = 3}, q, k, v, {.key_length = 1});
  for (index i = 0; i < 20; ++i) EXPECT_LT(relative_error(o.row(i), v.row(0)), tolerance<T>());
  // bits = 1 and bits = 64, iterations = 1.
  for (const int bits : {1, 64}) {
    const auto ob =
        fa::attention(fa::clustered{.clusters = 4, .bits = bits, .iterations = 1}, q, k, v);
    EXPECT_TRUE(ob.allFinite());
  }
}

TEST(Clustered, SameSeedSameBitsAndSeedMatters) {
  const auto in = make_peaked<float>(300, 280, 16, 16, 8);
  const fa::clustered a{.clusters = 12, .seed = 5}, b{.clusters = 12, .seed = 6};
  const auto o1 = fa::attention(a, in.q, in.k, in.v), o2 = fa::attention(a, in.q, in.k, in.v);
  EXPECT_EQ(o1, o2);
  EXPECT_NE(o1, fa::attention(b, in.q, in.k, in.v));
  const auto nb =
      fa::attention(fa::clustered{.clusters = 12, .hash_bias = false, .seed = 5}, in.q, in.k, in.v);
  EXPECT_TRUE(nb.allFinite());
}

TEST(Clustered, MultiheadIsIdenticalOnOneAndTwoThreads) {
  const index B = 2, H = 3, L = 70, S = 64, E = 8;
  const auto q = gaussian<float>(B * L * H, E, 1), k = gaussian<float>(B * S * H, E, 2),
             v = gaussian<float>(B * S * H, E, 3);
  const fa::tensor_view<const float> qt{q.data(), B, L, H, E}, kt{k.data(), B, S, H, E},
      vt{v.data(), B, S, H, E};
  fa::matrix<float> o1(B * L * H, E), o2(B * L * H, E);
  const std::vector<index> qlen = {70, 50}, klen = {64, 33};
  fa::multihead_options opt{.query_lengths = qlen, .key_lengths = klen, .threads = 1};
  const fa::clustered policy{.clusters = 9, .seed = 11};
  fa::multihead_attention(policy, qt, kt, vt, fa::tensor_view<float>{o1.data(), B, L, H, E}, opt);
  opt.threads = 2;
  fa::multihead_attention(policy, qt, kt, vt, fa::tensor_view<float>{o2.data(), B, L, H, E}, opt);
  EXPECT_EQ(o1, o2);
  // Head (0, 0) runs with stream 0, as the single-head front door does.
  const Eigen::Map<const fa::matrix<float>, 0, Eigen::OuterStride<>> q00(
      q.data(), L, E, Eigen::OuterStride<>(H * E)),
      k00(k.data(), S, E, Eigen::OuterStride<>(H * E)),
      v00(v.data(), S, E, Eigen::OuterStride<>(H * E));
  const auto single =
      fa::attention(policy, fa::matrix<float>(q00), fa::matrix<float>(k00), fa::matrix<float>(v00));
  const Eigen::Map<const fa::matrix<float>, 0, Eigen::OuterStride<>> o00(
      o1.data(), L, E, Eigen::OuterStride<>(H * E));
  EXPECT_EQ(fa::matrix<float>(o00), single);
}

std::string message_of(const fa::clustered& policy) {
  const auto q = gaussian<float>(10, 4, 1);
  try {
    (void)fa::attention(policy, q, q, q);
  } catch (const fa::invalid_argument& e) {
    return e.what();
  }
  return "no exception";
}

TEST(Clustered, RejectsBadKnobsNamingThem) {
  EXPECT_NE(message_of(fa::clustered{.clusters = 0}).find("clusters"), std::string::npos);
  EXPECT_NE(message_of(fa::clustered{.clusters = -3}).find("-3"), std::string::npos);
  EXPECT_NE(message_of(fa::clustered{.bits = 0}).find("bits"), std::string::npos);
  EXPECT_NE(message_of(fa::clustered{.bits = 65}).find("65"), std::string::npos);
  EXPECT_NE(message_of(fa::clustered{.iterations = 0}).find("iterations"), std::string::npos);
  const auto q = gaussian<float>(10, 4, 1);
  EXPECT_THROW(fa::attention(fa::clustered{}, q, q, q, {.causal = true}), fa::invalid_argument);
  // Bad knobs are reported even when there is nothing to compute.
  EXPECT_THROW(fa::attention(fa::clustered{.bits = 99}, q, q, q, {.query_length = 0}),
               fa::invalid_argument);
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
