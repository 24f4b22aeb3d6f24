// The `fastattn` command-line tool (examples/fastattn_cli.cpp): round trips through .npy files
// match attention() for every kernel, flags map onto the policies' knobs, and bad input of every
// kind (flags, shapes, corrupted files) gives one clear line on stderr and exit status 1, never a
// crash.
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <fastattn/fastattn.hpp>
#include <fastattn/io/npy.hpp>

#include "kernels.hpp"  // examples/: the tool's kernel list, so new kernels are tested too
#include "npy.hpp"
#include "reference.hpp"

namespace fa = fastattn;
namespace fs = std::filesystem;

namespace {

#ifndef FASTATTN_CLI_PATH
#define FASTATTN_CLI_PATH ""
#endif

struct result {
  int status = -1;  ///< exit status, or -1 if killed by a signal
  bool signaled = false;
  std::string out, err;
};

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::string(FASTATTN_CLI_PATH).empty()) GTEST_SKIP() << "examples are not built";
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("fastattn_test_cli_" + std::to_string(::getpid()) + "_" + info->name());
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  static std::string slurp(const std::string& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }

  result run(const std::string& args) const {
    const std::string cmd = std::string(FASTATTN_CLI_PATH) + " " + args + " >" + path("stdout") +
                            " 2>" + path("stderr");
    const int raw = std::system(cmd.c_str());
    result r;
    if (WIFEXITED(raw)) {
      r.status = WEXITSTATUS(raw);
    } else {
      r.signaled = true;
    }
    r.out = slurp(path("stdout"));
    r.err = slurp(path("stderr"));
    return r;
  }

  /// Expects a clean failure: status 1, exactly one line on stderr starting "fastattn: " and
  /// containing `needle`.
  void expect_clean_error(const std::string& args, const std::string& needle) const {
    SCOPED_TRACE(args);
    const result r = run(args);
    EXPECT_FALSE(r.signaled);
    EXPECT_EQ(r.status, 1) << r.err;
    ASSERT_FALSE(r.err.empty());
    EXPECT_EQ(r.err.rfind("fastattn: ", 0), 0u) << r.err;
    EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << "expected one line, got: " << r.err;
    EXPECT_NE(r.err.find(needle), std::string::npos) << "expected '" << needle << "' in: " << r.err;
  }

  template <class T>
  void save(const std::string& name, const fa::matrix<T>& m) const {
    fa::io::write_npy(path(name), m);
  }
  template <class T>
  void save3(const std::string& name, const std::vector<fa::matrix<T>>& heads) const {
    std::vector<T> data;
    for (const auto& h : heads) data.insert(data.end(), h.data(), h.data() + h.size());
    fa::io::write_npy(path(name),
                      std::vector<fa::index>{static_cast<fa::index>(heads.size()), heads[0].rows(),
                                             heads[0].cols()},
                      data);
  }
  std::string qkv() const {
    return "--q " + path("q.npy") + " --k " + path("k.npy") + " --v " + path("v.npy");
  }

  fs::path dir_;
};

TEST_F(Cli, HelpListsEveryKernelAndKnobWithDefaults) {
  const result r = run("--help");
  EXPECT_EQ(r.status, 0);
  fa::examples::for_each_kernel([&](const auto& tag) {
    using P = std::decay_t<decltype(tag)>;
    EXPECT_NE(r.out.find("--kernel " + std::string(P::name)), std::string::npos) << P::name;
    const P defaults{};
    fa::examples::for_each_knob<P>([&](const auto& k) {
      const std::string line =
          "--" + k.flag() + " " + fa::examples::format_value(defaults.*(k.member));
      EXPECT_NE(r.out.find(line), std::string::npos) << line;
    });
  });
  for (const char* flag :
       {"--scale", "--key-length", "--query-length", "--causal", "--reference", "--q", "--out"})
    EXPECT_NE(r.out.find(flag), std::string::npos) << flag;
}

TEST_F(Cli, EveryKernelRoundTripsAndMatchesAttention) {
  const auto in = fa::testing::make_peaked<float>(150, 130, 16, 12, 3);
  save("q.npy", in.q);
  save("k.npy", in.k);
  save("v.npy", in.v);
  fa::examples::for_each_kernel([&](const auto& tag) {
    using P = std::decay_t<decltype(tag)>;
    SCOPED_TRACE(std::string(P::name));
    const result r =
        run("--kernel " + std::string(P::name) + " " + qkv() + " --out " + path("o.npy"));
    ASSERT_EQ(r.status, 0) << r.err;
    const auto o = fa::testing::load_npy<float>(path("o.npy"));
    ASSERT_EQ(o.shape, (std::vector<fa::index>{150, 12}));
    const fa::matrix<float> expected = fa::attention(P{}, in.q, in.k, in.v);
    EXPECT_EQ(fa::testing::as_matrix(o), expected);
  });
}

TEST_F(Cli, KnobsAndCommonOptionsReachThePolicy) {
  const auto q = fa::testing::gaussian<double>(70, 8, 1),
             k = fa::testing::gaussian<double>(90, 8, 2),
             v = fa::testing::gaussian<double>(90, 5, 3);
  save("q.npy", q);
  save("k.npy", k);
  save("v.npy", v);
  const result r =
      run("--kernel dense --query-block 7 --key-block=13 --scale 0.3 --key-length 80 "
          "--query-length 60 --causal " +
          qkv() + " --out " + path("o.npy"));
  ASSERT_EQ(r.status, 0) << r.err;
  const auto o = fa::testing::load_npy<double>(path("o.npy"));  // float64 in -> float64 out
  const fa::options opt{.scale = 0.3, .key_length = 80, .query_length = 60, .causal = true};
  EXPECT_LT(fa::testing::relative_error(fa::testing::as_matrix(o),
                                        fa::testing::reference_attention(q, k, v, opt)),
            1e-12);
  EXPECT_EQ(fa::io::read_npy_header(path("o.npy")).dtype, fa::io::npy_dtype::float64);
  // --precision float computes (and writes) in float.
  ASSERT_EQ(run("--kernel dense --precision float " + qkv() + " --out " + path("f.npy")).status, 0);
  EXPECT_EQ(fa::io::read_npy_header(path("f.npy")).dtype, fa::io::npy_dtype::float32);
}

#ifdef FASTATTN_EXAMPLES_HAVE_CLUSTERED
TEST_F(Cli, ClusteredKnobsMatchThePolicy) {
  const auto in = fa::testing::make_peaked<float>(200, 200, 16, 16, 9);
  save("q.npy", in.q);
  save("k.npy", in.k);
  save("v.npy", in.v);
  const result r =
      run("--kernel clustered --clusters 7 --bits 31 --iterations 3 --hash-bias false "
          "--seed 42 " +
          qkv() + " --out " + path("o.npy"));
  ASSERT_EQ(r.status, 0) << r.err;
  const fa::clustered policy{
      .clusters = 7, .bits = 31, .iterations = 3, .hash_bias = false, .seed = 42};
  EXPECT_EQ(fa::testing::as_matrix(fa::testing::load_npy<float>(path("o.npy"))),
            fa::matrix<float>(fa::attention(policy, in.q, in.k, in.v)));
  expect_clean_error("--kernel clustered --causal " + qkv() + " --out " + path("o.npy"), "causal");
}
#endif

TEST_F(Cli, SeveralHeadsMatchPerHeadAttention) {
  std::vector<fa::matrix<float>> q, k, v;
  for (int h = 0; h < 3; ++h) {
    const auto in = fa::testing::make_peaked<float>(64, 80, 8, 6, 10 + static_cast<unsigned>(h));
    q.push_back(in.q);
    k.push_back(in.k);
    v.push_back(in.v);
  }
  save3("q.npy", q);
  save3("k.npy", k);
  save3("v.npy", v);
  fa::examples::for_each_kernel([&](const auto& tag) {
    using P = std::decay_t<decltype(tag)>;
    SCOPED_TRACE(std::string(P::name));
    const result r = run("--kernel " + std::string(P::name) + " --threads 2 --key-length 70 " +
                         qkv() + " --out " + path("o.npy"));
    ASSERT_EQ(r.status, 0) << r.err;
    const auto o = fa::testing::load_npy<float>(path("o.npy"));
    ASSERT_EQ(o.shape, (std::vector<fa::index>{3, 64, 6}));
    for (int h = 0; h < 3; ++h) {
      fa::matrix<float> got(64, 6);
      std::copy_n(o.data.begin() + h * 64 * 6, 64 * 6, got.data());
      fa::matrix<float> expected(64, 6);
      if constexpr (P::is_exact) {
        expected =
            fa::attention(P{}, q[static_cast<std::size_t>(h)], k[static_cast<std::size_t>(h)],
                          v[static_cast<std::size_t>(h)], {.key_length = 70});
        EXPECT_LT(fa::testing::relative_error(got, expected), 1e-6);
      } else if (h == 0) {  // head 0 uses random stream 0, as attention() does
        expected = fa::attention(P{}, q[0], k[0], v[0], {.key_length = 70});
        EXPECT_EQ(got, expected);
      }
    }
  });
}

TEST_F(Cli, ReferencePrintsErrorAndTime) {
  const auto in = fa::testing::make_peaked<float>(100, 100, 16, 16, 4);
  save("q.npy", in.q);
  save("k.npy", in.k);
  save("v.npy", in.v);
  const result r = run("--kernel dense --reference " + qkv());
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("relative error:"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("time:"), std::string::npos) << r.out;
  const auto pos = r.out.find("relative error:");
  EXPECT_LT(std::stod(r.out.substr(pos + 15)), 1e-5) << r.out;
}

TEST_F(Cli, BadFlagsAndShapesGiveOneClearLine) {
  save("q.npy", fa::testing::gaussian<float>(10, 4, 1));
  save("k.npy", fa::testing::gaussian<float>(12, 4, 2));
  save("v.npy", fa::testing::gaussian<float>(12, 3, 3));
  save("k5.npy", fa::testing::gaussian<float>(12, 5, 4));
  save("v11.npy", fa::testing::gaussian<float>(11, 3, 5));
  fa::io::write_npy(path("q1.npy"), std::vector<fa::index>{40}, std::vector<float>(40));
  save3("q3.npy", std::vector<fa::matrix<float>>(2, fa::testing::gaussian<float>(10, 4, 1)));
  save3("k3.npy", std::vector<fa::matrix<float>>(3, fa::testing::gaussian<float>(12, 4, 1)));
  save3("v3.npy", std::vector<fa::matrix<float>>(2, fa::testing::gaussian<float>(12, 3, 1)));
  const std::string out = " --out " + path("o.npy");
  expect_clean_error(qkv() + out, "--kernel is required");
  expect_clean_error("--kernel nope " + qkv() + out, "unknown kernel 'nope'");
  expect_clean_error("--kernel dense --frobnicate 3 " + qkv() + out, "unknown flag --frobnicate");
  expect_clean_error("--kernel dense --query-block x7 " + qkv() + out, "--query-block");
  expect_clean_error("--kernel dense --query-block 0 " + qkv() + out, "query_block");
  expect_clean_error("--kernel dense --query-block 99999999999999999999 " + qkv() + out, "range");
  expect_clean_error("--kernel dense --scale nan " + qkv() + out, "--scale");
  expect_clean_error("--kernel dense " + qkv() + " --out", "needs a value");
  expect_clean_error("--kernel dense --q " + path("q.npy") + out, "--k is required");
  expect_clean_error("--kernel dense " + qkv(), "--out is required");
  expect_clean_error("--kernel dense stray " + qkv() + out, "unexpected argument 'stray'");
  expect_clean_error("--kernel dense --causal=1 " + qkv() + out, "takes no value");
  expect_clean_error("--kernel dense --kernel dense " + qkv() + out, "twice");
  if (fa::examples::all_knob_flags().count("clusters"))
    expect_clean_error("--kernel dense --clusters 5 " + qkv() + out,
                       "not a knob of kernel 'dense'");
  expect_clean_error("--kernel dense --key-length 13 " + qkv() + out, "key_length");
  expect_clean_error("--kernel dense --query-length -1 " + qkv() + out, "query_length");
  expect_clean_error("--kernel dense --precision half " + qkv() + out, "--precision");
  expect_clean_error("--kernel dense --q " + path("q.npy") + " --k " + path("k5.npy") + " --v " +
                         path("v.npy") + out,
                     "same feature size");
  expect_clean_error("--kernel dense --q " + path("q.npy") + " --k " + path("k.npy") + " --v " +
                         path("v11.npy") + out,
                     "as many rows");
  expect_clean_error("--kernel dense --q " + path("q1.npy") + " --k " + path("k.npy") + " --v " +
                         path("v.npy") + out,
                     "must be 2-d");
  expect_clean_error("--kernel dense --q " + path("q3.npy") + " --k " + path("k.npy") + " --v " +
                         path("v.npy") + out,
                     "all be 3-d");
  expect_clean_error("--kernel dense --q " + path("q3.npy") + " --k " + path("k3.npy") + " --v " +
                         path("v3.npy") + out,
                     "same number of heads");
  expect_clean_error("--kernel dense --q " + path("missing.npy") + " --k " + path("k.npy") +
                         " --v " + path("v.npy") + out,
                     "no such file");
  expect_clean_error("--kernel dense " + qkv() + " --out " + path("no/such/dir/o.npy"),
                     "cannot open for writing");
}

TEST_F(Cli, BadFilesGiveOneClearLine) {
  save("k.npy", fa::testing::gaussian<float>(12, 4, 2));
  save("v.npy", fa::testing::gaussian<float>(12, 3, 3));
  save("q.npy", fa::testing::gaussian<float>(10, 4, 1));
  const std::string good = slurp(path("q.npy"));
  auto variant = [&](const std::string& name, std::string bytes) {
    std::ofstream(path(name), std::ios::binary) << bytes;
    return "--kernel dense --q " + path(name) + " --k " + path("k.npy") + " --v " + path("v.npy") +
           " --out " + path("o.npy");
  };
  auto replaced = [&](const std::string& from, const std::string& to) {
    std::string b = good;
    b.replace(b.find(from), from.size(), to);
    return b;
  };
  std::string magic = good;
  magic[0] = 'X';
  expect_clean_error(variant("magic.npy", magic), "bad magic");
  expect_clean_error(variant("trunc.npy", good.substr(0, good.size() - 4)), "truncated data");
  expect_clean_error(variant("fortran.npy", replaced("False", "True ")), "Fortran");
  expect_clean_error(variant("int.npy", replaced("<f4", "<i4")), "unsupported dtype");
  expect_clean_error(variant("big.npy", replaced("<f4", ">f4")), "big-endian");
  expect_clean_error(variant("shape.npy", replaced("(10, 4)", "(10, 5)")), "truncated data");
  expect_clean_error(variant("empty.npy", ""), "too short");
}

TEST_F(Cli, NonFiniteInputs) {
  auto q = fa::testing::gaussian<float>(10, 4, 1);
  q(3, 2) = std::numeric_limits<float>::quiet_NaN();
  save("q.npy", q);
  save("k.npy", fa::testing::gaussian<float>(12, 4, 2));
  save("v.npy", fa::testing::gaussian<float>(12, 3, 3));
  if constexpr (requires(fa::options o) { o.check_finite = true; }) {
    expect_clean_error("--kernel dense " + qkv() + " --out " + path("o.npy"), "--no-check-finite");
  }
  const result r = run("--kernel dense --no-check-finite " + qkv() + " --out " + path("o.npy"));
  EXPECT_EQ(r.status, 0) << r.err;
}

TEST_F(Cli, FuzzedFilesNeverCrashTheTool) {
  // Random byte flips and truncations of valid q, k and v files: every run either succeeds or
  // fails cleanly (status 1, one line on stderr); a crash or a sanitizer report fails the test.
  save("q.npy", fa::testing::gaussian<float>(10, 4, 1));
  save("k.npy", fa::testing::gaussian<float>(12, 4, 2));
  save("v.npy", fa::testing::gaussian<float>(12, 3, 3));
  const std::string names[3] = {"q.npy", "k.npy", "v.npy"};
  std::string good[3];
  for (int i = 0; i < 3; ++i) good[i] = slurp(path(names[i]));
  std::mt19937_64 gen(2024);
  int ok = 0, failed = 0;
  for (int trial = 0; trial < 150; ++trial) {
    const int which = trial % 3;
    std::string bytes = good[which];
    if (trial % 4 == 0) {
      bytes.resize(std::uniform_int_distribution<std::size_t>(0, bytes.size() - 1)(gen));
    } else {
      // Mostly damage the header, where the parsing is.
      const std::size_t limit = trial % 4 == 1 ? bytes.size() - 1 : 127;
      for (int f = 0; f < 1 + trial % 5; ++f)
        bytes[std::uniform_int_distribution<std::size_t>(0, limit)(gen)] =
            static_cast<char>(std::uniform_int_distribution<int>(0, 255)(gen));
    }
    std::ofstream(path("fuzz.npy"), std::ios::binary) << bytes;
    std::string files[3] = {path("q.npy"), path("k.npy"), path("v.npy")};
    files[which] = path("fuzz.npy");
    const result r = run("--kernel dense --q " + files[0] + " --k " + files[1] + " --v " +
                         files[2] + " --out " + path("o.npy"));
    ASSERT_FALSE(r.signaled) << "trial " << trial;
    if (r.status == 0) {
      ++ok;
      EXPECT_TRUE(r.err.empty()) << r.err;
    } else {
      ++failed;
      EXPECT_EQ(r.status, 1) << "trial " << trial << ": " << r.err;
      EXPECT_EQ(r.err.rfind("fastattn: ", 0), 0u) << r.err;
      EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << "trial " << trial << ": " << r.err;
    }
  }
  EXPECT_GT(failed, 0);
  RecordProperty("succeeded", ok);
}

}  // namespace
