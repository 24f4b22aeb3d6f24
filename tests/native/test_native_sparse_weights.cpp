// Dropped negligible weights in the exact rows, compiled for x86-64-v4 (AVX-512): the build's
// other test executables take flash::list_weighed's scalar path (no -march), this one its
// compress path. Built only where the configuring host runs AVX-512 (tests/CMakeLists.txt).
// Not linked with instantiate.cpp (other flags): this file instantiates what it uses.
#define FASTATTN_TEST_OWN_INSTANTIATIONS 1
#include "common.hpp"

#include "sparse_weights_cases.hpp"

#if !defined(__AVX512F__)
#error "test_native_sparse_weights is meant to be compiled with AVX-512 enabled"
#endif
