// Random-hyperplane hashing of the queries (clustered attention, step 1): B hyperplanes with
// thresholds, one bit per hyperplane, the B bits packed into one 64-bit word per query.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../policy.hpp"
#include "flash_block.hpp"
#include "parallel.hpp"
#include "rng.hpp"
#include "scratch.hpp"

namespace fastattn::detail {

/// B random hyperplanes in E dimensions, each with a threshold: bit b of a vector x is
/// `x . a_b > t_b`, with every entry of a_b and t_b drawn N(0, 1) (the B x (E + 1) matrix of the
/// reference implementation, whose last column is the threshold). With `bias = false` the
/// thresholds are zero (sign hashing); the hyperplanes are the same as with `bias = true` for the
/// same generator state, because the thresholds are drawn either way.
///
/// Draw order (part of the reproducibility contract): for b = 0..B-1, the E entries of a_b then
/// t_b, each one `gen.normal()`, rounded to T.
template <class T>
class hyperplane_hash {
 public:
  /// Rows hashed per task (the unit that threads share).
  static constexpr index block = 256;

  hyperplane_hash() = default;

  /// Draws the hyperplanes. Preconditions: dim >= 1, 1 <= bits <= 64.
  hyperplane_hash(index dim, int bits, bool bias, rng& gen) { draw(dim, bits, bias, gen); }

  /// Draws new hyperplanes, reusing the storage of the previous draw (no allocation when the
  /// sizes are the same).
  void draw(index dim, int bits, bool bias, rng& gen) {
    planes_.resize(bits, dim);
    thresholds_.resize(bits);
    bits_ = bits;
    for (int b = 0; b < bits; ++b) {
      for (index e = 0; e < dim; ++e) planes_(b, e) = static_cast<T>(gen.normal());
      const auto threshold = static_cast<T>(gen.normal());
      thresholds_(b) = bias ? threshold : T(0);
    }
  }

  int bits() const noexcept { return bits_; }
  /// E x B: column b is hyperplane a_b.
  auto planes() const noexcept { return planes_.transpose(); }
  /// B thresholds t_b (zero when bias is off).
  const Eigen::Matrix<T, 1, Eigen::Dynamic>& thresholds() const noexcept { return thresholds_; }

  /// Hashes the rows of `x` (n x E) into `out[0..n)`: bit b of out[i] is x_i . a_b > t_b; bits
  /// at and above B are zero. The projections of a block of rows are detail::score_rows (the
  /// fused attention kernel's score tiles) against the planes packed as its keys, compared with
  /// the thresholds while in cache: no general matrix product that packs its operands on every
  /// block (its packing and product took a sixth of clustered at N = 16384). Each projection is
  /// one sequential chain of multiply-adds over the E features, the same on any thread count.
  /// Cost: 2 n E B flops.
  template <class Rows>
  void operator()(const Rows& x, std::uint64_t* out, int threads = 1) const {
    const index n = x.rows(), B = bits_;
    if (n == 0) return;
    const arena::scope scratch;  // the packed planes, read by every thread
    const score_rows<T> project(const_view<T>(planes_), B, 1);
    const index lds = project.stride();
    // Blocks are independent: on `threads` threads, each from its own arena.
    parallel_for(threads, (n + block - 1) / block, [&](index b) {
      const arena::scope block_scratch;
      const index i0 = b * block, rows = std::min(block, n - i0);
      T* const s =
          arena::local().take<T>(static_cast<std::size_t>(project.padded_rows(rows) * lds));
      project(const_view<T>(x.middleRows(i0, rows)), rows, s, 1);
      const T* const t = thresholds_.data();
      for (index r = 0; r < rows; ++r) {
        const T* const p = s + r * lds;
        std::uint64_t h = 0;
        for (index b2 = 0; b2 < B; ++b2) h |= static_cast<std::uint64_t>(p[b2] > t[b2]) << b2;
        out[i0 + r] = h;
      }
    });
  }

 private:
  matrix<T> planes_;  // B x E: row b is hyperplane a_b
  Eigen::Matrix<T, 1, Eigen::Dynamic> thresholds_;
  int bits_ = 0;
};

}  // namespace fastattn::detail
