// Causal attention for any kernel that returns its log-sum-exp, by recursive decomposition
// (HyperAttention, Han et al. ICLR 2024, Algorithm 4): the causal problem on rows and keys [a, b)
// is the causal problem on [a, m), the causal problem on [m, b), and the full (non-causal) block
// rows [m, b) x keys [a, m), whose result is merged into the rows [m, b) by log-sum-exp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>

#include "../merge.hpp"
#include "../policy.hpp"
#include "exact_attention.hpp"
#include "rng.hpp"
#include "scratch.hpp"

namespace fastattn::detail {

/// Diagonal blocks of at most this many rows are solved exactly (causal streamed attention).
inline constexpr index causal_leaf = 128;

/// The random stream of an off-diagonal block: a mix of the head's stream and the block's place
/// in the recursion tree (root 1, children 2 i and 2 i + 1), so every block draws independently
/// and the result does not depend on scheduling.
inline std::uint64_t block_stream(std::uint64_t head_stream, std::uint64_t node) noexcept {
  std::uint64_t state = head_stream ^ (node * 0x9E3779B97F4A7C15ULL);
  return splitmix64(state);
}

/// The band ctx.exclude (in positions) in the indices of a block whose rows start at position
/// query_pos and keys at key_pos.
inline std::optional<band> excluded_in(const context& ctx, index query_pos, index key_pos) {
  if (!ctx.exclude) return std::nullopt;
  const index shift = query_pos - key_pos;
  return band{ctx.exclude->lower + shift, ctx.exclude->upper + shift};
}

template <class Policy, class T>
void causal_diagonal(const Policy& policy, const const_view<T>& q, const const_view<T>& k,
                     const const_view<T>& v, view<T>& out, T* lse, const context& ctx, index a,
                     index b, index of, std::uint64_t node) {
  const index n = b - a;
  if (n <= causal_leaf) {  // exact, causal, without the excluded keys
    exact_attention_excluding<T>(q.middleRows(a, n), k.middleRows(a, n), v.middleRows(a, n),
                                 out.middleRows(a, n), n, n, ctx.scale, band::causal(),
                                 excluded_in(ctx, ctx.query_offset + a, ctx.key_offset + a), {n, n},
                                 lse + a);
    return;
  }
  const index m = a + n / 2;
  causal_diagonal(policy, q, k, v, out, lse, ctx, a, m, of, 2 * node);
  causal_diagonal(policy, q, k, v, out, lse, ctx, m, b, of, 2 * node + 1);
  // Rows [m, b) see every key of [a, m): the kernel's (non-causal) approximation of that block
  // at the block's knobs, or exact attention when the block is below the kernel's crossover with
  // dense at those knobs (faster there, and exact).
  const arena::scope scratch;
  const index rows = b - m, keys = m - a;
  const Policy sub = for_block(policy, rows, of);
  if (rows < crossover(sub)) {
    auto part = scratch_matrix<T>(rows, v.cols());
    T* const part_lse = arena::local().take<T>(static_cast<std::size_t>(rows));
    exact_attention_excluding<T>(
        q.middleRows(m, rows), k.middleRows(a, keys), v.middleRows(a, keys), view<T>(part), rows,
        keys, ctx.scale, std::nullopt, excluded_in(ctx, ctx.query_offset + m, ctx.key_offset + a),
        {128, 512}, part_lse);
    for (index r = 0; r < rows; ++r)
      merge_row(out.row(m + r), lse[m + r], part.row(r), part_lse[r]);
    return;
  }
  auto part = scratch_matrix<T>(rows, v.cols());
  T* const part_lse = arena::local().take<T>(static_cast<std::size_t>(rows));
  context block = ctx;
  block.query_length = rows;
  block.key_length = keys;
  block.causal = false;
  block.stream = block_stream(ctx.stream, node);
  block.query_offset = ctx.query_offset + m;
  block.key_offset = ctx.key_offset + a;
  sub.compute(const_view<T>(q.middleRows(m, rows)), const_view<T>(k.middleRows(a, keys)),
              const_view<T>(v.middleRows(a, keys)), view<T>(part), block,
              std::span<T>(part_lse, static_cast<std::size_t>(rows)));
  for (index r = 0; r < rows; ++r) merge_row(out.row(m + r), lse[m + r], part.row(r), part_lse[r]);
}

/// Causal attention of rows [0, ctx.query_length) over keys [0, ctx.key_length) for a policy
/// with log-sum-exp, by the recursive decomposition above, on the D = min(Lv, Sv) rows that see
/// a causal prefix.
/// - Diagonal leaves of at most 128 rows are exact.
/// - An off-diagonal block of r rows takes the knobs for_block(policy, r, D) (policy.hpp):
///   unchanged unless the kernel scales them. smyrf's are per-cluster sizes and stay; the
///   clustering kernels take ceil(C sqrt(r / D)) clusters. That is between keeping C, whose
///   centroid work is the same on every level, O(C N log N) over the log2(N / 128) levels, with
///   a hundred clusters on a few hundred queries in the small blocks, and keeping the queries
///   per cluster (C r / D clusters: O(C N), but small blocks so coarse that the causal error was
///   2.4x the non-causal one at N = 4096). With the square root the levels' cost is a geometric
///   series, O(C N), plus the exact leaves, O(128 N), and the error stays below the non-causal
///   kernel's (README, "What each kernel costs").
/// - A block below the kernel's crossover with dense at the block's knobs (crossover(),
///   policy.hpp), where exact attention is faster, is exact; the others are solved by the kernel.
/// Rows at and beyond the key count (L > S) see every key: one non-causal call of the kernel with
/// its own knobs. `lse`, when not empty, receives each valid row's log-sum-exp.
template <class Policy, class T>
void causal_blocks(const Policy& policy, const_view<T> q, const_view<T> k, const_view<T> v,
                   view<T> out, const context& ctx, std::span<T> lse) {
  const index Lv = ctx.query_length, Sv = ctx.key_length, D = std::min(Lv, Sv);
  const arena::scope scratch;
  T* const row_lse =
      lse.empty() ? arena::local().take<T>(static_cast<std::size_t>(Lv)) : lse.data();
  if (Lv > D) {  // rows [D, Lv) see all Sv keys
    context rest = ctx;
    rest.query_length = Lv - D;
    rest.causal = false;
    rest.stream = block_stream(ctx.stream, 0);
    rest.query_offset = ctx.query_offset + D;
    policy.compute(const_view<T>(q.middleRows(D, Lv - D)), k, v, view<T>(out.middleRows(D, Lv - D)),
                   rest, std::span<T>(row_lse + D, static_cast<std::size_t>(Lv - D)));
  }
  causal_diagonal(policy, q, k, v, out, row_lse, ctx, 0, D, D, 1);
}

}  // namespace fastattn::detail
