// The multi-head driver equals the per-head loop, honours per-sample lengths and strided views,
// is independent of the thread count, and validates every argument before doing any work.
#include <gtest/gtest.h>

#include <fastattn/fastattn.hpp>

#include <vector>

#include "reference.hpp"

namespace fa = fastattn;

namespace {

using fa::index;

struct buffers {
  index B, L, S, H, E, M;
  std::vector<float> q, k, v;
  buffers(index b, index l, index s, index h, index e, index m)
      : B(b), L(l), S(s), H(h), E(e), M(m) {
    std::mt19937_64 gen(99);
    std::normal_distribution<float> normal;
    q.resize(static_cast<std::size_t>(B * L * H * E));
    k.resize(static_cast<std::size_t>(B * S * H * E));
    v.resize(static_cast<std::size_t>(B * S * H * M));
    for (auto* x : {&q, &k, &v})
      for (auto& y : *x) y = normal(gen);
  }
  fa::tensor_view<const float> qv() const { return {q.data(), B, L, H, E}; }
  fa::tensor_view<const float> kv() const { return {k.data(), B, S, H, E}; }
  fa::tensor_view<const float> vv() const { return {v.data(), B, S, H, M}; }
  // Copies head (b, h) out of a (B, len, H, dim) buffer: what the driver must avoid doing.
  static fa::matrix<float> head(const std::vector<float>& x, index b, index h, index len,
                                index heads, index dim) {
    fa::matrix<float> m(len, dim);
    for (index t = 0; t < len; ++t)
      for (index e = 0; e < dim; ++e)
        m(t, e) = x[static_cast<std::size_t>(((b * len + t) * heads + h) * dim + e)];
    return m;
  }
};

TEST(Multihead, EqualsThePerHeadLoopWithPerSampleLengths) {
  const buffers in(3, 37, 45, 4, 16, 8);
  std::vector<float> out(static_cast<std::size_t>(in.B * in.L * in.H * in.M), -1.f);
  const std::vector<index> qlen{37, 20, 0}, klen{45, 1, 30};
  fa::multihead_options opt;
  opt.query_lengths = qlen;
  opt.key_lengths = klen;
  opt.common.causal = true;
  const fa::dense policy{.query_block = 8, .key_block = 16};
  fa::multihead_attention(policy, in.qv(), in.kv(), in.vv(),
                          fa::tensor_view<float>{out.data(), in.B, in.L, in.H, in.M}, opt);
  for (index b = 0; b < in.B; ++b)
    for (index h = 0; h < in.H; ++h) {
      const auto q = buffers::head(in.q, b, h, in.L, in.H, in.E);
      const auto k = buffers::head(in.k, b, h, in.S, in.H, in.E);
      const auto v = buffers::head(in.v, b, h, in.S, in.H, in.M);
      const fa::options o{.key_length = klen[b], .query_length = qlen[b], .causal = true};
      const auto expected = fa::attention(policy, q, k, v, o);
      const auto got = buffers::head(out, b, h, in.L, in.H, in.M);
      EXPECT_EQ(got, expected) << "b=" << b << " h=" << h;
    }
}

TEST(Multihead, ThreadCountDoesNotChangeBits) {
  const buffers in(2, 64, 64, 8, 32, 32);
  std::vector<float> one(static_cast<std::size_t>(in.B * in.L * in.H * in.M)), two(one.size());
  fa::multihead_options opt;
  opt.threads = 1;
  fa::multihead_attention(fa::dense{}, in.qv(), in.kv(), in.vv(),
                          fa::tensor_view<float>{one.data(), in.B, in.L, in.H, in.M}, opt);
  opt.threads = 2;
  fa::multihead_attention(fa::dense{}, in.qv(), in.kv(), in.vv(),
                          fa::tensor_view<float>{two.data(), in.B, in.L, in.H, in.M}, opt);
  EXPECT_EQ(one, two);
}

TEST(Multihead, ViewsIntoAFusedQkvBuffer) {
  // A (B, L, 3 * H * E) projection output: q, k and v are views with token_stride 3 * H * E.
  const index B = 2, L = 19, H = 3, E = 8;
  std::vector<double> qkv(static_cast<std::size_t>(B * L * 3 * H * E));
  std::mt19937_64 gen(5);
  std::normal_distribution<double> normal;
  for (auto& x : qkv) x = normal(gen);
  const index stride = 3 * H * E;
  const fa::tensor_view<const double> q{qkv.data(), B, L, H, E, stride};
  const fa::tensor_view<const double> k{qkv.data() + H * E, B, L, H, E, stride};
  const fa::tensor_view<const double> v{qkv.data() + 2 * H * E, B, L, H, E, stride};
  std::vector<double> out(static_cast<std::size_t>(B * L * H * E));
  fa::multihead_attention(fa::dense{}, q, k, v, fa::tensor_view<double>{out.data(), B, L, H, E});
  for (index b = 0; b < B; ++b)
    for (index h = 0; h < H; ++h) {
      fa::testing::matd qh(L, E), kh(L, E), vh(L, E), oh(L, E);
      for (index t = 0; t < L; ++t)
        for (index e = 0; e < E; ++e) {
          const auto base = static_cast<std::size_t>((b * L + t) * stride + h * E + e);
          qh(t, e) = qkv[base];
          kh(t, e) = qkv[base + static_cast<std::size_t>(H * E)];
          vh(t, e) = qkv[base + static_cast<std::size_t>(2 * H * E)];
          oh(t, e) = out[static_cast<std::size_t>(((b * L + t) * H + h) * E + e)];
        }
      EXPECT_LT(fa::testing::relative_error(oh, fa::testing::reference_attention(qh, kh, vh)),
                1e-12);
    }
}

TEST(Multihead, RejectsBadShapesBeforeAnyWork) {
  const buffers in(2, 8, 8, 2, 4, 4);
  std::vector<float> out(static_cast<std::size_t>(2 * 8 * 2 * 4), 5.f);
  const fa::tensor_view<float> o{out.data(), 2, 8, 2, 4};
  auto qv = in.qv();
  auto expect_throw = [&](auto q, auto k, auto v, auto outv, fa::multihead_options opt,
                          const char* word) {
    try {
      fa::multihead_attention(fa::dense{}, q, k, v, outv, opt);
      ADD_FAILURE() << "expected invalid_argument mentioning " << word;
    } catch (const fa::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(word), std::string::npos) << e.what();
    }
  };
  auto bad_batch = qv;
  bad_batch.batch = 1;
  expect_throw(bad_batch, in.kv(), in.vv(), o, {}, "batch size");
  auto bad_heads = in.kv();
  bad_heads.heads = 1;
  expect_throw(qv, bad_heads, in.vv(), o, {}, "heads");
  auto bad_len = in.vv();
  bad_len.length = 7;
  expect_throw(qv, in.kv(), bad_len, o, {}, "same length");
  auto bad_out = o;
  bad_out.dim = 3;
  expect_throw(qv, in.kv(), in.vv(), bad_out, {}, "out must be");
  auto bad_stride = qv;
  bad_stride.token_stride = 3;
  expect_throw(bad_stride, in.kv(), in.vv(), o, {}, "token_stride");
  const std::vector<index> one_len{8};
  fa::multihead_options short_lengths;
  short_lengths.key_lengths = one_len;
  expect_throw(qv, in.kv(), in.vv(), o, short_lengths, "key_lengths");
  const std::vector<index> too_long{8, 9};
  fa::multihead_options long_lengths;
  long_lengths.query_lengths = too_long;
  expect_throw(qv, in.kv(), in.vv(), o, long_lengths, "sample 1: query_length");
  fa::multihead_options neg_threads;
  neg_threads.threads = -1;
  expect_throw(qv, in.kv(), in.vv(), o, neg_threads, "threads");
  auto null_data = qv;
  null_data.data = nullptr;
  expect_throw(null_data, in.kv(), in.vv(), o, {}, "null");
  // Nothing was written by any of the failed calls.
  for (float x : out) ASSERT_EQ(x, 5.f);
}

// Empty tensors (length or dim 0) may have null data: accepted, nothing read, no pointer
// arithmetic on null (UBSan's pointer-overflow check watches this in the sanitizer build).
TEST(Multihead, EmptyTensorsWithNullDataAreAccepted) {
  const index B = 2, L = 5, H = 3, E = 4;
  const buffers in(B, L, 0, H, E, 0);
  // S = 0: k and v empty and null; M = 0: out empty and null. Every query row gets no key.
  fa::multihead_attention(fa::dense{}, in.qv(), fa::tensor_view<const float>{nullptr, B, 0, H, E},
                          fa::tensor_view<const float>{nullptr, B, 0, H, 0},
                          fa::tensor_view<float>{nullptr, B, L, H, 0});
  // L = 0 with null q and out, keys present.
  const buffers keys(B, 0, 6, H, E, 2);
  fa::multihead_attention(fa::dense{}, fa::tensor_view<const float>{nullptr, B, 0, H, E}, keys.kv(),
                          keys.vv(), fa::tensor_view<float>{nullptr, B, 0, H, 2});
  EXPECT_EQ((fa::tensor_view<const float>{nullptr, B, 0, H, E}.head(1, 2)), nullptr);
}

TEST(Multihead, ErrorsInsideAKernelReachTheCaller) {
  const buffers in(2, 8, 8, 2, 4, 4);
  std::vector<float> out(static_cast<std::size_t>(2 * 8 * 2 * 4));
  EXPECT_THROW(fa::multihead_attention(fa::dense{.key_block = 0}, in.qv(), in.kv(), in.vv(),
                                       fa::tensor_view<float>{out.data(), 2, 8, 2, 4}),
               fa::invalid_argument);
}

}  // namespace
