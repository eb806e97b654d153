// The vector shape of maxjax's projection kernels (project.cc, qproject.cc): lanes per vector and vectors per
// panel row, chosen once here so both pack weights into the same panel width (`Kernels.panel`). Each kernel picks
// its own rows per tile (MR): MR * NV accumulators, plus what it streams, must fit the register file.
#pragma once

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

}  // namespace maxjax
