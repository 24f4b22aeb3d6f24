// Peak memory of one dense attention call beyond its inputs and output, read from the process's
// high-water mark (ru_maxrss) before and after the call.
//   fastattn_memory [N]   (default 32768; E = M = 64, float)
#include <sys/resource.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include <fastattn/dense.hpp>

#include "reference.hpp"

namespace {
double max_rss_mib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) / 1024.0;  // ru_maxrss is in KiB on Linux
}
}  // namespace

int main(int argc, char** argv) {
  const fastattn::index n = argc > 1 ? std::stol(argv[1]) : 32768, d = 64;
  Eigen::setNbThreads(1);
  const auto in = fastattn::testing::make_peaked<float>(n, n, d, d, 1);
  fastattn::matrix<float> out =
      fastattn::matrix<float>::Zero(n, d);  // touched: counted in baseline
  const double before = max_rss_mib();
  fastattn::attention(fastattn::dense{}, in.q, in.k, in.v, fastattn::view<float>(out));
  const double after = max_rss_mib();
  const double inputs = 4.0 * static_cast<double>(n * d) * 4.0 / (1024.0 * 1024.0);
  const double naive = static_cast<double>(n) * static_cast<double>(n) * 4.0 / (1024.0 * 1024.0);
  std::printf(
      "dense N=%ld: peak extra memory %.1f MiB (inputs + output %.1f MiB; an L x S float "
      "matrix would be %.0f MiB)\n",
      static_cast<long>(n), after - before, inputs, naive);
  return out.allFinite() ? 0 : 1;
}
