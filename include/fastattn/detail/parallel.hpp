// Work split inside one head: when the multi-head driver has more threads than heads (one long
// sequence), a kernel runs its independent units (query blocks, clusters, hash blocks) on
// context::threads threads. Every unit computes exactly what it computes on one thread, from
// the executing thread's own arena and workspaces, so results are bit-identical on any thread
// count; units are handed out dynamically, which changes only who computes them.
#pragma once

#include <exception>

#include "../policy.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace fastattn::detail {

/// Runs body(i) for i in [0, count) on up to `threads` threads (in order on one). The bodies
/// must write disjoint memory and take their scratch inside (an `arena::scope` of the executing
/// thread). The first exception a body throws is rethrown after the loop.
template <class Body>
void parallel_for(int threads, index count, Body&& body) {
#if defined(_OPENMP)
  if (threads > 1 && count > 1) {
    std::exception_ptr error;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (index i = 0; i < count; ++i) {
      try {
        body(i);
      } catch (...) {
#pragma omp critical(fastattn_parallel_for_error)
        if (!error) error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#else
  (void)threads;
#endif
  for (index i = 0; i < count; ++i) body(i);
}

/// Runs first() and second(), two independent units, on up to `threads` threads (first, then
/// second, on one); the same rules as parallel_for.
template <class First, class Second>
void parallel_invoke(int threads, First&& first, Second&& second) {
  parallel_for(threads, 2, [&](index t) {
    if (t == 0)
      first();
    else
      second();
  });
}

}  // namespace fastattn::detail
