// The variants of the benchmark contract (bench_common.hpp), for every kernel of
// `fastattn::kernels`:
// - `<kernel>/N:<N>/causal`: causal attention (rel_err against exact causal attention);
// - `<kernel>/N:<N>/window:16`: an approximate kernel with an exact local band of 16 keys on each
//   side (`banded<P>`);
// - `<kernel>/N:<N>/estimate`: an approximate kernel with its run-time error estimate on
//   (`guarded<P>` with 32 samples, estimate only);
// - `<kernel>/N:<N>/E:<E>`: head sizes E = M in {32, 80, 96, 128} beside the contract's 64, at
//   N = 1024, 4096 and 16384 (so that no head size a model uses falls off a cliff).
#include "bench_common.hpp"

namespace fastattn::bench {

void register_variants() {
  constexpr index window = 16;
  kernels::for_each([](auto type) {
    using Policy = typename decltype(type)::type;
    const Policy policy{};
    register_head_dims(Policy::name, policy);
    register_variant(Policy::name, "causal", policy,
                     [policy](index n) {
                       if constexpr (std::is_same_v<Policy, local>) {
                         return work(policy, n, head_dim, true);
                       } else {
                         return causal_work(policy, n,
                                            [policy](index m) { return work_of(policy, m); });
                       }
                     },
                     {.causal = true});
    if constexpr (!Policy::is_exact && supports_exclusion<Policy>) {
      const banded<Policy> with_band{.inner = policy, .window = window};
      register_variant(
          Policy::name, "window:" + std::to_string(window), with_band,
          [policy](index n) { return work_of(policy, n) + work_of(local{.window = window}, n); });
      static error_estimate report[1];
      const guarded<Policy> estimated{.inner = policy, .min_length = 0, .report = report};
      register_variant(Policy::name, "estimate", estimated,
                       [policy](index n) { return work_of(policy, n); });
    }
  });
}

}  // namespace fastattn::bench
