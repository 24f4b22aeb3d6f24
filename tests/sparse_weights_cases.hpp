// The dropped weights of the exact rows (flash_block::drop_below, exact_attention's
// drop_negligible, weighted_values' sparse path, flash::list_weighed): their tests, included by
// test_sparse_weights.cpp (the build's flags) and by native/test_native_sparse_weights.cpp
// (x86-64-v4, so that list_weighed's AVX-512 path runs where the host has it; the other builds
// take its scalar path). The includer provides common.hpp's names.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

namespace {

using fa::index;
using namespace fa::testing;

template <class T>
class SparseWeights : public ::testing::Test {};
TYPED_TEST_SUITE(SparseWeights, fa::testing::scalars);

// flash::list_weighed (the keys a row weighs, for the P V products that skip dropped weights)
// against a scalar loop: mostly zeros in no pattern, some NaN (kept: it must reach the output),
// -0 (a zero), every start and end around the packet sizes.
TYPED_TEST(SparseWeights, ListWeighedListsTheNonzeroWeights) {
  using T = TypeParam;
  std::mt19937_64 gen(31);
  std::uniform_real_distribution<double> u(0, 1);
  const index n = 100;
  std::vector<T> p(static_cast<std::size_t>(n));
  for (auto& x : p) {
    const double r = u(gen);
    x = r < 0.8    ? T(0)
        : r < 0.85 ? T(-0.0)
        : r < 0.9  ? std::numeric_limits<T>::quiet_NaN()
                   : static_cast<T>(u(gen));
  }
  std::vector<std::int32_t> keys(static_cast<std::size_t>(n + 16));
  for (index a = 0; a < 40; ++a)
    for (index b = a; b <= n; b += 1 + (b % 7)) {
      const index count = fa::detail::flash::list_weighed(p.data(), a, b, keys.data());
      std::vector<std::int32_t> want;
      for (index j = a; j < b; ++j)
        if (p[static_cast<std::size_t>(j)] != T(0)) want.push_back(static_cast<std::int32_t>(j));
      ASSERT_EQ(count, static_cast<index>(want.size())) << "[" << a << ", " << b << ")";
      EXPECT_TRUE(std::equal(want.begin(), want.end(), keys.begin()))
          << "[" << a << ", " << b << ")";
    }
}

// Inputs whose attention is peaked: query i is key i times 6 in E = 16, so its own key outscores
// the others by about 6 E (~100): nearly every other weight is below eps / (16 S) and dropped.
template <class T>
struct peaked_rows {
  fa::matrix<T> q, k, v;
};
template <class T>
peaked_rows<T> make_peaked_rows(index rows, index keys, index m, std::uint64_t seed) {
  peaked_rows<T> in{fa::matrix<T>(rows, 16), gaussian<T>(keys, 16, seed),
                    gaussian<T>(keys, m, seed + 1)};
  for (index i = 0; i < rows; ++i) in.q.row(i) = in.k.row((7 * i) % keys) * T(6);
  return in;
}

// exact_attention with drop_negligible (clustered's centroids, the guard's exact rows) is exact
// attention: against the float64 oracle on peaked rows (where most of the P V product is
// skipped) and on gaussian rows (where nothing is), for every value width's geometry, one and
// several query blocks, 1 and 2 threads (the same bits), with each row's log-sum-exp.
TYPED_TEST(SparseWeights, DroppingNegligibleWeightsIsExactAttention) {
  using T = TypeParam;
  namespace fd = fa::detail;
  int trial = 0;
  for (const index M : {1, 3, 8, 16, 24, 64, 80})
    for (const bool peaked : {true, false}) {
      const index rows = 1 + (13 * trial) % 45, keys = 20 + (97 * trial) % 700;
      auto in = make_peaked_rows<T>(rows, keys, M, 100 + trial);
      if (!peaked) in.q = gaussian<T>(rows, 16, 200 + trial, 0.3);
      const fd::arena::scope scratch;
      fa::matrix<T> out(rows, M), out1(rows, M), lse(rows, 1), lse1(rows, 1);
      const index block = trial % 2 == 0 ? 128 : 8;  // one query block, or several
      fd::exact_attention<T>(in.q, in.k, in.v, fa::view<T>(out), rows, keys, 1.0, std::nullopt,
                             {block, 64, 2, true}, lse.data());
      fd::exact_attention<T>(in.q, in.k, in.v, fa::view<T>(out1), rows, keys, 1.0, std::nullopt,
                             {block, 64, 1, true}, lse1.data());
      const auto ref = reference_attention(in.q, in.k, in.v, {.scale = 1.0});
      EXPECT_LT(relative_error(out, ref), tolerance<T>())
          << "M=" << M << " peaked=" << peaked << " rows=" << rows << " keys=" << keys;
      const matd scores = in.q.template cast<double>() * in.k.template cast<double>().transpose();
      for (index i = 0; i < rows; ++i) {
        const double top = scores.row(i).maxCoeff();
        const double want = top + std::log((scores.row(i).array() - top).exp().sum());
        EXPECT_NEAR(static_cast<double>(lse(i, 0)), want,
                    10 * tolerance<T>() * (1 + std::abs(want)))
            << "row " << i;
      }
      EXPECT_EQ(out, out1) << "M=" << M;
      EXPECT_EQ(lse, lse1) << "M=" << M;
      ++trial;
    }
}

// A key whose weight is dropped is not read only when the block's values are finite: with
// check_finite off a NaN value still reaches every row, as 0 * NaN does without dropping.
TYPED_TEST(SparseWeights, DroppingNegligibleWeightsStillPropagatesANonFiniteValue) {
  using T = TypeParam;
  namespace fd = fa::detail;
  const index rows = 16, keys = 300, M = 16;
  auto in = make_peaked_rows<T>(rows, keys, M, 5);
  in.v(299, 3) = std::numeric_limits<T>::quiet_NaN();  // a key no row weighs
  const fd::arena::scope scratch;
  fa::matrix<T> out(rows, M);
  fd::exact_attention<T>(in.q, in.k, in.v, fa::view<T>(out), rows, keys, 1.0, std::nullopt,
                         {128, 512, 1, true});
  for (index i = 0; i < rows; ++i) EXPECT_TRUE(std::isnan(out(i, 3))) << "row " << i;
}

// weighted_values with `sparse` (improved_clustered's residual) adds each row's nonzero weights
// only: the same result as the tiles over every key (a zero term changes no sum), for weights
// mostly zero (the rows' own keys) and for dense weights (where it takes the tiles).
TYPED_TEST(SparseWeights, SparseWeightedValuesIsTheProduct) {
  using T = TypeParam;
  namespace fd = fa::detail;
  std::mt19937_64 gen(41);
  std::uniform_real_distribution<double> u(0, 1);
  for (const index M : {1, 5, 16, 64, 80})
    for (const double density : {0.02, 0.2, 1.0}) {
      const index rows = 21, keys = 700;
      const auto v = gaussian<T>(keys, M, 300 + M);
      const fd::arena::scope scratch;
      const index ldp = keys + 9;
      T* const p = fd::arena::local().take<T>(static_cast<std::size_t>(24 * ldp));
      for (index i = 0; i < 24 * ldp; ++i) p[i] = u(gen) < density ? static_cast<T>(u(gen)) : T(0);
      fa::matrix<T> dense(rows, M), sparse(rows, M), sparse2(rows, M);
      fd::weighted_values<T>(p, ldp, rows, v, keys, fa::view<T>(dense), 1);
      fd::weighted_values<T>(p, ldp, rows, v, keys, fa::view<T>(sparse), 1, true);
      fd::weighted_values<T>(p, ldp, rows, v, keys, fa::view<T>(sparse2), 2, true);
      const Eigen::Map<const fa::matrix<T>, 0, Eigen::OuterStride<>> weights(
          p, rows, keys, Eigen::OuterStride<>(ldp));
      const matd want = weights.template cast<double>() * v.template cast<double>();
      EXPECT_LT(relative_error(sparse, want), tolerance<T>()) << "M=" << M << " " << density;
      EXPECT_EQ(dense, sparse) << "M=" << M << " density " << density;
      EXPECT_EQ(sparse, sparse2) << "M=" << M << " density " << density;
    }
}

}  // namespace
