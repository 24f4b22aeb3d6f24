// libFuzzer target: fastattn::io's safetensors reader (include/fastattn/io/safetensors.hpp) on
// arbitrary bytes (written to a per-process temporary file, since it takes a path). Only
// fastattn::invalid_argument may escape; every tensor the header declares is then read as float,
// double and int64 (the kind that does not match must throw invalid_argument), and a successful
// read holds exactly the element count the shape gives.
//
// Header cost: the header is parsed as a stream with a nesting bound (64); the seeds deep_*
// nest "__metadata__" and unknown keys of tensor entries around that bound, so the fuzzer explores
// nesting (a header of deep nesting must be refused quickly, with bounded memory: libFuzzer's
// -rss_limit_mb and -timeout catch a regression).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <type_traits>
#include <unistd.h>
#include <vector>

#include <fastattn/io/safetensors.hpp>

namespace fio = fastattn::io;

namespace {

[[noreturn]] void violation(const char* what) {
  std::fprintf(stderr, "fuzz_safetensors: property violated: %s\n", what);
  std::abort();
}

template <class T>
void read_one(const fio::safetensors_file& f, const std::string& name,
              const fio::st_tensor_info& info) {
  std::vector<T> values;
  try {
    values = f.read<T>(name);
  } catch (const fastattn::invalid_argument&) {
    return;
  }
  const std::uint64_t bytes = info.end - info.begin;
  if (values.size() != bytes / fio::st_item_size(info.dtype)) violation("element count mismatch");
  const auto count = fio::detail::checked_count(info.shape);
  if (!count || *count != values.size()) violation("shape and element count disagree");
  if (static_cast<std::uint64_t>(info.numel()) != values.size()) violation("numel disagrees");
  if constexpr (std::is_floating_point_v<T>) {
    bool finite = true;
    for (const T x : values) finite = finite && std::isfinite(x);
    try {
      (void)f.read_finite<T>(name);
      if (!finite) violation("read_finite accepted a non-finite value");
    } catch (const fastattn::invalid_argument&) {
      if (finite) violation("read_finite refused finite values");
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const std::string path =
      "/tmp/fastattn_fuzz_safetensors_" + std::to_string(::getpid()) + ".safetensors";
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  }
  try {
    const fio::safetensors_file f(path);
    for (const auto& [name, info] : f.tensors()) {
      if (!f.contains(name)) violation("listed tensor not found");
      read_one<float>(f, name, info);
      read_one<double>(f, name, info);
      read_one<std::int64_t>(f, name, info);
    }
    (void)f.read<float>("no such tensor");
    violation("a missing tensor was read");
  } catch (const fastattn::invalid_argument&) {
  }
  return 0;
}
