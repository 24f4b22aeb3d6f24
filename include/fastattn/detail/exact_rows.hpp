// Exact attention of a few chosen query rows, each over its own prefix of the keys (the guard's
// sampled rows, guarded.hpp): the rows are the lanes of the score tiles, so the keys are read
// where they lie and never packed.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include <Eigen/Core>

#include "../policy.hpp"
#include "flash_block.hpp"
#include "parallel.hpp"
#include "scratch.hpp"

// Eigen's packet types are vector types with attributes, which GCC warns about as template
// arguments (see flash_block.hpp).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif

namespace fastattn::detail {

/// Bit l set when p[l] is not 0 (a kept weight, or NaN), l < lanes (<= 32): with AVX-512 a
/// compare into a mask per packet, elsewhere scalars.
template <class T, int lanes>
std::uint32_t weighed_lanes(const T* p) noexcept {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> && lanes == 32) {
    const __m512 zero = _mm512_setzero_ps();
    return static_cast<std::uint32_t>(_mm512_cmp_ps_mask(_mm512_load_ps(p), zero, _CMP_NEQ_UQ)) |
           static_cast<std::uint32_t>(_mm512_cmp_ps_mask(_mm512_load_ps(p + 16), zero, _CMP_NEQ_UQ))
               << 16;
  } else if constexpr (std::is_same_v<T, double> && lanes == 16) {
    const __m512d zero = _mm512_setzero_pd();
    return static_cast<std::uint32_t>(_mm512_cmp_pd_mask(_mm512_load_pd(p), zero, _CMP_NEQ_UQ)) |
           static_cast<std::uint32_t>(_mm512_cmp_pd_mask(_mm512_load_pd(p + 8), zero, _CMP_NEQ_UQ))
               << 8;
  }
#endif
  std::uint32_t bits = 0;
  for (int l = 0; l < lanes; ++l) bits |= static_cast<std::uint32_t>(p[l] != T(0)) << l;
  return bits;
}

/// The keys t < cols whose bits[t] has bit `lane` set, listed into `keys` (room for cols + 16
/// entries); their count. With AVX-512 a test into a mask and a compress of the keys' indices
/// per 16 keys (the register form, as flash::list_weighed), elsewhere branch-free scalars.
inline index list_lane(const std::uint32_t* bits, index cols, int lane,
                       std::int32_t* keys) noexcept {
  index n = 0, t = 0;
#if defined(__AVX512F__)
  const __m512i bit = _mm512_set1_epi32(static_cast<int>(std::uint32_t{1} << lane));
  __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; t + 16 <= cols; t += 16) {
    const __mmask16 set = _mm512_test_epi32_mask(_mm512_loadu_si512(bits + t), bit);
    _mm512_storeu_si512(keys + n, _mm512_maskz_compress_epi32(set, at));
    n += std::popcount(static_cast<unsigned>(set));
    at = _mm512_add_epi32(at, _mm512_set1_epi32(16));
  }
#endif
  for (; t < cols; ++t) {
    keys[n] = static_cast<std::int32_t>(t);
    n += (bits[t] >> lane) & 1U;
  }
  return n;
}

/// The softmax step of exact_rows with AVX-512 (float or double lanes): for keys t < cols (2
/// packets of lanes each at st + t lanes), x = exp(s - base) where s - base >= log_drop (NaN
/// too), else 0, stored back and added into total. Only the kept exponents are computed: they
/// are compressed into `exps` (room for cols lanes + 16 values), exponentiated there a packet at
/// a time and expanded back (on peaked attention about 6% of them). Compress and expand in their
/// register forms: the memory forms are microcoded on AMD's Zen 4, and GCC folded the load into
/// the expand (keep_in_register stops it). False (nothing done) without AVX-512.
template <class T, int lanes, class P>
bool softmax_compressed(T* st, index cols, const P* base, P* total, T log_drop, T* exps,
                        std::uint16_t* masks) noexcept {
#if defined(__AVX512F__)
  namespace ei = Eigen::internal;
  if constexpr (std::is_same_v<T, float> && lanes == 32) {
    const __m512 floor = _mm512_set1_ps(log_drop);
    index n = 0;
    for (index t = 0; t < cols; ++t)
      for (int w = 0; w < 2; ++w) {
        const __m512 d = _mm512_sub_ps(_mm512_load_ps(st + t * lanes + w * 16), base[w]);
        const __mmask16 kept = _mm512_cmp_ps_mask(d, floor, _CMP_NLT_UQ);
        _mm512_storeu_ps(exps + n, _mm512_maskz_compress_ps(kept, d));
        n += std::popcount(static_cast<unsigned>(kept));
        masks[2 * t + w] = kept;
      }
    for (index i = 0; i < n; i += 16)
      _mm512_storeu_ps(exps + i, ei::pexp<P>(_mm512_loadu_ps(exps + i)));
    n = 0;
    __m512 sums[2] = {total[0], total[1]};
    for (index t = 0; t < cols; ++t)
      for (int w = 0; w < 2; ++w) {
        const auto kept = static_cast<__mmask16>(masks[2 * t + w]);
        __m512 packed = _mm512_loadu_ps(exps + n);
        flash::keep_in_register(packed);  // the expand's register form (see above)
        const __m512 x = _mm512_maskz_expand_ps(kept, packed);
        n += std::popcount(static_cast<unsigned>(kept));
        sums[w] = _mm512_add_ps(sums[w], x);
        _mm512_store_ps(st + t * lanes + w * 16, x);
      }
    total[0] = sums[0];
    total[1] = sums[1];
    return true;
  } else if constexpr (std::is_same_v<T, double> && lanes == 16) {
    const __m512d floor = _mm512_set1_pd(log_drop);
    index n = 0;
    for (index t = 0; t < cols; ++t)
      for (int w = 0; w < 2; ++w) {
        const __m512d d = _mm512_sub_pd(_mm512_load_pd(st + t * lanes + w * 8), base[w]);
        const __mmask8 kept = _mm512_cmp_pd_mask(d, floor, _CMP_NLT_UQ);
        _mm512_storeu_pd(exps + n, _mm512_maskz_compress_pd(kept, d));
        n += std::popcount(static_cast<unsigned>(kept));
        masks[2 * t + w] = kept;
      }
    for (index i = 0; i < n; i += 8)
      _mm512_storeu_pd(exps + i, ei::pexp<P>(_mm512_loadu_pd(exps + i)));
    n = 0;
    __m512d sums[2] = {total[0], total[1]};
    for (index t = 0; t < cols; ++t)
      for (int w = 0; w < 2; ++w) {
        const auto kept = static_cast<__mmask8>(masks[2 * t + w]);
        __m512d packed = _mm512_loadu_pd(exps + n);
        flash::keep_in_register(packed);
        const __m512d x = _mm512_maskz_expand_pd(kept, packed);
        n += std::popcount(static_cast<unsigned>(kept));
        sums[w] = _mm512_add_pd(sums[w], x);
        _mm512_store_pd(st + t * lanes + w * 8, x);
      }
    total[0] = sums[0];
    total[1] = sums[1];
    return true;
  }
#endif
  (void)st, (void)cols, (void)base, (void)total, (void)log_drop, (void)exps, (void)masks;
  return false;
}

/// dst[l ldd + t] = src[t lds + l] for t < rows, l < lanes: whole packets of Eigen's packet for T
/// transposed in registers (src readable and dst writable up to rows rounded up to a packet;
/// lanes a multiple of it, src rows aligned), else scalars.
template <class T>
void transpose_packets(const T* src, index lds, index rows, index lanes, T* dst, index ldd) {
  namespace ei = Eigen::internal;
  using P = typename ei::packet_traits<T>::type;
  constexpr int size = ei::unpacket_traits<P>::size;
  if constexpr (size > 1 && requires(ei::PacketBlock<P, size> & b) { ei::ptranspose(b); }) {
    for (index t0 = 0; t0 < rows; t0 += size)
      for (index l0 = 0; l0 < lanes; l0 += size) {
        ei::PacketBlock<P, size> block;
        for (int i = 0; i < size; ++i) block.packet[i] = ei::pload<P>(src + (t0 + i) * lds + l0);
        ei::ptranspose(block);
        for (int i = 0; i < size; ++i) ei::pstoreu(dst + (l0 + i) * ldd + t0, block.packet[i]);
      }
  } else {
    for (index t = 0; t < rows; ++t)
      for (index l = 0; l < lanes; ++l) dst[l * ldd + t] = src[t * lds + l];
  }
}

/// out.row(r) = softmax(scale q_{ids[r]} . k_j for j < ends[r]) V over those keys, for r < n
/// (ends null: every row sees keys [0, keys); ends[r] <= keys); a row that sees no key gets
/// zeros. Weights below eps / (16 keys) of a row's running largest are dropped, as the fused
/// kernel's drop_below: at most eps / 16 of a row's total, within exact attention's rounding.
///
/// Why not the fused kernel (flash_attention): with a few rows it packs every key block for a
/// handful of score tiles (at S = 4096 and 32 rows the packing took a seventh of the time), and
/// causal rows, each with its own end, took one call each. Here the score tiles run with the
/// roles swapped: the keys are the tile's rows, read from k as they lie and broadcast, and up to
/// 2 packets of query rows (32 floats or 16 doubles with AVX-512) are its lanes, packed once per
/// call; a row's end masks its lane. The online softmax then runs across the lanes, a packet per
/// key (with AVX-512, exp only of the weights that may be kept: softmax_compressed). P V:
/// - finite values and at most a quarter of the block's weights kept (peaked attention): each
///   row lists the keys it weighs (list_lane, from each key's bits of the lanes that weigh it)
///   and adds only those, reading its weights at the lanes' stride;
/// - otherwise the weights are transposed back into rows for the fused kernel's value tiles, or,
///   in a block where some row ends, for each row's own keys: a key past a row's end is never
///   multiplied in, not even by 0 (a NaN value there, with check_finite off, must not reach it),
///   while a NaN value a row sees reaches it as 0 * NaN when its weight was dropped.
///
/// Keys are cut into runs by the key count alone (at most 8, at least 1024 keys each), each run
/// streamed into a softmax state of its own on up to `threads` threads and the states merged in
/// order: the result does not depend on `threads`. Extra memory O(n (E + M) + runs (block (lanes
/// + M))) from the arenas: no rows x keys matrix.
template <class T>
void exact_rows(const const_view<T>& q, const index* ids, const index* ends, index n,
                const const_view<T>& k, const const_view<T>& v, index keys, double scale,
                view<T> out, int threads, bool values_finite) {
  if (n <= 0) return;
  namespace ei = Eigen::internal;
  using G = flash_geometry<T>;  // the score lanes: Eigen's full packet for T
  using P = typename G::packet;
  constexpr index size = G::size, lanes = G::panel, group = G::group;
  constexpr index rows_cap = (lanes + group - 1) / group * group;  // whole groups for P V
  constexpr index bk = 256;                                        // keys per block
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  const index e = q.cols(), m = v.cols(), ldk = k.outerStride(), ldv = v.outerStride();
  const T sc = static_cast<T>(scale);
  const T drop =
      std::numeric_limits<T>::epsilon() / (T(16) * static_cast<T>(std::max<index>(keys, 1)));
  const T log_drop = std::log(drop);
  const auto end_of = [&](index r) { return ends ? std::clamp<index>(ends[r], 0, keys) : keys; };

  with_flash_geometry<T>(m, [&]<class Gv>(Gv) {
    const index lda = flash::round_up(m, Gv::size);
    const arena::scope scratch;
    constexpr index most_runs = 8;
    const index runs = std::clamp<index>(keys / 1024, 1, most_runs);
    // Each run's state: running maximum and sum per lane, and the rows' accumulators.
    T* const run_max = arena::local().take<T>(static_cast<std::size_t>(runs * lanes));
    T* const run_sum = arena::local().take<T>(static_cast<std::size_t>(runs * lanes));
    T* const run_acc = arena::local().take<T>(static_cast<std::size_t>(runs * rows_cap * lda));
    T* const qt = arena::local().take<T>(static_cast<std::size_t>(lanes * e));  // the panel
    T* const scaled = arena::local().take<T>(static_cast<std::size_t>(lanes * e));
    index lane_end[lanes];
    static_assert(lanes <= 32, "a key's rows are the bits of a 32-bit word");

    for (index c0 = 0; c0 < n; c0 += lanes) {
      const index here = std::min(lanes, n - c0);
      index kmax = 0;
      for (index l = 0; l < lanes; ++l) {
        lane_end[l] = l < here ? end_of(c0 + l) : 0;
        kmax = std::max(kmax, lane_end[l]);
      }
      const std::uint32_t row_bits =
          here == 32 ? ~std::uint32_t{0} : (std::uint32_t{1} << here) - 1;
      for (index l = 0; l < here; ++l)
        Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>>(scaled + l * e, e) =
            q.row(ids[c0 + l]) * sc;
      flash::pack_panels<G>(qt, here, e, [&](index t) -> const T* { return scaled + t * e; });

      parallel_for(threads, runs, [&](index s) {
        const arena::scope run_scratch;  // the executing thread's
        T* const st = arena::local().take<T>(static_cast<std::size_t>(bk * lanes));
        T* const pr = arena::local().take<T>(static_cast<std::size_t>(rows_cap * bk));
        T* const tail = arena::local().take<T>(static_cast<std::size_t>(G::score_rows * e));
        std::uint32_t bits[bk];        // per key of a block: the rows that weigh it
        std::int32_t listed[bk + 16];  // the keys one row weighs
        T* const exps = arena::local().take<T>(static_cast<std::size_t>(bk * lanes + 16));
        std::uint16_t masks[2 * bk];
        std::fill(pr, pr + rows_cap * bk, T(0));  // rows past the lanes stay zero
        T* const mx = run_max + s * lanes;
        T* const sum = run_sum + s * lanes;
        T* const acc = run_acc + s * rows_cap * lda;
        std::fill(mx, mx + lanes, neg_inf);
        std::fill(sum, sum + lanes, T(0));
        std::fill(acc, acc + rows_cap * lda, T(0));
        T alpha[rows_cap];
        std::fill(alpha, alpha + rows_cap, T(1));
        const index k0 = s * keys / runs, k1 = std::min(kmax, (s + 1) * keys / runs);
        for (index j0 = k0; j0 < k1; j0 += bk) {
          const index cols = std::min(bk, k1 - j0);
          // Whether some row ends in this block.
          bool ragged = false;
          for (index l = 0; l < here; ++l) ragged = ragged || lane_end[l] < j0 + cols;
          // Scores, key t's lanes at st + t lanes: tiles of score_rows keys straight from k,
          // the last few keys from a copy padded with zero rows.
          for (index t0 = 0; t0 < cols; t0 += G::score_rows) {
            const T* rows = k.data() + (j0 + t0) * ldk;
            index ld = ldk;
            if (t0 + G::score_rows > cols) {
              std::fill(tail, tail + G::score_rows * e, T(0));
              for (index t = t0; t < cols; ++t)
                std::copy_n(k.data() + (j0 + t) * ldk, e, tail + (t - t0) * e);
              rows = tail;
              ld = e;
            }
            flash::score_tile<G, G::score_rows>(rows, ld, qt, e, st + t0 * lanes, lanes);
            // The tile's value rows into L2 for P V below, while the scores leave the loads
            // idle (when k and v come from memory: 32 rows at S = 4096 took 0.29 ms instead
            // of 0.34; no change when they are in cache).
            for (index t = t0; t < std::min(cols, t0 + G::score_rows); ++t)
              flash::prefetch(v.data() + (j0 + t) * ldv, static_cast<std::size_t>(m) * sizeof(T),
                              1);
          }
          // Keys past a lane's end: -inf.
          if (ragged)
            for (index t = 0; t < cols; ++t)
              for (index l = 0; l < here; ++l)
                if (j0 + t >= lane_end[l]) st[t * lanes + l] = neg_inf;
          // The online softmax across the lanes: a NaN score leaves its row's sum NaN.
          P block_max[2] = {ei::pset1<P>(neg_inf), ei::pset1<P>(neg_inf)};
          for (index t = 0; t < cols; ++t)
            for (int w = 0; w < 2; ++w)
              block_max[w] = ei::pmax(block_max[w], ei::pload<P>(st + t * lanes + w * size));
          const P zero = ei::pset1<P>(T(0)), delta = ei::pset1<P>(drop);
          P base[2], total[2];
          for (int w = 0; w < 2; ++w) {
            const P old = ei::pload<P>(mx + w * size);
            const P now = ei::pmax(old, block_max[w]);
            // Exponents from 0 while a lane has seen nothing (all -inf): its weights are 0.
            base[w] = ei::pselect(ei::pcmp_eq(now, ei::pset1<P>(neg_inf)), zero, now);
            ei::pstoreu(alpha + w * size, ei::pexp(ei::psub(old, base[w])));
            ei::pstore(mx + w * size, now);
            total[w] = zero;
          }
          const bool compressed =
              softmax_compressed<T, lanes>(st, cols, base, total, log_drop, exps, masks);
          if (!compressed)
            for (index t = 0; t < cols; ++t)
              for (int w = 0; w < 2; ++w) {
                T* const at = st + t * lanes + w * size;
                P x = ei::pexp(ei::psub(ei::pload<P>(at), base[w]));
                x = ei::pandnot(x, ei::pcmp_lt(x, delta));  // dropped; NaN is kept
                total[w] = ei::padd(total[w], x);
                ei::pstore(at, x);
              }
          for (int w = 0; w < 2; ++w)
            ei::pstore(sum + w * size, ei::padd(ei::pmul(ei::pload<P>(sum + w * size),
                                                         ei::ploadu<P>(alpha + w * size)),
                                                total[w]));
          // P V (see above): the rows that weigh each key as its bits (a key past a row's end
          // has weight 0 there), the sparse rows, or the weights back in rows (pr + l bk).
          const T* const values = v.data() + j0 * ldv;
          index weighed = 0;
          if (values_finite)
            for (index t = 0; t < cols; ++t) {
              // The compressed softmax's masks are the kept weights (each at least about
              // eps / (16 keys), or NaN): the same bits.
              bits[t] = (compressed ? masks[2 * t] | std::uint32_t{masks[2 * t + 1]} << size
                                    : weighed_lanes<T, lanes>(st + t * lanes)) &
                        row_bits;
              weighed += std::popcount(bits[t]);
            }
          if (values_finite && 4 * weighed <= here * cols) {
            for (index l = 0; l < here; ++l) {
              T* const row = acc + l * lda;
              if (alpha[l] != T(1))
                for (index c = 0; c < m; ++c) row[c] *= alpha[l];
              const index count = list_lane(bits, cols, static_cast<int>(l), listed);
              weighted_row_sum<T>(st + l, key_list{listed, count}, values, ldv, m, row, true,
                                  lanes);
            }
            continue;
          }
          for (index t = cols; t < flash::round_up(cols, size); ++t)
            std::fill(st + t * lanes, st + (t + 1) * lanes, T(0));
          transpose_packets<T>(st, lanes, cols, lanes, pr, bk);
          if (ragged) {
            for (index l = 0; l < here; ++l) {
              T* const row = acc + l * lda;
              if (alpha[l] != T(1))
                for (index c = 0; c < m; ++c) row[c] *= alpha[l];
              weighted_row_sum<T>(pr + l * bk,
                                  key_run{0, std::clamp<index>(lane_end[l] - j0, 0, cols)}, values,
                                  ldv, m, row, true);
            }
          } else {
            for (index g = 0; g < here; g += group)
              flash::value_group<Gv>(pr + g * bk, bk, alpha + g, values, ldv, 0, cols,
                                     acc + g * lda, lda, m);
          }
        }
      });

      // The runs' states merged in order (flash_block::merge's rule), then normalised.
      for (index l = 0; l < here; ++l) {
        T best = run_max[l], total = run_sum[l];
        T* const acc = run_acc + l * lda;
        for (index s = 1; s < runs; ++s) {
          const T theirs = run_max[s * lanes + l];
          const T* const add = run_acc + s * rows_cap * lda + l * lda;
          if (theirs == neg_inf) {  // saw no key there, or only NaN scores
            if (std::isnan(run_sum[s * lanes + l])) total = run_sum[s * lanes + l];
            continue;
          }
          const T now = std::max(best, theirs);
          const T a = std::exp(best - now), b = std::exp(theirs - now);
          total = total * a + run_sum[s * lanes + l] * b;
          for (index c = 0; c < m; ++c) acc[c] = acc[c] * a + add[c] * b;
          best = now;
        }
        auto o = out.row(c0 + l);
        if (total != T(0)) {  // 0 only when no key was seen; NaN propagates
          const T inv = T(1) / total;
          for (index c = 0; c < m; ++c) o(c) = acc[c] * inv;
        } else {
          o.setZero();
        }
      }
    }
  });
}

}  // namespace fastattn::detail

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
