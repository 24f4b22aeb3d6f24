#include <fastattn/fastattn.hpp>

#include <cstdio>

// A model component templated on the kernel: swapping kernels is changing one type.
template <fastattn::attention_policy Attention>
struct self_attention {
  Attention attention;
  Eigen::MatrixXf operator()(const Eigen::MatrixXf& x, Eigen::Index valid) const {
    return fastattn::attention(attention, x, x, x, {.key_length = valid, .query_length = valid});
  }
};

int main() {
  const Eigen::Index L = 1024, E = 64;
  const Eigen::MatrixXf q = Eigen::MatrixXf::Random(L, E), k = Eigen::MatrixXf::Random(L, E),
                        v = Eigen::MatrixXf::Random(L, E);

  // One head, four kernels, one call shape.
  const Eigen::MatrixXf o = fastattn::attention(fastattn::dense{}, q, k, v, {.causal = true});
  const Eigen::MatrixXf c =
      fastattn::attention(fastattn::clustered{.clusters = 100, .seed = 7}, q, k, v);
  const Eigen::MatrixXf i =
      fastattn::attention(fastattn::improved_clustered{.clusters = 25, .topk = 32}, q, k, v);
  const Eigen::MatrixXf s = fastattn::attention(fastattn::smyrf{.hashes = 2, .cluster_size = 64}, q,
                                                k, v, {.key_length = 900});

  const self_attention<fastattn::improved_clustered> layer{};
  const Eigen::MatrixXf y = layer(q, 1000);  // rows 1000.. are padding: zero output

  std::printf("dense %.3f  clustered %.3f  improved %.3f  smyrf %.3f  layer %.3f\n",
              static_cast<double>(o.norm()), static_cast<double>(c.norm()),
              static_cast<double>(i.norm()), static_cast<double>(s.norm()),
              static_cast<double>(y.norm()));
  return o.allFinite() && c.allFinite() && i.allFinite() && s.allFinite() &&
                 y.bottomRows(L - 1000).isZero(0)
             ? 0
             : 1;
}
