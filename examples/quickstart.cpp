// The README's quick start, compiled and run by the test suite.
#include <fastattn/fastattn.hpp>

#include <cstdio>

// A model component templated on the kernel: swapping kernels is changing one type.
template <fastattn::attention_policy Attention>
struct self_attention {
  Attention attention;
  Eigen::MatrixXf operator()(const Eigen::MatrixXf& x) const {
    return fastattn::attention(attention, x, x, x, {.causal = Attention::supports_causal});
  }
};

int main() {
  const Eigen::Index L = 512, E = 64;
  const Eigen::MatrixXf q = Eigen::MatrixXf::Random(L, E), k = Eigen::MatrixXf::Random(L, E),
                        v = Eigen::MatrixXf::Random(L, E);

  // One head, exact, with the last 12 keys treated as padding.
  const Eigen::MatrixXf o = fastattn::attention(fastattn::dense{}, q, k, v, {.key_length = 500});

  const self_attention<fastattn::dense> layer{};
  const Eigen::MatrixXf y = layer(q);

  std::printf("dense: %ld x %ld output, |o| = %.4f, causal self-attention |y| = %.4f\n",
              static_cast<long>(o.rows()), static_cast<long>(o.cols()), static_cast<double>(o.norm()),
              static_cast<double>(y.norm()));
  return o.allFinite() && y.allFinite() ? 0 : 1;
}
