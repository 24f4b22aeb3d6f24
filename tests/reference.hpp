// The float64 naive oracle every kernel is tested against, and the input generators shared by the
// tests and the benchmark. Deliberately the plainest possible code: an L x S matrix of scores,
// row-wise max subtraction, exp, normalisation.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

#include <Eigen/Core>
#include <fastattn/attention.hpp>

namespace fastattn::testing {

using matd = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// softmax(scale q k^T + masks) v in float64, with the same option semantics as the library.
template <class DQ, class DK, class DV>
matd reference_attention(const Eigen::MatrixBase<DQ>& q_in, const Eigen::MatrixBase<DK>& k_in,
                         const Eigen::MatrixBase<DV>& v_in, const options& opt = {}) {
  const matd q = q_in.template cast<double>(), k = k_in.template cast<double>(),
             v = v_in.template cast<double>();
  const index L = q.rows(), S = k.rows();
  const index Lv = opt.query_length.value_or(L), Sv = opt.key_length.value_or(S);
  const double scale = opt.scale.value_or(1.0 / std::sqrt(static_cast<double>(q.cols())));
  matd out = matd::Zero(L, v.cols());
  for (index i = 0; i < Lv; ++i) {
    const index visible = opt.causal ? std::min(Sv, i + 1) : Sv;
    if (visible == 0) continue;
    Eigen::VectorXd s = (k.topRows(visible) * q.row(i).transpose()) * scale;
    s = (s.array() - s.maxCoeff()).exp();
    s /= s.sum();
    out.row(i) = s.transpose() * v.topRows(visible);
  }
  return out;
}

/// Relative Frobenius error ||a - b|| / ||b|| (0 when both are zero).
template <class DA, class DB>
double relative_error(const Eigen::MatrixBase<DA>& a, const Eigen::MatrixBase<DB>& b) {
  const matd ad = a.template cast<double>(), bd = b.template cast<double>();
  const double denom = bd.norm();
  const double diff = (ad - bd).norm();
  return denom > 0 ? diff / denom : diff;
}

/// i.i.d. N(0, sigma^2) entries.
template <class T>
matrix<T> gaussian(index rows, index cols, std::uint64_t seed, double sigma = 1.0) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal(0.0, sigma);
  matrix<T> m(rows, cols);
  for (index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(normal(gen));
  return m;
}

/// Queries and keys drawn around `centres` shared random centres (3 N(0,1) per coordinate, noise
/// 0.5), values N(0,1): attention is peaked as in trained models (the peaked1024 fixture's recipe).
template <class T>
struct peaked_inputs {
  matrix<T> q, k, v;
};

template <class T>
peaked_inputs<T> make_peaked(index L, index S, index E, index M, std::uint64_t seed,
                             index centres = 16) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_int_distribution<index> pick(0, centres - 1);
  matd c(centres, E);
  for (index i = 0; i < c.size(); ++i) c.data()[i] = 3.0 * normal(gen);
  auto draw = [&](index rows) {
    matrix<T> m(rows, E);
    for (index r = 0; r < rows; ++r) {
      const index z = pick(gen);
      for (index e = 0; e < E; ++e) m(r, e) = static_cast<T>(c(z, e) + 0.5 * normal(gen));
    }
    return m;
  };
  peaked_inputs<T> in;
  in.q = draw(L);
  in.k = draw(S);
  in.v.resize(S, M);
  for (index i = 0; i < in.v.size(); ++i) in.v.data()[i] = static_cast<T>(normal(gen));
  return in;
}

/// A neighbour-offset head, as trained models learn in their first layers: q_i = 200 (p_i +
/// p_{i+2}), k_j = p_{j+1} with random unit p in R^64, values N(0,1); use it with scale 1. Query
/// i attends to keys i - 1 and i + 1: a neighbour's score is 200 (1 +- 0.25) with probability
/// ~1 - 1e-4 per row, any other key's is 200 N(0, 2/64) (its maximum over 1024 keys is about 0.58
/// of that), so the mass off the two neighbours is below e^-30 per row. No clustering of content
/// expresses such a head: an approximate kernel that misses the neighbours is wrong by O(1), while
/// local attention with window 1 is exact to rounding. With `share` < 1 only that share of the
/// queries (chosen at random) is such a row; the others are 0.05 p_i, nearly uniform attention (a
/// head whose error lives in part of its rows).
template <class T>
peaked_inputs<T> make_neighbour(index n, std::uint64_t seed, double share = 1.0) {
  constexpr index E = 64;
  matrix<T> p = gaussian<T>(n + 2, E, seed);
  for (index i = 0; i < p.rows(); ++i) p.row(i).normalize();
  peaked_inputs<T> in{matrix<T>(n, E), matrix<T>(n, E), gaussian<T>(n, E, seed + 1)};
  std::mt19937_64 gen(seed + 2);
  std::uniform_real_distribution<double> u(0, 1);
  for (index i = 0; i < n; ++i) {
    const bool neighbour = share >= 1 || u(gen) < share;
    if (neighbour)
      in.q.row(i) = T(200) * (p.row(i) + p.row(i + 2));
    else
      in.q.row(i) = T(0.05) * p.row(i);
    in.k.row(i) = p.row(i + 1);
  }
  return in;
}

}  // namespace fastattn::testing
