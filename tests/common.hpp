// What the test files share, declared once: the float64 oracle and the input generators
// (reference.hpp, also used by the benchmark and the fuzzers), tolerances, the scalar and kernel
// lists of the typed suites (derived from fastattn::kernels, plus the user-written fifth kernel),
// each kernel's test knobs, error, file and bit-equality helpers, the peaked1024 fixture, and the
// explicit instantiations that tests/instantiate.cpp compiles once for the whole test executable.
// It is the precompiled header of the test executable (tests/CMakeLists.txt).
#pragma once

#include <gtest/gtest.h>

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <future>
#include <initializer_list>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <fastattn/fastattn.hpp>
#include <fastattn/io/npy.hpp>

#include "fifth_kernel.hpp"
#include "reference.hpp"

/// The test files' name for the library.
namespace fa = fastattn;

// FASTATTN_TEST_SANITIZED: defined in the AddressSanitizer / UBSan builds, where the largest
// cases are skipped (they take minutes there and add no coverage the small ones lack).
#if defined(__SANITIZE_ADDRESS__)
#define FASTATTN_TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(undefined_behavior_sanitizer)
#define FASTATTN_TEST_SANITIZED 1
#endif
#endif

namespace fastattn::testing {

/// Eigen's own OpenMP GEMM threading splits even 64 x 64 products across threads, which on a
/// loaded machine costs far more than it gains; kernels run one thread per head and their results
/// do not depend on it. Set once, before any test runs.
inline const bool eigen_single_threaded = (Eigen::setNbThreads(1), true);

/// Agreement with the float64 oracle of an exact computation: float rounding over sums of a few
/// hundred terms, double rounding.
template <class T>
constexpr double tolerance() {
  return std::is_same_v<T, float> ? 2e-5 : 1e-12;
}

/// The scalar types every kernel supports.
using scalars = ::testing::Types<float, double>;

// ---------------------------------------------------------------------------------------------
// Kernel lists of the typed suites

/// kernel_list<Ps...> with more policies appended.
template <class List, class... More>
struct append_kernels;
template <class... Ps, class... More>
struct append_kernels<kernel_list<Ps...>, More...> {
  using type = kernel_list<Ps..., More...>;
};

/// Every kernel the typed suites run: the built-ins (fastattn::kernels, so a new kernel is tested
/// as soon as it is listed there) and the user-written fifth kernel.
using tested_kernels = append_kernels<kernels, user_kernels::key_sample>::type;

/// One policy, one scalar type: the parameter of the suites that run kernels x scalars.
template <class P, class T>
struct kernel_case {
  using policy = P;
  using scalar = T;
};

/// kernel_list<Ps...> as ::testing::Types<Ps...> (one case per kernel) ...
template <class List>
struct kernel_types;
template <class... Ps>
struct kernel_types<kernel_list<Ps...>> {
  using type = ::testing::Types<Ps...>;
};

/// ... and as ::testing::Types of kernel_case<P, float> and kernel_case<P, double>.
template <class List>
struct kernel_cases;
template <class... Ps>
struct kernel_cases<kernel_list<Ps...>> {
  using type = ::testing::Types<kernel_case<Ps, float>..., kernel_case<Ps, double>...>;
};

/// Test names: the policy's `name`, and "_float" / "_double" for a kernel_case. Built with
/// append in a function that is never inlined: g++ 12 at -O2 reported a false -Warray-bounds in
/// the inlined string copies of gtest's name generation, in test files unrelated to the change
/// that tipped its inlining.
struct kernel_names {
  template <class C>
  [[gnu::noinline]] static std::string GetName(int) {
    std::string name;
    if constexpr (requires { typename C::policy; }) {
      name.append(C::policy::name);
      name.append(std::is_same_v<typename C::scalar, float> ? "_float" : "_double");
    } else {
      name.append(C::name);
    }
    return name;
  }
};

/// What the typed suites need to know about a kernel; a kernel without a specialisation runs
/// with its defaults and none of the exactness claims.
///   approx():   knobs that make it a real approximation at the suites' sizes (L, S ~ 10-200);
///   exact(L, S): knobs under which it is exact for any input of that size, if there are any;
///   large():    knobs for N = 65536;
///   exact_when_queries_equal / exact_when_keys_equal: inputs on which approx() is exact (equal
///               keys, or zero queries or keys, make every weight uniform);
///   exact_for_one_query: approx() is exact when L = 1;
///   rows_may_see_no_key: approx() may leave a valid query without a valid key (a zero row);
///               otherwise every valid row is a convex combination of valid value rows;
///   quadratic:  its cost is O(L S) (the large case then uses fewer keys);
///   large_error_bound: relative error bound at N = 65536 on peaked inputs (none: not bounded).
template <class P>
struct kernel_traits {
  static P approx() { return P{}; }
  static std::optional<P> exact(index, index) { return std::nullopt; }
  static P large() { return P{}; }
  static constexpr bool exact_when_queries_equal = false;
  static constexpr bool exact_when_keys_equal = false;
  static constexpr bool exact_for_one_query = false;
  static constexpr bool rows_may_see_no_key = true;
  static constexpr bool quadratic = true;
  static constexpr std::optional<double> large_error_bound{};
};

template <>
struct kernel_traits<dense> {
  static dense approx() { return dense{.query_block = 7, .key_block = 5}; }
  static std::optional<dense> exact(index, index) { return dense{}; }
  static dense large() { return dense{}; }
  static constexpr bool exact_when_queries_equal = true;
  static constexpr bool exact_when_keys_equal = true;
  static constexpr bool exact_for_one_query = true;
  static constexpr bool rows_may_see_no_key = false;
  static constexpr bool quadratic = true;
  static constexpr std::optional<double> large_error_bound = 1e-4;
};

template <>
struct kernel_traits<clustered> {
  static clustered approx() { return clustered{.clusters = 9, .seed = 11}; }
  static std::optional<clustered> exact(index, index) { return std::nullopt; }
  static clustered large() { return clustered{.clusters = 100, .seed = 11}; }
  static constexpr bool exact_when_queries_equal = true;  // every centroid is the query
  static constexpr bool exact_when_keys_equal = true;     // every centroid's weights are uniform
  static constexpr bool exact_for_one_query = true;       // one cluster, the query itself
  static constexpr bool rows_may_see_no_key = false;
  static constexpr bool quadratic = false;
  static constexpr std::optional<double> large_error_bound = 1.5;  // a sanity bound
};

template <>
struct kernel_traits<improved_clustered> {
  static improved_clustered approx() {
    return improved_clustered{.clusters = 9, .seed = 12, .topk = 3};
  }
  static std::optional<improved_clustered> exact(index, index S) {
    return improved_clustered{.clusters = 4, .seed = 12, .topk = std::max<index>(S, 1)};
  }
  static improved_clustered large() {
    return improved_clustered{.clusters = 100, .seed = 12, .topk = 32};
  }
  static constexpr bool exact_when_queries_equal = true;
  static constexpr bool exact_when_keys_equal = true;
  static constexpr bool exact_for_one_query = true;
  static constexpr bool rows_may_see_no_key = false;
  static constexpr bool quadratic = false;
  static constexpr std::optional<double> large_error_bound = 1.5;
};

template <>
struct kernel_traits<smyrf> {
  static smyrf approx() { return smyrf{.hashes = 2, .cluster_size = 4, .seed = 13}; }
  static std::optional<smyrf> exact(index L, index) {
    return smyrf{.hashes = 3, .cluster_size = std::max<index>(L, 1), .seed = 13};
  }
  static smyrf large() { return smyrf{.hashes = 2, .cluster_size = 64, .seed = 13}; }
  // Query clusters attend to different key groups: neither degenerate input makes it exact.
  static constexpr bool exact_when_queries_equal = false;
  static constexpr bool exact_when_keys_equal = false;
  static constexpr bool exact_for_one_query = false;
  static constexpr bool rows_may_see_no_key = false;
  static constexpr bool quadratic = false;
  // No bound: with 16 centres each query's exact output averages ~4096 values (a small vector)
  // while a cluster of 64 averages 64, so its relative error is ~8 at N = 65536.
  static constexpr std::optional<double> large_error_bound{};
};

template <>
struct kernel_traits<user_kernels::key_sample> {
  using P = user_kernels::key_sample;
  static P approx() { return P{.keys = 5, .seed = 14}; }
  static std::optional<P> exact(index, index S) { return P{.keys = std::max<index>(S, 1)}; }
  static P large() { return P{.keys = 64, .seed = 14}; }
  static constexpr bool exact_when_queries_equal = false;
  static constexpr bool exact_when_keys_equal = false;  // uniform over the sample, not all keys
  static constexpr bool exact_for_one_query = false;
  static constexpr bool rows_may_see_no_key = false;
  static constexpr bool quadratic = false;
  static constexpr std::optional<double> large_error_bound{};  // 64 keys of 65536: not bounded
};

template <>
struct kernel_traits<local> {
  static local approx() { return local{.window = 2}; }
  static std::optional<local> exact(index L, index S) {
    return local{.window = std::max<index>(std::max(L, S), 1)};
  }
  static local large() { return local{.window = 16}; }
  static constexpr bool exact_when_queries_equal = false;
  static constexpr bool exact_when_keys_equal = false;  // uniform over the window only
  static constexpr bool exact_for_one_query = false;
  static constexpr bool rows_may_see_no_key = true;  // a window beyond the valid keys
  static constexpr bool quadratic = false;
  static constexpr std::optional<double> large_error_bound{};  // a window of 33 keys of 65536
};

/// P's approx() knobs with `seed` set (unchanged when P draws nothing at random).
template <class P>
P with_seed(std::uint64_t seed) {
  P p = kernel_traits<P>::approx();
  if constexpr (requires { p.seed; }) p.seed = seed;
  return p;
}

/// A policy with P's name, static facts, knobs and validate(), whose compute only counts its
/// calls (and writes 7 into the rows it owns): proves that the front door and the multi-head
/// driver refuse bad arguments, and handle empty cases, without running the kernel.
template <class P>
struct counting : P {
  static inline std::atomic<int> calls{0};

  template <class T>
  void compute(const_view<T>, const_view<T>, const_view<T>, view<T> out, const context& ctx) const {
    ++calls;
    out.topRows(ctx.query_length).setConstant(T(7));
  }
};

// ---------------------------------------------------------------------------------------------
// Errors

/// Whether `call` throws fastattn::invalid_argument about `argument` whose what() contains every
/// one of `words` (the values it names). The message is streamed into the result, so
/// EXPECT_TRUE(throws_invalid_argument(...)) << ... shows it on failure.
template <class F>
::testing::AssertionResult throws_invalid_argument(
    F&& call, std::string_view argument, std::initializer_list<std::string_view> words = {}) {
  try {
    std::forward<F>(call)();
  } catch (const invalid_argument& e) {
    const std::string what = e.what();
    if (e.argument() != argument)
      return ::testing::AssertionFailure() << "argument() is \"" << e.argument()
                                           << "\", expected \"" << argument << "\": " << what;
    if (what.rfind("fastattn: ", 0) != 0)
      return ::testing::AssertionFailure() << "what() lacks the \"fastattn: \" prefix: " << what;
    for (const std::string_view w : words)
      if (what.find(w) == std::string::npos)
        return ::testing::AssertionFailure() << "\"" << w << "\" is not in: " << what;
    return ::testing::AssertionSuccess() << what;
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw another exception: " << e.what();
  }
  return ::testing::AssertionFailure()
         << "threw nothing (expected an error about \"" << argument << "\")";
}

/// The fastattn::invalid_argument `call` throws; a test failure and an empty error when it throws
/// none.
template <class F>
invalid_argument error_of(F&& call) {
  try {
    std::forward<F>(call)();
  } catch (const invalid_argument& e) {
    return e;
  }
  ADD_FAILURE() << "expected fastattn::invalid_argument";
  return invalid_argument("", "");
}

// ---------------------------------------------------------------------------------------------
// Files

/// A fixture whose tests each get a fresh directory, removed afterwards: path(name) is a file in
/// it. The directory is named after the suite, the process and the test, so parallel runs of the
/// test executable never share one.
class temporary_directory_test : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = std::filesystem::temp_directory_path() /
           ("fastattn_" + std::string(info->test_suite_name()) + "_" + std::to_string(::getpid()) +
            "_" + info->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  std::filesystem::path dir_;
};

/// Runs `action` (a reader or writer given the FIFO `fifo`, which must refuse it with
/// fastattn::invalid_argument) on a thread and returns what it threw. A reader that opens a FIFO
/// blocks until a writer comes: when the action is still running after 10 s the test fails, and
/// the FIFO is opened and closed from here (O_RDWR | O_NONBLOCK never blocks) until the action
/// returns, SIGPIPE ignored meanwhile.
inline std::string refusal_without_blocking(const std::string& fifo,
                                            const std::function<void()>& action) {
  std::promise<std::string> outcome;
  std::future<std::string> message = outcome.get_future();
  std::thread runner([&] {
    try {
      action();
      outcome.set_value("(no exception)");
    } catch (const invalid_argument& e) {
      outcome.set_value(e.what());
    } catch (const std::exception& e) {
      outcome.set_value(std::string("(other exception) ") + e.what());
    }
  });
  if (message.wait_for(std::chrono::seconds(10)) == std::future_status::ready) {
    runner.join();
    return message.get();
  }
  ADD_FAILURE() << "blocked for 10 s on the FIFO " << fifo;
  const auto sigpipe = std::signal(SIGPIPE, SIG_IGN);
  while (message.wait_for(std::chrono::milliseconds(100)) != std::future_status::ready) {
    const int fd = ::open(fifo.c_str(), O_RDWR | O_NONBLOCK);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (fd >= 0) ::close(fd);
  }
  runner.join();
  std::signal(SIGPIPE, sigpipe);
  return message.get();
}

// ---------------------------------------------------------------------------------------------
// Buffers

/// Bitwise equality of two buffers (NaN-safe, and -0 != +0): vectors or Eigen matrices.
template <class A, class B>
bool same_bits(const A& a, const B& b) {
  using T = std::remove_cvref_t<decltype(*a.data())>;
  static_assert(std::is_same_v<T, std::remove_cvref_t<decltype(*b.data())>>);
  return static_cast<std::size_t>(a.size()) == static_cast<std::size_t>(b.size()) &&
         std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(T)) == 0;
}

/// Head (b, h) of a tensor, copied into a length x dim matrix: what the multi-head driver must
/// equal, head by head.
template <class T>
matrix<std::remove_const_t<T>> copy_head(const tensor_view<T>& t, index b, index h) {
  return Eigen::Map<const matrix<std::remove_const_t<T>>, 0, Eigen::OuterStride<>>(
      t.head(b, h), t.length, t.dim, Eigen::OuterStride<>(t.row_stride()));
}

// ---------------------------------------------------------------------------------------------
// The peaked1024 fixture

/// ../shared/data/peaked1024 beside the source tree: 4 heads, N = 1024, E = M = 64, scale 1/8,
/// q, k, v float32 and o_exact float64 of shape (4, 1024, 64). The reference implementations'
/// errors on it are the bounds of the kernel tests.
struct peaked1024 {
  static constexpr index heads = 4, N = 1024, E = 64;
  std::vector<matrix<float>> q, k, v;
  std::vector<matd> o_exact;

  static std::filesystem::path directory() {
    return std::filesystem::path(FASTATTN_SOURCE_DIR).parent_path() / "shared" / "data" /
           "peaked1024";
  }

  /// The fixture, loaded once per process; null when it is not there (the caller skips).
  static const peaked1024* get() {
    static const std::optional<peaked1024> fixture = load();
    return fixture ? &*fixture : nullptr;
  }

  /// Relative Frobenius error over the four heads, averaged over seeds 0 .. seeds - 1 of `policy`.
  template <class P>
  double mean_error(P policy, int seeds) const {
    double total = 0;
    for (int s = 0; s < seeds; ++s) {
      policy.seed = static_cast<std::uint64_t>(s);
      double num = 0, den = 0;
      for (std::size_t h = 0; h < o_exact.size(); ++h) {
        num += (attention(policy, q[h], k[h], v[h]).template cast<double>() - o_exact[h])
                   .squaredNorm();
        den += o_exact[h].squaredNorm();
      }
      total += std::sqrt(num / den);
    }
    return total / seeds;
  }

 private:
  static std::optional<peaked1024> load() {
    const auto dir = directory();
    if (!std::filesystem::exists(dir / "q.npy")) return std::nullopt;
    auto heads_of = [&](const char* file, auto scalar) {
      using T = decltype(scalar);
      const auto a = io::read_npy<T>((dir / file).string());
      EXPECT_EQ(a.shape, (std::vector<index>{heads, N, E})) << file;
      std::vector<matrix<T>> out;
      for (index h = 0; h < heads; ++h)
        out.push_back(Eigen::Map<const matrix<T>>(a.data.data() + h * N * E, N, E));
      return out;
    };
    peaked1024 f;
    f.q = heads_of("q.npy", 0.f);
    f.k = heads_of("k.npy", 0.f);
    f.v = heads_of("v.npy", 0.f);
    f.o_exact = heads_of("o_exact.npy", 0.0);
    return f;
  }
};

}  // namespace fastattn::testing

/// Skips the test when the peaked1024 fixture is missing; otherwise `name` is a reference to it.
#define FASTATTN_TEST_PEAKED1024(name)                                                       \
  const auto* name##_ptr = ::fastattn::testing::peaked1024::get();                           \
  if (name##_ptr == nullptr)                                                                 \
    GTEST_SKIP() << "fixture not found at " << ::fastattn::testing::peaked1024::directory(); \
  const auto& name = *name##_ptr

// ---------------------------------------------------------------------------------------------
// Explicit instantiations: tests/instantiate.cpp compiles the front door and the multi-head driver
// of every tested kernel once, for float and double row-major matrices (what the tests pass);
// every other test file only declares them, instead of compiling every kernel again. Only the
// overloads that do the work are listed (the others forward to them).

#define FASTATTN_TEST_INSTANTIATE(EXTERN, P, T)                                          \
  EXTERN template void                                                                   \
  fastattn::attention<P, fastattn::matrix<T>, fastattn::matrix<T>, fastattn::matrix<T>>( \
      const P&, const Eigen::MatrixBase<fastattn::matrix<T>>&,                           \
      const Eigen::MatrixBase<fastattn::matrix<T>>&,                                     \
      const Eigen::MatrixBase<fastattn::matrix<T>>&, fastattn::view<T>, std::span<T>,    \
      const fastattn::options&);                                                         \
  EXTERN template void fastattn::multihead_attention<P, T>(                              \
      const P&, fastattn::tensor_view<const T>, fastattn::tensor_view<const T>,          \
      fastattn::tensor_view<const T>, fastattn::tensor_view<T>,                          \
      const fastattn::multihead_options&, std::span<T>);

#define FASTATTN_TEST_INSTANTIATE_ALL(EXTERN)                                        \
  FASTATTN_TEST_INSTANTIATE(EXTERN, fastattn::dense, float)                          \
  FASTATTN_TEST_INSTANTIATE(EXTERN, fastattn::dense, double)                         \
  FASTATTN_TEST_INSTANTIATE(EXTERN, fastattn::local, float)                          \
  FASTATTN_TEST_INSTANTIATE(EXTERN, fastattn::local, double)                         \
  FASTATTN_TEST_INSTANTIATE(EXTERN, fastattn::clustered, float)                      \
  FASTATTN_TEST_INSTANTIATE(EXTERN, fastattn::clustered, double)                     \
  FASTATTN_TEST_INSTANTIATE(EXTERN, fastattn::improved_clustered, float)             \
  FASTATTN_TEST_INSTANTIATE(EXTERN, fastattn::improved_clustered, double)            \
  FASTATTN_TEST_INSTANTIATE(EXTERN, fastattn::smyrf, float)                          \
  FASTATTN_TEST_INSTANTIATE(EXTERN, fastattn::smyrf, double)                         \
  FASTATTN_TEST_INSTANTIATE(EXTERN, user_kernels::key_sample, float)                 \
  FASTATTN_TEST_INSTANTIATE(EXTERN, user_kernels::key_sample, double)                \
  EXTERN template fastattn::testing::matd fastattn::testing::reference_attention<    \
      fastattn::matrix<float>, fastattn::matrix<float>, fastattn::matrix<float>>(    \
      const Eigen::MatrixBase<fastattn::matrix<float>>&,                             \
      const Eigen::MatrixBase<fastattn::matrix<float>>&,                             \
      const Eigen::MatrixBase<fastattn::matrix<float>>&, const fastattn::options&);  \
  EXTERN template fastattn::testing::matd fastattn::testing::reference_attention<    \
      fastattn::matrix<double>, fastattn::matrix<double>, fastattn::matrix<double>>( \
      const Eigen::MatrixBase<fastattn::matrix<double>>&,                            \
      const Eigen::MatrixBase<fastattn::matrix<double>>&,                            \
      const Eigen::MatrixBase<fastattn::matrix<double>>&, const fastattn::options&);

// A kernel missing from this list is still tested, each test file then compiling it itself. A
// test executable compiled with other flags (native/) compiles everything itself: linked with
// instantiate.cpp's objects, the linker could pick either build's copy of a shared inline function.
#ifndef FASTATTN_TEST_OWN_INSTANTIATIONS
FASTATTN_TEST_INSTANTIATE_ALL(extern)
#endif
