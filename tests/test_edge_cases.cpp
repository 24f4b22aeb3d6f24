// Numerical edge cases across every kernel (issue #7): a typed suite over fastattn::kernels and the
// user-written fifth kernel x {float, double}. Huge scores and scales, degenerate inputs (equal
// keys, equal queries, zero vectors), degenerate shapes (L = 1, S = 1, E = 1, M != E), padding
// holding NaN, exactness in double precision where a kernel's knobs make it exact, the non-finite
// policy, and a very large N through the multi-head driver on 2 threads.
#include "common.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using fa::index;
using namespace fa::testing;

template <class T>
using mat = fa::matrix<T>;

// Every output row of a kernel is a convex combination of valid value rows (every kernel here
// weights the values with non-negative weights summing to one), so each entry lies within the
// column's range over the valid rows; a kernel that may leave a query without any valid key
// (`no_key_rows`) may give it a zero row instead. Rows past Lv must be exactly zero.
template <class T>
::testing::AssertionResult convex_and_padded(const mat<T>& o, const mat<T>& v, index Lv, index Sv,
                                             bool no_key_rows = false) {
  if (!o.allFinite()) return ::testing::AssertionFailure() << "non-finite output";
  for (index i = Lv; i < o.rows(); ++i)
    if (!(o.row(i).array() == T(0)).all())
      return ::testing::AssertionFailure() << "padded row " << i << " is not zero";
  std::vector<double> lows(static_cast<std::size_t>(o.cols())), highs(lows.size());
  for (index m = 0; m < o.cols() && Sv > 0; ++m) {
    lows[static_cast<std::size_t>(m)] = static_cast<double>(v.col(m).head(Sv).minCoeff());
    highs[static_cast<std::size_t>(m)] = static_cast<double>(v.col(m).head(Sv).maxCoeff());
  }
  for (index i = 0; i < Lv; ++i) {
    if (no_key_rows && (o.row(i).array() == T(0)).all()) continue;
    if (Sv == 0) {
      if (!(o.row(i).array() == T(0)).all())
        return ::testing::AssertionFailure() << "row " << i << " is not zero with no valid key";
      continue;
    }
    for (index m = 0; m < o.cols(); ++m) {
      const double lo = lows[static_cast<std::size_t>(m)], hi = highs[static_cast<std::size_t>(m)];
      const double slack = tolerance<T>() * 10 * std::max({1.0, std::abs(lo), std::abs(hi)});
      const double x = static_cast<double>(o(i, m));
      if (x < lo - slack || x > hi + slack)
        return ::testing::AssertionFailure() << "out(" << i << ", " << m << ") = " << x
                                             << " outside [" << lo << ", " << hi << "]";
    }
  }
  return ::testing::AssertionSuccess();
}

template <class Case>
class EdgeCases : public ::testing::Test {
 protected:
  using FixT = typename Case::scalar;
  using FixK = kernel_traits<typename Case::policy>;

  // Runs approx() and, when it exists, exact(L, S): both must be convex and padded; exact must
  // match the oracle.
  void check_all(const mat<FixT>& q, const mat<FixT>& k, const mat<FixT>& v,
                 const fa::options& opt = {}, const char* what = "", double score_magnitude = 1) {
    using T = FixT;
    // The softmax's condition number grows with the scores: rounding of a score s is ~eps |s|.
    const double tol =
        std::max(tolerance<T>(), 4 * std::numeric_limits<T>::epsilon() * score_magnitude);
    using K = FixK;
    const index Lv = opt.query_length.value_or(q.rows()), Sv = opt.key_length.value_or(k.rows());
    const auto o = fa::attention(K::approx(), q, k, v, opt);
    EXPECT_TRUE(convex_and_padded<T>(o, v, Lv, Sv, K::rows_may_see_no_key)) << what << " (approx)";
    if (const auto exact = K::exact(q.rows(), k.rows())) {
      const auto oe = fa::attention(*exact, q, k, v, opt);
      EXPECT_TRUE(convex_and_padded<T>(oe, v, Lv, Sv)) << what << " (exact)";
      EXPECT_LT(relative_error(oe, reference_attention(q, k, v, opt)), tol) << what << " (exact)";
    }
  }
};

TYPED_TEST_SUITE(EdgeCases, fa::testing::kernel_cases<fa::testing::tested_kernels>::type,
                 fa::testing::kernel_names);

TYPED_TEST(EdgeCases, HugeScoresDoNotOverflow) {
  using T = typename TypeParam::scalar;
  const index L = 37, S = 29, E = 4, M = 5;
  // Entries +-100 at E = 4 and the default scale 1/2: every score is one of +-2e4, +-1e4, 0.
  auto sign = [](const mat<T>& g) {
    return mat<T>(g.unaryExpr([](T x) { return x >= T(0) ? T(100) : T(-100); }));
  };
  const auto q = sign(gaussian<T>(L, E, 1)), k = sign(gaussian<T>(S, E, 2));
  const auto v = gaussian<T>(S, M, 3);
  this->check_all(q, k, v, {}, "scores +-1e4", 2e4);
  // Scale 1e3 on N(0, 1) entries: scores in the thousands.
  this->check_all(gaussian<T>(L, E, 4), gaussian<T>(S, E, 5), v, {.scale = 1e3}, "scale 1e3", 2e4);
  this->check_all(gaussian<T>(L, E, 4), gaussian<T>(S, E, 5), v, {.scale = -1e3}, "scale -1e3",
                  2e4);
  // Every score about -1e4: the softmax must not underflow to 0 / 0.
  mat<T> qn = mat<T>::Constant(L, E, T(100));
  mat<T> kn = mat<T>::Constant(S, E, T(-100)) + gaussian<T>(S, E, 6, 0.01);
  this->check_all(qn, kn, v, {}, "all scores -2e4", 2e4);
}

TYPED_TEST(EdgeCases, AllKeysEqual) {
  using T = typename TypeParam::scalar;
  using K = kernel_traits<typename TypeParam::policy>;
  const index L = 33, S = 21, E = 6, M = 4;
  const auto q = gaussian<T>(L, E, 7), v = gaussian<T>(S, M, 8);
  const mat<T> k = gaussian<T>(1, E, 9).replicate(S, 1);
  this->check_all(q, k, v, {}, "equal keys");
  if constexpr (K::exact_when_keys_equal) {
    // Uniform weights: every row is the mean of the values.
    const auto o = fa::attention(K::approx(), q, k, v);
    EXPECT_LT(relative_error(o, reference_attention(q, k, v)), tolerance<T>());
  }
}

TYPED_TEST(EdgeCases, AllQueriesEqual) {
  using T = typename TypeParam::scalar;
  using K = kernel_traits<typename TypeParam::policy>;
  const index L = 40, S = 26, E = 5, M = 3;
  const mat<T> q = gaussian<T>(1, E, 10, 2.0).replicate(L, 1);
  const auto k = gaussian<T>(S, E, 11), v = gaussian<T>(S, M, 12);
  this->check_all(q, k, v, {}, "equal queries");
  if constexpr (K::exact_when_queries_equal) {
    const auto o = fa::attention(K::approx(), q, k, v);
    EXPECT_LT(relative_error(o, reference_attention(q, k, v)), tolerance<T>());
  }
}

TYPED_TEST(EdgeCases, ZeroVectors) {
  using T = typename TypeParam::scalar;
  using K = kernel_traits<typename TypeParam::policy>;
  const index L = 24, S = 18, E = 6, M = 4;
  const mat<T> z_q = mat<T>::Zero(L, E), z_k = mat<T>::Zero(S, E), z_v = mat<T>::Zero(S, M);
  const auto q = gaussian<T>(L, E, 13), k = gaussian<T>(S, E, 14), v = gaussian<T>(S, M, 15);
  this->check_all(z_q, k, v, {}, "q = 0");
  this->check_all(q, z_k, v, {}, "k = 0");
  this->check_all(z_q, z_k, v, {}, "q = k = 0");
  this->check_all(z_q, z_k, z_v, {}, "q = k = v = 0");
  // Some zero rows among normal ones.
  mat<T> qm = q, km = k;
  qm.row(3).setZero();
  km.row(5).setZero();
  this->check_all(qm, km, v, {}, "some zero rows");
  // v = 0 gives exactly zero output for every kernel.
  EXPECT_TRUE((fa::attention(K::approx(), q, k, z_v).array() == T(0)).all());
  if constexpr (K::exact_when_keys_equal) {
    // q = 0 or k = 0: uniform weights, every row the mean of the values.
    const matd mean = v.template cast<double>().colwise().mean().replicate(L, 1);
    EXPECT_LT(relative_error(fa::attention(K::approx(), z_q, k, v), mean), tolerance<T>());
    EXPECT_LT(relative_error(fa::attention(K::approx(), q, z_k, v), mean), tolerance<T>());
  }
}

TYPED_TEST(EdgeCases, DegenerateShapes) {
  using T = typename TypeParam::scalar;
  using K = kernel_traits<typename TypeParam::policy>;
  struct shape {
    index L, S, E, M;
  };
  for (const shape s : {shape{1, 1, 1, 1}, shape{1, 17, 8, 8}, shape{17, 1, 8, 8},
                        shape{19, 23, 1, 1}, shape{19, 23, 1, 6}, shape{21, 15, 7, 3},
                        shape{21, 15, 2, 11}, shape{1, 1, 64, 1}, shape{2, 3, 3, 2}}) {
    const std::string what = "L=" + std::to_string(s.L) + " S=" + std::to_string(s.S) +
                             " E=" + std::to_string(s.E) + " M=" + std::to_string(s.M);
    const auto q = gaussian<T>(s.L, s.E, 16), k = gaussian<T>(s.S, s.E, 17);
    const auto v = gaussian<T>(s.S, s.M, 18);
    this->check_all(q, k, v, {}, what.c_str());
    const auto o = fa::attention(K::approx(), q, k, v);
    ASSERT_EQ(o.rows(), s.L);
    ASSERT_EQ(o.cols(), s.M);
    if (s.S == 1 && !K::rows_may_see_no_key) {  // the only key gets all the weight
      for (index i = 0; i < s.L; ++i)
        EXPECT_LT(relative_error(o.row(i), v.row(0)), tolerance<T>()) << what << " row " << i;
    }
    if (s.L == 1 && K::exact_for_one_query) {
      EXPECT_LT(relative_error(o, reference_attention(q, k, v)), tolerance<T>()) << what;
    }
  }
}

TYPED_TEST(EdgeCases, PaddingIsZeroAndNaNNeverLeaks) {
  using T = typename TypeParam::scalar;
  using K = kernel_traits<typename TypeParam::policy>;
  const index L = 45, S = 38, E = 6, M = 5;
  const auto in = make_peaked<T>(L, S, E, M, 19, 4);
  const T nan = std::numeric_limits<T>::quiet_NaN(), inf = std::numeric_limits<T>::infinity();
  for (const auto& [Lv, Sv] : {std::pair<index, index>{30, 20},
                               {1, 1},
                               {L - 1, S - 1},
                               {0, 10},
                               {10, 0},
                               {L, 5},
                               {7, S}}) {
    const std::string what = "Lv=" + std::to_string(Lv) + " Sv=" + std::to_string(Sv);
    mat<T> q = in.q, k = in.k, v = in.v;
    q.bottomRows(L - Lv).setConstant(nan);
    k.bottomRows(S - Sv).setConstant(nan);
    v.bottomRows(S - Sv).setConstant(inf);
    const fa::options opt{.key_length = Sv, .query_length = Lv};
    this->check_all(q, k, v, opt, what.c_str());
    // The valid part equals the kernel on the unpadded prefix, bit for bit (padding is never
    // read, not even for norms or hashes).
    const mat<T> q0 = in.q.topRows(Lv), k0 = in.k.topRows(Sv), v0 = in.v.topRows(Sv);
    const auto o = fa::attention(K::approx(), q, k, v, opt);
    if (Lv > 0) {
      const auto prefix = fa::attention(K::approx(), q0, k0, v0);
      EXPECT_EQ(mat<T>(o.topRows(Lv)), prefix) << what;
    }
    // check_finite = false must not read the padding either.
    fa::options unchecked = opt;
    unchecked.check_finite = false;
    EXPECT_EQ(fa::attention(K::approx(), q, k, v, unchecked), o) << what;
  }
}

TYPED_TEST(EdgeCases, ExactKnobsMatchTheFloat64Oracle) {
  using T = typename TypeParam::scalar;
  using K = kernel_traits<typename TypeParam::policy>;
  if (!K::exact(1, 1) && !K::exact_when_queries_equal)
    GTEST_SKIP() << "no knobs or inputs make this kernel exact";
  for (std::uint64_t seed = 0; seed < 4; ++seed) {
    const index L = 20 + static_cast<index>(seed) * 13, S = 31 - static_cast<index>(seed) * 5;
    const index E = 3 + static_cast<index>(seed) * 5, M = 9 - static_cast<index>(seed) * 2;
    const auto in = make_peaked<T>(L, S, E, M, 100 + seed, 5);
    const std::string what = "seed " + std::to_string(seed);
    if (const auto exact = K::exact(L, S)) {
      const auto o = fa::attention(*exact, in.q, in.k, in.v);
      EXPECT_LT(relative_error(o, reference_attention(in.q, in.k, in.v)), tolerance<T>()) << what;
      const fa::options padded{.key_length = S - 2, .query_length = L - 3};
      const auto op = fa::attention(*exact, in.q, in.k, in.v, padded);
      EXPECT_LT(relative_error(op, reference_attention(in.q, in.k, in.v, padded)), tolerance<T>())
          << what << " padded";
    } else {
      // No exact knobs (clustered): exact when all queries are equal (the centroid is the query).
      const mat<T> q = in.q.row(0).replicate(L, 1);
      const auto o = fa::attention(K::approx(), q, in.k, in.v);
      EXPECT_LT(relative_error(o, reference_attention(q, in.k, in.v)), tolerance<T>()) << what;
    }
  }
}

TYPED_TEST(EdgeCases, NonFiniteInputIsRejectedByDefault) {
  using T = typename TypeParam::scalar;
  using K = kernel_traits<typename TypeParam::policy>;
  const index L = 12, S = 10, E = 4, M = 3;
  const auto q = gaussian<T>(L, E, 20), k = gaussian<T>(S, E, 21), v = gaussian<T>(S, M, 22);
  const T bad[] = {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity(),
                   -std::numeric_limits<T>::infinity()};
  for (const T x : bad)
    for (int tensor = 0; tensor < 3; ++tensor) {
      mat<T> qq = q, kk = k, vv = v;
      mat<T>& target = tensor == 0 ? qq : tensor == 1 ? kk : vv;
      target(target.rows() - 1, target.cols() - 1) = x;
      const std::string what = "tensor " + std::to_string(tensor) + " value " + std::to_string(x);
      EXPECT_THROW(fa::attention(K::approx(), qq, kk, vv), fa::invalid_argument) << what;
      if (const auto exact = K::exact(L, S)) {
        EXPECT_THROW(fa::attention(*exact, qq, kk, vv), fa::invalid_argument) << what;
      }
      // Through the multi-head driver as well (B = 1, H = 1).
      mat<T> out(L, M);
      const fa::tensor_view<const T> tq{qq.data(), 1, L, 1, E}, tk{kk.data(), 1, S, 1, E},
          tv{vv.data(), 1, S, 1, M};
      EXPECT_THROW(fa::multihead_attention(K::approx(), tq, tk, tv,
                                           fa::tensor_view<T>{out.data(), 1, L, 1, M}),
                   fa::invalid_argument)
          << what;
      // The same value in a padding row is fine: it is never read.
      const fa::options opt{.key_length = S - 1, .query_length = L - 1};
      EXPECT_NO_THROW(fa::attention(K::approx(), qq, kk, vv, opt)) << what;
      // check_finite = false: not checked, no exception, nothing outside the output touched.
      fa::options unchecked;
      unchecked.check_finite = false;
      mat<T> o;
      EXPECT_NO_THROW(o = fa::attention(K::approx(), qq, kk, vv, unchecked)) << what;
      EXPECT_EQ(o.rows(), L);
      EXPECT_EQ(o.cols(), M);
    }
}

// N = 65536 through multihead_attention on 2 threads (B = 1, H = 2): finite, convex, padded, and
// sampled rows close to the oracle. Float only (one run is enough; memory is ~4 MB per head).
TYPED_TEST(EdgeCases, VeryLargeNThroughMultiheadOnTwoThreads) {
#if defined(FASTATTN_TEST_SANITIZED)
  GTEST_SKIP() << "large-N case skipped under sanitizers (too slow)";
#else
  using T = typename TypeParam::scalar;
  using P = typename TypeParam::policy;
  using K = kernel_traits<P>;
  if constexpr (!std::is_same_v<T, float>) {
    GTEST_SKIP() << "float only";
  } else {
    const index N = 65536, H = 2, E = 16, M = 16;
    // A quadratic kernel (dense: 2 x 65536^2 x 64 flops per head is minutes) runs with S = 2048.
    const index S = K::quadratic ? 2048 : N;
    const auto in = make_peaked<T>(N * H, S * H, E, M, 30, 16);
    // (B = 1, L, H, E): rows of the (L * H) x E matrix interleave the heads.
    mat<T> out(N * H, M);
    const index Lv = N - 5, Sv = S - 3;
    const index lengths_q[] = {Lv}, lengths_k[] = {Sv};
    fa::multihead_options opt;
    opt.threads = 2;
    opt.query_lengths = lengths_q;
    opt.key_lengths = lengths_k;
    const fa::tensor_view<const T> tq{in.q.data(), 1, N, H, E}, tk{in.k.data(), 1, S, H, E},
        tv{in.v.data(), 1, S, H, M};
    const fa::tensor_view<T> to{out.data(), 1, N, H, M};
    fa::multihead_attention(K::large(), tq, tk, tv, to, opt);
    for (index h = 0; h < H; ++h) {
      const mat<T> qh = fa::testing::copy_head(tq, 0, h), kh = fa::testing::copy_head(tk, 0, h),
                   v = fa::testing::copy_head(tv, 0, h), o = fa::testing::copy_head(to, 0, h);
      ASSERT_TRUE(convex_and_padded<T>(o, v, Lv, Sv, K::rows_may_see_no_key)) << "head " << h;
      // 64 sampled valid rows against the oracle (each row is 65536 x 16 in float64).
      mat<T> qs(64, E), os(64, M);
      for (index t = 0; t < 64; ++t) {
        const index i = (t * 1021) % Lv;
        qs.row(t) = qh.row(i);
        os.row(t) = o.row(i);
      }
      const mat<T> kv = kh.topRows(Sv), vv = v.topRows(Sv);
      const double err = relative_error(os, reference_attention(qs, kv, vv));
      if (K::large_error_bound) {
        EXPECT_LT(err, *K::large_error_bound) << "head " << h;
      }
      ::testing::Test::RecordProperty("relative_error_head_" + std::to_string(h),
                                      std::to_string(err));
    }
  }
#endif
}

}  // namespace
