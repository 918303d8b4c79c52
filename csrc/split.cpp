// The split route on CPU: the weight-gradient GEMM sum_i B_i^T A_i with its reduction over
// tokens split at sample boundaries, so that every (p, d) tile of each sample's gradient
// g_i = B_i^T A_i passes through registers once: it is dotted with the same tile of a dense V
// (or with the same tile of each of K vectors, e.g. one per validation sample; or squared, for
// norms) and added into the weight-gradient tile. No per-sample gradient is
// stored beyond one MR x NR register tile.
//
// Determinism: every output element and every partial sum has one owner (a macro tile, run by
// one task start to finish in a fixed order); the per-tile partial products are stored
// [n_tiles, N] and summed in tile order afterwards. Results are bitwise identical for any
// number of threads.
//
// Accumulation: float for float/bfloat16/half inputs, double for double.
// ATen + torch's pybind casters rather than <torch/extension.h>: ~40% less compile time
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>
#include <optional>
#include <vector>

namespace {

template <typename S> struct Vec;
template <> struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  typedef float unaligned __attribute__((vector_size(32), aligned(4), may_alias));
  static constexpr int W = 8;
};
template <> struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  typedef double unaligned __attribute__((vector_size(32), aligned(8), may_alias));
  static constexpr int W = 4;
};

constexpr int MR = 6;       // micro-tile rows (output-gradient features p)
constexpr int NV = 2;       // micro-tile width in vectors (input features d)
constexpr int MB = 16;      // micro row blocks per macro tile (96 rows)
constexpr int NB = 8;       // micro column blocks per macro tile (128 floats / 64 doubles)

template <typename S>
struct Split {
  using V = typename Vec<S>::type;
  using VU = typename Vec<S>::unaligned;
  static constexpr int W = Vec<S>::W;
  static constexpr int NR = NV * W;

  // acc[r][v] = sum_{t < K} bp[t, r] * ap[t, v*W : (v+1)*W]   (packed panels, see pack_*)
  static inline void micro(const S* __restrict bp, const S* __restrict ap, int64_t K, V* __restrict out) {
    V c[MR][NV];   // local accumulators: kept in registers (MR * NV = 12 of 16 vector registers)
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) c[r][v] = V{};
    for (int64_t t = 0; t < K; ++t) {
      V a[NV];
      for (int v = 0; v < NV; ++v) a[v] = *reinterpret_cast<const VU*>(ap + t * NR + v * W);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const V b = bp[t * MR + r] - V{};   // broadcast (x - 0 == x exactly)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) c[r][v] += b * a[v];
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) out[r * NV + v] = c[r][v];
  }
};

// Pack X [N, T, F] (any floating dtype) into [N][ceil(F/R)][T][R] of S, zero-padded in F.
// Packed panels keep the micro kernel's loads contiguous (reading A and B in place, at strides
// d and p, measured ~20% slower). X is read row by row, contiguously (walking each panel down
// the stride F measured slower). The pack is a plain copy: its thread split changes nothing.
template <typename In, typename S>
std::unique_ptr<S[]> pack(const at::Tensor& X, int R) {
  const int64_t N = X.size(0), T = X.size(1), F = X.size(2);
  const int64_t nb = (F + R - 1) / R, full = F / R;
  std::unique_ptr<S[]> out(new S[static_cast<size_t>(N * nb * T * R)]);
  const In* x = X.data_ptr<In>();
  at::parallel_for(0, N * T, 16, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t i = k / T, t = k % T;
      const In* row = x + k * F;
      S* o = out.get() + i * nb * T * R + t * R;
      for (int64_t blk = 0; blk < full; ++blk) {
        S* ob = o + blk * T * R;
        const In* src = row + blk * R;
        if constexpr (std::is_same_v<In, S>) {
          std::memcpy(ob, src, sizeof(S) * R);
        } else {
          for (int c = 0; c < R; ++c) ob[c] = static_cast<S>(src[c]);
        }
      }
      if (full < nb) {
        S* ob = o + full * T * R;
        const int64_t w = F - full * R;
        int64_t c = 0;
        for (; c < w; ++c) ob[c] = static_cast<S>(row[full * R + c]);
        for (; c < R; ++c) ob[c] = S(0);
      }
    }
  });
  return out;
}

// Macro tiles [tile0, tile1): every value a plain parameter, so that the compiler keeps them in
// registers across the epilogue's stores (captured by reference in a lambda that is not
// inlined -- an OpenMP-outlined body -- they were reloaded after every store: ~30% slower).
template <typename S>
void tiles(const int64_t N, const int64_t T, const int64_t d, const int64_t p, const int64_t nrb,
           const int64_t ncb, const int64_t ntc, const S* __restrict Ap, const S* __restrict Bp,
           const S* __restrict Vp, const int64_t nv, S* __restrict Wd, const int64_t* __restrict len,
           S* __restrict partial, const bool norms, const int64_t tile0, const int64_t tile1) {
  using K = Split<S>;
  using V = typename K::V;
  constexpr int NR = K::NR;
  const int64_t pd = p * d;   // stride between the nv vectors of Vp [nv, p, d]
  alignas(64) V acc[MR][NV];
  alignas(64) S g[MR][NR];
  std::vector<V> dv(static_cast<size_t>(std::max<int64_t>(1, nv)));   // one running dot per vector
  std::vector<S> ds(dv.size());
  for (int64_t tile = tile0; tile < tile1; ++tile) {
    const int64_t tr = tile / ntc, tc = tile % ntc;
    const int64_t ib0 = tr * MB, ib1 = std::min(nrb, ib0 + MB);
    const int64_t jb0 = tc * NB, jb1 = std::min(ncb, jb0 + NB);
    for (int64_t i = 0; i < N; ++i) {
      const int64_t Ti = len[i];
      std::fill(dv.begin(), dv.end(), V{});
      std::fill(ds.begin(), ds.end(), S(0));
      for (int64_t jb = jb0; jb < jb1; ++jb) {
        const S* ap = Ap + (i * ncb + jb) * T * NR;
        const int64_t c0 = jb * NR, cw = std::min<int64_t>(NR, d - c0);
        for (int64_t ib = ib0; ib < ib1; ++ib) {
          const S* bp = Bp + (i * nrb + ib) * T * MR;
          const int64_t r0 = ib * MR, rw = std::min<int64_t>(MR, p - r0);
          K::micro(bp, ap, Ti, &acc[0][0]);
          if (rw == MR && cw == NR) {   // full tile: vector epilogue
            for (int r = 0; r < MR; ++r) {
              S* wrow = Wd + (r0 + r) * d + c0;
              for (int v = 0; v < NV; ++v) {
                V w;
                std::memcpy(&w, wrow + v * K::W, sizeof(V));
                w += acc[r][v];
                std::memcpy(wrow + v * K::W, &w, sizeof(V));
                if (norms) {
                  dv[0] += acc[r][v] * acc[r][v];
                } else {
                  const S* vrow = Vp + (r0 + r) * d + c0 + v * K::W;
                  for (int64_t k = 0; k < nv; ++k) {
                    V vv;
                    std::memcpy(&vv, vrow + k * pd, sizeof(V));
                    dv[k] += acc[r][v] * vv;
                  }
                }
              }
            }
          } else {                      // edge tile: scalar epilogue over the valid part
            std::memcpy(g, acc, sizeof(g));
            for (int64_t r = 0; r < rw; ++r)
              for (int64_t c = 0; c < cw; ++c) {
                const S x = g[r][c];
                Wd[(r0 + r) * d + c0 + c] += x;
                if (norms) ds[0] += x * x;
                else
                  for (int64_t k = 0; k < nv; ++k) ds[k] += x * Vp[k * pd + (r0 + r) * d + c0 + c];
              }
          }
        }
      }
      for (size_t k = 0; k < dv.size(); ++k) {
        for (int w = 0; w < K::W; ++w) ds[k] += dv[k][w];
        partial[(tile * N + i) * dv.size() + k] = ds[k];
      }
    }
  }
}

// out [N, nv] (nv = 1 for norms): partial products summed over tiles in tile order.
template <typename In, typename S>
void run(const at::Tensor& A, const at::Tensor& B, const S* Vp, int64_t nv, const std::vector<int64_t>& len,
         bool norms, at::Tensor& Wt, at::Tensor& out) {
  constexpr int NR = Split<S>::NR;
  const int64_t N = A.size(0), T = A.size(1), d = A.size(2), p = B.size(2);
  const int64_t nrb = (p + MR - 1) / MR, ncb = (d + NR - 1) / NR;      // micro blocks
  const int64_t ntr = (nrb + MB - 1) / MB, ntc = (ncb + NB - 1) / NB;  // macro tiles
  const int64_t n_tiles = ntr * ntc;
  std::unique_ptr<S[]> Ap = pack<In, S>(A, NR), Bp = pack<In, S>(B, MR);
  const int64_t nk = std::max<int64_t>(1, nv);
  std::vector<S> partial(static_cast<size_t>(n_tiles * N * nk), S(0));
  S* Wd = Wt.data_ptr<S>();

  const S* ap0 = Ap.get();
  const S* bp0 = Bp.get();
  const int64_t* lens = len.data();
  S* part = partial.data();
  if (at::get_num_threads() == 1) {   // no parallel region at all (measured faster on one thread)
    tiles<S>(N, T, d, p, nrb, ncb, ntc, ap0, bp0, Vp, nv, Wd, lens, part, norms, 0, n_tiles);
  } else {
    at::parallel_for(0, n_tiles, 1, [&](int64_t tile0, int64_t tile1) {
      tiles<S>(N, T, d, p, nrb, ncb, ntc, ap0, bp0, Vp, nv, Wd, lens, part, norms, tile0, tile1);
    });
  }

  S* o = out.data_ptr<S>();
  for (int64_t i = 0; i < N * nk; ++i) {
    S s = S(0);
    for (int64_t tile = 0; tile < n_tiles; ++tile) s += partial[tile * N * nk + i];
    o[i] = s;
  }
}

// Per-sample bias gradients bs[i] = sum_{t < len_i} B[i, t] (fixed order), their sum, and the
// per-sample bias product (dot with each of the nv rows of v_bias [nv, p], or squared norm)
// added to out [N, nv].
template <typename In, typename S>
at::Tensor bias_part(const at::Tensor& B, const S* vb, int64_t nv, const std::vector<int64_t>& len,
                     bool norms, at::Tensor& out) {
  const int64_t N = B.size(0), T = B.size(1), p = B.size(2);
  std::vector<S> bs(static_cast<size_t>(N * p), S(0));
  const In* b = B.data_ptr<In>();
  at::parallel_for(0, N, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t t = 0; t < len[i]; ++t)
        for (int64_t r = 0; r < p; ++r) bs[i * p + r] += static_cast<S>(b[(i * T + t) * p + r]);
  });
  at::Tensor gb = at::zeros({p}, out.options());
  S* g = gb.data_ptr<S>();
  S* o = out.data_ptr<S>();
  const int64_t nk = std::max<int64_t>(1, nv);
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t r = 0; r < p; ++r) g[r] += bs[i * p + r];
    for (int64_t k = 0; k < nk; ++k) {
      if (!norms && !vb) break;
      S s = S(0);
      for (int64_t r = 0; r < p; ++r) {
        const S x = bs[i * p + r];
        s += norms ? x * x : x * vb[k * p + r];
      }
      o[i * nk + k] += s;
    }
  }
  return gb;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> split(at::Tensor A, at::Tensor B,
                                                     std::optional<at::Tensor> V,
                                                     std::optional<at::Tensor> v_bias,
                                                     std::optional<at::Tensor> lengths,
                                                     double scale, bool bias) {
  TORCH_CHECK(A.dim() == 3 && B.dim() == 3, "split: A [N, T, d] and B [N, T, p] expected");
  TORCH_CHECK(A.size(0) == B.size(0) && A.size(1) == B.size(1), "split: A and B differ in samples/tokens");
  TORCH_CHECK(A.device().is_cpu() && B.device().is_cpu(), "split: the C++ kernel runs on CPU tensors");
  TORCH_CHECK(A.is_floating_point() && B.is_floating_point(), "split: floating-point inputs expected");
  const bool norms = !V.has_value();
  const bool dbl = A.scalar_type() == at::kDouble || B.scalar_type() == at::kDouble ||
                   (V.has_value() && V->scalar_type() == at::kDouble);
  const at::ScalarType acc = dbl ? at::kDouble : at::kFloat;
  // one input dtype for both operands: the common type, or the accumulation type if they differ
  at::ScalarType in = A.scalar_type() == B.scalar_type() ? A.scalar_type() : acc;
  if (dbl) in = at::kDouble;
  A = A.to(in).contiguous();
  B = B.to(in).contiguous();
  const int64_t N = A.size(0), T = A.size(1), d = A.size(2), p = B.size(2);
  at::Tensor Vc, vbc;
  // V [p, d] -> out [N]; V [nv, p, d] (nv vectors, e.g. one per validation sample) -> out [N, nv]
  const bool multi = V.has_value() && V->dim() == 3;
  const int64_t nv = multi ? V->size(0) : 1;
  if (V.has_value()) {
    TORCH_CHECK((V->dim() == 2 || multi) && V->size(-2) == p && V->size(-1) == d,
                "split: V must be [p, d] or [K, p, d]");
    TORCH_CHECK(nv >= 1, "split: V [K, p, d] needs K >= 1");
    Vc = V->to(acc).contiguous();
  }
  if (v_bias.has_value()) {
    TORCH_CHECK(v_bias->dim() == (multi ? 2 : 1) && v_bias->size(-1) == p && (!multi || v_bias->size(0) == nv),
                "split: v_bias must be [p] ([K, p] with V [K, p, d])");
    vbc = v_bias->to(acc).contiguous();
  }
  std::vector<int64_t> len(static_cast<size_t>(N), T);
  if (lengths.has_value()) {
    at::Tensor l = lengths->to(at::kLong).contiguous();
    TORCH_CHECK(l.dim() == 1 && l.size(0) == N, "split: lengths must be [N]");
    const int64_t* lp = l.data_ptr<int64_t>();
    for (int64_t i = 0; i < N; ++i) len[i] = std::max<int64_t>(0, std::min<int64_t>(T, lp[i]));
  }
  at::Tensor Wt = at::zeros({p, d}, A.options().dtype(acc));
  at::Tensor out = multi ? at::zeros({N, nv}, A.options().dtype(acc)) : at::zeros({N}, A.options().dtype(acc));
  at::Tensor gb;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in, "inrun_split", [&] {
    using In = scalar_t;
    if (dbl) {
      if constexpr (std::is_same_v<In, double>) {
        const double* vp = norms ? nullptr : Vc.data_ptr<double>();
        if (N > 0 && p > 0 && d > 0) run<In, double>(A, B, vp, nv, len, norms, Wt, out);
        if (bias) gb = bias_part<In, double>(B, vbc.defined() ? vbc.data_ptr<double>() : nullptr, nv, len, norms, out);
      }
    } else {
      if constexpr (!std::is_same_v<In, double>) {
        const float* vp = norms ? nullptr : Vc.data_ptr<float>();
        if (N > 0 && p > 0 && d > 0) run<In, float>(A, B, vp, nv, len, norms, Wt, out);
        if (bias) gb = bias_part<In, float>(B, vbc.defined() ? vbc.data_ptr<float>() : nullptr, nv, len, norms, out);
      }
    }
  });
  if (scale != 1.0) {
    Wt.mul_(scale);
    if (gb.defined()) gb.mul_(scale);
  }
  return {Wt, gb, out};
}

}  // namespace

// the source hash, passed bare (-DINRUN_SRC_HASH=abc...) and stringified here
#define INRUN_STR2(x) #x
#define INRUN_STR(x) INRUN_STR2(x)
#ifdef INRUN_SRC_HASH
#define INRUN_SRC_HASH_STR INRUN_STR(INRUN_SRC_HASH)
#else
#define INRUN_SRC_HASH_STR ""
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "inrun_kernels: the split route (weight gradient + per-sample products) on CPU";
  m.def("split", &split, "(W [p, d], bias grad [p] or None, per-sample dots/norms [N])",
        py::arg("A"), py::arg("B"), py::arg("V"), py::arg("v_bias"), py::arg("lengths"),
        py::arg("scale"), py::arg("bias"));
  m.attr("src_hash") = INRUN_SRC_HASH_STR;
}
