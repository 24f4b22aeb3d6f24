// `fastattn`: run any attention kernel on NumPy arrays.
//
//   fastattn --kernel clustered --clusters 100 --seed 1 --q q.npy --k k.npy --v v.npy --out o.npy
//
// Inputs are .npy float32/float64 arrays, one head as (L, E), (S, E), (S, M) or several heads as
// (H, L, E), (H, S, E), (H, S, M). Several heads run through fastattn::multihead_attention, the
// H axis taken as the batch axis of a (B = H, L, 1, E) view so the caller's arrays are not copied;
// head h uses random stream h, the same as head h of one sample in a model. Errors (bad flags,
// bad files, bad shapes) print one line on stderr and exit with status 1; nothing ever crashes.
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <exception>
#include <iostream>
#include <new>
#include <regex>
#include <string>
#include <vector>

#include <fastattn/io/npy.hpp>
#include <fastattn/multihead.hpp>

#include "kernels.hpp"

namespace fa = fastattn;
namespace fx = fastattn::examples;

namespace {

const char* const usage_text =
    "usage: fastattn --kernel NAME [kernel knobs] --q Q.npy --k K.npy --v V.npy [--out O.npy]\n"
    "                [--scale X] [--key-length N] [--query-length N] [--causal]\n"
    "                [--precision auto|float|double] [--threads N] [--reference]\n"
    "\n"
    "Runs one attention kernel on NumPy arrays (.npy, float32 or float64, little-endian, C "
    "order):\n"
    "  q (L, E), k (S, E), v (S, M)  -> out (L, M)        one head\n"
    "  q (H, L, E), k (H, S, E), v (H, S, M) -> out (H, L, M)   H heads\n"
    "\n"
    "Common options:\n"
    "  --kernel NAME          which kernel (required); one of the kernels below\n"
    "  --q, --k, --v FILE     input arrays (required)\n"
    "  --out FILE             output array (required unless --reference)\n"
    "  --scale X              multiplies q.k before the softmax (default 1/sqrt(E))\n"
    "  --key-length N         keys at index >= N are padding (default S)\n"
    "  --query-length N       queries at index >= N are padding: zero output rows (default L)\n"
    "  --causal               query i sees keys j <= i (kernels that cannot do it refuse)\n"
    "  --precision P          auto (default: double if q, k, v are all float64, else float),\n"
    "                         float or double; the output is written in this precision\n"
    "  --threads N            OpenMP threads over heads (default 0 = OpenMP's default)\n"
    "  --no-check-finite      do not reject NaN/Inf in the valid rows of q, k, v (when the\n"
    "                         library checks them: options.check_finite)\n"
    "  --reference            also print the relative error ||O - O_exact||_F / ||O_exact||_F\n"
    "                         against exact attention (dense in float64) and the time taken\n"
    "  --help                 this text\n"
    "\n"
    "Kernels and their knobs (flag, default, meaning):\n";

struct loaded {
  std::vector<fa::index> shape;
  fa::io::npy_dtype dtype;
};

std::string shape_string(const std::vector<fa::index>& s) {
  std::string out = "(";
  for (std::size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

/// Shapes of one problem: H heads of q (L, E), k (S, E), v (S, M).
struct problem {
  fa::index H = 1, L = 0, S = 0, E = 0, M = 0;
  bool heads_axis = false;  ///< inputs were 3-d
};

problem check_shapes(const std::string& qp, const std::vector<fa::index>& q, const std::string& kp,
                     const std::vector<fa::index>& k, const std::string& vp,
                     const std::vector<fa::index>& v) {
  auto rank_error = [](const std::string& path, const std::string& name,
                       const std::vector<fa::index>& s) {
    fx::usage_error(path + ": " + name +
                    " must be 2-d (rows, features) or 3-d (heads, rows, features), got shape " +
                    shape_string(s));
  };
  if (q.size() != 2 && q.size() != 3) rank_error(qp, "q", q);
  if (k.size() != 2 && k.size() != 3) rank_error(kp, "k", k);
  if (v.size() != 2 && v.size() != 3) rank_error(vp, "v", v);
  if (k.size() != q.size() || v.size() != q.size())
    fx::usage_error("q, k and v must all be 2-d or all be 3-d: q " + shape_string(q) + ", k " +
                    shape_string(k) + ", v " + shape_string(v));
  problem p;
  p.heads_axis = q.size() == 3;
  const std::size_t o = p.heads_axis ? 1 : 0;
  if (p.heads_axis) {
    p.H = q[0];
    if (k[0] != p.H || v[0] != p.H)
      fx::usage_error("q, k and v must have the same number of heads (first axis): q " +
                      shape_string(q) + ", k " + shape_string(k) + ", v " + shape_string(v));
    if (p.H < 1) fx::usage_error("the heads axis must be at least 1, got q " + shape_string(q));
  }
  p.L = q[o];
  p.E = q[o + 1];
  p.S = k[o];
  p.M = v[o + 1];
  if (k[o + 1] != p.E)
    fx::usage_error("q and k must have the same feature size E (last axis): q " + shape_string(q) +
                    ", k " + shape_string(k));
  if (v[o] != p.S)
    fx::usage_error("v must have as many rows as k (S): k " + shape_string(k) + ", v " +
                    shape_string(v));
  if (p.E < 1) fx::usage_error("the feature size E must be at least 1, got q " + shape_string(q));
  return p;
}

/// Runs `policy` over the H heads of (H, L, E) buffers through multihead_attention.
template <class Policy, class T>
void run(const Policy& policy, const problem& p, const T* q, const T* k, const T* v, T* out,
         const fa::options& opt, int threads) {
  // (H, L, E) is exactly a (B = H, L, heads = 1, E) tensor: no copy.
  const fa::tensor_view<const T> qv{q, p.H, p.L, 1, p.E};
  const fa::tensor_view<const T> kv{k, p.H, p.S, 1, p.E};
  const fa::tensor_view<const T> vv{v, p.H, p.S, 1, p.M};
  const fa::tensor_view<T> ov{out, p.H, p.L, 1, p.M};
  fa::multihead_options mo;
  mo.common = opt;
  mo.threads = threads;
  fa::multihead_attention(policy, qv, kv, vv, ov, mo);
}

template <class T>
int run_all(const fx::parsed_args& args, const std::string& kernel, const problem& p,
            const std::string& qp, const std::string& kp, const std::string& vp,
            const fa::options& opt, int threads) {
  const auto q = fa::io::read_npy<T>(qp);
  const auto k = fa::io::read_npy<T>(kp);
  const auto v = fa::io::read_npy<T>(vp);
  // The output is the one array not bounded by an input file's size (L and M come from
  // different files): refuse sizes the machine cannot hold instead of being OOM-killed.
  const double out_bytes = static_cast<double>(p.H) * static_cast<double>(p.L) *
                           static_cast<double>(p.M) * static_cast<double>(sizeof(T));
  const double memory =
      static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGE_SIZE));
  if (memory > 0 && out_bytes > 0.5 * memory)
    fx::usage_error("the output (" + std::to_string(p.H) + ", " + std::to_string(p.L) + ", " +
                    std::to_string(p.M) + ") would need " + std::to_string(out_bytes / 1e9) +
                    " GB, more than half of this machine's memory");
  std::vector<T> out(static_cast<std::size_t>(p.H * p.L * p.M));
  double seconds = 0;
  std::string description;
  fx::with_kernel(kernel, fx::knob_values(args), [&](const auto& policy) {
    description = std::string(std::decay_t<decltype(policy)>::name);
    const std::string knobs = fx::describe(policy);
    if (!knobs.empty()) description += " (" + knobs + ")";
    const auto start = std::chrono::steady_clock::now();
    run(policy, p, q.data.data(), k.data.data(), v.data.data(), out.data(), opt, threads);
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  });
  if (args.values.count("out")) {
    std::vector<fa::index> shape = {p.L, p.M};
    if (p.heads_axis) shape.insert(shape.begin(), p.H);
    fa::io::write_npy(args.values.at("out"), shape, out);
  }
  if (args.switches.count("reference")) {
    // Exact attention in float64 from the same inputs (as read, converted to double).
    const auto qd = fa::io::read_npy<double>(qp);
    const auto kd = fa::io::read_npy<double>(kp);
    const auto vd = fa::io::read_npy<double>(vp);
    std::vector<double> exact(out.size());
    const auto start = std::chrono::steady_clock::now();
    run(fa::dense{}, p, qd.data.data(), kd.data.data(), vd.data.data(), exact.data(), opt, threads);
    const double ref_seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    double diff = 0, norm = 0;
    for (std::size_t i = 0; i < out.size(); ++i) {
      const double d = static_cast<double>(out[i]) - exact[i];
      diff += d * d;
      norm += exact[i] * exact[i];
    }
    const double rel = norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
    std::printf("kernel:          %s\n", description.c_str());
    std::printf("shape:           H=%ld L=%ld S=%ld E=%ld M=%ld, %s\n", static_cast<long>(p.H),
                static_cast<long>(p.L), static_cast<long>(p.S), static_cast<long>(p.E),
                static_cast<long>(p.M), std::is_same_v<T, float> ? "float32" : "float64");
    std::printf("time:            %.3f ms\n", seconds * 1e3);
    std::printf("relative error:  %.3e  (vs exact attention in float64, which took %.3f ms)\n", rel,
                ref_seconds * 1e3);
    if (!std::isfinite(rel)) return 1;
  }
  return 0;
}

int cli_main(int argc, const char* const* argv) {
  const fx::parsed_args args =
      fx::parse_args(argc, argv,
                     {"kernel", "q", "k", "v", "out", "scale", "key-length", "query-length",
                      "precision", "threads"},
                     {"causal", "reference", "help", "no-check-finite"});
  if (args.switches.count("help") || argc == 1) {
    std::cout << usage_text << fx::kernels_help();
    return argc == 1 ? 1 : 0;
  }
  auto need = [&](const std::string& flag) -> const std::string& {
    const auto it = args.values.find(flag);
    if (it == args.values.end()) fx::usage_error("--" + flag + " is required (see --help)");
    return it->second;
  };
  const std::string kernel = need("kernel");
  // Resolve the kernel and its knobs before touching any file, so flag mistakes come first.
  fx::with_kernel(kernel, fx::knob_values(args), [](const auto&) {});
  const std::string qp = need("q"), kp = need("k"), vp = need("v");
  if (!args.values.count("out") && !args.switches.count("reference"))
    fx::usage_error("--out is required (or --reference to only measure)");

  fa::options opt;
  if (args.values.count("scale"))
    opt.scale = fx::parse_value<double>("scale", args.values.at("scale"));
  if (args.values.count("key-length"))
    opt.key_length = fx::parse_value<fa::index>("key-length", args.values.at("key-length"));
  if (args.values.count("query-length"))
    opt.query_length = fx::parse_value<fa::index>("query-length", args.values.at("query-length"));
  opt.causal = args.switches.count("causal") > 0;
  opt.check_finite = args.switches.count("no-check-finite") == 0;
  const int threads =
      args.values.count("threads") ? fx::parse_value<int>("threads", args.values.at("threads")) : 0;
  const std::string precision =
      args.values.count("precision") ? args.values.at("precision") : "auto";
  if (precision != "auto" && precision != "float" && precision != "double")
    fx::usage_error("--precision must be auto, float or double, got '" + precision + "'");

  // Headers first: every shape is checked before any data is read.
  const auto qh = fa::io::read_npy_header(qp), kh = fa::io::read_npy_header(kp),
             vh = fa::io::read_npy_header(vp);
  const problem p = check_shapes(qp, qh.shape, kp, kh.shape, vp, vh.shape);
  const bool all_double = qh.dtype == fa::io::npy_dtype::float64 &&
                          kh.dtype == fa::io::npy_dtype::float64 &&
                          vh.dtype == fa::io::npy_dtype::float64;
  const bool use_double = precision == "double" || (precision == "auto" && all_double);
  return use_double ? run_all<double>(args, kernel, p, qp, kp, vp, opt, threads)
                    : run_all<float>(args, kernel, p, qp, kp, vp, opt, threads);
}

/// One line: newlines in a message become spaces.
std::string one_line(std::string s) {
  for (char& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return cli_main(argc, argv);
  } catch (const fa::invalid_argument& e) {
    std::string what = one_line(e.what());
    if (what.rfind("fastattn: ", 0) != 0) what = "fastattn: " + what;
    // Speak the tool's language: the library's hint names the C++ option.
    const std::string hint = "pass options.check_finite = false to skip this check";
    if (const auto pos = what.find(hint); pos != std::string::npos)
      what.replace(pos, hint.size(), "pass --no-check-finite to skip this check");
    // The tool runs heads as the driver's batch axis: "sample h, head 0" is head h.
    what = std::regex_replace(what, std::regex("sample ([0-9]+), head 0"), "head $1");
    std::fprintf(stderr, "%s\n", what.c_str());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "fastattn: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fastattn: error: %s\n", one_line(e.what()).c_str());
    return 1;
  }
}
