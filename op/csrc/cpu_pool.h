// Worker threads kept between calls of the CPU kernel: starting and joining a thread per call cost 25-80 us on
// the 2-core CI machine type, a tenth of a 4096-token batch. One call at a time uses the pool (a concurrent one
// is told so and starts its own threads); a forked child starts with an empty pool, as the parent's workers do not
// exist there. The pool is never destroyed: its workers may still wait on it while the process exits.
//
// A worker that finishes a part, and a caller waiting for the workers, spin for a short while before they sleep:
// waking a sleeping thread took 50-100 us on that virtual machine (its idle processor is halted), more than a
// 4096-token batch of 128 experts then gained from a second thread. The spin is bounded, so an idle pool sleeps.
#pragma once

#if defined(__unix__)
#include <pthread.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <system_error>
#include <thread>

namespace fusedgate {
namespace cpu {

class Pool {
 public:
  // Runs task(context, i, parts) for i in [1, parts) on workers and for i = 0 on the calling thread, and returns
  // once all have. Returns the parts that ran on workers plus one, fewer than asked where no more threads could
  // be started (the caller runs the rest), and 0 without running anything when another call holds the pool.
  using Task = void (*)(const void* context, int part, int parts);

  static int run(Task task, const void* context, int parts) {
    Pool& pool = instance();
    std::unique_lock<std::mutex> exclusive(pool.dispatch_, std::try_to_lock);
    if (!exclusive.owns_lock()) return 0;
    std::unique_lock<std::mutex> lock(pool.mutex_);
    while (pool.workers_ < parts - 1) {
      try {
        std::thread(&Pool::work, &pool, pool.workers_ + 1, pool.generation_.load(std::memory_order_relaxed)).detach();
      } catch (const std::system_error&) {
        break;  // a process limit: the caller runs the rest
      }
      ++pool.workers_;
    }
    const int used = pool.workers_ + 1 < parts ? pool.workers_ + 1 : parts;
    pool.task_ = task;
    pool.context_ = context;
    pool.parts_ = used;
    pool.pending_.store(used - 1, std::memory_order_relaxed);
    pool.generation_.fetch_add(1, std::memory_order_release);
    lock.unlock();
    pool.wake_.notify_all();
    task(context, 0, used);
    const auto done = [&] { return pool.pending_.load(std::memory_order_acquire) == 0; };
    if (!spin_until(done)) {
      lock.lock();
      pool.finished_.wait(lock, done);
    }
    return used;
  }

 private:
  Pool() {
#if defined(__unix__)
    static const bool registered = pthread_atfork(nullptr, nullptr, [] { pool_ = new Pool(); }) == 0;
    (void)registered;
#endif
  }

  static Pool& instance() {
    static std::once_flag once;
    std::call_once(once, [] { pool_ = new Pool(); });
    return *pool_;
  }

  // Whether `ready` came true within the spin time (about as long as a sleeping thread takes to wake).
  template <typename Ready>
  static bool spin_until(const Ready& ready) {
    const auto start = std::chrono::steady_clock::now();
    for (;;) {
      for (int i = 0; i < 64; ++i) {
        if (ready()) return true;
#if defined(__x86_64__) || defined(__i386__)
        _mm_pause();
#endif
      }
      if (std::chrono::steady_clock::now() - start > std::chrono::microseconds(200)) return false;
    }
  }

  void work(int index, uint64_t seen) {
    const auto called = [&] { return generation_.load(std::memory_order_acquire) != seen; };
    for (;;) {
      spin_until(called);
      // The call's fields are read under the lock, which their writer holds: a call this worker takes no part
      // in may be writing them for the next one.
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, called);
      seen = generation_.load(std::memory_order_relaxed);
      if (index >= parts_) continue;
      const Task task = task_;
      const void* context = context_;
      const int parts = parts_;
      lock.unlock();
      task(context, index, parts);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        // Under the lock, so that a caller between its check and its sleep cannot miss the notification.
        lock.lock();
        finished_.notify_one();
      }
    }
  }

  static inline Pool* pool_ = nullptr;
  std::mutex dispatch_;  // held for a whole pooled call
  std::mutex mutex_;     // guards the call's fields below and every sleep
  std::condition_variable wake_, finished_;
  std::atomic<uint64_t> generation_{0};  // raised, under the lock, once per call
  int workers_ = 0;
  Task task_ = nullptr;
  const void* context_ = nullptr;
  int parts_ = 0;
  std::atomic<int> pending_{0};  // parts still running on workers
};

}  // namespace cpu
}  // namespace fusedgate
