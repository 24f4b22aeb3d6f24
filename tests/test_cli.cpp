// The `fastattn` command-line tool (tools/fastattn.cpp): round trips through .npy files match the
// library for every kernel of fastattn::kernels, flags map onto the policies' knobs, several heads
// run as heads, library errors name the flag or file the user gave, and bad input of every kind
// (flags, shapes, corrupted files, sizes) gives one clear line on stderr and exit status 1, never
// a crash. The kernels and their flags are derived here from fastattn::kernels, as in the tool, so
// a new kernel is tested without touching this file.
#include <gtest/gtest.h>

#include <sys/resource.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <fastattn/fastattn.hpp>
#include <fastattn/io/npy.hpp>

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
  long max_rss_kib = 0;  ///< peak resident memory of the tool (run_measured only)
};

/// A knob's default as the tool prints it (shortest round-trip form, bools as true/false).
template <class T>
std::string text(const T& value) {
  if constexpr (std::is_same_v<T, bool>) {
    return value ? "true" : "false";
  } else {
    char buffer[64];
    return std::string(buffer, std::to_chars(buffer, buffer + sizeof buffer, value).ptr);
  }
}

/// The lines of a text, without their '\n'.
std::vector<std::string> lines(const std::string& s) {
  std::vector<std::string> out;
  std::istringstream in(s);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

/// A .npy array read back: shape and data.
template <class T>
fa::io::npy_array<T> load(const std::string& path) {
  return fa::io::read_npy<T>(path);
}

template <class T>
fa::matrix<T> as_matrix(const fa::io::npy_array<T>& a) {
  EXPECT_EQ(a.shape.size(), 2u);
  fa::matrix<T> m(a.shape.at(0), a.shape.at(1));
  std::copy(a.data.begin(), a.data.end(), m.data());
  return m;
}

/// Whether --window puts P inside fastattn::banded (as the tool decides it): P is approximate,
/// returns its log-sum-exp and has no `window` knob of its own.
template <class P>
constexpr bool takes_band() {
  bool window = false;
  fa::for_each_knob<P>([&](const auto& k) { window = window || k.name == "window"; });
  return !P::is_exact && fa::provides_lse<P> && !window;
}

/// The number after `label` in the tool's output (e.g. "relative error:"); NaN when absent.
double figure(const std::string& out, const std::string& label) {
  const auto pos = out.find(label);
  if (pos == std::string::npos) return std::numeric_limits<double>::quiet_NaN();
  return std::stod(out.substr(pos + label.size()));
}

/// A head whose queries attend to their neighbours i - 1 and i + 1 (with scale 1): q_i = 200 (p_i
/// + p_{i+2}), k_j = p_{j+1}, random unit p (as in test_composable.cpp). Every approximate kernel
/// misses the neighbours (relative error above 0.3); an exact band of 2 keys is exact.
struct neighbour_head {
  fa::matrix<float> q, k, v;
};
neighbour_head make_neighbour_head(fa::index n, fa::index M, std::uint64_t seed) {
  const fa::index E = 64;
  fa::matrix<float> p = fa::testing::gaussian<float>(n + 2, E, seed);
  for (fa::index i = 0; i < p.rows(); ++i) p.row(i).normalize();
  neighbour_head h{fa::matrix<float>(n, E), fa::matrix<float>(n, E),
                   fa::testing::gaussian<float>(n, M, seed + 1)};
  for (fa::index i = 0; i < n; ++i) {
    h.q.row(i) = 200.0f * (p.row(i) + p.row(i + 2));
    h.k.row(i) = p.row(i + 1);
  }
  return h;
}

class Cli : public fa::testing::temporary_directory_test {
 protected:
  void SetUp() override {
    if (std::string(FASTATTN_CLI_PATH).empty()) GTEST_SKIP() << "tools are not built";
    temporary_directory_test::SetUp();
  }

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

  /// Runs the tool directly (no shell; `args` split at spaces) and measures its peak resident
  /// memory (wait4 reports the child's own).
  result run_measured(const std::string& args) const {
    std::vector<std::string> words = {FASTATTN_CLI_PATH};
    std::istringstream in(args);
    for (std::string w; in >> w;) words.push_back(w);
    std::vector<char*> argv;
    for (auto& w : words) argv.push_back(w.data());
    argv.push_back(nullptr);
    const std::string out_path = path("stdout"), err_path = path("stderr");
    const pid_t pid = ::fork();
    if (pid == 0) {
      const int o = ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      const int e = ::open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (o < 0 || e < 0 || ::dup2(o, 1) < 0 || ::dup2(e, 2) < 0) ::_exit(127);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    result r;
    int raw = 0;
    struct rusage usage {};
    if (pid < 0 || ::wait4(pid, &raw, 0, &usage) != pid) {
      ADD_FAILURE() << "could not run the tool";
      return r;
    }
    if (WIFEXITED(raw)) {
      r.status = WEXITSTATUS(raw);
    } else {
      r.signaled = true;
    }
    r.max_rss_kib = usage.ru_maxrss;
    r.out = slurp(out_path);
    r.err = slurp(err_path);
    return r;
  }

  /// Expects a clean failure: status 1, exactly one line on stderr starting "fastattn: error: "
  /// and containing every one of `needles`. Returns that line.
  std::string expect_clean_error(const std::string& args,
                                 std::initializer_list<std::string> needles) const {
    SCOPED_TRACE(args);
    const result r = run(args);
    EXPECT_FALSE(r.signaled);
    EXPECT_EQ(r.status, 1) << r.err;
    EXPECT_EQ(r.err.rfind("fastattn: error: ", 0), 0u) << r.err;
    EXPECT_TRUE(!r.err.empty() && r.err.find('\n') == r.err.size() - 1)
        << "expected one line, got: " << r.err;
    for (const auto& needle : needles)
      EXPECT_NE(r.err.find(needle), std::string::npos)
          << "expected '" << needle << "' in: " << r.err;
    return r.err.substr(0, r.err.find('\n'));
  }
  std::string expect_clean_error(const std::string& args, const std::string& needle) const {
    return expect_clean_error(args, {needle});
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
  /// An empty array of `shape` (some extent 0): a header-only file.
  void save_empty(const std::string& name, std::vector<fa::index> shape) const {
    fa::io::write_npy(path(name), shape, std::vector<float>{});
  }
  std::string qkv() const {
    return "--q " + path("q.npy") + " --k " + path("k.npy") + " --v " + path("v.npy");
  }

  /// Writes `heads` neighbour heads (seeds 8, 10, ...) as q.npy, k.npy, v.npy: 2-d for one head,
  /// (H, L, E) otherwise.
  void save_neighbour_heads(fa::index heads, fa::index n = 1024, fa::index M = 16) const {
    std::vector<fa::matrix<float>> q, k, v;
    for (fa::index h = 0; h < heads; ++h) {
      const auto head = make_neighbour_head(n, M, 8 + 2 * static_cast<std::uint64_t>(h));
      q.push_back(head.q);
      k.push_back(head.k);
      v.push_back(head.v);
    }
    if (heads == 1) {
      save("q.npy", q[0]);
      save("k.npy", k[0]);
      save("v.npy", v[0]);
    } else {
      save3("q.npy", q);
      save3("k.npy", k);
      save3("v.npy", v);
    }
  }
};

TEST_F(Cli, HelpListsEveryKernelAndEachKnobFlagWithItsDefault) {
  // Derived from fastattn::kernels and each policy's knobs(): a fifth kernel must show up here,
  // under its own --kernel entry, with all its knob flags, without any change to the tool.
  const result r = run("--help");
  EXPECT_EQ(r.status, 0);
  std::size_t kernels = 0;
  fa::kernels::for_each([&](auto tag) {
    using P = typename decltype(tag)::type;
    ++kernels;
    const std::string header = "  --kernel " + std::string(P::name) + "  (";
    const auto begin = r.out.find(header);
    ASSERT_NE(begin, std::string::npos) << P::name << " is not listed in:\n" << r.out;
    const auto end = r.out.find("  --kernel ", begin + header.size());  // next kernel, or npos
    const std::string section = r.out.substr(begin, end == std::string::npos ? end : end - begin);
    const P defaults{};
    fa::for_each_knob<P>([&](const auto& k) {
      const std::string line = "--" + k.flag() + " " + text(k.get(defaults));
      EXPECT_NE(section.find(line), std::string::npos)
          << "knob " << k.name << " of " << P::name << " missing: '" << line << "' in\n"
          << section;
      EXPECT_NE(section.find(std::string(k.help)), std::string::npos) << k.help;
    });
    // The kernel's name is one of the values --kernel takes.
    EXPECT_NE(r.out.find(std::string(P::name)), r.out.find(header)) << P::name;
  });
  EXPECT_EQ(kernels, fa::kernels::size);
  for (const char* flag :
       {"--kernel", "--q", "--k", "--v", "--out", "--scale", "--key-length", "--query-length",
        "--causal", "--precision", "--threads", "--no-check-finite", "--reference", "--help"})
    EXPECT_NE(r.out.find(flag), std::string::npos) << flag;
  // The limits are documented where the user looks.
  EXPECT_NE(r.out.find("max(64 MiB, 16 x the total size of the input files)"), std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("[0, " + std::to_string(fa::multihead_options::max_threads) + "]"),
            std::string::npos);
}

// Each kernel, plain and --causal, gives attention()'s output to the bit; a kernel that cannot
// run causally is refused with the flag and its name.
TEST_F(Cli, EveryKernelRoundTripsAndMatchesAttention) {
  const auto in = fa::testing::make_peaked<float>(150, 130, 16, 12, 3);
  save("q.npy", in.q);
  save("k.npy", in.k);
  save("v.npy", in.v);
  fa::kernels::for_each([&](auto tag) {
    using P = typename decltype(tag)::type;
    for (const bool causal : {false, true}) {
      SCOPED_TRACE(std::string(P::name) + (causal ? " --causal" : ""));
      const std::string args = "--kernel " + std::string(P::name) + (causal ? " --causal " : " ") +
                               qkv() + " --out " + path("o.npy");
      if (causal && !fa::causal_capable<P>) {
        expect_clean_error(args, {"--causal: ", std::string(P::name)});
        continue;
      }
      const result r = run(args);
      ASSERT_EQ(r.status, 0) << r.err;
      const auto o = load<float>(path("o.npy"));
      ASSERT_EQ(o.shape, (std::vector<fa::index>{150, 12}));
      EXPECT_EQ(as_matrix(o),
                fa::matrix<float>(fa::attention(P{}, in.q, in.k, in.v, {.causal = causal})));
    }
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
  const auto o = load<double>(path("o.npy"));  // float64 in -> float64 out
  const fa::options opt{.scale = 0.3, .key_length = 80, .query_length = 60, .causal = true};
  EXPECT_LT(
      fa::testing::relative_error(as_matrix(o), fa::testing::reference_attention(q, k, v, opt)),
      1e-12);
  EXPECT_EQ(fa::io::read_npy_header(path("o.npy")).dtype, fa::io::npy_dtype::float64);
  // --precision float computes (and writes) in float.
  ASSERT_EQ(run("--kernel dense --precision float " + qkv() + " --out " + path("f.npy")).status, 0);
  EXPECT_EQ(fa::io::read_npy_header(path("f.npy")).dtype, fa::io::npy_dtype::float32);
}

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
  EXPECT_EQ(as_matrix(load<float>(path("o.npy"))),
            fa::matrix<float>(fa::attention(policy, in.q, in.k, in.v)));
}

TEST_F(Cli, SeveralHeadsRunAsTheHeadsOfOneSample) {
  // (H, L, E) arrays are the H heads of one sample: the output equals multihead_attention over
  // the (1, L, H, E) view with head_stride = L E (head h draws from stream h), on any thread
  // count, and head 0 equals attention() (stream 0).
  const fa::index H = 3, L = 64, S = 80, E = 8, M = 6;
  std::vector<fa::matrix<float>> q, k, v;
  for (fa::index h = 0; h < H; ++h) {
    const auto in = fa::testing::make_peaked<float>(L, S, E, M, 10 + static_cast<unsigned>(h));
    q.push_back(in.q);
    k.push_back(in.k);
    v.push_back(in.v);
  }
  save3("q.npy", q);
  save3("k.npy", k);
  save3("v.npy", v);
  const auto qa = load<float>(path("q.npy")), ka = load<float>(path("k.npy")),
             va = load<float>(path("v.npy"));
  fa::kernels::for_each([&](auto tag) {
    using P = typename decltype(tag)::type;
    SCOPED_TRACE(std::string(P::name));
    const result r = run("--kernel " + std::string(P::name) + " --threads 2 --key-length 70 " +
                         qkv() + " --out " + path("o.npy"));
    ASSERT_EQ(r.status, 0) << r.err;
    const auto o = load<float>(path("o.npy"));
    ASSERT_EQ(o.shape, (std::vector<fa::index>{H, L, M}));
    std::vector<float> expected(static_cast<std::size_t>(H * L * M));
    fa::multihead_options mo;
    mo.common.key_length = 70;
    mo.threads = 1;
    fa::multihead_attention(P{},
                            fa::tensor_view<const float>{qa.data.data(), 1, L, H, E, E, 0, L * E},
                            fa::tensor_view<const float>{ka.data.data(), 1, S, H, E, E, 0, S * E},
                            fa::tensor_view<const float>{va.data.data(), 1, S, H, M, M, 0, S * M},
                            fa::tensor_view<float>{expected.data(), 1, L, H, M, M, 0, L * M}, mo);
    EXPECT_EQ(o.data, expected);
    fa::matrix<float> head0(L, M);
    std::copy_n(o.data.begin(), L * M, head0.data());
    EXPECT_EQ(head0, fa::matrix<float>(fa::attention(P{}, q[0], k[0], v[0], {.key_length = 70})));
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
  expect_clean_error("--kernel nope " + qkv() + out, {"--kernel", "unknown kernel 'nope'"});
  expect_clean_error("--kernel dense --frobnicate 3 " + qkv() + out, "unknown flag --frobnicate");
  expect_clean_error("--kernel dense --frobnicate=3 " + qkv() + out, "unknown flag --frobnicate");
  expect_clean_error("--kernel dense --query-block x7 " + qkv() + out,
                     {"--query-block", "'x7' is not an integer"});
  expect_clean_error("--kernel dense --query-block 0 " + qkv() + out,
                     {"--query-block 0: ", "query_block must be in [1, 4096], got 0"});
  expect_clean_error("--kernel dense --query-block 99999999999999999999 " + qkv() + out,
                     {"--query-block", "range"});
  expect_clean_error("--kernel dense --scale nan " + qkv() + out, {"--scale", "finite"});
  expect_clean_error("--kernel dense " + qkv() + " --out", {"--out", "missing"});
  expect_clean_error("--kernel dense --q " + path("q.npy") + out, "--k is required");
  expect_clean_error("--kernel dense " + qkv(), "--out is required");
  expect_clean_error("--kernel dense stray " + qkv() + out, "unexpected argument 'stray'");
  expect_clean_error("--kernel dense --causal=1 " + qkv() + out, "causal");
  expect_clean_error("--kernel dense --kernel dense " + qkv() + out, "--kernel");
  // A knob flag of another kernel: the error names the chosen kernel's knobs (--window, the
  // band's knob, has its own meaning for every kernel: see the wrapper tests below).
  fa::kernels::for_each([&](auto tag) {
    using P = typename decltype(tag)::type;
    std::string mine, other;
    fa::for_each_knob<P>([&](const auto& k) { mine += (mine.empty() ? "--" : ", --") + k.flag(); });
    fa::kernels::for_each([&](auto other_tag) {
      using O = typename decltype(other_tag)::type;
      fa::for_each_knob<O>([&](const auto& k) {
        if (other.empty() && k.name != "window" && mine.find("--" + k.flag()) == std::string::npos)
          other = k.flag();
      });
    });
    if (other.empty()) return;
    const std::string line =
        expect_clean_error("--kernel " + std::string(P::name) + " --" + other + " 5 " + qkv() + out,
                           {"--" + other, "not a knob of kernel '" + std::string(P::name) + "'"});
    EXPECT_NE(line.find("(its knobs: " + (mine.empty() ? "none" : mine) + ")"), std::string::npos)
        << line;
  });
  expect_clean_error("--kernel clustered --seed -1 " + qkv() + out,
                     {"--seed", "'-1' is not a non-negative integer"});
  expect_clean_error("--kernel dense --key-length 13 " + qkv() + out,
                     {"--key-length 13: ", "key_length"});
  expect_clean_error("--kernel dense --query-length -1 " + qkv() + out,
                     {"--query-length -1: ", "query_length"});
  expect_clean_error("--kernel dense --precision half " + qkv() + out, "--precision");
  expect_clean_error("--kernel dense --q " + path("q.npy") + " --k " + path("k5.npy") + " --v " +
                         path("v.npy") + out,
                     "same feature size");
  expect_clean_error("--kernel dense --q " + path("q.npy") + " --k " + path("k.npy") + " --v " +
                         path("v11.npy") + out,
                     "as many rows");
  expect_clean_error("--kernel dense --q " + path("q1.npy") + " --k " + path("k.npy") + " --v " +
                         path("v.npy") + out,
                     {path("q1.npy"), "must be 2-d"});
  expect_clean_error("--kernel dense --q " + path("q3.npy") + " --k " + path("k.npy") + " --v " +
                         path("v.npy") + out,
                     "all be 3-d");
  expect_clean_error("--kernel dense --q " + path("q3.npy") + " --k " + path("k3.npy") + " --v " +
                         path("v3.npy") + out,
                     "same number of heads");
  expect_clean_error("--kernel dense --q " + path("missing.npy") + " --k " + path("k.npy") +
                         " --v " + path("v.npy") + out,
                     {path("missing.npy"), "no such file"});
  expect_clean_error("--kernel dense " + qkv() + " --out " + path("no/such/dir/o.npy"),
                     {path("no/such/dir/o.npy"), "cannot open for writing"});
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
  expect_clean_error(variant("magic.npy", magic), {path("magic.npy"), "bad magic"});
  expect_clean_error(variant("trunc.npy", good.substr(0, good.size() - 4)), "truncated data");
  expect_clean_error(variant("fortran.npy", replaced("False", "True ")), "Fortran");
  expect_clean_error(variant("int.npy", replaced("<f4", "<i4")), "unsupported dtype");
  expect_clean_error(variant("big.npy", replaced("<f4", ">f4")), "big-endian");
  expect_clean_error(variant("shape.npy", replaced("(10, 4)", "(10, 5)")), "truncated data");
  expect_clean_error(variant("empty.npy", ""), "too short");
}

TEST_F(Cli, NonFiniteInputsNameTheFileTheHeadAndTheFlagThatSkipsTheCheck) {
  // The error is the library's message as data, located at the file the user gave (and the head
  // for several heads); the hint is a second line naming the tool's flag.
  auto q = fa::testing::gaussian<float>(10, 4, 1);
  q(3, 2) = std::numeric_limits<float>::quiet_NaN();
  save("q.npy", q);
  save("k.npy", fa::testing::gaussian<float>(12, 4, 2));
  save("v.npy", fa::testing::gaussian<float>(12, 3, 3));
  result r = run("--kernel dense " + qkv() + " --out " + path("o.npy"));
  EXPECT_EQ(r.status, 1);
  auto got = lines(r.err);
  ASSERT_EQ(got.size(), 2u) << r.err;
  EXPECT_EQ(got[0], "fastattn: error: " + path("q.npy") +
                        ": q has a non-finite value (nan) at row 3, column 2");
  EXPECT_EQ(got[1].rfind("fastattn: hint: pass --no-check-finite to skip this check", 0), 0u)
      << got[1];
  r = run("--kernel dense --no-check-finite " + qkv() + " --out " + path("o.npy"));
  EXPECT_EQ(r.status, 0) << r.err;

  // Three heads, an infinity in head 2 of v: "head 2".
  std::vector<fa::matrix<float>> v3(3, fa::testing::gaussian<float>(12, 3, 3));
  v3[2](5, 1) = std::numeric_limits<float>::infinity();
  save3("q3.npy", std::vector<fa::matrix<float>>(3, fa::testing::gaussian<float>(10, 4, 1)));
  save3("k3.npy", std::vector<fa::matrix<float>>(3, fa::testing::gaussian<float>(12, 4, 2)));
  save3("v3.npy", v3);
  r = run("--kernel dense --q " + path("q3.npy") + " --k " + path("k3.npy") + " --v " +
          path("v3.npy") + " --out " + path("o.npy"));
  EXPECT_EQ(r.status, 1);
  got = lines(r.err);
  ASSERT_EQ(got.size(), 2u) << r.err;
  EXPECT_EQ(got[0], "fastattn: error: " + path("v3.npy") +
                        ": head 2: v has a non-finite value (inf) at row 5, column 1");
}

TEST_F(Cli, FuzzedFilesNeverCrashTheTool) {
  // Random byte flips and truncations of valid q, k and v files: every run either succeeds or
  // fails cleanly (status 1, one error line on stderr, and a hint line only for a non-finite
  // value); a crash or a sanitizer report fails the test.
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
      const auto got = lines(r.err);
      ASSERT_FALSE(got.empty()) << "trial " << trial;
      EXPECT_EQ(got[0].rfind("fastattn: error: ", 0), 0u) << r.err;
      const bool hinted = got.size() == 2 && got[1].rfind("fastattn: hint: ", 0) == 0 &&
                          got[0].find("non-finite") != std::string::npos;
      EXPECT_TRUE(got.size() == 1 || hinted) << "trial " << trial << ": " << r.err;
    }
  }
  EXPECT_GT(failed, 0);
  RecordProperty("succeeded", ok);
}

// ---------------------------------------------------------------------------------------------
// Regression tests for issue 10 (each fails with the tool as it was before the fix).

TEST_F(Cli, OutputThatIsAnInputIsRefusedWhateverItsSpelling) {
  // Issue 10.1: `--out` naming an input, with --reference: the output overwrote q, and the
  // reference then re-read q/k/v from disk (a heap out-of-bounds read with M < E, a silently
  // wrong error figure with M == E). Inputs are now read once, and an --out that is the same
  // file as an input is refused before anything is written, by file identity.
  save("q.npy", fa::testing::gaussian<float>(10, 6, 1));
  save("k.npy", fa::testing::gaussian<float>(12, 6, 2));
  save("v.npy", fa::testing::gaussian<float>(12, 3, 3));   // M = 3 < E = 6
  save("v6.npy", fa::testing::gaussian<float>(12, 6, 4));  // M == E
  fs::create_directories(dir_ / "sub");
  fs::create_hard_link(dir_ / "q.npy", dir_ / "hard.npy");
  fs::create_symlink(dir_ / "q.npy", dir_ / "soft.npy");
  const std::string original = slurp(path("q.npy"));
  for (const std::string& v : {path("v.npy"), path("v6.npy")}) {
    const std::string inputs = "--q " + path("q.npy") + " --k " + path("k.npy") + " --v " + v;
    for (const std::string& out : {path("sub/../q.npy"), (dir_.filename() / "q.npy").string(),
                                   path("hard.npy"), path("soft.npy"), path("./q.npy")}) {
      const std::string args = "--kernel dense --reference " + inputs + " --out " + out;
      if (out.front() != '/') {  // a relative spelling: run from the directory above
        SCOPED_TRACE(out);
        const std::string cmd = "cd " + dir_.parent_path().string() + " && " +
                                std::string(FASTATTN_CLI_PATH) + " " + args + " >" +
                                path("stdout") + " 2>" + path("stderr");
        const int raw = std::system(cmd.c_str());
        ASSERT_TRUE(WIFEXITED(raw));
        EXPECT_EQ(WEXITSTATUS(raw), 1);
        const std::string err = slurp(path("stderr"));
        EXPECT_NE(err.find("--out " + out + ": is the same file as --q " + path("q.npy")),
                  std::string::npos)
            << err;
      } else {
        expect_clean_error(args, {"--out " + out + ": is the same file as --q " + path("q.npy"),
                                  "overwrite an input"});
      }
      EXPECT_EQ(slurp(path("q.npy")), original) << "q.npy was overwritten through " << out;
    }
    expect_clean_error("--kernel dense --reference " + inputs + " --out " + path("k.npy"),
                       "is the same file as --k " + path("k.npy"));
    expect_clean_error("--kernel dense --reference " + inputs + " --out " + v,
                       "is the same file as --v " + v);
  }
  // Another file is fine, and the reference's figure is computed from the inputs as read.
  const result r = run("--kernel dense --reference " + qkv() + " --out " + path("o.npy"));
  ASSERT_EQ(r.status, 0) << r.err;
  const auto pos = r.out.find("relative error:");
  ASSERT_NE(pos, std::string::npos) << r.out;
  EXPECT_LT(std::stod(r.out.substr(pos + 15)), 1e-5) << r.out;
}

TEST_F(Cli, AutoPrecisionComputesInDoubleWhenAnyInputIsFloat64) {
  // Issue 10.8: with mixed float32/float64 inputs, --precision auto converted a float64 file
  // holding 1e300 to float and then reported "k has a non-finite value (inf)" for a finite file.
  const auto q = fa::testing::gaussian<float>(10, 4, 1);
  fa::matrix<double> k = fa::testing::gaussian<double>(12, 4, 2);
  k(5, 2) = 1e300;
  const auto v = fa::testing::gaussian<float>(12, 3, 3);
  save("q.npy", q);
  save("k.npy", k);
  save("v.npy", v);
  const result r = run("--kernel dense " + qkv() + " --out " + path("o.npy"));
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(fa::io::read_npy_header(path("o.npy")).dtype, fa::io::npy_dtype::float64);
  const fa::matrix<double> qd = q.cast<double>(), vd = v.cast<double>();
  EXPECT_LT(fa::testing::relative_error(as_matrix(load<double>(path("o.npy"))),
                                        fa::attention(fa::dense{}, qd, k, vd)),
            1e-14);
}

TEST_F(Cli, PrecisionFloatNamesAFloat64ValueThatOverflowsFloat) {
  // Issue 10.8: --precision float with a float64 value beyond float's range: the conversion
  // overflowed silently (and was then reported as a non-finite input). It is now an error that
  // says so, naming the file, the element and the value.
  fa::matrix<double> k = fa::testing::gaussian<double>(12, 4, 2);
  k(5, 2) = 1e300;
  save("q.npy", fa::testing::gaussian<float>(10, 4, 1));
  save("k.npy", k);
  save("v.npy", fa::testing::gaussian<float>(12, 3, 3));
  const std::string line =
      expect_clean_error("--kernel dense --precision float " + qkv() + " --out " + path("o.npy"),
                         {path("k.npy") + ": ", "element (5, 2)", "1e+300", "overflows float"});
  EXPECT_EQ(line.find("non-finite"), std::string::npos) << line;
  EXPECT_FALSE(fs::exists(path("o.npy")));
  // Three heads: the element's index includes the head.
  std::vector<fa::matrix<double>> k3(2, fa::testing::gaussian<double>(12, 4, 2));
  k3[1](7, 0) = -3e39;
  save3("q3.npy", std::vector<fa::matrix<float>>(2, fa::testing::gaussian<float>(10, 4, 1)));
  save3("k3.npy", k3);
  save3("v3.npy", std::vector<fa::matrix<float>>(2, fa::testing::gaussian<float>(12, 3, 3)));
  expect_clean_error("--kernel dense --precision float --q " + path("q3.npy") + " --k " +
                         path("k3.npy") + " --v " + path("v3.npy") + " --out " + path("o.npy"),
                     {path("k3.npy"), "element (1, 7, 0) = -3e+39", "overflows float"});
}

TEST_F(Cli, ThreadsOutOfRangeNamesTheFlagAndItsBound) {
  // Issue 10.12: --threads 2147483647 must be a clear error naming the flag and its bound.
  save("q.npy", fa::testing::gaussian<float>(10, 4, 1));
  save("k.npy", fa::testing::gaussian<float>(12, 4, 2));
  save("v.npy", fa::testing::gaussian<float>(12, 3, 3));
  const std::string bound = "[0, " + std::to_string(fa::multihead_options::max_threads) + "]";
  for (const char* threads : {"2147483647", "-1", "1025"})
    expect_clean_error("--kernel dense --threads " + std::string(threads) + " " + qkv() +
                           " --out " + path("o.npy"),
                       {"--threads", bound});
  expect_clean_error("--kernel dense --threads 99999999999 " + qkv() + " --out " + path("o.npy"),
                     {"--threads", "range"});
  EXPECT_EQ(run("--kernel dense --threads 1024 " + qkv() + " --out " + path("o.npy")).status, 0);
}

TEST_F(Cli, ManyHeadsOfZeroLengthArraysCostConstantMemory) {
  // Issue 10.13: three 128-byte files of shape (H, 0, 8) with H = 1e7 took 395 MB and 4.5 s, and
  // H = 2^62 failed with "vector::reserve". Inputs without data are H identical empty problems:
  // the tool now checks and runs one, and writes the (H, 0, 8) output.
  for (const fa::index H : {fa::index{10'000'000}, fa::index{1} << 62}) {
    SCOPED_TRACE(H);
    for (const char* name : {"q.npy", "k.npy", "v.npy"}) save_empty(name, {H, 0, 8});
    ASSERT_EQ(fs::file_size(path("q.npy")), 128u);
    const result r =
        run_measured("--kernel dense --reference " + qkv() + " --out " + path("o.npy"));
    ASSERT_FALSE(r.signaled);
    ASSERT_EQ(r.status, 0) << r.err;
    EXPECT_LT(r.max_rss_kib, 100 * 1024) << "peak memory " << r.max_rss_kib << " KiB";
    EXPECT_EQ(fa::io::read_npy_header(path("o.npy")).shape, (std::vector<fa::index>{H, 0, 8}));
    // The same problems with a bad option are still refused.
    expect_clean_error("--kernel dense --key-length 1 " + qkv() + " --out " + path("o.npy"),
                       "--key-length 1: key_length must be in [0, S = 0], got 1");
  }
}

TEST_F(Cli, AnOutputOutOfProportionToTheInputsIsRefused) {
  // Issue 10.13: q (1, 1), k (0, 1), v (0, 2.5e8) wrote a 1 GB output from 390 bytes of input.
  // The output may take at most max(64 MiB, 16 x the input files' size) (stated in --help).
  save("q.npy", fa::testing::gaussian<float>(1, 1, 1));
  save_empty("k.npy", {0, 1});
  save_empty("v.npy", {0, fa::index{1} << 25});  // output 1 x 2^25 floats = 128 MiB
  expect_clean_error("--kernel dense " + qkv() + " --out " + path("o.npy"),
                     {"the output (1, 33554432) in float32 would take 134217728 bytes",
                      "max(64 MiB, 16 x the input files' size) = 67108864 bytes"});
  EXPECT_FALSE(fs::exists(path("o.npy")));
  save_empty("v.npy", {0, fa::index{1} << 20});  // 4 MiB: within the limit
  const result r = run("--kernel dense " + qkv() + " --out " + path("o.npy"));
  ASSERT_EQ(r.status, 0) << r.err;
  const auto o = load<float>(path("o.npy"));
  EXPECT_EQ(o.shape, (std::vector<fa::index>{1, fa::index{1} << 20}));
  EXPECT_TRUE(std::all_of(o.data.begin(), o.data.end(), [](float x) { return x == 0; }));
  // Heads multiply: 2 heads of (1, 2^62) outputs are 2^63 floats, more than 2^64 bytes.
  fa::io::write_npy(path("q.npy"), std::vector<fa::index>{2, 1, 1}, std::vector<float>{1, 2});
  save_empty("k.npy", {2, 0, 1});
  save_empty("v.npy", {2, 0, fa::index{1} << 62});
  expect_clean_error("--kernel dense " + qkv() + " --out " + path("o2.npy"),
                     "the output (2, 1, 4611686018427387904) in float32 would take more than 2^64 "
                     "bytes");
  EXPECT_FALSE(fs::exists(path("o2.npy")));
}

TEST_F(Cli, LibraryErrorsNameTheFlagTheUserGave) {
  // Issue 10.16: `--key-length 65` on a 2-d input said "sample 0: key_length ..."; a library
  // error now names the flag (with the value as typed) and the library's message follows as is.
  save("q.npy", fa::testing::gaussian<float>(64, 4, 1));
  save("k.npy", fa::testing::gaussian<float>(64, 4, 2));
  save("v.npy", fa::testing::gaussian<float>(64, 3, 3));
  EXPECT_EQ(
      expect_clean_error("--kernel dense --key-length 65 " + qkv() + " --out " + path("o.npy"),
                         "--key-length"),
      "fastattn: error: --key-length 65: key_length must be in [0, S = 64], got 65");
  EXPECT_EQ(expect_clean_error("--kernel dense --key-block=0 " + qkv() + " --out " + path("o.npy"),
                               "--key-block"),
            "fastattn: error: --key-block 0: dense: key_block must be in [1, 65536], got 0");
  expect_clean_error("--kernel dense --scale 1e300 " + qkv() + " --out " + path("o.npy"),
                     "fastattn: error: --scale 1e300: scale must be finite");
  // Several heads: the same message, no sample.
  save3("q3.npy", std::vector<fa::matrix<float>>(2, fa::testing::gaussian<float>(64, 4, 1)));
  save3("k3.npy", std::vector<fa::matrix<float>>(2, fa::testing::gaussian<float>(64, 4, 2)));
  save3("v3.npy", std::vector<fa::matrix<float>>(2, fa::testing::gaussian<float>(64, 3, 3)));
  EXPECT_EQ(
      expect_clean_error("--kernel dense --key-length 65 --q " + path("q3.npy") + " --k " +
                             path("k3.npy") + " --v " + path("v3.npy") + " --out " + path("o.npy"),
                         "--key-length"),
      "fastattn: error: --key-length 65: key_length must be in [0, S = 64], got 65");
}

TEST_F(Cli, OutputFileErrorsGiveTheRealCauseAndThePath) {
  // Issue 10.16: `--out /proc/version` said "disk full?". The writer's message (the system's
  // reason and the path) reaches the user unchanged.
  save("q.npy", fa::testing::gaussian<float>(10, 4, 1));
  save("k.npy", fa::testing::gaussian<float>(12, 4, 2));
  save("v.npy", fa::testing::gaussian<float>(12, 3, 3));
  if (fs::exists("/proc/version")) {
    const std::string line =
        expect_clean_error("--kernel dense " + qkv() + " --out /proc/version", "/proc/version: ");
    EXPECT_EQ(line.find("disk full"), std::string::npos) << line;
  }
  fs::create_directories(dir_ / "adir");
  expect_clean_error("--kernel dense " + qkv() + " --out " + path("adir"),
                     {path("adir") + ": ", "directory"});
}

// ---------------------------------------------------------------------------------------------
// Wrappers: --window (fastattn::banded), --estimate-error and --max-error (fastattn::guarded).

TEST_F(Cli, WindowMakesEveryApproximateKernelExactOnANeighbourHead) {
  const auto head = make_neighbour_head(1024, 16, 8);
  save_neighbour_heads(1);
  const fa::options one{.scale = 1.0};
  std::size_t approximate = 0;
  fa::kernels::for_each([&](auto tag) {
    using P = typename decltype(tag)::type;
    if constexpr (takes_band<P>()) {
      SCOPED_TRACE(std::string(P::name));
      ++approximate;
      const std::string kernel = "--kernel " + std::string(P::name) + " --scale 1 --reference ";
      result r = run(kernel + qkv());
      ASSERT_EQ(r.status, 0) << r.err;
      EXPECT_GT(figure(r.out, "relative error:"), 0.3) << r.out;
      r = run(kernel + "--window 2 " + qkv() + " --out " + path("o.npy"));
      ASSERT_EQ(r.status, 0) << r.err;
      EXPECT_LT(figure(r.out, "relative error:"), 1e-3) << r.out;
      EXPECT_NE(r.out.find("window=2"), std::string::npos) << r.out;  // in the kernel: line
      // The tool ran banded<P> (head 0 is attention()'s stream 0).
      const fa::banded<P> banded{.window = 2};
      EXPECT_EQ(as_matrix(load<float>(path("o.npy"))),
                fa::matrix<float>(fa::attention(banded, head.q, head.k, head.v, one)));
      // Causal too.
      r = run(kernel + "--window 2 --causal " + qkv());
      ASSERT_EQ(r.status, 0) << r.err;
      EXPECT_LT(figure(r.out, "relative error:"), 1e-3) << r.out;
    }
  });
  EXPECT_GE(approximate, 3u);
  // --window is local's own knob: a window of 1 is exact on this head.
  const result r =
      run("--kernel local --window 1 --scale 1 --reference " + qkv() + " --out " + path("o.npy"));
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_LT(figure(r.out, "relative error:"), 1e-3) << r.out;
  EXPECT_EQ(as_matrix(load<float>(path("o.npy"))),
            fa::matrix<float>(fa::attention(fa::local{.window = 1}, head.q, head.k, head.v, one)));
  // An exact kernel refuses it; a window out of range names the flag.
  expect_clean_error("--kernel dense --window 2 " + qkv() + " --out " + path("o.npy"),
                     {"--window 2: ", "'dense' is exact already"});
  expect_clean_error("--kernel clustered --window -1 " + qkv() + " --out " + path("o.npy"),
                     "--window");
  expect_clean_error("--kernel smyrf --window 2000000000 " + qkv() + " --out " + path("o.npy"),
                     {"--window 2000000000: ", "window must be in [0, 1073741824]"});
  const result help = run("--help");
  for (const char* flag : {"--window W", "--estimate-error", "--max-error X", "--error-samples N"})
    EXPECT_NE(help.out.find(flag), std::string::npos) << flag;
}

TEST_F(Cli, EstimateErrorPrintsTheOutputsEstimateAndOnePerHead) {
  // Two neighbour heads: every approximate kernel's error is O(1), and the estimate from 32 rows
  // per head is close to the "relative error:" line's.
  save_neighbour_heads(2);
  fa::kernels::for_each([&](auto tag) {
    using P = typename decltype(tag)::type;
    if constexpr (takes_band<P>()) {
      SCOPED_TRACE(std::string(P::name));
      const result r = run("--kernel " + std::string(P::name) +
                           " --scale 1 --reference --estimate-error " + qkv());
      ASSERT_EQ(r.status, 0) << r.err;
      const double actual = figure(r.out, "relative error:");
      const double estimate = figure(r.out, "estimated error:");
      ASSERT_GT(actual, 0.05) << r.out;
      EXPECT_GT(estimate, actual / 2) << r.out;
      EXPECT_LT(estimate, actual * 2) << r.out;
      // The whole output's line comes after the reference's, then one line per head.
      const auto all = lines(r.out);
      std::size_t at = 0;
      while (at < all.size() && all[at].rfind("estimated error: ", 0) != 0) ++at;
      ASSERT_LT(at + 2, all.size()) << r.out;
      EXPECT_LT(r.out.find("relative error:"), r.out.find("estimated error:"));
      for (int h = 0; h < 2; ++h) {
        const std::string& line = all[at + 1 + static_cast<std::size_t>(h)];
        const std::string prefix = "head " + std::to_string(h) + ": estimated error ";
        ASSERT_EQ(line.rfind(prefix, 0), 0u) << line;
        const double e = std::stod(line.substr(prefix.size()));
        EXPECT_GT(e, 0.1) << line;
        EXPECT_NE(line.find(" ["), std::string::npos) << line;
        EXPECT_EQ(line.find("fell back"), std::string::npos) << line;
      }
      EXPECT_EQ(r.out.find("fell back:"), std::string::npos) << r.out;  // only with --max-error
    }
  });
  // A window makes the estimate small too (and --out is optional with --estimate-error).
  const result r = run("--kernel clustered --scale 1 --window 2 --estimate-error " + qkv());
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_LT(figure(r.out, "estimated error:"), 1e-3) << r.out;
  // More samples: every row of a short head is exact, and the estimate is the true error.
  const auto in = fa::testing::make_peaked<float>(100, 100, 16, 8, 4);
  save("q.npy", in.q);
  save("k.npy", in.k);
  save("v.npy", in.v);
  const result all_rows =
      run("--kernel smyrf --cluster-size 8 --reference --error-samples 100 " + qkv());
  ASSERT_EQ(all_rows.status, 0) << all_rows.err;
  EXPECT_NEAR(figure(all_rows.out, "estimated error:"), figure(all_rows.out, "relative error:"),
              1e-3 * figure(all_rows.out, "relative error:") + 1e-6)
      << all_rows.out;
  expect_clean_error("--kernel smyrf --error-samples 0 " + qkv(), {"--error-samples", "[1, "});
}

TEST_F(Cli, MaxErrorRecomputesTheHeadsAboveItExactly) {
  save_neighbour_heads(2);
  ASSERT_EQ(run("--kernel dense --scale 1 " + qkv() + " --out " + path("dense.npy")).status, 0);
  const auto dense = load<float>(path("dense.npy"));
  fa::kernels::for_each([&](auto tag) {
    using P = typename decltype(tag)::type;
    if constexpr (takes_band<P>()) {
      SCOPED_TRACE(std::string(P::name));
      const std::string kernel = "--kernel " + std::string(P::name) + " --scale 1 ";
      // 0: every head falls back, and the output is dense's, bit for bit.
      result r = run(kernel + "--max-error 0 --reference " + qkv() + " --out " + path("o.npy"));
      ASSERT_EQ(r.status, 0) << r.err;
      EXPECT_NE(r.out.find("fell back: 2 of 2 heads"), std::string::npos) << r.out;
      EXPECT_EQ(load<float>(path("o.npy")).data, dense.data);
      // Dense's own float rounding at scores of ~200.
      EXPECT_LT(figure(r.out, "relative error:"), 1e-4) << r.out;
      EXPECT_EQ(figure(r.out, "estimated error:"), 0.0) << r.out;
      for (const std::string& line : lines(r.out))
        if (line.rfind("head ", 0) == 0) {
          EXPECT_NE(line.find("fell back"), std::string::npos) << line;
          EXPECT_GT(std::stod(line.substr(line.find("error ") + 6)), 0.1) << line;
        }
      // A huge tolerance: none falls back, and the output is the kernel's own.
      ASSERT_EQ(run(kernel + qkv() + " --out " + path("plain.npy")).status, 0);
      r = run(kernel + "--max-error 1e30 " + qkv() + " --out " + path("o.npy"));
      ASSERT_EQ(r.status, 0) << r.err;
      EXPECT_NE(r.out.find("fell back: 0 of 2 heads"), std::string::npos) << r.out;
      EXPECT_EQ(load<float>(path("o.npy")).data, load<float>(path("plain.npy")).data);
      EXPECT_GT(figure(r.out, "estimated error:"), 0.1) << r.out;
    }
  });
  // A tolerance between the two heads' estimates (deterministic: the same seed draws the same
  // rows): exactly the head above it falls back.
  const result r = run("--kernel clustered --scale 1 --estimate-error " + qkv());
  ASSERT_EQ(r.status, 0) << r.err;
  const double e0 = figure(r.out, "head 0: estimated error "),
               e1 = figure(r.out, "head 1: estimated error ");
  ASSERT_GT(std::abs(e0 - e1), 2e-3 * std::max(e0, e1)) << r.out;  // apart at the printed digits
  std::ostringstream middle;
  middle.precision(17);
  middle << (e0 + e1) / 2;
  const result mixed =
      run("--kernel clustered --scale 1 --max-error " + middle.str() + " " + qkv());
  ASSERT_EQ(mixed.status, 0) << mixed.err;
  EXPECT_NE(mixed.out.find("fell back: 1 of 2 heads"), std::string::npos) << mixed.out;
  const std::string above = e0 > e1 ? "head 0: " : "head 1: ";
  const auto line = mixed.out.substr(mixed.out.find(above));
  EXPECT_NE(line.substr(0, line.find('\n')).find("fell back"), std::string::npos) << mixed.out;
  expect_clean_error("--kernel clustered --max-error -1 " + qkv(), {"--max-error", "[0, "});
  expect_clean_error("--kernel clustered --max-error nan " + qkv(), {"--max-error", "finite"});
}

}  // namespace
