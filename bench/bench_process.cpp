// The user-shaped variant `<kernel>/N:<N>/iid` (N = 4096 and 16384) for every kernel of
// `fastattn::kernels`, policy defaults: q, k and v iid N(0, 1) (no cluster structure, scores of
// order one), and every call returns a freshly allocated L x M matrix, as
// `fastattn::attention(policy, q, k, v)` does in a user's loop. The contract's `<kernel>/N:<N>`
// (peaked inputs, one output reused) hides what depends on the data or on where memory lands.
//
// One process shows one memory layout and one placement: modes that differ from process to
// process (issue #14: smyrf at N = 16384, 13.5-14 ms in some processes and 22-24 ms in others)
// need several processes; scripts/bench_processes.sh runs benchmarks in fresh processes and
// reports the max / min of their medians.
#include <array>
#include <map>
#include <memory>
#include <mutex>

#include "bench_common.hpp"

namespace fastattn::bench {

inline constexpr std::array<index, 2> iid_sizes{4096, 16384};

/// q, k, v of N tokens, E = M = head_dim, every entry iid N(0, 1) (cached per N).
struct iid_problem {
  matrix<float> q, k, v;
};

inline const iid_problem& get_iid_problem(index n) {
  static std::map<index, std::unique_ptr<iid_problem>> cache;
  static std::mutex mutex;
  const std::lock_guard lock(mutex);
  auto& slot = cache[n];
  if (!slot) {
    const auto seed = input_seed + 7919 + 3 * static_cast<std::uint64_t>(n);
    slot =
        std::make_unique<iid_problem>(iid_problem{testing::gaussian<float>(n, head_dim, seed),
                                                  testing::gaussian<float>(n, head_dim, seed + 1),
                                                  testing::gaussian<float>(n, head_dim, seed + 2)});
  }
  return *slot;
}

/// Times `out = attention(policy, q, k, v)` (a new output per call, freed at the end of the
/// iteration) on the iid problem of size N.
template <attention_policy Policy, class FlopFn>
void run_iid(benchmark::State& state, const Policy& policy, index n, FlopFn flops) {
  const iid_problem& p = get_iid_problem(n);
  const auto warm_until = std::chrono::steady_clock::now() + std::chrono::milliseconds(100);
  do {
    const matrix<float> out = attention(policy, p.q, p.k, p.v);
    benchmark::DoNotOptimize(out.data());
  } while (std::chrono::steady_clock::now() < warm_until);
  for (auto _ : state) {
    const matrix<float> out = attention(policy, p.q, p.k, p.v);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  report(state, n, static_cast<double>(flops(n)), nullptr);  // no rel_err: no iid reference
}

void register_iid() {
  kernels::for_each([](auto type) {
    using Policy = typename decltype(type)::type;
    for (const index n : iid_sizes) {
      const std::string full = std::string(Policy::name) + "/N:" + std::to_string(n) + "/iid";
      benchmark::RegisterBenchmark(full.c_str(), [n](benchmark::State& state) {
        run_iid(state, Policy{}, n, [](index size) { return work_of(Policy{}, size); });
      })->Unit(benchmark::kMillisecond);
    }
  });
}

}  // namespace fastattn::bench
