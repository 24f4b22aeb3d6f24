// SMYRF: attention inside balanced clusters found by asymmetric LSH (Daras, Kitaev, Odena, Dimakis,
// NeurIPS 2020).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <tuple>

#include "attention.hpp"
#include "merge.hpp"
#include "detail/balanced_clusters.hpp"
#include "detail/causal.hpp"
#include "detail/e2lsh.hpp"
#include "detail/flash_block.hpp"
#include "detail/parallel.hpp"
#include "detail/rng.hpp"
#include "detail/scratch.hpp"
#include "detail/xbox.hpp"

namespace fastattn {

/// SMYRF attention: each query attends only to the keys of its cluster, in several hashing rounds.
///
/// Per round h = 0..hashes-1:
/// 1. XBOX+ maps valid queries and keys to E + 2 dimensions (norms over valid rows only), so that
///    a small Euclidean distance means a large inner product q.k;
/// 2. an E2LSH projection alpha_h ~ N(0, I), beta_h ~ U(0, r) gives each row the real hash
///    alpha_h . x + beta_h (same projection for queries and keys);
/// 3. valid queries and valid keys are each sorted by (hash, position); the sorted queries are cut
///    into n = ceil(Lv / cluster_size) consecutive clusters and the sorted keys into the same
///    number of consecutive groups, sizes near-equal (they differ by at most one, so every query
///    cluster holds at most cluster_size queries);
/// 4. query cluster c attends (softmax(scale q.k) v) to key group c only, giving per query an
///    output o_h,i and the log-sum-exp lse_h,i of its scores.
///
/// The rounds are merged as O_i = sum_h o_h,i exp(lse_h,i - logsumexp_h lse_h,i), in the log
/// domain by `merge_row` (merge.hpp: no overflow however large the scores). A query sees the
/// union of its clusters' keys, each key counted once per round it shares with the query.
///
/// Cost: O(hashes (Lv + Sv) E) for the projections (one (Lv x E)(E x hashes) product and one for
/// the keys), O(hashes (Lv + Sv)) for the sorts (stable radix sorts: at most 4 passes for float
/// hashes, 8 for double), and
/// 2 hashes sum_c |Q_c| |K_c| (E + M) ~ 2 hashes Lv (Sv / n) (E + M) flops for the attention, i.e.
/// O(hashes cluster_size Sv (E + M)) instead of dense's O(Lv Sv (E + M)). Extra memory is
/// O((Lv + Sv) hashes) for the hashes and sort orders, one key group's keys and values
/// (ceil(Sv / n) x (E + M)) and a block of at most 64 x 256 scores: never an Lv x Sv matrix. It
/// comes from the calling thread's scratch arena (detail/scratch.hpp), so repeated calls of the
/// same size allocate nothing.
///
/// Accuracy: SMYRF with few rounds is coarse on peaked attention (a cluster of c keys holds a
/// small share of each query's heavy keys); the error falls steadily with `hashes` and with
/// larger clusters. The README and the benchmark report give measured figures.
///
/// Knobs (checked by the front door before any work; a violation throws
/// `fastattn::invalid_argument` naming it):
/// - `hashes` in [1, 1024]: hashing rounds. More rounds cost linearly and lower the error.
/// - `cluster_size` in [1, 2^31]: the largest number of queries in a cluster (the paper's 2 x 32
///   and 2 x 16 were BERT settings at L = 128). `cluster_size >= Lv` makes one cluster holding
///   every query and key: the output is then exact attention (up to rounding) for any `hashes`,
///   and one round is computed whatever `hashes` says (every round would be the same).
/// - `r` > 0 and finite (at least the smallest normal double): the width of the E2LSH offset
///   beta ~ U(0, r). Since the hash is not floored, beta shifts every hash of a round by the same
///   amount and does not change the sorted orders (up to rounding of near-ties); the knob is kept
///   for fidelity to the paper.
/// - `seed` (any value): every random draw comes from `detail::rng(seed, context::stream)`: the
///   same seed gives bit-identical output, and the multi-head driver gives each (batch, head) its
///   own stream, so the result does not depend on the thread count.
///
/// Edge cases (defined here; the reference implementation asserts or crashes on them):
/// - any Lv, Sv, L != S, Lv not a multiple of cluster_size: clusters are near-equal as above;
/// - Sv < n (fewer valid keys than query clusters): the keys form Sv groups of one key, and query
///   cluster c attends to key group floor(c Sv / n) (the group at the same quantile of the sorted
///   order), so no cluster is ever empty and every valid key is used;
/// - padded queries (index >= query_length) and padded keys (index >= key_length) enter neither
///   the norms, the hashes, the sorts nor the clusters, and their contents (even NaN) are never
///   read (the front door zeroes padded rows and handles Lv = 0 and Sv = 0).
/// - causal attention runs by the recursive decomposition of detail/causal.hpp.
struct smyrf {
  static constexpr std::string_view name = "smyrf";  ///< its name in tools and messages
  static constexpr bool is_exact = false;            ///< an approximation
  static constexpr bool supports_causal = true;      ///< by decomposition (see above)
  static constexpr bool supports_exclusion = true;   ///< honours context::exclude (see banded)
  /// Below this many queries (and keys) exact attention is faster (the benchmark's crossover).
  static constexpr index dense_crossover = 256;

  index hashes = 2;         ///< hashing rounds, in [1, 1024]
  index cluster_size = 64;  ///< queries per cluster at most, in [1, 2^31]
  double r = 1.0;           ///< E2LSH offset width, in [DBL_MIN, DBL_MAX] (positive, finite)
  std::uint64_t seed = 0;   ///< seed of every random draw, any value

  /// The knobs and their ranges, checked by the front door (see make_knob).
  static constexpr auto knobs() {
    return std::make_tuple(
        make_knob("hashes", &smyrf::hashes, "hashing rounds", 1, 1024),
        make_knob("cluster_size", &smyrf::cluster_size, "queries (and keys) per balanced cluster",
                  1, index{1} << 31),
        make_knob("r", &smyrf::r,
                  "E2LSH offset width (kept for fidelity to the paper: it does not change the "
                  "sorted orders)",
                  std::numeric_limits<double>::min(), std::numeric_limits<double>::max()),
        make_knob("seed", &smyrf::seed, "seed of every random draw"));
  }

  /// Preconditions (ensured by the front door): knobs in range, Lv >= 1, Sv >= 1. `lse`, when
  /// not empty, receives each valid row's log normaliser: log((sum_h Z_h) / hashes), Z_h the
  /// sum of e^score over the keys of the query's cluster in round h (the exact log-sum-exp when
  /// cluster_size >= Lv). Causal by the recursive decomposition of detail/causal.hpp (the knobs
  /// apply per off-diagonal block).
  template <class T>
  void compute(const_view<T> q, const_view<T> k, const_view<T> v, view<T> out, const context& ctx,
               std::span<T> lse = {}) const {
    if (ctx.causal) return detail::causal_blocks(*this, q, k, v, out, ctx, lse);
    const index Lv = ctx.query_length, Sv = ctx.key_length, E = q.cols(), M = v.cols();
    const auto qv = q.topRows(Lv);
    const auto kv = k.topRows(Sv);

    // All scratch comes from the calling thread's arena (nothing is allocated once it has grown
    // to this size) and is sized once per call.
    const detail::arena::scope scratch;

    // Hashes of every round: one product for the queries and one for the keys.
    auto& xbox = detail::workspace<detail::xbox_plus<T>>();
    xbox.fit(qv, kv);
    detail::rng gen(seed, ctx.stream);
    auto& lsh = detail::workspace<detail::e2lsh<T>>();
    lsh.redraw(gen, E, hashes, r);
    auto query_hash = detail::scratch_matrix<T>(Lv, hashes);
    auto key_hash = detail::scratch_matrix<T>(Sv, hashes);
    // The two products are independent: one task each on up to ctx.threads threads (each product
    // computed whole by one thread, so the bits do not depend on the count).
    detail::parallel_invoke(
        ctx.threads, [&] { lsh.hash_queries(qv, xbox, query_hash); },
        [&] { lsh.hash_keys(kv, xbox, key_hash); });

    // Each cluster's keys (packed as K^T panels) and values, and each block of its queries, are
    // gathered into small contiguous blocks for the fused block kernel (flash_block.hpp).
    const auto plan = detail::cluster_plan::make(Lv, Sv, cluster_size);
    // One cluster (cluster_size >= Lv) holds every query and key in every round: the rounds are
    // the same exact attention, and merging them changes nothing but the rounding. One round is
    // computed (hashes = 1024 at L = 58 took 46 s under the fuzzer's sanitizers, for nothing).
    const index rounds = plan.clusters() == 1 ? 1 : hashes;
    T* const run_lse =
        lse.empty() ? detail::arena::local().take<T>(static_cast<std::size_t>(Lv)) : lse.data();
    auto& pool = detail::arena::local();
    const auto most = static_cast<std::size_t>(std::max(Lv, Sv));
    // Sort buffers for the queries' and the keys' sorts of a round, which run side by side.
    detail::hash_entry* const entries = pool.take<detail::hash_entry>(2 * most);
    detail::hash_entry* const entries_scratch = pool.take<detail::hash_entry>(2 * most);
    index* query_order = pool.take<index>(static_cast<std::size_t>(Lv));
    index* key_order = pool.take<index>(static_cast<std::size_t>(Sv));
    const T scale = static_cast<T>(ctx.scale);

    detail::with_flash_geometry<T>(M, [&]<class G>(G) {
      const index bq = std::min(query_block, plan.queries.max_size());
      const index max_keys = plan.keys.max_size();
      const index bk = (std::min(key_block, max_keys) + G::panel - 1) / G::panel * G::panel;
      const index panels = (max_keys + G::panel - 1) / G::panel;

      for (index h = 0; h < rounds; ++h) {
        // The queries' and the keys' orders: independent, one task each (one thread sorts each).
        detail::parallel_invoke(
            ctx.threads,
            [&] { detail::sort_by_hash(query_hash.col(h), entries, entries_scratch, query_order); },
            [&] {
              detail::sort_by_hash(key_hash.col(h), entries + most, entries_scratch + most,
                                   key_order);
            });

        // Clusters are independent (each query is in one per round): they share ctx.threads.
        detail::parallel_for(ctx.threads, plan.clusters(), [&](index c) {
          const detail::arena::scope cluster_scratch;  // the executing thread's
          auto& local = detail::arena::local();
          detail::flash_block<G> block(bq, bk, E, M);
          T* const group_k = local.take<T>(static_cast<std::size_t>(panels * G::panel * E));
          auto group_v = detail::scratch_matrix<T>(max_keys, M, local);
          auto block_out = detail::scratch_matrix<T>(bq, M, local);
          auto block_lse = detail::scratch_vector<T>(bq, local);
          const index g = plan.key_group_of(c);
          const index k0 = plan.keys.begin(g), keys = plan.keys.size(g);
          // The rows are scattered over q, k, v and out: each gather asks for the row
          // `ahead` places on (a hardware prefetcher cannot guess a permutation).
          constexpr index ahead = 8;
          const auto row_bytes = [](index n) { return static_cast<std::size_t>(n) * sizeof(T); };
          detail::flash::pack_panels<G>(group_k, keys, E, [&](index t) {
            if (t + ahead < keys)
              detail::flash::prefetch(kv.row(key_order[k0 + t + ahead]).data(), row_bytes(E));
            return kv.row(key_order[k0 + t]).data();
          });
          for (index t = 0; t < keys; ++t) {
            if (t + ahead < keys)
              detail::flash::prefetch(v.row(key_order[k0 + t + ahead]).data(), row_bytes(M));
            group_v.row(t) = v.row(key_order[k0 + t]);
          }
          const index q0 = plan.queries.begin(c), q_end = q0 + plan.queries.size(c);
          for (index i0 = q0; i0 < q_end; i0 += bq) {
            const index rows = std::min(bq, q_end - i0);
            for (index t = 0; t < rows; ++t) {
              if (t + ahead < rows) {
                const index next = query_order[i0 + t + ahead];
                detail::flash::prefetch(qv.row(next).data(), row_bytes(E));
                detail::flash::prefetch(out.row(next).data(), row_bytes(M));
              }
              block.set_query(t, qv.row(query_order[i0 + t]), scale);
            }
            block.reset(rows);
            for (index j0 = 0; j0 < keys; j0 += bk) {
              const index cols = std::min(bk, keys - j0);
              // Keys in a query's excluded band (banded's inner call) get weight 0: the block's
              // keys are compared by position with the band, one unsigned test each (a loop the
              // compiler vectorises; looking the band's keys up in the order cost a load and a
              // branch per key of the band: about 0.2 ms at N = 4096 in a profile).
              auto exclude = [&](index t, T* scores) {
                if (!ctx.exclude) return;
                const band rel = ctx.exclude->relative(ctx.query_offset, ctx.key_offset);
                if (rel.upper < rel.lower) return;  // an empty band excludes nothing
                const index lo = query_order[i0 + t] + rel.lower;
                const auto span = static_cast<std::uint64_t>(rel.upper - rel.lower);
                const index* const position = key_order + k0 + j0;
                constexpr T minus_inf = -std::numeric_limits<T>::infinity();
                for (index u = 0; u < cols; ++u)  // a select, not a branch: vectorised
                  scores[u] =
                      static_cast<std::uint64_t>(position[u] - lo) <= span ? minus_inf : scores[u];
              };
              block.absorb(
                  group_k + j0 * E, cols, group_v.data() + j0 * M, M,
                  [&](index) {
                    return std::pair<index, index>{0, cols};
                  },
                  exclude);
            }
            block.finish(block_out.topRows(rows), block_lse.data());
            // Rounds merge by log-sum-exp (merge.hpp); a row that saw no key adds nothing, NaN
            // (a non-finite input with check_finite off) stays NaN.
            for (index t = 0; t < rows; ++t) {
              const index i = query_order[i0 + t];
              if (h == 0) {
                out.row(i) = block_out.row(t);
                run_lse[i] = block_lse(t);
              } else {
                detail::merge_row(out.row(i), run_lse[i], block_out.row(t), block_lse(t));
              }
            }
          }
        });
      }
    });
    if (!lse.empty() && rounds > 1) {
      const T log_rounds = std::log(static_cast<T>(rounds));
      for (index i = 0; i < Lv; ++i) run_lse[i] -= log_rounds;
    }
  }

 private:
  static constexpr index query_block = 64;  // queries per score block inside a cluster
  static constexpr index key_block = 256;   // keys per block inside a cluster (rounded to panels)
};

}  // namespace fastattn
