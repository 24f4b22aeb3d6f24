// NumPy .npy reading and writing (float32 / float64, little-endian, C order).
//
// Opt-in: not included by fastattn.hpp. Every failure throws `fastattn::invalid_argument` with
// one line naming the file and the problem; corrupt input never crashes and never makes the
// reader allocate more than the file can hold (sizes are checked against the file size first,
// and every product of extents and byte counts is overflow-checked, so a dimension of 2^62 is a
// clear error). Only regular files are read: a directory, FIFO or device is refused, naming it,
// before it is opened (a FIFO without a writer never blocks). Write errors report the system's
// reason and the path.
//
// Format (numpy.lib.format): 6-byte magic "\x93NUMPY", major and minor version bytes (1.0, 2.0 or
// 3.0), header length (uint16 for 1.0, uint32 for 2.0/3.0, little-endian), then a Python dict
// literal {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), } padded with spaces and
// ending in '\n', then the raw data.
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "../attention.hpp"
#include "common.hpp"

namespace fastattn::io {

/// Element types the reader understands: float32 ('<f4') and float64 ('<f8'), little-endian.
enum class npy_dtype { float32, float64 };

/// What a .npy header says, without the data.
struct npy_header {
  /// The element type ('descr').
  npy_dtype dtype = npy_dtype::float32;
  std::vector<index> shape;       ///< empty for a 0-d array (one element)
  std::uint64_t data_offset = 0;  ///< byte offset of the first element
  std::uint64_t count = 1;        ///< number of elements (product of shape)
};

/// An array read from a .npy file: shape and data in C order, converted to T.
template <class T>
struct npy_array {
  std::vector<index> shape;  ///< extents, each >= 0; empty for a 0-d array
  std::vector<T> data;       ///< product(shape) elements, C order
};

namespace detail {

[[noreturn]] inline void npy_fail(const std::string& path, const std::string& problem) {
  fail(path, problem);
}

/// Parser for the dict literal of a .npy header. Accepts exactly what numpy writes plus harmless
/// variations (either quote style, any whitespace, trailing commas); anything else is an error.
class npy_dict_parser {
 public:
  npy_dict_parser(std::string_view text, const std::string& path) : s_(text), path_(path) {}

  npy_header parse() {
    bool have_descr = false, have_fortran = false, have_shape = false;
    std::string descr;
    bool fortran = false;
    std::vector<index> shape;
    skip_space();
    expect('{', "header dict must start with '{'");
    for (;;) {
      skip_space();
      if (peek() == '}') {
        ++i_;
        break;
      }
      const std::string key = parse_string("a quoted key");
      skip_space();
      expect(':', "expected ':' after key '" + key + "'");
      skip_space();
      if (key == "descr") {
        if (have_descr) fail("header has a duplicate 'descr' key");
        descr = parse_string("a quoted dtype string for 'descr'");
        have_descr = true;
      } else if (key == "fortran_order") {
        if (have_fortran) fail("header has a duplicate 'fortran_order' key");
        fortran = parse_bool();
        have_fortran = true;
      } else if (key == "shape") {
        if (have_shape) fail("header has a duplicate 'shape' key");
        shape = parse_shape();
        have_shape = true;
      } else {
        fail("header has an unexpected key '" + printable(key) +
             "' (expected only 'descr', 'fortran_order', 'shape')");
      }
      skip_space();
      if (peek() == ',') {
        ++i_;
        continue;
      }
      skip_space();
      expect('}', "expected ',' or '}' in header dict");
      break;
    }
    skip_space();
    if (i_ != s_.size()) fail("unexpected characters after the header dict");
    if (!have_descr) fail("header has no 'descr' key");
    if (!have_fortran) fail("header has no 'fortran_order' key");
    if (!have_shape) fail("header has no 'shape' key");

    npy_header h;
    if (descr == "<f4" || (descr == "=f4" && std::endian::native == std::endian::little)) {
      h.dtype = npy_dtype::float32;
    } else if (descr == "<f8" || (descr == "=f8" && std::endian::native == std::endian::little)) {
      h.dtype = npy_dtype::float64;
    } else if (descr == ">f4" || descr == ">f8") {
      fail("big-endian data ('" + descr +
           "') is not supported; save little-endian ('<f4' or '<f8')");
    } else {
      fail("unsupported dtype '" + printable(descr) +
           "'; expected float32 ('<f4') or float64 ('<f8')");
    }
    // Fortran and C order coincide for 0-d and 1-d arrays.
    if (fortran && shape.size() >= 2)
      fail(
          "Fortran-order arrays are not supported; save a C-contiguous array "
          "(numpy.ascontiguousarray)");
    h.shape = std::move(shape);
    return h;
  }

 private:
  std::string_view s_;
  std::size_t i_ = 0;
  const std::string& path_;

  [[noreturn]] void fail(const std::string& problem) const { npy_fail(path_, problem); }

  static std::string printable(std::string_view text) {
    std::string out;
    for (const char c : text.substr(0, 40)) out += (c >= 32 && c < 127) ? c : '?';
    if (text.size() > 40) out += "...";
    return out;
  }

  char peek() const { return i_ < s_.size() ? s_[i_] : '\0'; }
  void skip_space() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r'))
      ++i_;
  }
  void expect(char c, const std::string& problem) {
    if (peek() != c || i_ >= s_.size()) fail("malformed header: " + problem);
    ++i_;
  }
  std::string parse_string(const std::string& what) {
    const char quote = peek();
    if (quote != '\'' && quote != '"') fail("malformed header: expected " + what);
    ++i_;
    const std::size_t start = i_;
    while (i_ < s_.size() && s_[i_] != quote) {
      if (s_[i_] == '\\') fail("malformed header: escapes in strings are not supported");
      ++i_;
    }
    if (i_ >= s_.size()) fail("malformed header: unterminated string");
    std::string out(s_.substr(start, i_ - start));
    ++i_;
    return out;
  }
  bool parse_bool() {
    if (s_.substr(i_, 4) == "True") {
      i_ += 4;
      return true;
    }
    if (s_.substr(i_, 5) == "False") {
      i_ += 5;
      return false;
    }
    fail("malformed header: 'fortran_order' must be True or False");
  }
  std::vector<index> parse_shape() {
    expect('(', "'shape' must be a tuple like (3, 4)");
    std::vector<index> shape;
    for (;;) {
      skip_space();
      if (peek() == ')') {
        ++i_;
        break;
      }
      if (peek() < '0' || peek() > '9')
        fail("malformed header: 'shape' must hold non-negative integers");
      std::uint64_t value = 0;
      while (peek() >= '0' && peek() <= '9') {
        const auto digit = static_cast<std::uint64_t>(peek() - '0');
        if (value > (static_cast<std::uint64_t>(std::numeric_limits<index>::max()) - digit) / 10)
          fail("'shape' has a dimension too large to represent");
        value = value * 10 + digit;
        ++i_;
      }
      // Python 2 era files may write long integers as 3L.
      if (peek() == 'L') ++i_;
      if (shape.size() >= 64) fail("'shape' has more than 64 dimensions");
      shape.push_back(static_cast<index>(value));
      skip_space();
      if (peek() == ',') {
        ++i_;
        continue;
      }
      expect(')', "expected ',' or ')' in 'shape'");
      break;
    }
    return shape;
  }
};

inline std::uint64_t npy_item_size(npy_dtype t) { return t == npy_dtype::float32 ? 4 : 8; }

/// Opens `path` for binary reading and returns its size; throws when it is missing or not a
/// regular file (without opening it: a FIFO never blocks).
inline std::uint64_t npy_open(const std::string& path, std::ifstream& in) {
  return open_regular_file(path, in);
}

inline npy_header npy_read_header(const std::string& path, std::ifstream& in,
                                  std::uint64_t file_size) {
  static constexpr unsigned char magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
  unsigned char pre[12] = {};
  if (file_size < 10)
    npy_fail(path, "not a .npy file: " + std::to_string(file_size) +
                       " bytes is too short for the header");
  read_exact(in, path, pre, 10, "the header");
  if (std::memcmp(pre, magic, 6) != 0)
    npy_fail(path, "not a .npy file: bad magic (expected \\x93NUMPY)");
  const unsigned major = pre[6], minor = pre[7];
  if ((major != 1 && major != 2 && major != 3) || minor != 0)
    npy_fail(path, "unsupported .npy format version " + std::to_string(major) + "." +
                       std::to_string(minor) + " (supported: 1.0, 2.0, 3.0)");
  std::uint64_t header_len = 0, prefix = 10;
  if (major == 1) {
    header_len = std::uint64_t{pre[8]} | (std::uint64_t{pre[9]} << 8);
  } else {
    if (file_size < 12)
      npy_fail(path, "truncated header (file is " + std::to_string(file_size) + " bytes)");
    read_exact(in, path, pre + 10, 2, "the header");
    header_len = std::uint64_t{pre[8]} | (std::uint64_t{pre[9]} << 8) |
                 (std::uint64_t{pre[10]} << 16) | (std::uint64_t{pre[11]} << 24);
    prefix = 12;
  }
  if (header_len > file_size - prefix)
    npy_fail(path, "truncated header: it claims " + std::to_string(header_len) +
                       " bytes but the file has only " + std::to_string(file_size - prefix) +
                       " after the preamble");
  if (header_len > (std::uint64_t{1} << 24))
    npy_fail(path, "header length " + std::to_string(header_len) + " is implausibly large");
  std::string text(static_cast<std::size_t>(header_len), '\0');
  read_exact(in, path, text.data(), header_len, "the header");
  for (const char c : text)
    if (c == '\0' || static_cast<unsigned char>(c) >= 128)
      npy_fail(path, "malformed header: it contains non-ASCII or NUL bytes");
  npy_dict_parser parser(text, path);
  npy_header h = parser.parse();
  h.data_offset = prefix + header_len;

  // Element count and bytes, overflow-checked against what the file really holds: the count may
  // not exceed the data bytes / item size, so no product below can overflow and nothing larger
  // than the file is ever allocated.
  const std::uint64_t available = file_size - h.data_offset;
  const std::uint64_t item = npy_item_size(h.dtype);
  auto truncated = [&] {
    const auto all = checked_count(h.shape);
    const auto needs = all ? checked_mul(*all, item) : std::nullopt;
    return "truncated data: shape (" + join_extents(h.shape) + ") needs " +
           (needs ? std::to_string(*needs) : std::string("more than 2^64")) +
           " bytes, more than the " + std::to_string(available) + " data bytes the file holds";
  };
  const auto count = checked_count(h.shape, available / item);
  if (!count) npy_fail(path, truncated());
  h.count = *count;
  const auto bytes = checked_mul(*count, item, available);
  if (!bytes) npy_fail(path, truncated());
  if (*bytes < available)
    npy_fail(path, "file has " + std::to_string(available - *bytes) +
                       " unexpected bytes after the data (shape and file size disagree)");
  if (!checked_mul(*count, sizeof(double),
                   static_cast<std::uint64_t>(std::numeric_limits<std::ptrdiff_t>::max())))
    npy_fail(path, "array of " + std::to_string(*count) + " elements is too large");
  return h;
}

template <class Source, class T>
void npy_convert(const unsigned char* bytes, std::uint64_t count, T* out) {
  for (std::uint64_t i = 0; i < count; ++i) {
    Source value;
    unsigned char tmp[sizeof(Source)];
    std::memcpy(tmp, bytes + i * sizeof(Source), sizeof(Source));
    if constexpr (std::endian::native == std::endian::big) std::reverse(tmp, tmp + sizeof(Source));
    std::memcpy(&value, tmp, sizeof(Source));
    out[i] = narrow<T>(value);  // a double beyond float's range becomes an infinity, never UB
  }
}

}  // namespace detail

/// Reads only the header of a .npy file: dtype, shape and where the data starts. Validates the
/// whole header and that the file holds exactly the data the shape needs. Throws
/// fastattn::invalid_argument naming the file when it is not a regular file, cannot be read, is
/// not a .npy file of version 1.0, 2.0 or 3.0, has a malformed header, a dtype other than
/// float32 / float64 little-endian, Fortran order (2-d and up), more than 64 dimensions, data
/// bytes that do not match its shape, or more elements than memory could index.
inline npy_header read_npy_header(const std::string& path) {
  std::ifstream in;
  const std::uint64_t size = detail::npy_open(path, in);
  return detail::npy_read_header(path, in, size);
}

/// Reads a float32 or float64 .npy file and converts its data to T (float or double); a float64
/// value beyond float's range becomes an infinity of its sign. Throws as read_npy_header does,
/// and on a read error.
template <class T>
npy_array<T> read_npy(const std::string& path) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "fastattn::io::read_npy reads into float or double");
  std::ifstream in;
  const std::uint64_t size = detail::npy_open(path, in);
  const npy_header h = detail::npy_read_header(path, in, size);
  npy_array<T> result;
  result.shape = h.shape;
  result.data.resize(static_cast<std::size_t>(h.count));
  const std::uint64_t item = detail::npy_item_size(h.dtype);
  // Read in chunks so that a conversion needs only a bounded scratch buffer.
  constexpr std::uint64_t chunk_items = 1 << 16;
  std::vector<unsigned char> scratch(
      static_cast<std::size_t>(std::min(h.count, chunk_items) * item));
  in.seekg(static_cast<std::streamoff>(h.data_offset), std::ios::beg);
  for (std::uint64_t done = 0; done < h.count;) {
    const std::uint64_t n = std::min(chunk_items, h.count - done);
    detail::read_exact(in, path, scratch.data(), n * item, "the data");
    T* out = result.data.data() + done;
    if (h.dtype == npy_dtype::float32)
      detail::npy_convert<float>(scratch.data(), n, out);
    else
      detail::npy_convert<double>(scratch.data(), n, out);
    done += n;
  }
  return result;
}

/// Writes `data` (C order, product(shape) elements) as a .npy file of T's dtype ('<f4' for float,
/// '<f8' for double), format version 1.0 (2.0 if the header needs it), header padded to 64 bytes.
/// Throws fastattn::invalid_argument naming the file, before creating it, when an extent is
/// negative or data.size() != product(shape) (too large for 64-bit byte counts included), and
/// when it cannot be opened or written (see output_file).
template <class T>
void write_npy(const std::string& path, std::span<const index> shape, std::span<const T> data) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "fastattn::io::write_npy writes float or double");
  for (const index d : shape)
    if (d < 0) detail::npy_fail(path, "cannot write a negative dimension " + std::to_string(d));
  // As in read_npy, a zero dimension makes the array empty whatever the others are (they may
  // multiply past 2^64, and such a file must round-trip).
  const auto count = detail::checked_count(shape, detail::uint64_max / sizeof(T));
  if (!count)
    detail::npy_fail(path, "cannot write: shape (" + detail::join_extents(shape) +
                               ") has more elements than 64-bit byte counts can hold");
  if (*count != data.size())
    detail::npy_fail(path, "cannot write: shape (" + detail::join_extents(shape) + ") holds " +
                               std::to_string(*count) + " elements but the data has " +
                               std::to_string(data.size()));
  std::string dict = std::string("{'descr': '") + (std::is_same_v<T, float> ? "<f4" : "<f8") +
                     "', 'fortran_order': False, 'shape': (";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    dict += std::to_string(shape[i]);
    if (shape.size() == 1 || i + 1 < shape.size()) dict += ",";
    if (i + 1 < shape.size()) dict += " ";
  }
  dict += "), }";
  std::size_t prefix = 10;
  std::size_t total = prefix + dict.size() + 1;
  if ((total + 63) / 64 * 64 - prefix > 65535) {
    prefix = 12;
    total = prefix + dict.size() + 1;
  }
  const std::size_t padded = (total + 63) / 64 * 64;
  dict.append(padded - total, ' ');
  dict += '\n';
  const std::size_t header_len = dict.size();

  io::output_file out(path);
  unsigned char pre[12] = {0x93,
                           'N',
                           'U',
                           'M',
                           'P',
                           'Y',
                           static_cast<unsigned char>(prefix == 10 ? 1 : 2),
                           0,
                           static_cast<unsigned char>(header_len & 0xff),
                           static_cast<unsigned char>((header_len >> 8) & 0xff),
                           static_cast<unsigned char>((header_len >> 16) & 0xff),
                           static_cast<unsigned char>((header_len >> 24) & 0xff)};
  out.write(pre, prefix);
  out.write(dict);
  if constexpr (std::endian::native == std::endian::little) {
    out.write(data.data(), data.size() * sizeof(T));  // fits: checked above
  } else {
    for (const T x : data) {
      unsigned char tmp[sizeof(T)];
      std::memcpy(tmp, &x, sizeof(T));
      std::reverse(tmp, tmp + sizeof(T));
      out.write(tmp, sizeof(T));
    }
  }
  out.close();
}

/// Convenience overload: vectors for shape and data. Throws as above.
template <class T>
void write_npy(const std::string& path, const std::vector<index>& shape,
               const std::vector<T>& data) {
  write_npy<T>(path, std::span<const index>(shape), std::span<const T>(data));
}

/// Convenience overload: writes a float or double matrix (any storage order) as a 2-d
/// (rows, cols) C-order array. Throws as above (file errors only).
template <class Derived>
void write_npy(const std::string& path, const Eigen::DenseBase<Derived>& m) {
  using T = typename Derived::Scalar;
  const matrix<T> row_major = m;
  const index shape[2] = {row_major.rows(), row_major.cols()};
  write_npy<T>(path, std::span<const index>(shape),
               std::span<const T>(row_major.data(), static_cast<std::size_t>(row_major.size())));
}

}  // namespace fastattn::io
