// The fused LayerNorm-LSTM kernel's numerical core: one layer over a whole sequence, with
// neither torch nor onnxruntime in sight (plain pointers and sizes in). Two bindings include it:
//
//   layer_norm_lstm.cpp      the TorchScript op lstm_export::layer_norm_lstm_layer
//   ort_layer_norm_lstm.cpp  the onnxruntime custom op lstm_export.LayerNormLSTMLayer
//
// Each binding checks its inputs, allocates the outputs and the scratch, and supplies the
// parallel-for (at::parallel_for; onnxruntime's intra-op thread pool); the arithmetic is here
// only, so both give the same numbers.
//
// x_proj [seq, batch, 4H] is W_x x_t + b for every t (one matmul, done by the caller).
// valid, optional bool [seq, batch]: where false (the padding of a ragged batch) the row's
// (h, c) is carried unchanged and y is 0, as LSTMCell.scan masks; null: every step is real.
// Per step, in the order of the equations in lstm_export/model.py:
//   z = x_proj[t] + h W_h^T                         (w_h is hidden_lin.weight, [4H, H])
//   i, f, g, o = LN_k(z_k) = (z_k - mean) / sqrt(var + eps) * gamma[k] + beta[k]
//   c = sigmoid(f) * c + sigmoid(i) * tanh(g)
//   h = sigmoid(o) * tanh(LN_c(c))
// Why a kernel: per step, an interpreter pays a dispatch for each of a dozen small ops and
// MKL's small-batch GEMM is slow on non-Intel CPUs; here one pass does the matmul with
// AVX-512 (or AVX2) FMA and the LayerNorms and activations in registers.
//
// Everything is in an unnamed namespace: each binding is one translation unit that includes
// this header once, and its copy keeps internal linkage (as when it lived in the .cpp), so
// two libraries built with different flags never interpose each other's functions.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

// Routes, chosen at compile time by the flags lstm_export/native/build.py gives (one decision
// for both bindings): -mavx512f (with -mavx2 -mfma) the AVX-512 route, 16 float lanes;
// -mavx2 -mfma the AVX2 route, 8 lanes; neither the portable scalar route. A vector route
// finishes each loop's remainder (hidden % lanes) with the scalar code.
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LSTM_EXPORT_AVX2 1
#if defined(__AVX512F__)
#define LSTM_EXPORT_AVX512 1
#endif
#endif

namespace lstm_export {
namespace core {
namespace {

#ifdef LSTM_EXPORT_AVX2
// The vector operations the LayerNorms and activations need, for 8 lanes (AVX2) and 16
// (AVX-512): the same code, templated on the width.
struct F8 {
  using T = __m256;
  static constexpr int64_t kLanes = 8;
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T set1(float x) { return _mm256_set1_ps(x); }
  static T zero() { return _mm256_setzero_ps(); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T div(T a, T b) { return _mm256_div_ps(a, b); }
  static T min(T a, T b) { return _mm256_min_ps(a, b); }
  static T max(T a, T b) { return _mm256_max_ps(a, b); }
  static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T fnmadd(T a, T b, T c) { return _mm256_fnmadd_ps(a, b, c); }
  static T fmsub(T a, T b, T c) { return _mm256_fmsub_ps(a, b, c); }
  static T floor(T x) { return _mm256_floor_ps(x); }
  static T pow2(T n) {  // 2^n for whole n in the float range
    __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(0x7f)), 23);
    return _mm256_castsi256_ps(e);
  }
  static void lanes(T v, float* out) { _mm256_storeu_ps(out, v); }
};

#ifdef LSTM_EXPORT_AVX512
struct F16 {
  using T = __m512;
  static constexpr int64_t kLanes = 16;
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T set1(float x) { return _mm512_set1_ps(x); }
  static T zero() { return _mm512_setzero_ps(); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T div(T a, T b) { return _mm512_div_ps(a, b); }
  static T min(T a, T b) { return _mm512_min_ps(a, b); }  // NaN: the second, as AVX2's
  static T max(T a, T b) { return _mm512_max_ps(a, b); }
  static T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T fnmadd(T a, T b, T c) { return _mm512_fnmadd_ps(a, b, c); }
  static T fmsub(T a, T b, T c) { return _mm512_fmsub_ps(a, b, c); }
  static T floor(T x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  static T pow2(T n) {
    __m512i e = _mm512_slli_epi32(
        _mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(0x7f)), 23);
    return _mm512_castsi512_ps(e);
  }
  static void lanes(T v, float* out) { _mm512_storeu_ps(out, v); }
};
using Wide = F16;  // the route's widest vector
#else
using Wide = F8;
#endif

// exp of a vector: Cephes' polynomial (as in avx_mathfun), relative error about 1e-7.
template <class V>
inline typename V::T exp_v(typename V::T x) {
  // The clamp's bound goes first: min/max return their second operand for a NaN, so
  // NaN passes through (to NaN outputs, as eager PyTorch gives) instead of turning finite.
  x = V::min(V::set1(88.3762626647949f), x);
  x = V::max(V::set1(-88.3762626647949f), x);
  typename V::T n = V::floor(V::fmadd(x, V::set1(1.44269504088896341f), V::set1(0.5f)));
  x = V::fnmadd(n, V::set1(0.693359375f), x);
  x = V::fnmadd(n, V::set1(-2.12194440e-4f), x);
  typename V::T p = V::set1(1.9875691500e-4f);
  p = V::fmadd(p, x, V::set1(1.3981999507e-3f));
  p = V::fmadd(p, x, V::set1(8.3334519073e-3f));
  p = V::fmadd(p, x, V::set1(4.1665795894e-2f));
  p = V::fmadd(p, x, V::set1(1.6666665459e-1f));
  p = V::fmadd(p, x, V::set1(5.0000001201e-1f));
  p = V::add(V::fmadd(p, V::mul(x, x), x), V::set1(1.0f));
  return V::mul(p, V::pow2(n));
}

template <class V>
inline typename V::T sigmoid_v(typename V::T x) {
  typename V::T one = V::set1(1.0f);
  return V::div(one, V::add(one, exp_v<V>(V::sub(V::zero(), x))));
}

template <class V>
inline typename V::T tanh_v(typename V::T x) {  // tanh(x) = 2 sigmoid(2x) - 1
  typename V::T two = V::set1(2.0f);
  return V::fmsub(two, sigmoid_v<V>(V::mul(two, x)), V::set1(1.0f));
}

// [sum(a), sum(b), sum(c), sum(d)]
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}
#endif

inline float sigmoid1(float x) { return 1.0f / (1.0f + std::exp(-x)); }

#ifdef LSTM_EXPORT_AVX2
// z[b0 + r, n + j] for R batch rows r and 4 output rows j: 4R accumulators over k.
template <int R>
void rows_times_block(const float* h, const float* w0, const float* bias, float* z,
                      int64_t b0, int64_t n, int64_t hidden) {
  const int64_t width = 4 * hidden, k8 = hidden - hidden % 8;
  __m256 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < k8; k += 8) {
    __m256 wj[4];
    for (int j = 0; j < 4; ++j) wj[j] = _mm256_loadu_ps(w0 + j * hidden + k);
    for (int r = 0; r < R; ++r) {
      __m256 x = _mm256_loadu_ps(h + (b0 + r) * hidden + k);
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_fmadd_ps(x, wj[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(16) float sum[4];
    _mm_store_ps(sum, hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
    const float* hr = h + (b0 + r) * hidden;
    for (int j = 0; j < 4; ++j) {
      for (int64_t k = k8; k < hidden; ++k) sum[j] += hr[k] * w0[j * hidden + k];
      z[(b0 + r) * width + n + j] = bias[(b0 + r) * width + n + j] + sum[j];
    }
  }
}

// z[b0 + r, n .. n + 16) for R batch rows from one panel of packed weights, wp[k][16]:
// per k, two loads of w feed 2R FMAs (the dot-product route needs four per 4R).
template <int R>
void rows_times_panel(const float* h, const float* wp, const float* bias, float* z,
                      int64_t b0, int64_t n, int64_t hidden) {
  const int64_t width = 4 * hidden;
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < hidden; ++k) {
    __m256 w0 = _mm256_loadu_ps(wp + k * 16), w1 = _mm256_loadu_ps(wp + k * 16 + 8);
    for (int r = 0; r < R; ++r) {
      __m256 x = _mm256_broadcast_ss(h + (b0 + r) * hidden + k);
      acc[r][0] = _mm256_fmadd_ps(x, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(x, w1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const float* bi = bias + (b0 + r) * width + n;
    float* zr = z + (b0 + r) * width + n;
    _mm256_storeu_ps(zr, _mm256_add_ps(acc[r][0], _mm256_loadu_ps(bi)));
    _mm256_storeu_ps(zr + 8, _mm256_add_ps(acc[r][1], _mm256_loadu_ps(bi + 8)));
  }
}

#ifdef LSTM_EXPORT_AVX512
// The AVX-512 panel kernel: z[b0 + r, n .. n + 16 P) for R batch rows from P consecutive
// panels, one __m512 per panel row: per k, P loads of w feed R P FMAs (h[k] broadcast).
// R P accumulators of 16 lanes, at most 16 of the 32 registers.
template <int R, int P>
void rows_times_panels16(const float* h, const float* wp, const float* bias, float* z,
                         int64_t b0, int64_t n, int64_t hidden) {
  const int64_t width = 4 * hidden, stride = hidden * 16;
  __m512 acc[R][P];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < P; ++q) acc[r][q] = _mm512_setzero_ps();
  for (int64_t k = 0; k < hidden; ++k) {
    __m512 w[P];
    for (int q = 0; q < P; ++q) w[q] = _mm512_loadu_ps(wp + q * stride + k * 16);
    for (int r = 0; r < R; ++r) {
      __m512 x = _mm512_set1_ps(h[(b0 + r) * hidden + k]);
      for (int q = 0; q < P; ++q) acc[r][q] = _mm512_fmadd_ps(x, w[q], acc[r][q]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int q = 0; q < P; ++q) {
      const int64_t at = (b0 + r) * width + n + 16 * q;
      _mm512_storeu_ps(z + at, _mm512_add_ps(acc[r][q], _mm512_loadu_ps(bias + at)));
    }
  }
}

// The last rows (fewer than a whole block) of batch_times_panels16: R = rows, rows < 16.
template <int R, int P>
void last_rows_times_panels16(int64_t rows, const float* h, const float* wp, const float* bias,
                              float* z, int64_t b0, int64_t n, int64_t hidden) {
  if constexpr (R >= 1) {
    if (rows == R) {
      rows_times_panels16<R, P>(h, wp, bias, z, b0, n, hidden);
    } else {
      last_rows_times_panels16<R - 1, P>(rows, h, wp, bias, z, b0, n, hidden);
    }
  }
}

// Every batch row times P panels: blocks of 8 rows for 2 panels (16 accumulators), of 16
// for one.
template <int P>
void batch_times_panels16(const float* h, const float* wp, const float* bias, float* z,
                          int64_t batch, int64_t n, int64_t hidden) {
  constexpr int kRows = 16 / P;
  int64_t b = 0;
  for (; b + kRows <= batch; b += kRows)
    rows_times_panels16<kRows, P>(h, wp, bias, z, b, n, hidden);
  last_rows_times_panels16<kRows - 1, P>(batch - b, h, wp, bias, z, b, n, hidden);
}

// z[b0 + r, n + j] for R batch rows and J = 8 output rows: 8 R accumulators over k (the
// dot-product route, for batch 1 and where there are no panels).
template <int R>
void rows_times_block16(const float* h, const float* w0, const float* bias, float* z,
                        int64_t b0, int64_t n, int64_t hidden) {
  const int64_t width = 4 * hidden, k16 = hidden - hidden % 16;
  __m512 acc[R][8];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 8; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k16; k += 16) {
    __m512 wj[8];
    for (int j = 0; j < 8; ++j) wj[j] = _mm512_loadu_ps(w0 + j * hidden + k);
    for (int r = 0; r < R; ++r) {
      __m512 x = _mm512_loadu_ps(h + (b0 + r) * hidden + k);
      for (int j = 0; j < 8; ++j) acc[r][j] = _mm512_fmadd_ps(x, wj[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    __m256 half[8];  // each accumulator's two halves added: 8 lanes left
    for (int j = 0; j < 8; ++j) {
      half[j] = _mm256_add_ps(_mm512_castps512_ps256(acc[r][j]),
                              _mm256_castpd_ps(_mm512_extractf64x4_pd(
                                  _mm512_castps_pd(acc[r][j]), 1)));
    }
    alignas(16) float sum[8];
    _mm_store_ps(sum, hsum4(half[0], half[1], half[2], half[3]));
    _mm_store_ps(sum + 4, hsum4(half[4], half[5], half[6], half[7]));
    const float* hr = h + (b0 + r) * hidden;
    for (int j = 0; j < 8; ++j) {
      for (int64_t k = k16; k < hidden; ++k) sum[j] += hr[k] * w0[j * hidden + k];
      z[(b0 + r) * width + n + j] = bias[(b0 + r) * width + n + j] + sum[j];
    }
  }
}
#endif

// The same product from panels [4H / 16][H][16] (hidden % 4 == 0), panels p0..p1.
void panel_matmul(const float* h, const float* panels, const float* bias, float* z,
                  int64_t batch, int64_t hidden, int64_t p0, int64_t p1) {
#ifdef LSTM_EXPORT_AVX512
  int64_t p = p0;
  for (; p + 2 <= p1; p += 2)
    batch_times_panels16<2>(h, panels + p * hidden * 16, bias, z, batch, p * 16, hidden);
  if (p < p1) batch_times_panels16<1>(h, panels + p * hidden * 16, bias, z, batch, p * 16, hidden);
#else
  for (int64_t p = p0; p < p1; ++p) {
    const float* wp = panels + p * hidden * 16;
    int64_t b = 0;
    for (; b + 4 <= batch; b += 4) rows_times_panel<4>(h, wp, bias, z, b, p * 16, hidden);
    if (batch - b == 3) rows_times_panel<3>(h, wp, bias, z, b, p * 16, hidden);
    if (batch - b == 2) rows_times_panel<2>(h, wp, bias, z, b, p * 16, hidden);
    if (batch - b == 1) rows_times_panel<1>(h, wp, bias, z, b, p * 16, hidden);
  }
#endif
}
#endif

// z[b, n] = bias[b, n] + sum_k h[b, k] w[n, k] for output rows n in [n0, n1), n0 % 4 == 0.
void recurrent_matmul(const float* h, const float* w, const float* bias, float* z,
                      int64_t batch, int64_t hidden, int64_t n0, int64_t n1) {
  const int64_t width = 4 * hidden;
  int64_t n = n0;
#ifdef LSTM_EXPORT_AVX512
  if (hidden >= 16) {
    for (; n + 8 <= n1; n += 8) {  // up to 3 batch rows x 8 output rows: 24 of 32 registers
      const float* w0 = w + n * hidden;
      int64_t b = 0;
      for (; b + 3 <= batch; b += 3) rows_times_block16<3>(h, w0, bias, z, b, n, hidden);
      if (batch - b == 2) rows_times_block16<2>(h, w0, bias, z, b, n, hidden);
      if (batch - b == 1) rows_times_block16<1>(h, w0, bias, z, b, n, hidden);
    }
  }
#endif
#ifdef LSTM_EXPORT_AVX2
  for (; n + 4 <= n1; n += 4) {  // 3 batch rows x 4 output rows: 12 of 16 registers
    const float* w0 = w + n * hidden;
    int64_t b = 0;
    for (; b + 3 <= batch; b += 3) rows_times_block<3>(h, w0, bias, z, b, n, hidden);
    if (batch - b == 2) rows_times_block<2>(h, w0, bias, z, b, n, hidden);
    if (batch - b == 1) rows_times_block<1>(h, w0, bias, z, b, n, hidden);
  }
#endif
  for (; n < n1; ++n) {  // scalar route: builds without AVX2
    const float* wr = w + n * hidden;
    for (int64_t b = 0; b < batch; ++b) {
      float s = 0.0f;
      for (int64_t k = 0; k < hidden; ++k) s += h[b * hidden + k] * wr[k];
      z[b * width + n] = bias[b * width + n] + s;
    }
  }
}

// Mean and 1/sqrt(var + eps) of v[0..n), as LayerNorm computes them (biased variance,
// two passes); each float lane of the vector route sums at most n / lanes terms.
void moments(const float* v, int64_t n, double eps, float& mean, float& rstd) {
  int64_t j = 0;
  double sum = 0.0, sq = 0.0;
#ifdef LSTM_EXPORT_AVX2
  using V = Wide;
  alignas(64) float lanes[V::kLanes];
  typename V::T acc = V::zero();
  for (; j + V::kLanes <= n; j += V::kLanes) acc = V::add(acc, V::load(v + j));
  V::lanes(acc, lanes);
  for (float lane : lanes) sum += lane;
#endif
  for (int64_t t = j; t < n; ++t) sum += v[t];
  const float m = static_cast<float>(sum / static_cast<double>(n));
  j = 0;
#ifdef LSTM_EXPORT_AVX2
  typename V::T vm = V::set1(m), sqv = V::zero();
  for (; j + V::kLanes <= n; j += V::kLanes) {
    typename V::T d = V::sub(V::load(v + j), vm);
    sqv = V::fmadd(d, d, sqv);
  }
  V::lanes(sqv, lanes);
  for (float lane : lanes) sq += lane;
#endif
  for (int64_t t = j; t < n; ++t) sq += (v[t] - m) * (v[t] - m);
  mean = m;
  rstd = static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(n) + eps));
}

// The gate LayerNorms, the activations and the cell update for one batch row.
void cell_update(float* z, float* c, float* h, float* y, const float* gamma, const float* beta,
                 const float* gamma_c, const float* beta_c, int64_t hidden, double eps) {
  float mean[4], rstd[4];
  for (int k = 0; k < 4; ++k) moments(z + k * hidden, hidden, eps, mean[k], rstd[k]);
  auto norm = [&](int k, int64_t j) {
    return (z[k * hidden + j] - mean[k]) * rstd[k] * gamma[k * hidden + j] + beta[k * hidden + j];
  };
  int64_t j = 0;
#ifdef LSTM_EXPORT_AVX2
  using V = Wide;
  using T = typename V::T;
  constexpr int64_t kLanes = V::kLanes;
  auto normv = [&](int k, int64_t at) {
    T v = V::sub(V::load(z + k * hidden + at), V::set1(mean[k]));
    return V::fmadd(V::mul(v, V::set1(rstd[k])), V::load(gamma + k * hidden + at),
                    V::load(beta + k * hidden + at));
  };
  for (; j + kLanes <= hidden; j += kLanes) {  // c = sigmoid(f) c + sigmoid(i) tanh(g)
    T i = sigmoid_v<V>(normv(0, j)), f = sigmoid_v<V>(normv(1, j)), g = tanh_v<V>(normv(2, j));
    V::store(c + j, V::fmadd(f, V::load(c + j), V::mul(i, g)));
  }
#endif
  for (; j < hidden; ++j) {
    c[j] = sigmoid1(norm(1, j)) * c[j] + sigmoid1(norm(0, j)) * std::tanh(norm(2, j));
  }
  float mean_c, rstd_c;
  moments(c, hidden, eps, mean_c, rstd_c);
  j = 0;
#ifdef LSTM_EXPORT_AVX2
  for (; j + kLanes <= hidden; j += kLanes) {  // h = sigmoid(o) tanh(LN_c(c))
    T v = V::mul(V::sub(V::load(c + j), V::set1(mean_c)), V::set1(rstd_c));
    v = V::fmadd(v, V::load(gamma_c + j), V::load(beta_c + j));
    T out = V::mul(sigmoid_v<V>(normv(3, j)), tanh_v<V>(v));
    V::store(h + j, out);
    V::store(y + j, out);
  }
#endif
  for (; j < hidden; ++j) {
    float v = (c[j] - mean_c) * rstd_c * gamma_c[j] + beta_c[j];
    h[j] = y[j] = sigmoid1(norm(3, j)) * std::tanh(v);
  }
}

// Whether h w_h^T goes through panels of packed weights: for batch >= 2 the packing (one
// copy of w_h, see pack_panels) pays for itself within a few steps; else dot products over
// w_h's rows. Only the vector routes have the panel route.
inline bool use_panels(int64_t seq, int64_t batch, int64_t hidden) {
#ifdef LSTM_EXPORT_AVX2
  return batch >= 2 && seq >= 8 && hidden % 4 == 0;
#else
  (void)seq, (void)batch, (void)hidden;
  return false;
#endif
}

// w [4H, H] as panels [4H / 16][H][16]: panels[p][k][j] = w[16 p + j][k] (hidden % 4 == 0).
inline void pack_panels(const float* w, int64_t hidden, float* panels) {
  for (int64_t p = 0; p < hidden / 4; ++p)
    for (int64_t k = 0; k < hidden; ++k)
      for (int64_t j = 0; j < 16; ++j)
        panels[(p * hidden + k) * 16 + j] = w[(p * 16 + j) * hidden + k];
}

// One layer's arguments, checked by the binding: every pointer to contiguous float32 (bool
// for valid) of the shape given, hidden >= 1.
struct Layer {
  int64_t seq, batch, hidden;
  const float* x_proj;   // [seq, batch, 4H]
  const float* w_h;      // [4H, H]
  const float* panels;   // pack_panels(w_h) if use_panels(seq, batch, hidden), else unused
  const float* gamma;    // [4H]: the four gate LayerNorms' weights, i f g o
  const float* beta;     // [4H]
  const float* gamma_c;  // [H]: the cell LayerNorm's
  const float* beta_c;   // [H]
  double eps;
  const bool* valid;  // [seq, batch], or null: every step is real
  float* y;           // [seq, batch, H], written
  float* h;           // [batch, H]: h0 in, h_n out
  float* c;           // [batch, H]: c0 in, c_n out
  float* z;           // [batch, 4H] scratch
};

// The whole time loop. parallel_for(begin, end, grain, fn) runs fn(b, e) over disjoint
// [b, e) covering [begin, end), each at least `grain` long except perhaps the last, on as
// many threads as it likes (at::parallel_for's contract); fn never throws.
template <class ParallelFor>
void run_layer(const Layer& l, const ParallelFor& parallel_for) {
  const int64_t batch = l.batch, hidden = l.hidden;
  const bool panels = use_panels(l.seq, batch, hidden);
  // Work items of about 16 Ki weights (64 KiB), so that both threads get work at hidden 256.
  const int64_t rows_per_item = panels ? 16 : 4;
  const int64_t items = 4 * hidden / rows_per_item;
  const int64_t grain = std::max<int64_t>(1, 16384 / (rows_per_item * hidden));
  float* hp = l.h;
  float* cp = l.c;
  float* zp = l.z;
  for (int64_t t = 0; t < l.seq; ++t) {
    const float* bias = l.x_proj + t * batch * 4 * hidden;
    parallel_for(int64_t{0}, items, grain, [&](int64_t begin, int64_t end) {
#ifdef LSTM_EXPORT_AVX2
      if (panels) {
        panel_matmul(hp, l.panels, bias, zp, batch, hidden, begin, end);
        return;
      }
#endif
      recurrent_matmul(hp, l.w_h, bias, zp, batch, hidden, 4 * begin, 4 * end);
    });
    float* yt = l.y + t * batch * hidden;
    const bool* mp = l.valid;
    parallel_for(int64_t{0}, batch, int64_t{1}, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        if (mp != nullptr && !mp[t * batch + b]) {  // padding: (h, c) carried, y = 0
          std::fill_n(yt + b * hidden, hidden, 0.0f);
          continue;
        }
        cell_update(zp + b * 4 * hidden, cp + b * hidden, hp + b * hidden, yt + b * hidden,
                    l.gamma, l.beta, l.gamma_c, l.beta_c, hidden, l.eps);
      }
    });
  }
}

}  // namespace
}  // namespace core
}  // namespace lstm_export
