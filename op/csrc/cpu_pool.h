// Worker threads kept between calls of the CPU kernel: starting and joining a thread per call cost 25-80 us on
// the 2-core CI machine type, a tenth of a 4096-token batch. One call at a time uses the pool (a concurrent one
// is told so and starts its own threads); a forked child starts with an empty pool, as the parent's workers do not
// exist there. The pool is never destroyed: its workers may still wait on it while the process exits.
//
// A worker that finishes a part, and a caller waiting for the workers, spin for a short while before they sleep:
// waking a sleeping thread took 50-100 us on that virtual machine (its idle processor is halted), more than a
// 4096-token batch of 128 experts then gained from a second thread. The spin is bounded, so an idle pool sleeps.
// Nor does a caller wait for a worker still waking: once the caller's own part is done, the call is closed to
// workers that have not joined it. So a task must let the calling thread do every part's work alone (the
// kernel's threads claim rows until none is left), and a call after a long pause costs about what one thread
// would, instead of one thread's half plus a wake-up.
//
// On Linux the workers may run on every CPU of the process but the one the caller is on. Left to the scheduler, a
// woken worker was often placed on its waker's CPU (wake-affine), where it waits for the caller's part to end and
// then spins beside the caller's next one: on the 2-core machine a two-thread call then ran 0.7-1.0x one thread's
// speed for seconds at a time, and 1.6-2.4x whenever the worker had last run on the other CPU. Workers are named
// "fusedgate-cpu", for profilers and the tests.
#pragma once

#if defined(__unix__)
#include <pthread.h>
#endif
#if defined(__linux__)
#include <sched.h>
#include <unistd.h>
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
#include <vector>

namespace fusedgate {
namespace cpu {
// Internal linkage: the statics below would otherwise be one object across the process (unique symbols), so a
// second build of the library loaded into the same process would hand its calls to the first one's pool, whose
// layout and workers may differ.
namespace {

class Pool {
 public:
  // Runs task(context, i, parts) for i = 0 on the calling thread and for i in [1, parts) on workers that start
  // before the caller's part is done, and returns once every part started has. Returns how many ran (at least
  // 1), or 0 without running anything when another call holds the pool.
  using Task = void (*)(const void* context, int part, int parts);

  static int run(Task task, const void* context, int parts) {
    Pool& pool = instance();
    std::unique_lock<std::mutex> exclusive(pool.dispatch_, std::try_to_lock);
    if (!exclusive.owns_lock()) return 0;
    std::unique_lock<std::mutex> lock(pool.mutex_);
    while (pool.workers_ < parts - 1) {
      try {
        std::thread worker(&Pool::work, &pool, pool.workers_ + 1, pool.generation_.load(std::memory_order_relaxed));
        const std::thread::native_handle_type handle = worker.native_handle();
        worker.detach();
        ++pool.workers_;
        pool.started(handle);
      } catch (const std::system_error&) {
        break;  // a process limit: the caller runs the rest
      }
    }
    pool.keep_workers_off_caller_cpu();
    const int used = pool.workers_ + 1 < parts ? pool.workers_ + 1 : parts;
    pool.task_ = task;
    pool.context_ = context;
    pool.parts_ = used;
    pool.joined_.store(0, std::memory_order_relaxed);
    pool.finished_parts_.store(0, std::memory_order_relaxed);
    pool.generation_.fetch_add(1, std::memory_order_release);
    lock.unlock();
    pool.wake_.notify_all();
    task(context, 0, used);
    const int started = pool.joined_.fetch_or(kClosed, std::memory_order_acq_rel);
    const auto done = [&] { return pool.finished_parts_.load(std::memory_order_acquire) == started; };
    if (!spin_until(done)) {
      lock.lock();
      pool.finished_.wait(lock, done);
    }
    return started + 1;
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

  // Only the caller holding dispatch_ calls the two functions below, so handles_ needs no lock of its own.
  void started(std::thread::native_handle_type handle) {
#if defined(__linux__)
    pthread_setname_np(handle, "fusedgate-cpu");
    handles_.push_back(handle);
#else
    (void)handle;
#endif
  }

  // Allows the workers every CPU of the process (its main thread's affinity) but the caller's, once per change of
  // the caller's CPU or of the worker count: the system call costs a few microseconds. Where the caller's is the
  // process's only CPU the workers keep theirs.
  void keep_workers_off_caller_cpu() {
#if defined(__linux__)
    const int here = sched_getcpu();
    if (here < 0 || here >= CPU_SETSIZE || (here == kept_off_ && handles_.size() == kept_workers_)) return;
    cpu_set_t cpus;
    if (sched_getaffinity(getpid(), sizeof cpus, &cpus) != 0) return;
    CPU_CLR(here, &cpus);
    if (CPU_COUNT(&cpus) == 0) return;
    for (const auto handle : handles_) pthread_setaffinity_np(handle, sizeof cpus, &cpus);
    kept_off_ = here;
    kept_workers_ = handles_.size();
#endif
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
      // The call's fields are read, and the worker joins it, under the lock, which their writer holds: a call
      // this worker takes no part in may be writing them for the next one.
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, called);
      seen = generation_.load(std::memory_order_relaxed);
      if (index >= parts_ || !join()) continue;
      const Task task = task_;
      const void* context = context_;
      const int parts = parts_;
      lock.unlock();
      task(context, index, parts);
      finished_parts_.fetch_add(1, std::memory_order_acq_rel);
      // Under the lock, so that a caller between its check and its sleep cannot miss the notification.
      lock.lock();
      finished_.notify_one();
    }
  }

  // Counts this worker into the current call unless its caller has closed it.
  bool join() {
    int joined = joined_.load(std::memory_order_relaxed);
    while ((joined & kClosed) == 0) {
      if (joined_.compare_exchange_weak(joined, joined + 1, std::memory_order_acq_rel)) return true;
    }
    return false;
  }

  static constexpr int kClosed = 1 << 30;  // in joined_: the caller's part is done, no worker may join
  static inline Pool* pool_ = nullptr;
  std::mutex dispatch_;  // held for a whole pooled call
  std::mutex mutex_;     // guards the call's fields below and every sleep
  std::condition_variable wake_, finished_;
  std::atomic<uint64_t> generation_{0};  // raised, under the lock, once per call
  int workers_ = 0;
  Task task_ = nullptr;
  const void* context_ = nullptr;
  int parts_ = 0;
  std::atomic<int> joined_{0};          // workers that joined the call, and kClosed once the caller's part is done
  std::atomic<int> finished_parts_{0};  // parts that workers have finished
  std::vector<std::thread::native_handle_type> handles_;  // the workers (Linux), for their affinity
  int kept_off_ = -1;                   // the CPU the workers were last kept off
  size_t kept_workers_ = 0;             // how many workers that applied to
};

}  // namespace
}  // namespace cpu
}  // namespace fusedgate
