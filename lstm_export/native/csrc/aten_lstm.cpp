// A plain (layer_norm=False) LSTM stack as one custom op, for model.pt2:
//
//   lstm_export::aten_lstm(x, h0, c0, params, num_layers, bidirectional, lengths=None)
//       -> (y, h_n, c_n)
//
// It is aten's own LSTM (at::lstm, what nn.LSTM runs) behind a schema torch.export keeps
// opaque: exported as it is, aten::lstm is decomposed step by step and the graph is frozen
// to the example's length. x is time-major [seq, batch, input]; h0, c0 [num_layers * D,
// batch, hidden]; params as at::lstm takes them (w_ih, w_hh, b_ih, b_hh per layer and
// direction). lengths (int64 [batch], each in 1..seq), when given, runs a padded batch the
// way nn.LSTM runs a packed sequence: sorted longest first, packed, run, padded back (y 0
// past each length), and put back in the caller's order; aten checks the lengths.
// The few ATen headers it uses, not <ATen/ATen.h>: that one doubles the library's build time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_pack_padded_sequence.h>
#include <ATen/ops/_pad_packed_sequence.h>
#include <ATen/ops/lstm.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor> aten_lstm(const Tensor& x, const Tensor& h0, const Tensor& c0,
                                             at::TensorList params, int64_t num_layers,
                                             bool bidirectional,
                                             const std::optional<Tensor>& lengths) {
  TORCH_CHECK(x.dim() == 3, "aten_lstm: x must be [seq, batch, input], got ", x.sizes());
  if (!lengths.has_value() || !lengths->defined()) {
    return at::lstm(x, {h0, c0}, params, /*has_biases=*/true, num_layers, /*dropout=*/0.0,
                    /*train=*/false, bidirectional, /*batch_first=*/false);
  }
  TORCH_CHECK(lengths->scalar_type() == at::kLong && lengths->dim() == 1 &&
                  lengths->size(0) == x.size(1),
              "lengths must be an int64 tensor of shape [batch=", x.size(1), "], got ",
              lengths->scalar_type(), " ", lengths->sizes());
  const auto [sorted, order] = lengths->sort(/*dim=*/0, /*descending=*/true);
  const Tensor unsort = order.argsort();
  const auto [data, batch_sizes] =
      at::_pack_padded_sequence(x.index_select(1, order), sorted, /*batch_first=*/false);
  const auto [packed, h, c] =
      at::lstm(data, batch_sizes, {h0.index_select(1, order), c0.index_select(1, order)}, params,
               /*has_biases=*/true, num_layers, /*dropout=*/0.0, /*train=*/false, bidirectional);
  const auto [y, unused] = at::_pad_packed_sequence(packed, batch_sizes, /*batch_first=*/false,
                                                     /*padding_value=*/0.0, x.size(0));
  return {y.index_select(1, unsort), h.index_select(1, unsort), c.index_select(1, unsort)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lstm_export, m) {
  m.def(
      "aten_lstm(Tensor x, Tensor h0, Tensor c0, Tensor[] params, int num_layers, "
      "bool bidirectional, Tensor? lengths=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lstm_export, CPU, m) { m.impl("aten_lstm", &aten_lstm); }

// Inference only: backward through the op raises instead of silently returning nothing.
TORCH_LIBRARY_IMPL(lstm_export, Autograd, m) {
  m.impl("aten_lstm", torch::autograd::autogradNotImplementedFallback());
}
