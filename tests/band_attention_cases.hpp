// detail::band_attention (the narrow bands of local and banded<P>, diagonal by diagonal): its
// tests, included by test_band_attention.cpp (the build's flags: SSE packets, or scalars) and by
// native/test_native_band_attention.cpp (x86-64-v4: AVX-512 packets, the register shifts and
// Eigen's 16 x 16 transposes). The includer provides common.hpp's names.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include <fastattn/detail/band_attention.hpp>

namespace {

using fa::index;
using namespace fa::testing;

template <class T>
class BandAttention : public ::testing::Test {};
TYPED_TEST_SUITE(BandAttention, fa::testing::scalars);

// Row i of the float64 oracle: attention over the keys j with i + lower <= j <= i + upper and
// 0 <= j < keys; its log-sum-exp in `lse` (-inf and a zero row when it sees no key).
template <class T>
matd band_oracle(const fa::matrix<T>& q, const fa::matrix<T>& k, const fa::matrix<T>& v, index rows,
                 index keys, double scale, fa::band b, std::vector<double>& lse) {
  matd want = matd::Zero(rows, v.cols());
  lse.assign(static_cast<std::size_t>(rows), -std::numeric_limits<double>::infinity());
  for (index i = 0; i < rows; ++i) {
    const index first = std::max<index>(0, i + b.lower);
    const index last = std::min<index>(keys, i + b.upper + 1);
    if (first >= last) continue;
    const index n = last - first;
    want.row(i) = reference_attention(q.middleRows(i, 1), k.middleRows(first, n),
                                      v.middleRows(first, n), {.scale = scale});
    const Eigen::VectorXd s = (k.middleRows(first, n).template cast<double>() *
                               q.row(i).template cast<double>().transpose()) *
                              scale;
    const double m = s.maxCoeff();
    lse[static_cast<std::size_t>(i)] = m + std::log((s.array() - m).exp().sum());
  }
  return want;
}

// Every band shape against the oracle: a single diagonal, symmetric windows, the causal side, the
// widest band taken (64 diagonals), bands that miss the diagonal (keys only after, only before),
// rows not a multiple of any packet, fewer keys than rows and more, an odd E, every value width's
// path (1, 3: scalars; 16; 64: four packets a row; 80: four and one). Each row's log-sum-exp too,
// rows that see no key (zeros, -inf), and the same bits on 1 and 2 threads.
TYPED_TEST(BandAttention, IsExactAttentionOfEachRowsBand) {
  using T = TypeParam;
  namespace fd = fa::detail;
  const fa::band bands[] = {{0, 0},  {-1, 1}, {-16, 16},  {-16, 0}, {-31, 32},
                            {-3, 5}, {2, 9},  {-40, -30}, {-7, 7},  {-63, 0}};
  const index sizes[][2] = {{1, 1}, {5, 40}, {37, 37}, {130, 70}, {61, 200}};
  const index widths[] = {1, 3, 16, 64, 80};
  int trial = 0;
  for (const auto b : bands)
    for (const auto& size : sizes) {
      const index rows = size[0], keys = size[1];
      const index M = widths[trial % 5], E = trial % 3 == 2 ? 13 : 16;
      ++trial;
      const auto q = gaussian<T>(rows, E, 100 + trial), k = gaussian<T>(keys, E, 200 + trial);
      const auto v = gaussian<T>(keys, M, 300 + trial);
      const double scale = 0.6;
      const fd::arena::scope scratch;
      fa::matrix<T> out(rows, M), out2(rows, M);
      std::vector<T> lse(static_cast<std::size_t>(rows)), lse2(lse.size());
      fd::band_attention<T>(q, k, v, fa::view<T>(out), rows, keys, scale, b, 1, lse.data());
      fd::band_attention<T>(q, k, v, fa::view<T>(out2), rows, keys, scale, b, 2, lse2.data());
      std::vector<double> want_lse;
      const matd want = band_oracle(q, k, v, rows, keys, scale, b, want_lse);
      const auto where = ::testing::Message()
                         << "band {" << b.lower << ", " << b.upper << "} rows " << rows << " keys "
                         << keys << " E " << E << " M " << M;
      EXPECT_LT(relative_error(out, want), tolerance<T>()) << where;
      for (index i = 0; i < rows; ++i) {
        const double w = want_lse[static_cast<std::size_t>(i)];
        const T got = lse[static_cast<std::size_t>(i)];
        if (std::isinf(w)) {
          EXPECT_EQ(got, -std::numeric_limits<T>::infinity()) << where << " row " << i;
          EXPECT_TRUE(out.row(i).isZero(0)) << where << " row " << i << " sees no key";
        } else {
          // The log-sum-exp of at most 64 scores of size ~ scale E: float rounding of each score.
          EXPECT_NEAR(got, w, 4 * tolerance<T>() * std::max(1.0, std::abs(w)))
              << where << " row " << i;
        }
      }
      EXPECT_EQ(out, out2) << where;
      EXPECT_EQ(lse, lse2) << where;
    }
}

// A NaN value reaches exactly the rows whose band holds its key (it is never multiplied in
// elsewhere, not even by 0); a NaN query makes its own row NaN only.
TYPED_TEST(BandAttention, PropagatesANaNToExactlyTheRowsThatSeeIt) {
  using T = TypeParam;
  namespace fd = fa::detail;
  const index rows = 100, keys = 100, E = 16, M = 64, bad = 50;
  const fa::band b{-5, 3};
  const auto q0 = gaussian<T>(rows, E, 1), k = gaussian<T>(keys, E, 2);
  auto v = gaussian<T>(keys, M, 3);
  v(bad, 7) = std::numeric_limits<T>::quiet_NaN();
  auto q = q0;
  q(20, 3) = std::numeric_limits<T>::quiet_NaN();
  const fd::arena::scope scratch;
  fa::matrix<T> out(rows, M);
  fd::band_attention<T>(q, k, v, fa::view<T>(out), rows, keys, 0.5, b, 1);
  std::vector<double> lse;
  auto clean = v;
  clean(bad, 7) = 0;
  const matd want = band_oracle(q0, k, clean, rows, keys, 0.5, b, lse);
  for (index i = 0; i < rows; ++i) {
    const bool sees_bad = i + b.lower <= bad && bad <= i + b.upper;
    if (i == 20) {
      EXPECT_TRUE(out.row(i).array().isNaN().all()) << "row 20 has a NaN query";
    } else if (sees_bad) {
      EXPECT_TRUE(std::isnan(out(i, 7))) << "row " << i << " sees key " << bad;
    } else {
      EXPECT_TRUE(out.row(i).allFinite()) << "row " << i << " does not see key " << bad;
      EXPECT_LT(relative_error(out.row(i), want.row(i)), tolerance<T>()) << "row " << i;
    }
  }
}

}  // namespace
