// The error-versus-time frontier on a layer with real structure, `mix/<kernel>/<setting>`: one
// layer of 8 heads, N = 4096, E = M = 64, float, one thread, the same inputs for every setting:
// - heads 0 and 1 are neighbour-offset heads (tests/reference.hpp: query i attends to keys i - 1
//   and i + 1; their queries are multiplied by sqrt(64) so that the layer's one scale, 1/8, gives
//   them their scores): what trained models learn in their first layers;
// - heads 2 to 7 are content-clustered heads (peaked inputs around 16 centres, as the kernel
//   benchmarks).
// Counters: `rel_err`, the layer's relative error ||O - O_exact||_F / ||O_exact||_F over all heads;
// `worst_head`, the largest head's relative error; `fell_back`, the heads guarded<P> recomputed
// exactly. The exact output is float64 dense attention, computed once outside the timed region.
// Settings: each kernel's defaults, a larger setting of each, and the defaults with an exact band
// of 2 keys (banded<P>), with a guard at 0.1 (guarded<P>), and with both.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "bench_common.hpp"

namespace fastattn::bench {

namespace {

inline constexpr index mix_n = 4096;
inline constexpr index mix_heads = 8;
inline constexpr index mix_offset_heads = 2;

struct layer {
  std::vector<matrix<float>> q, k, v;
  std::vector<testing::matd> exact;
};

const layer& mix_layer() {
  static const layer l = [] {
    layer out;
    for (index h = 0; h < mix_heads; ++h) {
      const auto seed = input_seed + 500 + static_cast<std::uint64_t>(h);
      auto in = h < mix_offset_heads
                    ? testing::make_neighbour<float>(mix_n, seed)
                    : testing::make_peaked<float>(mix_n, mix_n, head_dim, head_dim, seed);
      if (h < mix_offset_heads) in.q *= std::sqrt(static_cast<float>(head_dim));
      const matrix<double> qd = in.q.cast<double>(), kd = in.k.cast<double>(),
                           vd = in.v.cast<double>();
      out.exact.emplace_back(attention(dense{}, qd, kd, vd));
      out.q.push_back(std::move(in.q));
      out.k.push_back(std::move(in.k));
      out.v.push_back(std::move(in.v));
    }
    return out;
  }();
  return l;
}

template <attention_policy Policy>
void run_layer(benchmark::State& state, const Policy& policy) {
  const layer& l = mix_layer();
  std::vector<matrix<float>> out(static_cast<std::size_t>(mix_heads),
                                 matrix<float>(mix_n, head_dim));
  error_estimate report[1];
  index fell_back = 0;
  auto run_all = [&] {
    fell_back = 0;
    for (index h = 0; h < mix_heads; ++h) {
      const auto i = static_cast<std::size_t>(h);
      if constexpr (fastattn::is_guarded<Policy>) {
        Policy p = policy;
        p.report = report;
        attention(p, l.q[i], l.k[i], l.v[i], view<float>(out[i]));
        fell_back += report[0].fell_back ? 1 : 0;
      } else {
        attention(policy, l.q[i], l.k[i], l.v[i], view<float>(out[i]));
      }
    }
  };
  run_all();  // warm-up
  for (auto _ : state) {
    run_all();
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  double diff = 0, norm = 0, worst = 0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    const double d = (out[i].cast<double>() - l.exact[i]).squaredNorm(),
                 x = l.exact[i].squaredNorm();
    diff += d;
    norm += x;
    worst = std::max(worst, std::sqrt(d / x));
  }
  state.counters["rel_err"] = std::sqrt(diff / norm);
  state.counters["worst_head"] = worst;
  state.counters["fell_back"] = static_cast<double>(fell_back);
  state.counters["N"] = static_cast<double>(mix_n);
}

template <attention_policy Policy>
void register_mix(std::string_view kernel, std::string_view setting, const Policy& policy) {
  const std::string full = "mix/" + std::string(kernel) + "/" + std::string(setting);
  benchmark::RegisterBenchmark(full.c_str(), [policy](benchmark::State& state) {
    run_layer(state, policy);
  })->Unit(benchmark::kMillisecond);
}

/// P's defaults, with a band of 2, with a guard at 0.1, with both.
template <attention_policy P>
void register_compositions(const P& p) {
  constexpr index window = 2;
  constexpr double tolerance = 0.1;
  register_mix(P::name, "defaults", p);
  register_mix(P::name, "window:2", banded<P>{.inner = p, .window = window});
  register_mix(P::name, "max_error:0.1", guarded<P>{.inner = p, .tolerance = tolerance});
  register_mix(P::name, "window:2,max_error:0.1",
               guarded<banded<P>>{.inner = {.inner = p, .window = window}, .tolerance = tolerance});
}

}  // namespace

void register_mix() {
  register_mix("dense", "defaults", dense{});
  register_mix("local", "window:16", local{});
  register_compositions(clustered{});
  register_mix("clustered", "clusters:400", clustered{.clusters = 400});
  register_compositions(improved_clustered{});
  register_mix("improved_clustered", "clusters:200,topk:256",
               improved_clustered{.clusters = 200, .topk = 256});
  register_compositions(smyrf{});
  register_mix("smyrf", "hashes:4,cluster_size:256", smyrf{.hashes = 4, .cluster_size = 256});
}

}  // namespace fastattn::bench
