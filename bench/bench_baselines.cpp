// dense's baselines and floors: dense_naive (what a user would write: softmax over an L x S
// matrix), gemm_bound (the two products dense contains, same shapes and tiling, no softmax) and
// fma_peak (this core's fp32 fused multiply-add limit). dense itself is registered with every
// other kernel (bench_kernels.cpp).
#include <algorithm>
#include <cmath>
#include <string>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "bench_common.hpp"

namespace fastattn::bench {
namespace {

void dense_naive(benchmark::State& state, index n) {
  problem& p = get_problem(n);
  if (n <= max_n_with_error) (void)exact_output(n);
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  matrix<float> scores(n, n), out(n, head_dim);
  for (auto _ : state) {
    scores.noalias() = (p.q * scale) * p.k.transpose();
    const Eigen::VectorXf row_max = scores.rowwise().maxCoeff();
    scores = (scores.colwise() - row_max).array().exp();
    const Eigen::VectorXf row_sum = scores.rowwise().sum();
    out.noalias() = scores * p.v;
    out.array().colwise() /= row_sum.array();
    benchmark::DoNotOptimize(out.data());
  }
  report(state, n, exact_work(n), &out);
}

// Exactly dense's loop structure and products (same query and key blocks, same expressions),
// without the softmax: the floor dense attention cannot beat with these products.
void gemm_bound(benchmark::State& state, index n) {
  problem& p = get_problem(n);
  const dense tiling{};
  const index bq = tiling.query_block, bk = tiling.key_block;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  matrix<float> scaled_q(bq, head_dim), scores(bq, bk), acc(bq, head_dim), out(n, head_dim);
  for (auto _ : state) {
    for (index i0 = 0; i0 < n; i0 += bq) {
      const index rows = std::min(bq, n - i0);
      scaled_q.topRows(rows) = p.q.middleRows(i0, rows) * scale;
      acc.topRows(rows).setZero();
      for (index j0 = 0; j0 < n; j0 += bk) {
        const index cols = std::min(bk, n - j0);
        scores.topLeftCorner(rows, cols).noalias() =
            scaled_q.topRows(rows) * p.k.middleRows(j0, cols).transpose();
        acc.topRows(rows).noalias() += scores.topLeftCorner(rows, cols) * p.v.middleRows(j0, cols);
      }
      out.middleRows(i0, rows) = acc.topRows(rows);
    }
    benchmark::DoNotOptimize(out.data());
  }
  report(state, n, exact_work(n), nullptr);
}

// A register-only loop of independent fused multiply-adds: this core's fp32 peak.
void fma_peak(benchmark::State& state) {
  constexpr int chains = 16;  // enough independent chains to cover FMA latency x 2 ports
  constexpr long steps = 1 << 20;
#if defined(__AVX512F__)
  constexpr int lanes = 16;
  __m512 acc[chains];
  for (int c = 0; c < chains; ++c) acc[c] = _mm512_set1_ps(static_cast<float>(c) * 1e-3f);
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (auto _ : state) {
    for (long s = 0; s < steps; ++s)
      for (int c = 0; c < chains; ++c) acc[c] = _mm512_fmadd_ps(acc[c], a, b);
    for (int c = 0; c < chains; ++c) benchmark::DoNotOptimize(acc[c]);
  }
#elif defined(__AVX2__) && defined(__FMA__)
  constexpr int lanes = 8;
  __m256 acc[chains];
  for (int c = 0; c < chains; ++c) acc[c] = _mm256_set1_ps(static_cast<float>(c) * 1e-3f);
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (auto _ : state) {
    for (long s = 0; s < steps; ++s)
      for (int c = 0; c < chains; ++c) acc[c] = _mm256_fmadd_ps(acc[c], a, b);
    for (int c = 0; c < chains; ++c) benchmark::DoNotOptimize(acc[c]);
  }
#else
  constexpr int lanes = 1;
  float acc[chains];
  for (int c = 0; c < chains; ++c) acc[c] = static_cast<float>(c) * 1e-3f;
  for (auto _ : state) {
    for (long s = 0; s < steps; ++s)
      for (int c = 0; c < chains; ++c) acc[c] = std::fma(acc[c], 0.999999f, 1e-7f);
    for (int c = 0; c < chains; ++c) benchmark::DoNotOptimize(acc[c]);
  }
#endif
  state.counters["flops"] = benchmark::Counter(2.0 * lanes * chains * static_cast<double>(steps),
                                               benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

void register_fma_peak() {
  benchmark::RegisterBenchmark("fma_peak", fma_peak)->Unit(benchmark::kMillisecond);
}

void register_baselines() {
  for (index n = min_n; n <= max_n; n *= 2)
    benchmark::RegisterBenchmark(("gemm_bound/N:" + std::to_string(n)).c_str(),
                                 [n](benchmark::State& s) { gemm_bound(s, n); })
        ->Unit(benchmark::kMillisecond);
  for (index n = min_n; n <= 8192; n *= 2)
    benchmark::RegisterBenchmark(("dense_naive/N:" + std::to_string(n)).c_str(),
                                 [n](benchmark::State& s) { dense_naive(s, n); })
        ->Unit(benchmark::kMillisecond);
}

}  // namespace fastattn::bench
