// The front door: the concept, option validation, error messages, and a user-written policy.
#include <gtest/gtest.h>

#include <fastattn/fastattn.hpp>

#include "reference.hpp"

namespace fa = fastattn;
using fa::testing::gaussian;

namespace {

using fa::index;

// A user-written policy: attention restricted to each query's own key position window of width
// `radius` (a band), implemented naively. It knows nothing of fastattn's internals.
struct band_attention {
  static constexpr std::string_view name = "band";
  static constexpr bool is_exact = false;
  static constexpr bool supports_causal = false;
  index radius = 2;

  template <class T>
  void compute(fa::const_view<T> q, fa::const_view<T> k, fa::const_view<T> v, fa::view<T> out,
               const fa::context& ctx) const {
    out.setZero();
    for (index i = 0; i < ctx.query_length; ++i) {
      const index lo = std::max<index>(0, i - radius);
      const index hi = std::min(ctx.key_length, i + radius + 1);
      if (lo >= hi) continue;
      Eigen::Matrix<T, Eigen::Dynamic, 1> s =
          (k.middleRows(lo, hi - lo) * q.row(i).transpose()) * static_cast<T>(ctx.scale);
      s = (s.array() - s.maxCoeff()).exp();
      s /= s.sum();
      out.row(i) = s.transpose() * v.middleRows(lo, hi - lo);
    }
  }
};

static_assert(fa::attention_policy<fa::dense>);
static_assert(fa::attention_policy<band_attention>);
static_assert(!fa::attention_policy<int>);
struct missing_name {
  [[maybe_unused]] static constexpr bool is_exact = true;
  [[maybe_unused]] static constexpr bool supports_causal = true;
  template <class T>
  void compute(fa::const_view<T>, fa::const_view<T>, fa::const_view<T>, fa::view<T>,
               const fa::context&) const {}
};
static_assert(!fa::attention_policy<missing_name>);

TEST(CustomPolicy, PlugsIntoTheFrontDoor) {
  const auto q = gaussian<double>(10, 3, 1), k = gaussian<double>(10, 3, 2),
             v = gaussian<double>(10, 2, 3);
  // With a radius covering every key, band attention is exact attention.
  const auto wide = fa::attention(band_attention{.radius = 100}, q, k, v);
  EXPECT_LT(fa::testing::relative_error(wide, fa::attention(fa::dense{}, q, k, v)), 1e-12);
  // With radius 0 each query attends only to its own position.
  const auto narrow = fa::attention(band_attention{.radius = 0}, q, k, v);
  EXPECT_LT((narrow - v).norm(), 1e-12);
}

TEST(CustomPolicy, CausalIsRefusedWhenUnsupported) {
  const auto q = gaussian<float>(4, 3, 1);
  try {
    (void)fa::attention(band_attention{}, q, q, q, {.causal = true});
    FAIL() << "expected invalid_argument";
  } catch (const fa::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("'band'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("causal"), std::string::npos) << e.what();
  }
}

// Each bad input throws fastattn::invalid_argument whose message names the argument and values.
void expect_error(const std::function<void()>& call, std::initializer_list<const char*> words) {
  try {
    call();
    ADD_FAILURE() << "expected fastattn::invalid_argument";
  } catch (const fa::invalid_argument& e) {
    const std::string what = e.what();
    for (const char* w : words) EXPECT_NE(what.find(w), std::string::npos) << what;
    // It is also a std::invalid_argument.
    EXPECT_NO_THROW((void)dynamic_cast<const std::invalid_argument&>(e));
  }
}

TEST(Errors, FeatureDimensionMismatch) {
  const auto q = gaussian<float>(5, 4, 1), k = gaussian<float>(6, 3, 2),
             v = gaussian<float>(6, 2, 3);
  expect_error([&] { (void)fa::attention(fa::dense{}, q, k, v); }, {"(E)", "5 x 4", "6 x 3"});
}

TEST(Errors, ValueRowsMismatch) {
  const auto q = gaussian<float>(5, 4, 1), k = gaussian<float>(6, 4, 2),
             v = gaussian<float>(7, 2, 3);
  expect_error([&] { (void)fa::attention(fa::dense{}, q, k, v); }, {"v must have", "6", "7"});
}

TEST(Errors, EmptyFeatureDimension) {
  const fa::matrix<float> q(5, 0), k(6, 0), v(6, 2);
  expect_error([&] { (void)fa::attention(fa::dense{}, q, k, v); }, {"E = 0"});
}

TEST(Errors, QueryLengthOutOfRange) {
  const auto q = gaussian<float>(5, 4, 1), k = gaussian<float>(6, 4, 2),
             v = gaussian<float>(6, 2, 3);
  expect_error([&] { (void)fa::attention(fa::dense{}, q, k, v, {.query_length = 6}); },
               {"query_length", "L = 5", "6"});
  expect_error([&] { (void)fa::attention(fa::dense{}, q, k, v, {.query_length = -1}); },
               {"query_length", "-1"});
}

TEST(Errors, KeyLengthOutOfRange) {
  const auto q = gaussian<float>(5, 4, 1), k = gaussian<float>(6, 4, 2),
             v = gaussian<float>(6, 2, 3);
  expect_error([&] { (void)fa::attention(fa::dense{}, q, k, v, {.key_length = 7}); },
               {"key_length", "S = 6", "7"});
  expect_error([&] { (void)fa::attention(fa::dense{}, q, k, v, {.key_length = -2}); },
               {"key_length", "-2"});
}

TEST(Errors, NonFiniteScale) {
  const auto q = gaussian<float>(5, 4, 1);
  expect_error([&] { (void)fa::attention(fa::dense{}, q, q, q, {.scale = std::nan("")}); },
               {"scale"});
  expect_error([&] { (void)fa::attention(fa::dense{}, q, q, q, {.scale = HUGE_VAL}); }, {"scale"});
}

TEST(Errors, OutputShape) {
  const auto q = gaussian<float>(5, 4, 1), k = gaussian<float>(6, 4, 2),
             v = gaussian<float>(6, 2, 3);
  fa::matrix<float> out(5, 3);
  expect_error([&] { fa::attention(fa::dense{}, q, k, v, out); }, {"out", "5 x 2", "5 x 3"});
}

TEST(Errors, BadBlockSizesNameTheKnob) {
  const auto q = gaussian<float>(5, 4, 1);
  expect_error([&] { (void)fa::attention(fa::dense{.key_block = 0}, q, q, q); }, {"key_block = 0"});
}

TEST(Options, EmptyInputsAreDefined) {
  const fa::matrix<float> q(0, 4), k(0, 4), v(0, 3);
  const auto o = fa::attention(fa::dense{}, q, k, v);
  EXPECT_EQ(o.rows(), 0);
  EXPECT_EQ(o.cols(), 3);
  const auto q1 = gaussian<float>(3, 4, 1);
  const auto o1 = fa::attention(fa::dense{}, q1, k, v);  // no keys at all
  EXPECT_TRUE((o1.array() == 0.f).all());
}

TEST(Options, ScaleDefaultsToInverseSqrtE) {
  const auto q = gaussian<double>(7, 9, 1), k = gaussian<double>(8, 9, 2),
             v = gaussian<double>(8, 3, 3);
  const auto a = fa::attention(fa::dense{}, q, k, v);
  const auto b = fa::attention(fa::dense{}, q, k, v, {.scale = 1.0 / 3.0});
  EXPECT_LT(fa::testing::relative_error(a, b), 1e-15);
}

}  // namespace

namespace {

using fa::index;

TEST(NonFinite, RejectedByDefaultWithTheLocation) {
  auto q = gaussian<float>(6, 4, 1), k = gaussian<float>(7, 4, 2), v = gaussian<float>(7, 3, 3);
  q(3, 1) = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { (void)fa::attention(fa::dense{}, q, k, v); },
               {"q has a non-finite", "row 3", "column 1", "check_finite"});
  q(3, 1) = 0.f;
  v(6, 2) = std::numeric_limits<float>::infinity();
  expect_error([&] { (void)fa::attention(fa::dense{}, q, k, v); },
               {"v has a non-finite", "row 6", "column 2"});
  // Padding is never read, so it may hold anything.
  EXPECT_NO_THROW((void)fa::attention(fa::dense{}, q, k, v, {.key_length = 6}));
  k(0, 0) = -std::numeric_limits<float>::infinity();
  expect_error([&] { (void)fa::attention(fa::dense{}, q, k, v, {.key_length = 6}); },
               {"k has a non-finite", "row 0"});
}

TEST(NonFinite, DensePropagatesToExactlyTheAffectedRowsWhenUnchecked) {
  auto q = gaussian<double>(10, 4, 1), k = gaussian<double>(10, 4, 2);
  const auto v = gaussian<double>(10, 3, 3);
  q(2, 0) = std::numeric_limits<double>::quiet_NaN();
  k(5, 1) = std::numeric_limits<double>::quiet_NaN();
  const auto o = fa::attention(fa::dense{.query_block = 3, .key_block = 4}, q, k, v,
                               {.causal = true, .check_finite = false});
  // Causal: rows before 5 never see key 5; row 2 has a NaN query; every row from 5 on sees key 5.
  for (index i = 0; i < 10; ++i) {
    const bool affected = i == 2 || i >= 5;
    EXPECT_EQ(o.row(i).allFinite(), !affected) << "row " << i;
  }
}

}  // namespace
