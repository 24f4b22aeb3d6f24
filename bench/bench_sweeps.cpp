// Knob sweeps at N = 4096 for the error-versus-time plot, `sweep/<kernel>/<setting>/N:4096`: the
// number of clusters (clustered), clusters and top-k (improved_clustered), hashing rounds and
// cluster size (smyrf). Every other knob keeps its default.
#include <string>
#include <utility>

#include "bench_common.hpp"

namespace fastattn::bench {

void register_sweeps() {
  for (const index clusters : {25, 50, 100, 200, 400})
    register_sweep("clustered", "clusters:" + std::to_string(clusters),
                   clustered{.clusters = clusters});
  for (const auto& [clusters, topk] :
       {std::pair<index, index>{25, 32}, {50, 32}, {100, 32}, {200, 32}, {100, 16}, {100, 64}})
    register_sweep("improved_clustered",
                   "clusters:" + std::to_string(clusters) + ",topk:" + std::to_string(topk),
                   improved_clustered{.clusters = clusters, .topk = topk});
  for (const auto& [hashes, cluster_size] :
       {std::pair<index, index>{1, 64}, {2, 64}, {4, 64}, {8, 64}, {2, 32}, {4, 32}, {2, 128}})
    register_sweep(
        "smyrf",
        "hashes:" + std::to_string(hashes) + ",cluster_size:" + std::to_string(cluster_size),
        smyrf{.hashes = hashes, .cluster_size = cluster_size});
}

}  // namespace fastattn::bench
