// The native CPU kernel of fused_cosloss: the mixed loss of docs/spec.md,
//   loss_n = alpha * (1 - cos_n) + (1 - alpha) * ce_n,
// computed per row (position) and differentiated by hand. Python (native.py)
// calls forward() and backward() through the shared KernelRowsFunction (autograd.py);
// alpha and the reduction live in the caller's coefficients grad_ce / grad_cos.
//
// Forward, per valid row n (rows split over threads with at::parallel_for):
//   1. one pass over z_n (from memory): per-block maxima (blocks of `bs` logits),
//      the row max m and a NaN check;
//   2. sum exp(z - m) from L2 (vexp, an inlined vectorised exp): logsum = log sum exp(z - m),
//      ce = logsum - (z_y - m) (relative to the max, as log_softmax: never through
//      lse = m + logsum, whose rounding to the precision of |m| would reach ce and dz),
//      argmax == label;
//   3. top-k by selection: the k-th largest block maximum t0 is a lower bound of
//      the k-th largest logit, so only blocks whose maximum is >= t0 are scanned
//      for candidates z >= t0 (about 1.2 k of them for random rows); the k-th best
//      candidate under (value desc, index asc) is found with nth_element, and S is
//      the candidates no worse than it, kept in vocabulary order (tie rule exact);
//   4. w = softmax(z_S / T); mu = sum w_i E[i] (the gather, skipping w_i == 0);
//      cos; g = dcos/dmu and g_e = dcos/de; s_i = E[i] . g while those rows are
//      still in cache; c_i = w_i (s_i - sum_j w_j s_j) / T.
//   Saved: stats [N,3] = (m, logsum, cos), idx [N,K] int32, w [N,K], c [N,K], g2 [N,2,H];
//   returned beside ce, cos and correct: lse = m + logsum.
// Loss options (docs/spec.md, "Loss options"; each skipped entirely when off): with a logit
//   scale or a soft-cap the row is transformed, z' = c tanh(s z / c), into the row buffer before
//   pass 1, and everything above reads z' (max, ce, S and its tie rule, w, argmax); label
//   smoothing adds sum_v (z'_v - m) to pass 2: ce = logsum - (1 - eps)(z'_y - m) - eps mean(z' - m).
// Backward:
//   dz_n = grad_ce_n * (exp((z_n - m_n) - logsum_n) - onehot(y_n)), plus grad_cos_n * c at S,
//   built in L1-sized float tiles and written once per element with streaming stores;
//   with the options, z' is recomputed from z in registers as the tile is built, the
//   smoothing and lse terms join the dense term, which is multiplied by dz'/dz there, and
//   the terms at y and S are multiplied by dz'/dz at their entries (kept in L1 for them);
//   dE: the (vocabulary row, contribution) pairs grad_cos_n * w_{n,i} * g_n and
//   grad_cos_n * g_e,n are counting-sorted by vocabulary row (CSR, fixed order), then
//   each vocabulary row is summed by one thread in that order: deterministic and
//   independent of the number of threads, no atomics.
// Rows (and vocabulary rows) are processed in blocks of some tens of milliseconds; between
// blocks the calling thread lets Python handle a pending signal, so Ctrl-C interrupts a long
// call (KeyboardInterrupt) instead of waiting for it to return.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "mixed_loss_cpu.h"
#include "output_pool.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fcl {
namespace {

constexpr float kEps = 1e-12f;
// The embedding gather prefetches this many rows ahead (with prefetcht1, into L2:
// measured clearly faster here than prefetcht0 or no prefetch).
constexpr int64_t kPrefetchRows = 2;

// Opt-in (FUSED_COSLOSS_NATIVE_THP=1): ask Linux for transparent huge pages on the
// 2 MiB-aligned interior of a fresh, large output before its first touch. Faulting in
// 250 MB of gradients in 4 KiB pages costs tens of milliseconds of system time; with
// huge pages a few. Off by default: where THP defrag is "madvise" (common), a process
// that churns memory (a training step, or a benchmark alternating with other code)
// stalls in direct compaction instead, which measured about 2x slower here.
void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  static const bool enabled = [] {
    const char* v = std::getenv("FUSED_COSLOSS_NATIVE_THP");
    return v != nullptr && std::string(v) == "1";
  }();
  if (!enabled || bytes < static_cast<int64_t>(4 * kHuge)) return;
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// Work (in elements touched) per thread in one block of parallel_blocks: some tens of
// milliseconds, so that the fork/join per block costs nothing measurable (also on a loaded
// machine, where a descheduled thread delays every join) and Ctrl-C still acts at once.
constexpr int64_t kBlockWorkPerThread = int64_t{1} << 25;

// Ctrl-C: Python's own signal handler only records the signal; it is acted on when Python code
// runs again, i.e. after this call returns. The bindings keep the GIL, so the calling thread
// may run the pending handlers itself (PyErr_CheckSignals) and turn their exception
// (KeyboardInterrupt) into a C++ one that pybind11 raises again in Python.
void check_interrupt() {
  if (PyGILState_Check() && PyErr_CheckSignals() != 0) throw pybind11::error_already_set();
}

// at::parallel_for(0, n, grain, fn) in consecutive blocks of about kBlockWorkPerThread *
// threads elements of work (each item costing `item_work`; at least two grains per thread,
// so that every thread has work), checking for Ctrl-C between blocks, on the calling
// thread, outside any parallel region.
template <typename F>
void parallel_blocks(int64_t n, int64_t item_work, int64_t grain, const F& fn) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t block = std::max<int64_t>(2 * threads * grain,
                                          kBlockWorkPerThread * threads / std::max<int64_t>(1, item_work));
  for (int64_t b0 = 0; b0 < n; b0 += block) {
    at::parallel_for(b0, std::min(n, b0 + block), grain, fn);
    if (b0 + block < n) check_interrupt();
  }
}

struct Cand {
  float v;
  int32_t i;
};

// a ranks before b: larger value, then lower index.
inline bool better(const Cand& a, const Cand& b) {
  return a.v > b.v || (a.v == b.v && a.i < b.i);
}

int64_t block_size_for(int64_t vocab, int64_t k) {
  int64_t bs = (vocab / (3 * k)) / 16 * 16;
  return std::min<int64_t>(std::max<int64_t>(bs, 16), 512);
}

template <typename T>
inline const float* row_as_float(const T* src, int64_t n, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    to_float_row(src, buf.data(), n);
    return buf.data();
  }
}

struct Shapes {
  int64_t n, vocab, hidden, k, row_stride, bs, nblocks;
};

template <typename TL, typename TE>
struct ForwardRows {
  Shapes s;
  const TL* logits;
  const int64_t* labels;
  const TE* emb;
  float temperature;
  int64_t ignore_index;
  bool with_cos;
  LogitTransform transform;
  float smoothing;  // label smoothing epsilon; 0: off
  float* ce;
  float* cosv;
  bool* correct;
  float* lse;
  float* stats;
  int32_t* idx;
  float* w;
  float* c;
  float* g2;

  // thread-local scratch
  std::vector<float> zbuf, bmax, bsel, mu, ebuf, rowbuf, sv, sbuf;
  std::vector<Cand> cand, tmp;

  void init_scratch() {
    if (!std::is_same_v<TL, float> || transform.active()) zbuf.resize(s.vocab);
    bmax.resize(s.nblocks);
    bsel.resize(s.nblocks);
    if (with_cos) {
      mu.resize(s.hidden);
      ebuf.resize(s.hidden);
      if (!std::is_same_v<TE, float>) rowbuf.resize(s.hidden);
      sv.resize(s.k);
      sbuf.resize(s.k);
      cand.reserve(std::min<int64_t>(s.vocab, 8 * s.k + 1024));
    }
  }

  const float* emb_row(int64_t v, std::vector<float>& buf) const {
    const TE* p = emb + v * s.hidden;
    return row_as_float(p, s.hidden, buf);
  }

  void ignored_row(int64_t n) {
    ce[n] = 0.f;
    cosv[n] = 0.f;
    correct[n] = false;
    lse[n] = 0.f;
    stats[3 * n] = 0.f;
    stats[3 * n + 1] = 0.f;
    stats[3 * n + 2] = 0.f;
    if (with_cos) fill_saved_for_skipped_row(n, 0.f);
  }

  void fill_saved_for_skipped_row(int64_t n, float ge_value) {
    std::fill_n(idx + n * s.k, s.k, int32_t{-1});
    std::fill_n(w + n * s.k, s.k, 0.f);
    std::fill_n(c + n * s.k, s.k, 0.f);
    std::fill_n(g2 + n * 2 * s.hidden, s.hidden, 0.f);
    std::fill_n(g2 + (n * 2 + 1) * s.hidden, s.hidden, ge_value);
  }

  void run(int64_t n) {
    const int64_t y = labels[n];
    if (y == ignore_index) {
      ignored_row(n);
      return;
    }
    const int64_t V = s.vocab, bs = s.bs;
    const float* z = row_as_float(logits + n * s.row_stride, V, zbuf);
    if (transform.active()) {  // z' of the loss options, into the row buffer: everything below reads it
      transform.row(z, zbuf.data(), V);
      z = zbuf.data();
    }

    // Pass 1: block maxima, row max, NaN check.
    Vec nan_probe(-kInf);
    float m = -kInf;
    bool has_nan = false;
    for (int64_t b = 0; b < s.nblocks; ++b) {
      const int64_t lo = b * bs, hi = std::min(V, lo + bs);
      int64_t j = lo;
      float bm = -kInf;
      if (j + kVec <= hi) {
        Vec bv = Vec::loadu(z + j);
        for (j += kVec; j + kVec <= hi; j += kVec) bv = at::vec::maximum(bv, Vec::loadu(z + j));
        nan_probe = at::vec::maximum(nan_probe, bv);
        bm = hmax(bv);
      }
      for (; j < hi; ++j) {
        const float x = z[j];
        bm = x > bm ? x : bm;
        has_nan |= (x != x);
      }
      bmax[b] = bm;
      m = bm > m ? bm : m;
    }
    {
      float lanes[kVec];
      nan_probe.store(lanes);
      for (int64_t l = 0; l < kVec; ++l) has_nan |= std::isnan(lanes[l]);
    }
    if (has_nan) {
      nan_row(n, z, y);
      return;
    }

    // Pass 2: the log-sum relative to the max (torch.logsumexp's convention for an infinite max: shift 0).
    const float shift = std::isinf(m) ? 0.f : m;
    {
      float offsets = 0.f;  // sum_v (z_v - m), for the smoothing term only (skipped, not weighed by 0, without it)
      const float logsum = std::log(smoothing == 0.f ? sum_exp(z, shift) : sum_exp(z, shift, &offsets));
      if (smoothing == 0.f) {
        ce[n] = logsum - (z[y] - shift);
      } else {  // ce = logsum - (1 - eps) (z_y - m) - eps mean_v (z_v - m)
        ce[n] = logsum - (1.f - smoothing) * (z[y] - shift) - smoothing * (offsets / static_cast<float>(V));
      }
      lse[n] = shift + logsum;
      stats[3 * n] = shift;
      stats[3 * n + 1] = logsum;
    }
    correct[n] = is_first_max(z, y, m);

    if (!with_cos) {
      cosv[n] = 0.f;
      stats[3 * n + 2] = 0.f;
      return;
    }
    int32_t* S = idx + n * s.k;
    select_topk(z, S);
    cosine_row(n, z, y, m, S);
  }

  // sum_v exp(z_v - shift) over the row; with `offsets`, also sum_v (z_v - shift) there.
  float sum_exp(const float* z, float shift, float* offsets = nullptr) const {
    const int64_t V = s.vocab;
    const Vec sh(shift);
    Vec a0(0.f), a1(0.f);
    int64_t j = 0;
    if (offsets == nullptr) {
      for (; j + 2 * kVec <= V; j += 2 * kVec) {
        a0 = a0 + vexp(Vec::loadu(z + j) - sh);
        a1 = a1 + vexp(Vec::loadu(z + j + kVec) - sh);
      }
      for (; j + kVec <= V; j += kVec) a0 = a0 + vexp(Vec::loadu(z + j) - sh);
      float sum = hsum(a0 + a1);
      for (; j < V; ++j) sum += std::exp(z[j] - shift);
      return sum;
    }
    Vec d0(0.f), d1(0.f);
    for (; j + 2 * kVec <= V; j += 2 * kVec) {
      const Vec x0 = Vec::loadu(z + j) - sh, x1 = Vec::loadu(z + j + kVec) - sh;
      a0 = a0 + vexp(x0);
      a1 = a1 + vexp(x1);
      d0 = d0 + x0;
      d1 = d1 + x1;
    }
    for (; j + kVec <= V; j += kVec) {
      const Vec x0 = Vec::loadu(z + j) - sh;
      a0 = a0 + vexp(x0);
      d0 = d0 + x0;
    }
    float sum = hsum(a0 + a1), dsum = hsum(d0 + d1);
    for (; j < V; ++j) {
      sum += std::exp(z[j] - shift);
      dsum += z[j] - shift;
    }
    *offsets = dsum;
    return sum;
  }

  bool is_first_max(const float* z, int64_t y, float m) const {
    if (!(z[y] == m)) return false;
    const int64_t by = y / s.bs;
    for (int64_t b = 0; b < by; ++b)
      if (bmax[b] == m) return false;
    for (int64_t j = by * s.bs; j < y; ++j)
      if (z[j] == m) return false;
    return true;
  }

  void nan_row(int64_t n, const float* z, int64_t y) {
    // torch.argmax takes the first NaN as the maximum.
    int64_t first = 0;
    while (first < s.vocab && !(z[first] != z[first])) ++first;
    ce[n] = kNaN;
    lse[n] = kNaN;
    correct[n] = first == y;
    stats[3 * n] = kNaN;
    stats[3 * n + 1] = kNaN;
    cosv[n] = with_cos ? kNaN : 0.f;
    stats[3 * n + 2] = cosv[n];
    if (with_cos) fill_saved_for_skipped_row(n, kNaN);
  }

  // S <- the k largest of z (no NaN), lower index first among equal values, in index order.
  void select_topk(const float* z, int32_t* S) {
    const int64_t V = s.vocab, K = s.k, bs = s.bs;
    if (K >= V) {
      for (int64_t i = 0; i < V; ++i) {
        S[i] = static_cast<int32_t>(i);
        sv[i] = z[i];
      }
      return;
    }
    float t0 = -kInf;
    if (K <= s.nblocks) {
      std::copy(bmax.begin(), bmax.end(), bsel.begin());
      std::nth_element(bsel.begin(), bsel.begin() + (K - 1), bsel.end(), std::greater<float>());
      t0 = bsel[K - 1];
    }
    cand.clear();
    for (int64_t b = 0; b < s.nblocks; ++b) {
      if (!(bmax[b] >= t0)) continue;
      const int64_t lo = b * bs, hi = std::min(V, lo + bs);
      int64_t j = lo;
      for (; j + 16 <= hi; j += 16) {
        uint32_t mask = ge_mask16(z + j, t0);
        while (mask) {
          const int bit = __builtin_ctz(mask);
          mask &= mask - 1;
          cand.push_back({z[j + bit], static_cast<int32_t>(j + bit)});
        }
      }
      for (; j < hi; ++j)
        if (z[j] >= t0) cand.push_back({z[j], static_cast<int32_t>(j)});
    }
    const int64_t C = static_cast<int64_t>(cand.size());
    TORCH_INTERNAL_ASSERT(C >= K, "fused_cosloss native: top-k candidate bound failed");
    if (C == K) {
      for (int64_t i = 0; i < K; ++i) {
        S[i] = cand[i].i;
        sv[i] = cand[i].v;
      }
      return;
    }
    tmp.assign(cand.begin(), cand.end());
    std::nth_element(tmp.begin(), tmp.begin() + (K - 1), tmp.end(), better);
    const Cand kth = tmp[K - 1];
    int64_t o = 0;
    for (const Cand& x : cand) {
      if (x.v > kth.v || (x.v == kth.v && x.i <= kth.i)) {
        S[o] = x.i;
        sv[o] = x.v;
        ++o;
      }
    }
    TORCH_INTERNAL_ASSERT(o == K, "fused_cosloss native: top-k selection size mismatch");
  }

  void cosine_row(int64_t n, const float* z, int64_t y, float m, const int32_t* S) {
    const int64_t K = s.k, H = s.hidden;
    float* wn = w + n * K;
    float* cn = c + n * K;
    float* g = g2 + n * 2 * H;
    float* ge = g + H;

    // w = softmax(z_S / T), as exp((z - m) / T): subtracting before dividing keeps the
    // exponent's rounding error at eps |z - m| / T instead of eps |z| / T.
    float total = 0.f;
    for (int64_t i = 0; i < K; ++i) {
      sbuf[i] = (sv[i] - m) / temperature;
    }
    {
      int64_t i = 0;
      for (; i + kVec <= K; i += kVec) vexp(Vec::loadu(sbuf.data() + i)).store(sbuf.data() + i);
      for (; i < K; ++i) sbuf[i] = std::exp(sbuf[i]);
      for (i = 0; i < K; ++i) total += sbuf[i];
    }
    const float inv_total = 1.f / total;
    for (int64_t i = 0; i < K; ++i) wn[i] = sbuf[i] * inv_total;

    // mu = sum_i w_i E[S_i], prefetching the row kPrefetchRows ahead into L2.
    std::fill(mu.begin(), mu.end(), 0.f);
    const int64_t row_bytes = H * static_cast<int64_t>(sizeof(TE));
    for (int64_t i = 0; i < K; ++i) {
      if (wn[i] == 0.f) continue;
      if (i + kPrefetchRows < K) prefetch_to_l2(emb + static_cast<int64_t>(S[i + kPrefetchRows]) * H, row_bytes);
      axpy(wn[i], emb_row(S[i], rowbuf), mu.data(), H);
    }
    const float* e = emb_row(y, ebuf);
    const float dme = dot(mu.data(), e, H);
    const float nmu = std::sqrt(dot(mu.data(), mu.data(), H));
    const float ne = std::sqrt(dot(e, e, H));
    const float dmu = std::max(nmu, kEps), de = std::max(ne, kEps);
    const float cs = dme / (dmu * de);
    cosv[n] = cs;
    stats[3 * n + 2] = cs;

    // g = dcos/dmu = e / (|mu| |e|) - cos mu / |mu|^2 (norms clamped at eps, as autograd of clamp_min)
    const float a = 1.f / (dmu * de);
    const float b_mu = nmu >= kEps ? -cs / (nmu * dmu) : 0.f;
    const float b_e = ne >= kEps ? -cs / (ne * de) : 0.f;
    lincomb(a, e, b_mu, mu.data(), g, H);
    lincomb(a, mu.data(), b_e, e, ge, H);

    // s_i = E[S_i] . g, c_i = w_i (s_i - s_bar) / T; in reverse order, so that the rows
    // gathered last, the likeliest still in cache, come first.
    float sbar = 0.f;
    for (int64_t i = K - 1; i >= 0; --i) {
      if (wn[i] == 0.f) {
        sbuf[i] = 0.f;
        continue;
      }
      const float si = dot(g, emb_row(S[i], rowbuf), H);
      sbuf[i] = si;
      sbar += wn[i] * si;
    }
    for (int64_t i = 0; i < K; ++i) cn[i] = wn[i] == 0.f ? 0.f : wn[i] * (sbuf[i] - sbar) / temperature;
  }
};

void check_inputs(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& emb, int64_t k) {
  TORCH_CHECK(logits.device().is_cpu() && labels.device().is_cpu() && emb.device().is_cpu(),
              "fused_cosloss native: CPU tensors expected");
  TORCH_CHECK(logits.dim() == 2 && (logits.size(0) == 0 || logits.size(1) <= 1 || logits.stride(1) == 1),
              "fused_cosloss native: logits must be [N, V] with unit stride along V");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
              "fused_cosloss native: logits must be float32 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK(emb.scalar_type() == at::kFloat || emb.scalar_type() == at::kBFloat16,
              "fused_cosloss native: embedding must be float32 or bfloat16, got ", emb.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0) && labels.scalar_type() == at::kLong &&
                  labels.is_contiguous(),
              "fused_cosloss native: labels must be a contiguous int64 [N]");
  TORCH_CHECK(emb.dim() == 2 && emb.size(0) == logits.size(1) && emb.is_contiguous(),
              "fused_cosloss native: embedding must be a contiguous [V, H]");
  TORCH_CHECK(logits.size(1) >= 1 && logits.size(1) < (int64_t{1} << 31), "fused_cosloss native: V out of range");
  TORCH_CHECK(k >= 1 && k <= logits.size(1), "fused_cosloss native: k must be in [1, V], got ", k);
}

Shapes make_shapes(const at::Tensor& logits, const at::Tensor& emb, int64_t k) {
  Shapes s;
  s.n = logits.size(0);
  s.vocab = logits.size(1);
  s.hidden = emb.size(1);
  s.k = k;
  s.row_stride = s.n > 1 ? logits.stride(0) : s.vocab;
  s.bs = block_size_for(s.vocab, k);
  s.nblocks = (s.vocab + s.bs - 1) / s.bs;
  return s;
}

// The options arrive checked (validation.py); these only guard the kernel against a caller
// that skipped that: s > 0 finite, c = 0 (off) or > 0 finite, epsilon in [0, 1].
// Both in float32, where the kernel computes: a value that rounds to 0 or overflows is refused.
LogitTransform make_transform(double logit_scale, double softcap) {
  LogitTransform transform;
  transform.scale = static_cast<float>(logit_scale);
  transform.cap = static_cast<float>(softcap);
  TORCH_CHECK(std::isfinite(transform.scale) && transform.scale > 0,
              "fused_cosloss native: logit_scale must be > 0 and finite in float32, got ", logit_scale);
  TORCH_CHECK(softcap == 0 || (std::isfinite(transform.cap) && transform.cap > 0),
              "fused_cosloss native: softcap must be > 0 and finite in float32 (0: off), got ", softcap);
  return transform;
}

void check_smoothing(double label_smoothing) {
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing <= 1, "fused_cosloss native: label_smoothing must be in [0, 1]");
}

template <typename TL, typename TE>
void forward_dispatch(const Shapes& s, const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& emb,
                      double temperature, int64_t ignore_index, bool with_cos, const LogitTransform& transform,
                      float smoothing, std::vector<at::Tensor>& out) {
  ForwardRows<TL, TE> proto;
  proto.s = s;
  proto.logits = logits.data_ptr<TL>();
  proto.labels = labels.data_ptr<int64_t>();
  proto.emb = emb.data_ptr<TE>();
  proto.temperature = static_cast<float>(temperature);
  proto.ignore_index = ignore_index;
  proto.with_cos = with_cos;
  proto.transform = transform;
  proto.smoothing = smoothing;
  proto.ce = out[0].data_ptr<float>();
  proto.cosv = out[1].data_ptr<float>();
  proto.correct = out[2].data_ptr<bool>();
  proto.lse = out[3].data_ptr<float>();
  proto.stats = out[4].data_ptr<float>();
  proto.idx = with_cos ? out[5].data_ptr<int32_t>() : nullptr;
  proto.w = with_cos ? out[6].data_ptr<float>() : nullptr;
  proto.c = with_cos ? out[7].data_ptr<float>() : nullptr;
  proto.g2 = with_cos ? out[8].data_ptr<float>() : nullptr;
  const int64_t row_work = s.vocab + (with_cos ? 2 * s.k * s.hidden : 0);
  parallel_blocks(s.n, row_work, 1, [&](int64_t begin, int64_t end) {
    ForwardRows<TL, TE> worker = proto;
    worker.init_scratch();
    for (int64_t n = begin; n < end; ++n) worker.run(n);
  });
}

// Rows are produced in tiles of kTile logits in an L1-resident buffer: the dense term,
// then the sparse terms at y and at S (both in vocabulary order, merged in), and each
// tile is written to the gradient once, with streaming stores.
constexpr int64_t kTile = 2048;

// With the loss options (docs/spec.md, "Loss options"), per row: d/dz'_v = (grad_ce + grad_lse) p_v
// - grad_ce (1 - eps) [v == y] - grad_ce eps / V + the S term, p the softmax of z' (recomputed from z
// as each tile is built), and dz = dz' * dz'/dz, taken term by term. grad_lse: nullptr for no lse
// term.
template <typename TL>
void backward_logits(const Shapes& s, const at::Tensor& logits, const at::Tensor& labels, const float* stats,
                     const int32_t* idx, const float* c, const float* grad_ce, const float* grad_cos,
                     const float* grad_lse, const LogitTransform& transform, float smoothing, int64_t ignore_index,
                     bool with_cos, at::Tensor& dz) {
  const TL* lp = logits.data_ptr<TL>();
  TL* dp = dz.data_ptr<TL>();
  // dz may be the logits themselves (in place): each tile of z is read before its gradient
  // is written over it (bfloat16 rows are converted whole first), so that is safe
  const int64_t dz_stride = dz.stride(0);
  const int64_t* lab = labels.data_ptr<int64_t>();
  const int64_t V = s.vocab, K = s.k;
  parallel_blocks(s.n, V, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> zbuf(std::is_same_v<TL, float> ? 0 : V);
    alignas(64) float tile[kTile];
    alignas(64) TL out_tile[std::is_same_v<TL, float> ? 1 : kTile];
    alignas(64) float slope[kTile];  // dz'/dz of the tile, with the cap
    for (int64_t n = begin; n < end; ++n) {
      TL* drow = dp + n * dz_stride;
      const int64_t y = lab[n];
      if (y == ignore_index) {
        std::memset(static_cast<void*>(tile), 0, sizeof tile);
        for (int64_t t0 = 0; t0 < V; t0 += kTile)
          stream_bytes(drow + t0, tile, std::min(kTile, V - t0) * static_cast<int64_t>(sizeof(TL)));
        continue;
      }
      const float* z = row_as_float(lp + n * s.row_stride, V, zbuf);
      const float shift = stats[3 * n], logsum = stats[3 * n + 1];
      const float gce = grad_ce[n];
      const float gp = grad_lse != nullptr ? gce + grad_lse[n] : gce;  // the coefficient of p
      const float gy = smoothing == 0.f ? gce : gce * (1.f - smoothing);  // at the label
      const float gflat = gce * smoothing / static_cast<float>(V);  // at every entry, with smoothing
      const float gcos = with_cos ? grad_cos[n] : 0.f;
      const int32_t* S = with_cos ? idx + n * K : nullptr;
      const float* cn = with_cos ? c + n * K : nullptr;
      // S is in increasing vocabulary order (-1 everywhere for a NaN row: no sparse terms).
      int64_t p = (with_cos && S[0] >= 0) ? 0 : K;
      // p = exp((z - m) - logsum): relative to the max, so that p keeps its precision at any |z|
      const Vec mv(shift), lv(logsum), gv(gp);
      for (int64_t t0 = 0; t0 < V; t0 += kTile) {
        const int64_t len = std::min(kTile, V - t0);
        const float* zt = z + t0;
        int64_t j = 0;
        if (transform.active()) {  // z' in registers: tile = dz'/dz (gp p - gflat), dz'/dz kept for y and S
          const Vec fv(gflat);
          transform.for_each<true>(zt, len, [&](int64_t i, const Vec& zp, const Vec& sl, int count) {
            if (count == kVec) {
              const Vec d = gv * vexp((zp - mv) - lv);
              ((smoothing != 0.f ? d - fv : d) * sl).store(tile + i);
              if (transform.capped()) sl.store(slope + i);
              return;
            }
            float zl[kVec], sll[kVec];  // the row's tail: the scalar exp of the plain path
            zp.store(zl);
            sl.store(sll);
            for (int l = 0; l < count; ++l) {
              const float d = gp * std::exp((zl[l] - shift) - logsum);
              tile[i + l] = (smoothing != 0.f ? d - gflat : d) * sll[l];
              slope[i + l] = sll[l];
            }
          });
        } else {
          for (; j + 2 * kVec <= len; j += 2 * kVec) {
            (gv * vexp((Vec::loadu(zt + j) - mv) - lv)).store(tile + j);
            (gv * vexp((Vec::loadu(zt + j + kVec) - mv) - lv)).store(tile + j + kVec);
          }
          for (; j + kVec <= len; j += kVec) (gv * vexp((Vec::loadu(zt + j) - mv) - lv)).store(tile + j);
          for (; j < len; ++j) tile[j] = gp * std::exp((zt[j] - shift) - logsum);
        }
        if (!transform.active()) {
          if (smoothing != 0.f)
            for (j = 0; j < len; ++j) tile[j] -= gflat;
          if (y >= t0 && y < t0 + len) tile[y - t0] -= gy;
          for (; p < K && S[p] < t0 + len; ++p) tile[S[p] - t0] += gcos * cn[p];
        } else {  // the terms at y and S times dz'/dz there
          auto slope_at = [&](int64_t v) { return transform.capped() ? slope[v - t0] : transform.scale; };
          if (y >= t0 && y < t0 + len) tile[y - t0] -= gy * slope_at(y);
          // grouped as the plain path's gcos * cn[p] (also where the compiler fuses it into an fma), so
          // that a power-of-two scale gives exactly s times the plain kernel's gradient on s z
          for (; p < K && S[p] < t0 + len; ++p) tile[S[p] - t0] += gcos * (cn[p] * slope_at(S[p]));
        }
        if constexpr (std::is_same_v<TL, float>) {
          stream_bytes(drow + t0, tile, len * static_cast<int64_t>(sizeof(float)));
        } else {
          from_float_row(tile, out_tile, len);
          stream_bytes(drow + t0, out_tile, len * static_cast<int64_t>(sizeof(TL)));
        }
      }
    }
    stream_fence();
  });
}

struct Entry {
  int32_t src;  // 2 * n (g_n) or 2 * n + 1 (g_e,n)
  float coef;
};

template <typename TE>
void backward_embedding(const Shapes& s, const at::Tensor& labels, const float* stats, const int32_t* idx,
                        const float* w, const float* g2, const float* grad_cos, int64_t ignore_index,
                        at::Tensor& dE, bool accumulate) {
  const int64_t N = s.n, V = s.vocab, H = s.hidden, K = s.k;
  const int64_t* lab = labels.data_ptr<int64_t>();
  auto row_used = [&](int64_t n) {
    // a zero coefficient contributes nothing unless the row is non-finite (0 * NaN is NaN, as in autograd)
    return lab[n] != ignore_index && (grad_cos[n] != 0.f || !std::isfinite(stats[3 * n + 2]));
  };
  // Counting sort of the contributions by vocabulary row (CSR), in (n, i) order.
  std::vector<int64_t> offsets(V + 1, 0);
  for (int64_t n = 0; n < N; ++n) {
    if (!row_used(n)) continue;
    const int32_t* S = idx + n * K;
    const float* wn = w + n * K;
    for (int64_t i = 0; i < K; ++i)
      if (S[i] >= 0 && wn[i] != 0.f) ++offsets[S[i] + 1];
    ++offsets[lab[n] + 1];
  }
  for (int64_t v = 0; v < V; ++v) offsets[v + 1] += offsets[v];
  std::vector<Entry> entries(offsets[V]);
  {
    std::vector<int64_t> cursor(offsets.begin(), offsets.end() - 1);
    for (int64_t n = 0; n < N; ++n) {
      if (!row_used(n)) continue;
      const float gcos = grad_cos[n];
      const int32_t* S = idx + n * K;
      const float* wn = w + n * K;
      for (int64_t i = 0; i < K; ++i)
        if (S[i] >= 0 && wn[i] != 0.f) entries[cursor[S[i]]++] = {static_cast<int32_t>(2 * n), gcos * wn[i]};
      entries[cursor[lab[n]]++] = {static_cast<int32_t>(2 * n + 1), gcos};
    }
  }
  TE* out = dE.data_ptr<TE>();
  if (accumulate) {  // dE is a float32 accumulator: add each row's sum to it, leave untouched rows alone
    float* acc_out = dE.data_ptr<float>();
    const int64_t row_work = H * std::max<int64_t>(1, offsets[V] / std::max<int64_t>(1, V));
    parallel_blocks(V, row_work, 64, [&](int64_t begin, int64_t end) {
      for (int64_t v = begin; v < end; ++v)
        for (int64_t e = offsets[v]; e < offsets[v + 1]; ++e)
          axpy(entries[e].coef, g2 + static_cast<int64_t>(entries[e].src) * H, acc_out + v * H, H);
    });
    return;
  }
  const int64_t row_work = H * std::max<int64_t>(1, offsets[V] / std::max<int64_t>(1, V));
  parallel_blocks(V, row_work, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(H);
    std::vector<TE> converted(std::is_same_v<TE, float> ? 0 : H);
    std::vector<TE> zeros(H, TE(0.f));
    for (int64_t v = begin; v < end; ++v) {
      TE* orow = out + v * H;
      const int64_t lo = offsets[v], hi = offsets[v + 1];
      if (lo == hi) {
        stream_bytes(orow, zeros.data(), H * static_cast<int64_t>(sizeof(TE)));
        continue;
      }
      float* a = acc.data();
      scale_to(entries[lo].coef, g2 + static_cast<int64_t>(entries[lo].src) * H, a, H);
      for (int64_t e = lo + 1; e < hi; ++e) axpy(entries[e].coef, g2 + static_cast<int64_t>(entries[e].src) * H, a, H);
      if constexpr (std::is_same_v<TE, float>) {
        stream_bytes(orow, a, H * static_cast<int64_t>(sizeof(float)));
      } else {
        from_float_row(a, converted.data(), H);
        stream_bytes(orow, converted.data(), H * static_cast<int64_t>(sizeof(TE)));
      }
    }
    stream_fence();
  });
}

}  // namespace

std::vector<at::Tensor> forward(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& emb,
                                double temperature, int64_t k, int64_t ignore_index, bool with_cos,
                                double logit_scale, double softcap, double label_smoothing) {
  check_inputs(logits, labels, emb, k);
  const LogitTransform transform = make_transform(logit_scale, softcap);
  check_smoothing(label_smoothing);
  const Shapes s = make_shapes(logits, emb, k);
  auto f32 = logits.options().dtype(at::kFloat);
  std::vector<at::Tensor> out;
  out.push_back(at::empty({s.n}, f32));                                      // ce
  out.push_back(at::empty({s.n}, f32));                                      // cos
  out.push_back(at::empty({s.n}, logits.options().dtype(at::kBool)));        // correct
  out.push_back(at::empty({s.n}, f32));                                      // lse of the transformed row
  out.push_back(at::empty({s.n, 3}, f32));                                   // stats: m, logsum, cos
  const int64_t kk = with_cos ? s.k : 0;
  out.push_back(at::empty({with_cos ? s.n : 0, kk}, f32.dtype(at::kInt)));   // idx
  out.push_back(at::empty({with_cos ? s.n : 0, kk}, f32));                   // w
  out.push_back(at::empty({with_cos ? s.n : 0, kk}, f32));                   // c
  out.push_back(at::empty({with_cos ? s.n : 0, 2, s.hidden}, f32));          // g, g_e
  const bool lbf = logits.scalar_type() == at::kBFloat16, ebf = emb.scalar_type() == at::kBFloat16;
  using BF = c10::BFloat16;
  const float eps = static_cast<float>(label_smoothing);
  if (!lbf && !ebf)
    forward_dispatch<float, float>(s, logits, labels, emb, temperature, ignore_index, with_cos, transform, eps, out);
  if (!lbf && ebf)
    forward_dispatch<float, BF>(s, logits, labels, emb, temperature, ignore_index, with_cos, transform, eps, out);
  if (lbf && !ebf)
    forward_dispatch<BF, float>(s, logits, labels, emb, temperature, ignore_index, with_cos, transform, eps, out);
  if (lbf && ebf)
    forward_dispatch<BF, BF>(s, logits, labels, emb, temperature, ignore_index, with_cos, transform, eps, out);
  return out;
}

std::vector<at::Tensor> backward(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& emb,
                                 const at::Tensor& stats, const at::Tensor& idx, const at::Tensor& w,
                                 const at::Tensor& c, const at::Tensor& g2, const at::Tensor& grad_ce,
                                 const at::Tensor& grad_cos, const at::Tensor& grad_lse, int64_t k,
                                 int64_t ignore_index, bool with_cos, double logit_scale, double softcap,
                                 double label_smoothing, bool need_logits_grad, bool need_embedding_grad, bool inplace_logits_grad,
                                 const std::optional<at::Tensor>& embedding_grad_out) {
  check_inputs(logits, labels, emb, k);
  const Shapes s = make_shapes(logits, emb, k);
  TORCH_CHECK(grad_ce.scalar_type() == at::kFloat && grad_ce.is_contiguous() && grad_ce.numel() == s.n,
              "fused_cosloss native: grad_ce must be a contiguous float32 [N]");
  TORCH_CHECK(grad_cos.scalar_type() == at::kFloat && grad_cos.is_contiguous() && grad_cos.numel() == s.n,
              "fused_cosloss native: grad_cos must be a contiguous float32 [N]");
  TORCH_CHECK(grad_lse.numel() == 0 || (grad_lse.scalar_type() == at::kFloat && grad_lse.is_contiguous() &&
                                        grad_lse.numel() == s.n),
              "fused_cosloss native: grad_lse must be a contiguous float32 [N] (empty: no lse term)");
  const LogitTransform transform = make_transform(logit_scale, softcap);
  check_smoothing(label_smoothing);
  const float eps = static_cast<float>(label_smoothing);
  TORCH_CHECK(stats.is_contiguous() && stats.numel() == 3 * s.n, "fused_cosloss native: bad saved stats");
  if (with_cos) {
    TORCH_CHECK(idx.is_contiguous() && idx.numel() == s.n * s.k && w.is_contiguous() && w.numel() == s.n * s.k &&
                    c.is_contiguous() && c.numel() == s.n * s.k && g2.is_contiguous() &&
                    g2.numel() == s.n * 2 * s.hidden,
                "fused_cosloss native: bad saved state");
  }
  const float* st = stats.data_ptr<float>();
  const int32_t* ip = with_cos ? idx.data_ptr<int32_t>() : nullptr;
  const float* wp = with_cos ? w.data_ptr<float>() : nullptr;
  const float* cp = with_cos ? c.data_ptr<float>() : nullptr;
  const float* gp = with_cos ? g2.data_ptr<float>() : nullptr;
  const float* gce = grad_ce.data_ptr<float>();
  const float* gcos = grad_cos.data_ptr<float>();
  const float* glse = grad_lse.numel() == 0 ? nullptr : grad_lse.data_ptr<float>();

  at::Tensor dz, dE;
  if (need_logits_grad) {
    if (inplace_logits_grad) {
      dz = logits;
    } else {
      dz = pooled_empty({s.n, s.vocab}, logits.options());
      advise_huge_pages(dz.data_ptr(), dz.nbytes());
    }
    if (logits.scalar_type() == at::kBFloat16)
      backward_logits<c10::BFloat16>(s, logits, labels, st, ip, cp, gce, gcos, glse, transform, eps, ignore_index,
                                     with_cos, dz);
    else
      backward_logits<float>(s, logits, labels, st, ip, cp, gce, gcos, glse, transform, eps, ignore_index, with_cos,
                             dz);
  }
  if (need_embedding_grad && with_cos) {
    const bool accumulate = embedding_grad_out.has_value();
    if (accumulate) {
      dE = *embedding_grad_out;
      TORCH_CHECK(dE.scalar_type() == at::kFloat && dE.is_contiguous() && dE.size(0) == s.vocab &&
                      dE.size(1) == s.hidden,
                  "fused_cosloss native: embedding_grad_out must be a contiguous float32 [V, H]");
    } else {
      dE = pooled_empty({s.vocab, s.hidden}, emb.options());
      advise_huge_pages(dE.data_ptr(), dE.nbytes());
    }
    if (accumulate || emb.scalar_type() != at::kBFloat16)
      backward_embedding<float>(s, labels, st, ip, wp, gp, gcos, ignore_index, dE, accumulate);
    else
      backward_embedding<c10::BFloat16>(s, labels, st, ip, wp, gp, gcos, ignore_index, dE, accumulate);
    if (accumulate) dE = at::Tensor();
  }
  return {dz, dE};
}

std::string capability() {
#if defined(CPU_CAPABILITY_AVX512)
  return "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "AVX2";
#else
  return "DEFAULT";
#endif
}

int64_t threads_seen() {
  std::atomic<int64_t> seen{0};
  at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) {
    const int64_t mine = at::get_thread_num() + 1;
    int64_t cur = seen.load();
    while (cur < mine && !seen.compare_exchange_weak(cur, mine)) {
    }
  });
  return seen.load();
}

}  // namespace fcl

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_cosloss native CPU kernel (see csrc/mixed_loss_cpu.cpp)";
  namespace py = pybind11;
  m.def("forward", &fcl::forward, "per-row forward: ce, cos, correct, lse and the saved state", py::arg("logits"),
        py::arg("labels"), py::arg("embedding"), py::arg("temperature"), py::arg("k"), py::arg("ignore_index"),
        py::arg("with_cos"), py::arg("logit_scale"), py::arg("softcap"), py::arg("label_smoothing"));
  m.def("backward", &fcl::backward, "gradients of logits and embedding", py::arg("logits"), py::arg("labels"),
        py::arg("embedding"), py::arg("stats"), py::arg("idx"), py::arg("w"), py::arg("c"), py::arg("g2"),
        py::arg("grad_ce"), py::arg("grad_cos"), py::arg("grad_lse"), py::arg("k"), py::arg("ignore_index"),
        py::arg("with_cos"), py::arg("logit_scale"), py::arg("softcap"), py::arg("label_smoothing"),
        py::arg("need_logits_grad"), py::arg("need_embedding_grad"), py::arg("inplace"),
        py::arg("embedding_grad_out"));
  m.def("capability", &fcl::capability, "the instruction set this build was compiled for");
  m.def("threads_seen", &fcl::threads_seen, "how many threads at::parallel_for uses here (diagnostic)");
  m.def("release_cached_buffers", &fcl::release_cached_buffers, "free the cached gradient buffers; bytes freed");
  m.def("cached_bytes", &fcl::cached_bytes, "bytes of gradient buffers cached for reuse");
}
