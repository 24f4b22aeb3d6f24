// E2LSH projections (Datar, Immorlica, Indyk, Mirrokni 2004) as SMYRF uses them: per hashing round
// h, alpha_h ~ N(0, I) in E + 2 dimensions and beta_h ~ U(0, r); the hash of a transformed vector x
// is the real number alpha_h . x + beta_h (no floor, no division by r: only the order matters).
//
// All rounds are one product: X (n x E) * A[0:E] (E x hashes), plus the contribution of the XBOX+
// extra coordinate, so F(q) and G(k) are never materialised.
#pragma once

#include <bit>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../policy.hpp"
#include "rng.hpp"
#include "xbox.hpp"

namespace fastattn::detail {

template <class T>
struct e2lsh {
  matrix<T> alpha;                           ///< (E + 2) x hashes: column h is alpha_h
  Eigen::Matrix<T, 1, Eigen::Dynamic> beta;  ///< 1 x hashes

  /// Draws `hashes` projections for E-dimensional inputs (E + 2 after XBOX+). Draw order, for
  /// reproducibility: round by round, the E + 2 normals of alpha_h, then beta_h = r * uniform.
  static e2lsh draw(rng& gen, index E, index hashes, double r) {
    e2lsh p;
    p.redraw(gen, E, hashes, r);
    return p;
  }

  /// The same draw into this object's storage (no allocation when the sizes repeat).
  void redraw(rng& gen, index E, index hashes, double r) {
    alpha.resize(E + 2, hashes);
    beta.resize(hashes);
    for (index h = 0; h < hashes; ++h) {
      for (index d = 0; d < E + 2; ++d) alpha(d, h) = static_cast<T>(gen.normal());
      beta(h) = static_cast<T>(r * gen.uniform());
    }
  }

  /// Hashes of already transformed rows x (n x (E + 2)): n x hashes. For tests and reference.
  template <class D>
  matrix<T> hash(const Eigen::MatrixBase<D>& x) const {
    matrix<T> out = x * alpha;
    out.rowwise() += beta;
    return out;
  }

  /// Hashes of F(q) for the valid queries q (Lv x E) without forming F: Lv x hashes.
  template <class D, class Out>
  void hash_queries(const Eigen::MatrixBase<D>& q, const xbox_plus<T>& xbox, Out& out) const {
    const index E = q.cols();
    out.noalias() = q * alpha.topRows(E);
    for (index i = 0; i < q.rows(); ++i)
      out.row(i) += xbox.query_extra(i) * alpha.row(E + 1) + beta;
  }

  /// Hashes of G(k) for the valid keys k (Sv x E) without forming G: Sv x hashes.
  template <class D, class Out>
  void hash_keys(const Eigen::MatrixBase<D>& k, const xbox_plus<T>& xbox, Out& out) const {
    const index E = k.cols();
    out.noalias() = k * alpha.topRows(E);
    for (index j = 0; j < k.rows(); ++j) out.row(j) += xbox.key_extra(j) * alpha.row(E) + beta;
  }
};

}  // namespace fastattn::detail
