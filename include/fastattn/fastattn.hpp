// fastattn umbrella header: every kernel, the multi-head driver, and the list of kernels that
// the tools, tests, fuzzers and benchmarks iterate over.
#pragma once

#include "attention.hpp"
#include "banded.hpp"
#include "guarded.hpp"
#include "merge.hpp"
#include "multihead.hpp"
#include "policy.hpp"

// Kernels: one header each.
#include "clustered.hpp"
#include "dense.hpp"
#include "improved_clustered.hpp"
#include "local.hpp"
#include "smyrf.hpp"

namespace fastattn {

/// The built-in kernels, in the order tools list them. Adding a kernel: its header, its include
/// above, and its name here (README, "Adding a kernel").
using kernels = kernel_list<dense, local, clustered, improved_clustered, smyrf>;

}  // namespace fastattn
