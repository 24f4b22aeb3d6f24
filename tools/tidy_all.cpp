// One translation unit that instantiates every public header for float and double, so that
// clang-tidy (scripts/tidy.sh) sees all of the library's template code.
#include <fastattn/fastattn.hpp>
#include <fastattn/io/npy.hpp>

#include <vector>

namespace {

template <class T, class Policy>
void instantiate(const Policy& policy) {
  const fastattn::matrix<T> q = fastattn::matrix<T>::Random(33, 8),
                            k = fastattn::matrix<T>::Random(40, 8),
                            v = fastattn::matrix<T>::Random(40, 5);
  (void)fastattn::attention(policy, q, k, v, {.key_length = 30});
  std::vector<T> qb(2 * 33 * 3 * 8), kb(2 * 40 * 3 * 8), vb(2 * 40 * 3 * 5), ob(2 * 33 * 3 * 5);
  fastattn::multihead_attention(policy, fastattn::tensor_view<const T>{qb.data(), 2, 33, 3, 8},
                                fastattn::tensor_view<const T>{kb.data(), 2, 40, 3, 8},
                                fastattn::tensor_view<const T>{vb.data(), 2, 40, 3, 5},
                                fastattn::tensor_view<T>{ob.data(), 2, 33, 3, 5});
}

template <class Policy>
void both(const Policy& policy) {
  instantiate<float>(policy);
  instantiate<double>(policy);
}

}  // namespace

int main() {
  both(fastattn::dense{});
  both(fastattn::clustered{.clusters = 4});
  both(fastattn::improved_clustered{.clusters = 4, .topk = 8});
  both(fastattn::smyrf{.cluster_size = 8});
  return 0;
}
