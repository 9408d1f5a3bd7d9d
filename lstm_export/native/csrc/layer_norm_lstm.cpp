// One LayerNorm-LSTM layer over a whole sequence, as one TorchScript custom op:
//
//   lstm_export::layer_norm_lstm_layer(x_proj, h0, c0, w_h, gamma, beta, gamma_c, beta_c, eps,
//                                      valid=None) -> (y, h_n, c_n)
//
// x_proj [seq, batch, 4H] is W_x x_t + b for every t (one matmul, done by the caller).
// valid, optional bool [seq, batch]: where false (the padding of a ragged batch) the row's
// (h, c) is carried unchanged and y is 0, as LSTMCell.scan masks; None: every step is real.
// It is the last argument with a default, so a model.fused.pt saved before it existed (a
// call with nine arguments) still loads and runs.
// This file is the TorchScript binding: the checks, the tensors, at::parallel_for. The
// equations and their arithmetic (AVX-512, AVX2/FMA and scalar routes) are in
// layer_norm_lstm_core.h, shared with the onnxruntime binding (ort_layer_norm_lstm.cpp).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "layer_norm_lstm_core.h"

namespace {

using at::Tensor;

void check(const Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(),
              "layer_norm_lstm_layer: ", name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.sizes() == shape, "layer_norm_lstm_layer: ", name, " must have shape ", shape,
              ", got ", t.sizes());
}

// The time loop on one OpenMP team for the whole layer, not a parallel region per step:
// run_layer asks for two parallel-fors per time step, and at::parallel_for forks (wakes) the
// pool for each, some microseconds every time, which at batch 16 cost a quarter of the layer
// (measured: 11.6 ms where onnxruntime's spinning pool ran the same core in 8.8). Every
// thread of the team runs run_layer's loop (it writes nothing outside the parallel-fors),
// takes its slice of each parallel-for's range and meets the others at a barrier after it.
void run_in_team(const lstm_export::core::Layer& layer) {
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (threads <= 1) {
    lstm_export::core::run_layer(layer, [](int64_t begin, int64_t end, int64_t, const auto& fn) {
      fn(begin, end);
    });
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
    lstm_export::core::run_layer(layer, [&](int64_t begin, int64_t end, int64_t grain,
                                            const auto& fn) {
      // As many slices as the range has grains, at most one per thread; the rest wait.
      const int64_t slices = std::min<int64_t>(team, std::max<int64_t>(1, (end - begin) / grain));
      if (me < slices) {
        const int64_t size = (end - begin + slices - 1) / slices;
        const int64_t first = begin + me * size;
        if (first < end) fn(first, std::min(end, first + size));
      }
#pragma omp barrier
    });
  }
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_lstm_layer(
    const Tensor& x_proj, const Tensor& h0, const Tensor& c0, const Tensor& w_h,
    const Tensor& gamma, const Tensor& beta, const Tensor& gamma_c, const Tensor& beta_c,
    double eps, const std::optional<Tensor>& valid) {
  TORCH_CHECK(x_proj.dim() == 3 && x_proj.size(2) % 4 == 0,
              "layer_norm_lstm_layer: x_proj must be [seq, batch, 4 * hidden], got ",
              x_proj.sizes());
  const int64_t seq = x_proj.size(0), batch = x_proj.size(1), hidden = x_proj.size(2) / 4;
  TORCH_CHECK(hidden >= 1, "layer_norm_lstm_layer: hidden size must be >= 1, got 0");
  check(x_proj, "x_proj", {seq, batch, 4 * hidden});
  check(h0, "h0", {batch, hidden});
  check(c0, "c0", {batch, hidden});
  check(w_h, "w_h", {4 * hidden, hidden});
  check(gamma, "gamma", {4 * hidden});
  check(beta, "beta", {4 * hidden});
  check(gamma_c, "gamma_c", {hidden});
  check(beta_c, "beta_c", {hidden});
  const bool masked = valid.has_value() && valid->defined();
  if (masked) {
    TORCH_CHECK(valid->scalar_type() == at::kBool && valid->device().is_cpu(),
                "layer_norm_lstm_layer: valid must be a bool CPU tensor, got ",
                valid->scalar_type());
    TORCH_CHECK(valid->sizes() == at::IntArrayRef({seq, batch}),
                "layer_norm_lstm_layer: valid must have shape ", at::IntArrayRef({seq, batch}),
                ", got ", valid->sizes());
  }
  const Tensor mask = masked ? valid->contiguous() : Tensor();
  const bool* mp = masked ? mask.data_ptr<bool>() : nullptr;

  const Tensor xp = x_proj.contiguous(), w = w_h.contiguous();
  const Tensor g = gamma.contiguous(), bt = beta.contiguous();
  const Tensor gc = gamma_c.contiguous(), bc = beta_c.contiguous();
  Tensor y = at::empty({seq, batch, hidden}, xp.options());
  Tensor h = h0.contiguous().clone(), c = c0.contiguous().clone();
  Tensor z = at::empty({batch, 4 * hidden}, xp.options());
  // Route of h w_h^T: panels of packed weights for batch >= 2, else dot products (see core).
  const bool use_panels = lstm_export::core::use_panels(seq, batch, hidden);
  const Tensor panels = use_panels ? at::empty({4 * hidden * hidden}, xp.options()) : Tensor();
  if (use_panels) {
    lstm_export::core::pack_panels(w.data_ptr<float>(), hidden, panels.data_ptr<float>());
  }
  const lstm_export::core::Layer layer{
      seq,
      batch,
      hidden,
      xp.data_ptr<float>(),
      w.data_ptr<float>(),
      use_panels ? panels.data_ptr<float>() : nullptr,
      g.data_ptr<float>(),
      bt.data_ptr<float>(),
      gc.data_ptr<float>(),
      bc.data_ptr<float>(),
      eps,
      mp,
      y.data_ptr<float>(),
      h.data_ptr<float>(),
      c.data_ptr<float>(),
      z.data_ptr<float>(),
  };
  run_in_team(layer);
  return {y, h, c};
}

}  // namespace

TORCH_LIBRARY(lstm_export, m) {
  m.def(
      "layer_norm_lstm_layer(Tensor x_proj, Tensor h0, Tensor c0, Tensor w_h, Tensor gamma, "
      "Tensor beta, Tensor gamma_c, Tensor beta_c, float eps, Tensor? valid=None) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lstm_export, CPU, m) {
  m.impl("layer_norm_lstm_layer", &layer_norm_lstm_layer);
}

// Inference only: backward through the op raises instead of silently returning nothing.
TORCH_LIBRARY_IMPL(lstm_export, Autograd, m) {
  m.impl("layer_norm_lstm_layer", torch::autograd::autogradNotImplementedFallback());
}
