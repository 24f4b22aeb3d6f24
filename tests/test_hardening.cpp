// Regression tests for the defects found by probing the library with hostile and careless input
// (issue 10), each over every kernel of fastattn::kernels so that the class is covered, not only
// the instance: overflowing scales and magnitudes, out aliasing an input, the non-finite policy,
// huge knobs and thread counts, tensor_view extents that overflow, improved_clustered's scratch
// with many clusters, and heap allocations in repeated calls.
#include <gtest/gtest.h>

#include <fastattn/fastattn.hpp>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <new>
#include <type_traits>
#include <vector>

#include "reference.hpp"

namespace fa = fastattn;

// ---------------------------------------------------------------------------------------------
// Heap allocations counted on the calling thread (every replaceable operator new goes through
// here; the counter only counts while `counting` is set on this thread).
namespace {
thread_local bool counting = false;
thread_local long allocations = 0;

void* counted(std::size_t size, std::size_t alignment) {
  if (counting) ++allocations;
  if (size == 0) size = 1;
  void* p = nullptr;
  if (alignment <= alignof(std::max_align_t)) {
    p = std::malloc(size);
  } else {
    size = (size + alignment - 1) / alignment * alignment;
    p = std::aligned_alloc(alignment, size);
  }
  if (!p) throw std::bad_alloc();
  return p;
}
}  // namespace

void* operator new(std::size_t n) { return counted(n, alignof(std::max_align_t)); }
void* operator new[](std::size_t n) { return counted(n, alignof(std::max_align_t)); }
void* operator new(std::size_t n, std::align_val_t a) {
  return counted(n, static_cast<std::size_t>(a));
}
void* operator new[](std::size_t n, std::align_val_t a) {
  return counted(n, static_cast<std::size_t>(a));
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

namespace {

template <class List>
struct as_gtest_types;
template <class... Ps>
struct as_gtest_types<fa::kernel_list<Ps...>> {
  using type = ::testing::Types<Ps...>;
};

struct kernel_names {
  template <class P>
  static std::string GetName(int) {
    return std::string(P::name);
  }
};

template <class P>
class Hardening : public ::testing::Test {};
TYPED_TEST_SUITE(Hardening, as_gtest_types<fa::kernels>::type, kernel_names);

template <class F>
fa::invalid_argument expect_invalid(F&& f) {
  try {
    f();
  } catch (const fa::invalid_argument& e) {
    return e;
  }
  ADD_FAILURE() << "expected fastattn::invalid_argument";
  return {"", ""};
}

// Item 2: a scale that is finite in double but overflows float (or makes every score overflow)
// is refused, naming it; before, it gave all-NaN rows (dense, clustered, improved) or zeros
// (smyrf).
TYPED_TEST(Hardening, ScaleThatOverflowsTheScalarTypeIsRefused) {
  const auto in = fa::testing::make_peaked<float>(64, 64, 8, 8, 1);
  for (const double scale : {1e300, -1e300, 3e38, 1e39}) {
    const auto e = expect_invalid(
        [&] { (void)fa::attention(TypeParam{}, in.q, in.k, in.v, {.scale = scale}); });
    EXPECT_TRUE(e.argument() == "scale" || e.argument() == "q") << e.what();
    EXPECT_NE(std::string(e.what()).find("overflow"), std::string::npos) << e.what();
  }
  // The same scale is fine in double when the scores stay representable.
  const fa::matrix<double> q = in.q.cast<double>() * 1e-150, k = in.k.cast<double>() * 1e-150;
  const fa::matrix<double> o =
      fa::attention(TypeParam{}, q, k, in.v.cast<double>().eval(), {.scale = 1e300});
  EXPECT_TRUE(o.allFinite());
}

// Item 3: finite inputs whose scores overflow are refused with a message saying so; inputs
// inside the documented bound give finite rows, never NaN or silent zeros.
TYPED_TEST(Hardening, FiniteInputsWhoseScoresOverflowAreRefused) {
  for (const float magnitude : {1e30f, 1e19f}) {
    fa::matrix<float> q = fa::testing::gaussian<float>(64, 8, 2) * magnitude;
    fa::matrix<float> k = fa::testing::gaussian<float>(64, 8, 3) * magnitude;
    const fa::matrix<float> v = fa::testing::gaussian<float>(64, 8, 4);
    const auto e = expect_invalid([&] { (void)fa::attention(TypeParam{}, q, k, v); });
    EXPECT_EQ(e.argument(), "q");
    EXPECT_NE(e.message().find("scores could overflow float"), std::string::npos) << e.what();
  }
  // Huge queries with tiny keys: every score is about 1, and the centroid of huge members must
  // not overflow (before: clustered NaN rows, improved_clustered zero rows).
  fa::matrix<float> q = fa::testing::gaussian<float>(128, 8, 5);
  q = q.array().sign() * 3e37f;  // |q| = 3e37, |scale q| < max/4
  const fa::matrix<float> k = fa::testing::gaussian<float>(96, 8, 6) * 1e-38f;
  const fa::matrix<float> v = fa::testing::gaussian<float>(96, 8, 7);
  const fa::matrix<float> o = fa::attention(TypeParam{}, q, k, v);
  ASSERT_TRUE(o.allFinite());
  // Every row that sees a key (all of them; local: those within its window of the 96 keys).
  for (fa::index i = 0; i < o.rows(); ++i) {
    if (!std::is_same_v<TypeParam, fa::local> || i < k.rows() + fa::local{}.window) {
      EXPECT_GT(o.row(i).norm(), 0.0f) << "row " << i;
    }
  }
  // The mirror: tiny queries, huge keys and a large scale, every score tiny but scale k beyond
  // float (before: improved_clustered scaled its top-k keys, 0 * inf made its rows NaN; found by
  // fuzz_attention, fuzz/corpus/fuzz_attention/regression-improved-scaled-keys).
  {
    const fa::matrix<float> qt = fa::testing::gaussian<float>(128, 8, 11) * 1e-30f;
    fa::matrix<float> kh = fa::testing::gaussian<float>(96, 8, 12);
    kh = kh.array().sign() * 3e37f;
    const fa::matrix<float> vt = fa::testing::gaussian<float>(96, 8, 13);
    const fa::matrix<float> ot = fa::attention(TypeParam{}, qt, kh, vt, {.scale = -293.0});
    EXPECT_TRUE(ot.allFinite());
  }
  // Large but representable magnitudes: dense is exact, the others finite.
  const fa::matrix<float> qb = fa::testing::gaussian<float>(64, 8, 8) * 1e17f;
  const fa::matrix<float> kb = fa::testing::gaussian<float>(64, 8, 9) * 1e-17f;
  const fa::matrix<float> vb = fa::testing::gaussian<float>(64, 8, 10) * 1e30f;
  const fa::matrix<float> ob = fa::attention(TypeParam{}, qb, kb, vb);
  EXPECT_TRUE(ob.allFinite());
  if constexpr (TypeParam::is_exact) {
    EXPECT_LT(fa::testing::relative_error(ob, fa::testing::reference_attention(qb, kb, vb)), 1e-5);
  }
  // v so large that a weighted sum could overflow is refused, naming v.
  const fa::matrix<float> vh = fa::testing::gaussian<float>(64, 8, 11) * 1e36f;
  EXPECT_EQ(expect_invalid([&] { (void)fa::attention(TypeParam{}, qb, kb, vh); }).argument(), "v");
}

// Item 4: out sharing memory with an input is refused for every kernel (before: wrong values,
// errors 0.05-0.2), in the front door and in the multi-head driver; disjoint interleaved heads
// of one buffer are accepted.
TYPED_TEST(Hardening, OutAliasingAnInputIsRefused) {
  fa::matrix<float> x = fa::testing::gaussian<float>(48, 8, 12);
  const fa::matrix<float> k = fa::testing::gaussian<float>(48, 8, 13);
  const fa::matrix<float> v = fa::testing::gaussian<float>(48, 8, 14);
  EXPECT_EQ(
      expect_invalid([&] { fa::attention(TypeParam{}, x, k, v, fa::view<float>(x)); }).argument(),
      "out");
  fa::matrix<float> all = x;
  EXPECT_EQ(expect_invalid([&] {
              fa::attention(TypeParam{}, all, all, all, fa::view<float>(all));
            }).argument(),
            "out");
  // Partial overlap: out is rows 8.. of q's buffer.
  fa::matrix<float> big = fa::testing::gaussian<float>(96, 8, 15);
  EXPECT_EQ(expect_invalid([&] {
              fa::attention(TypeParam{}, big.topRows(48), k, v,
                            fa::view<float>(big.middleRows(8, 48)));
            }).argument(),
            "out");

  // Multi-head: q and out in one (B, L, 2 heads, E) buffer: head 0 is q, head 1 is out. The
  // element sets are disjoint: accepted and equal to separate buffers.
  const fa::index L = 40, E = 8;
  std::vector<float> buffer(static_cast<std::size_t>(L * 2 * E));
  for (std::size_t i = 0; i < buffer.size(); ++i) buffer[i] = std::sin(static_cast<float>(i));
  const std::vector<float> kv(static_cast<std::size_t>(L * E), 0.5f);
  std::vector<float> separate(static_cast<std::size_t>(L * E));
  const fa::tensor_view<const float> qh{buffer.data(), 1, L, 1, E, 2 * E};
  const fa::tensor_view<const float> kh{kv.data(), 1, L, 1, E};
  fa::multihead_attention(TypeParam{}, qh, kh, kh,
                          fa::tensor_view<float>{separate.data(), 1, L, 1, E});
  fa::multihead_attention(TypeParam{}, qh, kh, kh,
                          fa::tensor_view<float>{buffer.data() + E, 1, L, 1, E, 2 * E});
  for (fa::index t = 0; t < L; ++t)
    for (fa::index e = 0; e < E; ++e)
      EXPECT_EQ(buffer[static_cast<std::size_t>(t * 2 * E + E + e)],
                separate[static_cast<std::size_t>(t * E + e)]);
  // out written over q itself: refused before any work.
  EXPECT_EQ(expect_invalid([&] {
              fa::multihead_attention(TypeParam{}, qh, kh, kh,
                                      fa::tensor_view<float>{buffer.data(), 1, L, 1, E, 2 * E});
            }).argument(),
            "out");
}

// A one-row input inside the gaps of a padded out shares no element with it, and is accepted
// (every kernel). Eigen's Ref gives a one-row view the stride cols, whatever the buffer's, so the
// check compared strides that differed and refused conservatively: found by fuzz_attention
// (dense, S = 1, v in the padding of out's rows).
TYPED_TEST(Hardening, OneRowInputInTheGapsOfOutIsAccepted) {
  const fa::index L = 14, M = 3, stride = 8;  // out's rows: [8 t, 8 t + 3); gaps [8 t + 3, 8 t + 8)
  std::vector<float> pool(static_cast<std::size_t>(L * stride), 7.0f);
  const fa::matrix<float> q = fa::testing::gaussian<float>(L, 4, 31);
  const fa::matrix<float> k = fa::testing::gaussian<float>(1, 4, 32);
  float* const v_at = pool.data() + 2 * stride + 4;  // in row 2's gap
  for (fa::index m = 0; m < M; ++m) v_at[m] = static_cast<float>(m + 1);
  using cmap = Eigen::Map<const fa::matrix<float>, 0, Eigen::OuterStride<>>;
  using map = Eigen::Map<fa::matrix<float>, 0, Eigen::OuterStride<>>;
  const cmap v(v_at, 1, M, Eigen::OuterStride<>(stride));
  fa::attention(TypeParam{}, q, k, v,
                fa::view<float>(map(pool.data(), L, M, Eigen::OuterStride<>(stride))));
  for (fa::index t = 0; t < L; ++t)  // one key: every row is v's row
    for (fa::index m = 0; m < M; ++m)
      EXPECT_EQ(pool[static_cast<std::size_t>(t * stride + m)], static_cast<float>(m + 1)) << t;
  // The same row one element to the left reaches into out's row 2: refused.
  const cmap v_over(pool.data() + 2 * stride + 2, 1, M, Eigen::OuterStride<>(stride));
  EXPECT_EQ(expect_invalid([&] {
              fa::attention(TypeParam{}, q, k, v_over,
                            fa::view<float>(map(pool.data(), L, M, Eigen::OuterStride<>(stride))));
            }).argument(),
            "out");
}

// The overlap test against the element sets themselves, over every small placement: exact when
// the strides are equal or a block has one row, never a miss otherwise.
TEST(HardeningAliasing, BlocksOverlapAgreesWithTheElementSets) {
  std::vector<float> pool(256);
  std::vector<char> mark(pool.size());
  for (fa::index ar = 1; ar <= 3; ++ar)
    for (fa::index ac = 1; ac <= 3; ++ac)
      for (fa::index as = ac; as <= ac + 2; ++as)
        for (fa::index br = 1; br <= 3; ++br)
          for (fa::index bc = 1; bc <= 3; ++bc)
            for (fa::index bs = bc; bs <= bc + 2; ++bs)
              for (fa::index offset = 0; offset < 24; ++offset) {
                const float* a = pool.data() + 12;
                const float* b = pool.data() + offset;
                std::fill(mark.begin(), mark.end(), 0);
                for (fa::index r = 0; r < ar; ++r)
                  for (fa::index c = 0; c < ac; ++c)
                    mark[static_cast<std::size_t>(12 + r * as + c)] = 1;
                bool shared = false;
                for (fa::index r = 0; r < br; ++r)
                  for (fa::index c = 0; c < bc; ++c)
                    shared = shared || mark[static_cast<std::size_t>(offset + r * bs + c)] != 0;
                const bool said = fa::detail::blocks_overlap(a, ar, ac, as, b, br, bc, bs);
                if (as == bs || ar == 1 || br == 1) {
                  ASSERT_EQ(said, shared) << ar << "x" << ac << "/" << as << " against " << br
                                          << "x" << bc << "/" << bs << " at " << offset;
                } else if (shared) {
                  ASSERT_TRUE(said);
                }
              }
}

// Keys near float's largest value with tiny queries (scores of a few units, inside the front
// door's bounds): the log-sum-exp and the output stay finite, for the kernel and for the kernel
// inside banded<P>. Before, clustered's log-sum-exp took the centroids' attention over the keys
// themselves ([V | K] as values), whose weighted sum of 96 keys of 3e38 overflowed: NaN lse, and
// NaN rows under banded<clustered> (found by fuzz_wrappers).
template <class P>
void expect_finite_lse_with_largest_keys(const P& policy) {
  const fa::index L = 80, S = 96, E = 8, M = 5;
  const fa::matrix<float> q = fa::testing::gaussian<float>(L, E, 41) * 1e-38f;
  fa::matrix<float> k = fa::testing::gaussian<float>(S, E, 42);
  k = k.array().sign() * 3e38f;
  const fa::matrix<float> v = fa::testing::gaussian<float>(S, M, 43);
  for (const bool causal : {false, true}) {
    fa::matrix<float> out(L, M);
    std::vector<float> lse(static_cast<std::size_t>(L));
    fa::attention(policy, q, k, v, fa::view<float>(out), lse, {.causal = causal});
    EXPECT_TRUE(out.allFinite()) << P::name << " causal " << causal;
    for (fa::index i = 0; i < L; ++i)
      ASSERT_TRUE(std::isfinite(lse[static_cast<std::size_t>(i)]))
          << P::name << " row " << i << " causal " << causal;
  }
}

TYPED_TEST(Hardening, LogSumExpStaysFiniteWithKeysAtTheLargestValue) {
  expect_finite_lse_with_largest_keys(TypeParam{});
  if constexpr (!TypeParam::is_exact && !std::is_same_v<TypeParam, fa::local>)
    expect_finite_lse_with_largest_keys(fa::banded<TypeParam>{.window = 3});
}

// Queries at the largest finite value: n identical rows make a centroid that is the mean of n
// copies, and sum_i fl(max / n) rounds past max for some n (n = 3 in double): an infinite
// centroid, whose scores against the keys are NaN or -inf. Found by fuzz_attention in CI
// (clustered NaN rows in double; improved_clustered with topk >= S, exact by its contract, gave
// zero rows in float). Every kernel sees identical queries here, where each is exact (one cluster
// or any clustering of equal queries; smyrf and local hold every key), so each row must be exact
// attention of that query. The scale brings the scores to a few units, so that the comparison
// tests the arithmetic, not a one-hot softmax.
template <class T, class P>
void expect_exact_at_largest_queries() {
  using lim = std::numeric_limits<T>;
  const fa::index S = 10, E = 4, M = 3;
  const fa::matrix<T> k = fa::testing::gaussian<T>(S, E, 21) * T(0.1);
  const fa::matrix<T> v = fa::testing::gaussian<T>(S, M, 22);
  const double scale = 16.0 / static_cast<double>(lim::max());  // scale q: entries 16 or 0
  for (fa::index n = 2; n <= 16; ++n) {
    fa::matrix<T> q(n, E);
    for (fa::index i = 0; i < n; ++i) q.row(i) << lim::max(), -lim::max(), T(-0.0), lim::max();
    const fa::matrix<T> o = fa::attention(P{}, q, k, v, {.scale = scale});
    ASSERT_TRUE(o.allFinite()) << n << " queries";
    const auto ref = fa::testing::reference_attention(q, k, v, {.scale = scale});
    const double tolerance = std::is_same_v<T, float> ? 1e-5 : 1e-12;
    EXPECT_LT(fa::testing::relative_error(o, ref), tolerance) << n << " queries";
  }
}

TYPED_TEST(Hardening, QueriesAtTheLargestFiniteValueKeepFiniteCentroids) {
  expect_exact_at_largest_queries<float, TypeParam>();
  expect_exact_at_largest_queries<double, TypeParam>();
}

// Item 5: with check_finite off, a NaN in q reaches the output row of that query (every kernel,
// any number of smyrf rounds), and a NaN in k never turns a valid row into a silent zero row.
TYPED_TEST(Hardening, NonFinitePolicyHoldsWhenUnchecked) {
  const auto in = fa::testing::make_peaked<float>(96, 96, 8, 8, 16);
  for (const fa::index row : {0, 17, 95}) {
    fa::matrix<float> q = in.q;
    q(row, 3) = std::numeric_limits<float>::quiet_NaN();
    const fa::matrix<float> o = fa::attention(TypeParam{}, q, in.k, in.v, {.check_finite = false});
    EXPECT_TRUE(o.row(row).hasNaN()) << "row " << row;
  }
  fa::matrix<float> k = in.k;
  k(40, 1) = std::numeric_limits<float>::quiet_NaN();
  const fa::matrix<float> o = fa::attention(TypeParam{}, in.q, k, in.v, {.check_finite = false});
  EXPECT_TRUE(o.hasNaN());
  for (fa::index i = 0; i < o.rows(); ++i)
    EXPECT_TRUE(o.row(i).hasNaN() || o.row(i).norm() > 0.0f) << "row " << i << " is zero";
}

// With check_finite off (context::checked_finite false), a NaN value still reaches the output:
// the exact rows inside the approximations skip their dropped weights only over values they have
// checked finite, so 0 * NaN reaches every row that sees the key (every row of clustered's,
// whose centroids see every key), and no row turns into a silent zero row.
TYPED_TEST(Hardening, NaNValueReachesTheOutputWhenUnchecked) {
  const auto in = fa::testing::make_peaked<float>(96, 96, 8, 8, 18);
  fa::matrix<float> v = in.v;
  v(40, 2) = std::numeric_limits<float>::quiet_NaN();
  const fa::matrix<float> o = fa::attention(TypeParam{}, in.q, in.k, v, {.check_finite = false});
  EXPECT_TRUE(o.col(2).hasNaN());
  if constexpr (std::is_same_v<TypeParam, fa::clustered>) {
    EXPECT_TRUE(o.col(2).array().isNaN().all()) << "every centroid sees key 40";
  }
  for (fa::index i = 0; i < o.rows(); ++i)
    EXPECT_TRUE(o.row(i).hasNaN() || o.row(i).norm() > 0.0f) << "row " << i << " is zero";
}

TEST(HardeningSmyrf, NaNInAKeyIsNotDroppedByTheRoundMerge) {
  const auto in = fa::testing::make_peaked<float>(128, 128, 8, 8, 17);
  fa::matrix<float> k = in.k;
  k(5, 0) = std::numeric_limits<float>::quiet_NaN();
  for (const fa::index hashes : {2, 4}) {
    const fa::smyrf p{.hashes = hashes, .cluster_size = 16};
    const fa::matrix<float> o = fa::attention(p, in.q, k, in.v, {.check_finite = false});
    fa::index nan_rows = 0;
    for (fa::index i = 0; i < o.rows(); ++i) {
      nan_rows += o.row(i).hasNaN();
      EXPECT_TRUE(o.row(i).hasNaN() || o.row(i).norm() > 0.0f) << "row " << i << " is zero";
    }
    EXPECT_GE(nan_rows, 16) << "a whole cluster sees the NaN key";
  }
}

// Item 12: knobs that cannot be honoured are refused before any allocation, naming the knob.
TEST(HardeningKnobs, HugeKnobsAndThreadCountsAreRefusedByName) {
  const auto in = fa::testing::make_peaked<float>(32, 32, 8, 8, 18);
  EXPECT_EQ(expect_invalid([&] {
              (void)fa::attention(fa::smyrf{.hashes = fa::index{1} << 40}, in.q, in.k, in.v);
            }).argument(),
            "hashes");
  EXPECT_EQ(expect_invalid([&] {
              (void)fa::attention(fa::dense{.query_block = 4096, .key_block = 65536}, in.q, in.k,
                                  in.v);
            }).argument(),
            "key_block");
  std::vector<float> buffer(32 * 8), out(32 * 8);
  const fa::tensor_view<const float> t{buffer.data(), 1, 32, 1, 8};
  fa::multihead_options opt;
  opt.threads = 2147483647;
  const auto e = expect_invalid([&] {
    fa::multihead_attention(fa::dense{}, t, t, t, fa::tensor_view<float>{out.data(), 1, 32, 1, 8},
                            opt);
  });
  EXPECT_EQ(e.argument(), "threads");
  EXPECT_NE(e.message().find("1024"), std::string::npos) << e.what();
}

// Item 11: extents whose product overflows are refused (before: UBSan overflow, null check
// bypassed, crash).
TEST(HardeningTensorView, OverflowingExtentsAreRefused) {
  float one = 0;
  const fa::tensor_view<const float> huge{nullptr, 1, fa::index{1} << 62, 4, 1};
  const fa::tensor_view<const float> small{&one, 1, 1, 1, 1};
  fa::tensor_view<float> out{&one, 1, 1, 1, 1};
  EXPECT_EQ(expect_invalid([&] {
              fa::multihead_attention(fa::dense{}, huge, small, small, out);
            }).argument(),
            "q");
  const fa::tensor_view<const float> strided{&one, 2, 2, 1, 1, fa::index{1} << 62};
  EXPECT_EQ(expect_invalid([&] {
              fa::multihead_attention(fa::dense{}, strided, small, small, out);
            }).argument(),
            "q");
  // An output whose heads overlap each other would be written twice: refused.
  std::vector<float> buffer(64);
  const fa::tensor_view<const float> q2{buffer.data(), 1, 4, 2, 4};
  std::vector<float> o2(64);
  EXPECT_EQ(expect_invalid([&] {
              fa::multihead_attention(fa::dense{}, q2, q2, q2,
                                      fa::tensor_view<float>{o2.data(), 1, 4, 2, 4, 4, 0, 2});
            }).argument(),
            "out");
}

// Item 10: improved_clustered with clusters >= L kept a C x S = L x S matrix (192 MiB of scratch
// at N = 4096); now its scratch is O((64 + k) S) whatever C and k are.
TEST(HardeningImproved, ScratchStaysLinearWithOneClusterPerQuery) {
  const fa::index N = 4096;
  const auto in = fa::testing::make_peaked<float>(N, N, 16, 16, 19);
  fa::release_scratch();
  const fa::matrix<float> o =
      fa::attention(fa::improved_clustered{.clusters = N, .iterations = 2}, in.q, in.k, in.v);
  EXPECT_TRUE(o.allFinite());
  // An N x N float matrix is 64 MiB; the bound below is (64 + 32) x N floats plus the member and
  // clustering scratch, with room to spare.
  EXPECT_LT(fa::scratch_bytes(), std::size_t{8} << 20);
  // topk = S with one cluster holding everything: exact, and still no L x S scratch.
  fa::release_scratch();
  const fa::index n = 2048;
  const auto small = fa::testing::make_peaked<float>(n, n, 16, 16, 20);
  const fa::matrix<float> exact =
      fa::attention(fa::improved_clustered{.clusters = 1, .topk = n}, small.q, small.k, small.v);
  EXPECT_LT(fa::testing::relative_error(
                exact, fa::testing::reference_attention(small.q, small.k, small.v)),
            1e-5);
  EXPECT_LT(fa::scratch_bytes(), std::size_t{n} * n * sizeof(float) / 2);
}

// Item 15: an identical second call allocates nothing, for every kernel, and the arena keeps at
// most its peak need (the 64 KiB first block aside).
TYPED_TEST(Hardening, RepeatedCallsAllocateNothing) {
  const auto in = fa::testing::make_peaked<float>(700, 600, 32, 16, 21);
  fa::matrix<float> out(700, 16);
  const fa::options opt{.key_length = 590, .query_length = 690};
  fa::attention(TypeParam{}, in.q, in.k, in.v, fa::view<float>(out), opt);
  counting = true;
  allocations = 0;
  fa::attention(TypeParam{}, in.q, in.k, in.v, fa::view<float>(out), opt);
  counting = false;
  EXPECT_EQ(allocations, 0) << TypeParam::name;
  const std::size_t peak = fa::detail::arena::local().peak();
  EXPECT_LE(fa::scratch_bytes(), std::max<std::size_t>(peak, std::size_t{1} << 16));
}

}  // namespace
