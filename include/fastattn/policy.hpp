// What a kernel is: the policy concept, the context a kernel runs in, and the description of its
// knobs from which validation, the tools' flags and help, and the tests' kernel lists are derived.
#pragma once

#include <concepts>
#include <cstdint>
#include <algorithm>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>

#include <Eigen/Core>

#include "error.hpp"

namespace fastattn {

/// Row-major dense matrix: rows are tokens, so one token's features are contiguous.
template <class T>
using matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Read-only view of a row-major matrix whose rows may be strided (one head inside a
/// (batch, length, heads, dim) buffer is such a view). Features within a row are contiguous.
template <class T>
using const_view = Eigen::Ref<const matrix<T>, 0, Eigen::OuterStride<>>;

/// Writable counterpart of `const_view`.
template <class T>
using view = Eigen::Ref<matrix<T>, 0, Eigen::OuterStride<>>;

/// A band of keys around each query, by position: query i and key j are in it when
/// i + lower <= j <= i + upper. Causal visibility is `band::causal()` = {-unbounded, 0}; a local
/// window of w keys on both sides is {-w, w}, on earlier keys only {-w, 0}.
struct band {
  /// A side at +-unbounded is open: max / 4, beyond any position, so positions added to it
  /// cannot overflow.
  static constexpr index unbounded = std::numeric_limits<index>::max() / 4;
  index lower = -unbounded;  ///< smallest key offset j - i in the band
  index upper = unbounded;   ///< largest key offset j - i in the band

  /// Keys at or before the query: {-unbounded, 0}.
  static constexpr band causal() noexcept { return {-unbounded, 0}; }
  /// The same band for a tile whose first query is i0 and first key j0 (row r, column c of the
  /// tile are query i0 + r, key j0 + c).
  constexpr band relative(index i0, index j0) const noexcept {
    return {lower + (i0 - j0), upper + (i0 - j0)};
  }
  /// The keys [first, last) that any of the queries [i0, i0 + rows) sees, within [0, keys).
  constexpr std::pair<index, index> keys_of(index i0, index rows, index keys) const noexcept {
    const index first = std::clamp<index>(i0 + lower, 0, keys);
    const index last = std::clamp<index>(i0 + rows - 1 + upper + 1, first, keys);
    return {first, last};
  }
  /// Whether every query of [i0, i0 + rows) sees every key of [j0, j0 + cols).
  constexpr bool covers(index i0, index rows, index j0, index cols) const noexcept {
    return j0 >= i0 + rows - 1 + lower && j0 + cols - 1 <= i0 + upper;
  }
};

/// Options after validation against the shapes: what a kernel's `compute` receives.
struct context {
  double scale;          ///< resolved scale: finite, 0 or normal in the scalar type
  index query_length;    ///< valid queries Lv, >= 1 when compute is called
  index key_length;      ///< valid keys Sv, >= 1 when compute is called
  bool causal;           ///< query i sees keys j <= i
  std::uint64_t stream;  ///< which (batch, head) this is: kernels derive their random draws
                         ///< from (seed, stream) so results do not depend on scheduling
  /// Keys this call must give zero weight, set by `banded` for its inner kernel (only for
  /// policies whose `supports_exclusion` is true): query row i, at position query_offset + i,
  /// gives no weight to key row j, at position key_offset + j, when the positions are in the
  /// band. Empty: every visible key counts.
  std::optional<band> exclude{};
  index query_offset = 0;  ///< position of query row 0 (sub-problems of a decomposition)
  index key_offset = 0;    ///< position of key row 0
  /// Threads the kernel may use inside this one head (detail/parallel.hpp), >= 1: the
  /// multi-head driver gives a head the threads that batch x heads leaves idle. A kernel's
  /// result never depends on it (bit-identical on any count).
  int threads = 1;
  /// Set by the front door when it has found every valid row of q, k and v finite
  /// (options::check_finite): a kernel may then skip finiteness checks of its own (which keep a
  /// NaN value reaching the rows that weigh it by zero). False: nothing is known.
  bool checked_finite = false;
};

/// What a kernel policy provides. Built-in policies are listed in `fastattn::kernels`
/// (fastattn.hpp); a user type that satisfies this concept works everywhere they do
/// (`attention()`, `multihead_attention()`, the typed test suites).
///
/// - `P::name`: a `std::string_view`, the kernel's name in benchmarks and tools;
/// - `P::is_exact`: true when the output equals softmax(s Q K^T) V up to rounding;
/// - `P::supports_causal`: whether `compute` may be called with `context::causal` true (a
///   policy that says false but `provides_lse` is made causal by the front door instead);
/// - `p.compute(q, k, v, out, ctx)` for float and double: writes rows [0, ctx.query_length) of
///   the L x M output. The front door has already validated shapes, lengths, knobs and values,
///   zeroed the padded rows, and handled the empty cases: compute sees Lv >= 1 and Sv >= 1, must
///   not write rows at and beyond Lv, and must not read keys at and beyond Sv.
///
/// Optional members: `static constexpr auto knobs()` (a tuple of `make_knob(...)`: the knobs'
/// names, help and valid ranges, checked by the front door before any work, and the tools'
/// flags), and `void validate() const` (checks across knobs; throws invalid_argument).
template <class P>
concept attention_policy = std::copy_constructible<P> &&
    requires(const P& p, const_view<float> qf, view<float> of, const_view<double> qd,
             view<double> od, const context& ctx) {
  { P::name } -> std::convertible_to<std::string_view>;
  {std::bool_constant<P::is_exact>{}};
  {std::bool_constant<P::supports_causal>{}};
  p.compute(qf, qf, qf, of, ctx);
  p.compute(qd, qd, qd, od, ctx);
};

/// A policy that can also return, per valid query row, the log-sum-exp of its scores (for an
/// approximate kernel, the log of the normaliser its approximation uses): `compute(q, k, v, out,
/// ctx, lse)` with `lse` a std::span of ctx.query_length entries (empty: not asked, no cost).
/// Such a policy gets causal attention (by recursive decomposition), merging and local bands from
/// the library without writing them.
template <class P>
concept provides_lse = attention_policy<P> &&
    requires(const P& p, const_view<float> qf, view<float> of, const_view<double> qd,
             view<double> od, const context& ctx, std::span<float> lf, std::span<double> ld) {
  p.compute(qf, qf, qf, of, ctx, lf);
  p.compute(qd, qd, qd, od, ctx, ld);
};

/// A policy that honours context::exclude (zero weight for each query's band of keys), so that
/// `banded` can give it an exact local band without counting those keys twice.
template <class P>
concept supports_exclusion = requires {
  requires P::supports_exclusion;
};

/// The problem size (valid queries, with as many keys) below which exact attention is faster
/// than P: P's `static constexpr index dense_crossover` when it states one (the built-in
/// approximate kernels state the crossover measured by the project's benchmark: README,
/// "Crossovers with dense"), else 0. `guarded` runs dense below it, and the causal decomposition
/// computes off-diagonal blocks smaller than it exactly.
template <class P>
inline constexpr index dense_crossover = [] {
  if constexpr (requires { P::dense_crossover; })
    return index{P::dense_crossover};
  else
    return index{0};
}();

/// The problem size below which exact attention is faster than `policy` at its knob values:
/// P's `index crossover() const` when P defines one (a kernel whose cost moves with a knob, as
/// the clustering kernels' with their clusters), else dense_crossover<P>. The causal
/// decomposition solves the off-diagonal blocks below it exactly.
template <class P>
index crossover(const P& policy) {
  if constexpr (requires {
                  { policy.crossover() } -> std::convertible_to<index>;
                })
    return policy.crossover();
  else
    return dense_crossover<P>;
}

/// P's knobs on an off-diagonal block of the causal decomposition (detail/causal.hpp) that holds
/// `rows` of the `of` queries of the whole causal problem (1 <= rows <= of): P's
/// `P for_block(index rows, index of) const` when P defines one, else P unchanged. A kernel whose
/// knob is a count relative to the problem's size (clusters for L queries) scales it here (the
/// built-in clustering kernels take ceil(C sqrt(rows / of)) clusters; why: detail/causal.hpp);
/// one whose knobs are already per-cluster sizes (smyrf's cluster_size) needs none.
template <class P>
P for_block(const P& policy, index rows, index of) {
  if constexpr (requires {
                  { policy.for_block(rows, of) } -> std::same_as<P>;
                })
    return policy.for_block(rows, of);
  else
    return policy;
}

/// Whether a causal request can be honoured: natively (`supports_causal`) or, for a policy with
/// log-sum-exp, by the front door's recursive decomposition.
template <class P>
inline constexpr bool causal_capable = P::supports_causal || provides_lse<P>;

/// One knob of a policy: a public data member, its name (the tools' flag is the name with '_'
/// replaced by '-'), a one-line meaning, and its valid range [min, max] (inclusive; for floating
/// knobs NaN is never valid). Build it with `make_knob`.
template <class Policy, class Member>
struct knob {
  using policy_type = Policy;  ///< the policy the knob belongs to
  using value_type = Member;   ///< the knob's type

  std::string_view name;   ///< the member's name, e.g. "cluster_size"
  Member Policy::*member;  ///< the public data member it describes
  std::string_view help;   ///< one line for the tools' help
  Member min;              ///< smallest valid value
  Member max;              ///< largest valid value

  /// The knob's value in `p`.
  constexpr const Member& get(const Policy& p) const noexcept { return p.*member; }
  /// The knob's value in `p`, writable.
  constexpr Member& get(Policy& p) const noexcept { return p.*member; }
  /// Whether min <= value <= max (false for NaN).
  constexpr bool valid(const Member& value) const noexcept {
    return value >= min && value <= max;  // false for NaN
  }
  /// The command-line flag without its dashes: "cluster_size" -> "cluster-size".
  std::string flag() const {
    std::string f(name);
    for (char& c : f)
      if (c == '_') c = '-';
    return f;
  }
};

/// A knob of `member`, valid in [min, max] (min <= max, not checked).
template <class Policy, class Member>
constexpr knob<Policy, Member> make_knob(std::string_view name, Member Policy::*member,
                                         std::string_view help, std::type_identity_t<Member> min,
                                         std::type_identity_t<Member> max) {
  return {name, member, help, min, max};
}

/// A knob that takes every value of its type (a seed, a switch).
template <class Policy, class Member>
constexpr knob<Policy, Member> make_knob(std::string_view name, Member Policy::*member,
                                         std::string_view help) {
  if constexpr (std::is_floating_point_v<Member>)
    return {name, member, help, std::numeric_limits<Member>::lowest(),
            std::numeric_limits<Member>::max()};
  else
    return {name, member, help, std::numeric_limits<Member>::min(),
            std::numeric_limits<Member>::max()};
}

/// Whether P describes its knobs.
template <class P>
concept has_knobs = requires {
  P::knobs();
};

/// Calls f(knob) for every knob of P (none when P does not describe them).
template <class P, class F>
constexpr void for_each_knob(F&& f) {
  if constexpr (has_knobs<P>) std::apply([&](const auto&... k) { (f(k), ...); }, P::knobs());
}

/// Throws invalid_argument naming the first knob of `policy` outside its range, or what the
/// policy's own `validate()` rejects. The front door calls it before any work.
template <class P>
void validate(const P& policy) {
  for_each_knob<P>([&](const auto& k) {
    if (!k.valid(k.get(policy)))
      detail::fail(k.name, P::name, ": ", k.name, " must be in [", detail::to_text(k.min), ", ",
                   detail::to_text(k.max), "], got ", detail::to_text(k.get(policy)));
  });
  if constexpr (requires { policy.validate(); }) policy.validate();
}

/// Throws invalid_argument when `policy` cannot run `streams` heads in one call (streams 0 to
/// streams - 1: the front door runs stream 0, multihead_attention B * H of them), as its optional
/// member `void validate_streams(index) const` says (guarded: its report span is too short).
/// Called before any work, so that a refused call writes nothing.
template <class P>
void validate_streams(const P& policy, index streams) {
  if constexpr (requires { policy.validate_streams(streams); }) policy.validate_streams(streams);
}

/// A compile-time list of policies (see `fastattn::kernels` in fastattn.hpp).
template <class... Policies>
struct kernel_list {
  static constexpr std::size_t size = sizeof...(Policies);  ///< number of policies

  /// Calls f(std::type_identity<P>{}) for each policy, in order.
  template <class F>
  static constexpr void for_each(F&& f) {
    (f(std::type_identity<Policies>{}), ...);
  }

  /// Calls f(std::type_identity<P>{}) for the policy P called `name`; returns false when no
  /// policy has that name.
  template <class F>
  static bool visit(std::string_view name, F&& f) {
    bool found = false;
    ((!found && Policies::name == name ? (found = true, f(std::type_identity<Policies>{}), 0) : 0),
     ...);
    return found;
  }

  /// The names, comma separated.
  static std::string names() {
    std::string out;
    ((out += (out.empty() ? "" : ", ") + std::string(Policies::name)), ...);
    return out;
  }
};

}  // namespace fastattn
