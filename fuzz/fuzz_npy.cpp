// libFuzzer target: fastattn::io::read_npy / read_npy_header on arbitrary bytes (written to a
// per-process temporary file, since the reader takes a path). Only fastattn::invalid_argument may
// escape the reader; on success the data holds exactly product(shape) elements, and writing the
// array back and reading it again gives the same shape and bits.
//
// Header amplification: a few header bytes can declare a shape whose product is huge (or
// overflows 64 bits) over little or no data. The reader must refuse it before allocating: a
// header's element count times the item size never exceeds the data bytes the file holds, and a
// successful read never holds more elements than that (the seeds huge_*.npy start there).
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
void read_and_round_trip(const std::string& path, std::size_t file_size) {
  fastattn::io::npy_array<T> a;
  try {
    a = fastattn::io::read_npy<T>(path);
  } catch (const fastattn::invalid_argument&) {
    return;
  }
  // Every element came from at least 4 bytes of the file: nothing was amplified.
  if (a.data.size() > file_size / 4) violation("more elements than the file can hold");
  const auto count = fastattn::io::detail::checked_count(a.shape);
  if (!count || *count != a.data.size())
    violation("data size differs from the product of the shape");
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
    const std::uint64_t item = h.dtype == fastattn::io::npy_dtype::float32 ? 4 : 8;
    const auto count = fastattn::io::detail::checked_count(h.shape);
    if (!count || *count != h.count)
      violation("header count differs from the product of the shape");
    // The count was checked against the data before any product could overflow.
    if (h.count > (size - h.data_offset) / item) violation("header count exceeds the data bytes");
  } catch (const fastattn::invalid_argument&) {
  }
  read_and_round_trip<float>(path, size);
  read_and_round_trip<double>(path, size);
  return 0;
}
