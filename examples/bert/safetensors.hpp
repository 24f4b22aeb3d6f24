// A small, defensive reader and writer of the safetensors format
// (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes of
// JSON {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
// "__metadata__": {..}}, then the data buffer; offsets are relative to the buffer.
//
// Every problem (short file, bad JSON, unknown dtype, offsets out of the buffer or overlapping,
// byte size not matching dtype x shape, wrong dtype kind for the caller) throws
// fastattn::invalid_argument with one line naming the file (and tensor). Sizes are checked
// against the file size before anything is allocated.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include <fastattn/attention.hpp>

namespace fastattn::examples {

enum class st_dtype { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL };

inline std::size_t st_item_size(st_dtype d) {
  switch (d) {
    case st_dtype::F64:
    case st_dtype::I64:
      return 8;
    case st_dtype::F32:
    case st_dtype::I32:
      return 4;
    case st_dtype::F16:
    case st_dtype::BF16:
    case st_dtype::I16:
      return 2;
    default:
      return 1;
  }
}
inline const char* st_dtype_name(st_dtype d) {
  switch (d) {
    case st_dtype::F64:
      return "F64";
    case st_dtype::F32:
      return "F32";
    case st_dtype::F16:
      return "F16";
    case st_dtype::BF16:
      return "BF16";
    case st_dtype::I64:
      return "I64";
    case st_dtype::I32:
      return "I32";
    case st_dtype::I16:
      return "I16";
    case st_dtype::I8:
      return "I8";
    case st_dtype::U8:
      return "U8";
    default:
      return "BOOL";
  }
}
inline bool st_is_float(st_dtype d) {
  return d == st_dtype::F64 || d == st_dtype::F32 || d == st_dtype::F16 || d == st_dtype::BF16;
}

struct st_tensor_info {
  st_dtype dtype = st_dtype::F32;
  std::vector<index> shape;
  std::uint64_t begin = 0, end = 0;  ///< byte range inside the data buffer
  index numel() const {
    index n = 1;
    for (const index d : shape) n *= d;
    return n;
  }
};

inline std::string shape_to_string(const std::vector<index>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

namespace detail_st {

inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1fu;
  std::uint32_t mantissa = h & 0x3ffu;
  std::uint32_t bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        mantissa <<= 1;
      } while ((mantissa & 0x400u) == 0);
      bits = sign | (static_cast<std::uint32_t>(127 - 15 - e) << 23) | ((mantissa & 0x3ffu) << 13);
    }
  } else if (exponent == 31) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  return std::bit_cast<float>(bits);
}

template <class U>
U load_le(const unsigned char* p) {
  U value = 0;
  for (std::size_t i = 0; i < sizeof(U); ++i)
    value |= static_cast<U>(static_cast<U>(p[i]) << (8 * i));
  return value;
}

}  // namespace detail_st

/// An open safetensors file: the parsed, validated header; tensors are read on demand.
class safetensors_file {
 public:
  explicit safetensors_file(std::string path) : path_(std::move(path)) {
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path_, ec)) fail("cannot open: no such file");
    in_.open(path_, std::ios::binary);
    if (!in_) fail("cannot open for reading");
    in_.seekg(0, std::ios::end);
    const std::streamoff size = in_.tellg();
    in_.seekg(0);
    if (size < 0) fail("cannot determine the file size");
    const auto file_size = static_cast<std::uint64_t>(size);
    if (file_size < 8) fail("not a safetensors file: shorter than the 8-byte header length");
    unsigned char len_bytes[8];
    in_.read(reinterpret_cast<char*>(len_bytes), 8);
    const auto header_len = detail_st::load_le<std::uint64_t>(len_bytes);
    if (header_len > file_size - 8)
      fail("header length " + std::to_string(header_len) + " exceeds the file (" +
           std::to_string(file_size) + " bytes): not a safetensors file or truncated");
    if (header_len > (std::uint64_t{100} << 20)) fail("header larger than 100 MB");
    std::string text(static_cast<std::size_t>(header_len), '\0');
    in_.read(text.data(), static_cast<std::streamsize>(header_len));
    if (!in_) fail("read error in the header");
    data_start_ = 8 + header_len;
    const std::uint64_t buffer = file_size - data_start_;

    nlohmann::json header;
    try {
      header = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception&) {
      fail("header is not valid JSON (not a safetensors file?)");
    }
    if (!header.is_object()) fail("header is not a JSON object");
    std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges;
    for (const auto& [name, entry] : header.items()) {
      if (name == "__metadata__") continue;
      const std::string where = "tensor '" + name + "': ";
      if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") ||
          !entry.contains("data_offsets"))
        fail(where + "entry must be an object with dtype, shape and data_offsets");
      st_tensor_info info;
      const auto& dt = entry["dtype"];
      if (!dt.is_string()) fail(where + "dtype must be a string");
      info.dtype = parse_dtype(dt.get<std::string>(), where);
      const auto& shape = entry["shape"];
      if (!shape.is_array() || shape.size() > 16)
        fail(where + "shape must be an array of at most 16 sizes");
      std::uint64_t count = 1;
      bool empty = false;
      for (const auto& d : shape) {
        if (!d.is_number_unsigned()) fail(where + "shape entries must be non-negative integers");
        const auto v = d.get<std::uint64_t>();
        if (v > static_cast<std::uint64_t>(std::numeric_limits<index>::max()))
          fail(where + "shape entry too large");
        info.shape.push_back(static_cast<index>(v));
        if (v == 0) empty = true;
      }
      const auto& off = entry["data_offsets"];
      if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
          !off[1].is_number_unsigned())
        fail(where + "data_offsets must be [begin, end] with non-negative integers");
      info.begin = off[0].get<std::uint64_t>();
      info.end = off[1].get<std::uint64_t>();
      if (info.begin > info.end || info.end > buffer)
        fail(where + "data_offsets [" + std::to_string(info.begin) + ", " +
             std::to_string(info.end) + "] outside the data buffer of " + std::to_string(buffer) +
             " bytes (truncated file?)");
      const std::uint64_t bytes = info.end - info.begin;
      const std::uint64_t item = st_item_size(info.dtype);
      const std::uint64_t max_items = bytes / item;
      bool too_big = false;
      if (!empty) {
        for (const index d : info.shape) {
          const auto ud = static_cast<std::uint64_t>(d);
          if (count > max_items / ud) {  // count * d > what the byte range holds; no overflow
            too_big = true;
            break;
          }
          count *= ud;
        }
      } else {
        count = 0;
      }
      if (too_big || count * item != bytes)
        fail(where + "byte size " + std::to_string(bytes) + " does not match dtype " +
             st_dtype_name(info.dtype) + " and shape " + shape_to_string(info.shape));
      if (bytes > 0) ranges.emplace_back(info.begin, info.end);
      tensors_.emplace(name, std::move(info));
    }
    std::sort(ranges.begin(), ranges.end());
    for (std::size_t i = 1; i < ranges.size(); ++i)
      if (ranges[i].first < ranges[i - 1].second) fail("two tensors' data_offsets overlap");
  }

  const std::string& path() const { return path_; }
  bool contains(const std::string& name) const { return tensors_.count(name) > 0; }
  const std::map<std::string, st_tensor_info>& tensors() const { return tensors_; }

  const st_tensor_info& info(const std::string& name) const {
    const auto it = tensors_.find(name);
    if (it == tensors_.end()) fail("missing tensor '" + name + "'");
    return it->second;
  }

  /// Reads tensor `name` converted to T. Floating T accepts F64/F32/F16/BF16 tensors; integral T
  /// accepts integer and BOOL tensors. `expected` (if not empty) is the required shape.
  template <class T>
  std::vector<T> read(const std::string& name, const std::vector<index>& expected = {}) const {
    const st_tensor_info& t = info(name);
    if (!expected.empty() && t.shape != expected)
      fail("tensor '" + name + "' has shape " + shape_to_string(t.shape) + ", expected " +
           shape_to_string(expected));
    if constexpr (std::is_floating_point_v<T>) {
      if (!st_is_float(t.dtype))
        fail("tensor '" + name + "' has dtype " + st_dtype_name(t.dtype) +
             ", expected a floating-point dtype (F32, F16, BF16, F64)");
    } else {
      if (st_is_float(t.dtype))
        fail("tensor '" + name + "' has dtype " + st_dtype_name(t.dtype) +
             ", expected an integer dtype (I64, I32, ...)");
    }
    const std::uint64_t bytes = t.end - t.begin;
    std::vector<unsigned char> raw(static_cast<std::size_t>(bytes));
    in_.clear();
    in_.seekg(static_cast<std::streamoff>(data_start_ + t.begin));
    in_.read(reinterpret_cast<char*>(raw.data()), static_cast<std::streamsize>(bytes));
    if (!in_) fail("read error in tensor '" + name + "'");
    const std::size_t n = static_cast<std::size_t>(bytes / st_item_size(t.dtype));
    std::vector<T> out(n);
    const unsigned char* p = raw.data();
    for (std::size_t i = 0; i < n; ++i) {
      switch (t.dtype) {
        case st_dtype::F64:
          out[i] =
              static_cast<T>(std::bit_cast<double>(detail_st::load_le<std::uint64_t>(p + 8 * i)));
          break;
        case st_dtype::F32:
          out[i] =
              static_cast<T>(std::bit_cast<float>(detail_st::load_le<std::uint32_t>(p + 4 * i)));
          break;
        case st_dtype::F16:
          out[i] = static_cast<T>(
              detail_st::half_to_float(detail_st::load_le<std::uint16_t>(p + 2 * i)));
          break;
        case st_dtype::BF16:
          out[i] = static_cast<T>(std::bit_cast<float>(
              std::uint32_t{detail_st::load_le<std::uint16_t>(p + 2 * i)} << 16));
          break;
        case st_dtype::I64:
          out[i] = static_cast<T>(
              static_cast<std::int64_t>(detail_st::load_le<std::uint64_t>(p + 8 * i)));
          break;
        case st_dtype::I32:
          out[i] = static_cast<T>(
              static_cast<std::int32_t>(detail_st::load_le<std::uint32_t>(p + 4 * i)));
          break;
        case st_dtype::I16:
          out[i] = static_cast<T>(
              static_cast<std::int16_t>(detail_st::load_le<std::uint16_t>(p + 2 * i)));
          break;
        case st_dtype::I8:
          out[i] = static_cast<T>(static_cast<std::int8_t>(p[i]));
          break;
        case st_dtype::U8:
          out[i] = static_cast<T>(p[i]);
          break;
        case st_dtype::BOOL:
          out[i] = static_cast<T>(p[i] != 0);
          break;
      }
    }
    return out;
  }

  [[noreturn]] void fail(const std::string& problem) const {
    throw invalid_argument("fastattn: " + path_ + ": " + problem);
  }

 private:
  std::string path_;
  mutable std::ifstream in_;
  std::uint64_t data_start_ = 0;
  std::map<std::string, st_tensor_info> tensors_;

  st_dtype parse_dtype(const std::string& s, const std::string& where) const {
    static const std::map<std::string, st_dtype> known = {
        {"F64", st_dtype::F64},   {"F32", st_dtype::F32}, {"F16", st_dtype::F16},
        {"BF16", st_dtype::BF16}, {"I64", st_dtype::I64}, {"I32", st_dtype::I32},
        {"I16", st_dtype::I16},   {"I8", st_dtype::I8},   {"U8", st_dtype::U8},
        {"BOOL", st_dtype::BOOL}};
    const auto it = known.find(s);
    if (it == known.end())
      fail(where + "unsupported dtype '" + s +
           "' (supported: F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL)");
    return it->second;
  }
};

/// One tensor to write: F32, F64, I64 or I32 data in C order.
struct st_write_tensor {
  std::string name;
  st_dtype dtype = st_dtype::F32;
  std::vector<index> shape;
  std::vector<unsigned char> bytes;  ///< little-endian raw data

  template <class T>
  static st_write_tensor make(std::string name, std::vector<index> shape,
                              const std::vector<T>& data) {
    st_write_tensor t;
    t.name = std::move(name);
    t.shape = std::move(shape);
    if constexpr (std::is_same_v<T, float>)
      t.dtype = st_dtype::F32;
    else if constexpr (std::is_same_v<T, double>)
      t.dtype = st_dtype::F64;
    else if constexpr (std::is_same_v<T, std::int64_t>)
      t.dtype = st_dtype::I64;
    else if constexpr (std::is_same_v<T, std::int32_t>)
      t.dtype = st_dtype::I32;
    else
      static_assert(sizeof(T) == 0, "write F32, F64, I64 or I32");
    static_assert(std::endian::native == std::endian::little,
                  "writer assumes a little-endian host");
    t.bytes.resize(data.size() * sizeof(T));
    if (!data.empty()) std::memcpy(t.bytes.data(), data.data(), t.bytes.size());
    return t;
  }
};

/// Writes tensors as a safetensors file (header padded with spaces to 8 bytes, as the reference
/// implementation does).
inline void write_safetensors(const std::string& path,
                              const std::vector<st_write_tensor>& tensors) {
  nlohmann::json header = nlohmann::json::object();
  std::uint64_t offset = 0;
  for (const auto& t : tensors) {
    header[t.name] = {{"dtype", st_dtype_name(t.dtype)},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  std::string text = header.dump();
  while (text.size() % 8) text += ' ';
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw invalid_argument("fastattn: " + path + ": cannot open for writing");
  unsigned char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>((text.size() >> (8 * i)) & 0xff);
  out.write(reinterpret_cast<const char*>(len), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const auto& t : tensors)
    out.write(reinterpret_cast<const char*>(t.bytes.data()),
              static_cast<std::streamsize>(t.bytes.size()));
  out.close();
  if (!out) throw invalid_argument("fastattn: " + path + ": write error");
}

}  // namespace fastattn::examples
