// Dropped negligible weights in the exact rows, with the build's flags (see
// sparse_weights_cases.hpp).
#include "common.hpp"

#include "sparse_weights_cases.hpp"
