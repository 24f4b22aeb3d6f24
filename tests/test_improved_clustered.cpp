// improved_clustered against the float64 oracle and clustered: exact when topk covers the keys,
// never worse than clustered, padding (padded keys never in the top-k), edge sizes, and the
// peaked1024 fixture for both clustered kernels. Knob validation, empty cases, causal refusal and
// determinism across threads are the typed suites' (test_attention, test_determinism).
#include "common.hpp"

#include <algorithm>
#include <iostream>
#include <limits>
#include <string>
#include <vector>

namespace {

using fa::index;
using namespace fa::testing;

template <class T>
class ImprovedTyped : public ::testing::Test {};
TYPED_TEST_SUITE(ImprovedTyped, fa::testing::scalars);

TYPED_TEST(ImprovedTyped, TopkCoveringTheKeysIsExactForAnyClustering) {
  using T = TypeParam;
  const index L = 120, S = 90, E = 16, M = 12;
  const auto in = make_peaked<T>(L, S, E, M, 3, 6);
  for (const index C : {index{1}, index{3}, index{17}, L}) {
    for (const index topk : {S, S + 1, index{1000}}) {
      const fa::improved_clustered policy{.clusters = C, .seed = 2, .topk = topk};
      EXPECT_LT(relative_error(fa::attention(policy, in.q, in.k, in.v),
                               reference_attention(in.q, in.k, in.v)),
                tolerance<T>())
          << "C=" << C << " topk=" << topk;
    }
    // With key padding, topk >= Sv is exact too.
    const fa::options opt{.key_length = 40};
    const fa::improved_clustered policy{.clusters = C, .topk = 40};
    EXPECT_LT(relative_error(fa::attention(policy, in.q, in.k, in.v, opt),
                             reference_attention(in.q, in.k, in.v, opt)),
              tolerance<T>())
        << "C=" << C;
  }
}

TYPED_TEST(ImprovedTyped, PaddingEqualsKernelOnUnpaddedPrefix) {
  using T = TypeParam;
  const index L = 100, S = 120, E = 8, M = 6, Lv = 71, Sv = 83;
  auto in = make_peaked<T>(L, S, E, M, 19, 5);
  const fa::improved_clustered policy{.clusters = 9, .seed = 4, .topk = 7};
  const fa::matrix<T> q0 = in.q.topRows(Lv), k0 = in.k.topRows(Sv), v0 = in.v.topRows(Sv);
  const auto prefix = fa::attention(policy, q0, k0, v0);
  const auto opt = fa::options{.key_length = Sv, .query_length = Lv};
  // NaN in padded rows must not leak.
  in.q.bottomRows(L - Lv).setConstant(std::numeric_limits<T>::quiet_NaN());
  in.k.bottomRows(S - Sv).setConstant(std::numeric_limits<T>::quiet_NaN());
  in.v.bottomRows(S - Sv).setConstant(std::numeric_limits<T>::infinity());
  const auto o = fa::attention(policy, in.q, in.k, in.v, opt);
  ASSERT_TRUE(o.allFinite());
  EXPECT_EQ(fa::matrix<T>(o.topRows(Lv)), prefix);
  EXPECT_TRUE((o.bottomRows(L - Lv).array() == T(0)).all());
  // Padded keys that would win every top-k (huge scores) must never be selected.
  for (index j = Sv; j < S; ++j) in.k.row(j) = in.q.colwise().sum() * T(100);
  in.q.bottomRows(L - Lv).setZero();
  in.k.bottomRows(S - Sv) = in.q.topRows(Lv).colwise().sum().replicate(S - Sv, 1) * T(100);
  in.v.bottomRows(S - Sv).setConstant(T(1e6));
  EXPECT_EQ(fa::matrix<T>(fa::attention(policy, in.q, in.k, in.v, opt).topRows(Lv)), prefix);
}

TYPED_TEST(ImprovedTyped, EdgeSizes) {
  using T = TypeParam;
  const auto q1 = gaussian<T>(1, 3, 1), k1 = gaussian<T>(1, 3, 2), v1 = gaussian<T>(1, 4, 3);
  EXPECT_LT(relative_error(fa::attention(fa::improved_clustered{}, q1, k1, v1), v1),
            tolerance<T>());
  const auto q = gaussian<T>(20, 3, 4), k = gaussian<T>(15, 3, 5), v = gaussian<T>(15, 4, 6);
  const fa::improved_clustered p{.clusters = 4, .topk = 2};
  const auto o = fa::attention(p, q, k, v, {.key_length = 1});
  for (index i = 0; i < 20; ++i) EXPECT_LT(relative_error(o.row(i), v.row(0)), tolerance<T>());
  const auto o1 = fa::attention(
      fa::improved_clustered{.clusters = 2, .bits = 64, .iterations = 1, .topk = 1}, q, k, v);
  EXPECT_TRUE(o1.allFinite());
}

TEST(ImprovedClustered, AttentionRowsAreNeverFurtherFromExactThanClustered) {
  // With V = I the output rows are the attention rows themselves. The paper's guarantee, per
  // query: ||A_improved - A||_1 <= ||A_clustered - A||_1 (same clustering, same seed), whatever C.
  const index L = 150, S = 64, E = 16;
  for (std::uint64_t s = 0; s < 3; ++s) {
    const auto in = make_peaked<double>(L, S, E, 1, 500 + s, 8);
    const fa::matrix<double> identity = fa::matrix<double>::Identity(S, S);
    const auto exact = reference_attention(in.q, in.k, identity);
    for (const index C : {1, 3, 8, 30}) {
      const auto a_improved = fa::attention(
          fa::improved_clustered{.clusters = C, .seed = s, .topk = 5}, in.q, in.k, identity);
      const auto a_clustered =
          fa::attention(fa::clustered{.clusters = C, .seed = s}, in.q, in.k, identity);
      double improved_total = 0, clustered_total = 0;
      for (index i = 0; i < L; ++i) {
        const double di = (a_improved.row(i) - exact.row(i)).cwiseAbs().sum();
        const double dc = (a_clustered.row(i) - exact.row(i)).cwiseAbs().sum();
        EXPECT_NEAR(a_improved.row(i).sum(), 1.0, 1e-12) << "rows are distributions";
        EXPECT_LE(di, dc + 1e-12) << "C=" << C << " seed " << s << " row " << i;
        improved_total += di;
        clustered_total += dc;
      }
      EXPECT_LT(improved_total, clustered_total) << "C=" << C << " seed " << s;
      if (C >= 30) {
        EXPECT_LT(improved_total, 0.5 * clustered_total) << "C=" << C << " seed " << s;
      }
    }
  }
}

TEST(ImprovedClustered, BeatsClusteredOnAverageAndErrorFalls) {
  // Peaked inputs with 16 centres. In output (Frobenius) error the guarantee above does not hold
  // row by row: with fewer clusters than centres a cluster mixes centres, and sharp attention
  // on keys chosen for the mixed centroid can be further from O than clustered's blurred row. So
  // the comparison is on averages, with C from the number of centres up.
  const index N = 512, E = 32;
  std::vector<fa::testing::peaked_inputs<float>> inputs;
  std::vector<matd> refs;
  for (std::uint64_t s = 0; s < 4; ++s) {
    inputs.push_back(make_peaked<float>(N, N, E, E, 300 + s));
    refs.push_back(reference_attention(inputs.back().q, inputs.back().k, inputs.back().v));
  }
  std::vector<double> improved_mean;
  for (const index C : {16, 48, 128}) {
    double improved_total = 0, clustered_total = 0;
    for (std::size_t s = 0; s < inputs.size(); ++s) {
      const auto& in = inputs[s];
      improved_total += relative_error(
          fa::attention(fa::improved_clustered{.clusters = C, .seed = s}, in.q, in.k, in.v),
          refs[s]);
      clustered_total += relative_error(
          fa::attention(fa::clustered{.clusters = C, .seed = s}, in.q, in.k, in.v), refs[s]);
    }
    std::cout << "[          ] C=" << C << ": mean rel err improved " << improved_total / 4
              << ", clustered " << clustered_total / 4 << '\n';
    EXPECT_LT(improved_total, clustered_total) << "C=" << C;
    improved_mean.push_back(improved_total / static_cast<double>(inputs.size()));
  }
  for (std::size_t i = 1; i < improved_mean.size(); ++i)
    EXPECT_LT(improved_mean[i], improved_mean[i - 1]) << i;
  // More top-k keys, lower error (same clustering).
  const auto& in = inputs[0];
  double previous = 1e9;
  for (const index topk : {1, 4, 16, 64}) {
    const double e = relative_error(
        fa::attention(fa::improved_clustered{.clusters = 32, .topk = topk}, in.q, in.k, in.v),
        refs[0]);
    EXPECT_LT(e, previous) << "topk=" << topk;
    previous = e;
  }
}

// The peaked1024 fixture (4 heads, N = 1024, E = M = 64, scale 1/8). The reference
// implementation (idiap/fast-transformers, CPU, mean of 3 seeds) reaches 0.187 (clustered
// C = 100), 0.284 (C = 25) and 0.0148 (improved, C = 100, top-32).
TEST(ImprovedClustered, Peaked1024FixtureIsNoWorseThanTheReference) {
  FASTATTN_TEST_PEAKED1024(fixture);
  const double c100 = fixture.mean_error(fa::clustered{.clusters = 100}, 5);
  const double i100 = fixture.mean_error(fa::improved_clustered{.clusters = 100, .topk = 32}, 5);
  // C = 25 < 16 centres x ~1.5: the error depends on how many of the 16 centres the uniformly
  // drawn initial centroids miss (Lloyd's algorithm cannot recover a missed one), so it spreads
  // widely from seed to seed: 0.20 to 0.55 over 30 seeds here, standard deviation ~0.09. The
  // reference's 3-seed figure 0.284 therefore carries a standard error of ~0.05, and a 5-seed
  // mean moves by +-0.04; simulating the reference's own initialisation (the first C hashes) and
  // empty-cluster rule gives 0.337 over 30 seeds. So C = 25 is checked on 20 seeds against the
  // reference figure plus its standard error. Measured: 0.186, 0.0148, and 0.323 (seeds 0-4:
  // 0.331).
  const double c25 = fixture.mean_error(fa::clustered{.clusters = 25}, 20);
  std::cout << "[          ] peaked1024 mean rel err: clustered C=100 " << c100
            << " (5 seeds), C=25 " << c25 << " (20 seeds), improved C=100 top-32 " << i100
            << " (5 seeds)\n";
  EXPECT_LT(c100, 0.187 * 1.02);
  EXPECT_LT(i100, 0.0148 * 1.05);
  EXPECT_LT(c25, 0.284 + 0.052);
}

}  // namespace
