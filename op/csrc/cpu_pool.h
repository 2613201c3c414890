// Worker threads kept between calls of the CPU kernel: starting and joining a thread per call cost 25-80 us on
// the 2-core CI machine type, a tenth of a 4096-token batch. One call at a time uses the pool (a concurrent one
// is told so and starts its own threads); a forked child starts with an empty pool, as the parent's workers do not
// exist there. The pool is never destroyed: its workers may still wait on it while the process exits.
#pragma once

#if defined(__unix__)
#include <pthread.h>
#endif

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
        std::thread(&Pool::work, &pool, pool.workers_ + 1, pool.generation_).detach();
      } catch (const std::system_error&) {
        break;  // a process limit: the caller runs the rest
      }
      ++pool.workers_;
    }
    const int used = pool.workers_ + 1 < parts ? pool.workers_ + 1 : parts;
    pool.task_ = task;
    pool.context_ = context;
    pool.parts_ = used;
    pool.pending_ = used - 1;
    ++pool.generation_;
    lock.unlock();
    pool.wake_.notify_all();
    task(context, 0, used);
    lock.lock();
    pool.finished_.wait(lock, [&] { return pool.pending_ == 0; });
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

  void work(int index, uint64_t seen) {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (index >= parts_) continue;
      const Task task = task_;
      const void* context = context_;
      const int parts = parts_;
      lock.unlock();
      task(context, index, parts);
      lock.lock();
      if (--pending_ == 0) finished_.notify_one();
    }
  }

  static inline Pool* pool_ = nullptr;
  std::mutex dispatch_;  // held for a whole pooled call
  std::mutex mutex_;     // guards the fields below
  std::condition_variable wake_, finished_;
  uint64_t generation_ = 0;
  int workers_ = 0;
  Task task_ = nullptr;
  const void* context_ = nullptr;
  int parts_ = 0;
  int pending_ = 0;
};

}  // namespace cpu
}  // namespace fusedgate
