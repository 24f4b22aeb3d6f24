// fastattn_bench entry point: registers every benchmark (in a fixed order, see bench_common.hpp)
// and runs them; everything runs on one thread unless a benchmark says otherwise.
#include <benchmark/benchmark.h>

#include <Eigen/Core>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "bench_common.hpp"

int main(int argc, char** argv) {
  Eigen::setNbThreads(1);  // Eigen's own GEMM parallelism off: one-thread figures
#if defined(_OPENMP)
  omp_set_num_threads(1);
#endif
  namespace bench = fastattn::bench;
  bench::register_fma_peak();
  bench::register_kernels();
  bench::register_variants();
  bench::register_iid();
  bench::register_baselines();
  bench::register_kernels_multihead();
  bench::register_sweeps();
  bench::register_mix();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
