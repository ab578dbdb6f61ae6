// Kernels for XLA:CPU (FFI custom calls), built at first use by qwen2_jax/cpu_kernels.py.
//
// gemv: a few activation rows times a weight matrix stored [out, in] (torch's orientation).
//
// y[m, n] = scale[n] * sum_k x[m, k] * w[n, k], x float32 [m, k], w bfloat16, float16, float32 or
// int8 [n, k], accumulated in float32. Each weight element is read once from memory, widened to
// float32 in registers and used for every activation row; output rows are split over helper
// threads (`Helpers`). Decode is bound by reading the weights, and XLA:CPU's own dot reads
// bfloat16 weights at half the bandwidth of float32 ones (the same elements per second), so
// without this a bfloat16 model decodes no faster than a float32 one.
//
// take_rows: rows of a table by index (the embedding lookup), as bytes.
//
// Built with -O3 -march=native: the 16-lane vector type below becomes one AVX-512 register (two AVX2
// ones elsewhere).

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#include <sched.h>
#include <cstdint>
#include <cstring>
#include <memory>
#include <algorithm>
#include <cmath>
#include <functional>
#include <optional>

#include <immintrin.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;
typedef float f32x16 __attribute__((vector_size(kLanes * 4)));
typedef uint16_t u16x16 __attribute__((vector_size(kLanes * 2)));
typedef uint32_t u32x16 __attribute__((vector_size(kLanes * 4)));
typedef _Float16 f16x16 __attribute__((vector_size(kLanes * 2)));
typedef int8_t i8x16 __attribute__((vector_size(kLanes)));
typedef int32_t i32x16 __attribute__((vector_size(kLanes * 4)));

// 16 weights from memory as float32 lanes (unaligned loads through memcpy).
template <typename W>
inline f32x16 load16(const W* p);

template <>
inline f32x16 load16<float>(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// bfloat16 is the upper half of a float32: widening is a shift.
struct bf16 {
  uint16_t bits;
};
template <>
inline f32x16 load16<bf16>(const bf16* p) {
  u16x16 h;
  std::memcpy(&h, p, sizeof(h));
  u32x16 w = __builtin_convertvector(h, u32x16) << 16;
  f32x16 v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}

template <>
inline f32x16 load16<_Float16>(const _Float16* p) {
#if defined(__AVX512F__)
  return (f32x16)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__)
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  f32x16 v;
  std::memcpy(&v, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&v) + 32, &hi, 32);
  return v;
#else
  f16x16 h;
  std::memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(h, f32x16);
#endif
}

template <>
inline f32x16 load16<int8_t>(const int8_t* p) {
#if defined(__AVX512F__)
  return (f32x16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  i8x16 h;
  std::memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(__builtin_convertvector(h, i32x16), f32x16);
#endif
}

inline float to_float(float v) { return v; }
inline float to_float(_Float16 v) { return static_cast<float>(v); }
inline float to_float(int8_t v) { return static_cast<float>(v); }
inline float to_float(bf16 v) {
  uint32_t w = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));

// A tree of halves: a left-to-right sum of the 16 lanes is a 15-add dependency chain, which cost
// as much as the weight loop itself for 896-wide rows.
inline float hsum(f32x16 v) {
  const f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// Output rows [n0, n1) for M activation rows (M a compile-time constant, so the accumulators stay
// in registers). NB output rows per iteration: NB independent weight streams in flight and NB * M
// independent accumulation chains, enough to hide the FMA latency at M = 1.
template <typename W, int M, int NB>
void rows_block_nb(const float* x, const W* w, const float* scale, float* y, int64_t k, int64_t n, int64_t n0,
                   int64_t n1) {
  const int64_t k_vec = k - k % kLanes;
  int64_t j = n0;
  for (; j + NB <= n1; j += NB) {
    const W* wj = w + j * k;
    f32x16 acc[NB][M];
    for (int r = 0; r < NB; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = f32x16{};
    for (int64_t i = 0; i < k_vec; i += kLanes) {
      f32x16 wv[NB];
      for (int r = 0; r < NB; ++r) {
        wv[r] = load16<W>(wj + r * k + i);
        if (M > 1) _mm_prefetch(reinterpret_cast<const char*>(wj + (r + NB) * k + i), _MM_HINT_T0);
      }
      for (int m = 0; m < M; ++m) {
        const f32x16 xv = load16<float>(x + m * k + i);
        for (int r = 0; r < NB; ++r) acc[r][m] += wv[r] * xv;
      }
    }
    for (int r = 0; r < NB; ++r) {
      const W* wr = wj + r * k;
      for (int m = 0; m < M; ++m) {
        float s = hsum(acc[r][m]);
        for (int64_t i = k_vec; i < k; ++i) s += to_float(wr[i]) * x[m * k + i];
        y[m * n + j + r] = scale ? s * scale[j + r] : s;
      }
    }
  }
  if (NB > 1 && j < n1) rows_block_nb<W, M, 1>(x, w, scale, y, k, n, j, n1);
}

template <typename W, int M>
void rows_block(const float* x, const W* w, const float* scale, float* y, int64_t k, int64_t n, int64_t n0,
                int64_t n1) {
  constexpr int NB = M <= 2 ? 4 : (M <= 4 ? 2 : 1);
  rows_block_nb<W, M, NB>(x, w, scale, y, k, n, n0, n1);
}

#if defined(__AVX512BF16__)
// bfloat16 activations times bfloat16 weights: vdpbf16ps multiplies pairs of bf16 values exactly
// and adds them into float32 lanes, one instruction for 32 weights and one activation row (the
// widening path above takes two instructions per 16 weights before its multiply-add).
//
// Both kernels prefetch the next NB weight rows while multiplying these, from 2 activation rows on:
// the hardware prefetcher alone left the multiply-adds waiting on memory (one core, LM head, 8
// activation rows: 19.2 ms without, 11.4 ms with; 4 rows 13.6 / 9.8; 2 rows 10.9 / 9.1; two blocks
// ahead was no better). With one row it made a whole decode step slower (27 against 19 ms).
template <int M, int NB>
void bf16_rows_block_nb(const uint16_t* x, const uint16_t* w, float* y, int64_t k, int64_t n, int64_t n0,
                        int64_t n1) {
  const int64_t k_vec = k - k % 32;
  int64_t j = n0;
  for (; j + NB <= n1; j += NB) {
    const uint16_t* wj = w + j * k;
    __m512 acc[NB][M];
    for (int r = 0; r < NB; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t i = 0; i < k_vec; i += 32) {
      __m512bh wv[NB];
      for (int r = 0; r < NB; ++r) {
        wv[r] = (__m512bh)_mm512_loadu_si512(wj + r * k + i);
        if (M > 1) _mm_prefetch(reinterpret_cast<const char*>(wj + (r + NB) * k + i), _MM_HINT_T0);
      }
      for (int m = 0; m < M; ++m) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * k + i);
        for (int r = 0; r < NB; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv[r], xv);
      }
    }
    for (int r = 0; r < NB; ++r) {
      const uint16_t* wr = wj + r * k;
      for (int m = 0; m < M; ++m) {
        float s = _mm512_reduce_add_ps(acc[r][m]);
        for (int64_t i = k_vec; i < k; ++i) s += to_float(bf16{wr[i]}) * to_float(bf16{x[m * k + i]});
        y[m * n + j + r] = s;
      }
    }
  }
  if (NB > 1 && j < n1) bf16_rows_block_nb<M, 1>(x, w, y, k, n, j, n1);
}

template <int M>
void bf16_rows_block(const uint16_t* x, const uint16_t* w, float* y, int64_t k, int64_t n, int64_t n0, int64_t n1) {
  // Output rows per iteration, measured on one core (Zen 4) over the LM head, GB/s of weights:
  // M = 2: 2 rows 19.1, 4 rows 27.6, 8 rows 24.8; M = 4: 2 rows 14.8, 4 rows 18.2; M = 8: 1 row 9.9,
  // 2 rows 11.6, 3 rows 14.3 (24 accumulators: the registers). M = 1: 8 rows measured 34.5 against
  // 27.5 for 4 on one core, but 26.1 against 19.3 ms per Qwen2-0.5B decode step on two.
  constexpr int NB = M == 1 ? 4 : (M <= 4 ? 4 : 3);
  bf16_rows_block_nb<M, NB>(x, w, y, k, n, n0, n1);
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// int8 weights times activations written as int16 with one float scale per row (x ~= q * s_x,
// |q| <= 32767: 15 bits, finer than bfloat16's 8 for every value above 1/128 of the row's largest).
// vpdpwssd multiplies 32 int16 pairs into 16 int32 lanes exactly, after one widening of 32 int8
// weights to int16: two instructions for 32 weights and one activation row, where widening int8 to
// float32 takes four for 32 plus the multiply-adds. The int32 lanes are moved into float32 every
// kFlushIters iterations: 4 products of at most 32767 * 127 per lane and iteration, so 64
// iterations stay below 2**31.
constexpr int64_t kFlushIters = 64;

template <int M, int NB>
void int8_rows_block_nb(const int16_t* xq, const float* x_scale, const int8_t* w, const float* scale, float* y,
                        int64_t k, int64_t n, int64_t n0, int64_t n1) {
  // 64 weights (one cache line) per row and iteration: with 32, half a line, the reads in flight
  // halved and the LM head read at 28 GB/s against 60 for bfloat16's full lines.
  const int64_t k_vec = k - k % 64;
  int64_t j = n0;
  for (; j + NB <= n1; j += NB) {
    const int8_t* wj = w + j * k;
    __m512 total[NB][M];
    __m512i acc[NB][M];
    for (int r = 0; r < NB; ++r)
      for (int m = 0; m < M; ++m) {
        total[r][m] = _mm512_setzero_ps();
        acc[r][m] = _mm512_setzero_si512();
      }
    int64_t iters = 0;
    for (int64_t i = 0; i < k_vec; i += 64) {
      __m512i lo[NB], hi[NB];
      for (int r = 0; r < NB; ++r) {
        const __m512i bytes = _mm512_loadu_si512(wj + r * k + i);
        lo[r] = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(bytes));
        hi[r] = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(bytes, 1));
        _mm_prefetch(reinterpret_cast<const char*>(wj + (r + NB) * k + i), _MM_HINT_T0);
      }
      for (int m = 0; m < M; ++m) {
        const __m512i x_lo = _mm512_loadu_si512(xq + m * k + i);
        const __m512i x_hi = _mm512_loadu_si512(xq + m * k + i + 32);
        for (int r = 0; r < NB; ++r)
          acc[r][m] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(acc[r][m], lo[r], x_lo), hi[r], x_hi);
      }
      if (++iters == kFlushIters) {
        iters = 0;
        for (int r = 0; r < NB; ++r)
          for (int m = 0; m < M; ++m) {
            total[r][m] = _mm512_add_ps(total[r][m], _mm512_cvtepi32_ps(acc[r][m]));
            acc[r][m] = _mm512_setzero_si512();
          }
      }
    }
    for (int r = 0; r < NB; ++r) {
      const int8_t* wr = wj + r * k;
      for (int m = 0; m < M; ++m) {
        float s = _mm512_reduce_add_ps(_mm512_add_ps(total[r][m], _mm512_cvtepi32_ps(acc[r][m])));
        int64_t tail = 0;
        for (int64_t i = k_vec; i < k; ++i) tail += static_cast<int64_t>(wr[i]) * xq[m * k + i];
        s += static_cast<float>(tail);
        y[m * n + j + r] = s * x_scale[m] * scale[j + r];
      }
    }
  }
  if (NB > 1 && j < n1) int8_rows_block_nb<M, 1>(xq, x_scale, w, scale, y, k, n, j, n1);
}

template <int M>
void int8_rows_block(const int16_t* xq, const float* x_scale, const int8_t* w, const float* scale, float* y,
                     int64_t k, int64_t n, int64_t n0, int64_t n1) {
  constexpr int NB = M <= 4 ? 4 : 3;
  int8_rows_block_nb<M, NB>(xq, x_scale, w, scale, y, k, n, n0, n1);
}
#endif

constexpr int64_t kMaxRows = 8;

// One call's output rows [n0, n1) for activation rows [m0, m0 + rows): the kernel instance for
// that row count. `make` takes std::integral_constant<int, M> and returns the range function of
// the M-row kernel, so each kernel family needs no switch of its own.
using RangeFn = std::function<void(int64_t, int64_t)>;

template <typename Make>
RangeFn by_rows(int64_t rows, Make make) {
  switch (rows) {
    case 1: return make(std::integral_constant<int, 1>{});
    case 2: return make(std::integral_constant<int, 2>{});
    case 3: return make(std::integral_constant<int, 3>{});
    case 4: return make(std::integral_constant<int, 4>{});
    case 5: return make(std::integral_constant<int, 5>{});
    case 6: return make(std::integral_constant<int, 6>{});
    case 7: return make(std::integral_constant<int, 7>{});
    case 8: return make(std::integral_constant<int, 8>{});
  }
  return nullptr;
}

template <typename W>
RangeFn float_rows(int64_t rows, const float* x, const W* w, const float* scale, float* y, int64_t k, int64_t n) {
  return by_rows(rows, [=](auto m) -> RangeFn {
    return [=](int64_t n0, int64_t n1) { rows_block<W, decltype(m)::value>(x, w, scale, y, k, n, n0, n1); };
  });
}

#if defined(__AVX512BF16__)
RangeFn bf16_rows(int64_t rows, const uint16_t* x, const uint16_t* w, float* y, int64_t k, int64_t n) {
  return by_rows(rows, [=](auto m) -> RangeFn {
    return [=](int64_t n0, int64_t n1) { bf16_rows_block<decltype(m)::value>(x, w, y, k, n, n0, n1); };
  });
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
RangeFn int8_rows(int64_t rows, const int16_t* xq, const float* x_scale, const int8_t* w, const float* scale, float* y,
                  int64_t k, int64_t n) {
  return by_rows(rows, [=](auto m) -> RangeFn {
    return [=](int64_t n0, int64_t n1) {
      int8_rows_block<decltype(m)::value>(xq, x_scale, w, scale, y, k, n, n0, n1);
    };
  });
}
#endif

// Work shared by the threads of one call: chunks of output rows handed out by an atomic counter.
// Threads that start late find no chunk left and return; the caller waits only for chunks
// another thread has taken, so a busy thread pool never stalls the call.
struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t chunks = 0;
  int64_t chunk_rows = 0;
  int64_t n = 0;
  RangeFn run;

  void drain() {
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= chunks) return;
      const int64_t n0 = c * chunk_rows;
      run(n0, std::min(n0 + chunk_rows, n));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Chunks of at least this many weight elements: smaller ones cost more in hand-offs than they save.
constexpr int64_t kChunkElements = 1 << 18;

// Threads that help with the chunks of every call, spinning for kSpin after each call before they
// sleep. Decode makes ~170 calls a step back to back, each a fraction of a millisecond: handing
// chunks to XLA's thread pool woke a sleeping thread for every call (a [896, 896] bfloat16 kernel
// read at 27 GB/s that way, a [4864, 896] one at 37). One helper per CPU this process may use,
// besides the calling thread; created on first use and never destroyed (they outlive the program's
// static objects).
class Helpers {
 public:
  static Helpers& get() {
    static Helpers* helpers = new Helpers();
    return *helpers;
  }

  size_t size() const { return threads_.size(); }

  void offer(const std::shared_ptr<Work>& work) {
    std::atomic_store(&current_, work);
    generation_.fetch_add(1);
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      wake_.notify_all();
    }
  }

 private:
  static constexpr auto kSpin = std::chrono::microseconds(200);

  Helpers() {
    cpu_set_t set;
    int cpus = 1;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) cpus = CPU_COUNT(&set);
    for (int i = 1; i < cpus; ++i) {
      threads_.emplace_back([this] { loop(); });
      threads_.back().detach();
    }
  }

  void loop() {
    uint64_t seen = generation_.load();
    for (;;) {
      const auto start = std::chrono::steady_clock::now();
      int spins = 0;
      while (generation_.load() == seen) {
        _mm_pause();
        if (++spins % 256 == 0 && std::chrono::steady_clock::now() - start > kSpin) {
          std::unique_lock<std::mutex> lock(mu_);
          sleeping_.fetch_add(1);
          wake_.wait(lock, [&] { return generation_.load() != seen; });
          sleeping_.fetch_sub(1);
        }
      }
      seen = generation_.load();
      if (std::shared_ptr<Work> work = std::atomic_load(&current_)) work->drain();
    }
  }

  std::vector<std::thread> threads_;
  std::shared_ptr<Work> current_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleeping_{0};
  std::mutex mu_;
  std::condition_variable wake_;
};

void run_parallel(RangeFn fn, int64_t k, int64_t n) {
  auto work = std::make_shared<Work>();
  work->n = n;
  int64_t chunk_rows = std::max<int64_t>(kChunkElements / std::max<int64_t>(k, 1), 4);
  work->chunk_rows = chunk_rows + chunk_rows % 4;
  work->chunks = (n + work->chunk_rows - 1) / work->chunk_rows;
  work->run = std::move(fn);
  if (work->chunks > 1 && Helpers::get().size() > 0) Helpers::get().offer(work);
  work->drain();
  while (work->done.load(std::memory_order_acquire) < work->chunks) _mm_pause();
}

ffi::Error gemv_impl(ffi::AnyBuffer x, ffi::AnyBuffer w, const float* scale,
                     ffi::ResultBuffer<ffi::F32> y) {
  const auto x_dims = x.dimensions();
  const auto w_dims = w.dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 2 || x_dims[1] != w_dims[1])
    return ffi::Error::InvalidArgument("qwen2_gemv: expected x [m, k] and w [n, k]");
  const int64_t m = x_dims[0], k = x_dims[1], n = w_dims[0];
  const ffi::DataType w_type = w.element_type();
  float* out = y->typed_data();
  if (x.element_type() == ffi::DataType::BF16) {
    if (w_type != ffi::DataType::BF16 || scale != nullptr)
      return ffi::Error::InvalidArgument("qwen2_gemv: bfloat16 activations need bfloat16 weights");
#if defined(__AVX512BF16__)
    const uint16_t* xs = static_cast<const uint16_t*>(x.untyped_data());
    const uint16_t* ws = static_cast<const uint16_t*>(w.untyped_data());
    for (int64_t m0 = 0; m0 < m; m0 += kMaxRows)
      run_parallel(bf16_rows(std::min(m - m0, kMaxRows), xs + m0 * k, ws, out + m0 * n, k, n), k, n);
    return ffi::Error::Success();
#else
    return ffi::Error::InvalidArgument("qwen2_gemv: bfloat16 activations need AVX512-BF16");
#endif
  }
  if (x.element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("qwen2_gemv: activations must be f32 or bf16");
  const float* xs = static_cast<const float*>(x.untyped_data());
  const void* ws = w.untyped_data();
  for (int64_t m0 = 0; m0 < m; m0 += kMaxRows) {
    const int64_t rows = std::min(m - m0, kMaxRows);
    const float* xr = xs + m0 * k;
    float* yr = out + m0 * n;
    RangeFn fn;
    switch (w_type) {
      case ffi::DataType::F32: fn = float_rows(rows, xr, static_cast<const float*>(ws), scale, yr, k, n); break;
      case ffi::DataType::BF16: fn = float_rows(rows, xr, static_cast<const bf16*>(ws), scale, yr, k, n); break;
      case ffi::DataType::F16: fn = float_rows(rows, xr, static_cast<const _Float16*>(ws), scale, yr, k, n); break;
      case ffi::DataType::S8: fn = float_rows(rows, xr, static_cast<const int8_t*>(ws), scale, yr, k, n); break;
      default: return ffi::Error::InvalidArgument("qwen2_gemv: weights must be f32, bf16, f16 or s8");
    }
    run_parallel(std::move(fn), k, n);
  }
  return ffi::Error::Success();
}

ffi::Error gemv(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::ResultBuffer<ffi::F32> y) {
  return gemv_impl(x, w, nullptr, y);
}

ffi::Error gemv_scaled(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> scale,
                       ffi::ResultBuffer<ffi::F32> y) {
  if (w.dimensions().size() != 2 || scale.element_count() != static_cast<size_t>(w.dimensions()[0]))
    return ffi::Error::InvalidArgument("qwen2_gemv: one scale per output row expected");
  return gemv_impl(x, w, scale.typed_data(), y);
}

// x's rows as int16 and a scale per row: x ~= q * s, s = the row's absmax / 32767, q rounded to
// nearest (ties to even: the default rounding mode). Written on the calling thread, 16 values at a
// time.
template <typename X>
void int16_rows(const X* x, int64_t m, int64_t k, int16_t* q, float* s) {
  const int64_t k_vec = k - k % kLanes;
  for (int64_t r = 0; r < m; ++r) {
    const X* row = x + r * k;
    __m512 amax_v = _mm512_setzero_ps();
    for (int64_t i = 0; i < k_vec; i += kLanes) amax_v = _mm512_max_ps(amax_v, _mm512_abs_ps((__m512)load16<X>(row + i)));
    float amax = _mm512_reduce_max_ps(amax_v);
    for (int64_t i = k_vec; i < k; ++i) amax = std::max(amax, std::fabs(to_float(row[i])));
    const float scale = amax > 0.f ? amax / 32767.f : 1.f;
    const float inv = 1.f / scale;
    const __m512 inv_v = _mm512_set1_ps(inv);
    const __m512i lo = _mm512_set1_epi32(-32767), hi = _mm512_set1_epi32(32767);
    for (int64_t i = 0; i < k_vec; i += kLanes) {
      __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps((__m512)load16<X>(row + i), inv_v));
      v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + r * k + i), _mm512_cvtepi32_epi16(v));
    }
    for (int64_t i = k_vec; i < k; ++i) {
      const float v = std::nearbyint(to_float(row[i]) * inv);
      q[r * k + i] = static_cast<int16_t>(std::min(32767.f, std::max(-32767.f, v)));
    }
    s[r] = scale;
  }
}

// y = x @ (w * scale[:, None])^T for int8 weights [n, k] with a scale per output row; x float32 or
// bfloat16 [m, k], written as int16 rows (`int16_rows`) for the VNNI kernel.
ffi::Error gemv_int8(ffi::AnyBuffer x, ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> scale,
                     ffi::ResultBuffer<ffi::F32> y) {
  const auto x_dims = x.dimensions();
  const auto w_dims = w.dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 2 || x_dims[1] != w_dims[1])
    return ffi::Error::InvalidArgument("qwen2_gemv_int8: expected x [m, k] and w [n, k]");
  const int64_t m = x_dims[0], k = x_dims[1], n = w_dims[0];
  if (scale.element_count() != static_cast<size_t>(n))
    return ffi::Error::InvalidArgument("qwen2_gemv_int8: one scale per output row expected");
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  thread_local std::vector<int16_t> xq;
  thread_local std::vector<float> x_scale;
  xq.resize(static_cast<size_t>(m * k));
  x_scale.resize(static_cast<size_t>(m));
  if (x.element_type() == ffi::DataType::F32)
    int16_rows(static_cast<const float*>(x.untyped_data()), m, k, xq.data(), x_scale.data());
  else if (x.element_type() == ffi::DataType::BF16)
    int16_rows(static_cast<const bf16*>(x.untyped_data()), m, k, xq.data(), x_scale.data());
  else
    return ffi::Error::InvalidArgument("qwen2_gemv_int8: activations must be f32 or bf16");
  for (int64_t m0 = 0; m0 < m; m0 += kMaxRows)
    run_parallel(int8_rows(std::min(m - m0, kMaxRows), xq.data() + m0 * k, x_scale.data() + m0, w.typed_data(),
                           scale.typed_data(), y->typed_data() + m0 * n, k, n),
                 k, n);
  return ffi::Error::Success();
#else
  return ffi::Error::InvalidArgument("qwen2_gemv_int8: needs AVX512-VNNI");
#endif
}

// out[i] = table[clamp(ids[i])], rows copied as bytes whatever their type. XLA:CPU gathers a
// bfloat16 table through a float32 copy of all of it (and a bitcast to integers through an integer
// copy), which it hoists out of the decode loop: a whole-table conversion per generate call.
ffi::Error take_rows(ffi::AnyBuffer table, ffi::Buffer<ffi::S32> ids, ffi::Result<ffi::AnyBuffer> out) {
  const auto dims = table.dimensions();
  if (dims.size() != 2 || out->element_type() != table.element_type())
    return ffi::Error::InvalidArgument("qwen2_take_rows: expected a [rows, width] table");
  const int64_t rows = dims[0];
  const size_t row_bytes = table.size_bytes() / static_cast<size_t>(rows > 0 ? rows : 1);
  const char* src = static_cast<const char*>(table.untyped_data());
  char* dst = static_cast<char*>(out->untyped_data());
  const int32_t* id = ids.typed_data();
  const size_t n = ids.element_count();
  if (out->size_bytes() != n * row_bytes) return ffi::Error::InvalidArgument("qwen2_take_rows: wrong output size");
  for (size_t i = 0; i < n; ++i) {
    const int64_t r = std::min<int64_t>(std::max<int64_t>(id[i], 0), rows - 1);
    std::memcpy(dst + i * row_bytes, src + r * row_bytes, row_bytes);
  }
  return ffi::Error::Success();
}

}  // namespace

extern "C" int qwen2_gemv_has_int8_dot() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return 1;
#else
  return 0;
#endif
}

extern "C" int qwen2_gemv_has_bf16_dot() {
#if defined(__AVX512BF16__)
  return 1;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Qwen2Gemv, gemv,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Qwen2GemvScaled, gemv_scaled,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Qwen2TakeRows, take_rows,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::S32>>().Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Qwen2GemvInt8, gemv_int8,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
