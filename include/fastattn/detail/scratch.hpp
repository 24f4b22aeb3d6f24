// Per-thread scratch memory reused across calls.
//
// Kernels need O(block * S)-sized scratch on every call. Allocating it afresh each time costs
// little in a loop of large calls, but a model calls attention once per head and layer, and on
// many systems each fresh allocation of a few hundred KiB is an mmap, page faults and a munmap,
// which can cost more than a short call's arithmetic. So each thread keeps one arena that grows
// to the largest need seen and is then reused: after the first call, a kernel touches no new
// pages. Allocation is a pointer bump; `scope` returns the memory taken inside it, so scratch
// users nest (clustered's exact centroid attention inside clustered). Kernel state that lives in
// vectors (hashes, k-means, sort buffers) is a per-thread `workspace` reset with the arena.
#pragma once

#include <algorithm>
#include <cstddef>
#include <memory>
#include <type_traits>
#include <new>
#include <vector>

#include "../policy.hpp"

namespace fastattn::detail {

class arena {
 public:
  static constexpr std::size_t alignment = 64;  // a cache line, and an AVX-512 register

  /// The calling thread's arena.
  static arena& local() {
    thread_local arena instance;
    return instance;
  }

  /// Memory taken inside a scope is returned when it ends (scopes nest, last in first out).
  class scope {
   public:
    explicit scope(arena& a = local()) : arena_(a), block_(a.current_), offset_(a.offset_) {}
    ~scope() { arena_.release(block_, offset_); }
    scope(const scope&) = delete;
    scope& operator=(const scope&) = delete;

   private:
    arena& arena_;
    std::size_t block_, offset_;
  };

  /// `count` uninitialised objects of trivial type T, 64-byte aligned, valid until the scope
  /// that was innermost when they were taken ends.
  template <class T>
  T* take(std::size_t count) {
    static_assert(std::is_trivially_copyable_v<T>);
    return static_cast<T*>(allocate(count * sizeof(T)));
  }

  /// Bytes currently reserved by this thread's arena.
  std::size_t capacity() const noexcept {
    std::size_t total = 0;
    for (const auto& b : blocks_) total += b.size;
    return total;
  }

  /// The most bytes in use at once since the arena was created or released.
  std::size_t peak() const noexcept { return peak_; }

  /// Frees everything, and every workspace registered with `on_release` (only outside any
  /// scope).
  void release_all() noexcept {
    if (current_ != 0 || offset_ != 0) return;
    blocks_.clear();
    peak_ = 0;
    for (auto* reset : releases_) reset();
  }

  /// Registers a function that `release_all` calls (a workspace's reset).
  void on_release(void (*reset)()) { releases_.push_back(reset); }

 private:
  struct block {
    struct deleter {
      void operator()(std::byte* p) const noexcept {
        ::operator delete[](p, std::align_val_t{alignment});
      }
    };
    std::unique_ptr<std::byte[], deleter> data;
    std::size_t size = 0;
  };

  static std::size_t round_up(std::size_t bytes) noexcept {
    return (bytes + alignment - 1) / alignment * alignment;
  }

  void* allocate(std::size_t bytes) {
    bytes = round_up(bytes == 0 ? 1 : bytes);
    in_use_ = used_before_current() + offset_ + bytes;
    peak_ = std::max(peak_, in_use_);
    while (current_ < blocks_.size()) {
      if (blocks_[current_].size - offset_ >= bytes) {
        void* p = blocks_[current_].data.get() + offset_;
        offset_ += bytes;
        return p;
      }
      // Does not fit in the rest of this block: continue in the next one.
      ++current_;
      offset_ = 0;
    }
    const std::size_t last = blocks_.empty() ? 0 : blocks_.back().size;
    const std::size_t size = std::max({bytes, 2 * last, std::size_t{1} << 16});
    block b;
    b.data.reset(static_cast<std::byte*>(::operator new[](size, std::align_val_t{alignment})));
    b.size = size;
    blocks_.push_back(std::move(b));
    current_ = blocks_.size() - 1;
    offset_ = bytes;
    return blocks_.back().data.get();
  }

  void release(std::size_t block_index, std::size_t offset) noexcept {
    current_ = block_index;
    offset_ = offset;
    // Back at the bottom with several blocks: replace them by one block of the peak need, so the
    // next call of the same size fits in it and allocates nothing, and the arena keeps 1x its
    // peak need (plus 64-byte rounding), not the sum of the blocks it grew through.
    if (current_ == 0 && offset_ == 0 && blocks_.size() > 1) {
      const std::size_t total = peak_;
      blocks_.clear();
      try {
        block b;
        b.data.reset(static_cast<std::byte*>(::operator new[](total, std::align_val_t{alignment})));
        b.size = total;
        blocks_.push_back(std::move(b));
      } catch (const std::bad_alloc&) {
        // Keep nothing; the next call allocates what it needs again.
      }
    }
  }

  // Bytes in the blocks before the current one (all of them count as used: a request that did
  // not fit moved on to the next block). An over-estimate of the need by at most the unused
  // tails, which is what one merged block must hold for the same sequence of requests.
  std::size_t used_before_current() const noexcept {
    std::size_t used = 0;
    for (std::size_t b = 0; b < current_ && b < blocks_.size(); ++b) used += blocks_[b].size;
    return used;
  }

  std::vector<block> blocks_;
  std::size_t current_ = 0;
  std::size_t offset_ = 0;
  std::size_t in_use_ = 0;
  std::size_t peak_ = 0;
  std::vector<void (*)()> releases_;
};

/// The calling thread's instance of a kernel's workspace W (objects with vectors that keep their
/// capacity: hash tables, k-means state, sort buffers), so that repeated calls of the same size
/// allocate nothing. `release_scratch()` resets it. Not reentrant for the same W: a kernel takes
/// its workspace once per call and calls no kernel that takes the same W while it holds it.
template <class W>
W& workspace() {
  thread_local W instance;
  thread_local const bool registered = [] {
    arena::local().on_release([] { instance = W{}; });
    return true;
  }();
  (void)registered;
  return instance;
}

/// A rows x cols row-major scratch matrix from the arena (uninitialised).
template <class T>
Eigen::Map<matrix<T>, Eigen::Aligned64> scratch_matrix(index rows, index cols,
                                                       arena& a = arena::local()) {
  return {a.take<T>(static_cast<std::size_t>(rows * cols)), rows, cols};
}

/// A scratch vector from the arena (uninitialised).
template <class T>
Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, 1>, Eigen::Aligned64> scratch_vector(
    index size, arena& a = arena::local()) {
  return {a.take<T>(static_cast<std::size_t>(size)), size};
}

}  // namespace fastattn::detail
