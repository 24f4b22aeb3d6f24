// dense against the float64 oracle: random shapes, masks, causal, extreme logits, float and double.
#include "common.hpp"

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
class DenseTyped : public ::testing::Test {};
TYPED_TEST_SUITE(DenseTyped, fa::testing::scalars);

TYPED_TEST(DenseTyped, MatchesReferenceOnRandomShapes) {
  using T = TypeParam;
  std::mt19937_64 gen(11);
  std::uniform_int_distribution<index> len(1, 300), dim(1, 80);
  for (int trial = 0; trial < 25; ++trial) {
    const index L = len(gen), S = len(gen), E = dim(gen), M = dim(gen);
    const auto q = gaussian<T>(L, E, 100 + trial), k = gaussian<T>(S, E, 200 + trial),
               v = gaussian<T>(S, M, 300 + trial);
    // Small blocks so that every trial crosses several partial query and key blocks.
    const fa::dense policy{.query_block = 1 + trial % 17, .key_block = 1 + (trial * 7) % 61};
    const auto o = fa::attention(policy, q, k, v);
    ASSERT_EQ(o.rows(), L);
    ASSERT_EQ(o.cols(), M);
    EXPECT_LT(relative_error(o, reference_attention(q, k, v)), tolerance<T>())
        << "L=" << L << " S=" << S << " E=" << E << " M=" << M;
  }
}

TYPED_TEST(DenseTyped, MasksAndCausalMatchReference) {
  using T = TypeParam;
  std::mt19937_64 gen(12);
  std::uniform_int_distribution<index> len(1, 200);
  for (int trial = 0; trial < 30; ++trial) {
    const index L = len(gen), S = len(gen), E = 16, M = 24;
    const auto q = gaussian<T>(L, E, 400 + trial), k = gaussian<T>(S, E, 500 + trial),
               v = gaussian<T>(S, M, 600 + trial);
    fa::options opt;
    opt.query_length = std::uniform_int_distribution<index>(0, L)(gen);
    opt.key_length = std::uniform_int_distribution<index>(0, S)(gen);
    opt.causal = trial % 2 == 0;
    opt.scale = 0.3;
    const fa::dense policy{.query_block = 1 + trial % 13, .key_block = 1 + trial % 29};
    const auto o = fa::attention(policy, q, k, v, opt);
    const auto ref = reference_attention(q, k, v, opt);
    EXPECT_LT(relative_error(o, ref), tolerance<T>()) << "trial " << trial;
    // Padded query rows are exactly zero.
    EXPECT_TRUE((o.bottomRows(L - *opt.query_length).array() == T(0)).all());
  }
}

// The fused block kernel takes each value size in the widest packets that divide it (a full
// packet, its half, its quarter, else scalars: flash_block.hpp), so every width below reaches a
// different geometry on some instruction set; lengths cross the panel and row-group edges.
TYPED_TEST(DenseTyped, EveryPacketWidthMatchesReference) {
  using T = TypeParam;
  int trial = 0;
  for (const index M : {1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 32, 48, 64, 80, 96, 128}) {
    for (const bool causal : {false, true}) {
      const index L = 9 + 7 * (trial % 5), S = 31 + 17 * (trial % 4), E = 1 + (5 * trial) % 70;
      const auto q = gaussian<T>(L, E, 700 + trial), k = gaussian<T>(S, E, 800 + trial),
                 v = gaussian<T>(S, M, 900 + trial);
      fa::options opt;
      opt.causal = causal;
      opt.key_length = S - trial % 3;
      const fa::dense policy{.query_block = 8 + trial % 11, .key_block = 16 + 16 * (trial % 3)};
      const auto o = fa::attention(policy, q, k, v, opt);
      EXPECT_LT(relative_error(o, reference_attention(q, k, v, opt)), tolerance<T>())
          << "M=" << M << " causal=" << causal << " L=" << L << " S=" << S << " E=" << E;
      ++trial;
    }
  }
}

// The fused kernel's tiles as plain products (improved_clustered's centroid and member rows):
// score_rows is Q K^T and weighted_values is P V, against float64 products, for every value
// width's geometry, ragged row and key counts, strided inputs, and the same bits on 1 and 2
// threads.
TYPED_TEST(DenseTyped, ScoreRowsAndWeightedValuesAreTheProducts) {
  using T = TypeParam;
  namespace fd = fa::detail;
  int trial = 0;
  for (const index M : {1, 3, 4, 8, 12, 16, 24, 64, 80}) {
    const index rows = 1 + (11 * trial) % 37, keys = 1 + (29 * trial) % 300;
    const index E = 1 + (7 * trial) % 70;
    const auto q = gaussian<T>(rows, E + 3, 40 + trial), k = gaussian<T>(keys + 2, E, 50 + trial);
    const auto v = gaussian<T>(keys, M + 5, 60 + trial);
    const fa::const_view<T> qv(q.leftCols(E)), kv(k), vv(v.leftCols(M));  // strided rows
    const fd::arena::scope scratch;
    const fd::score_rows<T> scores(kv, keys, 2);
    const index lds = scores.stride();
    ASSERT_GE(lds, keys);
    T* const s =
        fd::arena::local().take<T>(static_cast<std::size_t>(scores.padded_rows(rows) * lds));
    T* const s1 =
        fd::arena::local().take<T>(static_cast<std::size_t>(scores.padded_rows(rows) * lds));
    scores(qv, rows, s, 2);
    scores(qv, rows, s1, 1);
    const Eigen::Map<const fa::matrix<T>, 0, Eigen::OuterStride<>> got(s, rows, keys,
                                                                       Eigen::OuterStride<>(lds));
    const Eigen::Map<const fa::matrix<T>, 0, Eigen::OuterStride<>> got1(s1, rows, keys,
                                                                        Eigen::OuterStride<>(lds));
    const matd want =
        qv.template cast<double>() * k.topRows(keys).template cast<double>().transpose();
    EXPECT_LT(relative_error(got, want), tolerance<T>()) << "M=" << M << " trial " << trial;
    EXPECT_EQ(fa::matrix<T>(got), fa::matrix<T>(got1));

    // P: the scores as weights (any values: the product does not normalise).
    fa::matrix<T> out(rows, M), out1(rows, M);
    fd::weighted_values<T>(s, lds, rows, vv, keys, fa::view<T>(out), 2);
    fd::weighted_values<T>(s, lds, rows, vv, keys, fa::view<T>(out1), 1);
    const matd want_out = got.template cast<double>() * vv.template cast<double>();
    EXPECT_LT(relative_error(out, want_out), tolerance<T>()) << "M=" << M << " trial " << trial;
    EXPECT_EQ(out, out1);
    ++trial;
  }
}

// The weighted sum of a few rows and their dots with one vector, which the band exclusions use:
// every width around the packet sizes (four packets, one, scalars), strided rows, no rows at all.
TYPED_TEST(DenseTyped, WeightedRowSumAndRowDotsAreTheProducts) {
  using T = TypeParam;
  for (const index M : {1, 3, 4, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 80, 130})
    for (const index n : {0, 1, 5, 33}) {
      const auto v = gaussian<T>(std::max<index>(n, 1), M + 3, 70 + M);
      const auto w = gaussian<T>(1, std::max<index>(n, 1), 80 + n);
      std::vector<T> out(static_cast<std::size_t>(M), T(7)), added = out;
      fa::detail::weighted_row_sum<T>(w.data(), n, v.data(), v.cols(), M, out.data());
      fa::detail::weighted_row_sum<T>(w.data(), n, v.data(), v.cols(), M, added.data(), true);
      for (index c = 0; c < M; ++c) {
        double want = 0;
        for (index j = 0; j < n; ++j)
          want += static_cast<double>(w(0, j)) * static_cast<double>(v(j, c));
        EXPECT_NEAR(static_cast<double>(out[static_cast<std::size_t>(c)]), want,
                    10 * tolerance<T>() * (1 + std::abs(want)))
            << "M = " << M << ", n = " << n << ", column " << c;
        EXPECT_NEAR(static_cast<double>(added[static_cast<std::size_t>(c)]), 7 + want,
                    10 * tolerance<T>() * (8 + std::abs(want)))
            << "added, M = " << M << ", n = " << n << ", column " << c;
      }
      const auto x = gaussian<T>(1, M, 90 + M);
      std::vector<T> dots(static_cast<std::size_t>(std::max<index>(n, 1)), T(7));
      fa::detail::row_dots<T>(v.data(), n, v.cols(), x.data(), M, dots.data());
      for (index j = 0; j < n; ++j) {
        double want = 0, size = 0;
        for (index c = 0; c < M; ++c) {
          want += static_cast<double>(v(j, c)) * static_cast<double>(x(0, c));
          size += std::abs(static_cast<double>(v(j, c)) * static_cast<double>(x(0, c)));
        }
        EXPECT_NEAR(static_cast<double>(dots[static_cast<std::size_t>(j)]), want,
                    10 * tolerance<T>() * (1 + size))
            << "M = " << M << ", n = " << n << ", row " << j;
      }
    }
}

TYPED_TEST(DenseTyped, PaddedKeysAreNeverRead) {
  using T = TypeParam;
  const index L = 40, S = 70, E = 8, M = 5;
  auto q = gaussian<T>(L, E, 1), k = gaussian<T>(S, E, 2), v = gaussian<T>(S, M, 3);
  const fa::options opt{.key_length = 50};
  const auto clean = fa::attention(fa::dense{.key_block = 16}, q, k, v, opt);
  k.bottomRows(20).setConstant(std::numeric_limits<T>::quiet_NaN());
  v.bottomRows(20).setConstant(std::numeric_limits<T>::infinity());
  const auto dirty = fa::attention(fa::dense{.key_block = 16}, q, k, v, opt);
  EXPECT_TRUE(dirty.allFinite());
  EXPECT_EQ(clean, dirty);
}

TYPED_TEST(DenseTyped, ExtremeLogitsStayFinite) {
  using T = TypeParam;
  const index L = 33, S = 57, E = 4, M = 6;
  auto q = gaussian<T>(L, E, 7), k = gaussian<T>(S, E, 8);
  const auto v = gaussian<T>(S, M, 9);
  // Scores of order 1e4 (and -1e4): a naive exp overflows; the running max must not.
  q *= T(100);
  k *= T(100);
  const fa::options opt{.scale = 1.0};
  const auto o = fa::attention(fa::dense{.query_block = 8, .key_block = 16}, q, k, v, opt);
  ASSERT_TRUE(o.allFinite());
  const auto ref = reference_attention(q, k, v, opt);
  EXPECT_LT(relative_error(o, ref), (std::is_same_v<T, float> ? 1e-4 : 1e-10));
}

TYPED_TEST(DenseTyped, CausalWithoutValidKeysIsZero) {
  using T = TypeParam;
  const auto q = gaussian<T>(9, 4, 1), k = gaussian<T>(6, 4, 2), v = gaussian<T>(6, 3, 3);
  const auto oc = fa::attention(fa::dense{}, q, k, v, {.key_length = 0, .causal = true});
  EXPECT_TRUE((oc.array() == T(0)).all());
}

TYPED_TEST(DenseTyped, SizeOneEverywhere) {
  using T = TypeParam;
  const auto q = gaussian<T>(1, 1, 1), k = gaussian<T>(1, 1, 2), v = gaussian<T>(1, 1, 3);
  const auto o = fa::attention(fa::dense{}, q, k, v);
  EXPECT_NEAR(static_cast<double>(o(0, 0)), static_cast<double>(v(0, 0)), 1e-6);
  const auto oc = fa::attention(fa::dense{}, q, k, v, {.causal = true});
  EXPECT_NEAR(static_cast<double>(oc(0, 0)), static_cast<double>(v(0, 0)), 1e-6);
}

// Only dense defines which rows a non-finite input reaches when the check is off.
TYPED_TEST(DenseTyped, WithoutCheckNaNReachesExactlyTheAffectedRows) {
  using T = TypeParam;
  const index L = 9, S = 8, E = 3, M = 2;
  auto q = gaussian<T>(L, E, 23), k = gaussian<T>(S, E, 24), v = gaussian<T>(S, M, 25);
  fa::options unchecked;
  unchecked.check_finite = false;
  q(4, 1) = std::numeric_limits<T>::quiet_NaN();
  const auto o = fa::attention(fa::dense{}, q, k, v, unchecked);
  for (index i = 0; i < L; ++i) EXPECT_EQ(o.row(i).allFinite(), i != 4) << "row " << i;
  // A NaN value row under causal masking reaches queries i >= 5 only (it enters no other row's
  // softmax). Regression: the fused kernel multiplied the masked keys' zero weights with their
  // values in the diagonal block (0 * NaN = NaN), so rows 0..4 of that query group were NaN too.
  q(4, 1) = T(0);
  v(5, 0) = std::numeric_limits<T>::quiet_NaN();
  unchecked.causal = true;
  const auto oc = fa::attention(fa::dense{}, q, k, v, unchecked);
  for (index i = 0; i < L; ++i) EXPECT_EQ(oc.row(i).allFinite(), i < 5) << "row " << i;
}

// The class of that defect: wherever the non-finite value sits relative to the query groups (8
// rows) and the key panels, for value widths of every packet geometry and the scalar path, under
// causal masks and local bands (both sides, earlier side), and with several query and key blocks,
// it reaches exactly the rows that see its key.
TYPED_TEST(DenseTyped, WithoutCheckANonFiniteValueReachesExactlyTheRowsThatSeeIt) {
  using T = TypeParam;
  const index L = 45, E = 5, w = 3;
  fa::options unchecked;
  unchecked.check_finite = false;
  const auto q = gaussian<T>(L, E, 31), k = gaussian<T>(L, E, 32);
  for (const index M : {2, 4, 8, 16, 24, 32}) {
    auto v = gaussian<T>(L, M, 33);
    for (const index j : {0, 1, 5, 7, 8, 9, 15, 16, 31, 32, 33, 40, 44}) {
      const T kept = v(j, M - 1);
      v(j, M - 1) =
          j % 2 ? std::numeric_limits<T>::quiet_NaN() : std::numeric_limits<T>::infinity();
      for (const bool causal : {false, true}) {
        unchecked.causal = causal;
        const auto od =
            fa::attention(fa::dense{.query_block = 16, .key_block = 32}, q, k, v, unchecked);
        const auto ol = fa::attention(fa::local{.window = w}, q, k, v, unchecked);
        for (index i = 0; i < L; ++i) {
          const bool sees_dense = !causal || j <= i;
          const bool sees_local = causal ? (j <= i && i - j <= w) : std::abs(i - j) <= w;
          EXPECT_EQ(od.row(i).allFinite(), !sees_dense)
              << "dense, M = " << M << ", key " << j << ", row " << i << ", causal " << causal;
          EXPECT_EQ(ol.row(i).allFinite(), !sees_local)
              << "local, M = " << M << ", key " << j << ", row " << i << ", causal " << causal;
        }
      }
      v(j, M - 1) = kept;
    }
  }
}

TEST(Dense, FloatAgreesWithDouble) {
  const index L = 150, S = 190, E = 64, M = 64;
  const auto q = gaussian<double>(L, E, 21), k = gaussian<double>(S, E, 22),
             v = gaussian<double>(S, M, 23);
  const auto od = fa::attention(fa::dense{}, q, k, v);
  const auto of = fa::attention(fa::dense{}, q.cast<float>().eval(), k.cast<float>().eval(),
                                v.cast<float>().eval());
  EXPECT_LT(relative_error(of, od), 1e-5);
}

TEST(Dense, ColumnMajorInputsGiveTheSameResult) {
  const Eigen::MatrixXf q = Eigen::MatrixXf::Random(20, 8), k = Eigen::MatrixXf::Random(30, 8),
                        v = Eigen::MatrixXf::Random(30, 5);
  const Eigen::MatrixXf o = fa::attention(fa::dense{}, q, k, v);
  const fa::matrix<float> qr = q, kr = k, vr = v;
  const fa::matrix<float> orow = fa::attention(fa::dense{}, qr, kr, vr);
  EXPECT_EQ(fa::matrix<float>(o), orow);
}

TEST(Dense, WritesIntoCallerBufferAndStridedViews) {
  const auto q = gaussian<float>(12, 8, 1), k = gaussian<float>(15, 8, 2),
             v = gaussian<float>(15, 4, 3);
  const auto expected = fa::attention(fa::dense{}, q, k, v);
  // A row-major 12 x 10 buffer; the result goes into columns 3..6 through a strided view.
  fa::matrix<float> buffer = fa::matrix<float>::Constant(12, 10, -7.f);
  fa::attention(fa::dense{}, q, k, v, buffer.middleCols(3, 4));
  EXPECT_EQ(fa::matrix<float>(buffer.middleCols(3, 4)), expected);
  EXPECT_TRUE((buffer.leftCols(3).array() == -7.f).all());
  EXPECT_TRUE((buffer.rightCols(3).array() == -7.f).all());
}

TEST(Dense, BlockSizesDoNotChangeTheResultBeyondRounding) {
  const auto q = gaussian<double>(97, 16, 5), k = gaussian<double>(131, 16, 6),
             v = gaussian<double>(131, 16, 7);
  const auto a =
      fa::attention(fa::dense{.query_block = 1, .key_block = 1}, q, k, v, {.causal = true});
  const auto b =
      fa::attention(fa::dense{.query_block = 500, .key_block = 500}, q, k, v, {.causal = true});
  EXPECT_LT(relative_error(a, b), 1e-13);
}

}  // namespace
