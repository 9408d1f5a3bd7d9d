// One LayerNorm-LSTM layer over a whole sequence, as one TorchScript custom op:
//
//   lstm_export::layer_norm_lstm_layer(x_proj, h0, c0, w_h, gamma, beta, gamma_c, beta_c, eps)
//       -> (y, h_n, c_n)
//
// x_proj [seq, batch, 4H] is W_x x_t + b for every t (one matmul, done by the caller).
// Per step, in the order of the equations in lstm_export/model.py:
//   z = x_proj[t] + h W_h^T                         (w_h is hidden_lin.weight, [4H, H])
//   i, f, g, o = LN_k(z_k) = (z_k - mean) / sqrt(var + eps) * gamma[k] + beta[k]
//   c = sigmoid(f) * c + sigmoid(i) * tanh(g)
//   h = sigmoid(o) * tanh(LN_c(c))
// Why a kernel: per step, TorchScript pays a dispatch for each of a dozen small ops and
// MKL's small-batch GEMM is slow on non-Intel CPUs; here one pass does the matmul with
// AVX2 FMA and the LayerNorms and activations in registers.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LSTM_EXPORT_AVX2 1
#endif

namespace {

using at::Tensor;

#ifdef LSTM_EXPORT_AVX2
// exp of 8 floats: Cephes' polynomial (as in avx_mathfun), relative error about 1e-7.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
  x = _mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f));
  __m256 n = _mm256_floor_ps(
      _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.0f));
  __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(0x7f)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline __m256 sigmoid8(__m256 x) {
  __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

inline __m256 tanh8(__m256 x) {  // tanh(x) = 2 sigmoid(2x) - 1
  __m256 two = _mm256_set1_ps(2.0f);
  return _mm256_fmsub_ps(two, sigmoid8(_mm256_mul_ps(two, x)), _mm256_set1_ps(1.0f));
}

// [sum(a), sum(b), sum(c), sum(d)]
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}
#endif

inline float sigmoid1(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// z[b, n] = bias[b, n] + sum_k h[b, k] w[n, k] for output rows n in [n0, n1), n0 % 4 == 0.
void recurrent_matmul(const float* h, const float* w, const float* bias, float* z,
                      int64_t batch, int64_t hidden, int64_t n0, int64_t n1) {
  const int64_t width = 4 * hidden;
  int64_t n = n0;
#ifdef LSTM_EXPORT_AVX2
  const int64_t k8 = hidden - hidden % 8;
  for (; n + 4 <= n1; n += 4) {
    const float* w0 = w + n * hidden;
    for (int64_t b = 0; b < batch; b += 2) {
      const bool two = b + 1 < batch;
      const float* ha = h + b * hidden;
      const float* hb = two ? ha + hidden : ha;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
      for (int64_t k = 0; k < k8; k += 8) {
        __m256 x = _mm256_loadu_ps(ha + k), y = _mm256_loadu_ps(hb + k);
        __m256 r0 = _mm256_loadu_ps(w0 + k), r1 = _mm256_loadu_ps(w0 + hidden + k);
        __m256 r2 = _mm256_loadu_ps(w0 + 2 * hidden + k), r3 = _mm256_loadu_ps(w0 + 3 * hidden + k);
        a0 = _mm256_fmadd_ps(x, r0, a0); a1 = _mm256_fmadd_ps(x, r1, a1);
        a2 = _mm256_fmadd_ps(x, r2, a2); a3 = _mm256_fmadd_ps(x, r3, a3);
        b0 = _mm256_fmadd_ps(y, r0, b0); b1 = _mm256_fmadd_ps(y, r1, b1);
        b2 = _mm256_fmadd_ps(y, r2, b2); b3 = _mm256_fmadd_ps(y, r3, b3);
      }
      alignas(16) float sa[4], sb[4];
      _mm_store_ps(sa, hsum4(a0, a1, a2, a3));
      _mm_store_ps(sb, hsum4(b0, b1, b2, b3));
      for (int j = 0; j < 4; ++j) {
        const float* wr = w0 + j * hidden;
        for (int64_t k = k8; k < hidden; ++k) {
          sa[j] += ha[k] * wr[k];
          sb[j] += hb[k] * wr[k];
        }
        z[b * width + n + j] = bias[b * width + n + j] + sa[j];
        if (two) z[(b + 1) * width + n + j] = bias[(b + 1) * width + n + j] + sb[j];
      }
    }
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

// Mean and 1/sqrt(var + eps) of v[0..n), as LayerNorm computes them (biased variance).
void moments(const float* v, int64_t n, double eps, float& mean, float& rstd) {
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) sum += v[j];
  const double m = sum / static_cast<double>(n);
  double sq = 0.0;
  for (int64_t j = 0; j < n; ++j) sq += (v[j] - m) * (v[j] - m);
  mean = static_cast<float>(m);
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
  auto norm8 = [&](int k, int64_t at) {
    __m256 v = _mm256_sub_ps(_mm256_loadu_ps(z + k * hidden + at), _mm256_set1_ps(mean[k]));
    return _mm256_fmadd_ps(_mm256_mul_ps(v, _mm256_set1_ps(rstd[k])),
                           _mm256_loadu_ps(gamma + k * hidden + at),
                           _mm256_loadu_ps(beta + k * hidden + at));
  };
  for (; j + 8 <= hidden; j += 8) {  // c = sigmoid(f) c + sigmoid(i) tanh(g)
    __m256 i = sigmoid8(norm8(0, j)), f = sigmoid8(norm8(1, j)), g = tanh8(norm8(2, j));
    _mm256_storeu_ps(c + j, _mm256_fmadd_ps(f, _mm256_loadu_ps(c + j), _mm256_mul_ps(i, g)));
  }
#endif
  for (; j < hidden; ++j) {
    c[j] = sigmoid1(norm(1, j)) * c[j] + sigmoid1(norm(0, j)) * std::tanh(norm(2, j));
  }
  float mean_c, rstd_c;
  moments(c, hidden, eps, mean_c, rstd_c);
  j = 0;
#ifdef LSTM_EXPORT_AVX2
  for (; j + 8 <= hidden; j += 8) {  // h = sigmoid(o) tanh(LN_c(c))
    __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(c + j), _mm256_set1_ps(mean_c)),
                             _mm256_set1_ps(rstd_c));
    v = _mm256_fmadd_ps(v, _mm256_loadu_ps(gamma_c + j), _mm256_loadu_ps(beta_c + j));
    __m256 out = _mm256_mul_ps(sigmoid8(norm8(3, j)), tanh8(v));
    _mm256_storeu_ps(h + j, out);
    _mm256_storeu_ps(y + j, out);
  }
#endif
  for (; j < hidden; ++j) {
    float v = (c[j] - mean_c) * rstd_c * gamma_c[j] + beta_c[j];
    h[j] = y[j] = sigmoid1(norm(3, j)) * std::tanh(v);
  }
}

void check(const Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(),
              "layer_norm_lstm_layer: ", name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.sizes() == shape, "layer_norm_lstm_layer: ", name, " must have shape ", shape,
              ", got ", t.sizes());
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_lstm_layer(
    const Tensor& x_proj, const Tensor& h0, const Tensor& c0, const Tensor& w_h,
    const Tensor& gamma, const Tensor& beta, const Tensor& gamma_c, const Tensor& beta_c,
    double eps) {
  TORCH_CHECK(x_proj.dim() == 3 && x_proj.size(2) % 4 == 0,
              "layer_norm_lstm_layer: x_proj must be [seq, batch, 4 * hidden], got ",
              x_proj.sizes());
  const int64_t seq = x_proj.size(0), batch = x_proj.size(1), hidden = x_proj.size(2) / 4;
  check(x_proj, "x_proj", {seq, batch, 4 * hidden});
  check(h0, "h0", {batch, hidden});
  check(c0, "c0", {batch, hidden});
  check(w_h, "w_h", {4 * hidden, hidden});
  check(gamma, "gamma", {4 * hidden});
  check(beta, "beta", {4 * hidden});
  check(gamma_c, "gamma_c", {hidden});
  check(beta_c, "beta_c", {hidden});

  const Tensor xp = x_proj.contiguous(), w = w_h.contiguous();
  const Tensor g = gamma.contiguous(), bt = beta.contiguous();
  const Tensor gc = gamma_c.contiguous(), bc = beta_c.contiguous();
  Tensor y = at::empty({seq, batch, hidden}, xp.options());
  Tensor h = h0.contiguous().clone(), c = c0.contiguous().clone();
  Tensor z = at::empty({batch, 4 * hidden}, xp.options());
  float* hp = h.data_ptr<float>();
  float* cp = c.data_ptr<float>();
  float* zp = z.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  // Blocks of 4 output rows, about 64 KiB of w_h each, so both threads get work at hidden 256.
  const int64_t blocks = hidden;  // 4 * hidden rows / 4
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, hidden));
  for (int64_t t = 0; t < seq; ++t) {
    const float* bias = xp.data_ptr<float>() + t * batch * 4 * hidden;
    at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
      recurrent_matmul(hp, wp, bias, zp, batch, hidden, 4 * begin, 4 * end);
    });
    float* yt = y.data_ptr<float>() + t * batch * hidden;
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        cell_update(zp + b * 4 * hidden, cp + b * hidden, hp + b * hidden, yt + b * hidden,
                    g.data_ptr<float>(), bt.data_ptr<float>(), gc.data_ptr<float>(),
                    bc.data_ptr<float>(), hidden, eps);
      }
    });
  }
  return {y, h, c};
}

}  // namespace

TORCH_LIBRARY(lstm_export, m) {
  m.def(
      "layer_norm_lstm_layer(Tensor x_proj, Tensor h0, Tensor c0, Tensor w_h, Tensor gamma, "
      "Tensor beta, Tensor gamma_c, Tensor beta_c, float eps) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lstm_export, CPU, m) {
  m.impl("layer_norm_lstm_layer", &layer_norm_lstm_layer);
}
