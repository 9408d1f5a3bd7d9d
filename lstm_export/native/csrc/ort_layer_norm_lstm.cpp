// One LayerNorm-LSTM layer over a whole sequence, as an onnxruntime custom op:
//
//   domain lstm_export (version 1), op LayerNormLSTMLayer, float attribute eps
//   inputs:  x_proj [seq, batch, 4H], h0 [batch, H], c0 [batch, H], w_h [4H, H], gamma [4H],
//            beta [4H], gamma_c [H], beta_c [H] (all float), valid (bool [seq, batch], optional)
//   outputs: y [seq, batch, H], h_n [batch, H], c_n [batch, H] (float)
//
// The same op as the TorchScript one (layer_norm_lstm.cpp): the arithmetic is the shared
// core, layer_norm_lstm_core.h; this file is the onnxruntime binding (checks, outputs,
// scratch, the parallel-for). x_proj is W_x x_t + b for every t (one MatMul in the graph);
// where valid is false (the padding of a ragged batch) the row's (h, c) is carried and y is 0;
// without valid (absent, or the empty name) every step is real.
//
// Built against onnxruntime's C/C++ API headers only (no libonnxruntime, no libtorch): the
// runtime hands us its API table in RegisterCustomOps, which Python reaches through
// SessionOptions.register_custom_ops_library(path). Bad inputs (types, shapes, a missing eps)
// come back as an onnxruntime error status: nothing here lets an exception cross the C ABI.
//
// Classic Ort::CustomOpBase rather than the lite API (onnxruntime_lite_custom_op.h): the lite
// API declares every input optional (so a node without x_proj would pass session creation),
// does not treat an optional input given as the empty name as absent, and builds its
// argument tuple before our code runs, where a throw would leave the C ABI.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "layer_norm_lstm_core.h"

namespace {

constexpr const char* kDomain = "lstm_export";
constexpr const char* kOpName = "LayerNormLSTMLayer";
constexpr size_t kRequiredInputs = 8;  // and valid, the optional ninth
const char* const kInputNames[] = {"x_proj", "h0",      "c0",     "w_h",  "gamma",
                                   "beta",   "gamma_c", "beta_c", "valid"};

// A bad input: becomes ORT_INVALID_ARGUMENT with the message.
struct BadInput : std::runtime_error {
  explicit BadInput(const std::string& what) : std::runtime_error(what) {}
};

// An exception from our code as an onnxruntime status (never across the C ABI).
OrtStatusPtr status_of_current_exception() noexcept {
  try {
    throw;
  } catch (const BadInput& e) {
    return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, e.what());
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(),
                                      (std::string(kOpName) + ": " + e.what()).c_str());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, (std::string(kOpName) + ": " + e.what()).c_str());
  } catch (...) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, "LayerNormLSTMLayer: unknown error");
  }
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

// Input `index` as a tensor of `type`; its shape.
std::vector<int64_t> tensor_shape(const Ort::ConstValue& value, size_t index,
                                  ONNXTensorElementDataType type, const char* type_name) {
  const std::string name = kInputNames[index];
  if (value == nullptr) throw BadInput(std::string(kOpName) + ": input " + name + " is missing");
  if (!value.IsTensor()) throw BadInput(std::string(kOpName) + ": " + name + " must be a tensor");
  const auto info = value.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != type) {
    throw BadInput(std::string(kOpName) + ": " + name + " must be a " + type_name + " tensor");
  }
  return info.GetShape();
}

// Input `index`: float32 of exactly `shape`.
const float* float_input(const Ort::KernelContext& ctx, size_t index,
                         const std::vector<int64_t>& shape) {
  const Ort::ConstValue value = ctx.GetInput(index);
  const auto got = tensor_shape(value, index, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "float32");
  if (got != shape) {
    throw BadInput(std::string(kOpName) + ": " + kInputNames[index] + " must have shape " +
                   shape_text(shape) + ", got " + shape_text(got));
  }
  return value.GetTensorData<float>();
}

// at::parallel_for's contract on onnxruntime's intra-op thread pool
// (OrtApi::KernelContext_ParallelFor, API 17+): the range cut into chunks of `grain` items,
// each chunk one unit of the pool's work; with one thread (no pool) the chunks run here, in
// order. fn never throws (the core's loops do not).
class PoolParallelFor {
 public:
  explicit PoolParallelFor(const Ort::KernelContext& ctx) : ctx_(ctx) {}

  template <class F>
  void operator()(int64_t begin, int64_t end, int64_t grain, const F& fn) const {
    const int64_t n = end - begin;
    if (n <= 0) return;
    const int64_t chunks = (n + grain - 1) / grain;
    if (chunks == 1) {
      fn(begin, end);
      return;
    }
    struct Job {
      const F* fn;
      int64_t begin, end, grain;
    } job{&fn, begin, end, grain};
    ctx_.ParallelFor(
        [](void* data, size_t chunk) {
          const Job& j = *static_cast<const Job*>(data);
          const int64_t first = j.begin + static_cast<int64_t>(chunk) * j.grain;
          (*j.fn)(first, std::min(j.end, first + j.grain));
        },
        static_cast<size_t>(chunks), 0, &job);
  }

 private:
  const Ort::KernelContext& ctx_;
};

struct LayerNormLSTMKernel {
  double eps;
  // w_h packed into panels once, when the session holds it as a constant initializer (as
  // model.fused.onnx does) and the core takes panels at its hidden size; else empty, and
  // each call that takes panels packs its own copy.
  std::vector<float> packed_w_h;
  int64_t packed_hidden = 0;

  // What CustomOpBase<..., WithStatus=true> calls: every error a status.
  OrtStatusPtr ComputeV2(OrtKernelContext* context) const noexcept {
    try {
      Compute(context);
      return nullptr;
    } catch (...) {
      return status_of_current_exception();
    }
  }

  void Compute(OrtKernelContext* context) const {
    Ort::KernelContext ctx(context);
    const size_t inputs = ctx.GetInputCount();
    if (inputs < kRequiredInputs || inputs > kRequiredInputs + 1) {
      throw BadInput(std::string(kOpName) + ": takes 8 inputs and an optional ninth, got " +
                     std::to_string(inputs));
    }
    const Ort::ConstValue x_value = ctx.GetInput(0);
    const auto x_shape = tensor_shape(x_value, 0, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "float32");
    if (x_shape.size() != 3 || x_shape[2] % 4 != 0) {
      throw BadInput(std::string(kOpName) + ": x_proj must be [seq, batch, 4 * hidden], got " +
                     shape_text(x_shape));
    }
    const int64_t seq = x_shape[0], batch = x_shape[1], hidden = x_shape[2] / 4;
    if (hidden < 1) throw BadInput(std::string(kOpName) + ": hidden size must be >= 1, got 0");
    const float* x_proj = x_value.GetTensorData<float>();
    const float* h0 = float_input(ctx, 1, {batch, hidden});
    const float* c0 = float_input(ctx, 2, {batch, hidden});
    const float* w_h = float_input(ctx, 3, {4 * hidden, hidden});
    const float* gamma = float_input(ctx, 4, {4 * hidden});
    const float* beta = float_input(ctx, 5, {4 * hidden});
    const float* gamma_c = float_input(ctx, 6, {hidden});
    const float* beta_c = float_input(ctx, 7, {hidden});
    const bool* valid = nullptr;
    if (inputs > kRequiredInputs) {
      const Ort::ConstValue mask = ctx.GetInput(kRequiredInputs);
      if (mask != nullptr) {  // the empty name: absent
        const auto shape =
            tensor_shape(mask, kRequiredInputs, ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL, "bool");
        if (shape != std::vector<int64_t>{seq, batch}) {
          throw BadInput(std::string(kOpName) + ": valid must have shape " +
                         shape_text({seq, batch}) + ", got " + shape_text(shape));
        }
        valid = mask.GetTensorData<bool>();
      }
    }

    float* y = ctx.GetOutput(0, {seq, batch, hidden}).GetTensorMutableData<float>();
    float* h = ctx.GetOutput(1, {batch, hidden}).GetTensorMutableData<float>();
    float* c = ctx.GetOutput(2, {batch, hidden}).GetTensorMutableData<float>();
    std::copy_n(h0, batch * hidden, h);  // the core updates (h, c) in place
    std::copy_n(c0, batch * hidden, c);
    std::vector<float> z(static_cast<size_t>(batch * 4 * hidden));
    const bool use_panels = lstm_export::core::use_panels(seq, batch, hidden);
    const bool prepacked = use_panels && packed_hidden == hidden;
    std::vector<float> panels(use_panels && !prepacked ? static_cast<size_t>(4 * hidden * hidden)
                                                       : 0);
    if (use_panels && !prepacked) lstm_export::core::pack_panels(w_h, hidden, panels.data());
    const float* panel_data = prepacked ? packed_w_h.data() : panels.data();
    const lstm_export::core::Layer layer{
        seq,     batch,  hidden, x_proj, w_h, use_panels ? panel_data : nullptr,
        gamma,   beta,   gamma_c, beta_c, eps, valid, y, h, c, z.data(),
    };
    lstm_export::core::run_layer(layer, PoolParallelFor(ctx));
  }
};

struct LayerNormLSTMOp
    : Ort::CustomOpBase<LayerNormLSTMOp, LayerNormLSTMKernel, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info,
                              void** kernel) const noexcept {
    try {
      float eps = 0.0f;
      try {
        eps = Ort::ConstKernelInfo(info).GetAttribute<float>("eps");
      } catch (const Ort::Exception& e) {
        throw BadInput(std::string(kOpName) + ": needs the float attribute eps (" + e.what() +
                       ")");
      }
      auto made = std::make_unique<LayerNormLSTMKernel>();
      made->eps = static_cast<double>(eps);
      prepack(info, *made);
      *kernel = made.release();
      return nullptr;
    } catch (...) {
      return status_of_current_exception();
    }
  }

  // w_h (input 3) packed into the kernel when it is a constant initializer of a shape the
  // panels take ([4H, H], H % 4 == 0); anything else (not constant, another shape or type,
  // an older runtime's error) leaves it to Compute, which checks and packs per call.
  static void prepack(const OrtKernelInfo* info, LayerNormLSTMKernel& kernel) noexcept {
    try {
      int is_constant = 0;
      const Ort::ConstValue w = Ort::ConstKernelInfo(info).GetTensorConstantInput(3, &is_constant);
      if (!is_constant || w == nullptr || !w.IsTensor()) return;
      const auto type_and_shape = w.GetTensorTypeAndShapeInfo();
      const auto shape = type_and_shape.GetShape();
      if (type_and_shape.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ||
          shape.size() != 2 || shape[1] < 1 || shape[0] != 4 * shape[1]) {
        return;
      }
      const int64_t hidden = shape[1];
      if (!lstm_export::core::use_panels(8, 2, hidden)) return;  // no panels at this size
      kernel.packed_w_h.resize(static_cast<size_t>(4 * hidden * hidden));
      lstm_export::core::pack_panels(w.GetTensorData<float>(), hidden, kernel.packed_w_h.data());
      kernel.packed_hidden = hidden;
    } catch (...) {
      kernel.packed_w_h.clear();
      kernel.packed_hidden = 0;
    }
  }

  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }

  size_t GetInputTypeCount() const { return kRequiredInputs + 1; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == kRequiredInputs ? ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL
                                    : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == kRequiredInputs ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }

  size_t GetOutputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetOutputType(size_t /*index*/) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
};

std::mutex domains_mutex;
// One domain per RegisterCustomOps call (per SessionOptions), alive as long as the library:
// onnxruntime keeps the library loaded while a session that uses it exists.
std::vector<Ort::CustomOpDomain>& domains() {
  static std::vector<Ort::CustomOpDomain> kept;
  return kept;
}
const LayerNormLSTMOp& the_op() {
  static const LayerNormLSTMOp op;
  return op;
}
}  // namespace

extern "C" ORT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                               const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {  // a runtime older than the headers we were built with
    const std::string message =
        std::string("the lstm_export op library needs onnxruntime's C API ") +
        std::to_string(ORT_API_VERSION) + " or newer; this onnxruntime is " +
        api_base->GetVersionString();
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, message.c_str());
  }
  Ort::InitApi(api);
  try {
    Ort::CustomOpDomain domain(kDomain);
    domain.Add(&the_op());
    Ort::UnownedSessionOptions(options).Add(domain);
    std::lock_guard<std::mutex> lock(domains_mutex);
    domains().push_back(std::move(domain));
    return nullptr;
  } catch (...) {
    return status_of_current_exception();
  }
}
