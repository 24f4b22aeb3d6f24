// Determinism report (issue #7), typed over fastattn::kernels and the fifth kernel: every kernel
// gives identical bits when run twice with the same seed, on 1 and on 2 threads through
// multihead_attention (B = 2, H = 3), and whatever the thread's scratch arena held before; for the
// randomised ones (a `seed` knob) a different seed gives a different output in every head.
#include "common.hpp"

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using fa::index;
using namespace fa::testing;

template <class Case>
class Determinism : public ::testing::Test {};
TYPED_TEST_SUITE(Determinism, fa::testing::kernel_cases<fa::testing::tested_kernels>::type,
                 fa::testing::kernel_names);

// (B, L, H, E) buffers with peaked contents and per-sample lengths.
template <class T>
struct problem {
  static constexpr index B = 2, H = 3, L = 150, S = 130, E = 12, M = 10;
  std::vector<T> q, k, v;
  std::vector<index> query_lengths{L, L - 17}, key_lengths{S - 9, S};

  problem() {
    const auto in = fa::testing::make_peaked<T>(B * L * H, B * S * H, E, M, 77, 6);
    q.assign(in.q.data(), in.q.data() + in.q.size());
    k.assign(in.k.data(), in.k.data() + in.k.size());
    v.assign(in.v.data(), in.v.data() + in.v.size());
  }

  fa::tensor_view<const T> queries() const { return {q.data(), B, L, H, E}; }
  fa::tensor_view<const T> keys() const { return {k.data(), B, S, H, E}; }
  fa::tensor_view<const T> values() const { return {v.data(), B, S, H, M}; }
  static fa::tensor_view<const T> output(const std::vector<T>& out) {
    return {out.data(), B, L, H, M};
  }

  template <class P>
  std::vector<T> run(const P& policy, int threads) const {
    std::vector<T> out(static_cast<std::size_t>(B * L * H * M), T(-1));
    fa::multihead_options opt;
    opt.threads = threads;
    opt.query_lengths = query_lengths;
    opt.key_lengths = key_lengths;
    fa::multihead_attention(policy, queries(), keys(), values(),
                            fa::tensor_view<T>{out.data(), B, L, H, M}, opt);
    return out;
  }
};

TYPED_TEST(Determinism, SameSeedSameBitsOnOneAndTwoThreads) {
  using P = typename TypeParam::policy;
  using T = typename TypeParam::scalar;
  const problem<T> pb;
  const P policy = with_seed<P>(42);
  const auto one = pb.run(policy, 1);
  const auto again = pb.run(policy, 1);
  const auto two = pb.run(policy, 2);
  const auto two_again = pb.run(policy, 2);
  const auto defaults = pb.run(policy, 0);
  EXPECT_TRUE(same_bits(one, again)) << "two runs on 1 thread differ";
  EXPECT_TRUE(same_bits(one, two)) << "1 thread and 2 threads differ";
  EXPECT_TRUE(same_bits(two, two_again)) << "two runs on 2 threads differ";
  EXPECT_TRUE(same_bits(one, defaults)) << "1 thread and OpenMP's default differ";
  for (const T x : one) ASSERT_TRUE(std::isfinite(static_cast<double>(x)));
}

// One long head (B = H = 1) on 2 threads: the head's own query blocks, hash blocks, k-means
// chunks and clusters are shared by the threads (detail/parallel.hpp), and the bits must not
// move. L is past the k-means chunk (1024 hashes) and many query blocks; plain and causal.
TYPED_TEST(Determinism, OneHeadSplitAcrossThreadsGivesTheSameBits) {
  using P = typename TypeParam::policy;
  using T = typename TypeParam::scalar;
  const index L = 1500, E = 16, M = 16;
  const auto in = fa::testing::make_peaked<T>(L, L, E, M, 91, 8);
  const P policy = with_seed<P>(7);
  const std::vector<index> lengths{L - 3};
  for (const bool causal : {false, true}) {
    if (causal && !fa::causal_capable<P>) continue;
    auto run = [&](int threads) {
      std::vector<T> out(static_cast<std::size_t>(L * M), T(-1));
      fa::multihead_options opt;
      opt.threads = threads;
      opt.common.causal = causal;
      opt.query_lengths = lengths;
      fa::multihead_attention(policy, fa::tensor_view<const T>{in.q.data(), 1, L, 1, E},
                              fa::tensor_view<const T>{in.k.data(), 1, L, 1, E},
                              fa::tensor_view<const T>{in.v.data(), 1, L, 1, M},
                              fa::tensor_view<T>{out.data(), 1, L, 1, M}, opt);
      return out;
    };
    const auto one = run(1), two = run(2);
    EXPECT_TRUE(same_bits(one, two)) << "causal=" << causal;
    for (const T x : one) ASSERT_TRUE(std::isfinite(static_cast<double>(x)));
  }
}

TYPED_TEST(Determinism, DifferentSeedsDiffer) {
  using P = typename TypeParam::policy;
  using T = typename TypeParam::scalar;
  if constexpr (!requires(P p) { p.seed; }) {
    GTEST_SKIP() << P::name << " draws nothing at random";
  }
  const problem<T> pb;
  const auto a = pb.run(with_seed<P>(1), 2);
  const auto b = pb.run(with_seed<P>(2), 2);
  EXPECT_FALSE(same_bits(a, b));
  // Every (sample, head) is randomised on its own stream: each head's output moves with the seed.
  for (index s = 0; s < pb.B; ++s)
    for (index h = 0; h < pb.H; ++h)
      EXPECT_FALSE(same_bits(fa::testing::copy_head(pb.output(a), s, h),
                             fa::testing::copy_head(pb.output(b), s, h)))
          << "sample " << s << " head " << h << " does not depend on the seed";
}

TYPED_TEST(Determinism, FrontDoorRepeatsAndIgnoresTheArenaHistory) {
  using P = typename TypeParam::policy;
  using T = typename TypeParam::scalar;
  const auto in = fa::testing::make_peaked<T>(210, 190, 16, 8, 5, 7);
  const P policy = with_seed<P>(7);
  const auto first = fa::attention(policy, in.q, in.k, in.v);
  // A larger and a smaller problem in between leave the thread's scratch arena in other states.
  const auto big = fa::testing::make_peaked<T>(700, 650, 24, 20, 6, 7);
  (void)fa::attention(policy, big.q, big.k, big.v);
  const auto small = fa::testing::make_peaked<T>(9, 4, 3, 2, 8, 2);
  (void)fa::attention(policy, small.q, small.k, small.v);
  const auto second = fa::attention(policy, in.q, in.k, in.v);
  EXPECT_TRUE(same_bits(first, second));
  // The front door uses stream 0: it equals head (0, 0) of the multi-head driver.
  const problem<T> pb;
  const auto multi = pb.run(policy, 2);
  const auto head00 = fa::attention(
      policy, fa::testing::copy_head(pb.queries(), 0, 0), fa::testing::copy_head(pb.keys(), 0, 0),
      fa::testing::copy_head(pb.values(), 0, 0),
      {.key_length = pb.key_lengths[0], .query_length = pb.query_lengths[0]});
  EXPECT_TRUE(same_bits(head00, fa::testing::copy_head(pb.output(multi), 0, 0)));
}

}  // namespace

namespace {

// One query block (up to 128 rows: dense's default query_block, clustered's 100 centroids) over
// many key blocks: the fused kernel cuts its key blocks into runs by the key count alone (here
// 8 runs for dense at key_block 32 on 4321 valid keys, 2 for clustered's centroids at 512 keys a
// block on them), streams each into its own softmax state and merges them in order, on any
// number of threads. The bits do not depend on the thread count, dense stays exact (against the
// float64 reference and against the same problem in one-row query blocks, which streams every
// key block through one state), and a NaN value in any run reaches every row.
TEST(DeterminismOneBlock, KeyRunsGiveTheSameBitsOnAnyThreadCount) {
  using T = double;
  const index L = 40, S = 4600, E = 16, M = 16;
  const auto in = fa::testing::make_peaked<T>(L, S, E, M, 93, 8);
  const std::vector<index> query_lengths{L - 3}, key_lengths{4321};
  auto run = [&](const auto& policy, int threads, const fa::matrix<T>& v) {
    fa::matrix<T> out = fa::matrix<T>::Constant(L, M, T(-1));
    fa::multihead_options opt;
    opt.threads = threads;
    opt.common.check_finite = false;
    opt.query_lengths = query_lengths;
    opt.key_lengths = key_lengths;
    fa::multihead_attention(policy, fa::tensor_view<const T>{in.q.data(), 1, L, 1, E},
                            fa::tensor_view<const T>{in.k.data(), 1, S, 1, E},
                            fa::tensor_view<const T>{v.data(), 1, S, 1, M},
                            fa::tensor_view<T>{out.data(), 1, L, 1, M}, opt);
    return out;
  };
  const fa::dense dense{.query_block = 128, .key_block = 32};
  const auto one = run(dense, 1, in.v);
  for (const int threads : {2, 3}) EXPECT_EQ(run(dense, threads, in.v), one) << threads;
  const index Lv = query_lengths[0], Sv = key_lengths[0];
  const auto ref = reference_attention(in.q.topRows(Lv).eval(), in.k.topRows(Sv).eval(),
                                       in.v.topRows(Sv).eval());
  EXPECT_LT(relative_error(one.topRows(Lv).eval(), ref), 1e-13);
  const auto streamed = run(fa::dense{.query_block = 1, .key_block = 32}, 2, in.v);
  EXPECT_LT(relative_error(one.topRows(Lv).eval(), streamed.topRows(Lv).eval()), 1e-14);

  fa::clustered clustered;
  clustered.clusters = 30;  // 30 centroids of the 37 valid queries: one block
  const auto c_one = run(clustered, 1, in.v);
  for (const int threads : {2, 3}) EXPECT_EQ(run(clustered, threads, in.v), c_one) << threads;

  for (const index j : {0, 31, 32, 1500, 4320}) {  // first, last of the first block; later runs
    fa::matrix<T> v = in.v;
    v(j, M - 1) = std::numeric_limits<T>::quiet_NaN();
    for (const int threads : {1, 2}) {
      const auto o = run(dense, threads, v);
      for (index i = 0; i < Lv; ++i)
        EXPECT_FALSE(o.row(i).allFinite()) << "key " << j << ", row " << i << ", " << threads;
    }
  }
}

}  // namespace
