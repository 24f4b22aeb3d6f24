// The one translation unit that compiles the front door and the multi-head driver of every tested
// kernel (and the float64 oracle) for float and double; tests/common.hpp declares them `extern`
// in every other test file, so the kernels are compiled once per test executable, not once per
// test file.
#include "common.hpp"

FASTATTN_TEST_INSTANTIATE_ALL()
