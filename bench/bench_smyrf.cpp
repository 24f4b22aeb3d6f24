// smyrf with the policy defaults (2 hashes, clusters of 64), plus a small knob sweep for the
// error-versus-time plot.
#include <fastattn/smyrf.hpp>

#include <string>

#include "bench_common.hpp"

namespace fastattn::bench {
namespace {

// The work one call does on an N x N problem: per round, the (N x E)(E x hashes) and (N x E)
// (E x hashes) projections, then for every (query cluster, key group) pair the two products
// Q_c K_g^T and P V_g: 2 |Q_c| |K_g| (E + M) flops, summed exactly over the cluster plan.
auto smyrf_flops(const smyrf& policy) {
  return [policy](index n) {
    const auto plan = detail::cluster_plan::make(n, n, policy.cluster_size);
    double pairs = 0;
    for (index c = 0; c < plan.clusters(); ++c)
      pairs += static_cast<double>(plan.queries.size(c)) *
               static_cast<double>(plan.keys.size(plan.key_group_of(c)));
    const auto h = static_cast<double>(policy.hashes);
    return h * (2.0 * pairs * 2.0 * head_dim + 2.0 * 2.0 * static_cast<double>(n) * head_dim);
  };
}

const bool smyrf_registered = register_kernel("smyrf", smyrf{}, smyrf_flops(smyrf{}));

const bool smyrf_sweep_registered = [] {
  for (const auto& [hashes, cluster_size] :
       {std::pair<index, index>{1, 64}, {2, 64}, {4, 64}, {8, 64}, {2, 32}, {4, 32}, {2, 128}}) {
    const smyrf policy{.hashes = hashes, .cluster_size = cluster_size};
    register_sweep(
        "smyrf",
        "hashes:" + std::to_string(hashes) + ",cluster_size:" + std::to_string(cluster_size),
        policy, smyrf_flops(policy));
  }
  return true;
}();

}  // namespace
}  // namespace fastattn::bench
