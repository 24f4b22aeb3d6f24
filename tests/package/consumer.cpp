// A downstream program: uses fastattn only through its CMake package.
#include <fastattn/fastattn.hpp>

#include <cstdio>

int main() {
  const Eigen::MatrixXf q = Eigen::MatrixXf::Random(5, 4), k = Eigen::MatrixXf::Random(7, 4),
                        v = Eigen::MatrixXf::Random(7, 3);
  const Eigen::MatrixXf o = fastattn::attention(fastattn::dense{}, q, k, v);
  // Each output row is a convex combination of v's rows, so it lies within v's column ranges.
  for (Eigen::Index c = 0; c < v.cols(); ++c)
    if (o.col(c).maxCoeff() > v.col(c).maxCoeff() + 1e-5f ||
        o.col(c).minCoeff() < v.col(c).minCoeff() - 1e-5f)
      return 1;
  std::printf("consumer ok: %ld x %ld\n", static_cast<long>(o.rows()), static_cast<long>(o.cols()));
  return o.rows() == 5 && o.cols() == 3 ? 0 : 1;
}
