// Exact attention on narrow bands, compiled for x86-64-v4 (AVX-512): the register shifts
// (valignd / valignq) and Eigen's 16 x 16 and 8 x 8 transposes, which the other test executables
// (no -march) do not take. Part of fastattn_test_native (tests/CMakeLists.txt).
#define FASTATTN_TEST_OWN_INSTANTIATIONS 1
#include "common.hpp"

#include "band_attention_cases.hpp"

#if !defined(__AVX512F__)
#error "test_native_band_attention is meant to be compiled with AVX-512 enabled"
#endif
