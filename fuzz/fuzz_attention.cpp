// libFuzzer target: the front door (fastattn::attention) and the multi-head driver with any kernel
// of `fastattn::kernels`, chosen by its index in the list (a kernel added to the list is fuzzed
// without edits; one inserted before others shifts which kernel a stored input selects), its knobs
// set through `for_each_knob` (in range, at and one past the range's ends, and the type's
// extremes), random shapes (<= 64), options and lengths, and scalar values including NaN,
// infinities, denormals, 1e30 and the type's largest.
//
// After the usual inputs, one more choice selects extra stress (an input that ends before it gets
// none, so the seeds kept from before it existed still exercise what they did):
// - extreme values: q and k scaled so that the score bound |scale| max|q| max|k| E lands near the
//   front door's overflow limit (max/4) or far below it, v near its limit max / (4 max(S, 1024))
//   or far below, scales from below the smallest denormal to the type's largest, entries up to the
//   type's largest; v's first column constant, so that a NaN or zero row cannot hide in the convex
//   bounds;
// - aliasing: q, k, v and out live in one buffer with any strides and layouts ((B, L, H, E),
//   padded tokens, or (B, H, L, E) through head_stride), out placed over or near an input, and
//   inputs possibly sharing memory with each other (which is allowed).
//
// Properties checked on every input:
// - the only exception ever thrown is fastattn::invalid_argument, and it leaves every buffer as it
//   was (the checks come before any work), with no allocation over 1 MiB before it (a huge knob
//   is refused, never allocated first);
// - it is thrown exactly when the arguments are invalid (shapes, lengths, scale, causal, knobs
//   outside [min, max] or refused by the policy's validate(), threads, or, with check_finite, a
//   non-finite value in a valid row or values past the overflow bounds documented on
//   options::check_finite), as this harness recomputes the rules; fastattn::validate agrees with
//   the knobs' ranges and its error names a knob;
// - out sharing an element with q, k or v always throws (a refusal without a shared element is
//   allowed only where the library documents its check as conservative: row strides that differ,
//   and then it names "out"), and a call that does not throw writes nothing outside out;
// - on success, padded rows are zero; when the valid inputs are finite and inside the bounds
//   (always so with check_finite), every valid row is finite and lies in the range of the values
//   of the keys it sees (every kernel takes convex combinations; `local` sees its window only, and
//   outputs zeros when that holds no valid key); exact kernels, and the approximate ones with knobs
//   that make them exact, match the float64 oracle;
// - with one head's lse asked for (chosen last in the input): padded rows and rows that see no
//   key get -inf, every other valid row a finite lse (inputs inside the bounds), and the exact
//   configurations log sum_j exp(s_ij) of the float64 oracle;
// - fuzz_wrappers (this file with FUZZ_ATTENTION_WRAPPERS): the same over banded<P> and
//   guarded<P>, and the guard's report, when asked for, holds for every head that ran an
//   estimate that is a number inside its interval;
// - no single allocation of a call exceeds 32 MiB (the problems are at most 64 x 64 per head).
//
// Replaying an input: FUZZ_ATTENTION_VERBOSE=1 prints what it ran (kernel, shapes, knobs, outcome);
// FUZZ_ATTENTION_DUMP=DIR writes a head that violates a property to DIR/{q,k,v,out}.npy.
#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <fuzzer/FuzzedDataProvider.h>

#include <fastattn/fastattn.hpp>
#include <fastattn/io/npy.hpp>

#include "reference.hpp"

#if defined(__has_include)
#if __has_include(<sanitizer/allocator_interface.h>)
#include <sanitizer/allocator_interface.h>
#define FUZZ_ATTENTION_MALLOC_HOOKS 1
#endif
#endif

namespace fa = fastattn;

namespace {

using fa::index;  // inside the namespace: ::index from <strings.h> would clash

// FUZZ_ATTENTION_VERBOSE=1 prints one line per input: what was run and what happened.
bool verbose() {
  static const bool on = std::getenv("FUZZ_ATTENTION_VERBOSE") != nullptr;
  return on;
}

[[noreturn]] void violation(const char* what) {
  std::fprintf(stderr, "fuzz_attention: property violated: %s\n", what);
  std::abort();
}

// FUZZ_ATTENTION_DUMP=DIR: a head whose output violates a property is written to DIR/{q,k,v,
// out}.npy before the abort (replay the reproducer with it set; `fastattn --q DIR/q.npy ...`).
template <class T>
void dump_head(const fa::matrix<T>& q, const fa::matrix<T>& k, const fa::matrix<T>& v,
               const fa::matrix<T>& out) {
  const char* dir = std::getenv("FUZZ_ATTENTION_DUMP");
  if (!dir) return;
  const std::string base(dir);
  fa::io::write_npy(base + "/q.npy", q);
  fa::io::write_npy(base + "/k.npy", k);
  fa::io::write_npy(base + "/v.npy", v);
  fa::io::write_npy(base + "/out.npy", out);
  std::fprintf(stderr, "fuzz_attention: head written to %s/{q,k,v,out}.npy\n", dir);
}

// ---------------------------------------------------------------------------------------------
// Allocations made during a library call (sanitizer malloc hooks; every thread).

struct allocation_stats {
  std::atomic<bool> on{false};
  std::atomic<std::size_t> largest{0};
};
allocation_stats allocations;

#if defined(FUZZ_ATTENTION_MALLOC_HOOKS)
void malloc_hook(const volatile void* /*ptr*/, std::size_t size) {
  if (!allocations.on.load(std::memory_order_relaxed)) return;
  std::size_t seen = allocations.largest.load(std::memory_order_relaxed);
  while (size > seen && !allocations.largest.compare_exchange_weak(seen, size)) {
  }
}
void free_hook(const volatile void* /*ptr*/) {}
[[maybe_unused]] const int hooks_installed =
    __sanitizer_install_malloc_and_free_hooks(malloc_hook, free_hook);
#endif

constexpr std::size_t largest_allocation_before_error = std::size_t{1} << 20;
constexpr std::size_t largest_allocation = std::size_t{32} << 20;

class tracking_scope {
 public:
  tracking_scope() {
    allocations.largest = 0;
    allocations.on = true;
  }
  ~tracking_scope() { allocations.on = false; }
  tracking_scope(const tracking_scope&) = delete;
  tracking_scope& operator=(const tracking_scope&) = delete;
};

// ---------------------------------------------------------------------------------------------
// Values.

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

struct xorshift {
  std::uint64_t state;
  std::uint64_t operator()() {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  }
  double symmetric() { return static_cast<double>((*this)() % 20001) / 10000.0 - 1.0; }  // [-1, 1]
};

// Fills `data` from a small palette, a seeded uniform draw, or raw bytes, then pokes a few values.
template <class T>
void fill(FuzzedDataProvider& in, std::vector<T>& data) {
  const int mode = in.ConsumeIntegralInRange<int>(0, 2);
  xorshift next{in.ConsumeIntegral<std::uint64_t>() | 1};
  if (mode == 0) {
    T palette[4];
    for (T& p : palette) p = special_value<T>(in);
    for (T& x : data) x = palette[next() % 4];
  } else if (mode == 1) {
    const double sigma = in.ConsumeFloatingPointInRange<double>(0.0, 10.0);
    for (T& x : data) x = static_cast<T>(sigma * next.symmetric());
  } else {
    for (T& x : data) x = in.remaining_bytes() ? special_value<T>(in) : T(0);
  }
  const int pokes = in.ConsumeIntegralInRange<int>(0, 3);
  for (int p = 0; p < pokes && !data.empty(); ++p)
    data[in.ConsumeIntegralInRange<std::size_t>(0, data.size() - 1)] = special_value<T>(in);
}

// ---------------------------------------------------------------------------------------------
// Knobs, generically from their descriptions.

// In-range values are drawn from [min, min + 69] (further bounded so that a run stays fast); the
// range's ends, one past them and the type's extremes are drawn too.
constexpr index fast_span = 69;

template <class Knob>
auto knob_value(FuzzedDataProvider& in, const Knob& knob) {
  using V = typename Knob::value_type;
  using lim = std::numeric_limits<V>;
  if constexpr (std::is_same_v<V, bool>) {
    return in.ConsumeBool();
  } else if constexpr (std::is_integral_v<V>) {
    if (knob.min == lim::min() && knob.max == lim::max()) return in.ConsumeIntegral<V>();  // a seed
    switch (in.ConsumeIntegralInRange<int>(0, 7)) {
      case 0:
        return knob.min > lim::min() ? static_cast<V>(knob.min - 1) : lim::max();
      case 1:
        return V(0);
      case 2:
        return lim::min();
      case 3:
        return knob.max;  // a huge but valid knob: it must be clamped or cheap, never allocated
      case 4:
        return knob.max < lim::max() ? static_cast<V>(knob.max + 1) : lim::max();
      default: {
        const auto span = static_cast<V>(fast_span);
        const V hi = knob.min <= lim::max() - span && static_cast<V>(knob.min + span) < knob.max
                         ? static_cast<V>(knob.min + span)
                         : knob.max;
        return in.ConsumeIntegralInRange<V>(knob.min, hi);
      }
    }
  } else {
    static_assert(std::is_floating_point_v<V>, "fuzz_attention: a knob of an unknown type");
    if (in.ConsumeBool()) return special_value<V>(in);
    const V lo = std::clamp<V>(knob.min, V(-1e3), V(1e3));
    const V hi = std::clamp<V>(knob.max, lo, V(1e3));
    return in.ConsumeFloatingPointInRange<V>(lo, hi);
  }
}

// Whether the policy's knobs are in their ranges and pass its own validate().
template <class Policy>
bool knobs_valid(const Policy& policy) {
  bool ok = true;
  fa::for_each_knob<Policy>([&](const auto& knob) {
    if (!knob.valid(knob.get(policy))) ok = false;
  });
  if constexpr (requires { policy.validate(); }) {
    if (ok) {
      try {
        policy.validate();
      } catch (const fa::invalid_argument&) {
        ok = false;
      }
    }
  }
  return ok;
}

template <class Policy>
bool is_knob_name(std::string_view name) {
  bool found = false;
  fa::for_each_knob<Policy>([&](const auto& knob) { found = found || knob.name == name; });
  if constexpr (requires(Policy p) { p.inner; })  // a wrapper: its kernel's knobs too
    found = found || is_knob_name<decltype(Policy::inner)>(name);
  return found;
}

// Prints the knobs of `policy` (and of a wrapper's inner kernel), one "  --flag value" a line.
template <class Policy>
void print_knobs(const Policy& policy) {
  fa::for_each_knob<Policy>([&](const auto& knob) {
    std::fprintf(stderr, "  --%s %s\n", knob.flag().c_str(),
                 fa::detail::to_text(knob.get(policy)).c_str());
  });
  if constexpr (requires { policy.inner; }) print_knobs(policy.inner);
}

// Sets the knobs of `policy` from the input, and those of a wrapper's inner kernel after them.
template <class Policy>
void draw_knobs(FuzzedDataProvider& in, Policy& policy) {
  fa::for_each_knob<Policy>([&](const auto& knob) { knob.get(policy) = knob_value(in, knob); });
  if constexpr (requires { policy.inner; }) draw_knobs(in, policy.inner);
}

// The smyrf kernel inside `policy` (itself or a wrapper's inner kernel), or null.
template <class Policy>
fa::smyrf* smyrf_in(Policy& policy) {
  if constexpr (std::is_same_v<Policy, fa::smyrf>)
    return &policy;
  else if constexpr (requires { policy.inner; })
    return smyrf_in(policy.inner);
  else
    return nullptr;
}

// Whether `policy` computes exact attention for these lengths (the documented cases; a kernel
// the harness does not know is exact when it says so).
template <class Policy>
bool exact_for(const Policy& policy, index Lv, index Sv) {
  if constexpr (Policy::is_exact)
    return true;
  else if constexpr (std::is_same_v<Policy, fa::clustered>)
    return Lv <= 1;
  else if constexpr (std::is_same_v<Policy, fa::improved_clustered>)
    return policy.topk >= Sv || Lv <= 1;
  else if constexpr (std::is_same_v<Policy, fa::smyrf>)
    return policy.cluster_size >= Lv;
  else if constexpr (std::is_same_v<Policy, fa::local>)
    return policy.window >= std::max(Lv, Sv);
  else if constexpr (fa::is_banded<Policy>)  // the band holds every key, or the rest is exact
    return policy.window >= std::max(Lv, Sv) || exact_for(policy.inner, Lv, Sv);
  else if constexpr (fa::is_guarded<Policy>)  // dense below min_length, or P exact
    return Lv < policy.min_length || exact_for(policy.inner, Lv, Sv);
  else
    return false;
}

// The keys [first, last) query i may take values from: the visible ones (all valid keys, or
// j <= i with causal), within local's window. A kernel's output row is a convex combination of
// (some of) their values, and zero when there is none (local: no valid key in the window).
template <class Policy>
std::pair<index, index> keys_seen(const Policy& policy, index i, index Sv, bool causal) {
  index first = 0, last = causal ? std::min(Sv, i + 1) : Sv;
  if constexpr (std::is_same_v<Policy, fa::local>) {
    const fa::band b = Policy::visible(policy.window, causal);  // lower <= j - i <= upper
    first = std::max(first, i + b.lower);
    last = std::min(last, i + b.upper + 1);
  }
  return {first, std::max(first, last)};
}

// ---------------------------------------------------------------------------------------------
// Tensors: (B, rows, H, dim) with explicit strides, in their own buffers or in one shared pool.

template <class T>
struct tensor {
  T* data = nullptr;
  index batch = 0, length = 0, heads = 0, dim = 0;
  index token_stride = 0, head_stride = 0, batch_stride = 0;

  bool empty() const { return batch == 0 || length == 0 || heads == 0 || dim == 0; }
  index offset(index b, index t, index h, index e) const {
    return b * batch_stride + t * token_stride + h * head_stride + e;
  }
  // Elements from data to one past the last one addressed.
  index extent() const {
    return empty() ? 0 : offset(batch - 1, length - 1, heads - 1, dim - 1) + 1;
  }
  T& at(index b, index t, index h, index e) const { return data[offset(b, t, h, e)]; }
  fa::matrix<T> head_matrix(index b, index h) const {
    fa::matrix<T> m(length, dim);
    for (index t = 0; t < length; ++t)
      for (index e = 0; e < dim; ++e) m(t, e) = at(b, t, h, e);
    return m;
  }
  template <class U>
  fa::tensor_view<U> view() const {
    return {.data = data,
            .batch = batch,
            .length = length,
            .heads = heads,
            .dim = dim,
            .token_stride = token_stride,
            .batch_stride = batch_stride,
            .head_stride = head_stride};
  }
};

// Strides of a packed (B, rows, H, dim) tensor (layout 0), one with padded tokens (1), or a
// (B, H, rows, dim) one (2); `pad` extra elements per token in layouts 1 and 2.
template <class T>
tensor<T> make_tensor(index B, index rows, index H, index dim, int layout, index pad) {
  tensor<T> t{nullptr, B, rows, H, dim, 0, 0, 0};
  if (layout == 2) {
    t.token_stride = dim + pad;
    t.head_stride = rows * t.token_stride;
    t.batch_stride = H * t.head_stride;
  } else {
    t.head_stride = dim;
    t.token_stride = H * dim + (layout == 1 ? pad : 0);
    t.batch_stride = rows * t.token_stride;
  }
  return t;
}

// Whether an element of `a` is an element of `b` (both in the same pool), and whether the two
// are only conservatively distinct: some pair of their heads has intersecting address ranges and
// different row strides, where the library's check may refuse without a shared element.
template <class T>
void overlap(const T* base, const tensor<T>& a, const tensor<T>& b, std::vector<char>& mark,
             bool& shared, bool& conservative) {
  if (a.empty() || b.empty()) return;
  std::fill(mark.begin(), mark.end(), 0);
  for (index i = 0; i < a.batch; ++i)
    for (index t = 0; t < a.length; ++t)
      for (index h = 0; h < a.heads; ++h)
        for (index e = 0; e < a.dim; ++e)
          mark[static_cast<std::size_t>(&a.at(i, t, h, e) - base)] = 1;
  for (index i = 0; i < b.batch; ++i)
    for (index t = 0; t < b.length; ++t)
      for (index h = 0; h < b.heads; ++h)
        for (index e = 0; e < b.dim; ++e)
          if (mark[static_cast<std::size_t>(&b.at(i, t, h, e) - base)]) shared = true;
  if (a.token_stride == b.token_stride) return;
  for (index i = 0; i < a.batch; ++i)
    for (index h = 0; h < a.heads; ++h)
      for (index j = 0; j < b.batch; ++j)
        for (index g = 0; g < b.heads; ++g) {
          const T* a0 = &a.at(i, 0, h, 0);
          const T* a1 = &a.at(i, a.length - 1, h, a.dim - 1) + 1;
          const T* b0 = &b.at(j, 0, g, 0);
          const T* b1 = &b.at(j, b.length - 1, g, b.dim - 1) + 1;
          if (a0 < b1 && b0 < a1) conservative = true;
        }
}

// ---------------------------------------------------------------------------------------------
// The front door's value rule, recomputed (options::check_finite).

enum class values { ok, non_finite, overflow };

template <class T>
values value_rule(const fa::matrix<T>& q, const fa::matrix<T>& k, const fa::matrix<T>& v,
                  const fa::context& ctx) {
  auto max_abs = [](const fa::matrix<T>& m, index rows, bool& finite) {
    double most = 0;
    for (index r = 0; r < rows; ++r)
      for (index c = 0; c < m.cols(); ++c) {
        const double x = static_cast<double>(m(r, c));
        if (!std::isfinite(x)) finite = false;
        most = std::max(most, std::abs(x));
      }
    return most;
  };
  bool finite = true;
  const double mq = max_abs(q, ctx.query_length, finite);
  const double mk = max_abs(k, ctx.key_length, finite);
  const double mv = max_abs(v, ctx.key_length, finite);
  if (!finite) return values::non_finite;
  const double limit = static_cast<double>(std::numeric_limits<T>::max()) / 4;
  const double scale = std::abs(ctx.scale);
  const double scores = scale * mq * mk * static_cast<double>(q.cols());
  if (scale * mq > limit || scores > limit) return values::overflow;
  if (mv * static_cast<double>(std::max<index>(ctx.key_length, 1024)) > limit)
    return values::overflow;
  return values::ok;
}

// Checks one head's output (L x M) against its inputs.
template <class Policy, class T>
void check_head(const Policy& policy, const fa::matrix<T>& qh, const fa::matrix<T>& kh,
                const fa::matrix<T>& vh, const fa::matrix<T>& oh, const fa::context& ctx,
                const std::vector<T>& lse = {}) {
  const index Lv = ctx.query_length, Sv = ctx.key_length, M = vh.cols();
  auto violation = [&](const char* what) {
    std::fprintf(stderr, "fuzz_attention: %s, scale %.17g, query_length %td, key_length %td,%s\n",
                 std::string(Policy::name).c_str(), ctx.scale, Lv, Sv,
                 ctx.causal ? " causal," : "");
    print_knobs(policy);
    dump_head(qh, kh, vh, oh);
    ::violation(what);
  };
  for (index i = Lv; i < oh.rows(); ++i)
    for (index m = 0; m < M; ++m)
      if (oh(i, m) != T(0)) violation("a padded output row is not zero");
  const bool with_lse = !lse.empty();
  constexpr T minus_inf = -std::numeric_limits<T>::infinity();
  for (index i = Lv; with_lse && i < oh.rows(); ++i)
    if (lse[static_cast<std::size_t>(i)] != minus_inf) violation("a padded row's lse is not -inf");
  // Finite inputs inside the overflow bounds: every kernel's output is finite and convex.
  if (value_rule(qh, kh, vh, ctx) != values::ok) return;
  double va = 0;
  for (index j = 0; j < Sv; ++j)
    for (index m = 0; m < M; ++m) va = std::max(va, std::abs(static_cast<double>(vh(j, m))));
  const double eps = std::is_same_v<T, float> ? 1e-4 : 1e-10;
  // Rounding of a convex combination is relative to max|v|; denormal values add absolute error.
  const double tiny = 256 * static_cast<double>(std::numeric_limits<T>::denorm_min());
  const double slack = 10 * eps * va + tiny;
  for (index i = 0; i < Lv; ++i)
    for (index m = 0; m < M; ++m) {
      const double x = static_cast<double>(oh(i, m));
      if (!std::isfinite(x)) violation("non-finite output for finite inputs inside the bounds");
      const auto [first, last] = keys_seen(policy, i, Sv, ctx.causal);
      if (first == last) {
        if (x != 0) violation("output not zero for a query that sees no valid key");
        if (with_lse && lse[static_cast<std::size_t>(i)] != minus_inf)
          violation("the lse of a query that sees no valid key is not -inf");
        continue;
      }
      if (with_lse && m == 0 && !std::isfinite(lse[static_cast<std::size_t>(i)]))
        violation("non-finite lse for finite inputs inside the bounds");
      const auto seen = vh.col(m).segment(first, last - first).template cast<double>();
      const double lo = seen.minCoeff(), hi = seen.maxCoeff();
      if (x < lo - slack || x > hi + slack) {
        std::fprintf(
            stderr,
            "fuzz_attention: row %td of %td, column %td: %g outside [%g, %g] (keys %td..%td "
            "of %td; scale %g, max|v| %g)\n",
            i, Lv, m, x, lo, hi, first, last, Sv, ctx.scale, va);
        violation("output outside the values' range (a zero or wrong row)");
      }
    }
  // Oracle comparison where the kernel is exact and the scores are small enough for float.
  if (!exact_for(policy, Lv, Sv) || Lv == 0 || Sv == 0) return;
  double qa = 0, ka = 0;
  for (index i = 0; i < Lv; ++i)
    for (index e = 0; e < qh.cols(); ++e)
      qa = std::max(qa, std::abs(static_cast<double>(qh(i, e))));
  for (index j = 0; j < Sv; ++j)
    for (index e = 0; e < kh.cols(); ++e)
      ka = std::max(ka, std::abs(static_cast<double>(kh(j, e))));
  if (std::abs(ctx.scale) * qa * ka * static_cast<double>(qh.cols()) > 30) return;
  fa::options o;
  o.scale = ctx.scale;
  o.query_length = Lv;
  o.key_length = Sv;
  o.causal = ctx.causal;
  const auto ref = fa::testing::reference_attention(qh, kh, vh, o);
  for (index i = 0; i < Lv; ++i)
    for (index m = 0; m < M; ++m)
      if (std::abs(static_cast<double>(oh(i, m)) - ref(i, m)) > 1e-3 * va + tiny)
        violation("an exact configuration differs from the float64 oracle");
  // The lse against log sum_j exp(s_ij) in float64 over the keys each row sees (scores <= 30 in
  // magnitude here: float's rounding of a score is about 1e-5).
  for (index i = 0; with_lse && i < Lv; ++i) {
    const auto [first, last] = keys_seen(policy, i, Sv, ctx.causal);
    if (first == last) continue;
    double peak = -std::numeric_limits<double>::infinity();
    std::vector<double> scores;
    for (index j = first; j < last; ++j) {
      scores.push_back(ctx.scale *
                       qh.row(i).template cast<double>().dot(kh.row(j).template cast<double>()));
      peak = std::max(peak, scores.back());
    }
    double sum = 0;
    for (const double x : scores) sum += std::exp(x - peak);
    const double expected = peak + std::log(sum);
    if (std::abs(static_cast<double>(lse[static_cast<std::size_t>(i)]) - expected) >
        1e-3 * (1 + std::abs(expected)))
      violation("an exact configuration's lse differs from the float64 oracle");
  }
}

// ---------------------------------------------------------------------------------------------
// Extreme values: q, k and v rescaled around the front door's overflow bounds.

// Entries of magnitude at most `magnitude` (entry (0, 0) of every head exactly), uniform in sign.
template <class T>
void fill_magnitude(tensor<T>& t, double magnitude, xorshift& next) {
  for (index b = 0; b < t.batch; ++b)
    for (index h = 0; h < t.heads; ++h)
      for (index r = 0; r < t.length; ++r)
        for (index e = 0; e < t.dim; ++e)
          t.at(b, r, h, e) =
              static_cast<T>(r == 0 && e == 0 ? magnitude : magnitude * next.symmetric());
}

template <class T>
void make_extreme(FuzzedDataProvider& in, tensor<T>& q, tensor<T>& k, tensor<T>& v,
                  fa::options& opt) {
  using lim = std::numeric_limits<T>;
  const double log2_max = std::log2(static_cast<double>(lim::max()));
  const double log2_tiny = std::log2(static_cast<double>(lim::denorm_min()));
  const double log2_limit = log2_max - 2;  // max / 4
  // The scale: from below the smallest denormal to the type's largest, either sign.
  if (in.ConsumeBool()) {
    const double s = std::exp2(in.ConsumeFloatingPointInRange<double>(log2_tiny - 8, log2_max));
    opt.scale = std::min(s, static_cast<double>(lim::max())) * (in.ConsumeBool() ? -1 : 1);
  }
  const double scale =
      std::abs(opt.scale.value_or(q.dim >= 1 ? 1.0 / std::sqrt(static_cast<double>(q.dim)) : 1.0));
  // Score bound at 2^j of the limit: near it, or anywhere down to the denormals.
  const int near = in.ConsumeIntegralInRange<int>(-8, 2);
  const double j =
      in.ConsumeBool() ? near : in.ConsumeFloatingPointInRange<double>(2 * log2_tiny, 2.0);
  const double log2_product = scale > 0
                                  ? log2_limit + j - std::log2(scale) -
                                        std::log2(static_cast<double>(std::max<index>(1, q.dim)))
                                  : 2 * log2_max;
  const double share = in.ConsumeProbability<double>();  // of the product that goes to q
  auto magnitude = [&](double log2_m) {
    return std::min(std::exp2(std::clamp(log2_m, log2_tiny - 1, log2_max)),
                    static_cast<double>(lim::max()));
  };
  xorshift next{in.ConsumeIntegral<std::uint64_t>() | 1};
  fill_magnitude(q, magnitude(share * log2_product), next);
  fill_magnitude(k, magnitude((1 - share) * log2_product), next);
  // v near max / (4 max(S, 1024)), or far below; its first column constant and positive.
  const double jv = in.ConsumeBool() ? in.ConsumeIntegralInRange<int>(-6, 1)
                                     : in.ConsumeFloatingPointInRange<double>(log2_tiny, 1.0);
  const double mv =
      magnitude(log2_limit - std::log2(static_cast<double>(std::max<index>(v.length, 1024))) + jv);
  fill_magnitude(v, mv, next);
  for (index b = 0; b < v.batch; ++b)
    for (index h = 0; h < v.heads; ++h)
      for (index r = 0; r < v.length; ++r)
        if (v.dim > 0) v.at(b, r, h, 0) = static_cast<T>(mv);
}

// ---------------------------------------------------------------------------------------------
// One input.

template <class T, class Policy>
void run_kernel(FuzzedDataProvider& in) {
  Policy policy{};
  draw_knobs(in, policy);
  const bool knobs_ok = knobs_valid(policy);
  try {
    fa::validate(policy);
    if (!knobs_ok) violation("fastattn::validate accepted a knob outside its range");
  } catch (const fa::invalid_argument& e) {
    if (knobs_ok) violation("fastattn::validate refused valid knobs");
    if (fa::has_knobs<Policy> && !is_knob_name<Policy>(e.argument()))
      violation("fastattn::validate's error does not name a knob");
  }

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
  // A valid knob that multiplies the work (smyrf's hashes, up to 1024) is lowered to a budget
  // of about 2^24 multiply-adds per call, so that a run stays within the 10 s timeout under the
  // sanitizers: every round runs the same code, and small problems keep all 1024 rounds. (At
  // B x H = 2, L = 58 and two clusters per round, 1024 rounds took tens of seconds.)
  if (fa::smyrf* const sm = smyrf_in(policy); sm && knobs_ok) {
    const index keys = std::min<index>(sm->cluster_size, std::max<index>(S, 1));
    const index per_round = std::max<index>(1, B * H * L * keys * (E + M + 1));
    sm->hashes = std::clamp<index>((index{1} << 24) / per_round, 1, sm->hashes);
  }
  // guarded<P>: a report of one entry per head, or none.
  std::vector<fa::error_estimate> report;
  if constexpr (fa::is_guarded<Policy>) {
    if (in.ConsumeBool()) {
      report.assign(static_cast<std::size_t>(multihead ? B * H : 1), fa::error_estimate{});
      policy.report = report;
    }
  }

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

  // Packed (B, rows, H, dim) buffers of their own: out of bounds reads are ASan findings.
  std::vector<T> qbuf(static_cast<std::size_t>(B * L * H * E)),
      kbuf(static_cast<std::size_t>(B * S * H * Ek)),
      vbuf(static_cast<std::size_t>(B * Sv_rows * H * M));
  fill(in, qbuf);
  fill(in, kbuf);
  fill(in, vbuf);
  std::vector<T> obuf(static_cast<std::size_t>(B * L * H * M), std::numeric_limits<T>::quiet_NaN());
  tensor<T> q = make_tensor<T>(B, L, H, E, 0, 0), k = make_tensor<T>(B, S, H, Ek, 0, 0),
            v = make_tensor<T>(B, Sv_rows, H, M, 0, 0), out = make_tensor<T>(B, L, H, M, 0, 0);
  q.data = qbuf.data();
  k.data = kbuf.data();
  v.data = vbuf.data();
  out.data = obuf.data();

  // Extra stress, chosen last (0, none, when the input has ended).
  const int stress = in.ConsumeIntegralInRange<int>(0, 3);
  if (stress & 1) make_extreme(in, q, k, v, opt);
  const bool aliasing = (stress & 2) != 0;
  std::vector<T> pool;
  bool shared = false, conservative = false;
  if (aliasing) {
    // Layouts: multi-head tensors packed, token-padded or (B, H, L, E); one head, padded rows.
    auto layout = [&](index rows, index dim) {
      const int kind = multihead ? in.ConsumeIntegralInRange<int>(0, 2) : 1;
      return make_tensor<T>(B, rows, H, dim, kind, in.ConsumeIntegralInRange<index>(0, 3));
    };
    tensor<T> qa = layout(L, E), ka = layout(S, Ek), va = layout(Sv_rows, M), oa = layout(L, M);
    const index o_extent = oa.extent();
    // Offsets of q, k, v: one after the other with small gaps, or k and v over an earlier input
    // (inputs may share memory).
    index cursor = o_extent + 3;
    std::vector<index> starts;
    for (tensor<T>* t : {&qa, &ka, &va}) {
      index start = cursor + in.ConsumeIntegralInRange<index>(0, 3);
      if (!starts.empty() && in.ConsumeIntegralInRange<int>(0, 3) == 0)
        start = starts[in.ConsumeIntegralInRange<std::size_t>(0, starts.size() - 1)];
      starts.push_back(start);
      cursor = std::max(cursor, start + t->extent());
    }
    pool.assign(static_cast<std::size_t>(cursor + o_extent + 3), T(7));  // 7: untouched
    for (std::size_t i = 0; i < 3; ++i) {
      tensor<T>& from = i == 0 ? q : i == 1 ? k : v;
      tensor<T>& to = i == 0 ? qa : i == 1 ? ka : va;
      to.data = pool.data() + starts[i];
      for (index b = 0; b < B; ++b)
        for (index t = 0; t < from.length; ++t)
          for (index h = 0; h < H; ++h)
            for (index e = 0; e < from.dim; ++e) to.at(b, t, h, e) = from.at(b, t, h, e);
    }
    // out over (or near) one of the inputs.
    const std::size_t target = in.ConsumeIntegralInRange<std::size_t>(0, 2);
    const index delta = in.ConsumeIntegralInRange<index>(-o_extent, (target == 0   ? qa
                                                                     : target == 1 ? ka
                                                                                   : va)
                                                                        .extent());
    const index o_start =
        std::clamp<index>(starts[target] + delta, 0, static_cast<index>(pool.size()) - o_extent);
    oa.data = pool.data() + o_start;
    std::vector<char> mark(pool.size());
    for (const tensor<T>* t : {&qa, &ka, &va})
      overlap<T>(pool.data(), oa, *t, mark, shared, conservative);
    q = qa;
    k = ka;
    v = va;
    out = oa;
  }

  // One head through the front door may ask for each row's lse (chosen last, so that the inputs
  // stored before it keep their meaning; with M >= 1, where asking is valid).
  std::vector<T> lse;
  if constexpr (fa::provides_lse<Policy>)
    if (!multihead && M >= 1 && in.ConsumeBool())
      lse.assign(static_cast<std::size_t>(L), std::numeric_limits<T>::quiet_NaN());

  // The expected validity, per the documented rules.
  bool valid = knobs_ok && S == Sv_rows;
  auto context_ok = [&] {
    const double scale = opt.scale.value_or(E >= 1 ? 1.0 / std::sqrt(static_cast<double>(E)) : 1.0);
    return E == Ek && E >= 1 && std::isfinite(scale) &&
           std::abs(scale) <= static_cast<double>(std::numeric_limits<T>::max()) &&
           (scale == 0 || std::abs(scale) >= static_cast<double>(std::numeric_limits<T>::min())) &&
           !(opt.causal && !Policy::supports_causal);
  };
  if (multihead) {
    if (!qlens.empty() && static_cast<index>(qlens.size()) != B) valid = false;
    if (!klens.empty() && static_cast<index>(klens.size()) != B) valid = false;
    if (threads < 0 || threads > fa::multihead_options::max_threads) valid = false;
    if (B > 0 && !context_ok()) valid = false;  // checked per sample: with no sample, never
  } else if (!context_ok()) {
    valid = false;
  }
  std::vector<fa::context> contexts(static_cast<std::size_t>(B));
  for (index b = 0; b < B && valid; ++b) {
    const index Lv =
        !qlens.empty() ? qlens[static_cast<std::size_t>(b)] : opt.query_length.value_or(L);
    const index Sv =
        !klens.empty() ? klens[static_cast<std::size_t>(b)] : opt.key_length.value_or(S);
    if (Lv < 0 || Lv > L || Sv < 0 || Sv > S) {
      valid = false;
      break;
    }
    fa::context& c = contexts[static_cast<std::size_t>(b)];
    c.query_length = Lv;
    c.key_length = Sv;
    c.scale = opt.scale.value_or(1.0 / std::sqrt(static_cast<double>(E)));
    c.causal = opt.causal;
  }
  // Each head's inputs as they are before the call.
  std::vector<fa::matrix<T>> qh, kh, vh;
  for (index b = 0; b < B; ++b)
    for (index h = 0; h < H; ++h) {
      qh.push_back(q.head_matrix(b, h));
      kh.push_back(k.head_matrix(b, h));
      vh.push_back(v.head_matrix(b, h));
    }
  bool values_ok = true;
  if (valid && opt.check_finite)
    for (index b = 0; b < B; ++b)
      for (index h = 0; h < H; ++h) {
        const auto i = static_cast<std::size_t>(b * H + h);
        if (value_rule(qh[i], kh[i], vh[i], contexts[static_cast<std::size_t>(b)]) != values::ok)
          values_ok = false;
      }
  const bool expect_ok = valid && values_ok && !shared;

  const std::vector<T> pool_before = pool;
  bool threw = false;
  std::size_t largest = 0;
  std::string error;
  try {
    const tracking_scope tracking;
    if (multihead) {
      fa::multihead_options mo;
      mo.common = opt;
      mo.query_lengths = qlens;
      mo.key_lengths = klens;
      mo.threads = threads;
      fa::multihead_attention(policy, q.template view<const T>(), k.template view<const T>(),
                              v.template view<const T>(), out.template view<T>(), mo);
    } else {
      using cmap = Eigen::Map<const fa::matrix<T>, 0, Eigen::OuterStride<>>;
      using map = Eigen::Map<fa::matrix<T>, 0, Eigen::OuterStride<>>;
      // (An empty tensor's data may be null: its stride is then 0 in the packed layout, so that
      // no view of it offsets the null pointer.)
      auto stride = [](const tensor<T>& t) { return Eigen::OuterStride<>(t.token_stride); };
      const cmap qm(q.data, L, E, stride(q)), km(k.data, S, Ek, stride(k)),
          vm(v.data, Sv_rows, M, stride(v));
      const fa::view<T> o(map(out.data, L, M, stride(out)));
      if constexpr (fa::provides_lse<Policy>) {
        if (!lse.empty())
          fa::attention(policy, qm, km, vm, o, std::span<T>(lse), opt);
        else
          fa::attention(policy, qm, km, vm, o, opt);
      } else {
        fa::attention(policy, qm, km, vm, o, opt);
      }
    }
    largest = allocations.largest;
  } catch (const fa::invalid_argument& e) {
    threw = true;
    largest = allocations.largest;
    if (expect_ok && conservative && e.argument() != "out")
      violation("valid arguments refused, and not by the (conservative) aliasing check");
    error = e.argument();
  }
  if (verbose()) {
    std::fprintf(stderr,
                 "fuzz_attention: %s %s %s B=%td H=%td L=%td S=%td E=%td M=%td check_finite=%d "
                 "stress=%d knobs_ok=%d valid=%d values_ok=%d shared=%d conservative=%d largest "
                 "allocation %zu -> %s%s\n",
                 std::string(Policy::name).c_str(), std::is_same_v<T, float> ? "float" : "double",
                 multihead ? "multihead" : "attention", B, H, L, S, E, M, opt.check_finite ? 1 : 0,
                 stress, knobs_ok ? 1 : 0, valid ? 1 : 0, values_ok ? 1 : 0, shared ? 1 : 0,
                 conservative ? 1 : 0, largest, threw ? "threw " : "ok", error.c_str());
    print_knobs(policy);
  }
  if (threw && expect_ok && !conservative) violation("invalid_argument thrown for valid arguments");
  if (!threw && !valid) violation("invalid arguments accepted");
  if (!threw && !values_ok) violation("non-finite or overflowing values accepted (check_finite)");
  if (!threw && shared) violation("out sharing memory with an input was accepted");
  if (threw && largest > largest_allocation_before_error)
    violation("a large allocation before an invalid_argument (a knob allocated, then refused?)");
  if (largest > largest_allocation) violation("an allocation over 32 MiB for a tiny problem");

  if (threw) {  // nothing written
    if (aliasing) {
      if (std::memcmp(pool.data(), pool_before.data(), pool.size() * sizeof(T)) != 0)
        violation("a refused call modified its buffers");
    } else {
      for (const T x : obuf)
        if (!std::isnan(x)) violation("a refused call wrote to out");
    }
    return;
  }
  if (aliasing) {  // nothing written outside out
    std::vector<char> in_out(pool.size());
    for (index b = 0; b < B; ++b)
      for (index t = 0; t < L; ++t)
        for (index h = 0; h < H; ++h)
          for (index m = 0; m < M; ++m)
            in_out[static_cast<std::size_t>(&out.at(b, t, h, m) - pool.data())] = 1;
    for (std::size_t i = 0; i < pool.size(); ++i)
      if (!in_out[i] && std::memcmp(&pool[i], &pool_before[i], sizeof(T)) != 0)
        violation("a call wrote outside out");
  }
  for (index b = 0; b < B; ++b)
    for (index h = 0; h < H; ++h) {
      const auto i = static_cast<std::size_t>(b * H + h);
      const fa::context& c = contexts[static_cast<std::size_t>(b)];
      check_head(policy, qh[i], kh[i], vh[i], out.head_matrix(b, h), c, lse);
      // The guard's report of a head that ran (a valid query and key) on values inside the
      // bounds: an estimate that is a number, inside its interval.
      if (report.empty() || c.query_length == 0 || c.key_length == 0 ||
          value_rule(qh[i], kh[i], vh[i], c) != values::ok)
        continue;
      const fa::error_estimate& e = report[i];
      if (std::isnan(e.error) || !(e.lower <= e.error && e.error <= e.upper) || e.samples < 0 ||
          e.error < 0)
        violation("the guard's estimate is NaN, negative or outside its interval");
    }
}

// What this target fuzzes: the kernels of fastattn::kernels (fuzz_attention), or, built with
// FUZZ_ATTENTION_WRAPPERS (the fuzz_wrappers target, a corpus of its own), the wrappers: each
// approximate kernel with an exact band, and with the guard (a report of one entry per head, or
// none). Two targets, so that the inputs stored for one keep selecting what they did.
#if defined(FUZZ_ATTENTION_WRAPPERS)
using fuzzed = fa::kernel_list<fa::banded<fa::clustered>, fa::banded<fa::improved_clustered>,
                               fa::banded<fa::smyrf>, fa::guarded<fa::clustered>,
                               fa::guarded<fa::improved_clustered>, fa::guarded<fa::smyrf>>;
#else
using fuzzed = fa::kernels;
#endif

// Chooses the kernel by its index in `fuzzed`.
template <class T>
void run(FuzzedDataProvider& in) {
  const auto id = in.ConsumeIntegralInRange<std::size_t>(0, fuzzed::size - 1);
  std::size_t i = 0;
  fuzzed::for_each([&](auto type) {
    if (i++ == id) run_kernel<T, typename decltype(type)::type>(in);
  });
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
