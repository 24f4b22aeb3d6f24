// Exact attention on a narrow band of diagonals (query i sees keys i + lower .. i + upper, at most
// band_attention_widest of them): the band of `local` and of banded<P>, computed diagonal by
// diagonal so that no score outside the band is computed.
//
// The blocked kernel (flash_block.hpp) computes a block of b rows against the b + width - 1 keys
// they see together: at window 16 (33 keys a row) and b = 16 that is 48 scores a row for 33.
// Here the lanes of a packet are W consecutive queries, and diagonal d of the band is one packet
// of scores, s_d[r] = q_{i0 + r} . k_{i0 + r + lower + d}: the queries transposed (E x W, packed
// per group), the keys transposed once per call (E x columns, column c holding key c + lower),
// so diagonal d reads the keys' row e from column i0 + d on. The diagonals go in runs of at most
// W + 1, each run from two packets of a key row: with AVX-512 shifted in registers by valignd /
// valignq, elsewhere by unaligned loads. The softmax runs across the diagonals (one packet per
// diagonal, every lane a row). P V takes R rows at a time over the value rows they share
// (band_rows_product); the rows at the sequence's ends go one by one (weighted_row_sum, the
// weights at the lanes' stride). Each row is scaled by 1 / its total once summed.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <type_traits>
#include <utility>

#include "../policy.hpp"
#include "flash_block.hpp"
#include "parallel.hpp"
#include "scratch.hpp"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// Eigen's packets (and __m512) as template arguments lose their alignment attributes, which
// GCC reports (the values are only passed and returned, never stored by that type).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif

namespace fastattn::detail {

/// The widest band (upper - lower + 1 keys a row) band_attention takes; wider bands go through
/// the blocked kernel, where a block's extra keys are a small share.
inline constexpr index band_attention_widest = 64;

/// Whether exact attention on `visible` goes through band_attention (a band of 1 to
/// band_attention_widest keys a row) rather than the blocked kernel (exact_attention's choice,
/// and the benchmarks' model of local's work).
constexpr bool goes_by_diagonals(const band& visible) noexcept {
  return visible.upper >= visible.lower && visible.upper - visible.lower < band_attention_widest;
}

namespace band_detail {

namespace ei = Eigen::internal;

// The packet of columns [s, s + W) (s <= W) of the 2W columns held by packets a (first W) and b
// (next W), which also lie in memory at `at`.
template <int s, class P, class T>
inline P shifted(const P& a, [[maybe_unused]] const P& b, [[maybe_unused]] const T* at) noexcept {
  if constexpr (s == 0) {
    return a;
  } else if constexpr (s == ei::unpacket_traits<P>::size) {
    return b;
  } else {
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<P, __m512>)
      return _mm512_castsi512_ps(
          _mm512_alignr_epi32(_mm512_castps_si512(b), _mm512_castps_si512(a), s));
    else if constexpr (std::is_same_v<P, __m512d>)
      return _mm512_castsi512_pd(
          _mm512_alignr_epi64(_mm512_castpd_si512(b), _mm512_castpd_si512(a), s));
    else
#endif
      return ei::ploadu<P>(at + s);
  }
}

// Scores of n = N <= W + 1 diagonals of a group: out[d W + r] = sum_e qp[e W + r]
// kt[e ldk + d + r] for d < N, r < W (qp aligned): two packets of keys per e give them all.
template <int N, class P, class T>
void score_diagonals(const T* qp, const T* kt, index ldk, index e_count, T* out) {
  constexpr int W = ei::unpacket_traits<P>::size;
  P acc[N];
  for (int d = 0; d < N; ++d) acc[d] = ei::pset1<P>(T(0));
  for (index e = 0; e < e_count; ++e) {
    const P x = ei::pload<P>(qp + e * W);
    const T* const kr = kt + e * ldk;
    const P a = ei::ploadu<P>(kr);
    const P b = N > 1 ? ei::ploadu<P>(kr + W) : a;
    [&]<int... s>(std::integer_sequence<int, s...>) {
      ((acc[s] = ei::pmadd(x, shifted<s>(a, b, kr), acc[s])), ...);
    }
    (std::make_integer_sequence<int, N>{});
  }
  for (int d = 0; d < N; ++d) ei::pstore(out + d * W, acc[d]);
}

// score_diagonals for a run-time n in [1, W + 1].
template <class P, class T, int N = ei::unpacket_traits<P>::size + 1>
void score_diagonals_n(int n, const T* qp, const T* kt, index ldk, index e_count, T* out) {
  if constexpr (N >= 1) {
    if (n == N) return score_diagonals<N, P>(qp, kt, ldk, e_count, out);
    score_diagonals_n<P, T, N - 1>(n, qp, kt, ldk, e_count, out);
  }
}

// dst[c * ldd + r] = scale * src(r0 + r, c) for r < rows, c < cols (zero rows up to W): W rows
// of a row-major matrix transposed into W-wide columns, whole packets by Eigen's ptranspose.
template <class P, class T>
void transpose_rows(const_view<T> src, index r0, index rows, index cols, T scale, T* dst,
                    index ldd) {
  constexpr int W = ei::unpacket_traits<P>::size;
  index c = 0;
  if constexpr (W > 1) {
    if (rows == W) {
      const P f = ei::pset1<P>(scale);
      for (; c + W <= cols; c += W) {
        ei::PacketBlock<P, W> block;
        for (int r = 0; r < W; ++r)
          block.packet[r] = ei::pmul(f, ei::ploadu<P>(src.row(r0 + r).data() + c));
        ei::ptranspose(block);
        for (int r = 0; r < W; ++r) ei::pstore(dst + (c + r) * ldd, block.packet[r]);
      }
    }
  }
  for (; c < cols; ++c)
    for (index r = 0; r < W; ++r) dst[c * ldd + r] = r < rows ? scale * src(r0 + r, c) : T(0);
}

// o[t][0, m) = factor[t] sum_{d < width} s[d W + t] v[(t + d) ldv + (0, m)] for t < R: R
// consecutive rows of a group, each over its whole band (row t's keys start t rows after row 0's).
// Each value row is loaded once for the R rows that see it (a row alone read each 4 times, and its
// 4 accumulators waited on the FMA latency); a key is multiplied only into the rows that see it.
template <int R, class P, class T>
void band_rows_product(const T* s, index width, const T* v, index ldv, index m, const T* factor,
                       T* const* o) {
  constexpr int W = ei::unpacket_traits<P>::size;
  index c = 0;
  for (; c + 4 * W <= m; c += 4 * W) {
    P acc[R][4];
    for (int t = 0; t < R; ++t)
      for (int a = 0; a < 4; ++a) acc[t][a] = ei::pset1<P>(T(0));
    for (index u = 0; u < width + R - 1; ++u) {
      const T* const row = v + u * ldv + c;
      P x[4];
      for (int a = 0; a < 4; ++a) x[a] = ei::ploadu<P>(row + a * W);
      [&]<int... t>(std::integer_sequence<int, t...>) {
        (
            [&] {
              const index d = u - t;
              if (d >= 0 && d < width) {
                const P w = ei::pset1<P>(s[d * W + t]);
                for (int a = 0; a < 4; ++a) acc[t][a] = ei::pmadd(w, x[a], acc[t][a]);
              }
            }(),
            ...);
      }
      (std::make_integer_sequence<int, R>{});
    }
    for (int t = 0; t < R; ++t) {
      const P f = ei::pset1<P>(factor[t]);
      for (int a = 0; a < 4; ++a) ei::pstoreu(o[t] + c + a * W, ei::pmul(f, acc[t][a]));
    }
  }
  if (c < m)
    for (int t = 0; t < R; ++t) {
      weighted_row_sum<T>(s + t, key_run{0, width}, v + t * ldv + c, ldv, m - c, o[t] + c, false,
                          W);
      for (index u = c; u < m; ++u) o[t][u] *= factor[t];
    }
}

}  // namespace band_detail

/// out.row(i) = softmax(scale q_i K^T) V over the keys j with i + lower <= j <= i + upper and
/// 0 <= j < keys, for i in [0, rows); a row that sees no key gets zeros (lse -inf). Preconditions:
/// 1 <= upper - lower + 1 <= band_attention_widest. When `lse` is given it receives each row's
/// log-sum-exp. A key outside a row's band is never read for it (its value row is not multiplied
/// in, not even by 0), so a NaN value reaches exactly the rows that see it. Rows are computed
/// independently, by the same operations on any thread count. Extra memory: the keys transposed
/// (E x (rows + 2 width), rounded to packets) and per thread a group's queries and scores.
template <class T>
void band_attention(const_view<T> q, const_view<T> k, const_view<T> v, view<T> out, index rows,
                    index keys, double scale, band visible, int threads, T* lse = nullptr) {
  namespace ei = Eigen::internal;
  using P = std::conditional_t<ei::packet_traits<T>::Vectorizable && ei::packet_traits<T>::HasExp,
                               typename ei::packet_traits<T>::type, T>;
  constexpr index W = ei::unpacket_traits<P>::size;
  constexpr T minus_inf = -std::numeric_limits<T>::infinity();
  if (rows <= 0) return;
  const index lower = visible.lower, width = visible.upper - visible.lower + 1;
  const index E = q.cols(), M = v.cols();
  const index groups = (rows + W - 1) / W;
  const index chunks = (width + W - 1) / W;  // packets of diagonals
  const index runs = (width + W) / (W + 1);  // runs of at most W + 1 diagonals

  const arena::scope scratch;
  // The keys transposed: column c is key c + lower (zero outside [0, keys)). Group g reads
  // columns [g W, g W + chunks W + W).
  const index columns = groups * W + chunks * W + W;
  const index ldk = columns;
  T* const kt = arena::local().take<T>(static_cast<std::size_t>(E * ldk));
  // In units of W columns (c0 and columns are multiples of W): whole packets where every key
  // of the unit exists.
  parallel_for(threads, (columns + 255) / 256, [&](index b) {
    const index c1 = std::min(columns, (b + 1) * 256);
    for (index c = b * 256; c < c1; c += W) {
      const index j = c + lower;
      if (j >= 0 && j + W <= keys) {
        band_detail::transpose_rows<P>(k, j, W, E, T(1), kt + c, ldk);
        continue;
      }
      for (index e = 0; e < E; ++e)
        for (index t = 0; t < W; ++t)
          kt[e * ldk + c + t] = (j + t >= 0 && j + t < keys) ? k(j + t, e) : T(0);
    }
  });

  const T factor = static_cast<T>(scale);
  constexpr index groups_per_task = 16;
  parallel_for(threads, (groups + groups_per_task - 1) / groups_per_task, [&](index task) {
    const arena::scope task_scratch;  // the executing thread's
    T* const qp = arena::local().take<T>(static_cast<std::size_t>(E * W));
    T* const s = arena::local().take<T>(static_cast<std::size_t>(chunks * W * W));
    T* const peak = arena::local().take<T>(static_cast<std::size_t>(W));
    T* const total = arena::local().take<T>(static_cast<std::size_t>(W));
    T* const inverse = arena::local().take<T>(static_cast<std::size_t>(W));
    T* const row_lse = arena::local().take<T>(static_cast<std::size_t>(W));
    const index g1 = std::min(groups, (task + 1) * groups_per_task);
    for (index g = task * groups_per_task; g < g1; ++g) {
      const index i0 = g * W, n = std::min(W, rows - i0);
      band_detail::transpose_rows<P>(q, i0, n, E, factor, qp, W);
      // The diagonals in runs of at most W + 1 and near-equal length (33 = 17 + 16 with 16
      // lanes; a short run would be a few long chains of E dependent multiply-adds).
      for (index c = 0, d0 = 0; c < runs; ++c) {
        const index d1 = width * (c + 1) / runs;
        band_detail::score_diagonals_n<P>(static_cast<int>(d1 - d0), qp, kt + i0 + d0, ldk, E,
                                          s + d0 * W);
        d0 = d1;
      }
      // Keys outside [0, keys) (first and last groups only): -inf, and weight exactly 0 below
      // (Eigen's exp clamps its argument, so exp(-inf) is about 1e-38 in float, not 0).
      const index first_key = i0 + lower, last_key = i0 + W - 1 + lower + width - 1;
      const bool edge = first_key < 0 || last_key >= keys;
      const auto outside = [&](index d, index r) {
        const index j = i0 + r + lower + d;
        return j < 0 || j >= keys;
      };
      if (edge)
        for (index d = 0; d < width; ++d)
          for (index r = 0; r < W; ++r)
            if (outside(d, r)) s[d * W + r] = minus_inf;
      // The softmax across the diagonals, every lane a row.
      P m = ei::pload<P>(s);
      for (index d = 1; d < width; ++d) m = ei::pmax(m, ei::pload<P>(s + d * W));
      ei::pstore(peak, m);
      for (index r = 0; r < W; ++r)
        if (!(peak[r] > minus_inf) && !std::isnan(peak[r])) peak[r] = T(0);  // sees no key
      m = ei::pload<P>(peak);
      for (index d = 0; d < width; ++d)
        ei::pstore(s + d * W, ei::pexp(ei::psub(ei::pload<P>(s + d * W), m)));
      if (edge)
        for (index d = 0; d < width; ++d)
          for (index r = 0; r < W; ++r)
            if (outside(d, r)) s[d * W + r] = T(0);
      P l = ei::pload<P>(s);
      for (index d = 1; d < width; ++d) l = ei::padd(l, ei::pload<P>(s + d * W));
      ei::pstore(total, l);
      // 1 / total scales each row's P V once it is summed; log-sum-exp peak + log(total) (-inf
      // when the row sees no key).
      ei::pstore(inverse, ei::pdiv(ei::pset1<P>(T(1)), l));
      if (lse) ei::pstore(row_lse, ei::padd(m, ei::plog(l)));
      // Rows whose whole band is inside the keys go R at a time; the rest (the sequence's ends,
      // rows that see nothing) one by one.
      constexpr int R = flash_geometry<T, P>::registers >= 32 ? 4 : (W >= 2 ? 2 : 1);
      for (index r = 0; r < n;) {
        const index i = i0 + r, base = i + lower;  // key of diagonal 0
        if constexpr (R > 1) {
          bool whole = r + R <= n && base >= 0 && base + R - 1 + width <= keys;
          for (index t = 0; whole && t < R; ++t)
            whole = total[r + t] > T(0) || std::isnan(total[r + t]);
          if (whole) {
            T* rows_out[R];
            for (int t = 0; t < R; ++t) rows_out[t] = out.row(i + t).data();
            band_detail::band_rows_product<R, P>(s + r, width, v.data() + base * v.outerStride(),
                                                 v.outerStride(), M, inverse + r, rows_out);
            if (lse) std::copy(row_lse + r, row_lse + r + R, lse + i);
            r += R;
            continue;
          }
        }
        const index d0 = std::clamp<index>(-base, 0, width);
        const index d1 = std::clamp<index>(keys - base, d0, width);
        T* const o = out.row(i).data();
        if (!(total[r] > T(0)) && !std::isnan(total[r])) {  // no key: zeros
          std::fill(o, o + M, T(0));
          if (lse) lse[i] = minus_inf;
        } else {
          weighted_row_sum<T>(s + d0 * W + r, key_run{0, d1 - d0},
                              v.data() + (base + d0) * v.outerStride(), v.outerStride(), M, o,
                              false, W);
          for (index c = 0; c < M; ++c) o[c] *= inverse[r];
          if (lse) lse[i] = row_lse[r];
        }
        ++r;
      }
    }
  });
}

}  // namespace fastattn::detail

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
