// maxjax_project: y[r, o] = sum_i x[r, i] * W[o, i] on CPU, with W packed into panels of P output columns:
// w[p, i, j] = W[p * P + j, i] (the last panel zero-padded). maxjax/kernels/__init__.py packs and builds it.
//
// Why: XLA:CPU's matmul and reduction kernels read a [out, in] float32 weight matrix at well under the memory's
// rate when the few rows of a decode step multiply it, and each form it has needs a horizontal sum per output.
// A panel turns the product into the inner kernel of a GEMM: for each i, P weights (NV vectors, read once,
// contiguously) meet x[r, i] broadcast for MR rows, into MR x NV accumulators that stay in registers for the
// whole of `in`; no horizontal sums, and the weights stream from memory exactly once a call while the panel
// stays in L1/L2 for the next MR rows. docs/design.md has the figures.
//
// Work is split by panels among the calling thread and XLA's intra-op pool (parallel.h).
//
// Written with GCC/Clang vector extensions, so the one source builds for AVX-512, AVX2 or NEON with
// -march=native; maxjax falls back to XLA's own forms where it cannot build it.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#include "panel.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Lanes per vector, vectors per panel row (NV) and rows per tile (MR): MR * NV accumulators + NV weight vectors
// + 1 broadcast must fit the register file (AVX2 16, AVX-512 and NEON 32).
using maxjax::kLanes, maxjax::kNV, maxjax::kPanel, maxjax::Vec;
#if defined(__AVX512F__)
constexpr int kMR = 12;
#elif defined(__AVX__)
constexpr int kMR = 6;
#elif defined(__aarch64__)
constexpr int kMR = 6;
#else
constexpr int kMR = 4;
#endif
constexpr int64_t kPrefetchFloats = 1024;  // 4 KiB ahead in the panel stream (none: 10-20% slower at 8 rows)

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

// y[r, 0:cols) for r < R: R rows of x (stride n_in) times one panel wp [n_in, kPanel]; y's row stride n_out.
template <int R>
void tile(const float* x, const float* wp, float* y, int64_t n_in, int64_t n_out, int cols) {
  Vec acc[R][kNV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kNV; ++v) acc[r][v] = Vec{};
  for (int64_t i = 0; i < n_in; ++i) {
    const float* row = wp + i * kPanel;
    Vec wv[kNV];
    for (int v = 0; v < kNV; ++v) wv[v] = load(row + v * kLanes);
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

using TileFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int);

template <int... Rs>
TileFn tile_for(int rows, std::integer_sequence<int, Rs...>) {
  static constexpr TileFn fns[] = {tile<Rs + 1>...};
  return fns[rows - 1];
}

ffi::Error Project(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto yd = y->dimensions();
  if (wd.size() != 3 || wd[2] != kPanel || xd.size() < 1 || xd.back() != wd[1] || yd.size() != xd.size() ||
      yd.back() > wd[0] * kPanel)
    return ffi::Error::InvalidArgument("maxjax_project: x [..., in], w [panels, in, panel width], y [..., out]");
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < xd.size(); ++i) rows *= xd[i];
  const int64_t n_in = wd[1], n_out = yd.back();
  if (rows == 0 || n_out == 0) return ffi::Error::Success();
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  // One panel an item; its rows in tiles of nearly equal size (8 rows: 4 + 4, not 6 + 2: a 2-row tile waits on
  // its few sums).
  maxjax::parallel_for(pool, (n_out + kPanel - 1) / kPanel, [=](int64_t p) {
    const int cols = static_cast<int>(std::min<int64_t>(kPanel, n_out - p * kPanel));
    const int64_t tiles = (rows + kMR - 1) / kMR;
    for (int64_t t = 0, r = 0; t < tiles; ++t) {
      int n = static_cast<int>((rows - r) / (tiles - t));
      tile_for(n, std::make_integer_sequence<int, kMR>{})(xp + r * n_in, wp + p * n_in * kPanel,
                                                          yp + r * n_out + p * kPanel, n_in, n_out, cols);
      r += n;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxjaxProject, Project,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The panel width this build packs for (maxjax asks before packing any weight).
extern "C" int maxjax_panel_width() { return kPanel; }
