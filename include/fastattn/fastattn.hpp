// fastattn umbrella header: every kernel and the multi-head driver.
#pragma once

#include "attention.hpp"
#include "clustered.hpp"
#include "dense.hpp"
#include "improved_clustered.hpp"
#include "multihead.hpp"
#include "smyrf.hpp"
