// guarded<P> (issue 13, "error you can see and bound"): the run-time estimate of a kernel's
// relative error from rows computed exactly, its interval's coverage and its accuracy over many
// inputs, kernels and seeds; the exact fallback (when, and that it is dense's output bit for
// bit); the dense shortcut below min_length; knobs, reports per (batch, head), determinism.
#include <gtest/gtest.h>

#include <fastattn/fastattn.hpp>
#include <fastattn/guarded.hpp>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <limits>
#include <map>
#include <sstream>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "fifth_kernel.hpp"
#include "reference.hpp"

namespace fa = fastattn;

namespace {

using fa::testing::matd;
using fa::testing::reference_attention;
using fa::testing::relative_error;

// Eigen would otherwise split small products across OpenMP threads (see tests/common.hpp).
const bool eigen_single_threaded = (Eigen::setNbThreads(1), true);

/// Bitwise equality of two matrices of the same scalar type.
template <class A, class B>
bool same_bits(const A& a, const B& b) {
  return a.size() == b.size() &&
         std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(*a.data())) ==
             0;
}

/// Field-by-field bitwise equality of two estimates (the struct has padding).
bool same_estimate(const fa::error_estimate& a, const fa::error_estimate& b) {
  auto bits = [](double x, double y) { return std::memcmp(&x, &y, sizeof x) == 0; };
  return bits(a.error, b.error) && bits(a.lower, b.lower) && bits(a.upper, b.upper) &&
         bits(a.confidence, b.confidence) && a.samples == b.samples && a.fell_back == b.fell_back;
}

/// Whether `call` throws fastattn::invalid_argument about `argument`.
template <class F>
::testing::AssertionResult throws_about(F&& call, std::string_view argument) {
  try {
    call();
  } catch (const fa::invalid_argument& e) {
    if (e.argument() == argument) return ::testing::AssertionSuccess() << e.what();
    return ::testing::AssertionFailure() << "about \"" << e.argument() << "\": " << e.what();
  }
  return ::testing::AssertionFailure() << "nothing thrown (expected \"" << argument << "\")";
}

// ---------------------------------------------------------------------------------------------
// Inputs

struct head {
  std::string kind;
  fa::matrix<float> q, k, v;
  double scale;
};

/// The neighbour-offset head of tests/reference.hpp (scale 1); with `share` < 1 a mixture of
/// neighbour rows and nearly uniform ones.
head make_neighbour(fa::index n, std::uint64_t seed, double share = 1.0) {
  auto in = fa::testing::make_neighbour<float>(n, seed, share);
  return {share < 1 ? "neighbour_mix" : "neighbour", std::move(in.q), std::move(in.k),
          std::move(in.v), 1.0};
}

head make_peaked_head(fa::index n, std::uint64_t seed) {
  auto in = fa::testing::make_peaked<float>(n, n, 32, 32, seed);
  return {"peaked", in.q, in.k, in.v, 1 / std::sqrt(32.0)};
}

head make_gaussian_head(fa::index n, std::uint64_t seed) {
  return {"gaussian", fa::testing::gaussian<float>(n, 32, seed),
          fa::testing::gaussian<float>(n, 32, seed + 1),
          fa::testing::gaussian<float>(n, 32, seed + 2), 1 / std::sqrt(32.0)};
}

/// Peaked keys and values; each query is either a peaked query or an iid gaussian one.
head make_mixture(fa::index n, std::uint64_t seed) {
  head h = make_peaked_head(n, seed);
  h.kind = "peaked_gaussian_mix";
  const fa::matrix<float> g = fa::testing::gaussian<float>(n, 32, seed + 7);
  std::mt19937_64 gen(seed + 8);
  for (fa::index i = 0; i < n; ++i)
    if (gen() % 2) h.q.row(i) = g.row(i);
  return h;
}

// ---------------------------------------------------------------------------------------------
// The concept, knobs and defaults

static_assert(fa::attention_policy<fa::guarded<fa::clustered>>);
static_assert(fa::provides_lse<fa::guarded<fa::clustered>>);
static_assert(fa::guarded<fa::smyrf>::name == "smyrf");
static_assert(!fa::guarded<fa::improved_clustered>::is_exact && fa::guarded<fa::dense>::is_exact);
static_assert(fa::guarded<fa::clustered>::supports_causal);
// A kernel without log-sum-exp or causal support: guarded has neither.
static_assert(fa::attention_policy<fa::guarded<user_kernels::key_sample>>);
static_assert(!fa::provides_lse<fa::guarded<user_kernels::key_sample>>);
static_assert(!fa::guarded<user_kernels::key_sample>::supports_causal);

TEST(Guarded, KnobsDefaultsAndValidation) {
  EXPECT_EQ(fa::guarded<fa::clustered>{}.min_length, 256);
  EXPECT_EQ(fa::guarded<fa::smyrf>{}.min_length, 256);
  EXPECT_EQ(fa::guarded<fa::improved_clustered>{}.min_length, 1024);
  EXPECT_EQ(fa::guarded<fa::dense>{}.min_length, 0);
  EXPECT_EQ(fa::guarded<user_kernels::key_sample>{}.min_length, 0);
  // The default follows the inner kernel's knobs: 400 clusters cost four times 100, so dense
  // stays faster up to four times the length (policy.hpp, crossover).
  EXPECT_EQ(fa::guarded<fa::clustered>{.inner = {.clusters = 400}}.min_length, 1024);
  EXPECT_EQ(fa::guarded<fa::improved_clustered>{.inner = {.clusters = 50}}.min_length, 512);
  EXPECT_EQ(fa::guarded<fa::clustered>{.inner = {.clusters = 10}}.min_length, 256);
  const fa::guarded<fa::clustered> g{};
  EXPECT_TRUE(std::isinf(g.tolerance));
  EXPECT_EQ(g.samples, 32);
  std::vector<std::string> names;
  fa::for_each_knob<fa::guarded<fa::clustered>>(
      [&](const auto& knob) { names.emplace_back(knob.name); });
  EXPECT_EQ(names, (std::vector<std::string>{"tolerance", "samples", "min_length", "seed"}));

  const auto in = fa::testing::make_peaked<float>(40, 40, 8, 8, 1);
  auto run = [&](const auto& policy) {
    return [&, policy] { (void)fa::attention(policy, in.q, in.k, in.v); };
  };
  using G = fa::guarded<fa::clustered>;
  EXPECT_TRUE(throws_about(run(G{.samples = 0}), "samples"));
  EXPECT_TRUE(throws_about(run(G{.samples = (fa::index{1} << 20) + 1}), "samples"));
  EXPECT_TRUE(throws_about(run(G{.tolerance = -0.5}), "tolerance"));
  EXPECT_TRUE(
      throws_about(run(G{.tolerance = std::numeric_limits<double>::quiet_NaN()}), "tolerance"));
  EXPECT_TRUE(throws_about(run(G{.min_length = -1}), "min_length"));
  EXPECT_TRUE(throws_about(run(G{.inner = {.clusters = 0}}), "clusters"));  // validate(): inner's
  EXPECT_NO_THROW(run(G{.tolerance = 0.0, .samples = 1 << 20})());
}

// ---------------------------------------------------------------------------------------------
// The estimate when every row is drawn: the true error, zero width (with padding and causal)

TEST(Guarded, EverySampledRowGivesTheTrueErrorWithZeroWidth) {
  const auto in = fa::testing::make_peaked<float>(300, 280, 32, 16, 3);
  for (const bool causal : {false, true}) {
    const fa::options opt{.key_length = 270, .query_length = 290, .causal = causal};
    const matd ref = reference_attention(in.q, in.k, in.v, opt);
    std::vector<fa::error_estimate> report(1);
    const fa::clustered inner{.clusters = 6, .seed = 4};
    const fa::guarded<fa::clustered> g{
        .inner = inner, .samples = 290, .min_length = 0, .report = report};
    const fa::matrix<float> out = fa::attention(g, in.q, in.k, in.v, opt);
    EXPECT_TRUE(same_bits(out, fa::matrix<float>(fa::attention(inner, in.q, in.k, in.v, opt))));
    const double truth = relative_error(out, ref);
    EXPECT_GT(truth, 0.05) << causal;
    // Float rounding of the exact rows (~1e-6 relative) against an error of ~0.1 or more.
    EXPECT_NEAR(report[0].error, truth, 1e-4 * truth) << causal;
    EXPECT_EQ(report[0].lower, report[0].error);
    EXPECT_EQ(report[0].upper, report[0].error);
    EXPECT_EQ(report[0].samples, 290);
    EXPECT_EQ(report[0].confidence, 1.0);
    EXPECT_FALSE(report[0].fell_back);
  }
}

// The estimate is a ratio of squared norms, so it does not depend on the values' magnitude: v
// times 2^j scales every output row by exactly 2^j (each kernel's weights do not see v), and the
// estimate, sampled or over every row, must not move. Before, double values past 1e154 squared
// to infinity (estimate NaN: every head fell back) and values below 1e-154 to zero (estimate 0
// for a head with error 0.1: a silent pass).
template <class P>
void expect_estimate_independent_of_magnitude(const P& inner) {
  const auto in = fa::testing::make_peaked<double>(300, 280, 32, 16, 7);
  for (const fa::index samples : {32, 300}) {
    auto estimate = [&](double factor) {
      std::vector<fa::error_estimate> report(1);
      const fa::guarded<P> g{.inner = inner, .samples = samples, .min_length = 0, .report = report};
      const fa::matrix<double> v = in.v * factor;
      (void)fa::attention(g, in.q, in.k, v);
      return report[0];
    };
    std::ostringstream label_text;  // (a std::string sum trips GCC 12's -Warray-bounds)
    label_text << P::name << ", " << samples << " samples";
    const std::string label = label_text.str();
    const fa::error_estimate one = estimate(1.0);
    EXPECT_GT(one.error, 0.02) << label;
    for (const double factor : {0x1p990, 0x1p-1000}) {
      const fa::error_estimate scaled = estimate(factor);
      EXPECT_EQ(scaled.error, one.error) << label << ", factor " << factor;
      EXPECT_EQ(scaled.lower, one.lower) << label << ", factor " << factor;
      EXPECT_EQ(scaled.upper, one.upper) << label << ", factor " << factor;
    }
    // Denormal values (about 14 significant bits) do not scale exactly, but the error is there.
    const fa::error_estimate denormal = estimate(0x1p-1060);
    EXPECT_GT(denormal.error, 0.5 * one.error) << label;
    EXPECT_TRUE(std::isfinite(denormal.upper)) << label;
  }
}

TEST(Guarded, EstimateDoesNotDependOnTheValuesMagnitude) {
  expect_estimate_independent_of_magnitude(fa::clustered{.clusters = 6, .seed = 4});
  expect_estimate_independent_of_magnitude(fa::improved_clustered{.clusters = 6, .topk = 8});
  expect_estimate_independent_of_magnitude(fa::smyrf{.hashes = 1, .cluster_size = 16});
}

// The sampled rows respect causal visibility and padding: on kernels in an exact setting the
// sampled estimate (n = 16 of 290 rows) is float rounding, where a row computed over the wrong
// keys would differ by O(1).
TEST(Guarded, SampledRowsSeeOnlyTheirKeys) {
  const auto in = fa::testing::make_peaked<float>(300, 300, 32, 16, 5);
  for (const bool causal : {false, true}) {
    const fa::options opt{.key_length = 270, .query_length = 290, .causal = causal};
    std::vector<fa::error_estimate> report(1);
    auto check = [&](auto inner) {
      const fa::guarded<decltype(inner)> g{
          .inner = inner, .samples = 16, .min_length = 0, .report = report};
      (void)fa::attention(g, in.q, in.k, in.v, opt);
      EXPECT_LT(report[0].upper, 1e-4) << decltype(inner)::name << " causal " << causal;
      EXPECT_EQ(report[0].samples, 16);
      EXPECT_EQ(report[0].confidence, 0.95);
    };
    check(fa::improved_clustered{.clusters = 5, .topk = 300});
    check(fa::smyrf{.hashes = 2, .cluster_size = 300});
    check(fa::dense{});
  }
}

// ---------------------------------------------------------------------------------------------
// Statistics: coverage of the interval and accuracy of the estimate over inputs x kernels x seeds

struct tally {
  int trials = 0, covered = 0, large = 0, accurate = 0;
};

// 5 input kinds (peaked, iid gaussian, neighbour-offset, and two mixtures: peaked and gaussian
// queries, neighbour and near-uniform rows) x 2 inputs x 6 kernel settings = 60 heads of N = 512,
// each estimated with the default samples = 32 and 8 seeds of the guard: 480 trials. Seed 0 runs
// through attention() and must report what estimate() returns; the other seeds call estimate()
// on the kernel's output directly (the same function, without running the kernel again).
//
// Thresholds:
// - Coverage: the interval's nominal confidence is 95%. Off-line over these kinds of input and
//   these kernels (plus improved_clustered C = 100, topk = 32), 200 seeds per head, its coverage
//   was 93.6-95.5% per input kind and per kernel at N = 512 (94.4% over 21000 trials) and
//   94.2-95.5% at N = 1024. Over 480 trials a binomial count at 94% has a standard deviation of
//   1.1 points, so 90% overall is 3.6 sd below the measured level (trials on one head are not
//   independent, which widens the spread somewhat; the margin allows for it); per kind (96
//   trials, sd 2.4 points) 85% is 3.7 sd below.
// - Accuracy: the target, within 25% of the true error in at least 90% of the trials whose
//   true error exceeds 0.02. Measured off-line: 95.5% over all at N = 512 (97.6% at N = 1024); per
//   kind at least 90.4%, but per kernel improved_clustered with topk = 32 reaches only 79-92% at
//   N = 512, because its error sits in the ~5% of rows whose cluster's top-k misses their own
//   heavy keys (see guarded.hpp). So the 90% applies to all trials together, as the issue states.
TEST(GuardedStatistics, IntervalCoversAndEstimateIsAccurateWithThirtyTwoSamples) {
  std::vector<head> heads;
  for (const std::uint64_t s : {11u, 12u}) {
    heads.push_back(make_peaked_head(512, s));
    heads.push_back(make_gaussian_head(512, 20 + s));
    heads.push_back(make_neighbour(512, 40 + s));
    heads.push_back(make_mixture(512, 60 + s));
    heads.push_back(make_neighbour(512, 80 + s, 0.5));
  }
  std::map<std::string, tally> by_kind, by_kernel;
  tally all;
  std::vector<fa::error_estimate> report(1);
  for (const head& h : heads) {
    const fa::options opt{.scale = h.scale};
    const matd ref = reference_attention(h.q, h.k, h.v, opt);
    fa::context ctx{};
    ctx.scale = h.scale;
    ctx.query_length = ctx.key_length = h.q.rows();
    auto trials = [&](const std::string& label, auto inner) {
      const fa::matrix<float> approx = fa::attention(inner, h.q, h.k, h.v, opt);
      const double truth = relative_error(approx, ref);
      for (std::uint64_t seed = 0; seed < 8; ++seed) {
        const fa::guarded<decltype(inner)> g{
            .inner = inner, .min_length = 0, .seed = seed, .report = report};
        const fa::error_estimate e = g.template estimate<float>(
            fa::const_view<float>(h.q), fa::const_view<float>(h.k), fa::const_view<float>(h.v),
            fa::const_view<float>(approx), ctx);
        if (seed == 0) {  // the call itself: P's output (estimate only) and the same report
          EXPECT_TRUE(same_bits(fa::matrix<float>(fa::attention(g, h.q, h.k, h.v, opt)), approx))
              << label;
          EXPECT_TRUE(same_estimate(report[0], e)) << label;
        }
        EXPECT_EQ(e.samples, 32);
        EXPECT_LE(e.lower, e.error);
        EXPECT_LE(e.error, e.upper);
        for (tally* t : {&by_kind[h.kind], &by_kernel[label], &all}) {
          ++t->trials;
          t->covered += e.lower <= truth && truth <= e.upper;
          if (truth > 0.02) {
            ++t->large;
            t->accurate += std::abs(e.error - truth) <= 0.25 * truth;
          }
        }
      }
    };
    trials("clustered C=10", fa::clustered{.clusters = 10, .seed = 1});
    trials("clustered C=50", fa::clustered{.clusters = 50, .seed = 1});
    trials("improved C=10 k=8", fa::improved_clustered{.clusters = 10, .seed = 1, .topk = 8});
    trials("improved C=25 k=32", fa::improved_clustered{.clusters = 25, .seed = 1, .topk = 32});
    trials("smyrf 1x16", fa::smyrf{.hashes = 1, .cluster_size = 16, .seed = 1});
    trials("smyrf 2x64", fa::smyrf{.hashes = 2, .cluster_size = 64, .seed = 1});
  }
  auto share = [](int part, int whole) { return whole ? static_cast<double>(part) / whole : 1.0; };
  auto print = [&](const std::string& name, const tally& t) {
    std::cout << "  " << name << ": covered " << share(t.covered, t.trials) << " of " << t.trials
              << ", within 25% " << share(t.accurate, t.large) << " of " << t.large << "\n";
  };
  for (const auto& [name, t] : by_kind) print(name, t);
  for (const auto& [name, t] : by_kernel) print(name, t);
  print("all", all);
  EXPECT_EQ(all.trials, 480);
  EXPECT_GE(share(all.covered, all.trials), 0.90);
  for (const auto& [name, t] : by_kind) EXPECT_GE(share(t.covered, t.trials), 0.85) << name;
  EXPECT_GE(all.large, 300);
  EXPECT_GE(share(all.accurate, all.large), 0.90);
}

// ---------------------------------------------------------------------------------------------
// The fallback

/// B = 2 samples x H = 4 heads of N = 300: heads 0 and 2 are peaked (clustered with 4 clusters is
/// wrong by 0.3-0.7 there), heads 1 and 3 nearly uniform (queries scaled by 1e-4: every score is
/// within about 0.005 of every other, for the queries and for their centroids alike, so the error
/// is about 1e-3).
struct planted {
  static constexpr fa::index
      B = 2,
      L = 600, H = 4, E = 16;  // L >= 2 x 256: causal blocks above clustered's dense crossover
  std::vector<float> q, k, v;
  planted() : q(B * L * H * E), k(B * L * H * E), v(B * L * H * E) {
    for (fa::index b = 0; b < B; ++b)
      for (fa::index h = 0; h < H; ++h) {
        const auto in =
            fa::testing::make_peaked<float>(L, L, E, E, static_cast<std::uint64_t>(10 * b + h));
        const float qs = h % 2 == 0 ? 1.0f : 1e-4f;
        for (fa::index t = 0; t < L; ++t)
          for (fa::index e = 0; e < E; ++e) {
            const auto at = static_cast<std::size_t>(((b * L + t) * H + h) * E + e);
            q[at] = qs * in.q(t, e);
            k[at] = in.k(t, e);
            v[at] = in.v(t, e);
          }
      }
  }
  fa::tensor_view<const float> view(const std::vector<float>& x) const {
    return {x.data(), B, L, H, E};
  }
  static bool large(fa::index h) { return h % 2 == 0; }

  template <class P>
  std::vector<float> run(const P& policy, int threads = 0, std::span<const fa::index> lengths = {},
                         bool causal = false) const {
    std::vector<float> out(q.size());
    fa::multihead_options opt;
    opt.threads = threads;
    opt.query_lengths = lengths;
    opt.key_lengths = lengths;
    opt.common.causal = causal;
    fa::multihead_attention(policy, view(q), view(k), view(v),
                            fa::tensor_view<float>{out.data(), B, L, H, E}, opt);
    return out;
  }
  /// Head (b, h) of a (B, L, H, E) buffer.
  static fa::matrix<float> head_of(const std::vector<float>& x, fa::index b, fa::index h) {
    fa::matrix<float> m(L, E);
    for (fa::index t = 0; t < L; ++t)
      for (fa::index e = 0; e < E; ++e)
        m(t, e) = x[static_cast<std::size_t>(((b * L + t) * H + h) * E + e)];
    return m;
  }
};

// The guard falls back on exactly the peaked heads (estimate ~0.5 against a tolerance of 0.05;
// the uniform heads estimate ~1e-4): those heads are dense's output bit for bit, the others the
// kernel's; causal too.
TEST(GuardedFallback, FallsBackOnExactlyTheHeadsAboveTheTolerance) {
  const planted p;
  const fa::clustered inner{.clusters = 4, .seed = 3};
  for (const bool causal : {false, true}) {
    std::vector<fa::error_estimate> report(planted::B * planted::H);
    const fa::guarded<fa::clustered> g{
        .inner = inner, .tolerance = 0.05, .min_length = 0, .report = report};
    const auto out = p.run(g, 0, {}, causal);
    const auto kernel = p.run(inner, 0, {}, causal);
    const auto exact = p.run(fa::dense{}, 0, {}, causal);
    for (fa::index b = 0; b < planted::B; ++b)
      for (fa::index h = 0; h < planted::H; ++h) {
        const fa::error_estimate& e = report[static_cast<std::size_t>(b * planted::H + h)];
        const auto got = planted::head_of(out, b, h);
        EXPECT_EQ(e.fell_back, planted::large(h)) << b << " " << h << " error " << e.error;
        if (planted::large(h)) {
          EXPECT_GT(e.error, 0.2) << b << " " << h;
          EXPECT_TRUE(same_bits(got, planted::head_of(exact, b, h))) << b << " " << h;
        } else {
          EXPECT_LT(e.upper, 0.01) << b << " " << h;
          EXPECT_TRUE(same_bits(got, planted::head_of(kernel, b, h))) << b << " " << h;
        }
      }
  }
}

// Exact configurations never fall back, even at a tolerance of 1e-3 (their error is float
// rounding, ~1e-6): improved_clustered with topk >= S, smyrf with cluster_size >= L, dense.
TEST(GuardedFallback, NeverOnAnExactConfiguration) {
  const planted p;
  auto check = [&](auto inner) {
    for (const bool causal : {false, true}) {
      std::vector<fa::error_estimate> report(planted::B * planted::H);
      const fa::guarded<decltype(inner)> g{
          .inner = inner, .tolerance = 1e-3, .min_length = 0, .report = report};
      const auto out = p.run(g, 0, {}, causal);
      EXPECT_EQ(out, p.run(inner, 0, {}, causal)) << decltype(inner)::name;
      for (const auto& e : report) {
        EXPECT_FALSE(e.fell_back) << decltype(inner)::name << " error " << e.error;
        EXPECT_LT(e.upper, 1e-4) << decltype(inner)::name;
      }
    }
  };
  check(fa::improved_clustered{.clusters = 4, .topk = planted::L});
  check(fa::smyrf{.hashes = 2, .cluster_size = planted::L});
  check(fa::dense{});
}

// With log-sum-exp: the kept head returns the kernel's lse, the fallen-back one dense's, bit for
// bit; tolerance 0 falls back on any error.
TEST(GuardedFallback, LogSumExpFollowsTheOutput) {
  const auto in = fa::testing::make_peaked<float>(300, 300, 16, 16, 7);
  const fa::options opt{.key_length = 290, .query_length = 295};
  auto run = [&](const auto& policy, fa::matrix<float>& out, std::vector<float>& lse) {
    out.resize(300, 16);
    lse.assign(300, 0.0f);
    fa::attention(policy, in.q, in.k, in.v, fa::view<float>(out), std::span<float>(lse), opt);
  };
  fa::matrix<float> o_g, o_d, o_k;
  std::vector<float> l_g, l_d, l_k;
  std::vector<fa::error_estimate> report(1);
  const fa::clustered inner{.clusters = 5};
  run(fa::dense{}, o_d, l_d);
  run(inner, o_k, l_k);
  run(
      fa::guarded<fa::clustered>{
          .inner = inner, .tolerance = 0.0, .min_length = 0, .report = report},
      o_g, l_g);
  EXPECT_TRUE(report[0].fell_back);
  EXPECT_TRUE(same_bits(o_g, o_d));
  EXPECT_EQ(l_g, l_d);
  run(fa::guarded<fa::clustered>{.inner = inner, .min_length = 0, .report = report}, o_g, l_g);
  EXPECT_FALSE(report[0].fell_back);
  EXPECT_TRUE(same_bits(o_g, o_k));
  EXPECT_EQ(l_g, l_k);
}

/// A kernel that counts its calls (and writes 7 into its rows).
struct counting_kernel {
  static constexpr std::string_view name = "counting";
  static constexpr bool is_exact = false;
  static constexpr bool supports_causal = true;
  static inline std::atomic<int> calls{0};
  template <class T>
  void compute(fa::const_view<T>, fa::const_view<T>, fa::const_view<T>, fa::view<T> out,
               const fa::context& ctx) const {
    ++calls;
    out.topRows(ctx.query_length).setConstant(T(7));
  }
};

// Below min_length the head is dense's output without calling the kernel; at min_length the
// kernel runs. The defaults (256 for clustered) apply without being set.
TEST(GuardedFallback, BelowMinLengthIsDenseWithoutCallingTheKernel) {
  const auto in = fa::testing::make_peaked<float>(200, 200, 16, 16, 9);
  std::vector<fa::error_estimate> report(1, {.error = -1});
  const fa::guarded<counting_kernel> g{.min_length = 150, .report = report};
  counting_kernel::calls = 0;
  for (const bool causal : {false, true}) {
    const fa::options opt{.query_length = 149, .causal = causal};
    EXPECT_TRUE(same_bits(fa::matrix<float>(fa::attention(g, in.q, in.k, in.v, opt)),
                          fa::matrix<float>(fa::attention(fa::dense{}, in.q, in.k, in.v, opt))));
    EXPECT_EQ(counting_kernel::calls, 0);
    EXPECT_EQ(report[0].samples, 0);
    EXPECT_EQ(report[0].error, 0.0);
    EXPECT_FALSE(report[0].fell_back);
  }
  (void)fa::attention(g, in.q, in.k, in.v, {.query_length = 150});
  EXPECT_EQ(counting_kernel::calls, 1);
  EXPECT_GT(report[0].error, 0.5);  // 7s against values of norm ~1: the estimate sees it

  const fa::clustered inner{.clusters = 3};
  EXPECT_TRUE(same_bits(fa::matrix<float>(fa::attention(fa::guarded<fa::clustered>{.inner = inner},
                                                        in.q, in.k, in.v)),
                        fa::matrix<float>(fa::attention(fa::dense{}, in.q, in.k, in.v))));
}

// ---------------------------------------------------------------------------------------------
// Multi-head: determinism, one report per (b, h), the report's bounds

TEST(GuardedMultihead, DeterministicOnOneAndTwoThreadsWithOneReportPerHead) {
  const planted p;
  const std::vector<fa::index> lengths{300, 280};
  const fa::clustered inner{.clusters = 4, .seed = 3};
  std::vector<fa::error_estimate> r1(planted::B * planted::H), r2(r1.size());
  const fa::guarded<fa::clustered> g1{
      .inner = inner, .tolerance = 0.05, .min_length = 0, .seed = 5, .report = r1};
  fa::guarded<fa::clustered> g2 = g1;
  g2.report = r2;
  const auto o1 = p.run(g1, 1, lengths), o2 = p.run(g2, 2, lengths);
  EXPECT_EQ(o1, o2);
  for (std::size_t i = 0; i < r1.size(); ++i) EXPECT_TRUE(same_estimate(r1[i], r2[i])) << i;
  // Entry b * H + h is head (b, h)'s: it matches the head's own error, computed alone.
  const auto kernel = p.run(inner, 1, lengths);
  for (fa::index b = 0; b < planted::B; ++b)
    for (fa::index h = 0; h < planted::H; ++h) {
      const fa::error_estimate& e = r1[static_cast<std::size_t>(b * planted::H + h)];
      const fa::index Lv = lengths[static_cast<std::size_t>(b)];
      const fa::options opt{.key_length = Lv, .query_length = Lv};
      const matd ref = reference_attention(planted::head_of(p.q, b, h), planted::head_of(p.k, b, h),
                                           planted::head_of(p.v, b, h), opt);
      const double truth = relative_error(planted::head_of(kernel, b, h), ref);
      EXPECT_EQ(e.samples, 32);
      EXPECT_EQ(e.fell_back, planted::large(h)) << b << " " << h;
      // Within a factor of 2 of the head's true error (a 0.5 error against 1e-4 on the other
      // heads: a report in the wrong slot is off by 1000x).
      EXPECT_GT(e.error, truth / 2) << b << " " << h;
      EXPECT_LT(e.error, truth * 2) << b << " " << h;
    }
  // Different streams draw different samples: two heads of equal inputs would still differ, and
  // the estimate changes with the seed.
  fa::guarded<fa::clustered> g3 = g1;
  std::vector<fa::error_estimate> r3(r1.size());
  g3.report = r3;
  g3.seed = 6;
  (void)p.run(g3, 2, lengths);
  EXPECT_NE(r3[0].error, r1[0].error);
}

// One head on several threads: the sampled rows are one query block whose runs of key blocks
// (two at S = 4200, dense's 512-key blocks) the threads share; the estimate keeps its bits.
TEST(GuardedMultihead, OneHeadsSampledRowsGiveTheSameEstimateOnAnyThreadCount) {
  const auto in = fa::testing::make_peaked<float>(600, 4200, 16, 8, 9);
  for (const bool causal : {false, true}) {
    std::vector<fa::error_estimate> first;
    for (const int threads : {1, 2, 3}) {
      std::vector<fa::error_estimate> report(1);
      const fa::guarded<fa::clustered> g{
          .inner = {.clusters = 8, .seed = 2}, .min_length = 0, .report = report};
      fa::matrix<float> out(in.q.rows(), in.v.cols());
      fa::multihead_options mo;
      mo.common = {.key_length = 4150, .causal = causal};
      mo.threads = threads;  // one head: all of them for it
      fa::multihead_attention(g, fa::tensor_view<const float>{in.q.data(), 1, in.q.rows(), 1, 16},
                              fa::tensor_view<const float>{in.k.data(), 1, in.k.rows(), 1, 16},
                              fa::tensor_view<const float>{in.v.data(), 1, in.v.rows(), 1, 8},
                              fa::tensor_view<float>{out.data(), 1, out.rows(), 1, 8}, mo);
      if (first.empty()) {
        first = report;
        EXPECT_GT(first[0].error, 0.01) << causal;
      } else {
        EXPECT_TRUE(same_estimate(report[0], first[0])) << threads << " threads, causal " << causal;
      }
    }
  }
}

TEST(GuardedMultihead, ReportMustHaveOneEntryPerHead) {
  const planted p;
  std::vector<fa::error_estimate> report(planted::B * planted::H - 1);
  const fa::guarded<fa::clustered> g{.inner = {.clusters = 4}, .min_length = 0, .report = report};
  EXPECT_TRUE(throws_about([&] { (void)p.run(g, 2); }, "report"));
  // Refused before any work (regression: the error used to come from inside the parallel region,
  // after the other heads had written their output): out keeps what it held, on any thread count,
  // and the message names the entries and the heads. The front door needs one entry.
  for (const int threads : {1, 2}) {
    std::vector<float> out(p.q.size(), 7.0f);
    const fa::tensor_view<float> o{out.data(), planted::B, planted::L, planted::H, planted::E};
    fa::multihead_options mo;
    mo.threads = threads;
    const fa::invalid_argument e = fa::testing::error_of(
        [&] { fa::multihead_attention(g, p.view(p.q), p.view(p.k), p.view(p.v), o, mo); });
    EXPECT_EQ(e.argument(), "report");
    EXPECT_NE(std::string(e.what()).find(std::to_string(report.size()) + " entries for " +
                                         std::to_string(planted::B * planted::H) + " heads"),
              std::string::npos)
        << e.what();
    EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](float x) { return x == 7.0f; }));
  }
  {
    std::vector<fa::error_estimate> none;
    const fa::matrix<float> q = fa::testing::gaussian<float>(300, 8, 1);
    EXPECT_NO_THROW((void)fa::attention(fa::guarded<fa::clustered>{.report = none}, q, q, q));
  }
  // Empty: no report, nothing thrown; heads with no valid query leave their entry untouched.
  const fa::guarded<fa::clustered> quiet{.inner = {.clusters = 4}, .min_length = 0};
  EXPECT_EQ(p.run(quiet, 2), p.run(fa::clustered{.clusters = 4}, 2));
  std::vector<fa::error_estimate> full(planted::B * planted::H, {.error = -1});
  const fa::guarded<fa::clustered> g2{.inner = {.clusters = 4}, .min_length = 0, .report = full};
  const std::vector<fa::index> lengths{0, 300};
  (void)p.run(g2, 2, lengths);
  for (fa::index h = 0; h < planted::H; ++h) {
    EXPECT_EQ(full[static_cast<std::size_t>(h)].error, -1) << h;
    EXPECT_GE(full[static_cast<std::size_t>(planted::H + h)].error, 0) << h;
  }
}

// A user kernel without log-sum-exp or causal support runs guarded through the front door.
TEST(Guarded, WrapsAUserKernel) {
  const auto in = fa::testing::make_peaked<double>(100, 100, 8, 8, 2);
  std::vector<fa::error_estimate> report(1);
  const user_kernels::key_sample inner{.keys = 100};  // exact: every key
  const fa::guarded<user_kernels::key_sample> g{
      .inner = inner, .tolerance = 1e-6, .samples = 8, .report = report};
  EXPECT_LT(
      relative_error(fa::attention(g, in.q, in.k, in.v), reference_attention(in.q, in.k, in.v)),
      1e-12);
  EXPECT_FALSE(report[0].fell_back);
  EXPECT_LT(report[0].upper, 1e-10);
  EXPECT_THROW((void)fa::attention(g, in.q, in.k, in.v, {.causal = true}), fa::invalid_argument);
}

}  // namespace
