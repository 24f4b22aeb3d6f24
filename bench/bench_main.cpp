// fastattn_bench entry point: everything runs on one thread unless a benchmark says otherwise.
#include <benchmark/benchmark.h>

#include <Eigen/Core>

#if defined(_OPENMP)
#include <omp.h>
#endif

int main(int argc, char** argv) {
  Eigen::setNbThreads(1);  // Eigen's own GEMM parallelism off: one-thread figures
#if defined(_OPENMP)
  omp_set_num_threads(1);
#endif
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
