// Fused exact attention in the FlashAttention-2 manner (Dao 2023), for CPUs: each group of query
// rows computes its scores against a block of keys in registers, folds them into its online
// softmax while they are in L1, and multiplies them into its value accumulators, without a
// general matrix product per tile (which packs both operands on every call and leaves the score
// tile to round-trip through L2).
//
// Written on Eigen's packet math, so the instruction set is the one the user's flags enable:
// AVX-512 (16 floats or 8 doubles per packet, 32 registers), AVX/AVX2 (8 or 4, 16 registers),
// SSE2 (4 or 2), NEON. A value dimension that is not a whole number of packets takes the half or
// quarter packet that divides it, else scalars (with_flash_geometry): the same code, narrower.
//
// Layout:
// - the keys are packed once per call, scaled by nothing, as K^T in panels of `panel` keys
//   (panel p holds keys [p * panel, (p + 1) * panel), E rows of `panel` contiguous values);
// - queries are taken a block at a time (the block shares each key block while it is in L2),
//   scaled, and padded with zero rows to a multiple of `group`;
// - for each key block and each group of `group` rows: a score tile of `score_rows` x `panel`
//   in registers per panel, E broadcasts and 2 loads per step; the online softmax on each row
//   (one exp per visible packet); then acc += P V in register tiles of R rows x W packets.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <optional>
#include <utility>

#include <Eigen/Core>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "../policy.hpp"
#include "parallel.hpp"
#include "scratch.hpp"

// Eigen's packet types are vector types with attributes (__m512 ...), which GCC warns about as
// template arguments (-Wignored-attributes); Eigen silences the same warning in its own headers.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif

namespace fastattn::detail {

/// Register-tile geometry of the fused kernel for scalar type T computed in packets of type
/// Packet (Eigen's packet for T under the enabled instruction set, a half or quarter of it, or T
/// itself for the scalar path).
template <class T, class Packet = typename Eigen::internal::packet_traits<T>::type>
struct flash_geometry {
  using scalar = T;
  using packet = Packet;
  static constexpr int size = Eigen::internal::unpacket_traits<packet>::size;  ///< lanes
  static constexpr int registers = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS;
  static constexpr index group = 8;                           ///< rows per pass over a key block
  static constexpr int score_rows = registers >= 32 ? 8 : 4;  ///< rows of a score register tile
  static constexpr index panel = 2 * size;                    ///< keys of a score register tile
  static constexpr int accumulators = registers >= 32 ? 24 : 12;  ///< P V accumulator budget

  /// Whether this geometry takes value dimension m: a whole number of packets.
  static constexpr bool takes(index m) noexcept { return m > 0 && m % size == 0; }
};

/// Calls f(G{}) with the widest geometry G for T that takes value dimension m: Eigen's packet,
/// then its half and quarter (when the packets have an exp), then scalars.
template <class T, class F>
decltype(auto) with_flash_geometry(index m, F&& f) {
  namespace ei = Eigen::internal;
  using full = typename ei::packet_traits<T>::type;
  using half = typename ei::unpacket_traits<full>::half;
  using quarter = typename ei::unpacket_traits<half>::half;
  if constexpr (ei::packet_traits<T>::Vectorizable && ei::packet_traits<T>::HasExp) {
    if (flash_geometry<T, full>::takes(m)) return f(flash_geometry<T, full>{});
    if (flash_geometry<T, half>::takes(m)) return f(flash_geometry<T, half>{});
    if (flash_geometry<T, quarter>::takes(m)) return f(flash_geometry<T, quarter>{});
  }
  return f(flash_geometry<T, T>{});
}

/// The keys of a weighted_row_sum: a run [first, first + count) of consecutive keys.
struct key_run {
  index first, count;
  index operator[](index t) const noexcept { return first + t; }
};

/// The keys of a weighted_row_sum: count keys listed at `keys` (ascending), those a row weighs
/// (flash::list_weighed).
struct key_list {
  const std::int32_t* keys;
  index count;
  index operator[](index t) const noexcept { return keys[t]; }
};

/// out[0, m) = sum_{t < keys.count} w[j ldw] v[j * ldv + (0, m)], j = keys[t], or out[0, m) +=
/// that with `add`: a weighted sum of a few rows (any alignment, any m), as the ragged keys of a
/// group (flash_block::absorb), a row's few weighed keys (drop_below), the exclusions of banded's
/// inner kernels and the lanes of exact_rows (weights at stride ldw) need: four packets of the
/// row at a time in registers, then one, then scalars. A general vector-matrix product spent
/// more time in its set-up than in these few rows.
template <class T, class Keys>
void weighted_row_sum(const T* w, Keys keys, const T* v, index ldv, index m, T* out,
                      bool add = false, index ldw = 1) {
  namespace ei = Eigen::internal;
  using P = typename ei::packet_traits<T>::type;
  constexpr index size = ei::packet_traits<T>::size;
  const index n = keys.count;
  index c = 0;
  for (; c + 4 * size <= m; c += 4 * size) {
    P acc[4];
    for (int a = 0; a < 4; ++a)
      acc[a] = add ? ei::ploadu<P>(out + c + a * size) : ei::pset1<P>(T(0));
    for (index t = 0; t < n; ++t) {
      const index j = keys[t];
      const P x = ei::pset1<P>(w[j * ldw]);
      for (int a = 0; a < 4; ++a)
        acc[a] = ei::pmadd(x, ei::ploadu<P>(v + j * ldv + c + a * size), acc[a]);
    }
    for (int a = 0; a < 4; ++a) ei::pstoreu(out + c + a * size, acc[a]);
  }
  for (; c + size <= m; c += size) {
    P acc = add ? ei::ploadu<P>(out + c) : ei::pset1<P>(T(0));
    for (index t = 0; t < n; ++t) {
      const index j = keys[t];
      acc = ei::pmadd(ei::pset1<P>(w[j * ldw]), ei::ploadu<P>(v + j * ldv + c), acc);
    }
    ei::pstoreu(out + c, acc);
  }
  for (; c < m; ++c) {
    T acc = add ? out[c] : T(0);
    for (index t = 0; t < n; ++t) acc += w[keys[t] * ldw] * v[keys[t] * ldv + c];
    out[c] = acc;
  }
}

/// weighted_row_sum over the rows [0, n).
template <class T>
void weighted_row_sum(const T* w, index n, const T* v, index ldv, index m, T* out,
                      bool add = false) {
  weighted_row_sum<T>(w, key_run{0, n}, v, ldv, m, out, add);
}

/// out[j] = rows[j * ld + (0, e)] . x[0, e) for j < n (any alignment): the scores of a few rows
/// against one vector (a centroid against a query's band), four packets of the row at a time.
template <class T>
void row_dots(const T* rows, index n, index ld, const T* x, index e, T* out) {
  namespace ei = Eigen::internal;
  using P = typename ei::packet_traits<T>::type;
  constexpr index size = ei::packet_traits<T>::size;
  for (index j = 0; j < n; ++j) {
    const T* const row = rows + j * ld;
    P acc[4];
    for (int a = 0; a < 4; ++a) acc[a] = ei::pset1<P>(T(0));
    index c = 0;
    for (; c + 4 * size <= e; c += 4 * size)
      for (int a = 0; a < 4; ++a)
        acc[a] =
            ei::pmadd(ei::ploadu<P>(row + c + a * size), ei::ploadu<P>(x + c + a * size), acc[a]);
    for (; c + size <= e; c += size)
      acc[0] = ei::pmadd(ei::ploadu<P>(row + c), ei::ploadu<P>(x + c), acc[0]);
    T dot = ei::predux(ei::padd(ei::padd(acc[0], acc[1]), ei::padd(acc[2], acc[3])));
    for (; c < e; ++c) dot += row[c] * x[c];
    out[j] = dot;
  }
}

namespace flash {

/// Calls f(std::integral_constant<int, 0>) ... f(std::integral_constant<int, N - 1>): loops whose
/// bodies index register arrays must be unrolled for the arrays to stay in registers.
template <int N, class F>
inline void unroll(F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) { (f(std::integral_constant<int, I>{}), ...); }
  (std::make_integer_sequence<int, N>{});
}

/// s[r][0, W size) = q[r] . the first W packets' keys of a panel, r < R: q rows of length e
/// with stride ldq, kt the panel (e rows of `panel` values, or a pointer a packet into one for
/// its second half), s rows with stride lds (64-byte aligned). W = 2: the whole panel; W = 1:
/// half of it, for a group whose keys end or start in the middle of a panel (a local band).
template <class G, int R, int W = 2, class T = typename G::scalar>
inline void score_tile(const T* q, index ldq, const T* kt, index e, T* s, index lds) {
  using P = typename G::packet;
  namespace ei = Eigen::internal;
  static_assert(W == 1 || W == 2);
  P c[W][R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) c[w][r] = ei::pset1<P>(T(0));
  for (index d = 0; d < e; ++d) {
    P k[W];
    for (int w = 0; w < W; ++w) k[w] = ei::pload<P>(kt + d * G::panel + w * G::size);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const P x = ei::pset1<P>(q[r * ldq + d]);
      for (int w = 0; w < W; ++w) c[w][r] = ei::pmadd(x, k[w], c[w][r]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) ei::pstore(s + r * lds + w * G::size, c[w][r]);
}

/// Makes x a value in a register from here on: the compiler may no longer fold its load into the
/// instructions that use it. GCC turned the R uses of one loaded packet of v (value_tile) into R
/// multiply-adds with a memory operand, R loads of the packet where one is needed, and the loads
/// then bound the tile (on AVX-512, 20 loads per 16 multiply-adds ran at 75% of the FMA rate;
/// 8 loads at about 100%). An empty asm statement with x as an in-out register operand; nothing
/// where that is not available.
template <class P>
inline void keep_in_register(P& x) noexcept {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+v"(x));
#else
  (void)x;
#endif
}

/// acc[r][0, W packets) = alpha[r] acc[r] + sum_{j in [j0, j1)} p[r][j] v[j], r < R: p rows with
/// stride ldp, v rows with stride ldv (any alignment), acc rows with stride lda (aligned).
template <class G, int R, int W, class T = typename G::scalar>
inline void value_tile(const T* p, index ldp, const T* alpha, const T* v, index ldv, index j0,
                       index j1, T* acc, index lda) {
  using P = typename G::packet;
  namespace ei = Eigen::internal;
  P c[R * W];
#pragma GCC unroll 32
  for (int i = 0; i < R * W; ++i)
    c[i] =
        ei::pmul(ei::pset1<P>(alpha[i / W]), ei::pload<P>(acc + (i / W) * lda + (i % W) * G::size));
  for (index j = j0; j < j1; ++j) {
    P x[W];
#pragma GCC unroll 16
    for (int w = 0; w < W; ++w) {
      x[w] = ei::ploadu<P>(v + j * ldv + w * G::size);
      keep_in_register(x[w]);
    }
#pragma GCC unroll 32
    for (int i = 0; i < R * W; ++i)
      c[i] = ei::pmadd(ei::pset1<P>(p[(i / W) * ldp + j]), x[i % W], c[i]);
  }
#pragma GCC unroll 32
  for (int i = 0; i < R * W; ++i) ei::pstore(acc + (i / W) * lda + (i % W) * G::size, c[i]);
}

/// value_tile over the first `rows` rows of a group (G::group rows; the tiles past `rows`, all
/// padding, are skipped) and all m values: chunks of W packets (as many as the accumulator
/// budget allows), each over the rows in tiles of R.
template <class G, class T = typename G::scalar>
inline void value_group(const T* p, index ldp, const T* alpha, const T* v, index ldv, index j0,
                        index j1, T* acc, index lda, index m, index rows = G::group) {
  constexpr int max_w = G::accumulators / 4;
  for (index w0 = 0; w0 < m; w0 += max_w * G::size) {
    const int w = static_cast<int>(std::min<index>(max_w, (m - w0) / G::size));
    auto run = [&]<int W>(std::integral_constant<int, W>) {
      constexpr int R = W * G::group <= G::accumulators ? G::group : 4;
      for (int r0 = 0; r0 < rows; r0 += R)
        value_tile<G, R, W>(p + r0 * ldp, ldp, alpha + r0, v + w0, ldv, j0, j1, acc + r0 * lda + w0,
                            lda);
    };
    bool done = false;
    unroll<max_w>([&](auto i) {
      constexpr int width = decltype(i)::value + 1;
      if (!done && w == width) {
        run(std::integral_constant<int, width>{});
        done = true;
      }
    });
  }
}

/// Whether rows [0, rows) of m values at stride ld are all finite. 0 * x is 0 for a finite x and
/// NaN otherwise, so a sum of them is 0 exactly when every value is finite (vectorised; Eigen's
/// isFinite is not).
template <class T>
bool all_finite(const T* values, index ld, index rows, index m) noexcept {
  namespace ei = Eigen::internal;
  using P = typename ei::packet_traits<T>::type;
  constexpr index size = ei::packet_traits<T>::size;
  const P zero = ei::pset1<P>(T(0));
  P sum = zero;
  T rest = T(0);
  for (index j = 0; j < rows; ++j) {
    const T* const row = values + j * ld;
    index c = 0;
    for (; c + size <= m; c += size) sum = ei::padd(sum, ei::pmul(ei::ploadu<P>(row + c), zero));
    for (; c < m; ++c) rest += row[c] * T(0);
  }
  return ei::predux(sum) + rest == T(0);
}

/// The keys j in [a, b) whose weight p[j] is not 0 (a positive weight, or NaN), listed into
/// `keys` (room for b - a + 16 entries); their count. Most keys are dropped, in no pattern
/// (flash_block::drop_below): with AVX-512, a compare into a mask and a compress of the keys'
/// indices per packet (the register form: the memory form is microcoded on AMD's Zen 4);
/// elsewhere branch-free scalars.
template <class T>
index list_weighed(const T* p, index a, index b, std::int32_t* keys) noexcept {
  index n = 0, j = a;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    constexpr int lanes = 64 / static_cast<int>(sizeof(T));
    __m512i at =
        _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(a)),
                         _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m512i step = _mm512_set1_epi32(lanes);
    for (; j + lanes <= b; j += lanes) {
      __mmask16 weighed;
      if constexpr (std::is_same_v<T, float>)
        weighed = _mm512_cmp_ps_mask(_mm512_loadu_ps(p + j), _mm512_setzero_ps(), _CMP_NEQ_UQ);
      else
        weighed = _mm512_cmp_pd_mask(_mm512_loadu_pd(p + j), _mm512_setzero_pd(), _CMP_NEQ_UQ);
      _mm512_storeu_si512(keys + n, _mm512_maskz_compress_epi32(weighed, at));
      n += std::popcount(static_cast<unsigned>(weighed));
      at = _mm512_add_epi32(at, step);
    }
  }
#endif
  for (; j < b; ++j) {
    keys[n] = static_cast<std::int32_t>(j);
    n += p[j] != T(0) ? 1 : 0;
  }
  return n;
}

/// Packs `count` keys as K^T panels into dst (ceil(count / panel) panels of e x panel values):
/// key t is row_of(t), a pointer to its e features, or null for a key of zeros; the lanes past
/// `count` are zeros.
template <class G, class RowOf, class T = typename G::scalar>
void pack_panels(T* dst, index count, index e, RowOf&& row_of) {
  namespace ei = Eigen::internal;
  using P = typename G::packet;
  constexpr int size = G::size;
  const index panels = (count + G::panel - 1) / G::panel;
  const T* rows[G::panel];
  for (index p = 0; p < panels; ++p) {
    T* const panel = dst + p * G::panel * e;
    bool whole = true;  // every lane holds a key
    for (int lane = 0; lane < G::panel; ++lane) {
      const index t = p * G::panel + lane;
      rows[lane] = t < count ? row_of(t) : nullptr;
      whole = whole && rows[lane] != nullptr;
    }
    index d0 = 0;
    // A whole panel, `size` features at a time: each half's size x size block is loaded by key
    // rows and transposed in registers into feature rows.
    if constexpr (size > 1 && requires(ei::PacketBlock<P, size> & b) { ei::ptranspose(b); }) {
      if (whole)
        for (; d0 + size <= e; d0 += size)
          for (int half = 0; half < 2; ++half) {
            ei::PacketBlock<P, size> block;
            for (int i = 0; i < size; ++i)
              block.packet[i] = ei::ploadu<P>(rows[half * size + i] + d0);
            ei::ptranspose(block);
            for (int i = 0; i < size; ++i)
              ei::pstoreu(panel + (d0 + i) * G::panel + half * size, block.packet[i]);
          }
    }
    for (int lane = 0; lane < G::panel; ++lane) {  // the rest, lane by lane
      if (rows[lane])
        for (index d = d0; d < e; ++d) panel[d * G::panel + lane] = rows[lane][d];
      else
        for (index d = d0; d < e; ++d) panel[d * G::panel + lane] = T(0);
    }
  }
}

/// n rounded up to a multiple of `to`.
constexpr index round_up(index n, index to) noexcept { return (n + to - 1) / to * to; }

/// Keys [first, last) of k packed as K^T panels (pack_panels) from the panel boundary at or
/// below `first` (keys before `first` in that panel are zeros), in chunks of 64 panels shared by
/// up to `threads` threads; from the calling thread's arena (the caller holds a scope). Panel p
/// holds keys [base + p panel, base + (p + 1) panel), base = first / panel * panel.
template <class G, class T = typename G::scalar>
T* pack_keys(const const_view<T>& k, index first, index last, int threads) {
  const index e = k.cols(), base = first / G::panel * G::panel;
  const index packed = last > first ? last - base : 0;
  T* const kt = arena::local().take<T>(
      static_cast<std::size_t>(std::max<index>(round_up(packed, G::panel), G::panel) * e));
  constexpr index chunk = 64 * G::panel;
  parallel_for(threads, (packed + chunk - 1) / chunk, [&](index c) {
    pack_panels<G>(kt + c * chunk * e, std::min(chunk, packed - c * chunk), e,
                   [&](index t) -> const T* {
                     const index j = base + c * chunk + t;
                     return j >= first ? k.data() + j * k.outerStride() : nullptr;
                   });
  });
  return kt;
}

/// Asks the caches for [p, p + bytes) ahead of a gather of scattered rows (a hint; nothing where
/// the compiler has no prefetch). `locality` as __builtin_prefetch's: 3 into every level (L1),
/// 1 into the outer ones (L2 on x86) for data used a while later.
inline void prefetch(const void* p, std::size_t bytes, int locality = 3) noexcept {
#if defined(__GNUC__)
  const char* const c = static_cast<const char*>(p);
  if (locality == 3)
    for (std::size_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
  else
    for (std::size_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 1);
#else
  (void)p;
  (void)bytes;
  (void)locality;
#endif
}

/// A mask that masks nothing (flash_block::absorb's default).
struct no_mask {
  template <class T>
  void operator()(index, T*) const noexcept {}
};

}  // namespace flash

/// The fused block engine: the online-softmax state of up to `max_rows` query rows, fed packed
/// key blocks of up to `max_keys` keys. Its scratch comes from the calling thread's arena (the
/// caller holds an `arena::scope`).
///
///   flash_block<T> b(max_rows, max_keys, e, m);
///   write scale * q_r into b.query(r) for r < n; b.reset(n);
///   b.absorb(panels, cols, values, ldv, range[, mask]) for each key block;
///   b.finish(out, lse);
template <class G>
class flash_block {
 public:
  using geometry = G;
  using T = typename G::scalar;

  flash_block(index max_rows, index max_keys, index e, index m)
      : e_(e),
        m_(m),
        lds_(round_up(std::max<index>(max_keys, 1), geometry::panel)),
        rows_cap_(round_up(std::max<index>(max_rows, 1), geometry::group)),
        q_(arena::local().take<T>(static_cast<std::size_t>(rows_cap_ * e))),
        acc_(arena::local().take<T>(static_cast<std::size_t>(rows_cap_ * m))),
        s_(arena::local().take<T>(static_cast<std::size_t>(geometry::group * lds_))),
        max_(arena::local().take<T>(static_cast<std::size_t>(rows_cap_))),
        sum_(arena::local().take<T>(static_cast<std::size_t>(rows_cap_))),
        active_(arena::local().take<std::int32_t>(static_cast<std::size_t>(lds_ + 16))) {}

  /// From here on, a weight below `delta` times the row's largest so far, exp(s - max) < delta,
  /// counts as zero (in the sum too). When `values_finite` (every value row absorb will see is
  /// finite) and a group's rows weigh at most a quarter of their keys, each row adds only the
  /// keys it weighs (weighted_row_sum over flash::list_weighed) instead of the register tiles
  /// over every key: the same sum without its zero terms. With non-finite values (check_finite
  /// off) the tiles run, so a NaN value still reaches every row that sees it, as 0 * NaN. With
  /// delta <= eps / (16 keys) the weights dropped from a row over all its keys sum to at most
  /// eps / 16 of its total: within the rounding of exact attention, and on peaked attention (a
  /// few keys in a row's reach) most of the P V product is skipped. 0 (the default): every
  /// weight counts.
  void drop_below(T delta, bool values_finite) noexcept {
    drop_ = delta;
    skip_zeros_ = delta > T(0) && values_finite;
  }

  /// Row r of the query block (e values), to be filled with the scaled query before reset.
  T* query(index r) noexcept { return q_ + r * e_; }

  /// Writes row r of the query block: `row` (e values) times `scale`.
  template <class Row>
  void set_query(index r, const Row& row, T scale) {
    Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>>(query(r), e_) = row * scale;
  }

  /// Starts a block of `rows` queries (their rows already written through `query`).
  void reset(index rows) {
    rows_ = rows;
    const index padded = round_up(rows, geometry::group);
    std::fill(q_ + rows * e_, q_ + padded * e_, T(0));
    std::fill(acc_, acc_ + padded * m_, T(0));
    std::fill(max_, max_ + padded, neg_inf);
    std::fill(sum_, sum_ + padded, T(0));
  }

  /// Folds `cols` keys (at most max_keys) into the state: `panels` their packed K^T
  /// (flash::pack_panels), `values` their values (key t's M values at values + t * ldv).
  /// range(r) gives the keys [first, last) of the block that row r sees (clamped to
  /// [0, cols)); mask(r, scores) may then set more of row r's scores (columns relative to the
  /// block) to -inf. Keys outside a row's range get exactly zero weight.
  template <class Range, class Mask = flash::no_mask>
  void absorb(const T* panels, index cols, const T* values, index ldv, Range&& range,
              Mask&& mask = {}) {
    using P = typename geometry::packet;
    namespace ei = Eigen::internal;
    constexpr index group = geometry::group, panel = geometry::panel, size = geometry::size;
    T alpha[group];
    index first[group], last[group];
    index nonzero[group];  // with drop_below: each row's weights kept in this block
    for (index g0 = 0; g0 < rows_; g0 += group) {
      const index rows_here = std::min(group, rows_ - g0);
      // Keys of the block that some row of the group sees: [ga, gb).
      index ga = cols, gb = 0;
      for (index r = 0; r < group; ++r) {
        first[r] = last[r] = 0;
        if (r >= rows_here) continue;
        const auto [a, b] = range(g0 + r);
        first[r] = std::clamp<index>(a, 0, cols);
        last[r] = std::clamp<index>(b, first[r], cols);
        if (first[r] < last[r]) ga = std::min(ga, first[r]), gb = std::max(gb, last[r]);
      }
      if (ga >= gb) continue;  // no row of the group sees a key of this block
      const index w0 = ga / panel * panel, w1 = round_up(gb, panel);

      const T* const qg = q_ + g0 * e_;
      // Score tiles over the panels covering [ga, gb); a half panel where the other half is
      // outside it (a band's group spans 40 keys of two panels at window 16: a quarter less).
      for (index c = w0; c < w1; c += panel) {
        const bool low = c + size > ga, high = c + size < gb;  // halves with keys in [ga, gb)
        const T* const kt = panels + c * e_;
        for (int r0 = 0; r0 < group; r0 += geometry::score_rows) {
          T* const tile = s_ + r0 * lds_ + c;
          if (low && high)
            flash::score_tile<G, geometry::score_rows>(qg + r0 * e_, e_, kt, e_, tile, lds_);
          else if (low)
            flash::score_tile<G, geometry::score_rows, 1>(qg + r0 * e_, e_, kt, e_, tile, lds_);
          else
            flash::score_tile<G, geometry::score_rows, 1>(qg + r0 * e_, e_, kt + size, e_,
                                                          tile + size, lds_);
        }
      }

      // Online softmax, row by row; P overwrites the scores on [w0, w1).
      for (index r = 0; r < group; ++r) {
        T* const row = s_ + r * lds_;
        const index i = g0 + r, a = first[r], b = last[r];
        alpha[r] = T(1);
        nonzero[r] = b - a;
        if (a == b) {  // sees nothing here (or a padding row): contributes nothing
          std::fill(row + w0, row + w1, T(0));
          continue;
        }
        mask(i, row);
        // The packets covering [a, b), their lanes outside [a, b) set to -inf in registers.
        // Only [a, b) of the row is read by P V below; storing -inf into the edge lanes and
        // loading the packets back stalled store forwarding (a tenth of the local kernel).
        const index qa = a / size * size, qb = round_up(b, size);
        const auto scores_at = [&](index c) {
          const P x = ei::pload<P>(row + c);
          if (c >= a && c + size <= b) return x;
          const P at = ei::padd(ei::plset<P>(T(0)), ei::pset1<P>(static_cast<T>(c)));
          const P outside = ei::por(ei::pcmp_lt(at, ei::pset1<P>(static_cast<T>(a))),
                                    ei::pcmp_le(ei::pset1<P>(static_cast<T>(b)), at));
          return ei::pselect(outside, ei::pset1<P>(neg_inf), x);
        };
        P mp = ei::pset1<P>(neg_inf);
        for (index c = qa; c < qb; c += size) mp = ei::pmax(mp, scores_at(c));
        const T m_new = std::max(max_[i], ei::predux_max(mp));
        if (m_new == neg_inf) {  // every score so far is -inf or NaN
          bool nan = false;
          for (index c = a; c < b; ++c) nan = nan || std::isnan(row[c]);
          if (nan) sum_[i] = std::numeric_limits<T>::quiet_NaN();  // propagate
          std::fill(row + qa, row + qb, T(0));
          continue;
        }
        const P mm = ei::pset1<P>(m_new);
        P total = ei::pset1<P>(T(0));
        if (drop_ > T(0)) {
          const P delta = ei::pset1<P>(drop_), zero = ei::pset1<P>(T(0)), one = ei::pset1<P>(T(1));
          P count = zero;
          for (index c = qa; c < qb; c += size) {
            P x = ei::pexp(ei::psub(scores_at(c), mm));
            const P dropped = ei::pcmp_lt(x, delta);  // NaN is kept
            x = ei::pselect(dropped, zero, x);
            count = ei::padd(count, ei::pandnot(one, dropped));
            ei::pstore(row + c, x);
            total = ei::padd(total, x);
          }
          nonzero[r] = static_cast<index>(ei::predux(count));
        } else {
          for (index c = qa; c < qb; c += size) {
            const P x = ei::pexp(ei::psub(scores_at(c), mm));
            ei::pstore(row + c, x);
            total = ei::padd(total, x);
          }
        }
        alpha[r] = std::exp(max_[i] - m_new);  // 0 when the row had nothing yet
        sum_[i] = sum_[i] * alpha[r] + ei::predux(total);
        max_[i] = m_new;
      }

      // P V. The keys every row of the group sees, [ca, cb), go through the register tiles; the
      // ragged ones (seen by some rows only: a causal diagonal, a band's edges, at most
      // group - 1 keys on each side there) are added row by row over the row's own range, so a
      // key a row does not see is never multiplied in, not even by a zero weight (0 * NaN, a
      // non-finite value with check_finite off, would reach rows that never see it).
      index ca = ga, cb = gb;
      bool shared = true;  // every row of the group sees a key of this block
      for (index r = 0; r < rows_here; ++r) {
        shared = shared && first[r] < last[r];
        ca = std::max(ca, first[r]);
        cb = std::min(cb, last[r]);
      }
      if (!shared || ca >= cb) ca = cb = ga;
      // With drop_below, when the rows weigh few keys (peaked attention: a few percent), each
      // row adds only its own weighed keys: a key's values are then read once per row that
      // weighs it instead of once per group, and the tiles' work on zero weights is skipped.
      index weighed = 0;
      for (index r = 0; r < rows_here; ++r) weighed += nonzero[r];
      if (skip_zeros_ && ca < cb && 4 * weighed <= rows_here * (cb - ca)) {
        for (index r = 0; r < rows_here; ++r) {
          T* const acc_row = acc_ + (g0 + r) * m_;
          if (alpha[r] != T(1))
            for (index c = 0; c < m_; ++c) acc_row[c] *= alpha[r];
          const T* const p_row = s_ + r * lds_;
          const index n = flash::list_weighed(p_row, ca, cb, active_);
          weighted_row_sum<T>(p_row, key_list{active_, n}, values, ldv, m_, acc_row, true);
        }
      } else {
        flash::value_group<G>(s_, lds_, alpha, values, ldv, ca, cb, acc_ + g0 * m_, m_, m_,
                              rows_here);
      }
      if (ga < ca || cb < gb)
        for (index r = 0; r < rows_here; ++r) {
          if (first[r] == last[r]) continue;
          T* const acc_row = acc_ + (g0 + r) * m_;
          const T* const p_row = s_ + r * lds_;
          const index below = std::min(last[r], ca) - first[r], from = std::max(first[r], cb);
          if (below > 0)
            weighted_row_sum<T>(p_row + first[r], below, values + first[r] * ldv, ldv, m_, acc_row,
                                true);
          if (from < last[r])
            weighted_row_sum<T>(p_row + from, last[r] - from, values + from * ldv, ldv, m_, acc_row,
                                true);
        }
    }
  }

  /// Folds in the state of `other`, a block of the same rows over other keys, as if its keys had
  /// been absorbed here after this block's: each row's maximum becomes the larger one and its sum
  /// and accumulator are rescaled to it. A row that saw no key there contributes nothing, and NaN
  /// propagates (as a NaN sum, as in absorb).
  void merge(const flash_block& other) {
    for (index r = 0; r < rows_; ++r) {
      const T theirs = other.max_[r];
      if (theirs == neg_inf) {  // saw no key there, or only NaN scores
        if (std::isnan(other.sum_[r])) sum_[r] = other.sum_[r];
        continue;
      }
      const T m = std::max(max_[r], theirs);
      const T a = std::exp(max_[r] - m), b = std::exp(theirs - m);  // a = 0 when this saw nothing
      sum_[r] = sum_[r] * a + other.sum_[r] * b;
      T* const acc = acc_ + r * m_;
      const T* const add = other.acc_ + r * m_;
      for (index c = 0; c < m_; ++c) acc[c] = acc[c] * a + add[c] * b;
      max_[r] = m;
    }
  }

  /// Writes the normalised rows into out.row(r), r < rows (rows that saw no key get zeros), and
  /// when `lse` is given log(sum_j exp(score_j)) into lse[r] (-inf for empty rows).
  template <class Out>
  void finish(Out&& out, T* lse = nullptr) const {
    for (index r = 0; r < rows_; ++r) {
      auto o = out.row(r);
      if (sum_[r] != T(0)) {  // 0 only when no key was visible; NaN propagates
        const T inv = T(1) / sum_[r];
        for (index c = 0; c < m_; ++c) o(c) = acc_[r * m_ + c] * inv;
        if (lse) lse[r] = max_[r] + std::log(sum_[r]);
      } else {
        o.setZero();
        if (lse) lse[r] = neg_inf;
      }
    }
  }

 private:
  static constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  static constexpr index round_up(index n, index to) noexcept { return flash::round_up(n, to); }

  index e_, m_, lds_, rows_cap_;
  T* q_;
  T* acc_;
  T* s_;
  T* max_;
  T* sum_;
  std::int32_t* active_;
  index rows_ = 0;
  T drop_ = 0;
  bool skip_zeros_ = false;
};

/// The fused kernel behind `exact_attention` (same contract: rows [0, rows) of `out`, keys
/// [0, keys), optional band `visible`, optional `lse`), for value dimensions that G takes.
/// - Several query blocks: shared by up to `threads` threads (each block is computed the same
///   way by any of them), the keys they see packed once up front and shared.
/// - One query block (clustered's centroids, the guard's sampled rows, a short query set): its
///   key blocks are cut into runs of consecutive blocks, `segments` of them by the key count
///   alone (at least 4 key blocks a run, at most 8 runs), each streamed into a softmax state of
///   its own on up to `threads` threads (every key block packed just before its use, into a
///   buffer that stays in L2), then merged in order (flash_block::merge). So one block keeps
///   both cores busy, and its result does not depend on `threads`.
/// Extra memory: the packed keys (about keys x E; key_block x E per thread for a single query
/// block) and O(query_block (E + M) + group key_block) per block state, from the arenas.
template <class G, class T = typename G::scalar>
void flash_attention(const_view<T> q, const_view<T> k, const_view<T> v, view<T> out, index rows,
                     index keys, double scale, std::optional<band> visible, index query_block,
                     index key_block, int threads, T* lse, bool drop_negligible = false,
                     bool finite_values = false) {
  const index e = q.cols(), m = v.cols();
  const arena::scope scratch;

  const index bq = std::clamp<index>(query_block, 1, rows);
  const index blocks = (rows + bq - 1) / bq;
  // Named variables, not a structured binding: lambdas below capture them (clang 14 rejects
  // capturing a binding).
  const std::pair<index, index> seen_all =
      visible ? visible->keys_of(0, rows, keys) : std::pair<index, index>{0, keys};
  const index kfirst = seen_all.first, klast = seen_all.second;
  const index kbase = kfirst / G::panel * G::panel;
  // Key blocks of key_block keys in whole panels, and never wider than the keys seen (the
  // same blocks: one either way), so that a huge key_block on a short problem allocates
  // nothing large (the per-block buffer is bk x E).
  const index bk = std::min(flash::round_up(std::max<index>(key_block, 1), G::panel),
                            flash::round_up(std::max<index>(klast - kbase, 1), G::panel));
  const T sc = static_cast<T>(scale);
  // Weights below eps / (16 keys) of a row's largest dropped (flash_block::drop_below).
  // Zero weights are skipped only over finite values (known, or checked once here for every
  // block).
  const T drop = drop_negligible ? std::numeric_limits<T>::epsilon() /
                                       (T(16) * static_cast<T>(std::max<index>(klast - kfirst, 1)))
                                 : T(0);
  const bool values_finite =
      drop_negligible && (finite_values || flash::all_finite(v.data() + kfirst * v.outerStride(),
                                                             v.outerStride(), klast - kfirst, m));
  // The keys [a, b) of the key block at j0 that row i0 + r sees, relative to j0.
  const auto range_of = [&](index i0, index j0, index cols) {
    return [&visible, keys, i0, j0, cols](index r) {
      if (!visible) return std::pair<index, index>{0, cols};
      const auto seen = visible->keys_of(i0 + r, 1, keys);
      return std::pair<index, index>{seen.first - j0, seen.second - j0};
    };
  };

  if (blocks == 1) {
    const index key_blocks = klast > kbase ? (klast - kbase + bk - 1) / bk : 0;
    constexpr index most_segments = 8;
    const index segments = std::clamp<index>(key_blocks / 4, 1, most_segments);
    std::optional<flash_block<G>> state[most_segments];  // from this thread's arena
    for (index s = 0; s < segments; ++s) {
      auto& block = state[s].emplace(bq, bk, e, m);
      block.drop_below(drop, values_finite);
      for (index r = 0; r < rows; ++r) block.set_query(r, q.row(r), sc);
      block.reset(rows);
    }
    parallel_for(threads, segments, [&](index s) {
      const arena::scope segment_scratch;  // the executing thread's
      T* const own = arena::local().take<T>(static_cast<std::size_t>(bk * e));
      for (index b = s * key_blocks / segments; b < (s + 1) * key_blocks / segments; ++b) {
        const index j0 = kbase + b * bk, cols = std::min(bk, klast - j0);
        flash::pack_panels<G>(own, cols, e, [&](index t) -> const T* {
          const index j = j0 + t;
          return j >= kfirst ? k.data() + j * k.outerStride() : nullptr;
        });
        state[s]->absorb(own, cols, v.data() + j0 * v.outerStride(), v.outerStride(),
                         range_of(0, j0, cols));
      }
    });
    for (index s = 1; s < segments; ++s) state[0]->merge(*state[s]);
    state[0]->finish(out.topRows(rows), lse);
    return;
  }

  // Several query blocks: the keys some row sees, packed once from the panel boundary at or
  // below the first, by all the threads.
  const T* const kt = flash::pack_keys<G>(k, kfirst, klast, threads);
  parallel_for(threads, blocks, [&](index b) {
    const arena::scope block_scratch;  // the executing thread's
    flash_block<G> block(bq, bk, e, m);
    block.drop_below(drop, values_finite);
    const index i0 = b * bq, n = std::min(bq, rows - i0);
    for (index r = 0; r < n; ++r) block.set_query(r, q.row(i0 + r), sc);
    block.reset(n);
    const auto seen = visible ? visible->keys_of(i0, n, keys) : std::pair<index, index>{0, keys};
    for (index j0 = seen.first / G::panel * G::panel; j0 < seen.second; j0 += bk) {
      const index cols = std::min(bk, seen.second - j0);
      block.absorb(kt + (j0 - kbase) * e, cols, v.data() + j0 * v.outerStride(), v.outerStride(),
                   range_of(i0, j0, cols));
    }
    block.finish(out.middleRows(i0, n), lse ? lse + i0 : nullptr);
  });
}

/// Whole score rows of a few queries against many keys, s(r, j) = q.row(r) . k_j (no scale, no
/// softmax), for a kernel that needs every score of a row (improved_clustered's top-k): the
/// product Q K^T by the fused kernel's score tiles on keys packed once, without a general matrix
/// product that packs both operands on every call. The keys are packed on construction (from
/// the calling thread's arena: the caller holds a scope for the object's lifetime).
template <class T>
class score_rows {
  using G = flash_geometry<T>;

 public:
  /// Packs keys [0, keys) of k, sharing the panels among up to `threads` threads.
  score_rows(const const_view<T>& k, index keys, int threads)
      : keys_(keys), e_(k.cols()), kt_(flash::pack_keys<G>(k, 0, keys, threads)) {}

  /// Row stride of a score matrix: keys rounded up to whole panels.
  index stride() const noexcept { return flash::round_up(keys_, G::panel); }
  /// Rows a score matrix for `rows` queries must have: rounded up to whole groups.
  static index padded_rows(index rows) noexcept { return flash::round_up(rows, G::group); }

  /// s.row(r)[0, keys) = scores of q.row(r), r < rows; s 64-byte aligned with padded_rows(rows)
  /// rows of stride() values (the columns past `keys` and the rows past `rows` receive the
  /// scores of zero padding). Shared by up to `threads` threads in fixed chunks of panels; each
  /// score is the same on any thread count.
  void operator()(const const_view<T>& q, index rows, T* s, int threads) const {
    const index padded = padded_rows(rows), lds = stride(), e = e_;
    const arena::scope scratch;
    T* const qp = arena::local().take<T>(static_cast<std::size_t>(padded * e));  // rows, then 0
    for (index r = 0; r < rows; ++r)
      Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>>(qp + r * e, e) = q.row(r);
    std::fill(qp + rows * e, qp + padded * e, T(0));
    const index panels = lds / G::panel;
    constexpr index chunk = 16;  // panels per task; each panel serves every row from L1
    parallel_for(threads, (panels + chunk - 1) / chunk, [&](index c) {
      for (index p = c * chunk; p < std::min(panels, (c + 1) * chunk); ++p)
        for (index r0 = 0; r0 < padded; r0 += G::score_rows)
          flash::score_tile<G, G::score_rows>(qp + r0 * e, e, kt_ + p * G::panel * e, e,
                                              s + r0 * lds + p * G::panel, lds);
    });
  }

 private:
  index keys_, e_;
  const T* kt_;
};

/// out.row(r) = sum_{j < keys} p(r, j) v.row(j) for r < rows: the product P V by the fused
/// kernel's value tiles (the widest geometry that takes v.cols()), keys in blocks of 512 shared
/// by every row while in L2. p: at least score_rows<T>::padded_rows(rows) rows of stride ldp
/// (the rows past `rows` are read, their results dropped). Each row's sum runs over the keys in
/// order, so the result does not depend on `threads`, which share the rows.
/// With `sparse` (p's zeros are dropped weights, flash_block::drop_below, and v's valid rows
/// are finite): a group of rows whose weights are at most a quarter nonzero adds, row by row,
/// only the keys it weighs (the same sum without its zero terms).
template <class T>
void weighted_values(const T* p, index ldp, index rows, const const_view<T>& v, index keys,
                     view<T> out, int threads, bool sparse = false) {
  with_flash_geometry<T>(v.cols(), [&]<class G>(G) {
    const index m = v.cols(), groups = flash::round_up(rows, G::group) / G::group;
    const index lda = flash::round_up(m, G::size);
    const arena::scope scratch;
    T* const acc = arena::local().take<T>(static_cast<std::size_t>(groups * G::group * lda));
    T* const ones = arena::local().take<T>(static_cast<std::size_t>(G::group));
    std::fill(ones, ones + G::group, T(1));
    constexpr index key_block = 512;
    const index per_task = (groups + threads - 1) / std::max(threads, 1);
    parallel_for(threads, (groups + per_task - 1) / per_task, [&](index c) {
      const arena::scope task_scratch;  // the executing thread's
      const index g0 = c * per_task, g1 = std::min(groups, g0 + per_task);
      std::fill(acc + g0 * G::group * lda, acc + g1 * G::group * lda, T(0));
      // The groups that go by whole key blocks, and (with `sparse`) the others, row by row.
      index* const dense = arena::local().take<index>(static_cast<std::size_t>(g1 - g0));
      index dense_groups = 0;
      std::int32_t* const listed = arena::local().take<std::int32_t>(
          sparse ? static_cast<std::size_t>(G::group * (keys + 16)) : 0);
      for (index g = g0; g < g1; ++g) {
        const index here = std::min(G::group, rows - g * G::group);
        index weighed = 0, count[G::group] = {};
        if (sparse)
          for (index r = 0; r < here && 4 * weighed <= here * keys; ++r) {
            count[r] = flash::list_weighed(p + (g * G::group + r) * ldp, 0, keys,
                                           listed + r * (keys + 16));
            weighed += count[r];
          }
        if (!sparse || 4 * weighed > here * keys) {
          dense[dense_groups++] = g;
          continue;
        }
        for (index r = 0; r < here; ++r)
          weighted_row_sum<T>(p + (g * G::group + r) * ldp,
                              key_list{listed + r * (keys + 16), count[r]}, v.data(),
                              v.outerStride(), m, acc + (g * G::group + r) * lda);
      }
      for (index j0 = 0; j0 < keys; j0 += key_block)
        for (index t = 0; t < dense_groups; ++t) {
          const index g = dense[t];
          flash::value_group<G>(p + g * G::group * ldp, ldp, ones, v.data(), v.outerStride(), j0,
                                std::min(keys, j0 + key_block), acc + g * G::group * lda, lda, m);
        }
      for (index r = g0 * G::group; r < std::min(rows, g1 * G::group); ++r)
        out.row(r) = Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>(acc + r * lda, m);
    });
  });
}

}  // namespace fastattn::detail

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
