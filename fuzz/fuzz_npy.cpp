// libFuzzer target: fastattn::io::read_npy / read_npy_header on arbitrary bytes (written to a
// per-process temporary file, since the reader takes a path). Only fastattn::invalid_argument may
// escape the reader; on success the data holds exactly product(shape) elements, and writing the
// array back and reading it again gives the same shape and bits.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <unistd.h>
#include <vector>

#include <fastattn/io/npy.hpp>

namespace {

const std::string& temp_path(const char* suffix) {
  static const std::string base = "/tmp/fastattn_fuzz_npy_" + std::to_string(::getpid());
  static std::string paths[2] = {base + "_in.npy", base + "_out.npy"};
  return suffix[0] == 'i' ? paths[0] : paths[1];
}

[[noreturn]] void violation(const char* what) {
  std::fprintf(stderr, "fuzz_npy: property violated: %s\n", what);
  std::abort();
}

template <class T>
void read_and_round_trip(const std::string& path) {
  fastattn::io::npy_array<T> a;
  try {
    a = fastattn::io::read_npy<T>(path);
  } catch (const fastattn::invalid_argument&) {
    return;
  }
  std::uint64_t count = 1;
  for (const auto d : a.shape) count *= static_cast<std::uint64_t>(d);
  if (count != a.data.size()) violation("data size differs from the product of the shape");
  const std::string& out = temp_path("out");
  fastattn::io::write_npy<T>(out, a.shape, a.data);
  const auto b = fastattn::io::read_npy<T>(out);
  if (b.shape != a.shape) violation("round trip changed the shape");
  if (b.data.size() != a.data.size() ||
      (!a.data.empty() &&
       std::memcmp(a.data.data(), b.data.data(), a.data.size() * sizeof(T)) != 0))
    violation("round trip changed the data");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string& path = temp_path("in");
  {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  }
  try {
    const auto h = fastattn::io::read_npy_header(path);
    if (h.data_offset > size) violation("data offset beyond the file");
  } catch (const fastattn::invalid_argument&) {
  }
  read_and_round_trip<float>(path);
  read_and_round_trip<double>(path);
  return 0;
}
