// libFuzzer target: the front door (fastattn::attention) and the multi-head driver with a random
// kernel, random shapes (<= 64), options, lengths and knobs (valid and invalid), and scalar values
// including NaN, infinities, denormals and 1e30.
//
// Properties checked on every input:
// - the only exception ever thrown is fastattn::invalid_argument;
// - it is thrown exactly when the arguments are invalid (shapes, lengths, scale, causal, knobs,
//   or, with check_finite, a non-finite value in a valid row) -- this harness recomputes the rule;
// - on success with bounded inputs the output is finite, padded rows are zero and every valid row
//   lies in the range of the valid values (all kernels take convex combinations); dense, and the
//   approximate kernels with knobs that make them exact, match the float64 oracle.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include <fuzzer/FuzzedDataProvider.h>

#include <fastattn/clustered.hpp>
#include <fastattn/dense.hpp>
#include <fastattn/improved_clustered.hpp>
#include <fastattn/multihead.hpp>
#include <fastattn/smyrf.hpp>

#include "reference.hpp"

namespace fa = fastattn;

namespace {

using fa::index;  // inside the namespace: ::index from <strings.h> would clash

[[noreturn]] void violation(const char* what) {
  std::fprintf(stderr, "fuzz_attention: property violated: %s\n", what);
  std::abort();
}

template <class T>
T special_value(FuzzedDataProvider& in) {
  using lim = std::numeric_limits<T>;
  switch (in.ConsumeIntegralInRange<int>(0, 15)) {
    case 0:
      return T(0);
    case 1:
      return -T(0);
    case 2:
      return T(1);
    case 3:
      return T(-1);
    case 4:
      return lim::quiet_NaN();
    case 5:
      return lim::infinity();
    case 6:
      return -lim::infinity();
    case 7:
      return lim::denorm_min();
    case 8:
      return -lim::denorm_min() * T(3);
    case 9:
      return lim::min();
    case 10:
      return static_cast<T>(1e30);
    case 11:
      return static_cast<T>(-1e30);
    case 12:
      return lim::max();
    case 13:
      return lim::lowest();
    case 14:
      return static_cast<T>(in.ConsumeFloatingPointInRange<double>(-1e4, 1e4));
    default: {
      if constexpr (std::is_same_v<T, float>)
        return std::bit_cast<float>(in.ConsumeIntegral<std::uint32_t>());
      else
        return std::bit_cast<double>(in.ConsumeIntegral<std::uint64_t>());
    }
  }
}

// Fills `data` from a small palette, a seeded Gaussian, or raw bytes, then pokes a few values.
template <class T>
void fill(FuzzedDataProvider& in, std::vector<T>& data) {
  const int mode = in.ConsumeIntegralInRange<int>(0, 2);
  std::uint64_t state = in.ConsumeIntegral<std::uint64_t>() | 1;
  auto next = [&state] {  // xorshift64
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  };
  if (mode == 0) {
    T palette[4];
    for (T& p : palette) p = special_value<T>(in);
    for (T& x : data) x = palette[next() % 4];
  } else if (mode == 1) {
    const double sigma = in.ConsumeFloatingPointInRange<double>(0.0, 10.0);
    for (T& x : data)
      x = static_cast<T>(sigma * (static_cast<double>(next() % 20001) / 10000.0 - 1.0));
  } else {
    for (T& x : data) x = in.remaining_bytes() ? special_value<T>(in) : T(0);
  }
  const int pokes = in.ConsumeIntegralInRange<int>(0, 3);
  for (int p = 0; p < pokes && !data.empty(); ++p)
    data[in.ConsumeIntegralInRange<std::size_t>(0, data.size() - 1)] = special_value<T>(in);
}

index knob_index(FuzzedDataProvider& in, index lo, index hi) {
  switch (in.ConsumeIntegralInRange<int>(0, 7)) {
    case 0:
      return -1;
    case 1:
      return 0;
    case 2:
      return std::numeric_limits<index>::min();
    case 3:
      return index{0xFFFFFFFF};  // largest accepted clusters
    case 4:
      return index{0x100000000};  // first rejected clusters
    default:
      return in.ConsumeIntegralInRange<index>(lo, hi);
  }
}

int knob_int(FuzzedDataProvider& in, int lo, int hi) {
  switch (in.ConsumeIntegralInRange<int>(0, 5)) {
    case 0:
      return -1;
    case 1:
      return 0;
    case 2:
      return std::numeric_limits<int>::min();
    default:
      return in.ConsumeIntegralInRange<int>(lo, hi);
  }
}

// What the harness needs from a kernel: the policy, whether its knobs are valid, whether it is
// exact for these lengths.
struct kernel_choice {
  int id = 0;
  fa::dense d;
  fa::clustered c;
  fa::improved_clustered ic;
  fa::smyrf s;
};

kernel_choice choose_kernel(FuzzedDataProvider& in) {
  kernel_choice k;
  k.id = in.ConsumeIntegralInRange<int>(0, 3);
  switch (k.id) {
    case 0:
      k.d.query_block = knob_index(in, 1, 70);
      k.d.key_block = knob_index(in, 1, 70);
      break;
    case 1:
      k.c.clusters = knob_index(in, 1, 70);
      k.c.bits = knob_int(in, 1, 66);
      k.c.iterations = knob_int(in, 1, 12);
      k.c.hash_bias = in.ConsumeBool();
      k.c.seed = in.ConsumeIntegral<std::uint64_t>();
      break;
    case 2:
      k.ic.clusters = knob_index(in, 1, 70);
      k.ic.bits = knob_int(in, 1, 66);
      k.ic.iterations = knob_int(in, 1, 12);
      k.ic.hash_bias = in.ConsumeBool();
      k.ic.seed = in.ConsumeIntegral<std::uint64_t>();
      k.ic.topk = knob_index(in, 1, 70);
      break;
    default: {
      // hashes is bounded (its cost is linear in it); everything else may be anything.
      const index h = knob_index(in, 1, 6);
      k.s.hashes = h > 8 ? 8 : h;
      k.s.cluster_size = knob_index(in, 1, 70);
      k.s.r = in.ConsumeBool() ? special_value<double>(in)
                               : in.ConsumeFloatingPointInRange<double>(0.01, 10.0);
      k.s.seed = in.ConsumeIntegral<std::uint64_t>();
      break;
    }
  }
  return k;
}

bool knobs_valid(const kernel_choice& k) {
  auto clustering_ok = [](index clusters, int bits, int iterations) {
    return clusters >= 1 && clusters <= index{0xFFFFFFFF} && bits >= 1 && bits <= 64 &&
           iterations >= 1;
  };
  switch (k.id) {
    case 0:
      return k.d.query_block >= 1 && k.d.key_block >= 1;
    case 1:
      return clustering_ok(k.c.clusters, k.c.bits, k.c.iterations);
    case 2:
      return clustering_ok(k.ic.clusters, k.ic.bits, k.ic.iterations) && k.ic.topk >= 1;
    default:
      return k.s.hashes >= 1 && k.s.cluster_size >= 1 && std::isfinite(k.s.r) && k.s.r > 0;
  }
}

bool exact_for(const kernel_choice& k, index Lv, index Sv) {
  switch (k.id) {
    case 0:
      return true;
    case 1:
      return Lv <= 1;
    case 2:
      return k.ic.topk >= Sv || Lv <= 1;
    default:
      return k.s.cluster_size >= Lv;
  }
}

template <class F>
void dispatch(const kernel_choice& k, F&& f) {
  switch (k.id) {
    case 0:
      f(k.d);
      break;
    case 1:
      f(k.c);
      break;
    case 2:
      f(k.ic);
      break;
    default:
      f(k.s);
      break;
  }
}

// Checks one head's output. qh, kh, vh, oh are L x E, S x E, S x M, L x M maps.
template <class T, class Q, class K, class V, class O>
void check_head(const kernel_choice& kc, const Q& qh, const K& kh, const V& vh, const O& oh,
                const fa::context& ctx, bool check_finite) {
  const index Lv = ctx.query_length, Sv = ctx.key_length, M = vh.cols();
  for (index i = Lv; i < oh.rows(); ++i)
    for (index m = 0; m < M; ++m)
      if (oh(i, m) != T(0)) violation("a padded output row is not zero");
  // Bounded inputs: every |value| <= 1e4 in valid rows, |scale| <= 1e3 -> scores far from
  // overflow in float; the output must then be finite and convex.
  // 0 for an empty block (M = 0 or no valid row); +inf when the block holds a NaN or an infinity
  // (maxCoeff would skip a NaN, and with check_finite off a NaN input must not count as bounded).
  auto max_abs_of = [](const auto& block) {
    if (!block.size()) return 0.0;
    if (!block.allFinite()) return std::numeric_limits<double>::infinity();
    return block.template cast<double>().cwiseAbs().maxCoeff();
  };
  const double qa = max_abs_of(qh.topRows(Lv)), ka = max_abs_of(kh.topRows(Sv));
  const double va = max_abs_of(vh.topRows(Sv));
  (void)check_finite;
  if (!(qa <= 1e4 && ka <= 1e4 && va <= 1e4 && std::abs(ctx.scale) <= 1e3)) return;
  const double eps = std::is_same_v<T, float> ? 1e-4 : 1e-10;
  for (index i = 0; i < Lv; ++i)
    for (index m = 0; m < M; ++m) {
      const double x = static_cast<double>(oh(i, m));
      if (!std::isfinite(x)) violation("non-finite output for bounded finite inputs");
      if (Sv == 0) {
        if (x != 0) violation("output not zero with no valid key");
        continue;
      }
      const index visible = ctx.causal ? std::min(Sv, i + 1) : Sv;
      const double lo = vh.col(m).head(visible).template cast<double>().minCoeff();
      const double hi = vh.col(m).head(visible).template cast<double>().maxCoeff();
      const double slack = eps * std::max(1.0, va) * 10;
      if (x < lo - slack || x > hi + slack) violation("output outside the values' range");
    }
  // Oracle comparison where the kernel is exact and the scores are small enough for float.
  if (!exact_for(kc, Lv, Sv) || Lv == 0 || Sv == 0) return;
  const double score_bound = std::abs(ctx.scale) * qa * ka * static_cast<double>(qh.cols());
  if (score_bound > 30) return;
  fa::options o;
  o.scale = ctx.scale;
  o.query_length = Lv;
  o.key_length = Sv;
  o.causal = ctx.causal;
  const auto ref = fa::testing::reference_attention(qh, kh, vh, o);
  for (index i = 0; i < Lv; ++i)
    for (index m = 0; m < M; ++m)
      if (std::abs(static_cast<double>(oh(i, m)) - ref(i, m)) > 1e-3 * std::max(va, 1e-30) + 1e-30)
        violation("an exact configuration differs from the float64 oracle");
}

template <class T>
void run(FuzzedDataProvider& in) {
  const kernel_choice kc = choose_kernel(in);
  const bool multihead = in.ConsumeBool();
  const index B = multihead ? in.ConsumeIntegralInRange<index>(0, 3) : 1;
  const index H = multihead ? in.ConsumeIntegralInRange<index>(1, 3) : 1;
  const index L = in.ConsumeIntegralInRange<index>(0, 64);
  const index S = in.ConsumeIntegralInRange<index>(0, 64);
  const index E = in.ConsumeIntegralInRange<index>(0, 64);
  const index Ek =
      in.ConsumeIntegralInRange<int>(0, 7) == 0 ? in.ConsumeIntegralInRange<index>(0, 64) : E;
  const index Sv_rows =
      in.ConsumeIntegralInRange<int>(0, 7) == 0 ? in.ConsumeIntegralInRange<index>(0, 64) : S;
  const index M = in.ConsumeIntegralInRange<index>(0, 64);

  fa::options opt;
  if (in.ConsumeBool())
    opt.scale = in.ConsumeBool() ? special_value<double>(in)
                                 : in.ConsumeFloatingPointInRange<double>(-1e3, 1e3);
  if (in.ConsumeBool()) opt.query_length = in.ConsumeIntegralInRange<index>(-2, 66);
  if (in.ConsumeBool()) opt.key_length = in.ConsumeIntegralInRange<index>(-2, 66);
  opt.causal = in.ConsumeIntegralInRange<int>(0, 3) == 0;
  opt.check_finite = in.ConsumeIntegralInRange<int>(0, 3) != 0;

  // Per-sample lengths for the multi-head path.
  std::vector<index> qlens, klens;
  if (multihead && in.ConsumeBool())
    for (index b = 0; b < B + (in.ConsumeIntegralInRange<int>(0, 7) == 0 ? 1 : 0); ++b)
      qlens.push_back(in.ConsumeIntegralInRange<index>(-1, 65));
  if (multihead && in.ConsumeBool())
    for (index b = 0; b < B; ++b) klens.push_back(in.ConsumeIntegralInRange<index>(-1, 65));
  const int threads = in.ConsumeIntegralInRange<int>(-1, 2);

  // Buffers: (B, rows, H, dim) packed.
  std::vector<T> q(static_cast<std::size_t>(B * L * H * E)),
      k(static_cast<std::size_t>(B * S * H * Ek)), v(static_cast<std::size_t>(B * Sv_rows * H * M));
  fill(in, q);
  fill(in, k);
  fill(in, v);
  std::vector<T> out(static_cast<std::size_t>(B * L * H * M), std::numeric_limits<T>::quiet_NaN());

  // The expected validity, per the documented rules.
  bool valid = knobs_valid(kc) && E == Ek && S == Sv_rows && E >= 1;
  const bool kernel_causal = kc.id == 0;
  if (opt.causal && !kernel_causal) valid = false;
  const double scale = opt.scale.value_or(E >= 1 ? 1.0 / std::sqrt(static_cast<double>(E)) : 1.0);
  if (!std::isfinite(scale)) valid = false;
  if (multihead) {
    if (!qlens.empty() && static_cast<index>(qlens.size()) != B) valid = false;
    if (!klens.empty() && static_cast<index>(klens.size()) != B) valid = false;
    if (threads < 0) valid = false;
  }
  std::vector<fa::context> contexts(static_cast<std::size_t>(B));
  bool any_task = false;
  for (index b = 0; b < B && valid; ++b) {
    const index Lv = (!qlens.empty() && static_cast<index>(qlens.size()) == B)
                         ? qlens[static_cast<std::size_t>(b)]
                         : opt.query_length.value_or(L);
    const index Sv = (!klens.empty() && static_cast<index>(klens.size()) == B)
                         ? klens[static_cast<std::size_t>(b)]
                         : opt.key_length.value_or(S);
    if (Lv < 0 || Lv > L || Sv < 0 || Sv > S) {
      valid = false;
      break;
    }
    fa::context& c = contexts[static_cast<std::size_t>(b)];
    c.query_length = Lv;
    c.key_length = Sv;
    c.scale = scale;
    c.causal = opt.causal;
    any_task = true;
  }
  // With no sample the driver validates only the tensors (k and v lengths), the per-sample
  // spans and the thread count: shapes of heads, scale, causal and knobs are checked per sample
  // (scale, causal, E) or inside compute (knobs), and there is none.
  if (multihead && B == 0) valid = S == Sv_rows && threads >= 0 && qlens.empty() && klens.empty();
  (void)any_task;
  bool finite_ok = true;
  if (valid && opt.check_finite)
    for (index b = 0; b < B; ++b)
      for (index h = 0; h < H; ++h) {
        const fa::context& c = contexts[static_cast<std::size_t>(b)];
        auto scan = [&](const std::vector<T>& data, index rows, index len, index dim) {
          for (index t = 0; t < len; ++t)
            for (index e = 0; e < dim; ++e)
              if (!std::isfinite(static_cast<double>(
                      data[static_cast<std::size_t>(((b * rows + t) * H + h) * dim + e)])))
                finite_ok = false;
        };
        scan(q, L, c.query_length, E);
        scan(k, S, c.key_length, E);
        scan(v, S, c.key_length, M);
      }
  const bool expect_ok = valid && finite_ok;

  bool threw = false;
  try {
    dispatch(kc, [&](const auto& policy) {
      if (multihead) {
        fa::multihead_options mo;
        mo.common = opt;
        mo.query_lengths = qlens;
        mo.key_lengths = klens;
        mo.threads = threads;
        fa::multihead_attention(policy, fa::tensor_view<const T>{q.data(), B, L, H, E},
                                fa::tensor_view<const T>{k.data(), B, S, H, Ek},
                                fa::tensor_view<const T>{v.data(), B, Sv_rows, H, M},
                                fa::tensor_view<T>{out.data(), B, L, H, M}, mo);
      } else {
        using map = Eigen::Map<const fa::matrix<T>>;
        const map qm(q.data(), L, E), km(k.data(), S, Ek), vm(v.data(), Sv_rows, M);
        fa::attention(policy, qm, km, vm, fa::view<T>(Eigen::Map<fa::matrix<T>>(out.data(), L, M)),
                      opt);
      }
    });
  } catch (const fa::invalid_argument&) {
    threw = true;
  }
  if (threw && expect_ok) violation("invalid_argument thrown for valid arguments");
  if (!threw && !valid) violation("invalid arguments accepted");
  if (!threw && !finite_ok) violation("a non-finite input was accepted with check_finite");
  if (threw || B == 0) return;

  for (index b = 0; b < B; ++b)
    for (index h = 0; h < H; ++h) {
      using cmap = Eigen::Map<const fa::matrix<T>, 0, Eigen::OuterStride<>>;
      const index off_q = b * L * H * E + h * E, off_k = b * S * H * E + h * E;
      const index off_v = b * S * H * M + h * M, off_o = b * L * H * M + h * M;
      // An empty buffer's data() may be null: never offset it (its maps have no coefficient).
      auto at = [](const std::vector<T>& x, index off) {
        return x.empty() ? x.data() : x.data() + off;
      };
      const cmap qh(at(q, off_q), L, E, Eigen::OuterStride<>(H * E));
      const cmap kh(at(k, off_k), S, E, Eigen::OuterStride<>(H * E));
      const cmap vh(at(v, off_v), S, M, Eigen::OuterStride<>(H * M));
      const cmap oh(at(out, off_o), L, M, Eigen::OuterStride<>(H * M));
      check_head<T>(kc, fa::matrix<T>(qh), fa::matrix<T>(kh), fa::matrix<T>(vh), fa::matrix<T>(oh),
                    contexts[static_cast<std::size_t>(b)], opt.check_finite);
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  if (in.ConsumeBool())
    run<float>(in);
  else
    run<double>(in);
  return 0;
}
