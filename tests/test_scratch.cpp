// The per-thread scratch arena: alignment, nesting, reuse without growth, release.
#include "common.hpp"

#include <fastattn/detail/scratch.hpp>

#include <cstdint>
#include <thread>

using fa::detail::arena;

TEST(Scratch, AlignedAndDisjoint) {
  arena a;
  const arena::scope s(a);
  float* x = a.take<float>(3);
  double* y = a.take<double>(1000);
  float* z = a.take<float>(1);
  for (const void* p :
       {static_cast<const void*>(x), static_cast<const void*>(y), static_cast<const void*>(z)})
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(p) % arena::alignment, 0u);
  EXPECT_GE(reinterpret_cast<const char*>(y), reinterpret_cast<const char*>(x + 3));
  EXPECT_GE(reinterpret_cast<const char*>(z), reinterpret_cast<const char*>(y + 1000));
}

TEST(Scratch, ScopesNestAndReturnMemory) {
  arena a;
  const arena::scope outer(a);
  int* first = a.take<int>(10);
  int* inner_ptr = nullptr;
  {
    const arena::scope inner(a);
    inner_ptr = a.take<int>(10);
    EXPECT_NE(inner_ptr, first);
  }
  // The inner scope's memory is handed out again.
  EXPECT_EQ(a.take<int>(10), inner_ptr);
}

TEST(Scratch, GrowsAcrossBlocksThenSettlesInOne) {
  arena a;
  {
    const arena::scope s(a);
    for (int i = 0; i < 10; ++i) (void)a.take<double>(20000);  // more than one block's worth
  }
  const std::size_t settled = a.capacity();
  EXPECT_GE(settled, 10u * 20000u * sizeof(double));
  for (int round = 0; round < 3; ++round) {
    const arena::scope s(a);
    for (int i = 0; i < 10; ++i) (void)a.take<double>(20000);
    EXPECT_EQ(a.capacity(), settled);  // the same need allocates nothing new
  }
  a.release_all();
  EXPECT_EQ(a.capacity(), 0u);
}

TEST(Scratch, RepeatedKernelCallsDoNotGrowTheThreadsScratch) {
  const auto in = fa::testing::make_peaked<float>(300, 500, 32, 16, 1);
  std::thread worker([&] {
    (void)fa::attention(fa::dense{}, in.q, in.k, in.v);
    const std::size_t after_first = fa::scratch_bytes();
    EXPECT_GT(after_first, 0u);
    for (int i = 0; i < 5; ++i) (void)fa::attention(fa::dense{}, in.q, in.k, in.v);
    EXPECT_EQ(fa::scratch_bytes(), after_first);
    fa::release_scratch();
    EXPECT_EQ(fa::scratch_bytes(), 0u);
  });
  worker.join();
}

TEST(Scratch, AHugeKeyBlockOnAShortProblemTakesLittle) {
  // Regression (fuzz_attention: "an allocation over 32 MiB for a tiny problem"): a single query
  // block packs each key block just before its use, into a buffer of key_block x E; key_block
  // at its largest (65536) took 32 MiB in double for 4 keys. The blocks are now never wider
  // than the keys seen.
  const auto q = fa::testing::gaussian<double>(3, 64, 1),
             k = fa::testing::gaussian<double>(4, 64, 2);
  const auto v = fa::testing::gaussian<double>(4, 8, 3);
  std::thread worker([&] {
    const auto o = fa::attention(fa::dense{.key_block = 65536}, q, k, v);
    EXPECT_LT(fa::testing::relative_error(o, fa::testing::reference_attention(q, k, v)), 1e-12);
    EXPECT_LT(arena::local().peak(), std::size_t{1} << 20);
  });
  worker.join();
}
