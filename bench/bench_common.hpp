// The benchmark harness shared by fastattn_bench's files.
//
// Contract (other tools read these names and counters; keep them stable): benchmarks are named
// `<kernel>/N:<N>` for every kernel of `fastattn::kernels` (policy defaults), one head,
// E = M = 64, float, one thread, inputs drawn around 16 centres (peaked attention), a fixed seed,
// and carry the counters `flops` (the work the kernel does, as a rate; work.hpp) and, for
// N <= 4096, `rel_err` against a float64 reference computed outside the timed region. Beside
// them: the baselines `gemm_bound/N:<N>`, `dense_naive/N:<N>` and `fma_peak`
// (bench_baselines.cpp), the variants `<kernel>/N:<N>/causal`, `/window:<W>`, `/estimate` and
// `/E:<E>` (other head sizes; bench_variants.cpp), the thread-scaling pairs
// `multihead/<kernel>/threads:<1|2>` and `multihead/<kernel>/heads:1/threads:<1|2>`, the
// grouped-query pair `multihead/<kernel>/kv_heads:2/threads:<1|2>`, the knob
// sweeps `sweep/<kernel>/<setting>/N:4096` (bench_sweeps.cpp), the mixed-layer frontier
// `mix/<kernel>/<setting>` (bench_mix.cpp) and the user-shaped `<kernel>/N:<N>/iid` (iid N(0, 1)
// inputs, a new output per call; bench_process.cpp). scripts/bench.sh and scripts/report.sh derive
// the kernels from these names, so a kernel added to `fastattn::kernels` is benchmarked and
// reported without edits.
//
// bench_main.cpp registers everything, in this order: fma_peak, the kernels, the variants, the
// iid variants, the other baselines, multihead, sweeps, mix.
#pragma once

#include <benchmark/benchmark.h>

#include <fastattn/fastattn.hpp>

#include <array>
#include <utility>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "reference.hpp"
#include "work.hpp"

namespace fastattn::bench {

inline constexpr std::uint64_t input_seed = 2024;
inline constexpr index min_n = 256;
inline constexpr index max_n = 32768;
inline constexpr index max_n_with_error = 4096;  // rel_err is computed up to this N

/// One benchmark problem: q, k, v of N tokens, and the exact output when N is small enough.
struct problem {
  matrix<float> q, k, v;
  std::unique_ptr<testing::matd> exact;         // float64 reference, computed once on first use
  std::unique_ptr<testing::matd> exact_causal;  // the same with causal masking
};

/// The cached problem of size N with E = M = e (same inputs for every kernel).
inline problem& get_problem(index n, index e = head_dim) {
  static std::map<std::pair<index, index>, std::unique_ptr<problem>> cache;
  static std::mutex mutex;
  const std::lock_guard lock(mutex);
  auto& slot = cache[{n, e}];
  if (!slot) {
    auto in =
        testing::make_peaked<float>(n, n, e, e,
                                    input_seed + static_cast<std::uint64_t>(n) +
                                        (e == head_dim ? 0 : static_cast<std::uint64_t>(e) << 32));
    slot = std::make_unique<problem>();
    slot->q = std::move(in.q);
    slot->k = std::move(in.k);
    slot->v = std::move(in.v);
  }
  return *slot;
}

/// The float64 exact output of problem (N, e), causal or not (computed on first call, never inside
/// a timed region).
inline const testing::matd& exact_output(index n, bool causal = false, index e = head_dim) {
  problem& p = get_problem(n, e);
  auto& slot = causal ? p.exact_causal : p.exact;
  if (!slot)
    slot = std::make_unique<testing::matd>(
        testing::reference_attention(p.q, p.k, p.v, {.causal = causal}));
  return *slot;
}

/// Sets the `flops` rate counter and, for small N, `rel_err` of `out` against the reference.
inline void report(benchmark::State& state, index n, double flops_per_call,
                   const matrix<float>* out, bool causal = false, index e = head_dim) {
  state.counters["flops"] =
      benchmark::Counter(flops_per_call, benchmark::Counter::kIsIterationInvariantRate);
  if (out && n <= max_n_with_error)
    state.counters["rel_err"] = testing::relative_error(*out, exact_output(n, causal, e));
  state.counters["N"] = static_cast<double>(n);
}

/// Times policy.compute on problem (N, e) (the front door's checks included, as a user would call
/// it).
template <attention_policy Policy, class FlopFn>
void run_kernel(benchmark::State& state, const Policy& policy, index n, FlopFn flops,
                const options& opt = {}, index e = head_dim) {
  problem& p = get_problem(n, e);
  if (n <= max_n_with_error) (void)exact_output(n, opt.causal, e);
  matrix<float> out(n, e);
  // Warm up (caches, page faults of first-touch scratch, clock ramp) for at least 0.1 s.
  const auto warm_until = std::chrono::steady_clock::now() + std::chrono::milliseconds(100);
  do attention(policy, p.q, p.k, p.v, view<float>(out), opt);
  while (std::chrono::steady_clock::now() < warm_until);
  for (auto _ : state) {
    attention(policy, p.q, p.k, p.v, view<float>(out), opt);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  report(state, n, static_cast<double>(flops(n)), &out, opt.causal, e);
}

inline constexpr index scaling_n = 4096;   // thread-scaling problem: B = 1, L = S = 4096,
inline constexpr index scaling_heads = 8;  // H = 8, through the multi-head driver

inline constexpr index one_head_n = 16384;  // one long head: B = H = 1, L = S = 16384

/// Times multihead_attention over q (1, n, heads, head_dim) and k, v (1, n, kv_heads, head_dim)
/// (grouped-query attention when kv_heads < heads: query head h attends with key/value head
/// h / (heads / kv_heads)) on `threads` threads (wall-clock time). Key/value head g holds the
/// keys and values of query head g (heads / kv_heads), so the grouped problem's heads are among
/// the full problem's.
template <attention_policy Policy>
void run_multihead(benchmark::State& state, const Policy& policy, int threads, index n = scaling_n,
                   index H = scaling_heads, index kv_heads = 0) {
  const index Hkv = kv_heads > 0 ? kv_heads : H, group = H / Hkv;
  // Inputs per (n, H, Hkv), built once per process.
  static std::map<std::array<index, 3>, std::array<std::vector<float>, 3>> cache;
  auto& buffers = cache[{n, H, Hkv}];
  if (buffers[0].empty()) {
    std::vector<float> q, k, v;
    q.resize(static_cast<std::size_t>(n * H * head_dim));
    k.resize(static_cast<std::size_t>(n * Hkv * head_dim));
    v.resize(k.size());
    for (index h = 0; h < H; ++h) {
      const auto in = testing::make_peaked<float>(n, n, head_dim, head_dim,
                                                  input_seed + 100 + static_cast<std::uint64_t>(h));
      const bool kv = h % group == 0;  // this head's keys and values are key/value head h / group
      for (index t = 0; t < n; ++t)
        for (index e = 0; e < head_dim; ++e) {
          q[static_cast<std::size_t>((t * H + h) * head_dim + e)] = in.q(t, e);
          if (!kv) continue;
          const auto at = static_cast<std::size_t>((t * Hkv + h / group) * head_dim + e);
          k[at] = in.k(t, e);
          v[at] = in.v(t, e);
        }
    }
    buffers = {std::move(q), std::move(k), std::move(v)};
  }
  std::vector<float> out(buffers[0].size());
  multihead_options opt;
  opt.threads = threads;
  const tensor_view<const float> q{buffers[0].data(), 1, n, H, head_dim},
      k{buffers[1].data(), 1, n, Hkv, head_dim}, v{buffers[2].data(), 1, n, Hkv, head_dim};
  for (auto _ : state) {
    multihead_attention(policy, q, k, v, tensor_view<float>{out.data(), 1, n, H, head_dim}, opt);
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["threads"] = threads;
}

/// Registers `<name>/N:<n>` for n = min_n, 2 min_n, ..., max_n.
template <attention_policy Policy, class FlopFn>
void register_series(std::string_view name, Policy policy, FlopFn flops) {
  for (index n = min_n; n <= max_n; n *= 2) {
    const std::string full = std::string(name) + "/N:" + std::to_string(n);
    benchmark::RegisterBenchmark(full.c_str(), [policy, flops, n](benchmark::State& state) {
      run_kernel(state, policy, n, flops);
    })->Unit(benchmark::kMillisecond);
  }
}

/// Registers the variant series `<name>/N:<n>/<suffix>` for n = min_n, ..., max_n (the contract
/// above:
/// `/causal`, `/window:<W>`, `/estimate`), with the options `opt`.
template <attention_policy Policy, class FlopFn>
void register_variant(std::string_view name, std::string_view suffix, Policy policy, FlopFn flops,
                      options opt = {}) {
  for (index n = min_n; n <= max_n; n *= 2) {
    const std::string full =
        std::string(name) + "/N:" + std::to_string(n) + "/" + std::string(suffix);
    benchmark::RegisterBenchmark(full.c_str(), [policy, flops, n, opt](benchmark::State& state) {
      run_kernel(state, policy, n, flops, opt);
    })->Unit(benchmark::kMillisecond);
  }
}

/// The head sizes of `<name>/N:<n>/E:<e>` (beside the contract's E = M = 64), at these N.
inline constexpr std::array<index, 4> other_head_dims{32, 80, 96, 128};
inline constexpr std::array<index, 3> head_dim_sizes{1024, 4096, 16384};

/// Registers `<name>/N:<n>/E:<e>` for the other head sizes (E = M = e), the policy's defaults.
template <attention_policy Policy>
void register_head_dims(std::string_view name, Policy policy) {
  for (const index n : head_dim_sizes)
    for (const index e : other_head_dims) {
      const std::string full =
          std::string(name) + "/N:" + std::to_string(n) + "/E:" + std::to_string(e);
      benchmark::RegisterBenchmark(full.c_str(), [policy, n, e](benchmark::State& state) {
        run_kernel(
            state, policy, n, [&](index size) { return work_of(policy, size, e); }, {}, e);
      })->Unit(benchmark::kMillisecond);
    }
}

/// Registers the thread-scaling pairs `multihead/<name>/threads:<1|2>` (B = 1, H = 8,
/// N = 4096: heads spread over the threads), `multihead/<name>/heads:1/threads:<1|2>` (B = H =
/// 1, N = 16384: one head split across the threads) and the grouped-query pair
/// `multihead/<name>/kv_heads:2/threads:<1|2>` (as the first pair with 2 key/value heads for the
/// 8 query heads: it should cost no more than the first pair).
template <attention_policy Policy, class FlopFn>
void register_multihead(std::string_view name, Policy policy, FlopFn flops) {
  struct shape {
    index heads, kv_heads;
    const char* suffix;
  };
  for (const shape sh : {shape{scaling_heads, 0, ""}, shape{1, 0, "/heads:1"},
                         shape{scaling_heads, 2, "/kv_heads:2"}})
    for (int threads : {1, 2}) {
      const index heads = sh.heads, kv_heads = sh.kv_heads;
      const index n = heads == 1 ? one_head_n : scaling_n;
      const std::string full =
          "multihead/" + std::string(name) + sh.suffix + "/threads:" + std::to_string(threads);
      benchmark::RegisterBenchmark(
          full.c_str(),
          [policy, flops, threads, n, heads, kv_heads](benchmark::State& state) {
            run_multihead(state, policy, threads, n, heads, kv_heads);
            state.counters["flops"] =
                benchmark::Counter(static_cast<double>(heads) * static_cast<double>(flops(n)),
                                   benchmark::Counter::kIsIterationInvariantRate);
          })
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
    }
}

/// Registers one point of a knob sweep, `sweep/<name>/<setting>/N:<n>` (for error_vs_time).
template <attention_policy Policy>
void register_sweep(std::string_view name, std::string_view setting, Policy policy,
                    index n = max_n_with_error) {
  const std::string full =
      "sweep/" + std::string(name) + "/" + std::string(setting) + "/N:" + std::to_string(n);
  benchmark::RegisterBenchmark(full.c_str(), [policy, n](benchmark::State& state) {
    run_kernel(state, policy, n, [&policy](index size) { return work_of(policy, size); });
  })->Unit(benchmark::kMillisecond);
}

/// Defined by bench_baselines.cpp, bench_kernels.cpp and bench_sweeps.cpp; called by main in
/// this order.
void register_fma_peak();
void register_kernels();
void register_baselines();
void register_kernels_multihead();
void register_sweeps();
void register_variants();
void register_mix();
void register_iid();  // bench_process.cpp

}  // namespace fastattn::bench
