// Work shared by the calling thread and XLA's intra-op pool, for maxjax's CPU kernels.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace maxjax {

// Runs item(i) for every i in [0, n): the caller and up to pool.num_threads() - 1 pool tasks claim items from
// one counter, so a helper that starts late finds nothing left and the caller never waits on work nobody has
// begun. Returns when every item is done.
template <class Item>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, Item item) {
  if (n <= 0) return;
  struct State {
    Item item;
    int64_t n;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    State(Item f, int64_t count) : item(std::move(f)), n(count) {}
    void work() {
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
        item(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>(std::move(item), n);  // shared: a late helper may outlive this call
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([state] { state->work(); });
  state->work();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace maxjax
