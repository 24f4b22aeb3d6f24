// What fastattn's file readers and writers (npy.hpp, safetensors.hpp) share: overflow-checked size
// arithmetic, opening only regular files for reading (never blocking on a FIFO), and writing
// files so that every failure reports the system's reason (errno) and the path.
//
// Opt-in like the readers: not included by fastattn.hpp. Every failure throws
// `fastattn::invalid_argument` whose one-line message starts with "fastattn: <path>: ".
#pragma once

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>

#include "../attention.hpp"

namespace fastattn::io {
namespace detail {

/// Throws fastattn::invalid_argument about `argument` (a file, a tensor) whose what() is
/// "fastattn: <message>". Uses the (argument, message) constructor when fastattn's error type has
/// one, and its one-string constructor otherwise.
template <class Error = invalid_argument>
[[noreturn]] void raise(const std::string& argument, const std::string& message) {
  if constexpr (std::is_constructible_v<Error, std::string, std::string>)
    throw Error(argument, message);
  else
    throw Error("fastattn: " + message);
}

/// Throws "fastattn: <path>: <problem>".
[[noreturn]] inline void fail(const std::string& path, const std::string& problem) {
  raise(path, path + ": " + problem);
}

inline constexpr std::uint64_t uint64_max = std::numeric_limits<std::uint64_t>::max();

/// a * b, or nullopt when the product exceeds `limit`. Never overflows.
constexpr std::optional<std::uint64_t> checked_mul(std::uint64_t a, std::uint64_t b,
                                                   std::uint64_t limit = uint64_max) noexcept {
  if (a != 0 && b > limit / a) return std::nullopt;
  return a * b;
}

/// a + b, or nullopt when the sum exceeds `limit`. Never overflows.
constexpr std::optional<std::uint64_t> checked_add(std::uint64_t a, std::uint64_t b,
                                                   std::uint64_t limit = uint64_max) noexcept {
  if (a > limit || b > limit - a) return std::nullopt;
  return a + b;
}

/// The number of elements of an array of this shape: the product of the extents, zero when any
/// extent is zero (whatever the others are: they may multiply past 2^64). nullopt when an extent
/// is negative or the product exceeds `limit`. Never overflows.
constexpr std::optional<std::uint64_t> checked_count(std::span<const index> shape,
                                                     std::uint64_t limit = uint64_max) noexcept {
  for (const index d : shape) {
    if (d < 0) return std::nullopt;
    if (d == 0) return std::uint64_t{0};
  }
  std::uint64_t count = 1;
  for (const index d : shape) {
    const auto next = checked_mul(count, static_cast<std::uint64_t>(d), limit);
    if (!next) return std::nullopt;
    count = *next;
  }
  return count > limit ? std::nullopt : std::optional<std::uint64_t>(count);
}

/// `value` (a floating-point number) as the floating-point type T without undefined behaviour: a
/// finite value beyond T's range becomes an infinity of its sign (what IEEE rounding gives), a NaN
/// stays a NaN.
template <class T, class Source>
T narrow(Source value) noexcept {
  static_assert(std::is_floating_point_v<T> && std::is_floating_point_v<Source>);
  if constexpr (sizeof(Source) > sizeof(T)) {
    if (std::isnan(value)) return std::numeric_limits<T>::quiet_NaN();
    if (value > static_cast<Source>(std::numeric_limits<T>::max()))
      return std::numeric_limits<T>::infinity();
    if (value < static_cast<Source>(std::numeric_limits<T>::lowest()))
      return -std::numeric_limits<T>::infinity();
  }
  return static_cast<T>(value);
}

/// "2, 3, 4": the extents of a shape, for messages.
inline std::string join_extents(std::span<const index> shape) {
  std::string out;
  for (std::size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out;
}

/// At most `limit` characters of `text` with control characters shown as '?', so that a message
/// quoting a name taken from a file stays on one line.
inline std::string printable(std::string_view text, std::size_t limit = 200) {
  std::string out;
  for (const char c : text.substr(0, limit))
    out += (static_cast<unsigned char>(c) < 32 || c == 127) ? '?' : c;
  if (text.size() > limit) out += "...";
  return out;
}

/// The system's text for an errno value ("No space left on device").
inline std::string errno_text(int error) {
  return error != 0 ? std::system_category().message(error) : std::string("unknown error");
}

/// "a directory", "a FIFO", ...: what kind of file-system object `type` is, for messages.
inline const char* file_type_name(std::filesystem::file_type type) {
  switch (type) {
    case std::filesystem::file_type::regular:
      return "a regular file";
    case std::filesystem::file_type::directory:
      return "a directory";
    case std::filesystem::file_type::fifo:
      return "a FIFO";
    case std::filesystem::file_type::socket:
      return "a socket";
    case std::filesystem::file_type::block:
      return "a block device";
    case std::filesystem::file_type::character:
      return "a character device";
    default:
      return "a special file";
  }
}

/// Reads exactly `bytes` bytes into `out`; on failure throws naming `what` and the cause.
inline void read_exact(std::ifstream& in, const std::string& path, void* out, std::uint64_t bytes,
                       const std::string& what) {
  if (bytes > static_cast<std::uint64_t>(std::numeric_limits<std::streamsize>::max()))
    fail(path, "read error in " + what + ": " + std::to_string(bytes) + " bytes is too large");
  errno = 0;
  in.read(static_cast<char*>(out), static_cast<std::streamsize>(bytes));
  if (!in) {
    const int error = errno;
    fail(path, "read error in " + what + ": " +
                   (in.eof() ? std::string("the file ended early (changed while reading?)")
                             : errno_text(error)));
  }
}

}  // namespace detail

/// Opens `path` into `in` (not yet open) for binary reading, positioned at the start, and returns
/// its size in bytes. Only a regular file (or a symbolic link to one) is opened: anything else is
/// refused before it is opened, naming what it is ("is a FIFO, not a regular file"), so a FIFO
/// without a writer or a device never blocks the caller. Throws fastattn::invalid_argument
/// "fastattn: <path>: <cause>" with the real cause (no such file, permission denied, is a
/// directory, ...).
inline std::uint64_t open_regular_file(const std::string& path, std::ifstream& in) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::file_status status = fs::status(path, ec);
  if (status.type() == fs::file_type::not_found) detail::fail(path, "cannot open: no such file");
  if (ec) detail::fail(path, "cannot open: " + ec.message());
  if (status.type() != fs::file_type::regular)
    detail::fail(
        path, std::string("is ") + detail::file_type_name(status.type()) + ", not a regular file");
  errno = 0;
  in.open(path, std::ios::binary);
  if (!in) {
    const int error = errno;
    detail::fail(path, "cannot open for reading: " + detail::errno_text(error));
  }
  in.seekg(0, std::ios::end);
  const std::streamoff end = in.tellg();
  in.seekg(0, std::ios::beg);
  if (end < 0 || !in) detail::fail(path, "cannot determine the file size");
  return static_cast<std::uint64_t>(end);
}

/// A file opened for writing (created or truncated). Every failure, when opening, writing or
/// closing, throws fastattn::invalid_argument naming the path and the system's reason
/// ("No space left on device", "Permission denied", ...). A directory, FIFO or socket is refused
/// before it is opened (opening a FIFO without a reader would block). Call close() to learn
/// whether the data reached the file; the destructor closes silently.
class output_file {
 public:
  /// Creates or truncates `path`. Throws fastattn::invalid_argument when it is a directory, FIFO
  /// or socket, or cannot be opened for writing.
  explicit output_file(std::string path) : path_(std::move(path)) {
    namespace fs = std::filesystem;
    std::error_code ec;
    const fs::file_type type = fs::status(path_, ec).type();
    if (type == fs::file_type::directory || type == fs::file_type::fifo ||
        type == fs::file_type::socket)
      detail::fail(path_, std::string("cannot write: is ") + detail::file_type_name(type) +
                              ", not a regular file");
    errno = 0;
    file_ = std::fopen(path_.c_str(), "wb");
    if (file_ == nullptr) {
      const int error = errno;
      detail::fail(path_, "cannot open for writing: " + detail::errno_text(error));
    }
  }
  output_file(const output_file&) = delete;
  output_file& operator=(const output_file&) = delete;
  ~output_file() {
    if (file_ != nullptr) std::fclose(file_);
  }

  /// The path given to the constructor.
  const std::string& path() const { return path_; }

  /// Appends `bytes` bytes from `data` (which may be null when bytes is 0). Throws
  /// fastattn::invalid_argument on a write error or after close().
  void write(const void* data, std::size_t bytes) {
    if (file_ == nullptr) detail::fail(path_, "write error: the file is already closed");
    if (bytes == 0) return;
    errno = 0;
    if (std::fwrite(data, 1, bytes, file_) != bytes) {
      const int error = errno;
      detail::fail(path_, "write error: " + detail::errno_text(error));
    }
  }
  /// Appends `text`; throws as above.
  void write(std::string_view text) { write(text.data(), text.size()); }

  /// Flushes and closes; throws fastattn::invalid_argument with the reason when the data could
  /// not be written. Does nothing when already closed.
  void close() {
    if (file_ == nullptr) return;
    std::FILE* f = file_;
    file_ = nullptr;
    errno = 0;
    const bool flushed = std::fflush(f) == 0;
    const int flush_error = errno;
    errno = 0;
    const bool closed = std::fclose(f) == 0;
    const int close_error = errno;
    if (!flushed) detail::fail(path_, "write error: " + detail::errno_text(flush_error));
    if (!closed)
      detail::fail(path_, "write error when closing: " + detail::errno_text(close_error));
  }

 private:
  std::string path_;
  std::FILE* file_ = nullptr;
};

}  // namespace fastattn::io
