// maxjax_qproject: y[r, o] = sum_i x[r, i] * W[o, i] on CPU with W in GGUF's blocks of 32 weights (Q8_0, Q4_0,
// Q4_1; Q4_K, Q5_K and Q6_K rewritten as blocks of 32 by kernels/quant.py), dequantized in registers; x, y and
// the sums float32 (or int8 x and integer sums with the `int8` attribute, below). maxjax/kernels/quant.py
// repacks the file's blocks.
//
// Why: a decode step on CPU is bound by the bytes of weight it reads, and float32 weights are 4 bytes each where
// the file's blocks are 0.56-1.06. Dequantizing inside the product reads those bytes (plus float32 scales) once.
//
// Layout, one uint8 array [panels, in / 32, stride]: for panel p (output columns p * P .. p * P + P - 1, the last
// zero-padded) and block b (inputs 32 b .. 32 b + 31), `stride` bytes of
//   codes  [C][P] bytes  Q8_0, Q5_K, Q6_K: C = 32, codes[k][j] = q[p P + j][32 b + k] (int8)
//                        Q4_*: C = 16, codes[k][j] = GGUF's byte k of the block: low nibble q[.][32 b + k],
//                              high nibble q[.][32 b + k + 16] (unsigned)
//   d      [P]           the block's scale
//   m      [P]           Q4_1, Q4_K, Q5_K: the block's minimum; Q6_K: the scale of the block's second half
// so w = d q (Q8_0), d (q - 8) (Q4_0), d q + m (Q4_1, Q4_K, Q5_K), d_half q (Q6_K), as ggml decodes them. The
// scales are float16 where the file's are (Q8_0, Q4_0, Q4_1: its own bits, widened in registers with F16C) and
// float32 where they are products (a K-quant's float16 factor times its 6- or 8-bit scale). A block of a panel is
// one contiguous run (P = 16: 544 / 288 / 320 bytes for Q8_0 / Q4_0 / Q4_1), read once per call (float32 copies of
// the file's scales made SmolLM2's step read 111.5 MB where the file holds 96.6). As in project.cc, each input
// position's P codes (NV vectors, widened to float in registers) meet x[r, i] broadcast for MR rows into MR x NV
// register sums, with no horizontal sums; the scales are applied once per block: sum_i x_i (d q_i + m) =
// d sum_i x_i q_i + m sum_i x_i, with each row's sum over each block computed once per call.
//
// With the `int8` attribute (AVX2 and AVX-512 builds, Q4_* only; `maxjax_int8_activations()`), the codes are
// laid out [4][P][4] (four of a column's bytes side by side, kernels/quant.py) and x is quantized as llama.cpp
// quantizes activations (per block of 32: dx = max |x_i| / 127, xq_i = round(x_i / dx)): four codes of a column
// meet 4 broadcast bytes of xq in vpmaddubsw (32 byte products an instruction against a float FMA's 8), 16-bit
// sums over a block (at most 8 x 2 x 15 x 127 = 30480), one vpmaddwd to 32 bits, d dx per block in float; the
// minimums meet dx sum_i xq_i. The error is sum_i w_i (dx xq_i - x_i): at most dx / 2 sum_i |w_i| a block.
//
// One file past 400 lines: the float and int8 tiles share the block formats, the dispatch and the handler.
//
// Work is split by panels among the calling thread and XLA's intra-op pool (parallel.h). Written with GCC/Clang
// vector extensions, with intrinsics only to widen the codes (AVX2, AVX-512, NEON; plain loops on other CPUs, so
// it compiles wherever project.cc does); the lane and panel widths come from panel.h, as project.cc's do, so
// `Kernels.panel` packs for both.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

#include "panel.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// MR here is smaller than project.cc's: the scales (and minimums) take NV registers each.
using maxjax::kLanes, maxjax::kNV, maxjax::kPanel, maxjax::Vec;
#if defined(__AVX512F__)
constexpr int kMR = 8;
#elif defined(__AVX__)
constexpr int kMR = 4;
#elif defined(__aarch64__)
constexpr int kMR = 4;
#else
constexpr int kMR = 2;
#endif
constexpr int kBlock = 32;
// Above this many rows the codes are dequantized once per panel into float32 (`dequantize_panel`) for
// panel.h's float tile; at or below, each tile widens them in registers. KDEQ
constexpr int64_t kDequantizeAbove = 2 * kMR;
constexpr int64_t kPrefetchBytes = 2048;
typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

// ggml's type numbers: the `kind` attribute.
enum Kind : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };

template <class V>
inline V load(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

// IEEE half -> float, for builds without a vector conversion.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  if (exponent == 0) return (sign ? -1.0f : 1.0f) * std::ldexp(static_cast<float>(mantissa), -24);
  const uint32_t magnitude = exponent == 31 ? 0x7f800000u : (exponent + 112) << 23;
  const uint32_t bits = sign | magnitude | (mantissa << 13);
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// kLanes float16 values from memory as floats.
inline Vec widen_halves(const uint8_t* p) {
#if defined(__AVX512F__)
  return (Vec)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__AVX__) && defined(__F16C__)
  return (Vec)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif defined(__aarch64__)
  return (Vec)vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(p)));
#else
  Vec out;
  for (int k = 0; k < kLanes; ++k) out[k] = half_to_float(load<uint16_t>(p + 2 * k));
  return out;
#endif
}

template <int64_t K>
struct Format {
  static constexpr bool kNibbles = K == kQ4_0 || K == kQ4_1 || K == kQ4_K;  // two 4-bit codes a byte, else int8
  static constexpr int kCodeRows = kNibbles ? kBlock / 2 : kBlock;  // rows of P code bytes a block
  static constexpr int kScales = K == kQ4_0 || K == kQ8_0 ? 1 : 2;
  static constexpr int kHalves = K == kQ6_K ? 2 : 1;  // Q6_K: a scale for each half of the block, no minimum
  static constexpr bool kMin = K != kQ8_0 && K != kQ6_K;  // a minimum per block (Q4_0's is -8 d)
  static constexpr bool kHalfScales = K == kQ8_0 || K == kQ4_0 || K == kQ4_1;  // the file's float16 scales
  static constexpr int kScaleBytes = kHalfScales ? 2 : 4;
  static constexpr int64_t kStride = kPanel * (kCodeRows + kScales * kScaleBytes);
  // Columns v * kLanes .. of scale row s (d; then m, or Q6_K's second half) of a block whose scales start at p.
  static Vec scale(const uint8_t* p, int s, int v) {
    const uint8_t* at = p + (s * kPanel + v * kLanes) * kScaleBytes;
    return kHalfScales ? widen_halves(at) : load<Vec>(at);
  }
};

// kLanes codes from memory, widened to int32 lanes (GCC scalarizes __builtin_convertvector from bytes, so the
// vector ISAs get their one-instruction widening).
inline IVec widen_s8(const uint8_t* p) {
#if defined(__AVX512F__)
  return (IVec)_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif defined(__AVX2__)
  return (IVec)_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#elif defined(__aarch64__)
  uint32_t u;
  std::memcpy(&u, p, sizeof(u));
  return (IVec)vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_u32(vdup_n_u32(u)))));
#else
  IVec out;
  for (int k = 0; k < kLanes; ++k) out[k] = static_cast<int8_t>(p[k]);
  return out;
#endif
}

inline IVec widen_u8(const uint8_t* p) {
#if defined(__AVX512F__)
  return (IVec)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif defined(__AVX2__)
  return (IVec)_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#elif defined(__aarch64__)
  uint32_t u;
  std::memcpy(&u, p, sizeof(u));
  return (IVec)vmovl_u16(vget_low_u16(vmovl_u8(vreinterpret_u8_u32(vdup_n_u32(u)))));
#else
  IVec out;
  for (int k = 0; k < kLanes; ++k) out[k] = p[k];
  return out;
#endif
}

inline Vec to_float(IVec q) {
#if defined(__AVX512F__)
  return (Vec)_mm512_cvtepi32_ps((__m512i)q);
#elif defined(__AVX2__)
  return (Vec)_mm256_cvtepi32_ps((__m256i)q);
#elif defined(__aarch64__)
  return (Vec)vcvtq_f32_s32((int32x4_t)q);
#else
  Vec out;
  for (int k = 0; k < kLanes; ++k) out[k] = static_cast<float>(q[k]);
  return out;
#endif
}

// y[r, 0:cols) for r < R: R rows of x (stride n_in) times one panel's blocks wp; y's row stride n_out. sx: the
// rows' sums over each block [R, blocks] (Q4_*: sum_i x_i (d q_i + m) = d sum_i x_i q_i + m sum_i x_i, so the
// codes meet x as small integers and each block's scales are applied once, not per weight).
template <int64_t K, int R>
void tile(const float* x, const float* sx, const uint8_t* wp, float* y, int64_t n_in, int64_t n_out, int cols) {
  using F = Format<K>;
  // Independent partial sums per accumulator: FMA latency x FMA ports (4 x 2) chains must be in flight.
  constexpr int S = R * kNV >= 8 ? 1 : R * kNV >= 4 ? 2 : 4;
  const int64_t blocks = n_in / kBlock;
  Vec acc[R][kNV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kNV; ++v) acc[r][v] = Vec{};
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* codes = wp + b * F::kStride;
    const uint8_t* scales = codes + F::kCodeRows * kPanel;
    for (int64_t line = 0; line < F::kStride; line += 64) __builtin_prefetch(codes + kPrefetchBytes + line, 0, 3);
    const float* xb = x + b * kBlock;
    for (int h = 0; h < F::kHalves; ++h) {
      Vec part[S][R][kNV];
      for (int s = 0; s < S; ++s)
        for (int r = 0; r < R; ++r)
          for (int v = 0; v < kNV; ++v) part[s][r][v] = Vec{};
      // k steps by S with s unrolled, so each partial sum is a register (indexing them by k % S kept them on the
      // stack: 2-3x slower at one row).
      for (int k0 = h * F::kCodeRows / F::kHalves; k0 < (h + 1) * F::kCodeRows / F::kHalves; k0 += S) {
#pragma GCC unroll 4
        for (int s = 0; s < S; ++s) {
          const int k = k0 + s;
          const uint8_t* row = codes + k * kPanel;
          // The codes first, then row by row: one row's broadcasts live at a time (AVX2 has 16 registers).
          if (!F::kNibbles) {
            Vec w[kNV];
            for (int v = 0; v < kNV; ++v) w[v] = to_float(widen_s8(row + v * kLanes));
            for (int r = 0; r < R; ++r) {
              const float xs = xb[r * n_in + k];
              for (int v = 0; v < kNV; ++v) part[s][r][v] += w[v] * xs;
            }
          } else {
            Vec lo[kNV], hi[kNV];
            for (int v = 0; v < kNV; ++v) {
              const IVec q = widen_u8(row + v * kLanes);
              lo[v] = to_float(q & 15);
              hi[v] = to_float(q >> 4);
            }
            for (int r = 0; r < R; ++r) {
              const float x0 = xb[r * n_in + k], x1 = xb[r * n_in + k + 16];
              for (int v = 0; v < kNV; ++v) {
                part[(2 * s) % S][r][v] += lo[v] * x0;
                part[(2 * s + 1) % S][r][v] += hi[v] * x1;
              }
            }
          }
        }
      }
      for (int v = 0; v < kNV; ++v) {  // the half's scale: d (Q6_K: this half's d)
        const Vec d = F::scale(scales, h, v);
        for (int r = 0; r < R; ++r) {
          Vec sum = part[0][r][v];
          for (int t = 1; t < S; ++t) sum += part[t][r][v];
          acc[r][v] += sum * d;
        }
      }
    }
    if (F::kMin) {
      for (int v = 0; v < kNV; ++v) {
        const Vec m = K == kQ4_0 ? F::scale(scales, 0, v) * -8.0f : F::scale(scales, 1, v);
        for (int r = 0; r < R; ++r) acc[r][v] += m * sx[r * blocks + b];
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float full[kPanel];
    std::memcpy(full, acc[r], sizeof(full));
    std::memcpy(y + r * n_out, full, cols * sizeof(float));
  }
}

using TileFn = void (*)(const float*, const float*, const uint8_t*, float*, int64_t, int64_t, int);

template <int64_t K, int... Rs>
TileFn tile_for(int rows, std::integer_sequence<int, Rs...>) {
  static constexpr TileFn fns[] = {tile<K, Rs + 1>...};
  return fns[rows - 1];
}

// Panel wp's weights dequantized into out [n_in, kPanel] float32, exactly as ggml decodes them (d q, (q - 8) d,
// d q + m): the float panel project.cc multiplies.
template <int64_t K>
void dequantize_panel(const uint8_t* wp, float* out, int64_t blocks) {
  using F = Format<K>;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* codes = wp + b * F::kStride;
    const uint8_t* scales = codes + F::kCodeRows * kPanel;
    float* ob = out + b * kBlock * kPanel;
    for (int v = 0; v < kNV; ++v) {
      const Vec d = F::scale(scales, 0, v);
      Vec m = Vec{};
      if (F::kMin && K != kQ4_0) m = F::scale(scales, 1, v);
      for (int k = 0; k < F::kCodeRows; ++k) {
        const uint8_t* row = codes + k * kPanel + v * kLanes;
        if (!F::kNibbles) {
          const Vec dk = K == kQ6_K && k >= kBlock / 2 ? F::scale(scales, 1, v) : d;
          const Vec w = to_float(widen_s8(row)) * dk + m;
          std::memcpy(ob + k * kPanel + v * kLanes, &w, sizeof(Vec));
        } else {
          const IVec q = widen_u8(row);
          Vec lo, hi;
          if (K == kQ4_0) {
            lo = to_float((q & 15) - 8) * d;
            hi = to_float((q >> 4) - 8) * d;
          } else {
            lo = to_float(q & 15) * d + m;
            hi = to_float(q >> 4) * d + m;
          }
          std::memcpy(ob + k * kPanel + v * kLanes, &lo, sizeof(Vec));
          std::memcpy(ob + (k + 16) * kPanel + v * kLanes, &hi, sizeof(Vec));
        }
      }
    }
  }
}

#if defined(__AVX2__)
constexpr bool kInt8 = true;
constexpr int kNV8 = kPanel / 8;  // 8 columns (32 bytes of codes) per AVX2 vector

// Each row's blocks of x quantized to int8 (xq [rows, n_in], scales dx [rows, blocks]) as llama.cpp's Q8_0
// quantizes them.
void quantize_rows(const float* x, int64_t rows, int64_t n_in, int8_t* xq, float* dx) {
  for (int64_t i = 0; i < rows * (n_in / kBlock); ++i) {
    const float* xb = x + i * kBlock;
    float amax = 0.0f;
    for (int k = 0; k < kBlock; ++k) amax = std::max(amax, std::fabs(xb[k]));
    const float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
    dx[i] = d;
    for (int k = 0; k < kBlock; ++k) xq[i * kBlock + k] = static_cast<int8_t>(std::nearbyint(xb[k] * id));
  }
}

// Columns 8 v .. 8 v + 7 of scale row s, as Format::scale (whose vectors are 16 wide in AVX-512 builds).
template <class F>
inline __m256 scale8(const uint8_t* p, int s, int v) {
  const uint8_t* at = p + (s * kPanel + v * 8) * F::kScaleBytes;
  if (!F::kHalfScales) return _mm256_loadu_ps(reinterpret_cast<const float*>(at));
#if defined(__F16C__)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)));
#else
  float out[8];
  for (int k = 0; k < 8; ++k) out[k] = half_to_float(load<uint16_t>(at + 2 * k));
  return _mm256_loadu_ps(out);
#endif
}

// Q4_*, int8 activations: R rows of xq (stride n_in, scales dx [R, blocks]) times one panel's blocks; the
// minimums meet the sums of the rows' quantized blocks sx [R, blocks].
template <int64_t K, int R>
void tile_i8(const int8_t* xq, const float* dx, const float* sx, const uint8_t* wp, float* y, int64_t n_in,
             int64_t n_out, int cols) {
  using F = Format<K>;
  const int64_t blocks = n_in / kBlock;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[R][kNV8];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kNV8; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* codes = wp + b * F::kStride;
    const uint8_t* scales = codes + F::kCodeRows * kPanel;
    for (int64_t line = 0; line < F::kStride; line += 64) __builtin_prefetch(codes + kPrefetchBytes + line, 0, 3);
    __m256i s16[R][kNV8];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < kNV8; ++v) s16[r][v] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      __m256i lo[kNV8], hi[kNV8];
      for (int v = 0; v < kNV8; ++v) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + g * kPanel * 4 + v * 32));
        lo[v] = _mm256_and_si256(w, low);
        hi[v] = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
      }
      for (int r = 0; r < R; ++r) {
        int32_t a, c;  // xq[4 g .. 4 g + 3] and xq[4 g + 16 .. 4 g + 19] of this row's block
        std::memcpy(&a, xq + r * n_in + b * kBlock + 4 * g, 4);
        std::memcpy(&c, xq + r * n_in + b * kBlock + 16 + 4 * g, 4);
        const __m256i xa = _mm256_set1_epi32(a), xc = _mm256_set1_epi32(c);
        for (int v = 0; v < kNV8; ++v)
          s16[r][v] = _mm256_add_epi16(s16[r][v], _mm256_add_epi16(_mm256_maddubs_epi16(lo[v], xa),
                                                                   _mm256_maddubs_epi16(hi[v], xc)));
      }
    }
    for (int v = 0; v < kNV8; ++v) {
      const __m256 dv = scale8<F>(scales, 0, v);
      const __m256 mv = K == kQ4_0 ? _mm256_mul_ps(dv, _mm256_set1_ps(-8.0f)) : scale8<F>(scales, 1, v);
      for (int r = 0; r < R; ++r) {
        const __m256 sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16[r][v], ones));
        acc[r][v] = _mm256_fmadd_ps(sums, _mm256_mul_ps(dv, _mm256_set1_ps(dx[r * blocks + b])), acc[r][v]);
        acc[r][v] = _mm256_fmadd_ps(mv, _mm256_set1_ps(sx[r * blocks + b]), acc[r][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float full[kPanel];
    for (int v = 0; v < kNV8; ++v) _mm256_storeu_ps(full + v * 8, acc[r][v]);
    std::memcpy(y + r * n_out, full, cols * sizeof(float));
  }
}
#else
constexpr bool kInt8 = false;
#endif

template <int64_t K>
void run(ffi::ThreadPool& pool, const float* xp, const uint8_t* wp, float* yp, int64_t rows, int64_t n_in,
         int64_t n_out, bool int8) {
  const int64_t blocks = n_in / kBlock, panel_bytes = blocks * Format<K>::kStride;
  const int64_t panels = (n_out + kPanel - 1) / kPanel;
#if defined(__AVX2__)
  if (int8 && Format<K>::kNibbles) {
    std::vector<int8_t> xq(rows * n_in);
    std::vector<float> dx(rows * blocks), sx(rows * blocks);  // each row's scale and float sum over each block
    quantize_rows(xp, rows, n_in, xq.data(), dx.data());
    // The minimums meet the sum of the quantized x, not of x: then the error is sum_i w_i (x~_i - x_i), with
    // w = d q + m near zero on average; against x's own sum it would be d sum_i q_i (x~_i - x_i), with d q
    // all of one sign (SmolLM2's logits moved by up to 4 that way).
    for (int64_t i = 0; i < rows * blocks; ++i) {
      int32_t s = 0;
      for (int k = 0; k < kBlock; ++k) s += xq[i * kBlock + k];
      sx[i] = dx[i] * static_cast<float>(s);
    }
    const int8_t* q = xq.data();
    const float *dxp = dx.data(), *sxp = sx.data();
    maxjax::parallel_for(pool, panels, [=](int64_t p) {
      const int cols = static_cast<int>(std::min<int64_t>(kPanel, n_out - p * kPanel));
      int64_t r = 0;
      for (; r + 2 <= rows; r += 2)
        tile_i8<K, 2>(q + r * n_in, dxp + r * blocks, sxp + r * blocks, wp + p * panel_bytes,
                      yp + r * n_out + p * kPanel, n_in, n_out, cols);
      if (r < rows)
        tile_i8<K, 1>(q + r * n_in, dxp + r * blocks, sxp + r * blocks, wp + p * panel_bytes,
                      yp + r * n_out + p * kPanel, n_in, n_out, cols);
    });
    return;
  }
#endif
  if (rows > kDequantizeAbove) {
    // Many rows (prefill, large batches): each panel dequantized once into a float panel that stays in L2 while
    // every tile of rows multiplies it, instead of widening its codes again for every tile.
    maxjax::parallel_for(pool, panels, [=](int64_t p) {
      thread_local std::vector<float> panel;
      panel.resize(n_in * kPanel);
      dequantize_panel<K>(wp + p * panel_bytes, panel.data(), blocks);
      const int cols = static_cast<int>(std::min<int64_t>(kPanel, n_out - p * kPanel));
      maxjax::float_panel_product(xp, panel.data(), yp + p * kPanel, rows, n_in, n_out, cols);
    });
    return;
  }
  std::vector<float> sums(Format<K>::kMin ? rows * blocks : 0);  // each row's sum over each block
  for (int64_t i = 0; i < static_cast<int64_t>(sums.size()); ++i) {
    const float* xs = xp + i * kBlock;
    float s = 0.0f;
    for (int k = 0; k < kBlock; ++k) s += xs[k];
    sums[i] = s;
  }
  const float* sx = sums.data();
  // One panel an item; its rows in tiles of nearly equal size, as project.cc.
  maxjax::parallel_for(pool, panels, [=](int64_t p) {
    const int cols = static_cast<int>(std::min<int64_t>(kPanel, n_out - p * kPanel));
    const int64_t tiles = (rows + kMR - 1) / kMR;
    for (int64_t t = 0, r = 0; t < tiles; ++t) {
      int n = static_cast<int>((rows - r) / (tiles - t));
      tile_for<K>(n, std::make_integer_sequence<int, kMR>{})(xp + r * n_in, sx + r * blocks, wp + p * panel_bytes,
                                                             yp + r * n_out + p * kPanel, n_in, n_out, cols);
      r += n;
    }
  });
}

ffi::Error QProject(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                    ffi::ResultBuffer<ffi::F32> y, int64_t kind, int64_t int8) {
  int64_t stride;
  if (int8 && !kInt8)
    return ffi::Error::InvalidArgument("maxjax_qproject: this build has no int8 path (maxjax_int8_activations)");
  if (int8 && kind != kQ4_0 && kind != kQ4_1 && kind != kQ4_K)
    return ffi::Error::InvalidArgument("maxjax_qproject: int8 activations are for Q4_0, Q4_1 and Q4_K panels");
  switch (kind) {
    case kQ8_0: stride = Format<kQ8_0>::kStride; break;
    case kQ4_0: stride = Format<kQ4_0>::kStride; break;
    case kQ4_1: stride = Format<kQ4_1>::kStride; break;
    case kQ4_K: stride = Format<kQ4_K>::kStride; break;
    case kQ5_K: stride = Format<kQ5_K>::kStride; break;
    case kQ6_K: stride = Format<kQ6_K>::kStride; break;
    default:
      return ffi::Error::InvalidArgument(
          "maxjax_qproject: kind is a ggml type: Q4_0 (2), Q4_1 (3), Q8_0 (8), Q4_K (12), Q5_K (13), Q6_K (14)");
  }
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto yd = y->dimensions();
  if (wd.size() != 3 || wd[2] != stride || xd.size() < 1 || xd.back() != wd[1] * kBlock ||
      yd.size() != xd.size() || yd.back() > wd[0] * kPanel)
    return ffi::Error::InvalidArgument(
        "maxjax_qproject: x [..., in], w [panels, in / 32, stride of this kind and panel width], y [..., out]");
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < xd.size(); ++i) rows *= xd[i];
  const int64_t n_in = xd.back(), n_out = yd.back();
  if (rows == 0 || n_out == 0) return ffi::Error::Success();
  const float* xp = x.typed_data();
  const uint8_t* wp = w.typed_data();
  float* yp = y->typed_data();
  if (n_in == 0) {
    std::fill(yp, yp + rows * n_out, 0.0f);
    return ffi::Error::Success();
  }
  switch (kind) {
    case kQ8_0: run<kQ8_0>(pool, xp, wp, yp, rows, n_in, n_out, false); break;
    case kQ4_0: run<kQ4_0>(pool, xp, wp, yp, rows, n_in, n_out, int8 != 0); break;
    case kQ4_K: run<kQ4_K>(pool, xp, wp, yp, rows, n_in, n_out, int8 != 0); break;
    case kQ5_K: run<kQ5_K>(pool, xp, wp, yp, rows, n_in, n_out, false); break;
    case kQ6_K: run<kQ6_K>(pool, xp, wp, yp, rows, n_in, n_out, false); break;
    default: run<kQ4_1>(pool, xp, wp, yp, rows, n_in, n_out, int8 != 0); break;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxjaxQProject, QProject,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kind")
                                  .Attr<int64_t>("int8"));

// Whether this build can multiply Q4_* with int8 activations (the `int8` attribute; maxjax asks before packing).
extern "C" int maxjax_int8_activations() { return kInt8 ? 1 : 0; }
