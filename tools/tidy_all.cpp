// One translation unit that instantiates every public header for float and double, so that
// clang-tidy (scripts/tidy.sh) sees all of the library's template code: every kernel of
// `fastattn::kernels` (a kernel added to the list is covered without edits here) through the
// front door (both overloads, padding, causal where supported, check_finite off) and the
// multi-head driver (packed and (B, H, L, E) layouts, per-sample lengths), the knob descriptions
// and validation, and the .npy reader and writer. It also runs: every call must succeed.
#include <fastattn/fastattn.hpp>
#include <fastattn/io/npy.hpp>

#include <cstdio>
#include <exception>
#include <filesystem>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace {

namespace fa = fastattn;
using fa::index;

// Sizes that make every kernel's default knobs do real work (several clusters, a top-k smaller
// than the keys, several smyrf clusters, more than one dense query block), small enough to run
// in milliseconds. Knobs larger than these sizes (clusters, topk, cluster_size) are clamped by
// the kernels themselves.
constexpr index L = 200, S = 150, E = 8, M = 5, B = 2, H = 3;

template <class T, class Policy>
void instantiate(const Policy& policy) {
  const fa::matrix<T> q = fa::matrix<T>::Random(L, E), k = fa::matrix<T>::Random(S, E),
                      v = fa::matrix<T>::Random(S, M);
  // Column-major inputs (copied once by the front door) and the allocating overload.
  const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> qc = q;
  (void)fa::attention(policy, qc, k, v, {.key_length = S - 10, .query_length = L - 3});
  fa::matrix<T> out(L, M);
  fa::attention(policy, q, k, v, fa::view<T>(out),
                {.scale = 0.5, .causal = Policy::supports_causal, .check_finite = false});

  // (B, L, H, E) buffers, and the same data viewed as (B, H, L, E) through head_stride.
  std::vector<T> qb(B * L * H * E, T(0.25)), kb(B * S * H * E, T(-0.5)), vb(B * S * H * M, T(1)),
      ob(B * L * H * M);
  const index query_lengths[] = {L, L / 2}, key_lengths[] = {S - 1, 7};
  fa::multihead_options opt;
  opt.query_lengths = query_lengths;
  opt.key_lengths = key_lengths;
  opt.threads = 2;
  fa::multihead_attention(policy, fa::tensor_view<const T>{qb.data(), B, L, H, E},
                          fa::tensor_view<const T>{kb.data(), B, S, H, E},
                          fa::tensor_view<const T>{vb.data(), B, S, H, M},
                          fa::tensor_view<T>{ob.data(), B, L, H, M}, opt);
  fa::multihead_attention(policy,
                          fa::tensor_view<const T>{.data = qb.data(),
                                                   .batch = B,
                                                   .length = L,
                                                   .heads = H,
                                                   .dim = E,
                                                   .token_stride = E,
                                                   .head_stride = L * E},
                          fa::tensor_view<const T>{.data = kb.data(),
                                                   .batch = B,
                                                   .length = S,
                                                   .heads = H,
                                                   .dim = E,
                                                   .token_stride = E,
                                                   .head_stride = S * E},
                          fa::tensor_view<const T>{.data = vb.data(),
                                                   .batch = B,
                                                   .length = S,
                                                   .heads = H,
                                                   .dim = M,
                                                   .token_stride = M,
                                                   .head_stride = S * M},
                          fa::tensor_view<T>{.data = ob.data(),
                                             .batch = B,
                                             .length = L,
                                             .heads = H,
                                             .dim = M,
                                             .token_stride = M,
                                             .head_stride = L * M});
}

template <class Policy>
void knobs(const Policy& policy) {
  fa::validate(policy);
  fa::for_each_knob<Policy>([&](const auto& knob) {
    if (!knob.valid(knob.get(policy)) || knob.flag().empty() || knob.help.empty())
      std::fprintf(stderr, "tidy_all: %s: knob %s\n", std::string(Policy::name).c_str(),
                   knob.flag().c_str());
  });
}

template <class T>
void npy() {
  const auto path = (std::filesystem::temp_directory_path() /
                     ("fastattn_tidy_all_" + std::to_string(sizeof(T)) + ".npy"))
                        .string();
  const std::vector<T> data(6, T(1.5));
  const index shape[] = {2, 3};
  fa::io::write_npy<T>(path, std::span<const index>(shape), std::span<const T>(data));
  const auto array = fa::io::read_npy<T>(path);
  std::filesystem::remove(path);
  if (array.data.size() != data.size()) std::fprintf(stderr, "tidy_all: npy round trip\n");
}

}  // namespace

int main() {
  try {
    fa::kernels::for_each([](auto type) {
      using Policy = typename decltype(type)::type;
      const Policy policy{};  // the defaults: small enough for these sizes (see above)
      knobs(policy);
      instantiate<float>(policy);
      instantiate<double>(policy);
    });
    const bool found =
        fa::kernels::visit("dense", [](auto type) { knobs(typename decltype(type)::type{}); });
    std::printf("kernels: %s (%s)\n", fa::kernels::names().c_str(), found ? "ok" : "no dense");
    npy<float>();
    npy<double>();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tidy_all: %s\n", e.what());
    return 1;
  }
  return 0;
}
