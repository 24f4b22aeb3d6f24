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

// The geometry's packet type is a vector type with attributes (see flash_block.hpp).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif

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
    // As the fused kernel's key panels (flash::pack_panels): plane b is lane b % panel of
    // panel b / panel; the lanes past B are zero planes, never read.
    panels_ = (bits + geometry::panel - 1) / geometry::panel;
    packed_.resize(panels_ * geometry::panel * dim);
    flash::pack_panels<geometry>(packed_.data(), bits, dim, [&](index b) -> const T* {
      return planes_.row(b).data();
    });
  }

  int bits() const noexcept { return bits_; }
  /// E x B: column b is hyperplane a_b.
  auto planes() const noexcept { return planes_.transpose(); }
  /// B thresholds t_b (zero when bias is off).
  const Eigen::Matrix<T, 1, Eigen::Dynamic>& thresholds() const noexcept { return thresholds_; }

  /// Hashes the rows of `x` (n x E) into `out[0..n)`: bit b of out[i] is x_i . a_b > t_b; bits
  /// at and above B are zero. The projections of a group of rows are the fused attention
  /// kernel's score tiles (flash::score_tile) against the planes packed once, compared with the
  /// thresholds while in L1: no rows x B matrix, and no general matrix product that packs its
  /// operands on every block (its packing and product took a sixth of clustered at N = 16384).
  /// Each projection is one sequential chain of multiply-adds over the E features, the same on
  /// any thread count. Cost: 2 n E B flops.
  template <class Rows>
  void operator()(const Rows& x, std::uint64_t* out, int threads = 1) const {
    const index n = x.rows(), E = x.cols(), B = bits_;
    if (n == 0) return;
    constexpr index group = geometry::group, panel = geometry::panel;
    const index lds = panels_ * panel;
    // Blocks are independent: on `threads` threads, each from its own arena.
    parallel_for(threads, (n + block - 1) / block, [&](index b) {
      const arena::scope scratch;
      T* const rows = arena::local().take<T>(static_cast<std::size_t>(group * E));
      T* const s = arena::local().take<T>(static_cast<std::size_t>(group * lds));
      const index end = std::min(n, (b + 1) * block);
      for (index g0 = b * block; g0 < end; g0 += group) {
        const index here = std::min(group, end - g0);
        for (index r = 0; r < group; ++r) {
          auto row = Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>>(rows + r * E, E);
          if (r < here)
            row = x.row(g0 + r);
          else
            row.setZero();
        }
        for (index p = 0; p < panels_; ++p)
          for (index r0 = 0; r0 < group; r0 += geometry::score_rows)
            flash::score_tile<geometry, geometry::score_rows>(
                rows + r0 * E, E, packed_.data() + p * panel * E, E, s + r0 * lds + p * panel,
                lds);
        const T* const t = thresholds_.data();
        for (index r = 0; r < here; ++r) {
          const T* const proj = s + r * lds;
          std::uint64_t h = 0;
          for (index b2 = 0; b2 < B; ++b2) h |= static_cast<std::uint64_t>(proj[b2] > t[b2]) << b2;
          out[g0 + r] = h;
        }
      }
    });
  }

 private:
  using geometry = flash_geometry<T>;

  matrix<T> planes_;  // B x E: row b is hyperplane a_b
  Eigen::Matrix<T, 1, Eigen::Dynamic> thresholds_;
  Eigen::Matrix<T, Eigen::Dynamic, 1> packed_;  // the planes as panels (64-byte aligned)
  index panels_ = 0;
  int bits_ = 0;
};

}  // namespace fastattn::detail

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
