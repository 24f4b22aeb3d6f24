// Partial selection of the k largest scores of a row (improved clustered attention's top-k keys).
#pragma once

#include <algorithm>
#include <functional>
#include <limits>
#include <vector>

#include "../policy.hpp"

namespace fastattn::detail {

/// Selects the indices of the k largest of n values, in ascending index order, with ties broken
/// toward the lower index and NaN ranked below everything (so the result is a well-defined set).
///
/// Two-level selection: the values are cut into chunks (32 values, with vector instructions; fewer
/// in a short row, so that there are at least 2 k chunks) and each chunk's maximum is taken. The
/// k-th largest chunk maximum is a lower bound of the k-th largest value (k distinct values reach
/// it), so only the chunks whose maximum reaches that bound can hold a selected value;
/// std::nth_element over their candidates gives the exact k-th largest value, and a last pass over
/// the same chunks collects the indices. Cost O(n) vectorised comparisons plus O(chunks +
/// candidates) selection, typically a few times k. Scratch is kept across calls (O(n)).
template <class T>
class top_k {
 public:
  static constexpr index chunk = 32;  ///< the widest chunk (vectorised maxima)

  /// Writes the min(k, n) selected indices into out[0..min(k, n)). Preconditions: n, k >= 0.
  void operator()(const T* values, index n, index k, index* out) {
    if (k >= n) {
      for (index i = 0; i < n; ++i) out[i] = i;
      return;
    }
    if (k <= 0) return;
    // Chunks narrow enough that there are at least 2 k of them (the bound below needs more
    // than k), at most `chunk` wide: a short row (n = 1024, k = 32) takes chunks of 16, not one
    // candidate list of every value.
    index width = chunk;
    while (width > 1 && n < 2 * k * width) width /= 2;
    const index chunks = (n + width - 1) / width;
    maxima_.resize(static_cast<std::size_t>(chunks));
    candidates_.resize(static_cast<std::size_t>(n));
    for (index c = 0; c < chunks; ++c)
      maxima_[static_cast<std::size_t>(c)] = chunk_max(values, n, c, width);

    // Lower bound of the k-th largest value: the k-th largest chunk maximum.
    T bound = lowest;
    if (chunks > k) {
      scratch_.assign(maxima_.begin(), maxima_.end());
      std::nth_element(scratch_.begin(), scratch_.begin() + (k - 1), scratch_.end(),
                       std::greater<T>());
      bound = scratch_[static_cast<std::size_t>(k - 1)];
    }

    // Candidates: every value reaching the bound (all values when the bound is -inf).
    index count = 0;
    for (index c = 0; c < chunks; ++c) {
      if (maxima_[static_cast<std::size_t>(c)] < bound) continue;
      const index last = std::min(n, (c + 1) * width);
      for (index i = c * width; i < last; ++i) {
        const T x = key(values[i]);
        if (x >= bound) candidates_[static_cast<std::size_t>(count++)] = x;
      }
    }
    // count >= k: k chunks reach the bound, each with at least one value reaching it.
    T* cand = candidates_.data();
    std::nth_element(cand, cand + (k - 1), cand + count, std::greater<T>());
    const T kth = cand[k - 1];
    index above = 0;  // every value above kth is a candidate
    for (index i = 0; i < count; ++i) above += cand[i] > kth ? 1 : 0;
    index ties = k - above;  // values equal to kth to take, lowest indices first

    index taken = 0;
    for (index c = 0; c < chunks && taken < k; ++c) {
      if (maxima_[static_cast<std::size_t>(c)] < kth) continue;
      const index last = std::min(n, (c + 1) * width);
      for (index i = c * width; i < last && taken < k; ++i) {
        const T x = key(values[i]);
        if (x > kth) {
          out[taken++] = i;
        } else if (x == kth && ties > 0) {
          --ties;
          out[taken++] = i;
        }
      }
    }
  }

 private:
  static constexpr T lowest = -std::numeric_limits<T>::infinity();
  static T key(T x) noexcept { return x != x ? lowest : x; }

  // Maximum of chunk c of `width` values, NaN ignored (-inf for a chunk of NaN only): for a
  // whole chunk of the widest kind, a running maximum of its packets that never takes a NaN
  // lane, then one horizontal reduction.
  static T chunk_max(const T* values, index n, index c, index width) noexcept {
    namespace ei = Eigen::internal;
    using P = typename ei::packet_traits<T>::type;
    constexpr int size = ei::packet_traits<T>::size;
    const T* x = values + c * width;
    if constexpr (ei::packet_traits<T>::Vectorizable && chunk % size == 0) {
      if (width == chunk && (c + 1) * chunk <= n) {
        P m = ei::pset1<P>(lowest);
        for (int i = 0; i < chunk; i += size)
          m = ei::pmax<Eigen::PropagateNumbers>(m, ei::ploadu<P>(x + i));
        return ei::predux_max(m);  // m holds no NaN
      }
    }
    T m = lowest;
    for (index i = 0; i < std::min(width, n - c * width); ++i) m = std::max(m, key(x[i]));
    return m;
  }

  std::vector<T> maxima_, scratch_, candidates_;
};

}  // namespace fastattn::detail
