// Exact attention on narrow bands (local's window), with the build's flags (see
// band_attention_cases.hpp).
#include "common.hpp"

#include "band_attention_cases.hpp"
