// fastattn::io .npy reader/writer: round trips, numpy's header variants, and every kind of
// corruption (each must throw fastattn::invalid_argument naming the file, never crash).
#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <fastattn/io/npy.hpp>

#include "npy.hpp"
#include "reference.hpp"

namespace fa = fastattn;
namespace fs = std::filesystem;

namespace {

using fa::testing::refusal_without_blocking;

class Npy : public fa::testing::temporary_directory_test {
 protected:
  static void write_bytes(const std::string& p, const std::string& bytes) {
    std::ofstream out(p, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  static std::string read_bytes(const std::string& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }
  /// A hand-made .npy: version, dict text (padded with spaces + '\n' unless raw), payload.
  static std::string make(const std::string& dict, const std::string& payload, int major = 1,
                          bool raw = false) {
    std::string header = dict;
    if (!raw) {
      const std::size_t prefix = major == 1 ? 10 : 12;
      while ((prefix + header.size() + 1) % 64 != 0) header += ' ';
      header += '\n';
    }
    std::string out = "\x93NUMPY";
    out += static_cast<char>(major);
    out += '\0';
    const auto n = header.size();
    out += static_cast<char>(n & 0xff);
    out += static_cast<char>((n >> 8) & 0xff);
    if (major != 1) {
      out += static_cast<char>((n >> 16) & 0xff);
      out += static_cast<char>((n >> 24) & 0xff);
    }
    return out + header + payload;
  }
  static std::string floats(std::initializer_list<float> xs) {
    std::string s;
    for (const float x : xs) s.append(reinterpret_cast<const char*>(&x), sizeof x);
    return s;
  }
  /// Expects read_npy<float>(p) to throw invalid_argument whose message names p and contains
  /// `needle`.
  static void expect_error(const std::string& p, const std::string& needle) {
    try {
      (void)fa::io::read_npy<float>(p);
      ADD_FAILURE() << "no exception for " << p << " (expected '" << needle << "')";
    } catch (const fa::invalid_argument& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find(p), std::string::npos) << what;
      EXPECT_NE(what.find(needle), std::string::npos) << "expected '" << needle << "' in: " << what;
      EXPECT_EQ(what.find('\n'), std::string::npos) << "message must be one line: " << what;
    }
  }
};

TEST_F(Npy, RoundTripFloatAndDouble) {
  const std::vector<std::vector<fa::index>> shapes = {{},     {0},    {1},       {7},
                                                      {3, 5}, {0, 4}, {2, 3, 4}, {2, 1, 3, 2}};
  for (const auto& shape : shapes) {
    std::size_t n = 1;
    for (const fa::index d : shape) n *= static_cast<std::size_t>(d);
    std::vector<float> f(n);
    std::vector<double> d(n);
    for (std::size_t i = 0; i < n; ++i) {
      f[i] = static_cast<float>(i) * 0.25f - 3.f;
      d[i] = static_cast<double>(i) / 3.0 - 1e-300;
    }
    fa::io::write_npy(path("f.npy"), shape, f);
    fa::io::write_npy(path("d.npy"), shape, d);
    const auto rf = fa::io::read_npy<float>(path("f.npy"));
    const auto rd = fa::io::read_npy<double>(path("d.npy"));
    EXPECT_EQ(rf.shape, shape);
    EXPECT_EQ(rf.data, f);
    EXPECT_EQ(rd.shape, shape);
    EXPECT_EQ(rd.data, d);
    // Conversions: float file read as double is exact; double file read as float rounds.
    const auto fd = fa::io::read_npy<double>(path("f.npy"));
    for (std::size_t i = 0; i < n; ++i) EXPECT_EQ(fd.data[i], static_cast<double>(f[i]));
    const auto df = fa::io::read_npy<float>(path("d.npy"));
    for (std::size_t i = 0; i < n; ++i) EXPECT_EQ(df.data[i], static_cast<float>(d[i]));
    // numpy pads the header so that the data starts on a 64-byte boundary.
    EXPECT_EQ(fa::io::read_npy_header(path("f.npy")).data_offset % 64, 0u);
    EXPECT_EQ(fa::io::read_npy_header(path("d.npy")).dtype, fa::io::npy_dtype::float64);
  }
}

TEST_F(Npy, HeaderTextMatchesNumpy) {
  fa::io::write_npy(path("a.npy"), std::vector<fa::index>{3, 4}, std::vector<float>(12, 1.f));
  const std::string bytes = read_bytes(path("a.npy"));
  EXPECT_EQ(bytes.substr(0, 8), std::string("\x93NUMPY\x01\x00", 8));
  EXPECT_NE(bytes.find("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }"),
            std::string::npos);
  fa::io::write_npy(path("b.npy"), std::vector<fa::index>{5}, std::vector<double>(5, 1.0));
  EXPECT_NE(read_bytes(path("b.npy")).find("'shape': (5,), }"), std::string::npos);
}

TEST_F(Npy, MatrixOverloadAndTestHelper) {
  const auto m = fa::testing::gaussian<float>(6, 9, 3);
  fa::io::write_npy(path("m.npy"), m);
  const auto loaded = fa::testing::load_npy<float>(path("m.npy"));
  ASSERT_EQ(loaded.shape, (std::vector<fa::index>{6, 9}));
  EXPECT_EQ(fa::testing::as_matrix(loaded), m);
  // Column-major input is written in C order too.
  const Eigen::MatrixXd cm = Eigen::MatrixXd::Random(4, 3);
  fa::io::write_npy(path("c.npy"), cm);
  const auto c = fa::testing::load_npy<double>(path("c.npy"));
  EXPECT_EQ(c.data[1], cm(0, 1));
}

TEST_F(Npy, AcceptsVersions2And3AndHeaderVariants) {
  const std::string payload = floats({1.f, 2.f, 3.f, 4.f, 5.f, 6.f});
  const std::vector<std::string> dicts = {
      "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
      "{\"descr\": \"<f4\", \"fortran_order\": False, \"shape\": (2, 3)}",
      "{'shape': (2,3), 'fortran_order': False, 'descr': '<f4'}",
      "{'descr':'<f4','fortran_order':False,'shape':(2L, 3L),}",
  };
  for (int major : {1, 2, 3}) {
    for (const auto& dict : dicts) {
      write_bytes(path("v.npy"), make(dict, payload, major));
      const auto a = fa::io::read_npy<double>(path("v.npy"));
      EXPECT_EQ(a.shape, (std::vector<fa::index>{2, 3})) << dict;
      EXPECT_EQ(a.data, (std::vector<double>{1, 2, 3, 4, 5, 6})) << dict;
    }
  }
  // Fortran order is harmless for 1-d arrays: it is the same layout.
  write_bytes(path("f1.npy"),
              make("{'descr': '<f4', 'fortran_order': True, 'shape': (6,), }", payload));
  EXPECT_EQ(fa::io::read_npy<float>(path("f1.npy")).data.size(), 6u);
}

TEST_F(Npy, RejectsEachKindOfCorruption) {
  const std::string good_dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
  const std::string payload = floats({1.f, 2.f, 3.f, 4.f, 5.f, 6.f});
  struct bad {
    std::string name, bytes, needle;
  };
  std::string bad_magic = make(good_dict, payload);
  bad_magic[1] = 'X';
  std::string bad_version = make(good_dict, payload);
  bad_version[6] = 4;
  std::string bad_minor = make(good_dict, payload);
  bad_minor[7] = 1;
  std::string long_header = make(good_dict, payload);
  long_header[8] = '\xff';
  long_header[9] = '\x7f';
  const std::vector<bad> cases = {
      {"empty", "", "too short"},
      {"magic", bad_magic, "bad magic"},
      {"text", "hello world, this is not numpy", "bad magic"},
      {"version", bad_version, "version 4.0"},
      {"minor", bad_minor, "version 1.1"},
      {"header_len", long_header, "truncated header"},
      {"preamble_only", make(good_dict, payload).substr(0, 9), "too short"},
      {"truncated_header", make(good_dict, payload).substr(0, 40), "truncated header"},
      {"truncated_data", make(good_dict, payload).substr(0, 128 + 20), "truncated data"},
      {"extra_data", make(good_dict, payload + "xyzw"), "unexpected bytes"},
      {"int_dtype", make("{'descr': '<i4', 'fortran_order': False, 'shape': (2, 3), }", payload),
       "unsupported dtype '<i4'"},
      {"half_dtype", make("{'descr': '<f2', 'fortran_order': False, 'shape': (2, 3), }", payload),
       "unsupported dtype"},
      {"struct_dtype",
       make("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (6,), }", payload),
       "dtype string"},
      {"big_endian", make("{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), }", payload),
       "big-endian"},
      {"fortran", make("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", payload),
       "Fortran-order"},
      {"shape_mismatch",
       make("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 4), }", payload),
       "truncated data"},
      {"shape_small", make("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }", payload),
       "unexpected bytes"},
      {"shape_overflow",
       make("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, "
            "4294967296), }",
            payload),
       "truncated data"},
      {"shape_huge_number",
       make("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999, ), }",
            payload),
       "too large"},
      {"negative_dim",
       make("{'descr': '<f4', 'fortran_order': False, 'shape': (-2, 3), }", payload),
       "non-negative"},
      {"shape_not_tuple",
       make("{'descr': '<f4', 'fortran_order': False, 'shape': [2, 3], }", payload), "tuple"},
      {"missing_key", make("{'descr': '<f4', 'shape': (2, 3), }", payload), "no 'fortran_order'"},
      {"missing_shape", make("{'descr': '<f4', 'fortran_order': False}", payload), "no 'shape'"},
      {"extra_key",
       make("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'x': 1}", payload),
       "unexpected key 'x'"},
      {"duplicate_key",
       make("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", payload),
       "duplicate"},
      {"bad_bool", make("{'descr': '<f4', 'fortran_order': 0, 'shape': (2, 3), }", payload),
       "True or False"},
      {"not_dict", make("['descr', '<f4']", payload), "must start with '{'"},
      {"unterminated", make("{'descr: <f4, fortran_order: False, shape: (2, 3) }", payload),
       "unterminated"},
      {"trailing_junk", make(good_dict + " x", payload), "after the header dict"},
      {"nul_in_header", make(std::string("{'descr': '<f4'\0", 16), payload, 1, true), "NUL"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    write_bytes(path(c.name + ".npy"), c.bytes);
    expect_error(path(c.name + ".npy"), c.needle);
  }
  expect_error(path("does_not_exist.npy"), "no such file");
  expect_error(dir_.string(), "is a directory");
}

TEST_F(Npy, RandomCorruptionNeverCrashes) {
  // Every flip of one byte, and random multi-byte damage, either loads or throws
  // invalid_argument; a loaded array is always consistent with its shape.
  std::vector<float> values(12);
  for (std::size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(i);
  fa::io::write_npy(path("good.npy"), std::vector<fa::index>{3, 4}, values);
  const std::string good = read_bytes(path("good.npy"));
  std::mt19937_64 gen(5);
  int loaded = 0, rejected = 0;
  auto check = [&](const std::string& bytes) {
    write_bytes(path("fuzz.npy"), bytes);
    try {
      const auto a = fa::io::read_npy<double>(path("fuzz.npy"));
      std::size_t n = 1;
      for (const fa::index d : a.shape) n *= static_cast<std::size_t>(d);
      EXPECT_EQ(n, a.data.size());
      ++loaded;
    } catch (const fa::invalid_argument&) {
      ++rejected;
    }
  };
  for (std::size_t pos = 0; pos < good.size(); ++pos) {
    for (const int value : {0x00, 0xff, 0x20, 0x28, 0x39}) {
      std::string bytes = good;
      bytes[pos] = static_cast<char>(value);
      check(bytes);
    }
  }
  for (int trial = 0; trial < 2000; ++trial) {
    std::string bytes = good;
    const int kind = trial % 3;
    if (kind == 0) {
      bytes.resize(std::uniform_int_distribution<std::size_t>(0, good.size() - 1)(gen));
    } else {
      const int flips = 1 + trial % 8;
      for (int f = 0; f < flips; ++f) {
        const auto pos = std::uniform_int_distribution<std::size_t>(0, bytes.size() - 1)(gen);
        bytes[pos] = static_cast<char>(std::uniform_int_distribution<int>(0, 255)(gen));
      }
      if (kind == 2) bytes += std::string(static_cast<std::size_t>(trial % 17), '\x01');
    }
    check(bytes);
  }
  EXPECT_GT(loaded, 0);
  EXPECT_GT(rejected, 0);
}

// A zero dimension makes the array empty whatever the other dimensions are, even when they
// multiply past 2^64: read_npy accepts such a file, so write_npy must write it back (fuzz_npy).
TEST_F(Npy, EmptyArrayWithHugeDimensionsRoundTrips) {
  const fa::index huge = fa::index{1} << 40;
  for (const std::vector<fa::index>& shape :
       {std::vector<fa::index>{huge, huge, 0}, std::vector<fa::index>{0, huge, huge}}) {
    fa::io::write_npy(path("e.npy"), shape, std::vector<float>{});
    const auto back = fa::io::read_npy<float>(path("e.npy"));
    EXPECT_EQ(back.shape, shape);
    EXPECT_TRUE(back.data.empty());
  }
  // Without a zero, the same dimensions overflow and are refused.
  EXPECT_THROW(
      fa::io::write_npy(path("e.npy"), std::vector<fa::index>{huge, huge, 2}, std::vector<float>{}),
      fa::invalid_argument);
}

// Issue 10 defect 16: only regular files are read. A FIFO without a writer used to block the
// reader forever, and a character device was read as a (too short) .npy file.
TEST_F(Npy, NonRegularFilesAreRefusedWithoutBlocking) {
  expect_error(dir_.string(), "is a directory, not a regular file");
  if (fs::exists("/dev/null"))
    expect_error("/dev/null", "is a character device, not a regular file");
  const std::string fifo = path("fifo.npy");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0) << std::strerror(errno);
  std::string what = refusal_without_blocking(fifo, [&] { (void)fa::io::read_npy<float>(fifo); });
  EXPECT_NE(what.find(fifo + ": is a FIFO, not a regular file"), std::string::npos) << what;
  what = refusal_without_blocking(fifo, [&] { (void)fa::io::read_npy_header(fifo); });
  EXPECT_NE(what.find(fifo + ": is a FIFO, not a regular file"), std::string::npos) << what;
  // Writing to a FIFO without a reader would block as well.
  what = refusal_without_blocking(
      fifo, [&] { fa::io::write_npy(fifo, std::vector<fa::index>{1}, std::vector<float>{1.f}); });
  EXPECT_NE(what.find(fifo + ": cannot write: is a FIFO, not a regular file"), std::string::npos)
      << what;
}

// Issue 10 defect 16 (writing): a failed write names the path and the system's reason; it used
// to say "write error (disk full?)" whatever happened, or "cannot open for writing".
TEST_F(Npy, WriteErrorsReportTheRealCause) {
  auto message = [](const std::string& p) {
    try {
      fa::io::write_npy(p, std::vector<fa::index>{2}, std::vector<float>{1.f, 2.f});
    } catch (const fa::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("(no exception)");
  };
  write_bytes(path("file"), "x");
  const std::string under_file = path("file") + "/a.npy";
  EXPECT_NE(message(under_file).find(under_file + ": cannot open for writing: Not a directory"),
            std::string::npos)
      << message(under_file);
  EXPECT_NE(message(dir_.string()).find(dir_.string() + ": cannot write: is a directory"),
            std::string::npos)
      << message(dir_.string());
  if (fs::exists("/dev/full")) {
    const std::string full = message("/dev/full");
    EXPECT_NE(full.find("/dev/full: write error: No space left on device"), std::string::npos)
        << full;
  }
  if (fs::exists("/proc/version")) {  // read-only: EACCES for a user, EIO for root
    const std::string proc = message("/proc/version");
    EXPECT_NE(proc.find("/proc/version: "), std::string::npos) << proc;
    EXPECT_EQ(proc.find("disk full"), std::string::npos) << proc;
    EXPECT_TRUE(proc.find(std::strerror(EACCES)) != std::string::npos ||
                proc.find(std::strerror(EIO)) != std::string::npos ||
                proc.find(std::strerror(EROFS)) != std::string::npos)
        << proc;
  }
}

// Issue 10 defect 11: sizes are computed with checked arithmetic; a dimension of 2^62 is a clear
// error naming the shape, in the header and when writing.
TEST_F(Npy, HugeDimensionsAreClearErrors) {
  write_bytes(path("big.npy"),
              make("{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 4), }",
                   floats({1.f, 2.f})));
  expect_error(path("big.npy"),
               "truncated data: shape (4611686018427387904, 4) needs more than 2^64 bytes, more "
               "than the 8 data bytes the file holds");
  write_bytes(path("big3.npy"),
              make("{'descr': '<f8', 'fortran_order': False, 'shape': (4611686018427387904, "
                   "4611686018427387904, 4611686018427387904), }",
                   ""));
  expect_error(path("big3.npy"), "needs more than 2^64 bytes, more than the 0 data bytes");
  write_bytes(path("short.npy"),
              make("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 4), }", floats({1.f})));
  expect_error(path("short.npy"), "shape (2, 4) needs 32 bytes, more than the 4 data bytes");
  try {
    fa::io::write_npy(path("w.npy"), std::vector<fa::index>{fa::index{1} << 62, 4},
                      std::vector<float>{});
    ADD_FAILURE() << "wrote a 2^64-element shape";
  } catch (const fa::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("shape (4611686018427387904, 4) has more elements than "
                                         "64-bit byte counts can hold"),
              std::string::npos)
        << e.what();
  }
}

TEST_F(Npy, WriteRejectsInconsistentShape) {
  EXPECT_THROW(
      fa::io::write_npy(path("w.npy"), std::vector<fa::index>{2, 3}, std::vector<float>(5)),
      fa::invalid_argument);
  EXPECT_THROW(fa::io::write_npy(path("w.npy"), std::vector<fa::index>{-1}, std::vector<float>(0)),
               fa::invalid_argument);
  EXPECT_THROW(fa::io::write_npy(dir_.string() + "/no/such/dir/w.npy", std::vector<fa::index>{1},
                                 std::vector<float>(1)),
               fa::invalid_argument);
}

}  // namespace
