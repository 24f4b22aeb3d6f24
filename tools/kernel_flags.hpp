// The kernels' knobs as command-line flags, for fastattn's tools, on CLI11.
//
// Everything here is derived from the policies: each kernel of a `fastattn::kernel_list` (by
// default `fastattn::kernels`, the one list of built-in kernels) contributes one flag per knob of
// its `knobs()`: the flag is the knob's name with '_' replaced by '-' (`cluster_size` ->
// `--cluster-size`), its value is parsed as the knob's type, its default is read from a
// default-constructed policy, and its help line and valid range come from the knob. A kernel
// added to `fastattn::kernels` therefore shows up in every tool, with its flags, its --help
// entry and its checks, without touching the tools.
//
//   CLI::App app{"..."};
//   app.formatter(std::make_shared<fastattn_tools::formatter>());
//   std::string kernel;
//   fastattn_tools::kernel_flags::add_kernel_option(app, kernel);   // --kernel NAME
//   fastattn_tools::kernel_flags knobs(app);             // --clusters, --seed, --topk, ...
//   app.footer(knobs.help());
//   app.parse(argc, argv);
//   knobs.with_kernel(kernel, [&](const auto& policy) { /* run it */ });
//
// Parsing is strict (the whole text, base 10, no wrap-around of negative numbers into unsigned
// knobs, finite floating values); a mistake is a CLI::ValidationError "--flag: ...", and a knob
// outside its range is the library's fastattn::invalid_argument from fastattn::validate, whose
// argument() is the knob's name (`flag_of` turns it back into the flag the user typed).
#pragma once

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>

#include <fastattn/fastattn.hpp>

namespace fastattn_tools {

// ---------------------------------------------------------------------------------------------
// Values: strict parsing and printing by type.

/// The text of a value as the tools print it: numbers in their shortest round-trip form, bools
/// as true/false.
template <class T>
std::string format_value(const T& value) {
  if constexpr (std::is_same_v<T, bool>) {
    return value ? "true" : "false";
  } else {
    static_assert(std::is_arithmetic_v<T>);
    char buffer[64];
    const auto result = std::to_chars(buffer, buffer + sizeof buffer, value);
    return std::string(buffer, result.ptr);
  }
}

/// What a value of type T looks like, for --help ("INT", "UINT", "X", "BOOL").
template <class T>
std::string type_name() {
  if constexpr (std::is_same_v<T, bool>)
    return "BOOL";
  else if constexpr (std::is_floating_point_v<T>)
    return "X";
  else if constexpr (std::is_unsigned_v<T>)
    return "UINT";
  else
    return "INT";
}

/// Parses all of `text` as a T into `out`. Returns "" on success, otherwise what is wrong (for a
/// message "--flag: <what>"). Integers are base 10 and must fit T (no wrap-around: "-1" is not
/// an unsigned value); floating values must be finite and representable in T; bools are
/// true/false, 1/0, yes/no or on/off.
template <class T>
std::string parse_value(std::string_view text, T& out) {
  const std::string quoted = "'" + std::string(text) + "'";
  if constexpr (std::is_same_v<T, bool>) {
    static constexpr std::string_view yes[] = {"true", "True", "1", "yes", "on"};
    static constexpr std::string_view no[] = {"false", "False", "0", "no", "off"};
    if (std::find(std::begin(yes), std::end(yes), text) != std::end(yes)) {
      out = true;
      return {};
    }
    if (std::find(std::begin(no), std::end(no), text) != std::end(no)) {
      out = false;
      return {};
    }
    return quoted + " is not a boolean (true or false)";
  } else if constexpr (std::is_integral_v<T>) {
    T value{};
    const char* const end = text.data() + text.size();
    const auto [ptr, ec] = std::from_chars(text.data(), end, value);
    if (ec == std::errc::result_out_of_range)
      return quoted + " is out of range [" + format_value(std::numeric_limits<T>::min()) + ", " +
             format_value(std::numeric_limits<T>::max()) + "]";
    if (ec != std::errc() || ptr != end)
      return quoted +
             (std::is_signed_v<T> ? " is not an integer" : " is not a non-negative integer");
    out = value;
    return {};
  } else {
    static_assert(std::is_floating_point_v<T>);
    double value = 0;
    const char* const end = text.data() + text.size();
    const auto [ptr, ec] = std::from_chars(text.data(), end, value);
    if (ec == std::errc::result_out_of_range)
      return quoted + " is out of range (at most " + format_value(std::numeric_limits<T>::max()) +
             " in magnitude)";
    if (ec != std::errc() || ptr != end || !std::isfinite(value))
      return quoted + " is not a finite number";
    if (std::abs(value) > static_cast<double>(std::numeric_limits<T>::max()))
      return quoted + " is out of range (at most " + format_value(std::numeric_limits<T>::max()) +
             " in magnitude)";
    out = static_cast<T>(value);
    return {};
  }
}

/// A CLI11 check that the value parses as T (parse_value) and, when given, lies in
/// [range->first, range->second].
template <class T>
CLI::Validator value_check(std::optional<std::pair<T, T>> range = {}) {
  return CLI::Validator(
      [range](std::string& text) -> std::string {
        T value{};
        std::string problem = parse_value(text, value);
        if (problem.empty() && range && !(value >= range->first && value <= range->second))
          problem = "'" + text + "' is not in [" + format_value(range->first) + ", " +
                    format_value(range->second) + "]";
        return problem;
      },
      "");  // no description: the option's help states the range
}

/// Adds option `name` (e.g. "--key-length") whose value is parsed strictly as T (parse_value),
/// optionally bounded to `range`, and stored in `target` when given. Returns the option, whose
/// results() keep the text as typed (for messages).
template <class T>
CLI::Option* add_value_option(CLI::App& app, const std::string& name, std::optional<T>& target,
                              const std::string& help,
                              std::type_identity_t<std::optional<std::pair<T, T>>> range = {}) {
  CLI::Option* option = app.add_option_function<std::string>(
      name,
      [&target](const std::string& text) {
        T value{};
        parse_value(text, value);  // checked by value_check before this runs
        target = value;
      },
      help);
  option->check(value_check<T>(range));
  option->type_name(type_name<T>());
  return option;
}

// ---------------------------------------------------------------------------------------------
// The kernels' knobs as flags.

/// The option group of the knob flags. `formatter` leaves it out of CLI11's option list: the
/// kernel flags' `help()` lists the knobs per kernel, with their defaults and ranges.
inline constexpr const char* knob_group = "Kernel knobs";

/// CLI11's help formatter without the knob group (see above) and, when `usage` is given, with a
/// tool's own usage text (ending in a newline) in place of CLI11's one-line "Usage:".
class formatter : public CLI::Formatter {
 public:
  explicit formatter(std::string usage = {}) : usage_(std::move(usage)) {}

  std::string make_usage(const CLI::App* app, std::string name) const override {
    return usage_.empty() ? CLI::Formatter::make_usage(app, std::move(name)) : usage_;
  }

  /// CLI11's layout (description, usage, positionals, option groups, subcommands, footer), with
  /// the option groups other than the knobs'.
  std::string make_help(const CLI::App* app, std::string name,
                        CLI::AppFormatMode mode) const override {
    if (mode == CLI::AppFormatMode::Sub) return CLI::Formatter::make_help(app, name, mode);
    std::string out = make_description(app) + make_usage(app, name) + make_positionals(app);
    for (const std::string& group : app->get_groups()) {
      if (group.empty() || group == knob_group) continue;
      const auto options = app->get_options([&](const CLI::Option* option) {
        return option->get_group() == group && option->nonpositional();
      });
      if (!options.empty()) out += make_group(group, false, options);
    }
    return out + make_subcommands(app, mode) + "\n" + make_footer(app);
  }

 private:
  std::string usage_;
};

/// Every knob of every kernel of `Kernels` as a flag on one CLI::App. A flag that several kernels
/// share (`--seed`, `--clusters`) is one option; which kernel it applies to is decided by
/// --kernel, and a knob flag given for a kernel that does not have it is an error naming that
/// kernel's knobs. The object registers options that point into it: it cannot be copied or
/// moved, and must outlive the app's parse.
template <class Kernels = fastattn::kernels>
class basic_kernel_flags {
 public:
  /// Registers the flags on `app`, in option group `group`. With the default `knob_group` and
  /// `formatter`, CLI11's option list leaves them out: `help()` lists them per kernel, with
  /// defaults and ranges (pass it to `app.footer`). (An option in the hidden group "" would have
  /// no name in CLI11's error messages.)
  explicit basic_kernel_flags(CLI::App& app, const std::string& group = knob_group) {
    Kernels::for_each([&](auto tag) {
      using P = typename decltype(tag)::type;
      fastattn::for_each_knob<P>([&](const auto& k) {
        using V = typename std::decay_t<decltype(k)>::value_type;
        flag_state& f = flags_[k.flag()];
        f.kernels.emplace_back(P::name);
        if (f.help.empty()) f.help = std::string(k.help);
        if (f.type.empty()) f.type = type_name<V>();
        f.checks.emplace_back([](const std::string& text) {
          V value{};
          return parse_value(text, value);
        });
      });
    });
    for (auto& [flag, f] : flags_) {
      std::string kernels;
      for (const auto& name : f.kernels) kernels += (kernels.empty() ? "" : ", ") + name;
      flag_state* const state = &f;  // map nodes are stable, and this object does not move
      f.option = app.add_option("--" + flag, f.text, f.help + " (knob of " + kernels + ")");
      f.option->group(group);
      f.option->type_name(f.type);
      f.option->check(CLI::Validator(
          [state](std::string& text) {
            for (const auto& check : state->checks)
              if (std::string problem = check(text); !problem.empty()) return problem;
            return std::string();
          },
          ""));
    }
  }
  basic_kernel_flags(const basic_kernel_flags&) = delete;
  basic_kernel_flags& operator=(const basic_kernel_flags&) = delete;

  /// Adds `--kernel NAME` (required), storing the name in `target`. Names other than the
  /// kernels' are refused at parse time, except `extra_names` (e.g. a tool's "all").
  static CLI::Option* add_kernel_option(CLI::App& app, std::string& target,
                                        std::vector<std::string> extra_names = {}) {
    std::string names = Kernels::names();
    for (const auto& extra : extra_names) names += ", " + extra;
    CLI::Option* option = app.add_option("--kernel", target, "which kernel: " + names);
    option->required();
    option->type_name("NAME");
    option->check(CLI::Validator(
        [extra_names](std::string& name) -> std::string {
          if (std::find(extra_names.begin(), extra_names.end(), name) != extra_names.end())
            return {};
          return is_kernel(name) ? std::string() : unknown_kernel(name);
        },
        ""));
    return option;
  }

  /// Whether `name` is the name of a kernel of the list.
  static bool is_kernel(std::string_view name) {
    return Kernels::visit(name, [](auto) {});
  }

  /// The policy P built from its defaults and the knob flags given on the command line. Throws
  /// CLI::ValidationError when a knob flag was given that is not one of P's knobs (naming P's
  /// knobs). The knobs' ranges are not checked here: `fastattn::validate(policy)` does.
  template <class P>
  P make() const {
    P policy{};
    std::set<std::string> mine;
    fastattn::for_each_knob<P>([&](const auto& k) {
      const std::string flag = k.flag();
      mine.insert(flag);
      const flag_state& f = flags_.at(flag);
      if (f.option->count() > 0) parse_value(f.text, k.get(policy));  // checked by CLI11
    });
    for (const auto& [flag, f] : flags_) {
      if (f.option->count() == 0 || mine.count(flag)) continue;
      std::string list;
      fastattn::for_each_knob<P>(
          [&](const auto& k) { list += (list.empty() ? "--" : ", --") + k.flag(); });
      throw CLI::ValidationError("--" + flag,
                                 "not a knob of kernel '" + std::string(P::name) +
                                     "' (its knobs: " + (list.empty() ? "none" : list) + ")");
    }
    return policy;
  }

  /// Builds the kernel called `name` from the flags (make<P>), checks its knobs
  /// (fastattn::validate: a knob out of range throws fastattn::invalid_argument whose argument()
  /// is the knob's name), and calls f(policy). f is instantiated for every kernel of the list,
  /// so it is a generic lambda. Throws CLI::ValidationError for an unknown name.
  template <class F>
  void with_kernel(std::string_view name, F&& f) const {
    const bool found = Kernels::visit(name, [&](auto tag) {
      using P = typename decltype(tag)::type;
      const P policy = make<P>();
      fastattn::validate(policy);
      f(policy);
    });
    if (!found) throw CLI::ValidationError("--kernel", unknown_kernel(name));
  }

  /// The flag for a library error's argument() when it names a knob ("cluster_size" ->
  /// "--cluster-size 0", with the value as typed when the flag was given); nullopt otherwise.
  std::optional<std::string> flag_of(std::string_view argument) const {
    std::string flag(argument);
    std::replace(flag.begin(), flag.end(), '_', '-');
    const auto it = flags_.find(flag);
    if (it == flags_.end()) return std::nullopt;
    return "--" + flag + (it->second.option->count() > 0 ? " " + it->second.text : "");
  }

  /// Every knob flag of every kernel, without the dashes.
  std::set<std::string> flags() const {
    std::set<std::string> out;
    for (const auto& entry : flags_) out.insert(entry.first);
    return out;
  }

  /// A policy's knobs with their values, e.g. "clusters=100 bits=63 ...".
  template <class P>
  static std::string describe(const P& policy) {
    std::string out;
    fastattn::for_each_knob<P>([&](const auto& k) {
      out += (out.empty() ? "" : " ") + std::string(k.name) + "=" + format_value(k.get(policy));
    });
    return out;
  }

  /// The kernels and their knobs for --help: per kernel, whether it is exact and supports
  /// --causal, then one line per knob: "--flag default  meaning [min, max]" (a bool knob takes
  /// true or false, and no range is shown).
  static std::string help() {
    std::ostringstream out;
    out << "Kernels and their knobs (flag, default, meaning, valid range):\n";
    Kernels::for_each([&](auto tag) {
      using P = typename decltype(tag)::type;
      out << "  --kernel " << P::name << (P::is_exact ? "  (exact" : "  (approximate")
          << (fastattn::causal_capable<P> ? ", supports --causal)" : ", no --causal)") << "\n";
      const P defaults{};
      fastattn::for_each_knob<P>([&](const auto& k) {
        std::string left = "      --" + k.flag() + " " + format_value(k.get(defaults));
        left.append(left.size() < 30 ? 30 - left.size() : 1, ' ');
        const std::string range = range_text(k);
        out << left << k.help << (range.empty() ? "" : " " + range) << "\n";
      });
    });
    return out.str();
  }

 private:
  struct flag_state {
    std::string text;                  ///< the value as typed
    CLI::Option* option = nullptr;     ///< count() > 0 when given
    std::vector<std::string> kernels;  ///< the kernels that have this knob
    std::string help, type;
    std::vector<std::function<std::string(const std::string&)>> checks;  ///< one per kernel
  };

  static std::string unknown_kernel(std::string_view name) {
    return "unknown kernel '" + std::string(name) + "' (available: " + Kernels::names() + ")";
  }

  /// "[1, 64]", "(any UINT)" for a knob that takes every value of its type, "" for a switch.
  template <class Knob>
  static std::string range_text(const Knob& k) {
    using V = typename Knob::value_type;
    if constexpr (std::is_same_v<V, bool>) {
      return {};
    } else {
      const V lowest = std::numeric_limits<V>::lowest(), highest = std::numeric_limits<V>::max();
      if (k.min == lowest && k.max == highest) return "(any " + type_name<V>() + ")";
      return "[" + format_value(k.min) + ", " + format_value(k.max) + "]";
    }
  }

  std::map<std::string, flag_state> flags_;  ///< flag (without dashes) -> state
};

/// The flags of fastattn's built-in kernels.
using kernel_flags = basic_kernel_flags<>;

}  // namespace fastattn_tools
