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
// Two wrappers of the library are flags too, the same in every tool:
// - `--window W` (the knob of fastattn::banded): a kernel with a `window` knob of its own (local)
//   takes it as that knob; an approximate kernel is run as banded<P>{.inner = p, .window = W};
//   an exact kernel refuses it (`with_band`).
// - `--estimate-error`, `--max-error X`, `--error-samples N` (`error_flags`): the kernel runs as
//   fastattn::guarded<P> with a report span the tool provides, one entry per head.
//
//   CLI::App app{"..."};
//   app.formatter(std::make_shared<fastattn_tools::formatter>());
//   std::string kernel;
//   fastattn_tools::kernel_flags::add_kernel_option(app, kernel);   // --kernel NAME
//   fastattn_tools::kernel_flags knobs(app);             // --clusters, --seed, --window, ...
//   fastattn_tools::error_flags errors;
//   errors.add(app);                                     // --estimate-error, --max-error X
//   app.footer(knobs.help() + "\n" + errors.help());
//   app.parse(argc, argv);
//   knobs.with_kernel(kernel, [&](const auto& policy) {  // P, or banded<P> with --window
//     if (errors.requested()) run(errors.guard(policy, reports)); else run(policy);
//   });
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
#include <cstdio>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <sstream>
#include <stdexcept>
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
/// as true/false (the library's own rule, which its error messages follow).
template <class T>
std::string format_value(const T& value) {
  static_assert(std::is_arithmetic_v<T>);
  return fastattn::detail::to_text(value);
}

/// Parses the command line into `app`, for tools that take flags only. Returns the exit status
/// when the run ends with the help: 1 when no argument was given (the help is printed), 0 for
/// --help. Throws CLI::ParseError for a malformed flag, std::runtime_error naming an unknown flag
/// or a positional argument.
inline std::optional<int> parse_flags_only(CLI::App& app, int argc, const char* const* argv) {
  if (argc <= 1) {
    std::cout << app.help();
    return 1;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    std::cout << app.help();
    return 0;
  }
  if (const auto extras = app.remaining(); !extras.empty()) {
    const std::string& first = extras.front();
    if (first.rfind('-', 0) == 0)
      throw std::runtime_error("unknown flag " + first.substr(0, first.find('=')) +
                               " (see --help)");
    throw std::runtime_error("unexpected argument '" + first +
                             "' (flags start with --; see --help)");
  }
  return std::nullopt;
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

/// `text` cut into lines of at most `width` characters at spaces, each line indented by `indent`
/// spaces and ended by a newline (for --help paragraphs).
inline std::string wrap(std::string_view text, std::size_t indent, std::size_t width = 96) {
  std::string out, line;
  std::size_t start = 0;
  while (start < text.size()) {
    std::size_t end = text.find(' ', start);
    if (end == std::string_view::npos) end = text.size();
    const std::string_view word = text.substr(start, end - start);
    start = end + 1;
    if (word.empty()) continue;
    if (!line.empty() && indent + line.size() + 1 + word.size() > width) {
      out += std::string(indent, ' ') + line + "\n";
      line.clear();
    }
    line += (line.empty() ? "" : " ") + std::string(word);
  }
  if (!line.empty()) out += std::string(indent, ' ') + line + "\n";
  return out;
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

namespace detail {

/// Whether P has a knob called `name`.
template <class P>
constexpr bool has_knob(std::string_view name) {
  bool found = false;
  fastattn::for_each_knob<P>([&](const auto& k) { found = found || k.name == name; });
  return found;
}

}  // namespace detail

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
      add_knobs<P>(std::string(P::name));
    });
    add_knobs<fastattn::banded<fastattn::dense>>("banded");  // --window for the approximate kernels
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
  /// --window is not refused here when P has no `window` knob: `with_band` decides what it means
  /// for P.
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
      if (f.option->count() == 0 || mine.count(flag) || flag == band_flag) continue;
      std::string list;
      fastattn::for_each_knob<P>(
          [&](const auto& k) { list += (list.empty() ? "--" : ", --") + k.flag(); });
      throw CLI::ValidationError("--" + flag,
                                 "not a knob of kernel '" + std::string(P::name) +
                                     "' (its knobs: " + (list.empty() ? "none" : list) + ")");
    }
    return policy;
  }

  /// Builds the kernel called `name` from the flags (make<P>) and calls f with it, or with
  /// banded<P> around it when --window asks for a band (`with_band`), after checking the knobs
  /// (fastattn::validate: a knob out of range throws fastattn::invalid_argument whose argument()
  /// is the knob's name). f is instantiated for every kernel of the list and for the banded
  /// kernels, so it is a generic lambda. Throws CLI::ValidationError for an unknown name.
  template <class F>
  void with_kernel(std::string_view name, F&& f) const {
    const bool found = Kernels::visit(name, [&](auto tag) {
      using P = typename decltype(tag)::type;
      with_band(make<P>(), f);
    });
    if (!found) throw CLI::ValidationError("--kernel", unknown_kernel(name));
  }

  /// The knob flag of fastattn::banded, the exact local band.
  static constexpr std::string_view band_flag = "window";

  /// Whether --window puts P inside fastattn::banded: P is approximate, returns its log-sum-exp
  /// (banded merges the band with P's part by it) and has no `window` knob of its own.
  template <class P>
  static constexpr bool takes_band =
      !P::is_exact && fastattn::provides_lse<P> && !detail::has_knob<P>(band_flag);

  /// Calls f with the policy --window asks for, from `policy`:
  /// - no --window: `policy`;
  /// - P has a `window` knob (local): `policy` with that knob set to W;
  /// - `takes_band<P>`: fastattn::banded<P>{.inner = policy, .window = W};
  /// - otherwise (an exact kernel, or one without log-sum-exp) a CLI::ValidationError
  ///   "--window W: ..." saying why.
  /// The policy given to f has been checked by fastattn::validate.
  template <class P, class F>
  void with_band(P policy, F&& f) const {
    const flag_state& band = flags_.at(std::string(band_flag));
    if (band.option->count() == 0) {
      fastattn::validate(policy);
      f(policy);
      return;
    }
    const std::string typed = "--" + std::string(band_flag) + " " + band.text;
    if constexpr (detail::has_knob<P>(band_flag)) {
      fastattn::for_each_knob<P>([&](const auto& k) {
        if (k.name == band_flag) parse_value(band.text, k.get(policy));  // checked by CLI11
      });
      fastattn::validate(policy);
      f(policy);
    } else if constexpr (P::is_exact) {
      throw CLI::ValidationError(
          typed, "kernel '" + std::string(P::name) +
                     "' is exact already: a local band adds nothing to it (--window adds an exact "
                     "band to an approximate kernel, or is local's window)");
    } else if constexpr (!fastattn::provides_lse<P>) {
      throw CLI::ValidationError(typed, "kernel '" + std::string(P::name) +
                                            "' does not return its log-sum-exp, which an exact "
                                            "band needs to be merged with it");
    } else {
      fastattn::banded<P> banded{.inner = policy};
      parse_value(band.text, banded.window);  // checked by CLI11
      fastattn::validate(banded);
      f(banded);
    }
  }

  /// The knob flags given on the command line (without the dashes).
  std::set<std::string> given() const {
    std::set<std::string> out;
    for (const auto& [flag, f] : flags_)
      if (f.option->count() > 0) out.insert(flag);
    return out;
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

  /// A policy's knobs with their values, e.g. "clusters=100 bits=63 ...". For banded<P>, P's
  /// knobs and then the band's ("... window=2"); for guarded<P>, P's (the guard is the tool's to
  /// describe).
  template <class P>
  static std::string describe(const P& policy) {
    std::string out;
    if constexpr (fastattn::is_banded<P> || fastattn::is_guarded<P>) out = describe(policy.inner);
    if constexpr (!fastattn::is_guarded<P>)
      fastattn::for_each_knob<P>([&](const auto& k) {
        out += (out.empty() ? "" : " ") + std::string(k.name) + "=" + format_value(k.get(policy));
      });
    return out;
  }

  /// The kernels and their knobs for --help: per kernel, whether it is exact and, when the tool
  /// has a --causal flag (`causal_flag`), whether it supports it; then one line per knob:
  /// "--flag default  meaning [min, max]" (a bool knob takes true or false, and no range is
  /// shown); then --window.
  static std::string help(bool causal_flag = true) {
    std::ostringstream out;
    out << "Kernels and their knobs (flag, default, meaning, valid range):\n";
    Kernels::for_each([&](auto tag) {
      using P = typename decltype(tag)::type;
      out << "  --kernel " << P::name << (P::is_exact ? "  (exact" : "  (approximate");
      if (causal_flag)
        out << (fastattn::causal_capable<P> ? ", supports --causal" : ", no --causal");
      out << ")\n";
      const P defaults{};
      fastattn::for_each_knob<P>([&](const auto& k) {
        std::string left = "      --" + k.flag() + " " + format_value(k.get(defaults));
        left.append(left.size() < 30 ? 30 - left.size() : 1, ' ');
        const std::string range = range_text(k);
        out << left << k.help << (range.empty() ? "" : " " + range) << "\n";
      });
    });
    // --window beside the kernels that take it as a band, and those that refuse it.
    std::string banded_kernels, exact_kernels;
    Kernels::for_each([&](auto tag) {
      using P = typename decltype(tag)::type;
      if constexpr (takes_band<P>)
        banded_kernels += (banded_kernels.empty() ? "" : ", ") + std::string(P::name);
      else if constexpr (P::is_exact && !detail::has_knob<P>(band_flag))
        exact_kernels += (exact_kernels.empty() ? "" : ", ") + std::string(P::name);
    });
    const auto [window] = fastattn::banded<fastattn::dense>::knobs();
    out << "  --window W  (an exact local band, fastattn::banded; W in " << range_text(window)
        << ")\n"
        << wrap("With an approximate kernel (" + banded_kernels +
                    "), the keys within W positions of each query (earlier ones only when "
                    "causal) get the query's exact scores, every other key comes from the "
                    "kernel, and the two parts are merged by log-sum-exp: a head that attends to "
                    "its neighbours stays exact, for O(N W d) more work. With a kernel that has a "
                    "window knob (local) it is that knob" +
                    (exact_kernels.empty() ? std::string(".")
                                           : "; with an exact kernel (" + exact_kernels +
                                                 ") it is refused: it is exact already."),
                6);
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

  /// Registers P's knobs as flags (shared with the kernels that have a knob of the same name).
  template <class P>
  void add_knobs(const std::string& owner) {
    fastattn::for_each_knob<P>([&](const auto& k) {
      using V = typename std::decay_t<decltype(k)>::value_type;
      flag_state& f = flags_[k.flag()];
      f.kernels.push_back(owner);
      if (f.help.empty()) f.help = std::string(k.help);
      if (f.type.empty()) f.type = type_name<V>();
      f.checks.emplace_back([](const std::string& text) {
        V value{};
        return parse_value(text, value);
      });
    });
  }

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

// ---------------------------------------------------------------------------------------------
// The error estimate and the exact fallback (fastattn::guarded) as flags.

/// One relative error combined over several heads (see `error_flags::combine`).
struct combined_estimate {
  double error = 0, lower = 0, upper = 0;
};

/// `--estimate-error`, `--max-error X` and `--error-samples N`: the kernel runs as
/// fastattn::guarded<P>, which estimates each head's relative error ||O - O_exact||_F /
/// ||O_exact||_F from N rows computed exactly and, with --max-error, recomputes exactly the heads
/// whose estimate exceeds X. The tool gives the report span (one entry per head stream: B * H
/// for multihead_attention) and prints the estimates. The object registers options that point
/// into it: it cannot be copied or moved, and must outlive the app's parse.
class error_flags {
 public:
  error_flags() = default;
  error_flags(const error_flags&) = delete;
  error_flags& operator=(const error_flags&) = delete;

  /// Registers the flags on `app`, in option group `group` (call it after the tool's own options
  /// to list the group after them).
  void add(CLI::App& app, const std::string& group = "Error estimate") {
    const auto [tolerance, samples, min_length, seed] = fastattn::guarded<fastattn::dense>::knobs();
    app.add_flag("--estimate-error", estimate_,
                 "estimate each head's relative error from rows computed exactly (see below)")
        ->group(group)
        ->disable_flag_override();
    add_value_option(app, "--max-error", max_error_,
                     "recompute exactly the heads whose estimated error exceeds X (implies "
                     "--estimate-error)",
                     std::pair{tolerance.min, std::numeric_limits<double>::max()})
        ->group(group);
    add_value_option(app, "--error-samples", samples_,
                     "rows per head computed exactly for the estimate, in [" +
                         format_value(samples.min) + ", " + format_value(samples.max) +
                         "] (default " +
                         format_value(fastattn::guarded<fastattn::dense>{}.samples) + ")",
                     std::pair{samples.min, samples.max})
        ->group(group)
        ->type_name("N");
  }

  /// Whether the kernel is to run under guarded (any of the three flags).
  bool requested() const { return estimate_ || max_error_ || samples_; }
  /// --max-error's value, when given.
  std::optional<double> max_error() const { return max_error_; }
  /// The rows per head computed exactly for the estimate (--error-samples, or guarded's default).
  fastattn::index samples() const {
    return samples_.value_or(fastattn::guarded<fastattn::dense>{}.samples);
  }

  /// `policy` inside fastattn::guarded, reporting to `report` (one entry per head stream). It
  /// runs the kernel whatever the number of valid queries (min_length 0: the tools measure the
  /// kernel the user chose, even below its crossover with dense).
  template <class P>
  fastattn::guarded<P> guard(const P& policy, std::span<fastattn::error_estimate> report) const {
    fastattn::guarded<P> g{.inner = policy, .min_length = 0, .report = report};
    if (max_error_) g.tolerance = *max_error_;
    if (samples_) g.samples = *samples_;
    return g;
  }

  /// Heads' estimates combined into one relative error over all of them: each head's squared
  /// error weighted by `weights[h]`, an estimate of its squared exact output norm (the tools use
  /// the output's squared norm, or its number of rows when all rows have about the same norm):
  /// sqrt(sum_h w_h e_h^2 / sum_h w_h), and the interval's ends the same way (the combined
  /// interval holds whenever every head's does). `as_written`: a head that fell back counts as
  /// exact (0), so the figure is the error of the output as written, on the measure of the
  /// tools' `relative error:`; otherwise it is the kernel's own estimate.
  static combined_estimate combine(std::span<const fastattn::error_estimate> heads,
                                   std::span<const double> weights, bool as_written) {
    double e = 0, lo = 0, hi = 0, w = 0;
    for (std::size_t h = 0; h < heads.size() && h < weights.size(); ++h) {
      if (as_written && heads[h].fell_back) {
        w += weights[h];
        continue;
      }
      e += weights[h] * heads[h].error * heads[h].error;
      lo += weights[h] * heads[h].lower * heads[h].lower;
      hi += weights[h] * heads[h].upper * heads[h].upper;
      w += weights[h];
    }
    if (!(w > 0)) return {};
    return {std::sqrt(e / w), std::sqrt(lo / w), std::sqrt(hi / w)};
  }

  /// "head h: estimated error X [lower, upper]", then "  fell back" when the head was recomputed
  /// exactly, or why it has no estimate.
  static std::string head_line(std::size_t h, const fastattn::error_estimate& e) {
    char buffer[160];
    if (e.samples == 0 && e.confidence == 0) {
      std::snprintf(buffer, sizeof buffer,
                    "head %zu: estimated error 0 [0, 0]  (no valid query or key: zero output)", h);
      return buffer;
    }
    std::snprintf(buffer, sizeof buffer, "head %zu: estimated error %.3e [%.3e, %.3e]%s", h,
                  e.error, e.lower, e.upper, e.fell_back ? "  fell back" : "");
    return buffer;
  }

  /// How many of `heads` fell back.
  static std::size_t fell_back(std::span<const fastattn::error_estimate> heads) {
    return static_cast<std::size_t>(std::count_if(
        heads.begin(), heads.end(), [](const fastattn::error_estimate& e) { return e.fell_back; }));
  }

  /// For --help: what the flags do and how the tools report.
  static std::string help() {
    const auto [tolerance, samples, min_length, seed] = fastattn::guarded<fastattn::dense>::knobs();
    (void)samples;
    (void)min_length;
    (void)seed;
    const fastattn::guarded<fastattn::dense> defaults{};
    return "Error estimate (--estimate-error, --max-error X, --error-samples N; fastattn::guarded, "
           "any kernel):\n" +
           wrap(
               "Each head's relative error ||O - O_exact||_F / ||O_exact||_F is estimated from N "
               "rows (default " +
                   format_value(defaults.samples) +
                   ") drawn with probabilities that follow the kernel's output norms and computed "
                   "exactly, with a " +
                   format_value(static_cast<int>(defaults.confidence * 100)) +
                   "% interval; when N is at least the head's rows the error is exact. With "
                   "--max-error X (X >= " +
                   format_value(tolerance.min) +
                   ") the heads whose estimate exceeds X are recomputed exactly: their output is "
                   "then dense's, bit for bit. Cost: O(N S (E + M)) per head for the estimate, "
                   "dense attention's for a head that falls back.",
               2);
  }

 private:
  bool estimate_ = false;
  std::optional<double> max_error_;
  std::optional<fastattn::index> samples_;
};

}  // namespace fastattn_tools
