// fastattn::io safetensors reader/writer: round trips of every dtype (F16 / BF16 through
// Eigen::half / Eigen::bfloat16), the finite-values read, and every kind of bad input: each must
// throw fastattn::invalid_argument with one line naming the file and the tensor(s), quickly and
// without building the header as a JSON document, and never block on a FIFO.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <fastattn/io/safetensors.hpp>

namespace fa = fastattn;
namespace fio = fastattn::io;
namespace fs = std::filesystem;
using idx = fa::index;

namespace {

using fa::testing::refusal_without_blocking;

/// A safetensors file from a header text (padded with spaces to 8 bytes) and a data buffer.
std::string make_file(std::string header, const std::string& data = "") {
  while (header.size() % 8) header += ' ';
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i)
    out[static_cast<std::size_t>(i)] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  return out + header + data;
}

template <class T>
std::string raw_bytes(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

class Safetensors : public fa::testing::temporary_directory_test {
 protected:
  std::string write(const std::string& name, const std::string& bytes) const {
    std::ofstream(path(name), std::ios::binary | std::ios::trunc) << bytes;
    return path(name);
  }
  /// Opening (and reading every tensor of) `p` must throw a one-line invalid_argument that names
  /// the file and contains `needle`; returns the message.
  static std::string refusal(const std::string& p, const std::string& needle) {
    try {
      const fio::safetensors_file f(p);
      for (const auto& [name, info] : f.tensors()) {
        if (fio::st_is_float(info.dtype))
          (void)f.read_finite<float>(name);
        else
          (void)f.read<std::int64_t>(name);
      }
      ADD_FAILURE() << "no exception for " << p << " (expected '" << needle << "')";
      return "";
    } catch (const fa::invalid_argument& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find(p), std::string::npos) << what;
      EXPECT_NE(what.find(needle), std::string::npos) << "expected '" << needle << "' in: " << what;
      EXPECT_EQ(what.find('\n'), std::string::npos) << "message must be one line: " << what;
      return what;
    }
  }
};

TEST_F(Safetensors, RoundTripsEveryWritableDtype) {
  const std::vector<float> f32 = {1.f, -2.5f, 3e-40f, std::numeric_limits<float>::max(), 0.f, 7.f};
  const std::vector<double> f64 = {1e-300, -1e300, 0.1, 2.0};
  std::vector<Eigen::half> f16;
  std::vector<Eigen::bfloat16> bf16;
  for (const float x : {1.f, -0.333f, 65504.f, 6e-8f, 1e-3f}) {
    f16.push_back(Eigen::half(x));
    bf16.push_back(Eigen::bfloat16(x));
  }
  const std::vector<std::int64_t> i64 = {-100, 0, std::numeric_limits<std::int64_t>::max()};
  const std::vector<std::int32_t> i32 = {-7, 42};
  fio::write_safetensors(
      path("all.safetensors"),
      {fio::st_write_tensor::make("f32", {2, 3}, f32), fio::st_write_tensor::make("f64", {4}, f64),
       fio::st_write_tensor::make("f16", {5}, f16),
       fio::st_write_tensor::make("bf16", {1, 5}, bf16),
       fio::st_write_tensor::make("i64", {3}, i64), fio::st_write_tensor::make("i32", {2, 1}, i32),
       fio::st_write_tensor::make("empty", {0, 3}, std::vector<float>{}),
       fio::st_write_tensor::make("scalar", {}, std::vector<float>{5.f})});
  const fio::safetensors_file f(path("all.safetensors"));
  EXPECT_EQ(f.tensors().size(), 8u);
  EXPECT_EQ(f.info("f32").shape, (std::vector<idx>{2, 3}));
  EXPECT_EQ(f.info("f16").dtype, fio::st_dtype::F16);
  EXPECT_EQ(f.info("bf16").dtype, fio::st_dtype::BF16);
  EXPECT_EQ(f.info("f32").numel(), 6);
  EXPECT_EQ(f.info("empty").numel(), 0);
  EXPECT_EQ(f.info("scalar").numel(), 1);
  EXPECT_EQ(f.read<float>("f32", {2, 3}), f32);
  EXPECT_EQ(f.read<double>("f64"), f64);
  const auto h = f.read<float>("f16");
  const auto b = f.read<double>("bf16");
  for (std::size_t i = 0; i < f16.size(); ++i) {
    EXPECT_EQ(h[i], static_cast<float>(f16[i]));
    EXPECT_EQ(b[i], static_cast<double>(static_cast<float>(bf16[i])));
  }
  EXPECT_EQ(f.read<std::int64_t>("i64"), i64);
  EXPECT_EQ(f.read<std::int32_t>("i32"), i32);
  EXPECT_TRUE(f.read<float>("empty").empty());
  EXPECT_EQ(f.read<float>("scalar"), std::vector<float>{5.f});
  // Every value is finite as double; -1e300 is not as float.
  for (const char* name : {"f32", "f64", "f16", "bf16", "empty", "scalar"})
    EXPECT_NO_THROW((void)f.read_finite<double>(name)) << name;
  EXPECT_NO_THROW((void)f.read_finite<float>("f32"));
  EXPECT_THROW((void)f.read_finite<float>("f64"), fa::invalid_argument);
}

TEST_F(Safetensors, HalfPrecisionConversions) {
  // F16 and BF16 as stored by PyTorch, hand-encoded: 1.0, -2.0, 0.5, 65504 (F16 max), the
  // smallest subnormal, -0, infinity.
  const std::vector<std::uint16_t> f16 = {0x3c00, 0xc000, 0x3800, 0x7bff, 0x0001, 0x8000, 0x7c00};
  const std::vector<std::uint16_t> bf16 = {0x3f80, 0xc000, 0x3f00, 0x4780, 0x0001, 0x8000, 0xff80};
  const std::string file = make_file(
      R"({"a":{"dtype":"F16","shape":[7],"data_offsets":[0,14]},"b":{"dtype":"BF16","shape":[7],"data_offsets":[14,28]},"__metadata__":{"format":"pt"}})",
      raw_bytes(f16) + raw_bytes(bf16));
  const fio::safetensors_file f(write("h.safetensors", file));
  const auto a = f.read<float>("a");
  const auto b = f.read<double>("b");
  EXPECT_EQ(a[0], 1.f);
  EXPECT_EQ(a[1], -2.f);
  EXPECT_EQ(a[2], 0.5f);
  EXPECT_EQ(a[3], 65504.f);
  EXPECT_EQ(a[4], std::ldexp(1.f, -24));
  EXPECT_TRUE(a[5] == 0.f && std::signbit(a[5]));
  EXPECT_EQ(a[6], std::numeric_limits<float>::infinity());
  EXPECT_EQ(b[0], 1.0);
  EXPECT_EQ(b[1], -2.0);
  EXPECT_EQ(b[2], 0.5);
  EXPECT_EQ(b[3], 65536.0);
  EXPECT_EQ(b[4], std::ldexp(1.0, -133));  // the smallest BF16 subnormal
  EXPECT_TRUE(b[5] == 0.0 && std::signbit(b[5]));
  EXPECT_EQ(b[6], -std::numeric_limits<double>::infinity());
  EXPECT_THROW((void)f.read<std::int64_t>("a"), fa::invalid_argument);
  // read_finite refuses the infinities, naming the tensor, the element and the value.
  try {
    (void)f.read_finite<float>("a");
    ADD_FAILURE() << "read_finite accepted an infinity";
  } catch (const fa::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("tensor 'a' has a non-finite value (inf) at element 6"),
              std::string::npos)
        << e.what();
  }
}

// Issue 10 defect 6 (reader part): a weight that is NaN or infinite, or that overflows the element
// type, is named (tensor, element, value) when it is read, not discovered later as a NaN loss.
TEST_F(Safetensors, ReadFiniteNamesTheTensorElementAndValue) {
  std::vector<float> w(20, 0.5f);
  w[17] = std::numeric_limits<float>::quiet_NaN();
  const std::vector<double> big = {1.0, 1e300, -2.0};
  fio::write_safetensors(path("w.safetensors"),
                         {fio::st_write_tensor::make("layer.0.query.weight", {4, 5}, w),
                          fio::st_write_tensor::make("big", {3}, big)});
  const fio::safetensors_file f(path("w.safetensors"));
  EXPECT_TRUE(std::isnan(f.read<float>("layer.0.query.weight")[17]));  // read() converts only
  auto message = [&](auto read) {
    try {
      read();
    } catch (const fa::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("(no exception)");
  };
  const std::string nan = message([&] {
    (void)f.read_finite<double>("layer.0.query.weight", {4, 5});
  });
  EXPECT_NE(nan.find(path("w.safetensors") +
                     ": tensor 'layer.0.query.weight' has a non-finite value (nan) at element 17"),
            std::string::npos)
      << nan;
  EXPECT_EQ(f.read_finite<double>("big")[1], 1e300);  // finite as double
  const std::string overflow = message([&] { (void)f.read_finite<float>("big"); });
  EXPECT_NE(overflow.find("tensor 'big' has the value 1e+300 at element 1, which overflows float"),
            std::string::npos)
      << overflow;
  // read() turns it into an infinity (defined behaviour, no UB).
  EXPECT_EQ(f.read<float>("big")[1], std::numeric_limits<float>::infinity());
}

// Issue 10 defect 14: a header of deeply nested "__metadata__" JSON used to be built as a JSON
// document (about 38 bytes of memory per header byte); it is now refused at nesting depth 64,
// quickly, and nothing of the metadata is stored.
TEST_F(Safetensors, DeeplyNestedHeaderIsRefusedQuickly) {
  const std::size_t depth = 100000;
  const std::string tensor = R"("a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]})";
  const std::string data(4, '\0');
  const auto start = std::chrono::steady_clock::now();
  const std::string deep_array =
      "{\"__metadata__\":" + std::string(depth, '[') + std::string(depth, ']') + "," + tensor + "}";
  refusal(write("deep_array.safetensors", make_file(deep_array, data)),
          "header JSON nests deeper than 64 levels in '__metadata__'");
  std::string deep_object = "{" + tensor + ",\"__metadata__\":";
  for (std::size_t i = 0; i < depth; ++i) deep_object += "{\"k\":";
  deep_object += "1" + std::string(depth, '}') + "}";
  refusal(write("deep_object.safetensors", make_file(deep_object, data)),
          "nests deeper than 64 levels in '__metadata__'");
  // The same inside a key of a tensor entry that the format does not define.
  const std::string deep_entry = R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":)" +
                                 std::string(depth, '[') + std::string(depth, ']') + "}}";
  refusal(write("deep_entry.safetensors", make_file(deep_entry, data)),
          "nests deeper than 64 levels in tensor 'a'");
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 5.0) << "three 200 kB headers took " << seconds << " s";

  // Nesting within the bound, and any metadata values, are skipped.
  const std::string shallow =
      "{\"__metadata__\":{\"format\":\"pt\",\"nested\":" + std::string(60, '[') + "1,{\"x\":null}" +
      std::string(60, ']') + "}," + tensor + "}";
  const fio::safetensors_file f(write("shallow.safetensors", make_file(shallow, data)));
  EXPECT_EQ(f.tensors().size(), 1u);
  EXPECT_FALSE(f.contains("__metadata__"));
  EXPECT_EQ(f.read<float>("a"), std::vector<float>{0.f});
}

TEST_F(Safetensors, MetadataAndUnknownKeysAreSkipped) {
  const std::string header =
      R"({"__metadata__":{"format":"pt","list":[1,2.5,"x",true,null,{"y":[]}]},)"
      R"("b":{"extra":{"k":[1,2]},"data_offsets":[4,8],"shape":[1],"note":"hi","dtype":"F32"},)"
      R"("a":{"dtype":"I32","shape":[1],"data_offsets":[0,4]},"__metadata__":7})";
  const std::vector<std::int32_t> a = {-3};
  const std::vector<float> b = {2.5f};
  const fio::safetensors_file f(
      write("m.safetensors", make_file(header, raw_bytes(a) + raw_bytes(b))));
  EXPECT_EQ(f.tensors().size(), 2u);
  EXPECT_EQ(f.read<std::int64_t>("a"), std::vector<std::int64_t>{-3});
  EXPECT_EQ(f.read<float>("b"), b);
}

// Issue 10 defect 16: overlapping tensors are refused naming both of them.
TEST_F(Safetensors, OverlappingTensorsAreBothNamed) {
  const std::string header = R"({"first.weight":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                             R"("other":{"dtype":"F32","shape":[1],"data_offsets":[16,20]},)"
                             R"("second.bias":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},)"
                             R"("nothing":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}})";
  refusal(write("o.safetensors", make_file(header, std::string(20, '\0'))),
          "tensors 'first.weight' (bytes [0, 16)) and 'second.bias' (bytes [8, 16)) overlap");
}

// Issue 10 defect 16: a directory, FIFO or device is refused naming what it is, before it is
// opened (a FIFO without a writer used to block the reader forever, a directory was "no such
// file").
TEST_F(Safetensors, NonRegularFilesAreRefusedWithoutBlocking) {
  refusal(dir_.string(), "is a directory, not a regular file");
  refusal(path("missing.safetensors"), "cannot open: no such file");
  if (fs::exists("/dev/null")) refusal("/dev/null", "is a character device, not a regular file");
  const std::string fifo = path("fifo.safetensors");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0) << std::strerror(errno);
  const std::string what =
      refusal_without_blocking(fifo, [&] { const fio::safetensors_file f(fifo); });
  EXPECT_NE(what.find(fifo + ": is a FIFO, not a regular file"), std::string::npos) << what;
}

// Issue 10 defect 11: every product of extents and byte counts is checked; a dimension of 2^62
// is a clear error, never an overflow.
TEST_F(Safetensors, HugeExtentsAreCheckedNotOverflowed) {
  const idx big = idx{1} << 62;
  // A shape that claims 2^64 elements over 0 bytes, and one of 2^186 elements over 4 bytes.
  refusal(write("claims.safetensors",
                make_file(R"({"a":{"dtype":"F32","shape":[4611686018427387904,4],)"
                          R"("data_offsets":[0,0]}})")),
          "byte size 0 does not match dtype F32 and shape [4611686018427387904, 4]");
  refusal(write("claims3.safetensors",
                make_file(R"({"a":{"dtype":"F32","shape":[4611686018427387904,)"
                          R"(4611686018427387904,4611686018427387904],"data_offsets":[0,4]}})",
                          std::string(4, '\0'))),
          "byte size 4 does not match dtype F32");
  refusal(
      write("extent.safetensors", make_file(R"({"a":{"dtype":"F32","shape":[9223372036854775808],)"
                                            R"("data_offsets":[0,0]}})")),
      "shape extent 9223372036854775808 is too large");
  // An empty tensor whose other extents multiply past 2^64 is valid, and counts 0 elements.
  const fio::safetensors_file f(write(
      "empty.safetensors", make_file(R"({"e":{"dtype":"F32","shape":[4611686018427387904,4,0],)"
                                     R"("data_offsets":[0,0]}})")));
  EXPECT_EQ(f.info("e").numel(), 0);
  EXPECT_TRUE(f.read<float>("e").empty());
  // numel() of a shape it cannot count throws instead of overflowing.
  const fio::st_tensor_info huge{fio::st_dtype::F32, {big, 4}, 0, 0};
  EXPECT_THROW((void)huge.numel(), fa::invalid_argument);
  // The writer checks the shape against the data: a 2^62 x 4 shape over no data used to be
  // written as is (an unreadable file).
  try {
    (void)fio::st_write_tensor::make("w", {big, 4}, std::vector<float>{});
    ADD_FAILURE() << "make accepted a shape of 2^64 elements for no data";
  } catch (const fa::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("tensor 'w': shape [4611686018427387904, 4] has more "
                                         "elements than 64-bit byte counts can hold"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW((void)fio::st_write_tensor::make("w", {2, 3}, std::vector<float>(5)),
               fa::invalid_argument);
  fio::st_write_tensor lying = fio::st_write_tensor::make("l", {2}, std::vector<float>{1, 2});
  lying.shape = {big, big};
  EXPECT_THROW(fio::write_safetensors(path("lying.safetensors"), {lying}), fa::invalid_argument);
}

TEST_F(Safetensors, RejectsEachKindOfCorruption) {
  const std::string data(16, '\0');
  struct bad {
    std::string name, bytes, needle;
  };
  const auto entry = [](const std::string& body) { return "{\"t\":{" + body + "}}"; };
  const std::string ok_shape = R"("shape":[2],"data_offsets":[0,8])";
  std::string huge_len = make_file(entry(R"("dtype":"F32",)" + ok_shape), data);
  huge_len[6] = '\x7f';
  const std::vector<bad> cases = {
      {"empty", "", "shorter than the 8-byte header length"},
      {"short", std::string(5, '\0'), "shorter than the 8-byte header length"},
      {"huge_len", huge_len, "exceeds the file"},
      {"not_json", make_file("{nope", data), "header is not valid JSON"},
      {"trailing", make_file("{} x", data), "header is not valid JSON"},
      {"array", make_file("[1,2]", data), "header is not a JSON object"},
      {"number", make_file("7", data), "header is not a JSON object"},
      {"entry_not_object", make_file(R"({"t":[1]})", data),
       "tensor 't': entry must be an object with dtype, shape and data_offsets"},
      {"missing_dtype", make_file(entry(ok_shape), data), "tensor 't': entry must be an object"},
      {"missing_offsets", make_file(entry(R"("dtype":"F32","shape":[2])"), data),
       "it has no 'data_offsets'"},
      {"dtype_number", make_file(entry(R"("dtype":4,)" + ok_shape), data),
       "dtype must be a string"},
      {"dtype_unknown", make_file(entry(R"("dtype":"Q8",)" + ok_shape), data),
       "unsupported dtype 'Q8'"},
      {"dtype_twice", make_file(entry(R"("dtype":"F32","dtype":"F32",)" + ok_shape), data),
       "duplicate key 'dtype'"},
      {"shape_negative",
       make_file(entry(R"("dtype":"F32","shape":[-2],"data_offsets":[0,8])"), data),
       "shape entries must be non-negative integers"},
      {"shape_float", make_file(entry(R"("dtype":"F32","shape":[2.0],"data_offsets":[0,8])"), data),
       "shape entries must be non-negative integers"},
      {"shape_nested",
       make_file(entry(R"("dtype":"F32","shape":[[2]],"data_offsets":[0,8])"), data),
       "shape entries must be non-negative integers"},
      {"shape_scalar", make_file(entry(R"("dtype":"F32","shape":2,"data_offsets":[0,8])"), data),
       "shape must be an array"},
      {"rank_17",
       make_file(entry(R"("dtype":"F32","shape":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1],)"
                       R"("data_offsets":[0,4])"),
                 data),
       "shape has more than 16 extents"},
      {"offsets_three",
       make_file(entry(R"("dtype":"F32","shape":[2],"data_offsets":[0,4,8])"), data),
       "data_offsets must be [begin, end]"},
      {"offsets_one", make_file(entry(R"("dtype":"F32","shape":[2],"data_offsets":[8])"), data),
       "data_offsets must be [begin, end]"},
      {"offsets_outside",
       make_file(entry(R"("dtype":"F32","shape":[2],"data_offsets":[12,20])"), data),
       "data_offsets [12, 20] outside the data buffer of 16 bytes"},
      {"offsets_reversed",
       make_file(entry(R"("dtype":"F32","shape":[0],"data_offsets":[8,4])"), data),
       "data_offsets [8, 4] outside"},
      {"size_mismatch", make_file(entry(R"("dtype":"F64","shape":[2],"data_offsets":[0,8])"), data),
       "byte size 8 does not match dtype F64 and shape [2] (which needs 16 bytes)"},
      {"listed_twice",
       make_file(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                 R"("t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                 data),
       "tensor 't' is listed twice"},
      {"name_with_newline",
       make_file(R"({"a\nb":{"dtype":"F32","shape":[3],"data_offsets":[0,4]}})", data),
       "tensor 'a?b'"},
      {"invalid_utf8", make_file("{\"\xff\":{}}", data), "header is not valid JSON"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    refusal(write(c.name + ".safetensors", c.bytes), c.needle);
  }
  // Kind, shape and name checks when reading.
  const std::vector<float> v = {1.f, 2.f};
  fio::write_safetensors(path("ok.safetensors"), {fio::st_write_tensor::make("v", {2}, v)});
  const fio::safetensors_file f(path("ok.safetensors"));
  EXPECT_THROW((void)f.read<float>("v", {1, 2}), fa::invalid_argument);
  EXPECT_THROW((void)f.read<std::int32_t>("v"), fa::invalid_argument);
  EXPECT_THROW((void)f.read<float>("w"), fa::invalid_argument);
}

TEST_F(Safetensors, RandomDamageNeverCrashes) {
  std::vector<float> v(12);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i) - 3.f;
  fio::write_safetensors(path("good.safetensors"),
                         {fio::st_write_tensor::make("a", {3, 4}, v),
                          fio::st_write_tensor::make("b", {2}, std::vector<std::int64_t>{1, 2})});
  std::ifstream in(path("good.safetensors"), std::ios::binary);
  const std::string good(std::istreambuf_iterator<char>(in), {});
  std::mt19937_64 gen(11);
  int loaded = 0, refused = 0;
  for (int trial = 0; trial < 600; ++trial) {
    std::string bytes = good;
    if (trial % 3 == 0) {
      bytes.resize(std::uniform_int_distribution<std::size_t>(0, good.size() - 1)(gen));
    } else {
      for (int k = 0; k < 1 + trial % 4; ++k)
        bytes[std::uniform_int_distribution<std::size_t>(0, good.size() - 1)(gen)] =
            static_cast<char>(std::uniform_int_distribution<int>(0, 255)(gen));
    }
    const std::string p = write("damaged.safetensors", bytes);
    try {
      const fio::safetensors_file f(p);
      for (const auto& [name, info] : f.tensors()) {
        const std::uint64_t items = (info.end - info.begin) / fio::st_item_size(info.dtype);
        if (fio::st_is_float(info.dtype))
          EXPECT_EQ(f.read<double>(name).size(), items);
        else
          EXPECT_EQ(f.read<std::int64_t>(name).size(), items);
        EXPECT_EQ(static_cast<std::uint64_t>(info.numel()), items);
      }
      ++loaded;
    } catch (const fa::invalid_argument& e) {
      EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << e.what();
      ++refused;
    }
  }
  EXPECT_GT(loaded, 0);
  EXPECT_GT(refused, 0);
}

// Issue 10 defect 16 (writer): failures name the path and the system's reason.
TEST_F(Safetensors, WriterRefusesBadTensorsAndReportsTheRealCause) {
  const auto t = fio::st_write_tensor::make("t", {1}, std::vector<float>{1.f});
  auto message = [](auto write_it) {
    try {
      write_it();
    } catch (const fa::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("(no exception)");
  };
  EXPECT_NE(message([&] {
              fio::write_safetensors(path("d.safetensors"), {t, t});
            }).find("tensor 't' is given twice"),
            std::string::npos);
  // A negative extent is named as such (regression: it was reported as "more elements than
  // 64-bit byte counts can hold").
  const std::string negative = message([] {
    (void)fio::st_write_tensor::make("n", {2, -3}, std::vector<float>{});
  });
  EXPECT_NE(negative.find("tensor 'n': shape [2, -3] has a negative extent -3"), std::string::npos)
      << negative;
  // More extents than the reader accepts are refused on writing (regression: such a file was
  // written and then refused by read).
  const std::string deep = message([] {
    (void)fio::st_write_tensor::make("deep", std::vector<fa::index>(17, 1),
                                     std::vector<float>{1.f});
  });
  EXPECT_NE(deep.find("has 17 extents; at most 16 can be read back"), std::string::npos) << deep;
  EXPECT_NO_THROW((void)fio::st_write_tensor::make("ok", std::vector<fa::index>(16, 1),
                                                   std::vector<float>{1.f}));
  auto filled = t;  // a tensor filled in directly is checked by the writer
  filled.shape.assign(17, 1);
  const std::string deep_filled =
      message([&] { fio::write_safetensors(path("deep.safetensors"), {filled}); });
  EXPECT_NE(deep_filled.find("has more than 16 extents (it could not be read back)"),
            std::string::npos)
      << deep_filled;
  auto meta = t;
  meta.name = "__metadata__";
  EXPECT_NE(message([&] {
              fio::write_safetensors(path("d.safetensors"), {meta});
            }).find("cannot write a tensor named __metadata__"),
            std::string::npos);
  EXPECT_NE(message([&] {
              fio::write_safetensors(dir_.string(), {t});
            }).find(dir_.string() + ": cannot write: is a directory"),
            std::string::npos);
  write("file", "x");
  const std::string under_file = path("file") + "/x.safetensors";
  const std::string not_dir = message([&] { fio::write_safetensors(under_file, {t}); });
  EXPECT_NE(not_dir.find(under_file + ": cannot open for writing: Not a directory"),
            std::string::npos)
      << not_dir;
  if (fs::exists("/dev/full")) {
    const std::string full = message([&] { fio::write_safetensors("/dev/full", {t}); });
    EXPECT_NE(full.find("/dev/full: write error: No space left on device"), std::string::npos)
        << full;
  }
}

}  // namespace
