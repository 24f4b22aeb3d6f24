// Balanced clusters by sorting (SMYRF, Daras et al. 2020, section 3): rows are sorted by their
// real-valued hash (ties by position) and the sorted order is cut into consecutive groups whose
// sizes differ by at most one.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <limits>
#include <type_traits>
#include <cstdint>
#include <utility>

#include "../policy.hpp"
#include "e2lsh.hpp"

namespace fastattn::detail {

/// `items` consecutive items cut into `groups` near-equal groups: group g is
/// [g * items / groups, (g + 1) * items / groups), so sizes are floor or ceil of items / groups.
/// Requires groups >= 1; a group is empty only when items < groups.
struct near_equal_split {
  index items = 0;
  index groups = 1;

  index begin(index g) const noexcept { return g * items / groups; }
  index size(index g) const noexcept { return begin(g + 1) - begin(g); }
  index max_size() const noexcept { return items / groups + (items % groups != 0); }
};

/// How one SMYRF round pairs query clusters with key groups, given Lv >= 1 valid queries, Sv >= 1
/// valid keys and the cluster size.
///
/// - n = ceil(Lv / cluster_size) query clusters, near-equal (so each holds <= cluster_size);
/// - min(n, Sv) near-equal key groups (n when Sv >= n, the reference's rule; when Sv < n there are
///   not enough keys for n non-empty groups, so there are Sv groups of one key);
/// - query cluster c attends to key group floor(c * groups / n): the identity when the counts are
///   equal, and otherwise the key group covering the same quantile of the sorted order. Every key
///   group is used by at least one query cluster, so every valid key takes part in every round.
struct cluster_plan {
  near_equal_split queries;
  near_equal_split keys;

  static cluster_plan make(index Lv, index Sv, index cluster_size) noexcept {
    const index n = Lv / cluster_size + (Lv % cluster_size != 0);
    return {{Lv, n}, {Sv, std::min(n, Sv)}};
  }

  index clusters() const noexcept { return queries.groups; }
  index key_group_of(index c) const noexcept { return c * keys.groups / queries.groups; }
};

/// An unsigned integer whose order is the numeric order of x: -0 and +0 are equal, NaN sorts
/// after +inf (a total order even for NaN hashes, so the radix sort below is well defined).
template <class T>
std::uint64_t order_key(T x) noexcept {
  if (x != x) return std::numeric_limits<std::uint64_t>::max();
  if (x == T(0)) x = T(0);
  if constexpr (std::is_same_v<T, float>) {
    const auto b = std::bit_cast<std::uint32_t>(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  } else {
    static_assert(std::is_same_v<T, double>);
    const auto b = std::bit_cast<std::uint64_t>(x);
    const std::uint64_t sign = std::uint64_t{1} << 63;
    // The largest NaN pattern is excluded above, so no finite or infinite value maps to max().
    return (b & sign) ? ~b : (b | sign);
  }
}

/// One row's sort key: (order_key(hash), position).
struct hash_entry {
  std::uint64_t key;
  index position;
};

/// Writes into `order[0..n)` the positions 0..n-1 sorted by (hashes(i), i), n = hashes.size().
/// A stable least-significant-digit radix sort on the order key (8-bit digits; a pass whose digit
/// is the same for every entry is skipped) over entries that start in position order, so ties
/// stay in position order: O(n) per pass, no comparisons. `entries` and `scratch` hold n entries
/// each (caller-provided, so nothing is allocated here).
template <class Hashes>
void sort_by_hash(const Hashes& hashes, hash_entry* entries, hash_entry* scratch, index* order) {
  using scalar = std::decay_t<decltype(hashes(0))>;
  const index n = hashes.size();
  for (index i = 0; i < n; ++i) entries[i] = {order_key(hashes(i)), i};
  constexpr int key_bits = std::is_same_v<scalar, float> ? 32 : 64;
  std::array<index, 256> count{};
  for (int shift = 0; n > 1 && shift < key_bits; shift += 8) {
    count.fill(0);
    for (index i = 0; i < n; ++i) ++count[(entries[i].key >> shift) & 0xFF];
    if (count[(entries[0].key >> shift) & 0xFF] == n) continue;  // one digit value: in order
    index sum = 0;
    for (auto& c : count) {
      const index here = c;
      c = sum;
      sum += here;
    }
    for (index i = 0; i < n; ++i) scratch[count[(entries[i].key >> shift) & 0xFF]++] = entries[i];
    std::swap(entries, scratch);
  }
  for (index i = 0; i < n; ++i) order[i] = entries[i].position;
}

}  // namespace fastattn::detail
