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

#include "panel.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using maxjax::kPanel;

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
  // One panel an item (panel.h's float tile).
  maxjax::parallel_for(pool, (n_out + kPanel - 1) / kPanel, [=](int64_t p) {
    const int cols = static_cast<int>(std::min<int64_t>(kPanel, n_out - p * kPanel));
    maxjax::float_panel_product(xp, wp + p * n_in * kPanel, yp + p * kPanel, rows, n_in, n_out, cols);
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
