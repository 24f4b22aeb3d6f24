// The front door: the concept, a user-written policy, option validation and its messages, and
// what attention() and multihead_attention() own for every kernel (typed over fastattn::kernels
// and the fifth kernel): knobs validated before any work, padded rows zero whatever the output
// held, Lv = 0 / Sv = 0 giving zeros without running the kernel, causal only where supported.
#include "common.hpp"

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

namespace {

using fa::index;
using namespace fa::testing;
using user_kernels::key_sample;

static_assert(fa::attention_policy<fa::dense>);
static_assert(fa::attention_policy<key_sample> && fa::has_knobs<key_sample>);
static_assert(fa::attention_policy<counting<fa::smyrf>>);
static_assert(!fa::attention_policy<int>);
struct missing_name {
  [[maybe_unused]] static constexpr bool is_exact = true;
  [[maybe_unused]] static constexpr bool supports_causal = true;
  template <class T>
  void compute(fa::const_view<T>, fa::const_view<T>, fa::const_view<T>, fa::view<T>,
               const fa::context&) const {}
};
static_assert(!fa::attention_policy<missing_name>);
static_assert(std::is_base_of_v<std::invalid_argument, fa::invalid_argument>);
// Every kernel the suites run satisfies the concept.
static_assert([] {
  bool all = true;
  fa::testing::tested_kernels::for_each(
      [&](auto id) { all = all && fa::attention_policy<typename decltype(id)::type>; });
  return all;
}());

TEST(CustomPolicy, PlugsIntoTheFrontDoor) {
  const auto q = gaussian<double>(10, 3, 1), k = gaussian<double>(12, 3, 2),
             v = gaussian<double>(12, 2, 3);
  // Sampling every key is exact attention.
  const auto all = fa::attention(key_sample{.keys = 12}, q, k, v);
  EXPECT_LT(fa::testing::relative_error(all, fa::attention(fa::dense{}, q, k, v)), 1e-12);
  // One sampled key: every row is that key's value, exactly.
  const auto one = fa::attention(key_sample{.keys = 1, .seed = 3}, q, k, v);
  index match = -1;
  for (index j = 0; j < 12; ++j)
    if (one.row(0) == v.row(j)) match = j;
  ASSERT_GE(match, 0);
  for (index i = 0; i < 10; ++i) EXPECT_EQ(one.row(i), v.row(match)) << "row " << i;
}

TEST(CustomPolicy, CausalIsRefusedWhenUnsupported) {
  const auto q = gaussian<float>(4, 3, 1);
  EXPECT_TRUE(
      throws_invalid_argument([&] { (void)fa::attention(key_sample{}, q, q, q, {.causal = true}); },
                              "causal", {"'key_sample'", "supports_causal"}));
}

TEST(Errors, FeatureDimensionMismatch) {
  const auto q = gaussian<float>(5, 4, 1), k = gaussian<float>(6, 3, 2),
             v = gaussian<float>(6, 2, 3);
  EXPECT_TRUE(throws_invalid_argument([&] { (void)fa::attention(fa::dense{}, q, k, v); }, "k",
                                      {"(E)", "5 x 4", "6 x 3"}));
}

TEST(Errors, ValueRowsMismatch) {
  const auto q = gaussian<float>(5, 4, 1), k = gaussian<float>(6, 4, 2),
             v = gaussian<float>(7, 2, 3);
  EXPECT_TRUE(throws_invalid_argument([&] { (void)fa::attention(fa::dense{}, q, k, v); }, "v",
                                      {"v must have", "6", "7"}));
}

TEST(Errors, EmptyFeatureDimension) {
  const fa::matrix<float> q(5, 0), k(6, 0), v(6, 2);
  EXPECT_TRUE(
      throws_invalid_argument([&] { (void)fa::attention(fa::dense{}, q, k, v); }, "q", {"E = 0"}));
}

TEST(Errors, QueryLengthOutOfRange) {
  const auto q = gaussian<float>(5, 4, 1), k = gaussian<float>(6, 4, 2),
             v = gaussian<float>(6, 2, 3);
  EXPECT_TRUE(throws_invalid_argument(
      [&] { (void)fa::attention(fa::dense{}, q, k, v, {.query_length = 6}); }, "query_length",
      {"query_length must be in [0, L = 5], got 6"}));
  EXPECT_TRUE(throws_invalid_argument(
      [&] { (void)fa::attention(fa::dense{}, q, k, v, {.query_length = -1}); }, "query_length",
      {"got -1"}));
}

TEST(Errors, KeyLengthOutOfRange) {
  const auto q = gaussian<float>(5, 4, 1), k = gaussian<float>(6, 4, 2),
             v = gaussian<float>(6, 2, 3);
  EXPECT_TRUE(
      throws_invalid_argument([&] { (void)fa::attention(fa::dense{}, q, k, v, {.key_length = 7}); },
                              "key_length", {"key_length must be in [0, S = 6], got 7"}));
  EXPECT_TRUE(throws_invalid_argument(
      [&] { (void)fa::attention(fa::dense{}, q, k, v, {.key_length = -2}); }, "key_length",
      {"got -2"}));
}

TEST(Errors, NonFiniteScale) {
  const auto q = gaussian<float>(5, 4, 1);
  EXPECT_TRUE(throws_invalid_argument(
      [&] { (void)fa::attention(fa::dense{}, q, q, q, {.scale = std::nan("")}); }, "scale",
      {"finite", "float", "nan"}));
  EXPECT_TRUE(throws_invalid_argument(
      [&] { (void)fa::attention(fa::dense{}, q, q, q, {.scale = HUGE_VAL}); }, "scale",
      {"finite", "inf"}));
  // Finite in double, not representable in float.
  EXPECT_TRUE(
      throws_invalid_argument([&] { (void)fa::attention(fa::dense{}, q, q, q, {.scale = 1e39}); },
                              "scale", {"float", "3.4028235e+38", "1e+39"}));
}

TEST(Errors, OutputShape) {
  const auto q = gaussian<float>(5, 4, 1), k = gaussian<float>(6, 4, 2),
             v = gaussian<float>(6, 2, 3);
  fa::matrix<float> out(5, 3);
  EXPECT_TRUE(throws_invalid_argument([&] { fa::attention(fa::dense{}, q, k, v, out); }, "out",
                                      {"5 x 2", "5 x 3"}));
}

// The knob messages, verbatim for one knob of each kernel: "<kernel>: <knob> must be in [min,
// max], got <value>", and argument() is the knob.
TEST(Errors, KnobMessagesNameTheKernelTheKnobItsRangeAndTheValue) {
  const auto q = gaussian<float>(5, 4, 1);
  auto message = [&](const auto& policy) {
    return fa::testing::error_of([&] { (void)fa::attention(policy, q, q, q); }).message();
  };
  EXPECT_EQ(message(fa::dense{.key_block = 0}), "dense: key_block must be in [1, 65536], got 0");
  EXPECT_EQ(message(fa::local{.window = -1}), "local: window must be in [0, 1073741824], got -1");
  EXPECT_EQ(message(fa::clustered{.bits = 65}), "clustered: bits must be in [1, 64], got 65");
  EXPECT_EQ(message(fa::improved_clustered{.topk = -5}),
            "improved_clustered: topk must be in [1, 9223372036854775807], got -5");
  EXPECT_EQ(message(fa::smyrf{.hashes = 0}), "smyrf: hashes must be in [1, 1024], got 0");
  EXPECT_EQ(message(fa::smyrf{.r = std::numeric_limits<double>::infinity()}),
            "smyrf: r must be in [2.2250738585072014e-308, 1.7976931348623157e+308], got inf");
  EXPECT_EQ(message(key_sample{.keys = 0}), "key_sample: keys must be in [1, 2147483648], got 0");
  // A check across knobs (the policy's validate()) names the knob it rejects, with the values.
  EXPECT_TRUE(throws_invalid_argument(
      [&] { (void)fa::attention(fa::dense{.query_block = 4096, .key_block = 8192}, q, q, q); },
      "key_block", {"dense: ", "4096 * 8192"}));
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

// A policy that records what the front door told it about the inputs' finiteness.
struct finite_recorder {
  static constexpr std::string_view name = "finite_recorder";
  static constexpr bool is_exact = false;
  static constexpr bool supports_causal = true;
  bool* checked;
  template <class T>
  void compute(fa::const_view<T>, fa::const_view<T>, fa::const_view<T>, fa::view<T> out,
               const fa::context& ctx) const {
    *checked = ctx.checked_finite;
    out.topRows(ctx.query_length).setZero();
  }
};

// context::checked_finite (kernels then skip finiteness checks of their own, which keep a NaN
// value reaching the rows that weigh it by zero) is set when the front door has checked the
// values, through attention() and multihead_attention(), and only then.
TEST(NonFinite, KernelsAreToldOnlyWhenTheValuesWereChecked) {
  const auto q = gaussian<float>(6, 4, 1), k = gaussian<float>(7, 4, 2),
             v = gaussian<float>(7, 3, 3);
  for (const bool check : {true, false}) {
    bool checked = !check;
    (void)fa::attention(finite_recorder{&checked}, q, k, v, {.check_finite = check});
    EXPECT_EQ(checked, check) << "attention, check_finite " << check;
    checked = !check;
    std::vector<float> out(6 * 3);
    fa::multihead_options opt;
    opt.common.check_finite = check;
    fa::multihead_attention(finite_recorder{&checked},
                            fa::tensor_view<const float>{q.data(), 1, 6, 1, 4},
                            fa::tensor_view<const float>{k.data(), 1, 7, 1, 4},
                            fa::tensor_view<const float>{v.data(), 1, 7, 1, 3},
                            fa::tensor_view<float>{out.data(), 1, 6, 1, 3}, opt);
    EXPECT_EQ(checked, check) << "multihead_attention, check_finite " << check;
  }
}

TEST(NonFinite, RejectedByDefaultWithTheLocation) {
  auto q = gaussian<float>(6, 4, 1), k = gaussian<float>(7, 4, 2), v = gaussian<float>(7, 3, 3);
  q(3, 1) = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(throws_invalid_argument([&] { (void)fa::attention(fa::dense{}, q, k, v); }, "q",
                                      {"q has a non-finite value (nan)", "row 3", "column 1"}));
  q(3, 1) = 0.f;
  v(6, 2) = std::numeric_limits<float>::infinity();
  EXPECT_TRUE(throws_invalid_argument([&] { (void)fa::attention(fa::dense{}, q, k, v); }, "v",
                                      {"v has a non-finite value (inf)", "row 6", "column 2"}));
  // Padding is never read, so it may hold anything.
  EXPECT_NO_THROW((void)fa::attention(fa::dense{}, q, k, v, {.key_length = 6}));
  k(0, 0) = -std::numeric_limits<float>::infinity();
  EXPECT_TRUE(
      throws_invalid_argument([&] { (void)fa::attention(fa::dense{}, q, k, v, {.key_length = 6}); },
                              "k", {"k has a non-finite value (-inf)", "row 0"}));
}

// The check reads rows by packets, four at a time, then single packets, then a scalar tail, in
// chunks of 4096 rows: a non-finite value is found, with its place, wherever it falls in that
// geometry (every column of widths around the packet sizes, rows in the second chunk, strided
// views), and the magnitude bound sees the largest |x| wherever it is.
template <class T>
void check_every_place() {
  constexpr T inf = std::numeric_limits<T>::infinity();
  for (const index E : {1, 3, 8, 15, 16, 17, 31, 33, 64, 65, 80, 127}) {
    for (const index L : {5, 4099}) {
      fa::matrix<T> wide = fa::matrix<T>::Zero(L, E + 3);  // a view with a wider stride
      auto q = wide.leftCols(E);
      q.setConstant(T(0.5));
      const fa::matrix<T> k = fa::matrix<T>::Constant(4, E, T(0.5)), v = k;
      const index r = L - 2;
      for (index c = 0; c < E; ++c) {
        // (Places printed into char buffers: std::string concatenation here made g++ 12 report
        // a false -Warray-bounds in the suite-name code of the precompiled header.)
        char row_text[32], column_text[32];
        std::snprintf(row_text, sizeof row_text, "row %lld", static_cast<long long>(r));
        std::snprintf(column_text, sizeof column_text, "column %lld", static_cast<long long>(c));
        for (const T bad : {std::numeric_limits<T>::quiet_NaN(), inf, -inf}) {
          q(r, c) = bad;
          EXPECT_TRUE(throws_invalid_argument(
              [&] { (void)fa::attention(fa::dense{}, fa::const_view<T>(q), k, v); }, "q",
              {"q has a non-finite value", row_text, column_text}))
              << "E = " << E << ", L = " << L << ", column " << c;
        }
        // The largest magnitude, here: scores of max|q| max|k| E scale overflow.
        q(r, c) = -std::numeric_limits<T>::max() / 2;
        EXPECT_TRUE(throws_invalid_argument(
            [&] { (void)fa::attention(fa::dense{}, fa::const_view<T>(q), k, v); }, "q",
            {"the scores could overflow"}))
            << "E = " << E << ", L = " << L << ", column " << c;
        q(r, c) = T(0.5);
      }
    }
  }
}

TEST(NonFinite, FoundAtEveryColumnOfThePacketGeometry) {
  check_every_place<float>();
  check_every_place<double>();
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

// ---------------------------------------------------------------------------------------------
// Typed over every kernel: what the front door and the multi-head driver own.

template <class P>
class FrontDoorKnobs : public ::testing::Test {};
TYPED_TEST_SUITE(FrontDoorKnobs, fa::testing::kernel_types<fa::testing::tested_kernels>::type,
                 fa::testing::kernel_names);

// Values of a knob outside [min, max] (none for a bool or a knob that takes every value): the
// neighbours of the bounds, and for a floating knob NaN and the infinities beyond them.
template <class V>
std::vector<V> invalid_values(V min, V max) {
  std::vector<V> out;
  using limits = std::numeric_limits<V>;
  if constexpr (std::is_floating_point_v<V>) {
    out.push_back(limits::quiet_NaN());
    if (min > limits::lowest()) out.push_back(std::nextafter(min, -limits::infinity()));
    if (max < limits::max()) out.push_back(std::nextafter(max, limits::infinity()));
    if (min > -limits::infinity()) out.push_back(-limits::infinity());
    if (max < limits::infinity()) out.push_back(limits::infinity());
  } else if constexpr (!std::is_same_v<V, bool>) {
    if (min > limits::min()) out.push_back(static_cast<V>(min - 1));
    if (max < limits::max()) out.push_back(static_cast<V>(max + 1));
  }
  return out;
}

// Calls f(policy with one knob set to an invalid value, the knob's name) for every such value.
template <class P, class F>
int for_each_bad_knob(F&& f) {
  int cases = 0;
  fa::for_each_knob<P>([&](const auto& knob) {
    using V = typename std::decay_t<decltype(knob)>::value_type;
    for (const V value : invalid_values<V>(knob.min, knob.max)) {
      P policy = kernel_traits<P>::approx();
      knob.get(policy) = value;
      SCOPED_TRACE(::testing::Message()
                   << P::name << "." << knob.name << " = " << fa::detail::to_text(value));
      f(policy, knob.name);
      ++cases;
    }
  });
  return cases;
}

TYPED_TEST(FrontDoorKnobs, BoundsOfEveryKnobAreAcceptedAndTheirNeighboursRefused) {
  using P = TypeParam;
  fa::for_each_knob<P>([&](const auto& knob) {
    for (const auto value : {knob.min, knob.max}) {
      P policy{};
      knob.get(policy) = value;
      EXPECT_NO_THROW(fa::validate(policy)) << knob.name << " = " << fa::detail::to_text(value);
    }
  });
  const int cases = for_each_bad_knob<P>([](const P& policy, std::string_view knob) {
    // Appended piece by piece: GCC 12's -Warray-bounds misfires on a chain of + here.
    std::string prefix(P::name);
    prefix.append(": ").append(knob).append(" must be in [");
    EXPECT_TRUE(throws_invalid_argument([&] { fa::validate(policy); }, knob, {prefix, "], got "}));
  });
  EXPECT_GT(cases, 0) << "every kernel has a knob with a bounded range";
}

TYPED_TEST(FrontDoorKnobs, KnobsAreValidatedBeforeAnyWork) {
  using P = TypeParam;
  const auto q = gaussian<float>(12, 4, 1), k = gaussian<float>(10, 4, 2),
             v = gaussian<float>(10, 3, 3);
  for_each_bad_knob<P>([&](const P& policy, std::string_view knob) {
    const counting<P> counted{policy};
    counting<P>::calls = 0;
    fa::matrix<float> out = fa::matrix<float>::Constant(12, 3, -5.f);
    EXPECT_TRUE(throws_invalid_argument(
        [&] { fa::attention(counted, q, k, v, fa::view<float>(out), {.query_length = 9}); }, knob));
    // Even when there is nothing to compute.
    EXPECT_TRUE(throws_invalid_argument(
        [&] { (void)fa::attention(counted, q, k, v, {.key_length = 0, .query_length = 0}); },
        knob));
    EXPECT_EQ(counting<P>::calls.load(), 0);
    EXPECT_TRUE((out.array() == -5.f).all()) << "out was written before the knob was checked";
  });
}

TYPED_TEST(FrontDoorKnobs, BadKnobThrowsFromMultiheadBeforeAnyHeadRuns) {
  using P = TypeParam;
  const index B = 2, L = 9, S = 11, H = 3, E = 4, M = 2;
  const auto q = gaussian<float>(B * L * H, E, 4), k = gaussian<float>(B * S * H, E, 5),
             v = gaussian<float>(B * S * H, M, 6);
  const fa::tensor_view<const float> tq{q.data(), B, L, H, E}, tk{k.data(), B, S, H, E},
      tv{v.data(), B, S, H, M};
  fa::matrix<float> out = fa::matrix<float>::Constant(B * L * H, M, -5.f);
  const fa::tensor_view<float> to{out.data(), B, L, H, M};
  fa::multihead_options opt;
  opt.threads = 2;
  // The counter counts: a valid call runs every head once.
  counting<P>::calls = 0;
  fa::multihead_attention(counting<P>{kernel_traits<P>::approx()}, tq, tk, tv, to, opt);
  EXPECT_EQ(counting<P>::calls.load(), B * H);
  out.setConstant(-5.f);
  for_each_bad_knob<P>([&](const P& policy, std::string_view knob) {
    counting<P>::calls = 0;
    const auto e = fa::testing::error_of(
        [&] { fa::multihead_attention(counting<P>{policy}, tq, tk, tv, to, opt); });
    EXPECT_EQ(e.argument(), knob) << e.what();
    EXPECT_FALSE(e.sample().has_value()) << e.what();  // a knob is no sample's or head's fault
    EXPECT_FALSE(e.head().has_value()) << e.what();
    EXPECT_EQ(counting<P>::calls.load(), 0);
    EXPECT_TRUE((out.array() == -5.f).all()) << "a head ran before the knob was checked";
  });
}

// causal_capable: supports_causal, or a log-sum-exp from which the front door builds causal
// attention.
TYPED_TEST(FrontDoorKnobs, CausalOnlyWhereSupported) {
  using P = TypeParam;
  const auto in = fa::testing::make_peaked<double>(70, 70, 6, 5, 7, 4);
  if constexpr (fa::causal_capable<P>) {
    const fa::options causal{.causal = true};
    const auto o = fa::attention(kernel_traits<P>::approx(), in.q, in.k, in.v, causal);
    EXPECT_TRUE(o.allFinite());
    if (const auto exact = kernel_traits<P>::exact(70, 70)) {
      const auto oe = fa::attention(*exact, in.q, in.k, in.v, causal);
      EXPECT_LT(fa::testing::relative_error(
                    oe, fa::testing::reference_attention(in.q, in.k, in.v, causal)),
                fa::testing::tolerance<double>());
    }
  } else {
    EXPECT_TRUE(throws_invalid_argument(
        [&] {
          (void)fa::attention(kernel_traits<P>::approx(), in.q, in.k, in.v, {.causal = true});
        },
        "causal", {"'" + std::string(P::name) + "'", "supports_causal"}));
  }
}

template <class Case>
class FrontDoorCases : public ::testing::Test {};
TYPED_TEST_SUITE(FrontDoorCases, fa::testing::kernel_cases<fa::testing::tested_kernels>::type,
                 fa::testing::kernel_names);

TYPED_TEST(FrontDoorCases, PaddedRowsAreZeroWhateverOutHeld) {
  using P = typename TypeParam::policy;
  using T = typename TypeParam::scalar;
  const index L = 23, S = 19, E = 5, M = 4;
  const auto in = fa::testing::make_peaked<T>(L, S, E, M, 8, 3);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  for (const index Lv : {index{1}, index{17}, L}) {
    fa::matrix<T> out = fa::matrix<T>::Constant(L, M, nan);
    fa::attention(kernel_traits<P>::approx(), in.q, in.k, in.v, fa::view<T>(out),
                  {.key_length = 13, .query_length = Lv});
    EXPECT_TRUE(out.topRows(Lv).allFinite()) << "Lv = " << Lv;
    EXPECT_TRUE((out.bottomRows(L - Lv).array() == T(0)).all()) << "Lv = " << Lv;
  }
  // Through the multi-head driver, with per-sample lengths.
  const index B = 2, H = 2;
  const auto q = gaussian<T>(B * L * H, E, 9), k = gaussian<T>(B * S * H, E, 10),
             v = gaussian<T>(B * S * H, M, 11);
  fa::matrix<T> out = fa::matrix<T>::Constant(B * L * H, M, nan);
  const std::vector<index> query_lengths{5, L}, key_lengths{S, 3};
  fa::multihead_options opt;
  opt.query_lengths = query_lengths;
  opt.key_lengths = key_lengths;
  const fa::tensor_view<T> to{out.data(), B, L, H, M};
  fa::multihead_attention(kernel_traits<P>::approx(),
                          fa::tensor_view<const T>{q.data(), B, L, H, E},
                          fa::tensor_view<const T>{k.data(), B, S, H, E},
                          fa::tensor_view<const T>{v.data(), B, S, H, M}, to, opt);
  for (index b = 0; b < B; ++b)
    for (index h = 0; h < H; ++h) {
      const auto o = fa::testing::copy_head(to, b, h);
      const index Lv = query_lengths[static_cast<std::size_t>(b)];
      EXPECT_TRUE(o.topRows(Lv).allFinite()) << "b " << b << " h " << h;
      EXPECT_TRUE((o.bottomRows(L - Lv).array() == T(0)).all()) << "b " << b << " h " << h;
    }
}

TYPED_TEST(FrontDoorCases, NoValidQueryOrKeyGivesZerosWithoutRunningTheKernel) {
  using P = typename TypeParam::policy;
  using T = typename TypeParam::scalar;
  const counting<P> counted{kernel_traits<P>::approx()};
  const auto q = gaussian<T>(9, 4, 12), k = gaussian<T>(7, 4, 13), v = gaussian<T>(7, 3, 14);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const fa::options empty_cases[] = {
      {.query_length = 0}, {.key_length = 0}, {.key_length = 0, .query_length = 0}};
  for (const fa::options& opt : empty_cases) {
    for (const bool real : {false, true}) {
      counting<P>::calls = 0;
      fa::matrix<T> out = fa::matrix<T>::Constant(9, 3, nan);
      if (real)
        fa::attention(kernel_traits<P>::approx(), q, k, v, fa::view<T>(out), opt);
      else
        fa::attention(counted, q, k, v, fa::view<T>(out), opt);
      EXPECT_TRUE((out.array() == T(0)).all())
          << "Lv " << opt.query_length.value_or(9) << " Sv " << opt.key_length.value_or(7);
      EXPECT_EQ(counting<P>::calls.load(), 0);
    }
  }
  // Empty shapes: L = 0 gives a 0 x M result, S = 0 zeros; neither runs the kernel.
  counting<P>::calls = 0;
  const fa::matrix<T> none(0, 4), no_values(0, 3);
  EXPECT_EQ(fa::attention(counted, none, k, v).rows(), 0);
  EXPECT_TRUE((fa::attention(counted, q, none, no_values).array() == T(0)).all());
  EXPECT_EQ(counting<P>::calls.load(), 0);
  // A valid call does run it, once.
  (void)fa::attention(counted, q, k, v, {.key_length = 1, .query_length = 1});
  EXPECT_EQ(counting<P>::calls.load(), 1);
  // Multi-head: the samples without a valid query or key run no head.
  const index B = 3, H = 2, L = 6, S = 5, E = 4, M = 3;
  const auto mq = gaussian<T>(B * L * H, E, 15), mk = gaussian<T>(B * S * H, E, 16),
             mv = gaussian<T>(B * S * H, M, 17);
  fa::matrix<T> out = fa::matrix<T>::Constant(B * L * H, M, nan);
  const std::vector<index> query_lengths{0, L, 4}, key_lengths{S, 0, 2};
  fa::multihead_options opt;
  opt.query_lengths = query_lengths;
  opt.key_lengths = key_lengths;
  counting<P>::calls = 0;
  const fa::tensor_view<T> to{out.data(), B, L, H, M};
  fa::multihead_attention(counted, fa::tensor_view<const T>{mq.data(), B, L, H, E},
                          fa::tensor_view<const T>{mk.data(), B, S, H, E},
                          fa::tensor_view<const T>{mv.data(), B, S, H, M}, to, opt);
  EXPECT_EQ(counting<P>::calls.load(), H);  // sample 2 only
  for (index b = 0; b < 2; ++b)
    for (index h = 0; h < H; ++h)
      EXPECT_TRUE((fa::testing::copy_head(to, b, h).array() == T(0)).all()) << b << ", " << h;
}

}  // namespace
