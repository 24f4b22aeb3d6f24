// Online (streaming) softmax: attention of a block of query rows accumulated over blocks of keys,
// keeping per row the running max m, the running sum l of exp(score - m) and the unnormalised
// output acc; when m grows, l and acc are rescaled by exp(m_old - m_new) (Milakov & Gimelshein
// 2018; FlashAttention). Used by dense over key blocks and by smyrf inside each cluster.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <utility>

#include "../policy.hpp"
#include "scratch.hpp"

namespace fastattn::detail {

template <class T>
class online_softmax {
 public:
  using vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

  /// Scratch for up to `max_rows` queries, `max_cols` keys per block and `value_dim` outputs,
  /// taken from the calling thread's arena (the caller holds an `arena::scope`).
  online_softmax(index max_rows, index max_cols, index value_dim)
      : scores_(scratch_matrix<T>(max_rows, std::max<index>(max_cols, 1))),
        acc_(scratch_matrix<T>(max_rows, value_dim)),
        max_(scratch_vector<T>(max_rows)),
        sum_(scratch_vector<T>(max_rows)) {}

  /// Starts a new block of `rows` queries.
  void reset(index rows) {
    rows_ = rows;
    acc_.topRows(rows).setZero();
    max_.head(rows).setConstant(-std::numeric_limits<T>::infinity());
    sum_.head(rows).setZero();
  }

  /// The score block to fill for the next `cols` keys: rows x cols, row-major.
  auto scores(index cols) { return scores_.topLeftCorner(rows_, cols); }

  /// Folds the filled score block into the running state; `values` holds the block's cols x M
  /// values. When `visible` is set, row r sees only the columns c with
  /// r + visible->lower <= c <= r + visible->upper (see `band::relative`); other entries get
  /// exactly zero weight.
  template <class Values>
  void absorb(index cols, const Values& values, std::optional<fastattn::band> visible = {}) {
    auto block = scores_.topLeftCorner(rows_, cols);
    for (index r = 0; r < rows_; ++r) {
      index first = 0, last = cols;  // visible columns [first, last)
      if (visible) {
        first = std::clamp<index>(r + visible->lower, 0, cols);
        last = std::clamp<index>(r + visible->upper + 1, first, cols);
      }
      auto row = block.row(r);
      if (first == last) {
        row.setZero();
        continue;
      }
      auto seen = row.segment(first, last - first).array();
      const T m_new = std::max(max_(r), seen.maxCoeff());
      if (m_new == -std::numeric_limits<T>::infinity()) {  // every score so far is -inf or NaN
        if (seen.isNaN().any()) sum_(r) = std::numeric_limits<T>::quiet_NaN();  // propagate
        row.setZero();
        continue;
      }
      // One exp over the whole row, then the masked entries zeroed: an exp of the visible
      // segment alone starts unaligned, and Eigen peels up to a packet of scalar exps per row
      // (a third of local attention's time at window 16). Masked entries are set finite first
      // (m_new), so that whatever they held (NaN, +inf) never reaches the exp.
      row.head(first).setConstant(m_new);
      row.tail(cols - last).setConstant(m_new);
      row.array() = (row.array() - m_new).exp();
      row.head(first).setZero();
      row.tail(cols - last).setZero();
      const T alpha = std::exp(max_(r) - m_new);  // 0 when the row had nothing yet
      sum_(r) = sum_(r) * alpha + row.sum();
      if (alpha != T(1)) acc_.row(r) *= alpha;
      max_(r) = m_new;
    }
    // A few rows (local attention's blocks) are faster unpacked, as a coefficient-based
    // product; at 64 rows and more the packed product wins (smyrf's clusters, dense's tiles).
    if (rows_ <= 16)
      acc_.topRows(rows_).noalias() += block.lazyProduct(values);
    else
      acc_.topRows(rows_).noalias() += block * values;
  }

  /// Writes the normalised rows into `out` (rows x M); rows that saw no key get zeros.
  /// When `lse` is given it receives log(sum_j exp(score_j)) per row (-inf for empty rows).
  template <class Out>
  void finish(Out&& out, T* lse = nullptr) const {
    for (index r = 0; r < rows_; ++r) {
      if (sum_(r) != T(0)) {  // 0 only when no key was visible; NaN propagates
        out.row(r) = acc_.row(r) / sum_(r);
        if (lse) lse[r] = max_(r) + std::log(sum_(r));
      } else {
        out.row(r).setZero();
        if (lse) lse[r] = -std::numeric_limits<T>::infinity();
      }
    }
  }

 private:
  Eigen::Map<matrix<T>, Eigen::Aligned64> scores_;
  Eigen::Map<matrix<T>, Eigen::Aligned64> acc_;
  Eigen::Map<vector, Eigen::Aligned64> max_;
  Eigen::Map<vector, Eigen::Aligned64> sum_;
  index rows_ = 0;
};

}  // namespace fastattn::detail
