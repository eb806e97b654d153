// The panel shape of maxjax's projection kernels (project.cc, qproject.cc) and the float tile both run: lanes per
// vector and vectors per panel row, chosen once here so both pack weights into the same panel width
// (`Kernels.panel`), and `float_tile`, the product of a few rows of x with one float32 panel [in, P].
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>

namespace maxjax {

#if defined(__AVX512F__)
constexpr int kLanes = 16, kNV = 2;
#elif defined(__AVX__)
constexpr int kLanes = 8, kNV = 2;
#elif defined(__aarch64__)
constexpr int kLanes = 4, kNV = 4;
#else
constexpr int kLanes = 4, kNV = 2;
#endif
constexpr int kPanel = kLanes * kNV;

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

// Rows per float tile: MR * NV accumulators + NV weight vectors + 1 broadcast must fit the register file (AVX2
// 16, AVX-512 and NEON 32).
#if defined(__AVX512F__)
constexpr int kFloatMR = 12;
#elif defined(__AVX__)
constexpr int kFloatMR = 6;
#elif defined(__aarch64__)
constexpr int kFloatMR = 6;
#else
constexpr int kFloatMR = 4;
#endif
constexpr int64_t kPrefetchFloats = 1024;  // 4 KiB ahead in the panel stream (none: 10-20% slower at 8 rows)

inline Vec load_vec(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

// y[r, 0:cols) for r < R: R rows of x (stride n_in) times one panel wp [n_in, kPanel]; y's row stride n_out.
// For each i, the panel's P weights (NV vectors) meet x[r, i] broadcast for the R rows, into R x NV register
// sums: no horizontal sums, and the panel streams once per tile.
template <int R>
void float_tile(const float* x, const float* wp, float* y, int64_t n_in, int64_t n_out, int cols) {
  Vec acc[R][kNV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kNV; ++v) acc[r][v] = Vec{};
  for (int64_t i = 0; i < n_in; ++i) {
    const float* row = wp + i * kPanel;
    Vec wv[kNV];
    for (int v = 0; v < kNV; ++v) wv[v] = load_vec(row + v * kLanes);
    __builtin_prefetch(row + kPrefetchFloats, 0, 3);
    for (int r = 0; r < R; ++r) {
      const float xs = x[r * n_in + i];  // vector * scalar broadcasts it (`Vec{} + xs` would add a real 0.0)
      for (int v = 0; v < kNV; ++v) acc[r][v] += wv[v] * xs;
    }
  }
  for (int r = 0; r < R; ++r) {
    if (cols == kPanel) {
      std::memcpy(y + r * n_out, acc[r], sizeof(acc[r]));
    } else {
      float full[kPanel];
      std::memcpy(full, acc[r], sizeof(full));
      std::memcpy(y + r * n_out, full, cols * sizeof(float));
    }
  }
}

using FloatTileFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int);

template <int... Rs>
FloatTileFn float_tile_for(int rows, std::integer_sequence<int, Rs...>) {
  static constexpr FloatTileFn fns[] = {float_tile<Rs + 1>...};
  return fns[rows - 1];
}

// All `rows` rows of x times one float panel, in tiles of nearly equal size (8 rows: 4 + 4, not 6 + 2: a 2-row
// tile waits on its few sums).
inline void float_panel_product(const float* x, const float* wp, float* y, int64_t rows, int64_t n_in,
                                int64_t n_out, int cols) {
  const int64_t tiles = (rows + kFloatMR - 1) / kFloatMR;
  for (int64_t t = 0, r = 0; t < tiles; ++t) {
    int n = static_cast<int>((rows - r) / (tiles - t));
    float_tile_for(n, std::make_integer_sequence<int, kFloatMR>{})(x + r * n_in, wp, y + r * n_out, n_in, n_out,
                                                                    cols);
    r += n;
  }
}

}  // namespace maxjax
