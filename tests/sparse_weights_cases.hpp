// The dropped weights of the exact rows (flash_block::drop_below, exact_attention's
// drop_negligible, weighted_values' sparse path, flash::list_weighed, detail::exact_rows): their
// tests, included by test_sparse_weights.cpp (the build's flags) and by
// native/test_native_sparse_weights.cpp (x86-64-v4, so that the AVX-512 paths of list_weighed
// and exact_rows run where the host has them; the other builds take their portable paths). The
// includer provides common.hpp's names.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include <fastattn/detail/exact_rows.hpp>

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

// detail::exact_rows (the guard's sampled rows): row r is exact attention of query ids[r] over
// keys [0, ends[r]), against the float64 oracle. Peaked rows (most weights dropped: the sparse
// P V, and with AVX-512 the compressed exp) and gaussian rows (nothing dropped: the value tiles),
// every value width's geometry, an odd E, fewer and more rows than a chunk of lanes (32 floats
// or 16 doubles with AVX-512), repeated rows, one run of keys and several (>= 2048 keys), ends
// from 0 (zeros) to every key. The same bits on 1 and 2 threads.
TYPED_TEST(SparseWeights, ExactRowsIsExactAttentionOfTheChosenRows) {
  using T = TypeParam;
  namespace fd = fa::detail;
  std::mt19937_64 gen(77);
  int trial = 0;
  for (const index M : {1, 3, 16, 64, 80})
    for (const bool peaked : {true, false})
      for (const bool causal : {false, true}) {
        const index keys = trial % 5 == 0 ? 2600 : 20 + (97 * trial) % 700;
        const index n = 1 + (11 * trial) % 45, L = 50;
        auto in = make_peaked_rows<T>(L, keys, M, 400 + trial);
        if (!peaked) in.q = gaussian<T>(L, 16, 500 + trial, 0.3);
        if (trial % 4 == 3) {  // an odd number of features
          in.q = in.q.leftCols(13).eval();
          in.k = in.k.leftCols(13).eval();
        }
        std::vector<index> ids(static_cast<std::size_t>(n)), ends(static_cast<std::size_t>(n));
        for (index r = 0; r < n; ++r) {
          ids[static_cast<std::size_t>(r)] =
              static_cast<index>(gen() % static_cast<std::uint64_t>(L));
          ends[static_cast<std::size_t>(r)] =
              r == 0 ? 0
                     : (r == 1 ? keys
                               : static_cast<index>(gen() % static_cast<std::uint64_t>(keys + 1)));
        }
        const index* const row_ends = causal ? ends.data() : nullptr;
        const fd::arena::scope scratch;
        fa::matrix<T> out(n, M), out1(n, M);
        const double scale = 0.9;
        fd::exact_rows<T>(in.q, ids.data(), row_ends, n, in.k, in.v, keys, scale, fa::view<T>(out),
                          2, true);
        fd::exact_rows<T>(in.q, ids.data(), row_ends, n, in.k, in.v, keys, scale, fa::view<T>(out1),
                          1, true);
        // The rows against the oracle's, as one matrix (a row of a few values may be near 0).
        matd want = matd::Zero(n, M);
        for (index r = 0; r < n; ++r) {
          const index id = ids[static_cast<std::size_t>(r)];
          const index end = causal ? ends[static_cast<std::size_t>(r)] : keys;
          if (end == 0) {
            EXPECT_TRUE(out.row(r).isZero(0)) << "row " << r << " sees no key";
            continue;
          }
          want.row(r) = reference_attention(in.q.middleRows(id, 1), in.k.topRows(end),
                                            in.v.topRows(end), {.scale = scale});
        }
        EXPECT_LT(relative_error(out, want), tolerance<T>())
            << "M=" << M << " peaked=" << peaked << " causal=" << causal << " keys=" << keys
            << " n=" << n;
        EXPECT_EQ(out, out1) << "M=" << M << " peaked=" << peaked << " causal=" << causal;
        ++trial;
      }
}

// exact_rows with non-finite values (values_finite false, as with check_finite off): a NaN value
// reaches every row that sees its key, even where its weight is dropped (as 0 * NaN), and no
// row whose end comes before it; a NaN score (a NaN query) makes its own row NaN only.
TYPED_TEST(SparseWeights, ExactRowsPropagatesNonFiniteInputsToTheRowsThatSeeThem) {
  using T = TypeParam;
  namespace fd = fa::detail;
  const index keys = 600, M = 16, n = 40, bad = 450;
  auto in = make_peaked_rows<T>(n, keys, M, 9);
  in.v(bad, 5) = std::numeric_limits<T>::quiet_NaN();  // a key no row weighs much
  in.q(7, 2) = std::numeric_limits<T>::quiet_NaN();
  std::vector<index> ids(static_cast<std::size_t>(n)), ends(static_cast<std::size_t>(n));
  for (index r = 0; r < n; ++r) {
    ids[static_cast<std::size_t>(r)] = r;
    ends[static_cast<std::size_t>(r)] = 15 * r + 1;  // rows up to 29 end at or before key 450
  }
  const fd::arena::scope scratch;
  fa::matrix<T> out(n, M);
  fd::exact_rows<T>(in.q, ids.data(), ends.data(), n, in.k, in.v, keys, 1.0, fa::view<T>(out), 1,
                    false);
  for (index r = 0; r < n; ++r) {
    const index end = ends[static_cast<std::size_t>(r)];
    if (r == 7) {
      EXPECT_TRUE(out.row(r).array().isNaN().all()) << "row 7 has a NaN query";
    } else if (end > bad) {
      EXPECT_TRUE(std::isnan(out(r, 5))) << "row " << r << " sees key " << bad;
    } else {
      EXPECT_TRUE(out.row(r).allFinite()) << "row " << r << " ends at " << end;
      const auto want = reference_attention(in.q.middleRows(r, 1), in.k.topRows(end),
                                            in.v.topRows(end), {.scale = 1.0});
      EXPECT_LT(relative_error(out.row(r), want), tolerance<T>()) << "row " << r;
    }
  }
}

}  // namespace
