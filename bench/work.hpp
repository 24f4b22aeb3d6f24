// The floating-point work of one kernel call on an N x N problem (one head, E = M = e, by default
// head_dim), the numerator of every benchmark's `flops` counter.
//
// `work_of(policy, n, e)` takes, in order:
// 1. the policy's own model, when it has one: `policy.flops(L, S, E, M)`;
// 2. the models below, for the built-in kernels;
// 3. otherwise the work of exact attention at the same shapes (`exact_work`): a kernel added to
//    `fastattn::kernels` is benchmarked without edits here, and its `flops` then reads as the
//    rate of exact attention it delivers until it gets a model of its own.
#pragma once

#include <fastattn/fastattn.hpp>

#include <algorithm>

namespace fastattn::bench {

inline constexpr index head_dim = 64;  // E = M

/// Q K^T and P V of exact attention: 2 N N E + 2 N N M flops.
inline double exact_work(index n, index e = head_dim) {
  return 4.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(e);
}

inline double work(const dense& /*policy*/, index n, index e) { return exact_work(n, e); }

/// clustered: the (N x E)(E x B) hash projections, the centroid means (N E adds), and the centroid
/// attention, C x N scores plus C x N by N x M values. K-means is integer work (popcounts), not
/// counted.
inline double clustered_work(index n, index clusters, int bits, index e) {
  const auto N = static_cast<double>(n), E = static_cast<double>(e);
  const auto C = static_cast<double>(std::min(clusters, n));
  return 2.0 * N * E * bits + N * E + 2.0 * C * N * (E + E);
}

inline double work(const clustered& policy, index n, index e) {
  return clustered_work(n, policy.clusters, policy.bits, e);
}

/// improved_clustered adds, per query, exact attention on its cluster's k keys: 2 N k (E + M).
/// (Its centroid scores and residual rows cost the same as clustered's centroid attention.)
inline double work(const improved_clustered& policy, index n, index e) {
  const auto k = static_cast<double>(std::min(policy.topk, n));
  return clustered_work(n, policy.clusters, policy.bits, e) +
         2.0 * static_cast<double>(n) * k * 2.0 * static_cast<double>(e);
}

/// smyrf: per round, the (N x E)(E x hashes) projections of queries and keys, then for every
/// (query cluster, key group) pair the two products Q_c K_g^T and P V_g: 2 |Q_c| |K_g| (E + M)
/// flops, summed exactly over the cluster plan.
inline double work(const smyrf& policy, index n, index e) {
  const auto plan = detail::cluster_plan::make(n, n, policy.cluster_size);
  double pairs = 0;
  for (index c = 0; c < plan.clusters(); ++c)
    pairs += static_cast<double>(plan.queries.size(c)) *
             static_cast<double>(plan.keys.size(plan.key_group_of(c)));
  const auto h = static_cast<double>(policy.hashes);
  const auto E = static_cast<double>(e);
  return h * (2.0 * pairs * 2.0 * E + 2.0 * 2.0 * static_cast<double>(n) * E);
}

/// local (local.hpp): a band of at most detail::band_attention_widest keys a row goes diagonal
/// by diagonal, 2 (E + M) for each key of a row's band inside [0, n) (no score outside the band
/// is computed); a wider one by blocks of b = clamp(window, 16, 64) rows against the keys the
/// block's window reaches (keys outside [i0 - window, i0 + b + window) are never touched), 2 rows
/// keys (E + M) per block. With causal, the window's earlier side.
inline double work(const local& policy, index n, index e, bool causal = false) {
  const band visible = local::visible(policy.window, causal);
  double pairs = 0;
  if (detail::goes_by_diagonals(visible)) {
    for (index i = 0; i < n; ++i) {
      const auto [first, last] = visible.keys_of(i, 1, n);
      pairs += static_cast<double>(last - first);
    }
  } else {
    const index block = std::clamp<index>(policy.window, 16, 64);
    for (index i0 = 0; i0 < n; i0 += block) {
      const index rows = std::min(block, n - i0);
      const auto [first, last] = visible.keys_of(i0, rows, n);
      pairs += static_cast<double>(rows) * static_cast<double>(last - first);
    }
  }
  return 2.0 * pairs * 2.0 * static_cast<double>(e);
}

/// The work of one causal call: exact causal attention (half of exact_work) for dense and local's
/// own band; for a kernel made causal by the recursive decomposition (detail/causal.hpp), the
/// exact diagonal leaves of at most 128 rows plus the kernel's work on each off-diagonal block of
/// side n / 2 at every level.
template <class Policy, class Work>
double causal_work(const Policy& policy, index n, Work&& work_at) {
  if constexpr (Policy::is_exact) {
    return exact_work(n) / 2;
  } else {
    if (n <= detail::causal_leaf) return exact_work(n) / 2;
    const index half = n / 2;
    return causal_work(policy, half, work_at) + causal_work(policy, n - half, work_at) +
           work_at(half);
  }
}

/// The work of one call of `policy` on problem N with E = M = e (see the top of this file).
template <attention_policy Policy>
double work_of(const Policy& policy, index n, index e = head_dim) {
  if constexpr (requires { policy.flops(n, n, e, e); })
    return static_cast<double>(policy.flops(n, n, e, e));
  else if constexpr (requires { work(policy, n, e); })
    return work(policy, n, e);
  else
    return exact_work(n, e);
}

}  // namespace fastattn::bench
