// fastattn's one error type, and the helpers that build its messages.
#pragma once

#include <charconv>
#include <cstdint>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include <Eigen/Core>

namespace fastattn {

/// Eigen's signed index type: extents, lengths, positions and strides.
using index = Eigen::Index;

/// The one exception type fastattn throws for caller errors (shapes, options, lengths, knobs,
/// magnitudes, files). Errors are data: `argument()` names what was wrong (an argument such as
/// "key_length", a knob such as "clusters", a tensor "q", or a file path), `message()` says what
/// and gives the values, and `sample()` / `head()` locate it inside a multi-head call. `what()`
/// is the one-line form "fastattn: [sample b, ][head h: ]message", built here and nowhere else.
class invalid_argument : public std::invalid_argument {
 public:
  /// An error about `argument` saying `message`, optionally located at (sample, head).
  invalid_argument(std::string argument, std::string message, std::optional<index> sample = {},
                   std::optional<index> head = {})
      : std::invalid_argument(format(message, sample, head)),
        argument_(std::move(argument)),
        message_(std::move(message)),
        sample_(sample),
        head_(head) {}

  /// The argument, knob, tensor or file the error is about ("" when it is about several).
  const std::string& argument() const noexcept { return argument_; }
  /// The message without the "fastattn: " prefix and without the location.
  const std::string& message() const noexcept { return message_; }
  /// Which sample of a multi-head call, when the error is about one (the driver leaves it empty
  /// when B = 1).
  std::optional<index> sample() const noexcept { return sample_; }
  /// Which head of a multi-head call, when the error is about one.
  std::optional<index> head() const noexcept { return head_; }

  /// The same error (argument and message) located at (sample, head) instead.
  invalid_argument at(std::optional<index> sample, std::optional<index> head) const {
    return {argument_, message_, sample, head};
  }

 private:
  static std::string format(const std::string& message, std::optional<index> sample,
                            std::optional<index> head) {
    std::string out = "fastattn: ";
    if (sample) out += "sample " + std::to_string(*sample) + (head ? ", " : ": ");
    if (head) out += "head " + std::to_string(*head) + ": ";
    return out + message;
  }

  std::string argument_, message_;
  std::optional<index> sample_, head_;
};

namespace detail {

/// Text of one message part: numbers in their shortest round-trip form, bools as true/false.
template <class Part>
std::string to_text(const Part& part) {
  using P = std::decay_t<Part>;
  if constexpr (std::is_same_v<P, bool>) {
    return part ? "true" : "false";
  } else if constexpr (std::is_arithmetic_v<P>) {
    char buffer[64];
    const auto result = std::to_chars(buffer, buffer + sizeof buffer, part);
    return std::string(buffer, result.ptr);
  } else {
    return std::string(std::string_view(part));
  }
}

/// Throws invalid_argument about `argument` with the parts concatenated as its message.
template <class... Parts>
[[noreturn]] void fail(std::string_view argument, const Parts&... parts) {
  std::string message;
  ((message += to_text(parts)), ...);
  throw invalid_argument(std::string(argument), std::move(message));
}

/// a * b for non-negative extents, or nullopt when the product does not fit in an index.
constexpr std::optional<index> checked_mul(index a, index b) noexcept {
  index product = 0;
  if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &product)) return std::nullopt;
  return product;
}

/// The product of non-negative extents, or nullopt when it does not fit in an index. A zero
/// extent makes the product zero whatever the others are.
template <class... Extents>
constexpr std::optional<index> checked_product(Extents... extents) noexcept {
  const index values[] = {static_cast<index>(extents)...};
  for (const index e : values)
    if (e == 0) return index{0};
  index product = 1;
  for (const index e : values) {
    const auto next = checked_mul(product, e);
    if (!next) return std::nullopt;
    product = *next;
  }
  return product;
}

}  // namespace detail
}  // namespace fastattn
