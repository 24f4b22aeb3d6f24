// clustered and improved_clustered with the policy defaults (C = 100, 63 bits, 10 iterations;
// improved: top-32), plus small knob sweeps for the error-versus-time plot.
#include <fastattn/clustered.hpp>
#include <fastattn/improved_clustered.hpp>

#include <algorithm>
#include <string>

#include "bench_common.hpp"

namespace fastattn::bench {
namespace {

// The floating-point work of one clustered call on an N x N problem (E = M = head_dim): the
// (N x E)(E x B) hash projections, the centroid means (N E adds), and the centroid attention
// C x N scores plus C x N by N x M values. K-means is integer work (popcounts), not counted.
double clustered_work(index n, index clusters, int bits) {
  const auto N = static_cast<double>(n), E = static_cast<double>(head_dim);
  const auto C = static_cast<double>(std::min(clusters, n));
  return 2.0 * N * E * bits + N * E + 2.0 * C * N * (E + E);
}

auto clustered_flops(const clustered& policy) {
  return [policy](index n) { return clustered_work(n, policy.clusters, policy.bits); };
}

// improved adds, per query, exact attention on its cluster's k keys: 2 N k (E + M). (Its
// centroid scores and residual rows cost the same as clustered's centroid attention.)
auto improved_flops(const improved_clustered& policy) {
  return [policy](index n) {
    const auto k = static_cast<double>(std::min(policy.topk, n));
    return clustered_work(n, policy.clusters, policy.bits) +
           2.0 * static_cast<double>(n) * k * 2.0 * head_dim;
  };
}

const bool clustered_registered =
    register_kernel("clustered", clustered{.seed = 1}, clustered_flops(clustered{}));
const bool improved_registered = register_kernel(
    "improved_clustered", improved_clustered{.seed = 1}, improved_flops(improved_clustered{}));

const bool clustered_sweep_registered = [] {
  for (const index clusters : {25, 50, 100, 200, 400}) {
    const clustered policy{.clusters = clusters, .seed = 1};
    register_sweep("clustered", "clusters:" + std::to_string(clusters), policy,
                   clustered_flops(policy));
  }
  for (const auto& [clusters, topk] :
       {std::pair<index, index>{25, 32}, {50, 32}, {100, 32}, {200, 32}, {100, 16}, {100, 64}}) {
    const improved_clustered policy{.clusters = clusters, .seed = 1, .topk = topk};
    register_sweep("improved_clustered",
                   "clusters:" + std::to_string(clusters) + ",topk:" + std::to_string(topk), policy,
                   improved_flops(policy));
  }
  return true;
}();

}  // namespace
}  // namespace fastattn::bench
