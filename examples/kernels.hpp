// The kernels the example programs (the `fastattn` tool, `fastattn_mlm`) know, and their knobs as
// command-line flags.
//
// Adding a kernel is two small steps, both in this file:
//   1. add its policy type to `kernel_list` below;
//   2. specialise `policy_knobs` with one FASTATTN_KNOB(policy, member, "help") line per public
//      data member. The flag is the member's name with '_' replaced by '-' (`cluster_size` ->
//      `--cluster-size`), its default is read from a default-constructed policy, and its value is
//      parsed according to the member's type (integers, bool, double).
// Dispatch over `--kernel NAME` compares NAME with each policy's `name`.
#pragma once

#include <charconv>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include <fastattn/attention.hpp>
#include <fastattn/dense.hpp>
#include <fastattn/clustered.hpp>
#include <fastattn/improved_clustered.hpp>
#include <fastattn/smyrf.hpp>

namespace fastattn::examples {

[[noreturn]] inline void usage_error(const std::string& message) {
  throw invalid_argument("", message);
}

/// One knob: a public data member of a policy, its flag name and a help line.
template <class Policy, class Member>
struct knob {
  std::string_view member_name;  ///< the C++ member name, e.g. "cluster_size"
  Member Policy::*member;
  std::string_view help;

  std::string flag() const {
    std::string f(member_name);
    for (char& c : f)
      if (c == '_') c = '-';
    return f;
  }
};

#define FASTATTN_KNOB(policy, member, help) \
  ::fastattn::examples::knob<policy, decltype(policy::member)> { #member, &policy::member, help }

/// Primary template: a policy with no knobs. Specialise with `static constexpr auto list =
/// std::make_tuple(FASTATTN_KNOB(...), ...)`.
template <class Policy>
struct policy_knobs {
  static constexpr auto list = std::tuple<>{};
};

template <>
struct policy_knobs<dense> {
  static constexpr auto list = std::make_tuple(
      FASTATTN_KNOB(dense, query_block, "queries per block (>= 1)"),
      FASTATTN_KNOB(dense, key_block, "keys per block streamed through the online softmax (>= 1)"));
};

template <>
struct policy_knobs<clustered> {
  static constexpr auto list = std::make_tuple(
      FASTATTN_KNOB(clustered, clusters,
                    "number of query clusters C (clamped to the valid queries)"),
      FASTATTN_KNOB(clustered, bits, "hash bits B of the hyperplane LSH (1..64)"),
      FASTATTN_KNOB(clustered, iterations, "Hamming k-means assignment passes"),
      FASTATTN_KNOB(clustered, hash_bias, "random thresholds on the hyperplanes (true/false)"),
      FASTATTN_KNOB(clustered, seed, "seed of every random draw"));
};

template <>
struct policy_knobs<improved_clustered> {
  static constexpr auto list = std::make_tuple(
      FASTATTN_KNOB(improved_clustered, clusters,
                    "number of query clusters C (clamped to the valid queries)"),
      FASTATTN_KNOB(improved_clustered, bits, "hash bits B of the hyperplane LSH (1..64)"),
      FASTATTN_KNOB(improved_clustered, iterations, "Hamming k-means assignment passes"),
      FASTATTN_KNOB(improved_clustered, hash_bias,
                    "random thresholds on the hyperplanes (true/false)"),
      FASTATTN_KNOB(improved_clustered, topk,
                    "keys each cluster attends to exactly (clamped to S)"),
      FASTATTN_KNOB(improved_clustered, seed, "seed of every random draw"));
};

template <>
struct policy_knobs<smyrf> {
  static constexpr auto list = std::make_tuple(
      FASTATTN_KNOB(smyrf, hashes, "hashing rounds (>= 1)"),
      FASTATTN_KNOB(smyrf, cluster_size, "queries (and keys) per balanced cluster (>= 1)"),
      FASTATTN_KNOB(smyrf, r, "E2LSH bucket width (> 0)"),
      FASTATTN_KNOB(smyrf, seed, "seed of every random draw"));
};

/// The kernels the tools offer, in --help order.
template <class... Policies>
struct kernel_list {};

using kernels = kernel_list<dense, clustered, improved_clustered, smyrf>;

/// The settings `fastattn_mlm --kernel all` runs for each kernel. The primary template runs the
/// policy's defaults, so a new kernel is swept without any entry here.
template <class Policy>
struct policy_sweep {
  static std::vector<Policy> settings() { return {Policy{}}; }
};

template <>
struct policy_sweep<clustered> {
  static std::vector<clustered> settings() {
    return {clustered{.clusters = 25}, clustered{.clusters = 100}, clustered{.clusters = 200}};
  }
};
template <>
struct policy_sweep<improved_clustered> {
  static std::vector<improved_clustered> settings() {
    return {improved_clustered{.clusters = 25, .topk = 32},
            improved_clustered{.clusters = 100, .topk = 32},
            improved_clustered{.clusters = 100, .topk = 64}};
  }
};
template <>
struct policy_sweep<smyrf> {
  static std::vector<smyrf> settings() {
    return {smyrf{.hashes = 1, .cluster_size = 32}, smyrf{.hashes = 2, .cluster_size = 64},
            smyrf{.hashes = 4, .cluster_size = 128}};
  }
};

// ---------------------------------------------------------------------------------------------
// Value parsing and printing by member type.

template <class T>
T parse_value(const std::string& flag, const std::string& text) {
  auto bad = [&](const std::string& what) -> T {
    usage_error("--" + flag + ": '" + text + "' is not " + what);
  };
  if constexpr (std::is_same_v<T, bool>) {
    if (text == "1" || text == "true" || text == "True" || text == "yes" || text == "on")
      return true;
    if (text == "0" || text == "false" || text == "False" || text == "no" || text == "off")
      return false;
    return bad("a boolean (true/false/1/0)");
  } else if constexpr (std::is_integral_v<T>) {
    T value{};
    const char* end = text.data() + text.size();
    const auto [ptr, ec] = std::from_chars(text.data(), end, value);
    if (ec == std::errc::result_out_of_range)
      return bad("in range [" + std::to_string(std::numeric_limits<T>::min()) + ", " +
                 std::to_string(std::numeric_limits<T>::max()) + "]");
    if (ec != std::errc() || ptr != end || text.empty())
      return bad(std::is_signed_v<T> ? "an integer" : "a non-negative integer");
    return value;
  } else {
    static_assert(std::is_floating_point_v<T>);
    double value = 0;
    const char* end = text.data() + text.size();
    const auto [ptr, ec] = std::from_chars(text.data(), end, value);
    if (ec != std::errc() || ptr != end || text.empty() || !std::isfinite(value))
      return bad("a finite number");
    return static_cast<T>(value);
  }
}

template <class T>
std::string format_value(const T& value) {
  if constexpr (std::is_same_v<T, bool>) {
    return value ? "true" : "false";
  } else if constexpr (std::is_integral_v<T>) {
    return std::to_string(value);
  } else {
    std::ostringstream out;
    out << value;
    return out.str();
  }
}

// ---------------------------------------------------------------------------------------------
// Generic operations over the kernel list.

/// Calls f(knob) for every knob of Policy.
template <class Policy, class F>
void for_each_knob(F&& f) {
  std::apply([&](const auto&... k) { (f(k), ...); }, policy_knobs<Policy>::list);
}

/// Calls f(Policy{}) for every kernel (as a tag carrying the default policy).
template <class F, class... Policies>
void for_each_kernel(kernel_list<Policies...>, F&& f) {
  (f(Policies{}), ...);
}
template <class F>
void for_each_kernel(F&& f) {
  for_each_kernel(kernels{}, std::forward<F>(f));
}

/// Names of every kernel, comma separated.
inline std::string kernel_names() {
  std::string names;
  for_each_kernel([&](const auto& p) {
    if (!names.empty()) names += ", ";
    names += std::string(std::decay_t<decltype(p)>::name);
  });
  return names;
}

/// Every knob flag of every kernel.
inline std::set<std::string> all_knob_flags() {
  std::set<std::string> flags;
  for_each_kernel([&](const auto& p) {
    for_each_knob<std::decay_t<decltype(p)>>([&](const auto& k) { flags.insert(k.flag()); });
  });
  return flags;
}

/// Builds Policy from its defaults and the knob flags in `values` (flag -> text). A flag that is
/// a knob of another kernel but not of this one is an error naming this kernel's knobs.
template <class Policy>
Policy make_policy(const std::map<std::string, std::string>& values) {
  Policy policy{};
  std::set<std::string> mine;
  for_each_knob<Policy>([&](const auto& k) {
    mine.insert(k.flag());
    const auto it = values.find(k.flag());
    if (it != values.end())
      policy.*(k.member) =
          parse_value<std::remove_cvref_t<decltype(policy.*(k.member))>>(k.flag(), it->second);
  });
  for (const auto& [flag, text] : values) {
    if (!mine.count(flag)) {
      std::string list;
      for (const auto& f : mine) list += (list.empty() ? "--" : ", --") + f;
      usage_error("--" + flag + " is not a knob of kernel '" + std::string(Policy::name) +
                  "' (its knobs: " + (list.empty() ? "none" : list) + ")");
    }
  }
  return policy;
}

/// Calls f(policy) with the kernel called `name` built from `knob_values`; throws on an unknown
/// name. f is instantiated for every kernel, so it must be a generic lambda.
template <class F>
void with_kernel(std::string_view name, const std::map<std::string, std::string>& knob_values,
                 F&& f) {
  bool found = false;
  for_each_kernel([&](const auto& tag) {
    using P = std::decay_t<decltype(tag)>;
    if (!found && P::name == name) {
      found = true;
      f(make_policy<P>(knob_values));
    }
  });
  if (!found)
    usage_error("unknown kernel '" + std::string(name) + "' (available: " + kernel_names() + ")");
}

/// A policy's knobs with their current values, e.g. "clusters=100 bits=63".
template <class Policy>
std::string describe(const Policy& policy) {
  std::string out;
  for_each_knob<Policy>([&](const auto& k) {
    if (!out.empty()) out += ' ';
    out += std::string(k.member_name) + "=" + format_value(policy.*(k.member));
  });
  return out;
}

/// --help text for the kernels: each kernel with its knobs and their defaults.
inline std::string kernels_help() {
  std::ostringstream out;
  for_each_kernel([&](const auto& tag) {
    using P = std::decay_t<decltype(tag)>;
    out << "  --kernel " << P::name << (P::is_exact ? "  (exact" : "  (approximate")
        << (P::supports_causal ? ", supports --causal)" : ", no --causal)") << "\n";
    const P defaults{};
    for_each_knob<P>([&](const auto& k) {
      std::string left = "      --" + k.flag() + " " + format_value(defaults.*(k.member));
      if (left.size() < 30) left.append(30 - left.size(), ' ');
      out << left << "  " << k.help << "\n";
    });
  });
  return out.str();
}

// ---------------------------------------------------------------------------------------------
// A tiny argument parser: --flag value, --flag=value, and boolean switches.

struct parsed_args {
  std::map<std::string, std::string> values;  ///< flag (without --) -> value
  std::set<std::string> switches;             ///< boolean switches that were given
};

/// Parses argv. `value_flags` take a value, `switch_flags` do not; every knob flag of every
/// kernel takes a value. Anything else is an error.
inline parsed_args parse_args(int argc, const char* const* argv,
                              const std::set<std::string>& value_flags,
                              const std::set<std::string>& switch_flags) {
  const std::set<std::string> knobs = all_knob_flags();
  parsed_args args;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg.size() < 3 || arg.compare(0, 2, "--") != 0)
      usage_error("unexpected argument '" + arg + "' (flags start with --; see --help)");
    arg = arg.substr(2);
    std::optional<std::string> value;
    if (const auto eq = arg.find('='); eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
    }
    if (switch_flags.count(arg)) {
      if (value) usage_error("--" + arg + " takes no value");
      args.switches.insert(arg);
      continue;
    }
    if (!value_flags.count(arg) && !knobs.count(arg))
      usage_error("unknown flag --" + arg + " (see --help)");
    if (!value) {
      if (i + 1 >= argc) usage_error("--" + arg + " needs a value");
      value = argv[++i];
    }
    if (args.values.count(arg)) usage_error("--" + arg + " given twice");
    args.values[arg] = *value;
  }
  return args;
}

/// The knob flags among `args` (everything that is a knob of some kernel).
inline std::map<std::string, std::string> knob_values(const parsed_args& args) {
  const std::set<std::string> knobs = all_knob_flags();
  std::map<std::string, std::string> out;
  for (const auto& [flag, value] : args.values)
    if (knobs.count(flag)) out[flag] = value;
  return out;
}

}  // namespace fastattn::examples
