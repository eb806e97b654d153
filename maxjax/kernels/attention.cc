// Paged attention on CPU, reading the KV pool in place (no gathered copy of the pages). Two handlers:
//   maxjax_paged_attention: the whole of it for one step: each query over its row's cached past and the step's
//     new tokens (causally), normalized. The graph's form wherever the pool's pages and the head width are whole
//     vectors and no image asks for a two-way mask.
//   maxjax_paged_past: only the past, continuing an online softmax the graph began over the new tokens (running
//     max, sum and unnormalized output in, updated out); for the rest (an image's mask, odd page sizes).
// Both walk the keys a block at a time (`kBlockKeys`, whole pages) for a tile of queries (`kQueryTile`) together:
// register tiles of queries x keys for the scores, a vector exp for the online softmax, register tiles of queries
// x head width for the values, so a block's keys and values are read once per tile. A work item is one (row, KV
// head, query tile), so one long prompt spreads over every core.
//
// Why: XLA:CPU gathers the pages on one thread at ~7 GB/s, then transposes them; its new-token part is a full
// square of scores the causal mask throws half of away; and one query at a time over a page reads the page once
// per query (docs/design.md has the figures). Layouts are the graph's (maxjax/models/layers.py):
//   q       [B, K, M, E]   float32, already scaled; M = new tokens x query heads per KV head (token-major)
//   k pool  [L, N, K, E, S] keys transposed inside a page of S tokens; v pool [L, N, K, S, E]
//   table   [B, P] int32 pages of each row; past [B] int32 cached tokens; qpos [B, M] int32 query positions
//   k new   [B, K, E, T]  the step's keys, transposed; v new [B, K, T, E]
//   m, l    [B, K, M] running max and sum; o [B, K, M, E] running (unnormalized) output (maxjax_paged_past)
// Attributes: layer, window (0: none; key visible when qpos - kpos < window), softcap (0: none).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "panel.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using maxjax::kFloatMR;
using maxjax::kLanes;
using maxjax::load_vec;
using maxjax::Vec;

struct Args {
  const float *q, *k, *v, *m_in, *l_in, *o_in, *k_new, *v_new;
  const int32_t *table, *past, *qpos;
  float *m_out, *l_out, *o_out;
  int64_t B, K, M, E, N, S, P, T, T_pad, layer, window;
  float softcap;
};

// The scalar form, one query at a time, for pools whose page size or head width is not a whole number of vectors:
// every query of the group of one (row, KV head) over the row's past.
void attend_scalar(const Args& a, int64_t b, int64_t kh) {
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

// exp(x) for x <= 0 (scores less their running max), 0 below about -88: 2^n by the exponent bits times a degree-6
// Taylor polynomial of 2^f, |f| <= 1/2 (relative error 1.2e-7).
inline Vec exp_nonpositive(Vec x) {
  typedef int32_t IVec __attribute__((vector_size(sizeof(Vec))));
  const Vec lo = Vec{} - 127.0f;
  Vec t = x * 1.44269504f;
  const IVec below = t < lo;
  t = (Vec)((below & (IVec)lo) | (~below & (IVec)t));
  const Vec n = (t + 12582912.0f) - 12582912.0f;  // round to nearest: 1.5 * 2^23
  const Vec f = (t - n) * 0.693147181f;
  Vec p = f * (1.0f / 720) + 1.0f / 120;
  p = p * f + 1.0f / 24;
  p = p * f + 1.0f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;  // n = -127: 0, so exp is 0
  return p * (Vec)bits;
}

// Scores of R queries (rows of q, stride E) against NV vectors of keys, k [E, stride]:
// s[r, 0 : NV lanes) = q_r . k[:, 0 : NV lanes), rows of s `ls` apart.
template <int R, int NV>
void score_tile(const float* q, const float* k, float* s, int64_t E, int64_t stride, int64_t ls) {
  Vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec{};
  for (int64_t e = 0; e < E; ++e) {
    Vec kv[NV];
    for (int v = 0; v < NV; ++v) kv[v] = load_vec(k + e * stride + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const float qs = q[r * E + e];
      for (int v = 0; v < NV; ++v) acc[r][v] += kv[v] * qs;
    }
  }
  for (int r = 0; r < R; ++r) std::memcpy(s + r * ls, acc[r], sizeof(acc[r]));
}

// The block's values into R rows of the running output, columns [c, c + NV lanes): o_r = o_r * scale_r +
// sum over the block's keys of p[r, key] v[key]; run j: `count[j]` values [count, E] from column offset[j] of p.
template <int R, int NV>
void value_tile(const float* p, int64_t lp, const float* const* v, const int64_t* count, const int64_t* offset,
                int64_t runs, int64_t E, const float* scale, float* o) {
  Vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < NV; ++w) acc[r][w] = load_vec(o + r * E + w * kLanes) * scale[r];
  for (int64_t j = 0; j < runs; ++j) {
    const float* pj = p + offset[j];
    for (int64_t s = 0; s < count[j]; ++s) {
      Vec vv[NV];
      for (int w = 0; w < NV; ++w) vv[w] = load_vec(v[j] + s * E + w * kLanes);
      for (int r = 0; r < R; ++r) {
        const float ps = pj[r * lp + s];
        for (int w = 0; w < NV; ++w) acc[r][w] += vv[w] * ps;
      }
    }
  }
  for (int r = 0; r < R; ++r) std::memcpy(o + r * E, acc[r], sizeof(acc[r]));
}

// R queries' scores against one run's `width` keys (whole vectors), two vectors at a time.
template <int R>
void score_rows(const float* q, const float* k, float* s, int64_t E, int64_t stride, int64_t ls, int64_t width) {
  int64_t c = 0;
  for (; c + 2 * kLanes <= width; c += 2 * kLanes) score_tile<R, 2>(q, k + c, s + c, E, stride, ls);
  if (c < width) score_tile<R, 1>(q, k + c, s + c, E, stride, ls);
}

struct Run;

using ScoreRowsFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t);
using ValueRowsFn = void (*)(const float*, int64_t, const Run*, int64_t, int64_t, const float*, float*);

template <int... Rs>
ScoreRowsFn score_rows_for(int rows, std::integer_sequence<int, Rs...>) {
  static constexpr ScoreRowsFn fns[] = {score_rows<Rs + 1>...};
  return fns[rows - 1];
}

template <int R>
void value_rows(const float* p, int64_t lp, const Run* runs, int64_t n_runs, int64_t E, const float* scale, float* o);

template <int... Rs>
ValueRowsFn value_rows_for(int rows, std::integer_sequence<int, Rs...>) {
  static constexpr ValueRowsFn fns[] = {value_rows<Rs + 1>...};
  return fns[rows - 1];
}

// Queries of one work item meet the keys a block at a time, whole pages of the past or `kBlockKeys` of the new.
constexpr int kMR = kFloatMR;            // query rows of one register tile (panel.h)
constexpr int64_t kQueryTile = 8 * kMR;  // 48 on AVX2, 96 on AVX-512
constexpr int64_t kBlockKeys = 128;

// One run of keys of a block: keys [E, stride] from its first column (`width` columns of the block's scores),
// values [count, E]; `count` <= width keys are real (a partial last page; 0 for a page outside the pool).
struct Run {
  const float *k, *v;
  int64_t stride, width, count;
};

// R rows of the running output, two vectors of columns at a time, over a block's runs (`value_tile`).
template <int R>
void value_rows(const float* p, int64_t lp, const Run* runs, int64_t n_runs, int64_t E, const float* scale,
                float* o) {
  const float* v[kBlockKeys];
  int64_t count[kBlockKeys], offset[kBlockKeys];
  for (int64_t j = 0, c = 0; j < n_runs; c += runs[j].width, ++j) count[j] = runs[j].count, offset[j] = c;
  for (int64_t c = 0; c < E; c += 2 * kLanes) {
    for (int64_t j = 0; j < n_runs; ++j) v[j] = runs[j].v + c;
    if (E - c >= 2 * kLanes)
      value_tile<R, 2>(p, lp, v, count, offset, n_runs, E, scale, o + c);
    else
      value_tile<R, 1>(p, lp, v, count, offset, n_runs, E, scale, o + c);
  }
}


// The running state of one tile of n queries (rows of q, positions qpos) and its scratch.
struct Tile {
  const float* q;
  const int32_t* qpos;
  int64_t n, lowest, highest;
  float *m_run, *l_run, *o_run;
  float *score, *scale;  // scratch: [n, block keys] and [n]
};

// The tile over one block: runs of keys at positions first, first + 1, ... (the block's columns in order).
void visit_block(const Args& a, Tile& t, const Run* runs, int64_t n_runs, int64_t first) {
  const int64_t E = a.E;
  int64_t lb = 0;
  for (int64_t j = 0; j < n_runs; ++j) lb += runs[j].width;
  const int64_t last = first + lb - 1;
  if (first > t.highest) return;                                 // all of it after every query: causal
  if (a.window > 0 && last <= t.lowest - a.window) return;       // all of it before every query's window
  for (int64_t r = 0; r < t.n; r += kMR) {
    const int rows = static_cast<int>(std::min<int64_t>(kMR, t.n - r));
    const auto tile = score_rows_for(rows, std::make_integer_sequence<int, kMR>{});
    for (int64_t j = 0, c = 0; j < n_runs; c += runs[j].width, ++j)
      if (runs[j].count > 0) tile(t.q + r * E, runs[j].k, t.score + r * lb + c, E, runs[j].stride, lb,
                                  runs[j].width);
  }
  for (int64_t m = 0; m < t.n; ++m) {
    float* sc = t.score + m * lb;
    const int64_t qp = t.qpos[m];
    const int64_t lo = a.window > 0 ? std::max<int64_t>(0, qp - a.window + 1 - first) : 0;
    const int64_t hi = std::min<int64_t>(lb, qp - first + 1);  // past keys: all; new ones: up to the query's own
    float block_max = -INFINITY;
    for (int64_t j = 0, c = 0; j < n_runs; c += runs[j].width, ++j) {
      const int64_t end = c + runs[j].count;  // the run's visible columns: [from, to)
      const int64_t from = std::clamp(lo, c, end), to = std::clamp(hi, from, end);
      std::fill(sc + c, sc + from, -INFINITY);
      for (int64_t s = from; s < to; ++s) {
        if (a.softcap > 0.0f) sc[s] = std::tanh(sc[s] / a.softcap) * a.softcap;
        block_max = std::max(block_max, sc[s]);
      }
      std::fill(sc + to, sc + c + runs[j].width, -INFINITY);
    }
    if (block_max == -INFINITY) {  // nothing of this block for this query
      t.scale[m] = 1.0f;
      std::fill(sc, sc + lb, 0.0f);
      continue;
    }
    const float new_max = std::max(t.m_run[m], block_max);
    t.scale[m] = std::exp(t.m_run[m] - new_max);
    Vec sum = Vec{};
    for (int64_t s = 0; s < lb; s += kLanes) {
      const Vec p = exp_nonpositive(load_vec(sc + s) - new_max);
      std::memcpy(sc + s, &p, sizeof(p));
      sum += p;
    }
    float total = 0.0f;
    for (int i = 0; i < kLanes; ++i) total += sum[i];
    t.l_run[m] = t.l_run[m] * t.scale[m] + total;
    t.m_run[m] = new_max;
  }
  for (int64_t r = 0; r < t.n; r += kMR) {
    const int rows = static_cast<int>(std::min<int64_t>(kMR, t.n - r));
    value_rows_for(rows, std::make_integer_sequence<int, kMR>{})(t.score + r * lb, lb, runs, n_runs, E,
                                                                 t.scale + r, t.o_run + r * E);
  }
}

// Queries [m0, m1) of row b, KV head kh: over the row's past, a block of pages at a time, then (`a.k_new`) over
// the step's new tokens, `kBlockKeys` at a time.
void attend(const Args& a, int64_t b, int64_t kh, int64_t m0, int64_t m1) {
  const int64_t E = a.E, S = a.S, n = m1 - m0;
  const int64_t base = (b * a.K + kh) * a.M + m0;
  thread_local std::vector<float> score, scale;  // each thread's scratch, kept between calls (decode's many items)
  score.resize(n * std::max<int64_t>(kBlockKeys, S));
  scale.resize(n);
  Tile t{a.q + base * E, a.qpos + b * a.M + m0, n, 0, 0, a.m_out + base, a.l_out + base, a.o_out + base * E,
         score.data(), scale.data()};
  t.lowest = *std::min_element(t.qpos, t.qpos + n);
  t.highest = *std::max_element(t.qpos, t.qpos + n);
  if (a.k_new) {  // a fresh softmax
    std::fill(t.m_run, t.m_run + n, -INFINITY);
    std::fill(t.l_run, t.l_run + n, 0.0f);
    std::fill(t.o_run, t.o_run + n * E, 0.0f);
  } else {
    std::memcpy(t.m_run, a.m_in + base, n * sizeof(float));
    std::memcpy(t.l_run, a.l_in + base, n * sizeof(float));
    std::memcpy(t.o_run, a.o_in + base * E, n * E * sizeof(float));
  }
  const int64_t past = std::max<int32_t>(0, a.past[b]);
  const int64_t pages = std::min<int64_t>(a.P, (past + S - 1) / S);
  const int64_t block_pages = std::max<int64_t>(1, kBlockKeys / S);
  Run runs[kBlockKeys];
  for (int64_t j0 = 0; j0 < pages; j0 += block_pages) {
    int64_t used = 0;
    for (int64_t j = j0; j < std::min(pages, j0 + block_pages); ++j, ++used) {
      const int64_t page = a.table[b * a.P + j];
      const bool ok = page >= 0 && page < a.N;  // always, for tables the scheduler builds
      const int64_t offset = ((a.layer * a.N + (ok ? page : 0)) * a.K + kh) * E * S;
      runs[used] = Run{a.k + offset, a.v + offset, S, S, ok ? std::min<int64_t>(S, past - j * S) : 0};
    }
    visit_block(a, t, runs, used, j0 * S);
  }
  if (a.k_new) {
    const float* kn = a.k_new + (b * a.K + kh) * E * a.T;
    thread_local std::vector<float> padded;
    if (a.T_pad != a.T) {  // a decode step's one key (or a few): copied into whole vectors of columns, zeros after
      padded.assign(E * a.T_pad, 0.0f);
      for (int64_t e = 0; e < E; ++e) std::copy(kn + e * a.T, kn + (e + 1) * a.T, padded.data() + e * a.T_pad);
      kn = padded.data();
    }
    const float* vn = a.v_new + (b * a.K + kh) * a.T * E;
    for (int64_t u = 0; u < a.T; u += kBlockKeys) {
      const int64_t width = std::min(kBlockKeys, a.T_pad - u);
      runs[0] = Run{kn + u, vn + u * E, a.T_pad, width, std::min(width, a.T - u)};
      visit_block(a, t, runs, 1, past + u);
    }
    for (int64_t m = 0; m < n; ++m) {  // every query sees at least itself: l > 0
      const float inv = 1.0f / t.l_run[m];
      for (int64_t e = 0; e < E; ++e) t.o_run[m * E + e] *= inv;
    }
  }
}

// Every (row, KV head, query tile) of the step, shared among the cores.
void attend_all(ffi::ThreadPool& pool, const Args& a) {
  const int64_t tiles = (a.M + kQueryTile - 1) / kQueryTile;
  maxjax::parallel_for(pool, a.B * a.K * tiles, [&a, tiles](int64_t i) {
    const int64_t m0 = i % tiles * kQueryTile, bk = i / tiles;
    attend(a, bk / a.K, bk % a.K, m0, std::min(a.M, m0 + kQueryTile));
  });
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
               o_in.typed_data(), nullptr, nullptr, table.typed_data(), past.typed_data(), qpos.typed_data(),
               m_out->typed_data(), l_out->typed_data(), o_out->typed_data(), qd[0], qd[1], qd[2], qd[3], kd[1],
               kd[4], td[1], 0, 0, layer, window, softcap};
  if (a.S % kLanes != 0 || a.E % kLanes != 0) {
    maxjax::parallel_for(pool, a.B * a.K, [&a](int64_t i) { attend_scalar(a, i / a.K, i % a.K); });
  } else {
    attend_all(pool, a);
  }
  return ffi::Error::Success();
}

ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_new,
                          ffi::Buffer<ffi::F32> v_new, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                          ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> past, ffi::Buffer<ffi::S32> qpos,
                          int64_t layer, int64_t window, float softcap, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), td = table.dimensions();
  auto knd = k_new.dimensions(), vnd = v_new.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || vd.size() != 5 || td.size() != 2 || knd.size() != 4 ||
      vnd.size() != 4 || kd[2] != qd[1] || kd[3] != qd[3] || vd[3] != kd[4] || vd[4] != qd[3] || td[0] != qd[0] ||
      knd[0] != qd[0] || knd[1] != qd[1] || knd[2] != qd[3] || vnd[0] != qd[0] || vnd[1] != qd[1] ||
      vnd[3] != qd[3] || knd[3] != vnd[2] || kd[4] % kLanes != 0 || qd[3] % kLanes != 0 ||
      layer < 0 || layer >= kd[0])
    return ffi::Error::InvalidArgument(
        "maxjax_paged_attention: q [B,K,M,E], k_new [B,K,E,T], v_new [B,K,T,E], k [L,N,K,E,S], v [L,N,K,S,E], "
        "table [B,P]; S and E whole vectors");
  std::vector<float> m_run(q.element_count() / qd[3]), l_run(m_run.size());
  const Args a{q.typed_data(), k.typed_data(), v.typed_data(), nullptr, nullptr, nullptr, k_new.typed_data(),
               v_new.typed_data(), table.typed_data(), past.typed_data(), qpos.typed_data(), m_run.data(),
               l_run.data(), out->typed_data(), qd[0], qd[1], qd[2], qd[3], kd[1], kd[4], td[1], vnd[2],
               (vnd[2] + kLanes - 1) / kLanes * kLanes,
               layer, window, softcap};
  attend_all(pool, a);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxjaxPagedAttention, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("layer")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("softcap")
                                  .Ret<ffi::Buffer<ffi::F32>>());

// maxjax_reserve: a KV pool that is reserved, not filled. XLA allocates the result (a fresh mapping for a buffer
// this large, so the OS backs a page only when it is first written) and this handler leaves it alone: a pool of
// many GiB costs nothing at start-up and becomes resident as requests write it. Nothing reads a slot before a
// step wrote it: attention stops at each row's cached length, and padding writes go to page 0.
static ffi::Error Reserve(ffi::Result<ffi::AnyBuffer>) { return ffi::Error::Success(); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxjaxReserve, Reserve, ffi::Ffi::Bind().Ret<ffi::AnyBuffer>());
