// A small, defensive reader and writer of the safetensors format
// (https://github.com/huggingface/safetensors), the format Hugging Face weights ship in: 8-byte
// little-endian header length N, N bytes of JSON
//   {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {..}}
// then the data buffer; offsets are relative to the buffer.
//
// Opt-in: not included by fastattn.hpp, and it needs nlohmann/json (Debian: nlohmann-json3-dev;
// CMake: find_package(nlohmann_json 3) and link nlohmann_json::nlohmann_json).
//
// Every problem (not a regular file, short file, bad JSON, unknown dtype, offsets out of the buffer
// or overlapping, byte size not matching dtype x shape, wrong dtype kind for the caller, a
// non-finite weight when finite values are required) throws fastattn::invalid_argument with one
// line naming the file and the tensor(s). Only regular files are read: a directory, FIFO or device
// is refused, naming it, before it is opened.
//
// Bounds on what a header may cost (a hostile header cannot exhaust memory or time):
// - the header is at most 100 MiB and must fit in the file; it is read once into memory;
// - it is parsed as a stream (nlohmann's SAX interface), never into a JSON document: only the
//   tensor table is kept (per tensor its name, dtype, shape of at most 16 extents and offsets),
//   so memory stays within a small multiple of the header's size; "__metadata__" and keys the
//   format does not define are skipped without being stored;
// - JSON nesting deeper than 64 levels is refused (safetensors headers nest 3 levels; the
//   metadata is a flat map of strings), in time linear in the bytes read up to that point;
// - every product of extents and byte counts is overflow-checked against the data buffer.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>
#include <nlohmann/json.hpp>

#include "../attention.hpp"
#include "common.hpp"

namespace fastattn::io {

/// The element types of the format that the reader knows (its dtype strings, same spelling).
enum class st_dtype { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL };

/// Bytes per element of `d` (BOOL: 1).
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
/// The format's name of `d`: "F64", "F32", ..., "BOOL".
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
/// Whether `d` is a floating-point dtype (F64, F32, F16, BF16).
inline bool st_is_float(st_dtype d) {
  return d == st_dtype::F64 || d == st_dtype::F32 || d == st_dtype::F16 || d == st_dtype::BF16;
}

/// "[2, 3]": a shape for messages.
inline std::string shape_to_string(std::span<const index> shape) {
  return "[" + detail::join_extents(shape) + "]";
}

/// One tensor of an opened file's header: dtype, shape and where its bytes are.
struct st_tensor_info {
  st_dtype dtype = st_dtype::F32;    ///< element type
  std::vector<index> shape;          ///< extents, each >= 0 (at most 16 when read)
  std::uint64_t begin = 0, end = 0;  ///< byte range inside the data buffer
  /// Number of elements (zero when an extent is zero). For a tensor of a file the reader
  /// accepted it always fits; otherwise a count beyond an index throws invalid_argument.
  index numel() const {
    const auto n =
        detail::checked_count(shape, static_cast<std::uint64_t>(std::numeric_limits<index>::max()));
    if (!n)
      detail::raise("shape", "shape " + shape_to_string(shape) +
                                 " has more elements than an index can count");
    return static_cast<index>(*n);
  }
};

namespace detail {

/// Header nesting bound (see the header comment).
inline constexpr int st_max_depth = 64;
/// Most extents a tensor's shape may have.
inline constexpr std::size_t st_max_rank = 16;
/// Largest header accepted, in bytes.
inline constexpr std::uint64_t st_max_header = std::uint64_t{100} << 20;

template <class U>
U load_le(const unsigned char* p) {
  U value = 0;
  for (std::size_t i = 0; i < sizeof(U); ++i)
    value |= static_cast<U>(static_cast<U>(p[i]) << (8 * i));
  return value;
}

inline std::optional<st_dtype> st_parse_dtype(const std::string& s) {
  static const std::map<std::string, st_dtype> known = {
      {"F64", st_dtype::F64},   {"F32", st_dtype::F32}, {"F16", st_dtype::F16},
      {"BF16", st_dtype::BF16}, {"I64", st_dtype::I64}, {"I32", st_dtype::I32},
      {"I16", st_dtype::I16},   {"I8", st_dtype::I8},   {"U8", st_dtype::U8},
      {"BOOL", st_dtype::BOOL}};
  const auto it = known.find(s);
  if (it == known.end()) return std::nullopt;
  return it->second;
}

/// "nan", "-inf", "1e+300": a value for messages.
inline std::string value_text(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%.9g", x);
  return buffer;
}

/// Streaming parser of a safetensors header (an nlohmann SAX handler): builds the tensor table
/// and nothing else, checks the schema as it goes, bounds the nesting depth, and throws
/// invalid_argument (via `fail`) at the first problem.
class st_header_parser {
 public:
  struct entry {
    std::string name;
    std::optional<st_dtype> dtype;
    bool have_shape = false, have_offsets = false;
    std::vector<index> shape;
    std::vector<std::uint64_t> offsets;
  };

  st_header_parser(const std::string& path, std::uint64_t buffer,
                   std::map<std::string, st_tensor_info>& tensors)
      : path_(path), buffer_(buffer), tensors_(tensors) {}

  // --- nlohmann::json_sax interface ---
  bool null() { return scalar("null"); }
  bool boolean(bool) { return scalar("a boolean"); }
  bool number_integer(std::int64_t) { return scalar("a negative integer"); }
  bool number_unsigned(std::uint64_t value) {
    if (skipping()) return true;
    if (state_ == state::shape) {
      if (entry_.shape.size() >= st_max_rank)
        fail_entry("shape has more than " + std::to_string(st_max_rank) + " extents");
      if (value > static_cast<std::uint64_t>(std::numeric_limits<index>::max()))
        fail_entry("shape extent " + std::to_string(value) + " is too large");
      entry_.shape.push_back(static_cast<index>(value));
      return true;
    }
    if (state_ == state::offsets) {
      if (entry_.offsets.size() >= 2)
        fail_entry("data_offsets must be [begin, end] with non-negative integers");
      entry_.offsets.push_back(value);
      return true;
    }
    return scalar("a number");
  }
  bool number_float(double, const std::string&) { return scalar("a non-integer number"); }
  bool string(std::string& value) {
    if (skipping()) return true;
    if (state_ == state::field && field_ == field::dtype) {
      entry_.dtype = st_parse_dtype(value);
      if (!entry_.dtype)
        fail_entry("unsupported dtype '" + printable(value, 40) +
                   "' (supported: F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL)");
      state_ = state::entry;
      return true;
    }
    return scalar("a string");
  }
  bool binary(nlohmann::json::binary_t&) { return scalar("binary data"); }

  bool start_object(std::size_t) {
    enter();
    if (skipping()) return true;
    switch (state_) {
      case state::start:
        state_ = state::root;
        return true;
      case state::value:  // a tensor entry
        state_ = state::entry;
        return true;
      default:
        return scalar("an object");
    }
  }
  bool key(std::string& name) {
    if (skipping()) return true;
    if (state_ == state::root) {
      if (name == "__metadata__") {
        skip_value();
        return true;
      }
      if (tensors_.count(name) > 0)
        fail("tensor '" + printable(name) + "' is listed twice in the header");
      entry_ = entry{};
      entry_.name = name;
      state_ = state::value;
      return true;
    }
    // state::entry: a field of a tensor entry
    if (name == "dtype") {
      if (entry_.dtype) fail_entry("duplicate key 'dtype'");
      field_ = field::dtype;
      state_ = state::field;
    } else if (name == "shape") {
      if (entry_.have_shape) fail_entry("duplicate key 'shape'");
      field_ = field::shape;
      state_ = state::field;
    } else if (name == "data_offsets") {
      if (entry_.have_offsets) fail_entry("duplicate key 'data_offsets'");
      field_ = field::offsets;
      state_ = state::field;
    } else {
      skip_value();  // keys the format does not define are ignored
    }
    return true;
  }
  bool end_object() {
    leave();
    if (skip_) return end_skipped();
    if (state_ == state::entry) {
      finish_entry();
      state_ = state::root;
    } else {  // the root object
      state_ = state::done;
    }
    return true;
  }
  bool start_array(std::size_t) {
    enter();
    if (skipping()) return true;
    if (state_ == state::field && field_ == field::shape) {
      entry_.have_shape = true;
      state_ = state::shape;
      return true;
    }
    if (state_ == state::field && field_ == field::offsets) {
      entry_.have_offsets = true;
      state_ = state::offsets;
      return true;
    }
    return scalar("an array");
  }
  bool end_array() {
    leave();
    if (skip_) return end_skipped();
    state_ = state::entry;  // the end of shape or data_offsets
    return true;
  }
  bool parse_error(std::size_t position, const std::string&, const nlohmann::json::exception&) {
    fail("header is not valid JSON (at byte " + std::to_string(position) +
         " of the header; not a safetensors file?)");
  }

 private:
  enum class state { start, root, value, entry, field, shape, offsets, done };
  enum class field { dtype, shape, offsets };

  const std::string& path_;
  std::uint64_t buffer_;
  std::map<std::string, st_tensor_info>& tensors_;
  state state_ = state::start;
  field field_ = field::dtype;
  entry entry_;
  int depth_ = 0;
  bool skip_ = false;           ///< a value is being skipped
  int skip_depth_ = 0;          ///< the depth of the key whose value is skipped
  bool in_metadata_ = false;    ///< the skipped value is "__metadata__"'s
  state resume_ = state::root;  ///< the state after the skipped value

  [[noreturn]] void fail(const std::string& problem) const { io::detail::fail(path_, problem); }
  [[noreturn]] void fail_entry(const std::string& problem) const {
    fail("tensor '" + printable(entry_.name) + "': " + problem);
  }

  bool skipping() const { return skip_ && depth_ > skip_depth_; }
  void enter() {
    if (++depth_ <= st_max_depth) return;
    std::string where;
    if (skip_ && in_metadata_)
      where = " in '__metadata__'";
    else if (skip_ || state_ != state::root)
      where = " in tensor '" + printable(entry_.name) + "'";
    fail("header JSON nests deeper than " + std::to_string(st_max_depth) + " levels" + where +
         "; refused (a safetensors header nests 3 levels, its metadata is a flat map of strings)");
  }
  void leave() { --depth_; }
  /// The next value is skipped: a scalar at once, an object or array up to its end.
  void skip_value() {
    in_metadata_ = state_ == state::root;
    skip_ = true;
    skip_depth_ = depth_;
    resume_ = state_;
    state_ = state::start;  // unused while skipping; replaced by resume_ at the end
  }
  /// Called for scalars: either the end of a skipped scalar, or a schema error.
  bool scalar(const char* what) {
    if (skipping()) return true;
    if (skip_) {  // a skipped scalar value
      end_skip();
      return true;
    }
    switch (state_) {
      case state::start:
        fail("header is not a JSON object");
      case state::value:
        fail_entry("entry must be an object with dtype, shape and data_offsets, got " +
                   std::string(what));
      case state::field:
        if (field_ == field::dtype) fail_entry("dtype must be a string, got " + std::string(what));
        if (field_ == field::shape)
          fail_entry("shape must be an array of at most " + std::to_string(st_max_rank) +
                     " non-negative integers, got " + std::string(what));
        fail_entry("data_offsets must be [begin, end] with non-negative integers, got " +
                   std::string(what));
      case state::shape:
        fail_entry("shape entries must be non-negative integers, got " + std::string(what));
      case state::offsets:
        fail_entry("data_offsets must be [begin, end] with non-negative integers, got " +
                   std::string(what));
      default:
        fail("header has an unexpected " + std::string(what));
    }
  }
  /// The end of a skipped object or array: skipping stops when it closes.
  bool end_skipped() {
    if (depth_ == skip_depth_) end_skip();
    return true;
  }
  void end_skip() {
    skip_ = false;
    state_ = resume_;
  }

  void finish_entry() {
    if (!entry_.dtype || !entry_.have_shape || !entry_.have_offsets)
      fail_entry("entry must be an object with dtype, shape and data_offsets (it has no '" +
                 std::string(!entry_.dtype        ? "dtype"
                             : !entry_.have_shape ? "shape"
                                                  : "data_offsets") +
                 "')");
    if (entry_.offsets.size() != 2)
      fail_entry("data_offsets must be [begin, end] with non-negative integers");
    st_tensor_info info;
    info.dtype = *entry_.dtype;
    info.shape = std::move(entry_.shape);
    info.begin = entry_.offsets[0];
    info.end = entry_.offsets[1];
    if (info.begin > info.end || info.end > buffer_)
      fail_entry("data_offsets [" + std::to_string(info.begin) + ", " + std::to_string(info.end) +
                 "] outside the data buffer of " + std::to_string(buffer_) +
                 " bytes (truncated file?)");
    const std::uint64_t bytes = info.end - info.begin;
    const std::uint64_t item = st_item_size(info.dtype);
    // The count may not exceed what the byte range holds: no product can overflow.
    const auto count = checked_count(info.shape, bytes / item);
    if (!count || *count * item != bytes) {
      const auto all = checked_count(info.shape);
      const auto needs = all ? checked_mul(*all, item) : std::nullopt;
      fail_entry("byte size " + std::to_string(bytes) + " does not match dtype " +
                 st_dtype_name(info.dtype) + " and shape " + shape_to_string(info.shape) +
                 " (which needs " +
                 (needs ? std::to_string(*needs) : std::string("more than 2^64")) + " bytes)");
    }
    tensors_.emplace(std::move(entry_.name), std::move(info));
  }
};

}  // namespace detail

/// An open safetensors file: the parsed, validated header; tensors are read on demand. Reading
/// uses one stream: one object must not be read from by several threads at once.
class safetensors_file {
 public:
  /// Opens `path` and reads and validates its header (see the top of this file). Throws
  /// fastattn::invalid_argument naming the file on any problem listed there, and when two tensors
  /// overlap in the data buffer.
  explicit safetensors_file(std::string path) : path_(std::move(path)) {
    const std::uint64_t file_size = open_regular_file(path_, in_);
    if (file_size < 8) fail("not a safetensors file: shorter than the 8-byte header length");
    unsigned char len_bytes[8];
    detail::read_exact(in_, path_, len_bytes, 8, "the header length");
    const auto header_len = detail::load_le<std::uint64_t>(len_bytes);
    if (header_len > file_size - 8)
      fail("header length " + std::to_string(header_len) + " exceeds the file (" +
           std::to_string(file_size) + " bytes): not a safetensors file or truncated");
    if (header_len > detail::st_max_header)
      fail("header of " + std::to_string(header_len) + " bytes is larger than the limit of " +
           std::to_string(detail::st_max_header) + " bytes");
    std::string text(static_cast<std::size_t>(header_len), '\0');
    detail::read_exact(in_, path_, text.data(), header_len, "the header");
    data_start_ = 8 + header_len;
    const std::uint64_t buffer = file_size - data_start_;

    detail::st_header_parser parser(path_, buffer, tensors_);
    // Strict: nothing but spaces may follow the object. The parser throws on every problem.
    if (!nlohmann::json::sax_parse(text, &parser)) fail("header is not valid JSON");

    // No two tensors may share bytes (empty tensors own none).
    std::vector<std::pair<const std::string*, const st_tensor_info*>> ranges;
    for (const auto& [name, info] : tensors_)
      if (info.end > info.begin) ranges.emplace_back(&name, &info);
    std::sort(ranges.begin(), ranges.end(), [](const auto& a, const auto& b) {
      return std::pair(a.second->begin, a.second->end) < std::pair(b.second->begin, b.second->end);
    });
    auto describe = [](const auto& r) {
      return "'" + detail::printable(*r.first) + "' (bytes [" + std::to_string(r.second->begin) +
             ", " + std::to_string(r.second->end) + "))";
    };
    for (std::size_t i = 1; i < ranges.size(); ++i)
      if (ranges[i].second->begin < ranges[i - 1].second->end)
        fail("tensors " + describe(ranges[i - 1]) + " and " + describe(ranges[i]) +
             " overlap in the data buffer");
  }

  /// The path given to the constructor.
  const std::string& path() const { return path_; }
  /// Whether the header lists tensor `name`.
  bool contains(const std::string& name) const { return tensors_.count(name) > 0; }
  /// Every tensor of the header, by name ("__metadata__" is not one).
  const std::map<std::string, st_tensor_info>& tensors() const { return tensors_; }

  /// Tensor `name`'s entry. Throws fastattn::invalid_argument naming the file when it is missing.
  const st_tensor_info& info(const std::string& name) const {
    const auto it = tensors_.find(name);
    if (it == tensors_.end()) fail("missing tensor '" + detail::printable(name) + "'");
    return it->second;
  }

  /// Reads tensor `name` converted to T, in C order. Floating T accepts F64/F32/F16/BF16 tensors
  /// (a value beyond T's range becomes an infinity of its sign); integral T accepts integer and
  /// BOOL tensors (converted by static_cast). `expected` (if not empty) is the required shape.
  /// Throws fastattn::invalid_argument naming the file and the tensor when it is missing, has
  /// another shape than `expected` or the other dtype kind, or cannot be read.
  template <class T>
  std::vector<T> read(const std::string& name, const std::vector<index>& expected = {}) const {
    return read_impl<T>(name, expected, false);
  }

  /// As read<T> for floating T, and every value must be finite as T: a NaN or infinity in the
  /// file, or a finite value that overflows T (an F64 1e300 read as float), throws
  /// invalid_argument naming the tensor, the element and the value.
  template <class T>
  std::vector<T> read_finite(const std::string& name,
                             const std::vector<index>& expected = {}) const {
    static_assert(std::is_floating_point_v<T>, "read_finite reads into a floating-point type");
    return read_impl<T>(name, expected, true);
  }

  /// Throws fastattn::invalid_argument "fastattn: <path>: <problem>" (for the caller's own checks
  /// of this file's contents).
  [[noreturn]] void fail(const std::string& problem) const { detail::fail(path_, problem); }

 private:
  std::string path_;
  mutable std::ifstream in_;
  std::uint64_t data_start_ = 0;
  std::map<std::string, st_tensor_info> tensors_;

  template <class T>
  std::vector<T> read_impl(const std::string& name, const std::vector<index>& expected,
                           bool finite) const {
    const st_tensor_info& t = info(name);
    const std::string quoted = "tensor '" + detail::printable(name) + "'";
    if (!expected.empty() && t.shape != expected)
      fail(quoted + " has shape " + shape_to_string(t.shape) + ", expected " +
           shape_to_string(expected));
    if constexpr (std::is_floating_point_v<T>) {
      if (!st_is_float(t.dtype))
        fail(quoted + " has dtype " + st_dtype_name(t.dtype) +
             ", expected a floating-point dtype (F32, F16, BF16, F64)");
    } else {
      if (st_is_float(t.dtype))
        fail(quoted + " has dtype " + st_dtype_name(t.dtype) +
             ", expected an integer dtype (I64, I32, ...)");
    }
    const std::uint64_t bytes = t.end - t.begin;  // validated against the file when it was opened
    std::vector<unsigned char> raw(static_cast<std::size_t>(bytes));
    in_.clear();
    in_.seekg(static_cast<std::streamoff>(data_start_ + t.begin));
    detail::read_exact(in_, path_, raw.data(), bytes, quoted);
    const std::size_t n = static_cast<std::size_t>(bytes / st_item_size(t.dtype));
    std::vector<T> out(n);
    const unsigned char* p = raw.data();
    for (std::size_t i = 0; i < n; ++i) {
      switch (t.dtype) {
        case st_dtype::F64:
          store(out, i, std::bit_cast<double>(detail::load_le<std::uint64_t>(p + 8 * i)), finite,
                quoted);
          break;
        case st_dtype::F32:
          store(out, i, std::bit_cast<float>(detail::load_le<std::uint32_t>(p + 4 * i)), finite,
                quoted);
          break;
        case st_dtype::F16:
          store(out, i,
                static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(
                    detail::load_le<std::uint16_t>(p + 2 * i))),
                finite, quoted);
          break;
        case st_dtype::BF16:
          store(out, i,
                static_cast<float>(Eigen::numext::bit_cast<Eigen::bfloat16>(
                    detail::load_le<std::uint16_t>(p + 2 * i))),
                finite, quoted);
          break;
        case st_dtype::I64:
          out[i] =
              static_cast<T>(static_cast<std::int64_t>(detail::load_le<std::uint64_t>(p + 8 * i)));
          break;
        case st_dtype::I32:
          out[i] =
              static_cast<T>(static_cast<std::int32_t>(detail::load_le<std::uint32_t>(p + 4 * i)));
          break;
        case st_dtype::I16:
          out[i] =
              static_cast<T>(static_cast<std::int16_t>(detail::load_le<std::uint16_t>(p + 2 * i)));
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

  /// out[i] = value as T; with `finite`, a value that is not finite as T is an error.
  template <class T, class Source>
  void store(std::vector<T>& out, std::size_t i, Source value, bool finite,
             const std::string& quoted) const {
    if constexpr (std::is_floating_point_v<T>) {
      const T converted = detail::narrow<T>(value);
      if (finite && !std::isfinite(converted)) {
        if (!std::isfinite(value))
          fail(quoted + " has a non-finite value (" +
               detail::value_text(static_cast<double>(value)) + ") at element " +
               std::to_string(i));
        fail(quoted + " has the value " + detail::value_text(static_cast<double>(value)) +
             " at element " + std::to_string(i) + ", which overflows " +
             (std::is_same_v<T, float> ? "float" : "the element type"));
      }
      out[i] = converted;
    } else {
      (void)finite;
      (void)quoted;
      out[i] = static_cast<T>(value);  // not reached: integral T reads integer dtypes only
    }
  }
};

/// One tensor to write, in C order: built by `make` from F32, F64, F16, BF16, I64 or I32 data, or
/// filled in directly (any dtype; write_safetensors checks the byte size).
struct st_write_tensor {
  std::string name;                  ///< distinct, not "__metadata__", valid UTF-8
  st_dtype dtype = st_dtype::F32;    ///< element type
  std::vector<index> shape;          ///< at most 16 extents, each >= 0
  std::vector<unsigned char> bytes;  ///< little-endian raw data, product(shape) elements

  /// T is float (F32), double (F64), Eigen::half (F16), Eigen::bfloat16 (BF16), std::int64_t
  /// (I64) or std::int32_t (I32); a little-endian host (static_asserts). Throws
  /// fastattn::invalid_argument naming the tensor when the shape has more than 16
  /// extents (the reader's limit), an extent is negative, or the shape does not hold exactly
  /// data.size() elements.
  template <class T>
  static st_write_tensor make(std::string name, std::vector<index> shape,
                              const std::vector<T>& data) {
    st_write_tensor t;
    if constexpr (std::is_same_v<T, float>)
      t.dtype = st_dtype::F32;
    else if constexpr (std::is_same_v<T, double>)
      t.dtype = st_dtype::F64;
    else if constexpr (std::is_same_v<T, Eigen::half>)
      t.dtype = st_dtype::F16;
    else if constexpr (std::is_same_v<T, Eigen::bfloat16>)
      t.dtype = st_dtype::BF16;
    else if constexpr (std::is_same_v<T, std::int64_t>)
      t.dtype = st_dtype::I64;
    else if constexpr (std::is_same_v<T, std::int32_t>)
      t.dtype = st_dtype::I32;
    else
      static_assert(sizeof(T) == 0, "write F32, F64, F16, BF16, I64 or I32");
    static_assert(std::endian::native == std::endian::little,
                  "writer assumes a little-endian host");
    // The reader's limit on extents: what is written can be read back.
    if (shape.size() > detail::st_max_rank)
      detail::raise(name, "safetensors tensor '" + detail::printable(name) + "': shape " +
                              shape_to_string(shape) + " has " + std::to_string(shape.size()) +
                              " extents; at most " + std::to_string(detail::st_max_rank) +
                              " can be read back");
    for (const index d : shape)
      if (d < 0)
        detail::raise(name, "safetensors tensor '" + detail::printable(name) + "': shape " +
                                shape_to_string(shape) + " has a negative extent " +
                                std::to_string(d));
    const auto count = detail::checked_count(shape, detail::uint64_max / sizeof(T));
    if (!count)
      detail::raise(name, "safetensors tensor '" + detail::printable(name) + "': shape " +
                              shape_to_string(shape) +
                              " has more elements than 64-bit byte counts can hold");
    if (*count != data.size())
      detail::raise(name, "safetensors tensor '" + detail::printable(name) + "': shape " +
                              shape_to_string(shape) + " holds " + std::to_string(*count) +
                              " elements but the data has " + std::to_string(data.size()));
    t.name = std::move(name);
    t.shape = std::move(shape);
    t.bytes.resize(data.size() * sizeof(T));  // fits: checked above
    if (!data.empty()) std::memcpy(t.bytes.data(), data.data(), t.bytes.size());
    return t;
  }
};

/// Writes tensors as a safetensors file (header padded with spaces to a multiple of 8 bytes, as
/// the reference implementation does). Names must be distinct, not "__metadata__" and valid
/// UTF-8, and each tensor's byte size must match its dtype and shape: otherwise throws
/// fastattn::invalid_argument naming the file, before creating it. Write errors throw too, with
/// the system's reason and the path (see output_file).
inline void write_safetensors(const std::string& path,
                              const std::vector<st_write_tensor>& tensors) {
  nlohmann::json header = nlohmann::json::object();
  std::uint64_t offset = 0;
  for (const auto& t : tensors) {
    const std::string quoted = "tensor '" + detail::printable(t.name) + "'";
    if (t.name == "__metadata__") detail::fail(path, "cannot write a tensor named __metadata__");
    if (header.contains(t.name)) detail::fail(path, "cannot write: " + quoted + " is given twice");
    if (t.shape.size() > detail::st_max_rank)
      detail::fail(path, "cannot write " + quoted + ": shape " + shape_to_string(t.shape) +
                             " has more than " + std::to_string(detail::st_max_rank) +
                             " extents (it could not be read back)");
    const std::uint64_t item = st_item_size(t.dtype);
    const auto count = detail::checked_count(t.shape, detail::uint64_max / item);
    if (!count || *count * item != t.bytes.size())
      detail::fail(path, "cannot write " + quoted + ": " + std::to_string(t.bytes.size()) +
                             " bytes do not match dtype " + st_dtype_name(t.dtype) + " and shape " +
                             shape_to_string(t.shape));
    const auto end = detail::checked_add(offset, t.bytes.size());
    if (!end) detail::fail(path, "cannot write: the tensors hold more than 2^64 bytes");
    header[t.name] = {
        {"dtype", st_dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, *end}}};
    offset = *end;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception&) {
    detail::fail(path, "cannot write: a tensor name is not valid UTF-8");
  }
  while (text.size() % 8) text += ' ';
  unsigned char len[8];
  for (int i = 0; i < 8; ++i)
    len[i] =
        static_cast<unsigned char>((static_cast<std::uint64_t>(text.size()) >> (8 * i)) & 0xff);
  output_file out(path);
  out.write(len, 8);
  out.write(text);
  for (const auto& t : tensors) out.write(t.bytes.data(), t.bytes.size());
  out.close();
}

}  // namespace fastattn::io
