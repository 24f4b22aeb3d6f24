// Every kernel of `fastattn::kernels` with its policy defaults: `<kernel>/N:<N>` over
// N = 256 ... 32768 and the multi-head pairs `multihead/<kernel>/...` (register_multihead). A
// kernel added to the list is benchmarked without edits here (its flop model: work.hpp).
#include "bench_common.hpp"

namespace fastattn::bench {

void register_kernels() {
  kernels::for_each([](auto type) {
    using Policy = typename decltype(type)::type;
    register_series(Policy::name, Policy{}, [](index n) { return work_of(Policy{}, n); });
  });
}

void register_kernels_multihead() {
  kernels::for_each([](auto type) {
    using Policy = typename decltype(type)::type;
    register_multihead(Policy::name, Policy{}, [](index n) { return work_of(Policy{}, n); });
  });
}

}  // namespace fastattn::bench
