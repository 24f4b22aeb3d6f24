// Test helper: load a .npy fixture into a plain {shape, data} struct (thin wrapper over
// fastattn::io::read_npy, which throws fastattn::invalid_argument on any malformed file).
#pragma once

#include <algorithm>
#include <string>
#include <vector>

#include <fastattn/io/npy.hpp>

namespace fastattn::testing {

/// shape in C order and the data converted to T (the file may hold float32 or float64).
template <class T>
struct npy_data {
  std::vector<index> shape;
  std::vector<T> data;
};

template <class T>
npy_data<T> load_npy(const std::string& path) {
  io::npy_array<T> a = io::read_npy<T>(path);
  return npy_data<T>{std::move(a.shape), std::move(a.data)};
}

/// A 2-d array as a row-major matrix; throws fastattn::invalid_argument for other ranks.
template <class T>
matrix<T> as_matrix(const npy_data<T>& a) {
  if (a.shape.size() != 2)
    io::detail::raise(
        "a", "as_matrix needs a 2-d array, got " + std::to_string(a.shape.size()) + " dimensions");
  matrix<T> m(a.shape[0], a.shape[1]);
  std::copy(a.data.begin(), a.data.end(), m.data());
  return m;
}

}  // namespace fastattn::testing
