// Path `cpu_kernel`: the routing op in C++ on the CPU, for CPU tensors of any framework (the microservice's CPU
// backend, the Paddle CPU path). This file is the library entry point: it checks the call, picks the per-token
// loop for the processor (cpu_route_avx512.h where AVX-512 is present, else cpu_route_portable.h; both give the
// same bits) and splits the tokens into contiguous row ranges over threads (cpu_pool.h).
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/optional.h>
#include <tvm/ffi/string.h>

#if defined(__linux__)
#include <sched.h>
#endif

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <system_error>
#include <thread>
#include <vector>

#include "checks.h"
#include "cpu_route.h"
#include "cpu_route_avx512.h"
#include "cpu_pool.h"
#include "cpu_route_portable.h"

namespace fusedgate {
namespace {

using tvm::ffi::Optional;
using tvm::ffi::TensorView;

constexpr int kMaxThreads = 1024;
// Below this many experts (rows x E) per thread, a thread costs more than it saves. On the shared 2-core x86-64
// machine, with the pool's workers spinning between calls, two threads gained 1.3-1.9x at 1024 tokens of 128 to
// 384 experts (0.1-0.4 ms of work) and 1.6-2.3x at 4096; below that the hand-over and a busy second core eat the
// gain.
constexpr int64_t kMinExpertsPerThread = 1 << 16;
// The least work one claim of rows takes (Split below), about 5 us on that machine: enough that claims
// cost nothing beside it, and little enough that the last claims leave the threads finishing within that.
constexpr int64_t kMinExpertsPerRange = 1 << 13;
// Ranges are cut in whole multiples of this many rows (the AVX-512 loop's block), where they can be.
constexpr int64_t kRangeRows = 8;

int64_t whole_blocks(int64_t rows) { return (rows + kRangeRows - 1) / kRangeRows * kRangeRows; }

int64_t min_range_rows(int64_t experts) { return whole_blocks((kMinExpertsPerRange + experts - 1) / experts); }

// Logits or scores at least this large are taken to be out of the cache: the scores go out by non-temporal
// stores and the logits are asked for ahead (cpu_route_avx512.h). On the shared 2-core x86-64 machine, called
// right after the numpy reference as in the throughput benchmark, streaming gained 10-30% with 6 MB of scores
// (4096 tokens of 384 experts) and 4 MB (8192 of 128) and lost up to 10% at 1.3-2.6 MB, where plain stores still
// found the output's lines in the cache; asking for logits ahead gained 7-12% at 4-6 MB and cost up to 3% on
// rows already in the cache.
constexpr int64_t kUncachedBytes = int64_t{1} << 22;

enum class Isa { kPortable, kAvx512 };

bool avx512_present() {
#if defined(FUSEDGATE_HAVE_AVX512)
  static const bool present = cpu::avx512::supported();
  return present;
#else
  return false;
#endif
}

// The per-token loop a call takes: $FUSEDGATE_CPU_ISA (`portable` or `avx512`) where set, else the widest the
// processor has.
Isa chosen_isa() {
  const char* env = std::getenv("FUSEDGATE_CPU_ISA");
  if (env == nullptr || *env == '\0') return avx512_present() ? Isa::kAvx512 : Isa::kPortable;
  if (std::strcmp(env, "portable") == 0) return Isa::kPortable;
  if (std::strcmp(env, "avx512") == 0 && avx512_present()) return Isa::kAvx512;
  TVM_FFI_THROW(ValueError) << "FUSEDGATE_CPU_ISA='" << env << "' is invalid: allowed portable"
                            << (avx512_present() ? ", avx512" : " (this processor has no AVX-512)")
                            << ", or unset for the widest the processor has";
  return Isa::kPortable;
}

struct Call {
  cpu::Routing p;
  cpu::Buffers io;
  Isa isa;
  const float* filter_bias;  // the bias, -inf where it is not finite (AVX-512 loop)
  float delta;               // how far its approximate keys may lie from the exact ones
};

void route(const Call& call, int64_t begin, int64_t end) {
#if defined(FUSEDGATE_HAVE_AVX512)
  if (call.isa == Isa::kAvx512) {
    cpu::avx512::route_rows_any(call.p, call.io, begin, end, call.filter_bias, call.delta);
    return;
  }
#endif
  cpu::portable::route_rows_any(call.p, call.io, begin, end);
}

// A call's rows, handed out to its threads in contiguous ranges as each asks for more. A thread claims a share
// of the rows still unclaimed (half of an equal share, so the ranges shrink as the call goes on) and never fewer
// than `min_rows` (but for the last): a thread that starts late, or that shares its core with another job, takes
// fewer rows instead of holding the call back, while the last ranges are small enough that the threads finish
// close together.
struct Split {
  const Call* call;
  int64_t rows;
  int64_t min_rows;
  int threads;
  mutable std::atomic<int64_t> next{0};

  // The next range to route, or false when every row is claimed.
  bool claim(int64_t* begin, int64_t* end) const {
    int64_t start = next.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t left = rows - start;
      if (left <= 0) return false;
      // Ranges are whole blocks of the AVX-512 loop where they can be.
      const int64_t share = whole_blocks(left / (2 * threads));
      const int64_t size = std::min(left, std::max(min_rows, share));
      if (next.compare_exchange_weak(start, start + size, std::memory_order_relaxed)) {
        *begin = start;
        *end = start + size;
        return true;
      }
    }
  }
};

// Routes ranges of the call until none is left; every thread of a call runs it (part and parts unused).
void route_claimed(const void* context, int, int) {
  const Split& split = *static_cast<const Split*>(context);
  int64_t begin, end;
  while (split.claim(&begin, &end)) route(*split.call, begin, end);
}

int affinity_cpus() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
#endif
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

// The thread count a call may use: the keyword, else $FUSEDGATE_CPU_THREADS, else the CPUs this process may
// run on. The CPU count is asked of the system only when the work could use a second thread (`needed`), as it
// costs a system call.
int thread_budget(int64_t requested, bool needed) {
  if (requested < 0 || requested > kMaxThreads)
    TVM_FFI_THROW(ValueError) << "num_threads=" << requested << " is out of range: allowed 1 <= num_threads <= "
                              << kMaxThreads << ", or 0 for the default";
  if (requested > 0) return static_cast<int>(requested);
  const char* env = std::getenv("FUSEDGATE_CPU_THREADS");
  if (env != nullptr && *env != '\0') {
    char* end = nullptr;
    errno = 0;
    const long value = std::strtol(env, &end, 10);
    if (errno != 0 || *end != '\0' || value < 1 || value > kMaxThreads)
      TVM_FFI_THROW(ValueError) << "FUSEDGATE_CPU_THREADS='" << env
                                << "' is invalid: allowed an integer 1 <= FUSEDGATE_CPU_THREADS <= " << kMaxThreads;
    return static_cast<int>(value);
  }
  return needed ? affinity_cpus() : 1;
}

int64_t work_threads(int64_t rows, int64_t experts) {
  return std::min<int64_t>(std::max<int64_t>(1, rows * experts / kMinExpertsPerThread), std::max<int64_t>(rows, 1));
}

// Threads one call runs on: the budget, fewer where the rows hold too little work for each.
int threads_for(int64_t rows, int64_t experts, int64_t requested) {
  const int64_t by_work = work_threads(rows, experts);
  return static_cast<int>(std::min<int64_t>(thread_budget(requested, by_work > 1), by_work));
}

}  // namespace

// The threads `cpu_grouped_topk` would run on for this shape and keyword (0 = default).
int64_t cpu_thread_count(int64_t num_tokens, int64_t num_experts, int64_t num_threads) {
  return threads_for(num_tokens, num_experts, num_threads);
}

// The per-token loop `cpu_grouped_topk` takes on this processor: "avx512" or "portable".
tvm::ffi::String cpu_isa() { return chosen_isa() == Isa::kAvx512 ? "avx512" : "portable"; }

void cpu_grouped_topk(TensorView logits, TensorView bias, Optional<TensorView> scores, TensorView values,
                      TensorView indices, int64_t n_group, int64_t topk_group, int64_t top_k, bool renormalize,
                      double scale, int64_t num_threads) {
  if (logits.ndim() != 2) TVM_FFI_THROW(ValueError) << "gating_output must be 2-D [num_tokens, num_experts]";
  const int64_t rows = logits.size(0), experts = logits.size(1);
  check_routing_args(experts, n_group, topk_group, top_k);
  const FloatKind kind = float_kind(logits, "gating_output");
  if (!logits.IsContiguous()) TVM_FFI_THROW(ValueError) << "gating_output must be contiguous";
  if (logits.device().device_type != kDLCPU) TVM_FFI_THROW(ValueError) << "gating_output must be a CPU tensor";
  check_bias(bias, experts, logits);
  const TensorView* scores_ptr = scores.has_value() ? &scores.value() : nullptr;
  const bool index64 = check_outputs(scores_ptr, values, indices, rows, experts, top_k, logits);
  const int threads = threads_for(rows, experts, num_threads);
  Call call;
  call.isa = chosen_isa();
  cpu::Routing& p = call.p;
  p.experts = static_cast<int>(experts);
  p.n_group = static_cast<int>(n_group);
  p.topk_group = static_cast<int>(topk_group);
  p.top_k = static_cast<int>(top_k);
  p.experts_per_group = p.experts / p.n_group;
  p.score_groups = topk_group < n_group;
  p.renormalize = renormalize;
  p.scale = static_cast<float>(scale);
  p.fallback_weight = 1.0f / static_cast<float>(p.top_k);

  alignas(64) float bias_f[kMaxExperts];
  cpu::decode_row(data_of(bias), float_kind(bias, "e_score_correction_bias"), 0, p.experts, bias_f);
  alignas(64) float filter_bias[kMaxExperts];
  call.filter_bias = filter_bias;
#if defined(FUSEDGATE_HAVE_AVX512)
  if (call.isa == Isa::kAvx512 && !p.score_groups) call.delta = cpu::avx512::prepare_filter(bias_f, p.experts, filter_bias);
#endif
  call.io = cpu::Buffers{data_of(logits),
                         kind,
                         bias_f,
                         static_cast<float*>(data_of(values)),
                         data_of(indices),
                         index64,
                         scores_ptr ? static_cast<float*>(data_of(*scores_ptr)) : nullptr,
                         false,
                         false};
  // The AVX-512 loop's block buffer takes the output's offset from a cache line, in whole floats.
  call.io.stream_scores = call.isa == Isa::kAvx512 && call.io.scores != nullptr &&
                          reinterpret_cast<uintptr_t>(call.io.scores) % alignof(float) == 0 &&
                          rows * experts * static_cast<int64_t>(sizeof(float)) >= kUncachedBytes;
  call.io.prefetch_logits =
      call.isa == Isa::kAvx512 && rows * experts * bytes_of(kind) >= kUncachedBytes;

  if (threads <= 1) {
    route(call, 0, rows);
    return;
  }
  const Split split{&call, rows, min_range_rows(experts), threads};
  // The calling thread routes too, until every row is claimed: rows of threads that could not be started, or
  // started late, are routed here.
  if (cpu::Pool::run(route_claimed, &split, threads) > 0) return;
  // Another call holds the pool: threads of this call's own.
  std::vector<std::thread> workers;
  workers.reserve(threads - 1);
  try {
    for (int i = 1; i < threads; ++i) workers.emplace_back(route_claimed, &split, i, threads);
  } catch (const std::system_error&) {
    // No thread to be had (a process limit): the threads started and this one route every row.
  }
  route_claimed(&split, 0, threads);
  for (std::thread& w : workers) w.join();
}

}  // namespace fusedgate

TVM_FFI_DLL_EXPORT_TYPED_FUNC(cpu_grouped_topk, fusedgate::cpu_grouped_topk);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cpu_thread_count, fusedgate::cpu_thread_count);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cpu_isa, fusedgate::cpu_isa);
