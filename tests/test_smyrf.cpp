// smyrf against a float64 oracle of the algorithm (built from ALGORITHMS.md, not from the kernel's
// code path), against dense where it must be exact, and on its documented edge cases. Knob
// validation, empty cases and determinism across threads are the typed suites' (test_attention,
// test_determinism).
#include "common.hpp"

#include <algorithm>
#include <limits>
#include <map>
#include <numeric>
#include <set>
#include <utility>
#include <vector>

namespace {

using fa::index;
using namespace fa::testing;

static_assert(fa::attention_policy<fa::smyrf>);
static_assert(fa::smyrf::name == "smyrf");
static_assert(!fa::smyrf::is_exact);

template <class T>
class SmyrfTyped : public ::testing::Test {};
TYPED_TEST_SUITE(SmyrfTyped, fa::testing::scalars);

// The algorithm written out plainly in float64, one query at a time: XBOX+ vectors materialised,
// hashes from them, std::sort on (hash, position), n = ceil(Lv / cluster_size) query clusters and
// min(n, Sv) key groups cut at floor(g * count / groups), cluster c paired with key group
// floor(c * groups / n), softmax per query inside the pair, rounds merged by their log-sum-exp.
matd smyrf_oracle(const fa::matrix<double>& q, const fa::matrix<double>& k,
                  const fa::matrix<double>& v, const fa::smyrf& p, const fa::options& opt = {},
                  std::uint64_t stream = 0) {
  const index L = q.rows(), E = q.cols(), M = v.cols();
  const index Lv = opt.query_length.value_or(L), Sv = opt.key_length.value_or(k.rows());
  const double scale = opt.scale.value_or(1.0 / std::sqrt(static_cast<double>(E)));
  matd out = matd::Zero(L, M);
  if (Lv == 0 || Sv == 0) return out;
  const fa::matrix<double> qv = q.topRows(Lv), kv = k.topRows(Sv), vv = v.topRows(Sv);
  const fa::detail::xbox_plus<double> xbox(qv, kv);
  fa::detail::rng gen(p.seed, stream);
  const auto lsh = fa::detail::e2lsh<double>::draw(gen, E, p.hashes, p.r);
  const matd hq = lsh.hash(xbox.transform_queries(qv)), hk = lsh.hash(xbox.transform_keys(kv));
  const index n = (Lv + p.cluster_size - 1) / p.cluster_size, groups = std::min(n, Sv);

  auto sorted = [](const matd& hash, index h) {
    std::vector<std::pair<double, index>> e;
    for (index i = 0; i < hash.rows(); ++i) e.emplace_back(hash(i, h), i);
    std::sort(e.begin(), e.end());
    std::vector<index> order;
    for (const auto& x : e) order.push_back(x.second);
    return order;
  };
  std::vector<matd> o(static_cast<std::size_t>(p.hashes), matd::Zero(Lv, M));
  std::vector<Eigen::VectorXd> lse(static_cast<std::size_t>(p.hashes), Eigen::VectorXd(Lv));
  for (index h = 0; h < p.hashes; ++h) {
    const auto qo = sorted(hq, h), ko = sorted(hk, h);
    for (index c = 0; c < n; ++c) {
      const index g = c * groups / n;
      for (index t = c * Lv / n; t < (c + 1) * Lv / n; ++t) {
        const index i = qo[static_cast<std::size_t>(t)];
        std::vector<index> keys;
        for (index u = g * Sv / groups; u < (g + 1) * Sv / groups; ++u)
          keys.push_back(ko[static_cast<std::size_t>(u)]);
        Eigen::VectorXd s(static_cast<index>(keys.size()));
        for (index u = 0; u < s.size(); ++u)
          s(u) = scale * qv.row(i).dot(kv.row(keys[static_cast<std::size_t>(u)]));
        const double m = s.maxCoeff();
        const Eigen::VectorXd e = (s.array() - m).exp();
        for (index u = 0; u < s.size(); ++u)
          o[static_cast<std::size_t>(h)].row(i) +=
              e(u) / e.sum() * vv.row(keys[static_cast<std::size_t>(u)]);
        lse[static_cast<std::size_t>(h)](i) = m + std::log(e.sum());
      }
    }
  }
  for (index i = 0; i < Lv; ++i) {
    double m = -std::numeric_limits<double>::infinity();
    for (const auto& l : lse) m = std::max(m, l(i));
    double total = 0;
    for (const auto& l : lse) total += std::exp(l(i) - m);
    const double all = m + std::log(total);
    for (std::size_t h = 0; h < o.size(); ++h)
      out.row(i) += o[h].row(i) * std::exp(lse[h](i) - all);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// detail: XBOX+, E2LSH, sorting, cluster plan

TEST(SmyrfDetail, XboxPlusIdentityHolds) {
  for (const auto& [Lv, Sv, E] :
       {std::tuple<index, index, index>{40, 55, 7}, {1, 1, 1}, {13, 90, 64}}) {
    const auto q = gaussian<double>(Lv, E, 1, 2.0), k = gaussian<double>(Sv, E, 2, 0.5);
    const fa::detail::xbox_plus<double> xbox(q, k);
    const double mq2 = q.rowwise().squaredNorm().maxCoeff(),
                 mk2 = k.rowwise().squaredNorm().maxCoeff();
    EXPECT_DOUBLE_EQ(xbox.max_norm2(), mq2 + mk2);
    const auto f = xbox.transform_queries(q), g = xbox.transform_keys(k);
    ASSERT_EQ(f.cols(), E + 2);
    ASSERT_EQ(g.cols(), E + 2);
    for (index i = 0; i < Lv; ++i) {
      EXPECT_EQ(f(i, E), 0.0);  // the query's extra coordinate sits in the last slot
      EXPECT_NEAR(f.row(i).squaredNorm(), mq2 + mk2, 1e-12 * (mq2 + mk2));
    }
    for (index j = 0; j < Sv; ++j) {
      EXPECT_EQ(g(j, E + 1), 0.0);
      EXPECT_NEAR(g.row(j).squaredNorm(), mq2 + mk2, 1e-12 * (mq2 + mk2));
    }
    for (index i = 0; i < Lv; ++i)
      for (index j = 0; j < Sv; ++j) {
        const double lhs = (f.row(i) - g.row(j)).squaredNorm();
        const double rhs = 2 * (mq2 + mk2) - 2 * q.row(i).dot(k.row(j));
        ASSERT_NEAR(lhs, rhs, 1e-12 * 4 * (mq2 + mk2)) << i << ", " << j;
      }
  }
}

TEST(SmyrfDetail, XboxExtraCoordinateIsNeverNaN) {
  // Every row has the same norm: M^2 - ||x||^2 rounds to about 0, possibly below; sqrt must not
  // NaN.
  fa::matrix<float> q = fa::matrix<float>::Constant(5, 3, 0.1f),
                    k = fa::matrix<float>::Constant(4, 3, 0.3f);
  const fa::detail::xbox_plus<float> xbox(q, k);
  for (index i = 0; i < 5; ++i) EXPECT_TRUE(std::isfinite(xbox.query_extra(i)));
  for (index j = 0; j < 4; ++j) EXPECT_TRUE(std::isfinite(xbox.key_extra(j)));
}

TEST(SmyrfDetail, ProjectedHashesEqualHashesOfTransformedVectors) {
  const index E = 24, H = 5;
  const auto q = gaussian<double>(70, E, 3), k = gaussian<double>(90, E, 4, 3.0);
  const fa::detail::xbox_plus<double> xbox(q, k);
  fa::detail::rng gen(5, 9);
  const auto lsh = fa::detail::e2lsh<double>::draw(gen, E, H, 2.5);
  ASSERT_EQ(lsh.alpha.rows(), E + 2);
  ASSERT_EQ(lsh.alpha.cols(), H);
  EXPECT_TRUE((lsh.beta.array() >= 0).all() && (lsh.beta.array() < 2.5).all());
  fa::matrix<double> hq(70, H), hk(90, H);
  lsh.hash_queries(q, xbox, hq);
  lsh.hash_keys(k, xbox, hk);
  EXPECT_LT(relative_error(hq, lsh.hash(xbox.transform_queries(q))), 1e-14);
  EXPECT_LT(relative_error(hk, lsh.hash(xbox.transform_keys(k))), 1e-14);
  // The draw is reproducible from (seed, stream) and differs across streams.
  fa::detail::rng again(5, 9), other(5, 10);
  EXPECT_EQ(fa::detail::e2lsh<double>::draw(again, E, H, 2.5).alpha, lsh.alpha);
  EXPECT_NE(fa::detail::e2lsh<double>::draw(other, E, H, 2.5).alpha, lsh.alpha);
}

template <class T>
void check_sort(const std::vector<T>& values) {
  const auto n = static_cast<index>(values.size());
  Eigen::Matrix<T, Eigen::Dynamic, 1> hashes(n);
  for (index i = 0; i < n; ++i) hashes(i) = values[static_cast<std::size_t>(i)];
  std::vector<fa::detail::hash_entry> a(values.size()), b(values.size());
  std::vector<index> order(values.size());
  fa::detail::sort_by_hash(hashes, a.data(), b.data(), order.data());
  std::vector<index> expected(values.size());
  std::iota(expected.begin(), expected.end(), index{0});
  std::stable_sort(expected.begin(), expected.end(), [&](index x, index y) {
    return values[static_cast<std::size_t>(x)] < values[static_cast<std::size_t>(y)];
  });
  EXPECT_EQ(order, expected);
}

TEST(SmyrfDetail, RadixSortOrdersByHashThenPosition) {
  std::mt19937_64 gen(7);
  for (int trial = 0; trial < 20; ++trial) {
    const std::size_t n = 1 + gen() % 3000;
    std::vector<float> f(n);
    std::vector<double> d(n);
    std::normal_distribution<double> normal(0.0, trial % 2 ? 1e-3 : 1e4);
    for (std::size_t i = 0; i < n; ++i) {
      // Many exact ties (rounded values), both zeros, infinities.
      d[i] = std::round(normal(gen) * 4) / 4;
      if (i % 97 == 5) d[i] = -0.0;
      if (i % 131 == 7) d[i] = std::numeric_limits<double>::infinity();
      if (i % 151 == 9) d[i] = -std::numeric_limits<double>::infinity();
      f[i] = static_cast<float>(d[i]);
    }
    check_sort(f);
    check_sort(d);
  }
  check_sort(std::vector<float>{});
  check_sort(std::vector<double>{3.0});
}

TEST(SmyrfDetail, ClusterPlanIsBalancedForAnyLengths) {
  for (index Lv = 1; Lv <= 130; Lv += 3)
    for (const index Sv : {index{1}, index{2}, index{7}, Lv, Lv + 1, 2 * Lv + 5, index{257}})
      for (const index cs : {index{1}, index{3}, index{16}, index{64}, index{1000}}) {
        const auto plan = fa::detail::cluster_plan::make(Lv, Sv, cs);
        const index n = (Lv + cs - 1) / cs;
        ASSERT_EQ(plan.clusters(), n);
        ASSERT_EQ(plan.keys.groups, std::min(n, Sv));
        index qmin = Lv, qmax = 0, qsum = 0, kmin = Sv, kmax = 0, ksum = 0;
        for (index c = 0; c < n; ++c) {
          EXPECT_EQ(plan.queries.begin(c), qsum);  // consecutive, in sorted order
          qsum += plan.queries.size(c);
          qmin = std::min(qmin, plan.queries.size(c));
          qmax = std::max(qmax, plan.queries.size(c));
        }
        std::set<index> used;
        for (index c = 0; c < n; ++c) used.insert(plan.key_group_of(c));
        for (index g = 0; g < plan.keys.groups; ++g) {
          EXPECT_EQ(plan.keys.begin(g), ksum);
          ksum += plan.keys.size(g);
          kmin = std::min(kmin, plan.keys.size(g));
          kmax = std::max(kmax, plan.keys.size(g));
        }
        const std::string where =
            "Lv=" + std::to_string(Lv) + " Sv=" + std::to_string(Sv) + " cs=" + std::to_string(cs);
        EXPECT_EQ(qsum, Lv) << where;
        EXPECT_EQ(ksum, Sv) << where;
        EXPECT_LE(qmax - qmin, 1) << where;
        EXPECT_LE(qmax, cs) << where;
        EXPECT_GE(qmin, 1) << where;
        EXPECT_LE(kmax - kmin, 1) << where;
        EXPECT_GE(kmin, 1) << where;  // no empty key group, even when Sv < n
        EXPECT_EQ(static_cast<index>(used.size()), plan.keys.groups) << where;  // every key used
        EXPECT_EQ(plan.queries.max_size(), qmax) << where;
        EXPECT_EQ(plan.keys.max_size(), kmax) << where;
      }
}

// ---------------------------------------------------------------------------------------------
// the kernel

TEST(Smyrf, MatchesTheFloat64OracleOnManyShapes) {
  std::mt19937_64 gen(21);
  std::uniform_int_distribution<index> len(1, 160), dim(1, 20), cs(1, 40), rounds(1, 4);
  for (int trial = 0; trial < 40; ++trial) {
    const index L = len(gen), S = len(gen), E = dim(gen), M = dim(gen);
    const auto q = gaussian<double>(L, E, 100 + static_cast<std::uint64_t>(trial));
    const auto k = gaussian<double>(S, E, 200 + static_cast<std::uint64_t>(trial));
    const auto v = gaussian<double>(S, M, 300 + static_cast<std::uint64_t>(trial));
    fa::options opt;
    if (trial % 2) {
      opt.query_length = std::uniform_int_distribution<index>(0, L)(gen);
      opt.key_length = std::uniform_int_distribution<index>(0, S)(gen);
    }
    if (trial % 3 == 0) opt.scale = 0.7;
    const fa::smyrf p{.hashes = rounds(gen),
                      .cluster_size = cs(gen),
                      .r = 0.5 + trial % 3,
                      .seed = static_cast<std::uint64_t>(trial)};
    const auto o = fa::attention(p, q, k, v, opt);
    const auto ref = smyrf_oracle(q, k, v, p, opt);
    EXPECT_LT(relative_error(o, ref), 1e-12)
        << "trial " << trial << ": L=" << L << " S=" << S << " Lv=" << opt.query_length.value_or(L)
        << " Sv=" << opt.key_length.value_or(S) << " hashes=" << p.hashes
        << " cs=" << p.cluster_size;
  }
}

TEST(Smyrf, OneRoundAttendsExactlyWithinItsBalancedCluster) {
  // v = identity: the output row is the query's attention weights over the keys, so the support
  // of each row is its key group; rows with the same support form its query cluster.
  for (const auto& [L, S, cs] : {std::tuple<index, index, index>{100, 100, 10},
                                 {97, 61, 16},
                                 {50, 130, 7},
                                 {40, 3, 4},
                                 {33, 200, 33}}) {
    const auto q = gaussian<double>(L, 6, 7), k = gaussian<double>(S, 6, 8);
    const fa::matrix<double> v = fa::matrix<double>::Identity(S, S);
    const auto o = fa::attention(fa::smyrf{.hashes = 1, .cluster_size = cs, .seed = 3}, q, k, v);
    std::map<std::vector<index>, index> clusters;  // support -> number of queries
    std::vector<index> key_uses(static_cast<std::size_t>(S), 0);
    for (index i = 0; i < L; ++i) {
      std::vector<index> support;
      for (index j = 0; j < S; ++j)
        if (o(i, j) > 0) support.push_back(j);
      EXPECT_NEAR(o.row(i).sum(), 1.0, 1e-12);
      if (clusters[support]++ == 0)
        for (index j : support) ++key_uses[static_cast<std::size_t>(j)];
    }
    const index n = (L + cs - 1) / cs;
    const std::string where =
        "L=" + std::to_string(L) + " S=" + std::to_string(S) + " cs=" + std::to_string(cs);
    if (S >= n) {
      ASSERT_EQ(static_cast<index>(clusters.size()), n) << where;
      index qmin = L, qmax = 0, kmin = S, kmax = 0;
      for (const auto& [support, count] : clusters) {
        qmin = std::min(qmin, count);
        qmax = std::max(qmax, count);
        kmin = std::min(kmin, static_cast<index>(support.size()));
        kmax = std::max(kmax, static_cast<index>(support.size()));
      }
      EXPECT_LE(qmax - qmin, 1) << where;
      EXPECT_LE(qmax, cs) << where;
      EXPECT_LE(kmax - kmin, 1) << where;
      // The key groups partition the keys.
      for (index j = 0; j < S; ++j) EXPECT_EQ(key_uses[static_cast<std::size_t>(j)], 1) << where;
    } else {
      // Sv < n: S groups of one key, each shared by near-equal numbers of query clusters.
      EXPECT_EQ(static_cast<index>(clusters.size()), S) << where;
      for (const auto& [support, count] : clusters) EXPECT_EQ(support.size(), 1u) << where;
    }
  }
}

TYPED_TEST(SmyrfTyped, ClusterSizeAtLeastLengthIsDense) {
  using T = TypeParam;
  const double tol = std::is_same_v<T, float> ? 1e-5 : 1e-12;
  std::mt19937_64 gen(31);
  std::uniform_int_distribution<index> len(1, 150);
  for (int trial = 0; trial < 12; ++trial) {
    const index L = len(gen), S = len(gen), E = 1 + trial * 5, M = 3 + trial;
    const auto q = gaussian<T>(L, E, 40 + static_cast<std::uint64_t>(trial));
    const auto k = gaussian<T>(S, E, 50 + static_cast<std::uint64_t>(trial));
    const auto v = gaussian<T>(S, M, 60 + static_cast<std::uint64_t>(trial));
    fa::options opt;
    if (trial % 3 == 1) opt.key_length = S / 2 + 1;
    if (trial % 3 == 2) opt.query_length = L / 2;
    for (const index hashes : {1, 2, 5}) {
      const fa::smyrf p{.hashes = hashes, .cluster_size = L + trial % 2 * 1000, .seed = 4};
      const auto o = fa::attention(p, q, k, v, opt);
      EXPECT_LT(relative_error(o, reference_attention(q, k, v, opt)), tol)
          << "L=" << L << " S=" << S << " hashes=" << hashes;
    }
  }
  // Also beyond one score block (64 queries x 256 keys) inside the single cluster, and with the
  // largest valid cluster_size (no overflow in ceil(Lv / cluster_size)).
  const auto q = gaussian<T>(300, 16, 1), k = gaussian<T>(700, 16, 2), v = gaussian<T>(700, 8, 3);
  const auto o = fa::attention(fa::smyrf{.hashes = 3, .cluster_size = 300}, q, k, v);
  EXPECT_LT(relative_error(o, reference_attention(q, k, v)), tol);
  fa::smyrf huge{};
  fa::for_each_knob<fa::smyrf>([&](const auto& knob) {
    if constexpr (std::is_same_v<typename std::decay_t<decltype(knob)>::value_type, index>)
      if (knob.name == "cluster_size") huge.cluster_size = knob.max;
  });
  ASSERT_GE(huge.cluster_size, index{1} << 31);
  EXPECT_LT(relative_error(fa::attention(huge, q, k, v), reference_attention(q, k, v)), tol);
}

TEST(Smyrf, OneClusterComputesOneRoundWhateverHashesSays) {
  // Regression (a fuzz timeout: hashes = 1024 with cluster_size = 2^31 at L = 58 took 46 s under
  // the sanitizers): with one cluster every round is the same exact attention, so one round is
  // computed. The output and log-sum-exp are then those of hashes = 1 bit for bit; merging 1024
  // equal rounds, as before, left rounding differences in both.
  const auto q = gaussian<float>(58, 63, 11), k = gaussian<float>(58, 63, 12);
  const auto v = gaussian<float>(58, 63, 13);
  for (const index cluster_size : {index{58}, index{1} << 31}) {
    const fa::smyrf one{.hashes = 1, .cluster_size = cluster_size, .seed = 5};
    fa::smyrf many = one;
    many.hashes = 1024;
    std::vector<float> lse_one(58), lse_many(58);
    fa::matrix<float> o_one(58, 63), o_many(58, 63);
    fa::attention(one, q, k, v, fa::view<float>(o_one), std::span<float>(lse_one));
    fa::attention(many, q, k, v, fa::view<float>(o_many), std::span<float>(lse_many));
    EXPECT_TRUE(o_one == o_many) << "cluster_size " << cluster_size;
    EXPECT_EQ(lse_one, lse_many) << "cluster_size " << cluster_size;
  }
}

TYPED_TEST(SmyrfTyped, LargeScoresStayFiniteAndExact) {
  using T = TypeParam;
  auto q = gaussian<T>(40, 4, 7), k = gaussian<T>(50, 4, 8);
  const auto v = gaussian<T>(50, 5, 9);
  q *= T(100);
  k *= T(100);  // scores of order 1e4: exp overflows unless every merge stays in the log domain
  const fa::options opt{.scale = 1.0};
  const auto approx = fa::attention(fa::smyrf{.hashes = 4, .cluster_size = 8}, q, k, v, opt);
  EXPECT_TRUE(approx.allFinite());
  const auto exact = fa::attention(fa::smyrf{.hashes = 4, .cluster_size = 40}, q, k, v, opt);
  const double tol = std::is_same_v<T, float> ? 1e-4 : 1e-10;
  EXPECT_LT(relative_error(exact, reference_attention(q, k, v, opt)), tol);
}

TEST(Smyrf, ErrorFallsAsHashesGrow) {
  // Peaked inputs (16 centres): a query's heavy keys share its centre. Each extra round is
  // another chance to pair the query's cluster with keys of its centre, and the log-sum-exp merge
  // lets the round that found them dominate. Mean over 6 seeds of the data and of the kernel.
  const std::vector<index> rounds{1, 2, 4, 8};
  std::vector<double> mean(rounds.size(), 0.0);
  const int seeds = 6;
  for (int s = 0; s < seeds; ++s) {
    const auto in =
        fa::testing::make_peaked<float>(256, 256, 32, 32, 70 + static_cast<std::uint64_t>(s));
    const auto exact = reference_attention(in.q, in.k, in.v);
    for (std::size_t r = 0; r < rounds.size(); ++r) {
      const fa::smyrf p{
          .hashes = rounds[r], .cluster_size = 16, .seed = static_cast<std::uint64_t>(s)};
      mean[r] += relative_error(fa::attention(p, in.q, in.k, in.v), exact) / seeds;
    }
  }
  for (std::size_t r = 1; r < rounds.size(); ++r)
    EXPECT_LT(mean[r], 0.9 * mean[r - 1]) << "hashes " << rounds[r] << " vs " << rounds[r - 1];
  EXPECT_LT(mean.back(), 0.5 * mean.front());
  std::cout << "[          ] mean rel err, hashes 1 2 4 8:";
  for (double m : mean) std::cout << ' ' << m;
  std::cout << '\n';
}

TYPED_TEST(SmyrfTyped, PaddingEqualsTheUnpaddedPrefixAndIsNeverRead) {
  using T = TypeParam;
  const index L = 150, S = 170, Lv = 101, Sv = 129, E = 12, M = 7;
  auto q = gaussian<T>(L, E, 11), k = gaussian<T>(S, E, 12), v = gaussian<T>(S, M, 13);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  q.bottomRows(L - Lv).setConstant(nan);
  k.bottomRows(S - Sv).setConstant(nan);
  v.bottomRows(S - Sv).setConstant(std::numeric_limits<T>::infinity());
  // Huge padded keys would dominate M_K if padding entered the norms.
  k(Sv, 0) = T(1e6);
  const fa::smyrf p{.hashes = 3, .cluster_size = 16, .seed = 8};
  const auto padded = fa::attention(p, q, k, v, {.key_length = Sv, .query_length = Lv});
  const fa::matrix<T> qp = q.topRows(Lv), kp = k.topRows(Sv), vp = v.topRows(Sv);
  const auto prefix = fa::attention(p, qp, kp, vp);
  EXPECT_TRUE(padded.allFinite());
  EXPECT_EQ(fa::matrix<T>(padded.topRows(Lv)), prefix);
  EXPECT_TRUE((padded.bottomRows(L - Lv).array() == T(0)).all());
}

// Head (b, h) of the multi-head driver is the kernel run with stream b * H + h (the typed
// Determinism suite checks that the result does not depend on the thread count).
TEST(Smyrf, MultiheadUsesOneStreamPerHead) {
  const index B = 2, L = 90, S = 75, H = 3, E = 16, M = 8;
  const auto q = gaussian<float>(B * L * H, E, 1), k = gaussian<float>(B * S * H, E, 2),
             v = gaussian<float>(B * S * H, M, 3);
  const std::vector<index> qlen{90, 61}, klen{40, 75};
  fa::multihead_options opt;
  opt.query_lengths = qlen;
  opt.key_lengths = klen;
  opt.threads = 2;
  const fa::smyrf p{.hashes = 2, .cluster_size = 8, .seed = 12};
  const fa::tensor_view<const float> tq{q.data(), B, L, H, E}, tk{k.data(), B, S, H, E},
      tv{v.data(), B, S, H, M};
  fa::matrix<float> out(B * L * H, M);
  const fa::tensor_view<float> to{out.data(), B, L, H, M};
  fa::multihead_attention(p, tq, tk, tv, to, opt);
  for (index b = 0; b < B; ++b)
    for (index h = 0; h < H; ++h) {
      const fa::options o{.key_length = klen[static_cast<std::size_t>(b)],
                          .query_length = qlen[static_cast<std::size_t>(b)]};
      const auto ctx =
          fa::detail::make_context<float>(fa::smyrf::name, fa::smyrf::supports_causal, L, E, S, E,
                                          S, o, static_cast<std::uint64_t>(b * H + h));
      fa::matrix<float> expected = fa::matrix<float>::Zero(L, M);  // compute writes rows < Lv
      p.compute<float>(fa::testing::copy_head(tq, b, h), fa::testing::copy_head(tk, b, h),
                       fa::testing::copy_head(tv, b, h), expected, ctx);
      EXPECT_TRUE(fa::testing::same_bits(fa::testing::copy_head(to, b, h), expected))
          << "b=" << b << " h=" << h;
    }
}

TYPED_TEST(SmyrfTyped, SizeOneAndFewerKeysThanClusters) {
  using T = TypeParam;
  const auto q1 = gaussian<T>(1, 1, 1), k1 = gaussian<T>(1, 1, 2), v1 = gaussian<T>(1, 1, 3);
  for (const index hashes : {1, 4}) {
    const auto o = fa::attention(fa::smyrf{.hashes = hashes, .cluster_size = 1}, q1, k1, v1);
    EXPECT_NEAR(static_cast<double>(o(0, 0)), static_cast<double>(v1(0, 0)), 1e-6);
  }
  const auto q = gaussian<T>(20, 1, 4), k = gaussian<T>(30, 1, 5), v = gaussian<T>(30, 2, 6);
  // E = 1 and fewer valid keys than clusters (3 keys, 20 clusters): with one round every query
  // attends to exactly one key, so its row is exactly that key's value.
  const auto few =
      fa::attention(fa::smyrf{.hashes = 1, .cluster_size = 1}, q, k, v, {.key_length = 3});
  for (index i = 0; i < 20; ++i) {
    bool equals_a_key = false;
    for (index j = 0; j < 3; ++j) equals_a_key |= few.row(i) == v.row(j);
    EXPECT_TRUE(equals_a_key) << "row " << i;
  }
  const auto few2 =
      fa::attention(fa::smyrf{.hashes = 2, .cluster_size = 1}, q, k, v, {.key_length = 3});
  EXPECT_TRUE(few2.allFinite());
}

// The peaked1024 fixture (4 heads, N = 1024, E = M = 64): the authors' code reaches 1.019
// (2 hashes, clusters of 64) and 0.967 (4 hashes, clusters of 32), mean of 3 seeds.
TEST(Smyrf, Peaked1024FixtureIsNoWorseThanTheReference) {
  FASTATTN_TEST_PEAKED1024(fixture);
  // The seed-to-seed spread of the error on this fixture is large (standard deviation 0.055 for
  // 2 x 64 and 0.023 for 4 x 32 over 20 seeds), so a 5-seed mean moves by +-0.025 / +-0.01 and
  // the reference's own 3-seed figures carry about +-0.026 / +-0.013. The bound therefore uses the
  // mean of 20 seeds (+-0.012 / +-0.005) and allows the reference figure plus the standard error
  // of the reference's mean. Measured: 0.988 and 0.971 (20 seeds); seeds 0-4 alone give 1.042
  // and 0.992.
  const double e2x64 = fixture.mean_error(fa::smyrf{.hashes = 2, .cluster_size = 64}, 20);
  const double e4x32 = fixture.mean_error(fa::smyrf{.hashes = 4, .cluster_size = 32}, 20);
  std::cout << "[          ] peaked1024 mean rel err over 20 seeds: 2 x 64 " << e2x64 << ", 4 x 32 "
            << e4x32 << '\n';
  EXPECT_LT(e2x64, 1.019 + 0.026);
  EXPECT_LT(e4x32, 0.967 + 0.013);
}

}  // namespace
