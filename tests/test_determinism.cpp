// Determinism report (issue #7): every randomised kernel gives identical bits when run twice with
// the same seed, on 1 and on 2 threads through multihead_attention (B = 2, H = 3), and whatever
// the thread's scratch arena held before; a different seed gives a different output.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include <fastattn/clustered.hpp>
#include <fastattn/dense.hpp>
#include <fastattn/improved_clustered.hpp>
#include <fastattn/multihead.hpp>
#include <fastattn/smyrf.hpp>

#include "reference.hpp"

namespace fa = fastattn;

namespace {

[[maybe_unused]] const bool eigen_single_threaded = (Eigen::setNbThreads(1), true);

using fa::index;

template <class P>
P with_seed(std::uint64_t seed) {
  if constexpr (std::is_same_v<P, fa::clustered>)
    return fa::clustered{.clusters = 9, .seed = seed};
  else if constexpr (std::is_same_v<P, fa::improved_clustered>)
    return fa::improved_clustered{.clusters = 9, .seed = seed, .topk = 8};
  else
    return fa::smyrf{.hashes = 3, .cluster_size = 16, .seed = seed};
}

template <class P, class T>
struct kernel_case {
  using policy = P;
  using scalar = T;
};

template <class Case>
class Determinism : public ::testing::Test {};

using Cases =
    ::testing::Types<kernel_case<fa::clustered, float>, kernel_case<fa::clustered, double>,
                     kernel_case<fa::improved_clustered, float>,
                     kernel_case<fa::improved_clustered, double>, kernel_case<fa::smyrf, float>,
                     kernel_case<fa::smyrf, double>>;

struct case_names {
  template <class Case>
  static std::string GetName(int) {
    return std::string(Case::policy::name) +
           (std::is_same_v<typename Case::scalar, float> ? "_float" : "_double");
  }
};

TYPED_TEST_SUITE(Determinism, Cases, case_names);

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

  template <class P>
  std::vector<T> run(const P& policy, int threads) const {
    std::vector<T> out(static_cast<std::size_t>(B * L * H * M), T(-1));
    fa::multihead_options opt;
    opt.threads = threads;
    opt.query_lengths = query_lengths;
    opt.key_lengths = key_lengths;
    fa::multihead_attention(policy, fa::tensor_view<const T>{q.data(), B, L, H, E},
                            fa::tensor_view<const T>{k.data(), B, S, H, E},
                            fa::tensor_view<const T>{v.data(), B, S, H, M},
                            fa::tensor_view<T>{out.data(), B, L, H, M}, opt);
    return out;
  }
};

// Bitwise equality (NaN-safe, and -0 != +0): memcmp of the buffers.
template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

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

TYPED_TEST(Determinism, DifferentSeedsDiffer) {
  using P = typename TypeParam::policy;
  using T = typename TypeParam::scalar;
  const problem<T> pb;
  const auto a = pb.run(with_seed<P>(1), 2);
  const auto b = pb.run(with_seed<P>(2), 2);
  EXPECT_FALSE(same_bits(a, b));
  // Every (sample, head) is randomised on its own stream: each head's output moves with the seed.
  using B = problem<T>;
  for (index b_ = 0; b_ < B::B; ++b_)
    for (index h = 0; h < B::H; ++h) {
      bool differs = false;
      for (index t = 0; t < B::L && !differs; ++t)
        for (index m = 0; m < B::M; ++m) {
          const auto at = static_cast<std::size_t>(((b_ * B::L + t) * B::H + h) * B::M + m);
          if (std::memcmp(&a[at], &b[at], sizeof(T)) != 0) {
            differs = true;
            break;
          }
        }
      EXPECT_TRUE(differs) << "sample " << b_ << " head " << h << " does not depend on the seed";
    }
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
  ASSERT_EQ(first.size(), second.size());
  EXPECT_EQ(
      std::memcmp(first.data(), second.data(), sizeof(T) * static_cast<std::size_t>(first.size())),
      0);
  // The front door uses stream 0: it equals head (0, 0) of the multi-head driver.
  const problem<T> pb;
  const auto multi = pb.run(policy, 2);
  using B = problem<T>;
  fa::matrix<T> q0(B::L, B::E), k0(B::S, B::E), v0(B::S, B::M);
  for (index t = 0; t < B::L; ++t)
    for (index e = 0; e < B::E; ++e) q0(t, e) = pb.q[static_cast<std::size_t>(t * B::H * B::E + e)];
  for (index t = 0; t < B::S; ++t) {
    for (index e = 0; e < B::E; ++e) k0(t, e) = pb.k[static_cast<std::size_t>(t * B::H * B::E + e)];
    for (index m = 0; m < B::M; ++m) v0(t, m) = pb.v[static_cast<std::size_t>(t * B::H * B::M + m)];
  }
  const auto head00 = fa::attention(
      policy, q0, k0, v0, {.key_length = pb.key_lengths[0], .query_length = pb.query_lengths[0]});
  for (index t = 0; t < B::L; ++t)
    for (index m = 0; m < B::M; ++m)
      ASSERT_EQ(std::memcmp(&head00(t, m), &multi[static_cast<std::size_t>(t * B::H * B::M + m)],
                            sizeof(T)),
                0)
          << "row " << t << " col " << m;
}

// dense has no randomness, but the driver's scheduling must not change its bits either.
TEST(DeterminismDense, OneAndTwoThreadsSameBits) {
  const problem<float> pb;
  EXPECT_TRUE(same_bits(pb.run(fa::dense{}, 1), pb.run(fa::dense{}, 2)));
  const problem<double> pd;
  EXPECT_TRUE(same_bits(pd.run(fa::dense{}, 1), pd.run(fa::dense{}, 2)));
}

}  // namespace
