// The multi-head driver equals the per-head loop, honours per-sample lengths and strided views,
// is independent of the thread count, validates every argument before doing any work, locates
// its errors at the sample and head, and passes a kernel's exception on to the caller. (Knobs
// checked before any head runs, padding and empty samples: test_attention's typed suites.)
#include "common.hpp"

#include <random>
#include <stdexcept>
#include <vector>

namespace {

using fa::index;
using namespace fa::testing;

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
  const fa::tensor_view<float> to{out.data(), in.B, in.L, in.H, in.M};
  fa::multihead_attention(policy, in.qv(), in.kv(), in.vv(), to, opt);
  for (index b = 0; b < in.B; ++b)
    for (index h = 0; h < in.H; ++h) {
      const auto i = static_cast<std::size_t>(b);
      const fa::options o{.key_length = klen[i], .query_length = qlen[i], .causal = true};
      const auto expected = fa::attention(policy, copy_head(in.qv(), b, h),
                                          copy_head(in.kv(), b, h), copy_head(in.vv(), b, h), o);
      EXPECT_EQ(copy_head(to, b, h), expected) << "b=" << b << " h=" << h;
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

TEST(Multihead, RejectsBadArgumentsBeforeAnyWork) {
  const buffers in(2, 8, 8, 2, 4, 4);
  std::vector<float> out(static_cast<std::size_t>(2 * 8 * 2 * 4), 5.f);
  const fa::tensor_view<float> o{out.data(), 2, 8, 2, 4};
  const auto qv = in.qv();
  auto call = [&](auto q, auto k, auto v, auto outv, fa::multihead_options opt = {}) {
    return [=] { fa::multihead_attention(fa::dense{}, q, k, v, outv, opt); };
  };
  auto bad_batch = qv;
  bad_batch.batch = 1;
  EXPECT_TRUE(throws_invalid_argument(call(bad_batch, in.kv(), in.vv(), o), "batch",
                                      {"same batch size", "q 1, k 2"}));
  auto bad_heads = in.kv();
  bad_heads.heads = 1;
  EXPECT_TRUE(throws_invalid_argument(call(qv, bad_heads, in.vv(), o), "heads",
                                      {"heads", "q 2, k 1, v 2, out 2"}));
  auto bad_len = in.vv();
  bad_len.length = 7;
  EXPECT_TRUE(
      throws_invalid_argument(call(qv, in.kv(), bad_len, o), "v", {"same length", "k 8, v 7"}));
  auto bad_out = o;
  bad_out.dim = 3;
  EXPECT_TRUE(throws_invalid_argument(call(qv, in.kv(), in.vv(), bad_out), "out",
                                      {"out must be", "(2, 8, 2, 4)", "(2, 8, 2, 3)"}));
  // An output whose tokens overlap (token_stride 3 < heads x dim) would be written twice.
  auto overlapping = o;
  overlapping.token_stride = 3;
  EXPECT_TRUE(throws_invalid_argument(call(qv, in.kv(), in.vv(), overlapping), "out",
                                      {"overlap", "token_stride 3"}));
  auto negative_stride = qv;
  negative_stride.head_stride = -4;
  EXPECT_TRUE(throws_invalid_argument(call(negative_stride, in.kv(), in.vv(), o), "q",
                                      {"strides must be >= 0", "head_stride -4"}));
  const std::vector<index> one_len{8};
  fa::multihead_options short_lengths;
  short_lengths.key_lengths = one_len;
  EXPECT_TRUE(throws_invalid_argument(call(qv, in.kv(), in.vv(), o, short_lengths), "key_lengths",
                                      {"one entry per sample (2), got 1"}));
  const std::vector<index> too_long{8, 9};
  fa::multihead_options long_lengths;
  long_lengths.query_lengths = too_long;
  const auto located = fa::testing::error_of(call(qv, in.kv(), in.vv(), o, long_lengths));
  EXPECT_EQ(located.argument(), "query_length");
  EXPECT_EQ(located.sample(), index{1});
  EXPECT_FALSE(located.head().has_value());
  EXPECT_EQ(std::string(located.what()),
            "fastattn: sample 1: query_length must be in [0, L = 8], got 9");
  for (const int threads : {-1, fa::multihead_options::max_threads + 1}) {
    fa::multihead_options bad_threads;
    bad_threads.threads = threads;
    EXPECT_TRUE(throws_invalid_argument(call(qv, in.kv(), in.vv(), o, bad_threads), "threads",
                                        {"[0, 1024]", "got " + std::to_string(threads)}));
  }
  auto null_data = qv;
  null_data.data = nullptr;
  EXPECT_TRUE(throws_invalid_argument(call(null_data, in.kv(), in.vv(), o), "q", {"null"}));
  // Nothing was written by any of the failed calls.
  for (float x : out) ASSERT_EQ(x, 5.f);
}

// One head on two threads checks its values in chunks of rows on both (attention.hpp): the
// first non-finite value is still the one reported, in the same words as on one thread, and in
// whichever chunk the bad value and the larger finite values sit.
TEST(Multihead, OneHeadOnTwoThreadsReportsTheSameNonFiniteValue) {
  const index L = 9000;  // three chunks of 4096 rows
  for (const index bad_row : {index{10}, index{5000}, index{8999}}) {
    buffers in(1, L, L, 1, 4, 4);
    in.v[static_cast<std::size_t>(bad_row * 4 + 2)] = std::numeric_limits<float>::quiet_NaN();
    in.v[static_cast<std::size_t>(((bad_row + 4500) % L) * 4)] = 1e6f;  // elsewhere, large
    std::vector<float> out(static_cast<std::size_t>(L * 4), -1.0f);
    std::string words[2];
    for (const int threads : {1, 2}) {
      fa::multihead_options opt;
      opt.threads = threads;
      const auto e = fa::testing::error_of([&] {
        fa::multihead_attention(fa::dense{}, in.qv(), in.kv(), in.vv(),
                                fa::tensor_view<float>{out.data(), 1, L, 1, 4}, opt);
      });
      EXPECT_EQ(e.argument(), "v");
      words[threads - 1] = e.what();
    }
    EXPECT_EQ(words[0], words[1]);
    EXPECT_NE(words[0].find("at row " + std::to_string(bad_row) + ", column 2"), std::string::npos)
        << words[0];
    for (const float x : out) ASSERT_EQ(x, -1.0f);  // refused before any work
  }
}

TEST(Multihead, ErrorsNameTheSampleAndHeadAndOmitTheSampleWhenThereIsOne) {
  // A non-finite value in head (1, 1): located at sample 1, head 1.
  buffers in(2, 6, 6, 2, 4, 4);
  in.k[static_cast<std::size_t>(((1 * 6 + 2) * 2 + 1) * 4 + 3)] =
      std::numeric_limits<float>::infinity();
  std::vector<float> out(static_cast<std::size_t>(2 * 6 * 2 * 4));
  const auto e = fa::testing::error_of([&] {
    fa::multihead_attention(fa::dense{}, in.qv(), in.kv(), in.vv(),
                            fa::tensor_view<float>{out.data(), 2, 6, 2, 4});
  });
  EXPECT_EQ(e.argument(), "k");
  EXPECT_EQ(e.sample(), index{1});
  EXPECT_EQ(e.head(), index{1});
  EXPECT_EQ(std::string(e.what()).rfind("fastattn: sample 1, head 1: k has a non-finite value", 0),
            0u)
      << e.what();
  // B = 1: the sample is omitted, the head is kept.
  buffers one(1, 6, 6, 2, 4, 4);
  one.q[static_cast<std::size_t>((3 * 2 + 1) * 4)] = std::numeric_limits<float>::quiet_NaN();
  const auto e1 = fa::testing::error_of([&] {
    fa::multihead_attention(fa::dense{}, one.qv(), one.kv(), one.vv(),
                            fa::tensor_view<float>{out.data(), 1, 6, 2, 4});
  });
  EXPECT_EQ(e1.argument(), "q");
  EXPECT_FALSE(e1.sample().has_value());
  EXPECT_EQ(e1.head(), index{1});
  EXPECT_EQ(std::string(e1.what()).rfind("fastattn: head 1: q has a non-finite value", 0), 0u)
      << e1.what();
  const std::vector<index> too_long{7};
  fa::multihead_options opt;
  opt.key_lengths = too_long;
  EXPECT_EQ(std::string(fa::testing::error_of([&] {
                          fa::multihead_attention(fa::dense{}, one.qv(), one.kv(), one.vv(),
                                                  fa::tensor_view<float>{out.data(), 1, 6, 2, 4},
                                                  opt);
                        }).what()),
            "fastattn: key_length must be in [0, S = 6], got 7");
}

TEST(Multihead, HeadStrideViewsAHeadsMajorBuffer) {
  // (B, H, L, E) buffers: head_stride = L x E, token_stride = E, batch_stride = H x L x E.
  const index B = 2, H = 3, L = 11, S = 9, E = 4, M = 5;
  const buffers packed(B, L, S, H, E, M);
  std::vector<float> q(packed.q.size()), k(packed.k.size()), v(packed.v.size());
  auto to_heads_major = [&](const std::vector<float>& from, std::vector<float>& to, index len,
                            index dim) {
    for (index b = 0; b < B; ++b)
      for (index t = 0; t < len; ++t)
        for (index h = 0; h < H; ++h)
          for (index e = 0; e < dim; ++e)
            to[static_cast<std::size_t>(((b * H + h) * len + t) * dim + e)] =
                from[static_cast<std::size_t>(((b * len + t) * H + h) * dim + e)];
  };
  to_heads_major(packed.q, q, L, E);
  to_heads_major(packed.k, k, S, E);
  to_heads_major(packed.v, v, S, M);
  auto heads_major = [&](auto* data, index len, index dim) {
    return fa::tensor_view<std::remove_pointer_t<decltype(data)>>{
        data, B, len, H, dim, dim, H * len * dim, len * dim};
  };
  std::vector<float> expected(static_cast<std::size_t>(B * L * H * M)), out(expected.size());
  const fa::tensor_view<float> packed_out{expected.data(), B, L, H, M};
  const fa::clustered policy{.clusters = 3, .seed = 4};
  fa::multihead_attention(policy, packed.qv(), packed.kv(), packed.vv(), packed_out);
  const auto out_view = heads_major(out.data(), L, M);
  fa::multihead_attention(policy, heads_major(static_cast<const float*>(q.data()), L, E),
                          heads_major(static_cast<const float*>(k.data()), S, E),
                          heads_major(static_cast<const float*>(v.data()), S, M), out_view);
  for (index b = 0; b < B; ++b)
    for (index h = 0; h < H; ++h)
      EXPECT_EQ(copy_head(out_view, b, h), copy_head(packed_out, b, h)) << b << ", " << h;
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

// A policy whose compute throws for one head: the exception crosses the parallel region and
// reaches the caller, whatever the thread count.
struct throws_in_head {
  static constexpr std::string_view name = "throws_in_head";
  static constexpr bool is_exact = false;
  static constexpr bool supports_causal = false;
  template <class T>
  void compute(fa::const_view<T>, fa::const_view<T>, fa::const_view<T>, fa::view<T> out,
               const fa::context& ctx) const {
    if (ctx.stream == 3) throw std::runtime_error("head 3 failed");
    out.topRows(ctx.query_length).setZero();
  }
};

TEST(Multihead, ExceptionsInsideAKernelReachTheCaller) {
  const buffers in(2, 8, 8, 2, 4, 4);
  std::vector<float> out(static_cast<std::size_t>(2 * 8 * 2 * 4));
  for (const int threads : {1, 2}) {
    fa::multihead_options opt;
    opt.threads = threads;
    EXPECT_THROW(fa::multihead_attention(throws_in_head{}, in.qv(), in.kv(), in.vv(),
                                         fa::tensor_view<float>{out.data(), 2, 8, 2, 4}, opt),
                 std::runtime_error)
        << threads << " threads";
  }
}

}  // namespace
