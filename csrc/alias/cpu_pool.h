// The work-claiming pool of the CPU alias-table kernels (cpu_build.cpp, cpu_sample.cpp).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>

namespace isgd_kernels {
namespace alias_table {

// f(i) for i in [0, count), claimed one index at a time by this thread and up to threads - 1 helper
// tasks on the inter-op pool; returns once every index is done. A helper that starts after all
// indices are claimed only touches the shared counters, so the caller never waits for a helper that
// has not started. (With at::parallel_for, every parallel region waited for all its workers: on a
// machine where another process kept the cores busy, that wait cost more than a whole pass.)
template <typename F>
void for_claimed(int64_t count, int64_t threads, const F& f) {
  threads = std::min(threads, count);
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < count; ++i) f(i);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::exception_ptr error;  // the first exception, rethrown by the caller (the pool drops them)
  };
  auto sh = std::make_shared<Shared>();
  auto work = [sh, count, &f] {
    for (int64_t i; (i = sh->next.fetch_add(1, std::memory_order_relaxed)) < count;) {
      try {
        f(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(sh->mu);
        if (!sh->error) sh->error = std::current_exception();
      }
      sh->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < threads; ++t) at::launch(work);
  work();
  while (sh->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
  if (sh->error) std::rethrow_exception(sh->error);
}

}  // namespace alias_table
}  // namespace isgd_kernels
