// XBOX+ asymmetric transform (Bachrach et al. 2014, symmetrised by Daras et al. 2020): maps queries
// and keys to E + 2 dimensions so that Euclidean nearest neighbours are maximum inner products.
//
//   F(q) = [q, 0, sqrt(M^2 - ||q||^2)],   G(k) = [k, sqrt(M^2 - ||k||^2), 0],   M^2 = M_Q^2 + M_K^2
//   ||F(q) - G(k)||^2 = ||q||^2 + M^2 - ||q||^2 + ||k||^2 + M^2 - ||k||^2 - 2 q.k
//                     = 2 M^2 - 2 q.k
//
// M_Q and M_K are the largest norms over the rows given (the valid rows only: padding must not
// move the transform). The kernel never materialises F and G (it projects the raw rows and adds
// the extra coordinate's contribution, see e2lsh.hpp); `transform_queries` / `transform_keys`
// exist for tests and for callers that want the vectors themselves.
#pragma once

#include <algorithm>
#include <cmath>

#include "../policy.hpp"

namespace fastattn::detail {

template <class T>
class xbox_plus {
 public:
  using vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

  xbox_plus() = default;

  /// Fits the transform to the queries `q` (Lv x E) and keys `k` (Sv x E): all rows given count.
  template <class DQ, class DK>
  xbox_plus(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k) {
    fit(q, k);
  }

  /// Refits to new rows, reusing the storage (no allocation when the sizes repeat).
  template <class DQ, class DK>
  void fit(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k) {
    query_norm2_.resize(q.rows());
    key_norm2_.resize(k.rows());
    query_norm2_.noalias() = q.rowwise().squaredNorm();
    key_norm2_.noalias() = k.rowwise().squaredNorm();
    const T mq2 = query_norm2_.size() ? query_norm2_.maxCoeff() : T(0);
    const T mk2 = key_norm2_.size() ? key_norm2_.maxCoeff() : T(0);
    max_norm2_ = mq2 + mk2;
  }

  /// M_Q^2 + M_K^2.
  T max_norm2() const noexcept { return max_norm2_; }
  /// ||q_i||^2 and ||k_j||^2 of the fitted rows.
  const vector& query_norm2() const noexcept { return query_norm2_; }
  const vector& key_norm2() const noexcept { return key_norm2_; }

  /// The extra coordinate of query i (slot E + 1 of F) and of key j (slot E of G). Rounding can
  /// make M^2 - ||x||^2 slightly negative for the longest row; it is clamped to 0.
  T query_extra(index i) const { return extra(query_norm2_(i)); }
  T key_extra(index j) const { return extra(key_norm2_(j)); }

  /// F(q) for the fitted queries: Lv x (E + 2).
  template <class DQ>
  matrix<T> transform_queries(const Eigen::MatrixBase<DQ>& q) const {
    matrix<T> f(q.rows(), q.cols() + 2);
    f.leftCols(q.cols()) = q;
    for (index i = 0; i < q.rows(); ++i) {
      f(i, q.cols()) = T(0);
      f(i, q.cols() + 1) = query_extra(i);
    }
    return f;
  }

  /// G(k) for the fitted keys: Sv x (E + 2).
  template <class DK>
  matrix<T> transform_keys(const Eigen::MatrixBase<DK>& k) const {
    matrix<T> g(k.rows(), k.cols() + 2);
    g.leftCols(k.cols()) = k;
    for (index j = 0; j < k.rows(); ++j) {
      g(j, k.cols()) = key_extra(j);
      g(j, k.cols() + 1) = T(0);
    }
    return g;
  }

 private:
  T extra(T norm2) const { return std::sqrt(std::max(max_norm2_ - norm2, T(0))); }

  vector query_norm2_;
  vector key_norm2_;
  T max_norm2_ = T(0);
};

}  // namespace fastattn::detail
