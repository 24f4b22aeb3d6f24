// `fastattn`: run any attention kernel on NumPy arrays.
//
//   fastattn --kernel clustered --clusters 100 --seed 1 --q q.npy --k k.npy --v v.npy --out o.npy
//
// Inputs are .npy float32/float64 arrays, one head as q (L, E), k (S, E), v (S, M), or H heads as
// (H, L, E), (H, S, E), (H, S, M). They run through fastattn::multihead_attention as the H heads
// of one sample (a head_stride view of the arrays as read: no copy), so head h draws from random
// stream h, as head h of a model's sample does, and the library's errors say "head h".
//
// Flags are parsed by CLI11; the kernels and their knob flags are derived from fastattn::kernels
// (kernel_flags.hpp). Every error prints "fastattn: error: ..." as one line on stderr (a
// non-finite input adds one "fastattn: hint: ..." line) and exits with status 1; nothing crashes.
// A library error is data (fastattn::invalid_argument): its argument() is mapped to the flag or
// the file the user gave for it, and its message is printed as the library wrote it.
//
// --window W adds an exact local band to an approximate kernel (fastattn::banded), and
// --estimate-error / --max-error X run the kernel under fastattn::guarded (kernel_flags.hpp):
// the tool then prints "estimated error: X [lower, upper]" for the whole output, on the measure
// of its "relative error:" line, and one "head h: estimated error ..." line per head, and with
// --max-error "fell back: N of M heads".
//
// Limits (stated in --help, `limits_help`): each input's data is read once; --out may not be an
// input (compared by file identity); the output may take at most max(64 MiB, 16 x the input
// files' bytes) and half the machine's memory; inputs holding no data cost O(1) whatever their
// number of heads.
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <new>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>

#include <fastattn/fastattn.hpp>
#include <fastattn/io/npy.hpp>

#include "kernel_flags.hpp"

namespace fa = fastattn;
namespace ft = fastattn_tools;
namespace fs = std::filesystem;

namespace {

/// An error the tool finds itself (command line, shapes, files, limits): printed as
/// "fastattn: error: <what>".
class tool_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// The output may take at most max(min_output_bytes, output_per_input_byte x the input files'
/// total size): what the tool allocates stays proportional to the data actually present (the
/// output is the one array whose size is not bounded by one file: L and M come from different
/// files).
constexpr std::uint64_t min_output_bytes = std::uint64_t{64} << 20;
constexpr std::uint64_t output_per_input_byte = 16;

const char* const synopsis =
    "usage: fastattn --kernel NAME [kernel knobs] --q Q.npy --k K.npy --v V.npy [--out O.npy]\n"
    "                [--scale X] [--key-length N] [--query-length N] [--causal]\n"
    "                [--precision auto|float|double] [--threads N] [--no-check-finite]\n"
    "                [--reference] [--window W] [--estimate-error] [--max-error X]\n"
    "\n"
    "Runs one attention kernel on NumPy arrays (.npy, float32 or float64, little-endian, C "
    "order):\n"
    "  q (L, E), k (S, E), v (S, M)            -> out (L, M)      one head\n"
    "  q (H, L, E), k (H, S, E), v (H, S, M)   -> out (H, L, M)   H heads (head h draws from\n"
    "                                                             random stream h)\n";

/// How the tool reports the estimate (after error_flags::help()).
std::string estimate_help() {
  return ft::wrap(
      "The tool prints \"estimated error: X [lower, upper]\" for the whole output, on the measure "
      "of --reference's \"relative error:\" line: the heads' estimates e_h combined as "
      "sqrt(sum_h e_h^2 ||O_h||^2 / sum_h ||O_h||^2), O_h head h's output as written (a head that "
      "fell back counts 0: its output is exact); then one line per head, \"head h: estimated "
      "error X [lower, upper]\" (the kernel's estimate, followed by \"fell back\" when the head "
      "was recomputed exactly), and with --max-error \"fell back: N of M heads\". --out is "
      "optional with these flags.",
      2);
}

const char* const limits_help =
    "Inputs, precision and limits:\n"
    "  Each input's header is checked first, then its data is read once. --out may not be the\n"
    "  same file as --q, --k or --v (compared by file identity: another spelling of the path, a\n"
    "  hard link or a symbolic link is refused too).\n"
    "  --precision auto computes in double when any input is float64, else in float; with\n"
    "  --precision float, a float64 value that overflows float is an error naming the file, the\n"
    "  element and the value.\n"
    "  The output may take at most max(64 MiB, 16 x the total size of the input files) and at\n"
    "  most half of this machine's memory: a larger output is refused before any data is read.\n"
    "  Inputs that hold no data (L = S = 0) cost the same for any number of heads.\n";

std::string shape_string(std::span<const fa::index> s) {
  std::string out = "(";
  for (std::size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

/// The multi-index of element `flat` of a C-order array of `shape`, e.g. "(2, 5, 0)".
std::string element_string(std::span<const fa::index> shape, std::uint64_t flat) {
  std::vector<fa::index> at(shape.size());
  for (std::size_t d = shape.size(); d-- > 0;) {
    const auto extent = static_cast<std::uint64_t>(shape[d]);
    at[d] = static_cast<fa::index>(flat % extent);
    flat /= extent;
  }
  return shape_string(at);
}

/// One input array: the flag it came from, its file, its header, then its data read once, in
/// the file's own dtype.
struct input {
  std::string name;  ///< "q", "k" or "v": the library's argument() for this tensor
  std::string path;
  fa::io::npy_header header;
  std::vector<float> f32;   ///< the data, when the file is float32
  std::vector<double> f64;  ///< the data, when the file is float64

  bool is_double() const { return header.dtype == fa::io::npy_dtype::float64; }
  std::uint64_t file_bytes() const {  // the reader checked that the file holds exactly this
    return header.data_offset + header.count * (is_double() ? 8 : 4);
  }

  void read_header() { header = fa::io::read_npy_header(path); }

  /// Reads the data, once. The file must still have the shape its header had.
  void read_data() {
    auto check = [&](const std::vector<fa::index>& shape) {
      if (shape != header.shape)
        throw tool_error(path + ": the file changed while it was read: its shape was " +
                         shape_string(header.shape) + ", then " + shape_string(shape));
    };
    if (is_double()) {
      auto a = fa::io::read_npy<double>(path);
      check(a.shape);
      f64 = std::move(a.data);
    } else {
      auto a = fa::io::read_npy<float>(path);
      check(a.shape);
      f32 = std::move(a.data);
    }
  }

  /// The data as T: the stored array itself when the file holds T, otherwise a conversion into
  /// `converted`. float -> double is exact; double -> float is refused for a finite value that
  /// overflows float, naming the element and the value.
  template <class T>
  const T* as(std::vector<T>& converted) const {
    if constexpr (std::is_same_v<T, float>) {
      if (!is_double()) return f32.data();
      converted.resize(f64.size());
      for (std::size_t i = 0; i < f64.size(); ++i) {
        const double x = f64[i];
        converted[i] = static_cast<float>(x);  // IEEE: overflow gives inf, never undefined
        if (std::isinf(converted[i]) && std::isfinite(x))
          throw tool_error(path + ": element " + element_string(header.shape, i) + " = " +
                           ft::format_value(x) +
                           " overflows float: the conversion of this float64 file to float "
                           "(--precision float) would make it infinite; use --precision "
                           "double or auto");
      }
      return converted.data();
    } else {
      if (is_double()) return f64.data();
      converted.assign(f32.begin(), f32.end());
      return converted.data();
    }
  }
};

/// Shapes of one problem: H heads of q (L, E), k (S, E), v (S, M).
struct problem {
  fa::index H = 1, L = 0, S = 0, E = 0, M = 0;
  bool heads_axis = false;  ///< inputs are 3-d
};

problem check_shapes(const input& q, const input& k, const input& v) {
  const auto &qs = q.header.shape, &ks = k.header.shape, &vs = v.header.shape;
  for (const input* in : {&q, &k, &v})
    if (in->header.shape.size() != 2 && in->header.shape.size() != 3)
      throw tool_error(in->path + ": " + in->name +
                       " must be 2-d (rows, features) or 3-d (heads, rows, features), got shape " +
                       shape_string(in->header.shape));
  if (ks.size() != qs.size() || vs.size() != qs.size())
    throw tool_error("q, k and v must all be 2-d or all be 3-d: q " + shape_string(qs) + ", k " +
                     shape_string(ks) + ", v " + shape_string(vs));
  problem p;
  p.heads_axis = qs.size() == 3;
  const std::size_t o = p.heads_axis ? 1 : 0;
  if (p.heads_axis) {
    p.H = qs[0];
    if (ks[0] != p.H || vs[0] != p.H)
      throw tool_error("q, k and v must have the same number of heads (first axis): q " +
                       shape_string(qs) + ", k " + shape_string(ks) + ", v " + shape_string(vs));
    if (p.H < 1)
      throw tool_error(q.path + ": the heads axis must be at least 1, got q " + shape_string(qs));
  }
  p.L = qs[o];
  p.E = qs[o + 1];
  p.S = ks[o];
  p.M = vs[o + 1];
  if (ks[o + 1] != p.E)
    throw tool_error("q and k must have the same feature size E (last axis): q " +
                     shape_string(qs) + ", k " + shape_string(ks));
  if (vs[o] != p.S)
    throw tool_error("v must have as many rows as k (S): k " + shape_string(ks) + ", v " +
                     shape_string(vs));
  if (p.E < 1)
    throw tool_error(q.path + ": the feature size E must be at least 1, got q " + shape_string(qs));
  return p;
}

/// a * b * c, or nullopt past 2^64 - 1 (0 when any factor is 0).
std::optional<std::uint64_t> checked_product(std::uint64_t a, std::uint64_t b, std::uint64_t c) {
  if (a == 0 || b == 0 || c == 0) return std::uint64_t{0};
  std::uint64_t ab = 0, abc = 0;
  if (__builtin_mul_overflow(a, b, &ab) || __builtin_mul_overflow(ab, c, &abc)) return std::nullopt;
  return abc;
}

/// H heads of (length, dim) arrays stored one after another, as the heads of one sample.
template <class T>
fa::tensor_view<T> heads_view(T* data, fa::index heads, fa::index length, fa::index dim) {
  return {data,
          /*batch=*/1,
          length,
          heads,
          dim,
          /*token_stride=*/dim,
          /*batch_stride=*/0,
          /*head_stride=*/length * dim};
}

/// The command line, as parsed.
struct command_line {
  std::string kernel, q, k, v, out, precision = "auto";
  std::optional<double> scale;
  std::optional<fa::index> key_length, query_length;
  std::optional<int> threads;
  bool causal = false, no_check_finite = false, reference = false;
};

class tool {
 public:
  tool() {
    app_.name("fastattn");
    app_.formatter(std::make_shared<ft::formatter>(synopsis));
    app_.get_formatter()->column_width(30);
    app_.allow_extras();  // unexpected arguments are reported by `run`, naming the first one
    ft::kernel_flags::add_kernel_option(app_, c_.kernel);
    app_.add_option("--q", c_.q, "queries: (L, E), or (H, L, E) for H heads")
        ->required()
        ->type_name("FILE");
    app_.add_option("--k", c_.k, "keys: (S, E), or (H, S, E)")->required()->type_name("FILE");
    app_.add_option("--v", c_.v, "values: (S, M), or (H, S, M)")->required()->type_name("FILE");
    app_.add_option("--out", c_.out,
                    "output: (L, M), or (H, L, M); required unless --reference, "
                    "--estimate-error or --max-error")
        ->type_name("FILE");
    value_flag("scale", ft::add_value_option(app_, "--scale", c_.scale,
                                             "multiplies q.k before the softmax (default "
                                             "1/sqrt(E))"));
    value_flag("key_length", ft::add_value_option(app_, "--key-length", c_.key_length,
                                                  "keys at index >= N are padding (default S)"))
        ->type_name("N");
    value_flag("query_length",
               ft::add_value_option(app_, "--query-length", c_.query_length,
                                    "queries at index >= N are padding: zero output rows "
                                    "(default L)"))
        ->type_name("N");
    switch_flag("causal", app_.add_flag("--causal", c_.causal,
                                        "query i sees keys j <= i (kernels without causal "
                                        "support refuse)"));
    app_.add_option("--precision", c_.precision,
                    "auto|float|double: the computation's and the output's precision (auto: "
                    "double when any input is float64)")
        ->type_name("P")
        ->check(CLI::Validator(
            [](std::string& text) -> std::string {
              if (text == "auto" || text == "float" || text == "double") return {};
              return "'" + text + "' is not one of auto, float, double";
            },
            ""));
    value_flag("threads",
               ft::add_value_option(app_, "--threads", c_.threads,
                                    "OpenMP threads over heads, in [0, " +
                                        std::to_string(fa::multihead_options::max_threads) +
                                        "] (default 0: OpenMP's default)",
                                    std::pair{0, fa::multihead_options::max_threads}))
        ->type_name("N");
    switch_flag(
        "check_finite",
        app_.add_flag("--no-check-finite", c_.no_check_finite,
                      "accept NaN/Inf in the valid rows of q, k, v (check_finite = false)"));
    app_.add_flag("--reference", c_.reference,
                  "also print the time and ||O - O_exact||_F / ||O_exact||_F against dense "
                  "attention in float64")
        ->disable_flag_override();
    app_.set_help_flag("-h,--help", "this text");
    errors_.add(app_);
    app_.footer(knobs_.help() + "\n" + errors_.help() + estimate_help() + "\n" + limits_help);
  }

  /// Runs the tool; returns the exit status. Every error is reported here, as one line.
  int main(int argc, const char* const* argv) {
    try {
      return run(argc, argv);
    } catch (const CLI::ParseError& e) {
      report(std::string(e.what()) + " (see --help)");
    } catch (const tool_error& e) {
      report(e.what());
    } catch (const fa::invalid_argument& e) {
      report_library_error(e);
    } catch (const std::bad_alloc&) {
      report("out of memory");
    } catch (const std::exception& e) {
      report(e.what());
    }
    return 1;
  }

 private:
  CLI::Option* value_flag(const std::string& argument, CLI::Option* option) {
    argument_options_[argument] = {option, true};
    return option;
  }
  CLI::Option* switch_flag(const std::string& argument, CLI::Option* option) {
    option->disable_flag_override();
    argument_options_[argument] = {option, false};
    return option;
  }

  static void report(const std::string& message) {
    std::string line = "fastattn: error: " + message;
    for (char& ch : line)
      if (ch == '\n' || ch == '\r') ch = ' ';
    std::fprintf(stderr, "%s\n", line.c_str());
  }

  /// The flag or file the user gave for a library error's argument(), e.g. "--key-length 65",
  /// "--cluster-size 0" or "q.npy"; "" when the argument is none of them (a file path named by
  /// the .npy reader or writer, whose message already starts with it).
  std::string where(const std::string& argument) const {
    if (const auto it = argument_options_.find(argument); it != argument_options_.end()) {
      const auto& [option, takes_value] = it->second;
      std::string flag = option->get_name();
      if (takes_value && option->count() > 0) flag += " " + option->results().front();
      return flag;
    }
    if (auto flag = knobs_.flag_of(argument)) return *flag;
    if (argument == "q") return c_.q;
    if (argument == "k") return c_.k;
    if (argument == "v") return c_.v;
    if (argument == "out") return c_.out.empty() ? "the output" : c_.out;
    return {};
  }

  /// "fastattn: error: <flag or file>: [head h: ]<message>", and for a non-finite input value
  /// a second line with the flag that skips the check. The message is the library's, unchanged.
  void report_library_error(const fa::invalid_argument& e) const {
    const std::string& argument = e.argument();
    const std::string& message = e.message();
    std::string line;
    if (const std::string w = where(argument); !w.empty() && message.rfind(w + ": ", 0) != 0)
      line = w + ": ";
    std::vector<std::string> at;
    if (e.sample()) at.push_back("sample " + std::to_string(*e.sample()));
    if (e.head() && problem_.heads_axis) at.push_back("head " + std::to_string(*e.head()));
    for (std::size_t i = 0; i < at.size(); ++i) line += at[i] + (i + 1 < at.size() ? ", " : ": ");
    report(line + message);
    // The rule for the hint: a finiteness error is about a tensor's values (argument q, k or v)
    // and says "non-finite"; --no-check-finite is the flag that turns that check off.
    const bool tensor = argument == "q" || argument == "k" || argument == "v";
    if (tensor && message.find("non-finite") != std::string::npos)
      std::fprintf(stderr,
                   "fastattn: hint: pass --no-check-finite to skip this check (a non-finite "
                   "value then reaches the output rows that see it)\n");
  }

  int run(int argc, const char* const* argv) {
    if (const auto status = ft::parse_flags_only(app_, argc, argv)) return *status;
    if (c_.out.empty() && !c_.reference && !errors_.requested())
      throw tool_error(
          "--out is required (or --reference, --estimate-error or --max-error to only measure "
          "the error)");
    int status = 1;
    // The kernel and its knobs are resolved and checked before any file is touched.
    knobs_.with_kernel(c_.kernel, [&](const auto& policy) { status = run_kernel(policy); });
    return status;
  }

  /// Refuses an --out that is the same file as an input (by identity, not spelling): the
  /// output would overwrite the input it is computed from.
  void check_output_is_not_an_input() const {
    if (c_.out.empty()) return;
    const std::pair<const char*, const std::string*> inputs[] = {
        {"--q", &c_.q}, {"--k", &c_.k}, {"--v", &c_.v}};
    for (const auto& [flag, path] : inputs) {
      std::error_code ec;
      if (fs::equivalent(c_.out, *path, ec) && !ec)
        throw tool_error("--out " + c_.out + ": is the same file as " + flag + " " + *path +
                         "; the output would overwrite an input: write it to another file");
    }
  }

  /// The output limit (see `limits_help`); throws when `out_bytes` exceeds it.
  void check_output_size(const std::vector<fa::index>& out_shape,
                         std::optional<std::uint64_t> out_bytes, std::uint64_t input_bytes,
                         const char* dtype) const {
    std::uint64_t limit = min_output_bytes;
    if (input_bytes <= std::numeric_limits<std::uint64_t>::max() / output_per_input_byte)
      limit = std::max(limit, output_per_input_byte * input_bytes);
    else
      limit = std::numeric_limits<std::uint64_t>::max();
    const long pages = sysconf(_SC_PHYS_PAGES), page_size = sysconf(_SC_PAGE_SIZE);
    std::uint64_t half_memory = std::numeric_limits<std::uint64_t>::max();
    if (pages > 0 && page_size > 0)
      half_memory = static_cast<std::uint64_t>(pages) / 2 * static_cast<std::uint64_t>(page_size);
    const std::string size =
        out_bytes ? std::to_string(*out_bytes) + " bytes" : std::string("more than 2^64 bytes");
    const std::string what =
        "the output " + shape_string(out_shape) + " in " + dtype + " would take " + size;
    if (!out_bytes || *out_bytes > limit)
      throw tool_error(what + ", more than the tool allows for " + std::to_string(input_bytes) +
                       " bytes of input: max(64 MiB, 16 x the input files' size) = " +
                       std::to_string(limit) + " bytes (see --help)");
    if (*out_bytes > half_memory)
      throw tool_error(what + ", more than half of this machine's memory (" +
                       std::to_string(half_memory) + " bytes)");
  }

  template <class Policy>
  int run_kernel(const Policy& policy) {
    check_output_is_not_an_input();
    input in[3] = {{"q", c_.q, {}, {}, {}}, {"k", c_.k, {}, {}, {}}, {"v", c_.v, {}, {}, {}}};
    for (input& i : in) i.read_header();
    problem_ = check_shapes(in[0], in[1], in[2]);
    const bool any_double =
        std::any_of(std::begin(in), std::end(in), [](const input& i) { return i.is_double(); });
    const bool use_double = c_.precision == "double" || (c_.precision == "auto" && any_double);
    return use_double ? run_typed<double>(policy, in) : run_typed<float>(policy, in);
  }

  template <class T, class Policy>
  int run_typed(const Policy& policy, input (&in)[3]) {
    const problem& p = problem_;
    std::vector<fa::index> out_shape = {p.L, p.M};
    if (p.heads_axis) out_shape.insert(out_shape.begin(), p.H);
    const auto out_count =
        checked_product(static_cast<std::uint64_t>(p.H), static_cast<std::uint64_t>(p.L),
                        static_cast<std::uint64_t>(p.M));
    std::optional<std::uint64_t> out_bytes;
    if (out_count && *out_count <= std::numeric_limits<std::uint64_t>::max() / sizeof(T))
      out_bytes = *out_count * sizeof(T);
    check_output_size(out_shape, out_bytes,
                      in[0].file_bytes() + in[1].file_bytes() + in[2].file_bytes(),
                      std::is_same_v<T, float> ? "float32" : "float64");

    for (input& i : in) i.read_data();  // each input's data is read exactly once
    std::vector<T> converted[3];
    const T* const q = in[0].as<T>(converted[0]);
    const T* const k = in[1].as<T>(converted[1]);
    const T* const v = in[2].as<T>(converted[2]);

    fa::multihead_options mo;
    mo.common.scale = c_.scale;
    mo.common.key_length = c_.key_length;
    mo.common.query_length = c_.query_length;
    mo.common.causal = c_.causal;
    mo.common.check_finite = !c_.no_check_finite;
    mo.threads = c_.threads.value_or(0);

    // Inputs without data (L = S = 0) are H identical empty problems and the output has no
    // element: one head is checked and run, so H costs nothing (H may be 2^62).
    const fa::index heads = p.L == 0 && p.S == 0 ? 1 : p.H;
    std::vector<T> out(static_cast<std::size_t>(*out_count));
    // With an estimate, the kernel runs under fastattn::guarded: one report per head (B = 1).
    std::vector<fa::error_estimate> reports(errors_.requested() ? static_cast<std::size_t>(heads)
                                                                : 0);
    auto attend = [&](const auto& kernel) {
      fa::multihead_attention(kernel, heads_view(q, heads, p.L, p.E),
                              heads_view(k, heads, p.S, p.E), heads_view(v, heads, p.S, p.M),
                              heads_view(out.data(), heads, p.L, p.M), mo);
    };
    const auto start = std::chrono::steady_clock::now();
    if (errors_.requested())
      attend(errors_.guard(policy, reports));
    else
      attend(policy);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (!c_.out.empty()) fa::io::write_npy(c_.out, out_shape, out);
    if (!c_.reference && !errors_.requested()) return 0;

    std::string description(Policy::name);
    if (const std::string knobs = ft::kernel_flags::describe(policy); !knobs.empty())
      description += " (" + knobs + ")";
    std::printf("kernel:          %s\n", description.c_str());
    std::printf("shape:           H=%lld L=%lld S=%lld E=%lld M=%lld, %s\n",
                static_cast<long long>(p.H), static_cast<long long>(p.L),
                static_cast<long long>(p.S), static_cast<long long>(p.E),
                static_cast<long long>(p.M), std::is_same_v<T, float> ? "float32" : "float64");
    std::printf("time:            %.3f ms\n", seconds * 1e3);
    double rel = 0;
    if (c_.reference) rel = relative_error(q, k, v, out, in, heads, mo);
    if (errors_.requested()) print_estimates(reports, out, heads);
    return std::isfinite(rel) ? 0 : 1;
  }

  /// The estimate lines (see `estimate_help`): the whole output's, then one per head, then the
  /// fallback count with --max-error.
  template <class T>
  void print_estimates(const std::vector<fa::error_estimate>& reports, const std::vector<T>& out,
                       fa::index heads) const {
    const auto per_head = out.size() / static_cast<std::size_t>(heads);
    std::vector<double> weights(reports.size());
    for (std::size_t h = 0; h < reports.size(); ++h)
      for (std::size_t i = h * per_head; i < (h + 1) * per_head; ++i)
        weights[h] += static_cast<double>(out[i]) * static_cast<double>(out[i]);
    const ft::combined_estimate all = ft::error_flags::combine(reports, weights, true);
    std::printf(
        "estimated error: %.3e  [%.3e, %.3e]  (%d%% interval; %lld rows per head computed "
        "exactly)\n",
        all.error, all.lower, all.upper, static_cast<int>(fa::guarded<fa::dense>::confidence * 100),
        static_cast<long long>(errors_.samples()));
    for (std::size_t h = 0; h < reports.size(); ++h)
      std::printf("%s\n", ft::error_flags::head_line(h, reports[h]).c_str());
    if (const auto tolerance = errors_.max_error())
      std::printf("fell back: %zu of %zu heads (estimated error above %s, recomputed exactly)\n",
                  ft::error_flags::fell_back(reports), reports.size(),
                  ft::format_value(*tolerance).c_str());
  }

  /// Prints the reference lines: ||O - O_exact||_F / ||O_exact||_F against dense attention in
  /// float64, and its time. Returns the error.
  template <class T>
  double relative_error(const T* q, const T* k, const T* v, const std::vector<T>& out,
                        input (&in)[3], fa::index heads, const fa::multihead_options& mo) const {
    const problem& p = problem_;

    // Exact attention in float64 on the inputs as stored in the files (already in memory: no
    // file is read again; in double precision, the kernel's inputs themselves).
    std::vector<double> converted_d[3];
    const double *qd = nullptr, *kd = nullptr, *vd = nullptr;
    if constexpr (std::is_same_v<T, double>) {
      qd = q;
      kd = k;
      vd = v;
    } else {
      qd = in[0].as<double>(converted_d[0]);
      kd = in[1].as<double>(converted_d[1]);
      vd = in[2].as<double>(converted_d[2]);
    }
    std::vector<double> exact(out.size());
    const auto ref_start = std::chrono::steady_clock::now();
    fa::multihead_attention(fa::dense{}, heads_view(qd, heads, p.L, p.E),
                            heads_view(kd, heads, p.S, p.E), heads_view(vd, heads, p.S, p.M),
                            heads_view(exact.data(), heads, p.L, p.M), mo);
    const double ref_seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - ref_start).count();
    double diff = 0, norm = 0;
    for (std::size_t i = 0; i < out.size(); ++i) {
      const double d = static_cast<double>(out[i]) - exact[i];
      diff += d * d;
      norm += exact[i] * exact[i];
    }
    const double rel = norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
    std::printf("relative error:  %.3e  (vs exact attention in float64, which took %.3f ms)\n", rel,
                ref_seconds * 1e3);
    return rel;
  }

  CLI::App app_{"", "fastattn"};
  ft::kernel_flags knobs_{app_};  ///< the knob flags, registered first (listed per kernel in the
                                  ///< footer)
  ft::error_flags errors_;        ///< --estimate-error, --max-error, --error-samples
  command_line c_;
  std::map<std::string, std::pair<CLI::Option*, bool>> argument_options_;  ///< library argument
                                                                           ///< -> (option, takes
                                                                           ///< a value)
  problem problem_;
};

}  // namespace

int main(int argc, char** argv) {
  try {
    tool t;
    return t.main(argc, argv);
  } catch (const std::exception& e) {  // setting up the flags failed (out of memory)
    std::fprintf(stderr, "fastattn: error: %s\n", e.what());
    return 1;
  }
}
