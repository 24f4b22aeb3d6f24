// libFuzzer target: the BERT example's safetensors reader (examples/bert/safetensors.hpp) on
// arbitrary bytes (written to a per-process temporary file, since it takes a path). Only
// fastattn::invalid_argument may escape; every tensor the header declares is then read as float,
// double and int64 (the kind that does not match must throw invalid_argument), and a successful
// read holds exactly the element count the shape gives.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <unistd.h>
#include <vector>

#include "safetensors.hpp"

namespace fe = fastattn::examples;

namespace {

[[noreturn]] void violation(const char* what) {
  std::fprintf(stderr, "fuzz_safetensors: property violated: %s\n", what);
  std::abort();
}

template <class T>
void read_one(const fe::safetensors_file& f, const std::string& name,
              const fe::st_tensor_info& info) {
  std::vector<T> values;
  try {
    values = f.read<T>(name);
  } catch (const fastattn::invalid_argument&) {
    return;
  }
  const std::uint64_t bytes = info.end - info.begin;
  if (values.size() != bytes / fe::st_item_size(info.dtype)) violation("element count mismatch");
  std::uint64_t count = 1;
  for (const auto d : info.shape) count *= static_cast<std::uint64_t>(d);  // fits: checked
  if (!values.empty() && count != values.size()) violation("shape and element count disagree");
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
    const fe::safetensors_file f(path);
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
