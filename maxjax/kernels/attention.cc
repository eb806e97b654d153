// maxjax_paged_past: the part of paged attention that reads the KV pool, on CPU. For each batch row and KV
// head, the queries of that head's group continue an online softmax (running max, sum and output, handed in
// from the new tokens' part, which the graph computes) over the row's cached past, page by page, straight from
// the pool: no gathered copy of the pages, one pass over the past per (row, KV head).
//
// Why: XLA:CPU gathers the pages on one thread at ~7 GB/s, then transposes them, and the step's attention cost
// more than its KV bytes by 4-5x at batch 8 (docs/design.md). Layouts are the graph's (maxjax/models/layers.py):
//   q       [B, K, M, E]   float32, already scaled; M = new tokens x query heads per KV head
//   k pool  [L, N, K, E, S] keys transposed inside a page of S tokens; v pool [L, N, K, S, E]
//   table   [B, P] int32 pages of each row; past [B] int32 cached tokens; qpos [B, M] int32 query positions
//   m, l    [B, K, M] running max and sum; o [B, K, M, E] running (unnormalized) output: in, and out updated.
// Attributes: layer, window (0: none; key visible when qpos - kpos < window), softcap (0: none).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Args {
  const float *q, *k, *v, *m_in, *l_in, *o_in;
  const int32_t *table, *past, *qpos;
  float *m_out, *l_out, *o_out;
  int64_t B, K, M, E, N, S, P, layer, window;
  float softcap;
};

// One (row, KV head): every query of the group over the row's past.
void attend(const Args& a, int64_t b, int64_t kh) {
  const int64_t M = a.M, E = a.E, S = a.S;
  const int64_t base = (b * a.K + kh) * M;
  float* m_run = a.m_out + base;
  float* l_run = a.l_out + base;
  float* o_run = a.o_out + base * E;
  std::memcpy(m_run, a.m_in + base, M * sizeof(float));
  std::memcpy(l_run, a.l_in + base, M * sizeof(float));
  std::memcpy(o_run, a.o_in + base * E, M * E * sizeof(float));
  const float* q = a.q + base * E;
  const int32_t* qpos = a.qpos + b * M;
  const int64_t past = std::max<int32_t>(0, a.past[b]);
  const int64_t pages = std::min<int64_t>(a.P, (past + S - 1) / S);
  std::vector<float> score(S);
  for (int64_t j = 0; j < pages; ++j) {
    const int64_t page = a.table[b * a.P + j];
    if (page < 0 || page >= a.N) continue;  // never happens for tables the scheduler builds
    const int64_t offset = ((a.layer * a.N + page) * a.K + kh) * E * S;
    const float* kp = a.k + offset;  // [E, S]
    const float* vp = a.v + offset;  // [S, E]
    const int64_t valid = std::min<int64_t>(S, past - j * S);
    for (int64_t m = 0; m < M; ++m) {
      const float* qm = q + m * E;
      float* sc = score.data();
      for (int64_t s = 0; s < S; ++s) sc[s] = 0.0f;
      for (int64_t e = 0; e < E; ++e) {
        const float qe = qm[e];
        const float* row = kp + e * S;
        for (int64_t s = 0; s < S; ++s) sc[s] += qe * row[s];
      }
      float block_max = -INFINITY;
      int64_t first = 0;
      if (a.window > 0) first = std::clamp<int64_t>(qpos[m] - a.window + 1 - j * S, 0, valid);
      for (int64_t s = first; s < valid; ++s) {
        if (a.softcap > 0.0f) sc[s] = std::tanh(sc[s] / a.softcap) * a.softcap;
        block_max = std::max(block_max, sc[s]);
      }
      if (first >= valid) continue;
      const float new_max = std::max(m_run[m], block_max);
      const float correction = std::exp(m_run[m] - new_max);
      float* om = o_run + m * E;
      float sum = l_run[m] * correction;
      for (int64_t e = 0; e < E; ++e) om[e] *= correction;
      for (int64_t s = first; s < valid; ++s) {
        const float p = std::exp(sc[s] - new_max);
        sum += p;
        const float* vs = vp + s * E;
        for (int64_t e = 0; e < E; ++e) om[e] += p * vs[e];
      }
      l_run[m] = sum;
      m_run[m] = new_max;
    }
  }
}

ffi::Error PagedPast(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> past,
                     ffi::Buffer<ffi::S32> qpos, ffi::Buffer<ffi::F32> m_in, ffi::Buffer<ffi::F32> l_in,
                     ffi::Buffer<ffi::F32> o_in, int64_t layer, int64_t window, float softcap,
                     ffi::ResultBuffer<ffi::F32> m_out, ffi::ResultBuffer<ffi::F32> l_out,
                     ffi::ResultBuffer<ffi::F32> o_out) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), td = table.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || vd.size() != 5 || td.size() != 2 || kd[2] != qd[1] ||
      kd[3] != qd[3] || vd[3] != kd[4] || vd[4] != qd[3] || td[0] != qd[0] || layer < 0 || layer >= kd[0])
    return ffi::Error::InvalidArgument("maxjax_paged_past: q [B,K,M,E], k [L,N,K,E,S], v [L,N,K,S,E], table [B,P]");
  const Args a{q.typed_data(), k.typed_data(), v.typed_data(), m_in.typed_data(), l_in.typed_data(),
               o_in.typed_data(), table.typed_data(), past.typed_data(), qpos.typed_data(), m_out->typed_data(),
               l_out->typed_data(), o_out->typed_data(), qd[0], qd[1], qd[2], qd[3], kd[1], kd[4], td[1], layer,
               window, softcap};
  maxjax::parallel_for(pool, a.B * a.K, [a](int64_t i) { attend(a, i / a.K, i % a.K); });  // one (row, KV head)
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxjaxPagedPast, PagedPast,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("layer")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("softcap")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// maxjax_reserve: a KV pool that is reserved, not filled. XLA allocates the result (a fresh mapping for a buffer
// this large, so the OS backs a page only when it is first written) and this handler leaves it alone: a pool of
// many GiB costs nothing at start-up and becomes resident as requests write it. Nothing reads a slot before a
// step wrote it: attention stops at each row's cached length, and padding writes go to page 0.
static ffi::Error Reserve(ffi::Result<ffi::AnyBuffer>) { return ffi::Error::Success(); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxjaxReserve, Reserve, ffi::Ffi::Bind().Ret<ffi::AnyBuffer>());
