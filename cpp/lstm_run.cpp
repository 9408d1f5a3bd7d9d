// lstm_run - run an lstm_export model from C++ with libtorch: model.pt (TorchScript) or
// model.pt2 (torch.export + AOTInductor, from `lstm-export export --pt2`).
//
// This is the example to copy into your own C++ program. It shows the four things
// you need:
//   1. load the model, no Python and no lstm_export code needed:
//      model.pt   with torch::jit::load;
//      model.pt2  with torch::inductor::AOTIModelPackageLoader(path, name), after a
//                 dlopen(RTLD_NOW | RTLD_GLOBAL) of lstm_export_kernels.so, the op library
//                 its models call (see load_kernels). The package holds one compiled model
//                 per form of the call, each with flat tensor inputs and outputs {y, h_n, c_n}:
//                   "model"                forward(x)
//                   "model_state"          forward(x, (h0, c0))    inputs x, h0, c0
//                   "model_lengths"        forward(x, None, lengths)   inputs x, lengths
//                   "model_state_lengths"  forward(x, (h0, c0), lengths)
//                 (see Pt2Model);
//   2. read the model's config: model.pt's TorchScript attributes, model.pt2's metadata
//      "lstm_export.config", a flat JSON object (see parse_config_json);
//   3. call forward(x, state, lengths) with state = None (zeros) or an (h0, c0) tuple, and
//      lengths (int64 [batch], where each sequence of a padded batch ends) only when given.
//      A compiled model.pt2 checks neither shapes nor dtypes (it reads whatever memory it
//      is given), so its inputs are checked here first (check_inputs), in model.pt's words;
//   4. stream a long sequence in chunks, carrying (h, c) from one call to the next.
// It can also time forward calls (time_forward below), for comparing with Python.
// Tensors come in and go out as float32 .npy files (see npy.hpp), which numpy reads
// and writes with np.load / np.save.
//
// Usage:
//   lstm_run MODEL                            print the model config and exit
//   lstm_run MODEL --x X.npy [--h0 H0.npy --c0 C0.npy] [--lengths L.npy | --chunk N]
//            [--out DIR] [--threads N]
//   lstm_run MODEL --time-seq S --time-batch B [--lengths L.npy] [--repeats N]
//            [--warmup W] [--threads N]
//   Any of these with --kernels LIB.so: load that op library first (see load_kernels);
//   model.pt2 and model.fused.pt need the export's lstm_export_kernels.so.
//
//   MODEL is a model.pt, a model.pt2 (any path ending in .pt2) or an export folder (then its
//   model.pt). X.npy is float32 [seq, batch, input_size] ([batch, seq, input_size] for a
//   batch_first model: passed as the model expects it); H0.npy and C0.npy are
//   [num_layers * D, batch, hidden_size] (D = 2 for a bidirectional model). L.npy is int64
//   [batch], each in 1..seq: forward's third argument. --chunk N feeds the sequence N time
//   steps per forward call (not with --lengths, nor for a bidirectional model).
//   DIR/y.npy, DIR/h.npy, DIR/c.npy receive y (x's layout, D * hidden_size features) and
//   the final h, c. --threads sets libtorch's intra-op threads (default 1, see run()).
//
//   --time-seq S --time-batch B times forward(x, None[, lengths]) on a random x of S steps
//   and B sequences: W untimed calls (default 3), then N timed ones (default 15), printed
//   in milliseconds on one line, "timing_ms: 1.234567 1.250000 ...".
//
// Errors are one line on stderr, "lstm_run: error: ...". Exit codes: 0 success,
// 1 the model or an input could not be loaded or run, 2 a bad command line (also one this
// model cannot take: --lengths for a model exported before lengths, --chunk for a
// bidirectional one).
#include <ATen/Parallel.h>  // at::set_num_threads
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>  // model.pt2
#include <torch/script.h>

#include <dlfcn.h>  // dlopen: the fused kernel's op library

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "npy.hpp"

namespace fs = std::filesystem;

namespace {

using State = std::tuple<torch::Tensor, torch::Tensor>;  // (h, c)

// A problem with the command line (exit code 2); anything else exits with 1.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Options {
  std::string model;
  std::string x, h0, c0, out;
  std::string lengths;  // int64 [batch] .npy: forward's third argument
  std::string kernels;  // op library to load before the model (model.pt2, model.fused.pt)
  int64_t chunk = 0;  // 0: the whole sequence in one call
  int64_t threads = 1;
  // Timing mode: on when time_seq and time_batch are set (both > 0).
  int64_t time_seq = 0, time_batch = 0;
  std::optional<int64_t> repeats, warmup;  // defaults 15 and 3, see run()
};

// One line: it also ends the error messages, which are one line each.
const char* const kUsage =
    "usage: lstm_run MODEL.pt|MODEL.pt2 [--x X.npy [--h0 H0.npy --c0 C0.npy] [--lengths L.npy | "
    "--chunk N] [--out DIR] | --time-seq S --time-batch B [--lengths L.npy] [--repeats N] "
    "[--warmup W]] [--threads N] [--kernels LIB.so]";

// A whole number >= minimum (and small enough for an int), else a UsageError.
int64_t parse_int(const std::string& flag, const std::string& value, int64_t minimum = 1) {
  char* end = nullptr;
  errno = 0;
  const long long n = std::strtoll(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0' || errno == ERANGE || n < minimum || n > INT_MAX) {
    throw UsageError(flag + " must be an integer >= " + std::to_string(minimum) + ", got '" +
                     value + "'");
  }
  return n;
}

Options parse_args(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      std::cout << kUsage << "\n";
      std::exit(0);
    }
    if (arg == "--x" || arg == "--h0" || arg == "--c0" || arg == "--chunk" || arg == "--out" ||
        arg == "--threads" || arg == "--time-seq" || arg == "--time-batch" ||
        arg == "--repeats" || arg == "--warmup" || arg == "--kernels" || arg == "--lengths") {
      if (i + 1 >= argc) throw UsageError(arg + " needs a value");
      const std::string value = argv[++i];
      if (arg == "--x") opt.x = value;
      if (arg == "--h0") opt.h0 = value;
      if (arg == "--c0") opt.c0 = value;
      if (arg == "--out") opt.out = value;
      if (arg == "--kernels") opt.kernels = value;
      if (arg == "--lengths") opt.lengths = value;
      if (arg == "--chunk") opt.chunk = parse_int(arg, value);
      if (arg == "--threads") opt.threads = parse_int(arg, value);
      if (arg == "--time-seq") opt.time_seq = parse_int(arg, value);
      if (arg == "--time-batch") opt.time_batch = parse_int(arg, value);
      if (arg == "--repeats") opt.repeats = parse_int(arg, value);
      if (arg == "--warmup") opt.warmup = parse_int(arg, value, /*minimum=*/0);
    } else if (!arg.empty() && arg[0] == '-') {
      throw UsageError("unknown option '" + arg + "'; " + kUsage);
    } else if (opt.model.empty()) {
      opt.model = arg;
    } else {
      throw UsageError("unexpected argument '" + arg + "'; " + kUsage);
    }
  }
  if (opt.model.empty()) throw UsageError(std::string("no model given; ") + kUsage);
  if (opt.h0.empty() != opt.c0.empty()) throw UsageError("give both --h0 and --c0, or neither");
  if (opt.x.empty() && (!opt.h0.empty() || opt.chunk || !opt.out.empty())) {
    throw UsageError("--h0, --c0, --chunk and --out need --x");
  }
  if ((opt.time_seq > 0) != (opt.time_batch > 0)) {
    throw UsageError("give both --time-seq and --time-batch, or neither");
  }
  const bool timing = opt.time_seq > 0;
  if (!timing && (opt.repeats || opt.warmup)) {
    throw UsageError("--repeats and --warmup need --time-seq and --time-batch");
  }
  if (timing && !opt.x.empty()) {
    throw UsageError("--time-seq/--time-batch make their own input; drop --x");
  }
  if (!opt.lengths.empty() && opt.x.empty() && !timing) {
    throw UsageError("--lengths needs --x (or --time-seq and --time-batch)");
  }
  if (!opt.lengths.empty() && opt.chunk) {
    throw UsageError("--chunk streams one sequence; a padded batch with --lengths runs whole");
  }
  return opt;
}

// TorchScript errors carry the TorchScript traceback; the Python exception raised
// by the model ("builtins.ValueError: x must have shape ...") is its last line.
// Keep that line, so the user sees the model's own message and nothing else.
std::string last_meaningful_line(const std::string& text) {
  std::istringstream lines(text);
  std::string line, last;
  while (std::getline(lines, line)) {
    const size_t begin = line.find_first_not_of(" \t\r");
    if (begin == std::string::npos) continue;
    const size_t end = line.find_last_not_of(" \t\r");
    line = line.substr(begin, end - begin + 1);
    // Skip the "~~~~ <--- HERE" markers under the failing source line.
    if (line.find_first_not_of("~^") == std::string::npos) continue;
    if (line.find("<--- HERE") != std::string::npos) continue;
    last = line;
  }
  const std::string prefix = "builtins.";
  if (last.rfind(prefix, 0) == 0) last = last.substr(prefix.size());
  return last.empty() ? "unknown error" : last;
}

// c10::Error::what() may append a C++ stack trace; its first non-blank line is the
// message (an unknown op's message starts with a newline).
std::string first_line(const std::string& text) {
  const size_t begin = std::min(text.find_first_not_of(" \t\r\n"), text.size());
  return text.substr(begin, text.find('\n', begin) - begin);
}

// The first sentence of a libtorch message, without its generic advice.
std::string first_sentence(const std::string& text) {
  const std::string line = first_line(text);
  return line.substr(0, line.find(". "));
}

// model.pt2 (export --pt2) and model.fused.pt (export --fused-kernel) call the ops
// lstm_export::layer_norm_lstm_layer and lstm_export::aten_lstm, which
// lstm_export_kernels.so registers with libtorch when it is loaded: a dlopen with
// RTLD_GLOBAL before loading the model is all it takes.
void load_kernels(const std::string& path) {
  if (path.empty()) return;
  if (dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    throw std::runtime_error("cannot load the op library '" + path + "' (" +
                             first_line(dlerror()) + ")");
  }
}

const char* const kKernelsHint = "; load its op library with --kernels lstm_export_kernels.so";

struct Config {
  int64_t input_size, hidden_size, num_layers;
  bool layer_norm, batch_first, bidirectional;
  bool takes_lengths;  // forward(x, state, lengths); exports before lengths lack it

  int64_t directions() const { return bidirectional ? 2 : 1; }
};

// "[4, 3, 6]": shapes in messages, written as the Python model writes them.
std::string dims(const torch::Tensor& t) {
  std::ostringstream s;
  s << '[';
  for (int64_t i = 0; i < t.dim(); ++i) s << (i ? ", " : "") << t.size(i);
  s << ']';
  return s.str();
}

// The model behind one call, whichever file it came from:
// forward(x, state or None, lengths or None) -> (y, (h, c)).
class Model {
 public:
  explicit Model(const Config& config) : cfg(config) {}
  virtual ~Model() = default;
  virtual std::pair<torch::Tensor, State> forward(const torch::Tensor& x,
                                                  const std::optional<State>& state,
                                                  const std::optional<torch::Tensor>& lengths) = 0;
  const Config cfg;
};

// ---- model.pt: TorchScript ------------------------------------------------------------

// An optional bool attribute: exports before batch_first/bidirectional lack them (false).
bool flag(const torch::jit::Module& model, const char* name) {
  return model.hasattr(name) && model.attr(name).toBool();
}

class TorchScriptModel : public Model {
 public:
  TorchScriptModel(torch::jit::Module module, const Config& config)
      : Model(config), module_(std::move(module)) {}

  // One forward call. A missing state is passed as None: the model starts from zeros.
  // Lengths are passed only when given, so a model exported before them (forward(x, state))
  // runs as it always did. The model checks its inputs itself.
  std::pair<torch::Tensor, State> forward(const torch::Tensor& x, const std::optional<State>& state,
                                          const std::optional<torch::Tensor>& lengths) override {
    std::vector<torch::jit::IValue> inputs{x};
    inputs.emplace_back(state ? torch::jit::IValue(*state) : torch::jit::IValue());
    if (lengths) inputs.emplace_back(*lengths);
    try {
      const auto output = module_.forward(inputs).toTuple();  // (y, (h, c))
      const auto hc = output->elements()[1].toTuple();
      return {output->elements()[0].toTensor(),
              State{hc->elements()[0].toTensor(), hc->elements()[1].toTensor()}};
    } catch (const std::exception& e) {  // torch::jit::JITException or c10::Error
      throw std::runtime_error(last_meaningful_line(e.what()));
    }
  }

 private:
  torch::jit::Module module_;
};

// The exported LSTM keeps its config as plain TorchScript attributes.
Config read_config(const torch::jit::Module& model, const std::string& path) {
  for (const char* name : {"input_size", "hidden_size", "num_layers", "layer_norm"}) {
    if (!model.hasattr(name)) {
      throw std::runtime_error("'" + path + "' is a TorchScript module but not an lstm_export " +
                               "LSTM: it has no '" + name + "' attribute");
    }
  }
  bool takes_lengths = false;
  for (const auto& argument : model.get_method("forward").function().getSchema().arguments()) {
    takes_lengths = takes_lengths || argument.name() == "lengths";
  }
  return Config{model.attr("input_size").toInt(), model.attr("hidden_size").toInt(),
                model.attr("num_layers").toInt(), model.attr("layer_norm").toBool(),
                flag(model, "batch_first"),       flag(model, "bidirectional"),
                takes_lengths};
}

torch::jit::Module read_torchscript(const fs::path& path) {
  // A c10::Error for a file that is not TorchScript; an ErrorReport (a std::exception)
  // for TorchScript that cannot be compiled here, such as a call to an unknown op.
  std::string why;
  try {
    return torch::jit::load(path.string(), torch::kCPU);
  } catch (const c10::Error& e) {
    why = first_sentence(e.what_without_backtrace());
  } catch (const std::exception& e) {
    why = first_sentence(e.what());
  }
  if (!why.empty() && why.back() == '.') why.pop_back();
  const std::string hint = why.find("lstm_export::") != std::string::npos ? kKernelsHint : "";
  throw std::runtime_error("cannot load '" + path.string() + "' as a TorchScript module (" +
                           why + ")" + hint);
}

std::unique_ptr<Model> load_torchscript(const fs::path& path) {
  torch::jit::Module module = read_torchscript(path);
  module.eval();
  const Config cfg = read_config(module, path.string());
  return std::make_unique<TorchScriptModel>(std::move(module), cfg);
}

// ---- model.pt2: an AOTInductor package ------------------------------------------------

// The package's "lstm_export.config" metadata, e.g.
//   {"batch_first": false, "bidirectional": false, "hidden_size": 32, "input_size": 16,
//    "layer_norm": true, "num_layers": 2}
// a flat JSON object of whole numbers and booleans: this reads exactly that and refuses
// anything else (another key, a string, a missing size) with a message saying what.
// Text from a file, for a one-line message: control characters (a newline, an escape
// sequence) written as \xNN, so they can neither break the line nor drive the terminal.
std::string escaped(const std::string& text) {
  std::string out;
  for (const unsigned char c : text) {
    if (c < 0x20 || c == 0x7f) {
      static const char* const kHex = "0123456789abcdef";
      out += std::string("\\x") + kHex[c >> 4] + kHex[c & 15];
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

Config parse_config_json(const std::string& text, const std::string& source) {
  const auto invalid = [&](const std::string& what) -> std::runtime_error {
    return std::runtime_error("'" + source + "' has an invalid lstm_export.config (" +
                              escaped(what) + "): " + escaped(text.substr(0, 200)));
  };
  std::map<std::string, std::string> values;  // key -> its literal: digits, true or false
  size_t i = 0;
  const auto skip_space = [&] {
    while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
  };
  const auto expect = [&](char c) {
    skip_space();
    if (i >= text.size() || text[i] != c) {
      throw invalid(std::string("expected '") + c + "' at character " + std::to_string(i));
    }
    ++i;
  };
  expect('{');
  while (true) {
    expect('"');
    const size_t key_end = text.find('"', i);
    if (key_end == std::string::npos) throw invalid("unterminated key");
    const std::string key = text.substr(i, key_end - i);
    i = key_end + 1;
    expect(':');
    skip_space();
    const size_t start = i;
    const auto in_literal = [&] {
      return std::isalnum(static_cast<unsigned char>(text[i])) || text[i] == '-';
    };
    while (i < text.size() && in_literal()) ++i;
    const std::string value = text.substr(start, i - start);
    const bool is_int = !value.empty() && value.size() <= 9 &&
                        value.find_first_not_of("0123456789") == std::string::npos;
    if (!is_int && value != "true" && value != "false") {
      throw invalid("\"" + key + "\" is not a whole number, true or false");
    }
    if (!values.emplace(key, value).second) throw invalid("\"" + key + "\" given twice");
    skip_space();
    if (i < text.size() && text[i] == ',') {
      ++i;
      continue;
    }
    expect('}');
    break;
  }
  skip_space();
  if (i != text.size()) throw invalid("text after the object");

  const auto take = [&](const std::string& key, bool is_bool, bool required) -> std::string {
    const auto found = values.find(key);
    if (found == values.end()) {
      if (required) throw invalid("no \"" + key + "\"");
      return is_bool ? "false" : "0";  // batch_first and bidirectional default to false
    }
    const std::string value = found->second;
    values.erase(found);
    const bool boolean = value == "true" || value == "false";
    if (boolean != is_bool || (!is_bool && std::stoll(value) < 1)) {
      const char* kind = is_bool ? "true or false" : "a whole number >= 1";
      throw invalid("\"" + key + "\" must be " + kind);
    }
    return value;
  };
  Config cfg{};
  cfg.input_size = std::stoll(take("input_size", false, true));
  cfg.hidden_size = std::stoll(take("hidden_size", false, true));
  cfg.num_layers = std::stoll(take("num_layers", false, true));
  cfg.layer_norm = take("layer_norm", true, true) == "true";
  cfg.batch_first = take("batch_first", true, false) == "true";
  cfg.bidirectional = take("bidirectional", true, false) == "true";
  cfg.takes_lengths = true;  // every model.pt2 has its lengths models
  if (!values.empty()) throw invalid("unknown key \"" + values.begin()->first + "\"");
  return cfg;
}

// A compiled model checks neither shapes nor dtypes: a wrong one reads past its buffers.
// These are the Python model's checks (lstm_export/model.py check_inputs, check_lengths),
// with its messages, so model.pt and model.pt2 refuse the same input in the same words.
void check_inputs(const Config& cfg, const torch::Tensor& x, const std::optional<State>& state,
                  const std::optional<torch::Tensor>& lengths) {
  const auto refuse = [](const std::string& message) {
    throw std::runtime_error("ValueError: " + message);
  };
  if (x.scalar_type() != torch::kFloat32) {
    refuse("x must be a float32 tensor like the model's weights, got " +
           std::string(c10::toString(x.scalar_type())));
  }
  if (x.dim() != 3 || x.size(2) != cfg.input_size || x.size(0) < 1 || x.size(1) < 1) {
    const std::string size = "input_size=" + std::to_string(cfg.input_size) + "]";
    refuse(std::string("x must have shape ") +
           (cfg.batch_first ? "[batch>=1, seq>=1, " : "[seq>=1, batch>=1, ") + size + ", got " +
           dims(x));
  }
  const int64_t seq = x.size(cfg.batch_first ? 1 : 0), batch = x.size(cfg.batch_first ? 0 : 1);
  if (state) {
    const std::vector<int64_t> expected{cfg.num_layers * cfg.directions(), batch,
                                        cfg.hidden_size};
    const std::string layers = cfg.bidirectional ? "num_layers*2" : "num_layers";
    const std::pair<const char*, torch::Tensor> given[] = {{"h0", std::get<0>(*state)},
                                                           {"c0", std::get<1>(*state)}};
    for (const auto& [name, t] : given) {
      if (t.sizes().vec() != expected) {
        refuse(std::string(name) + " must have shape [" + layers + "=" +
               std::to_string(expected[0]) + ", batch=" + std::to_string(batch) +
               ", hidden_size=" + std::to_string(cfg.hidden_size) + "], got " + dims(t));
      }
      if (t.scalar_type() != torch::kFloat32) {
        refuse(std::string(name) + " must be a float32 tensor like x, got " +
               c10::toString(t.scalar_type()));
      }
    }
  }
  if (lengths) {
    const torch::Tensor& l = *lengths;
    if (l.scalar_type() != torch::kInt64) {
      refuse(std::string("lengths must be an int64 tensor, got ") + c10::toString(l.scalar_type()));
    }
    if (l.dim() != 1 || l.size(0) != batch) {
      refuse("lengths must have shape [batch=" + std::to_string(batch) + "], got " + dims(l));
    }
    const int64_t shortest = l.min().item<int64_t>(), longest = l.max().item<int64_t>();
    if (shortest < 1 || longest > seq) {
      refuse("lengths must each be in 1..seq=" + std::to_string(seq) + ", got " +
             std::to_string(shortest < 1 ? shortest : longest));
    }
  }
}

class Pt2Model : public Model {
 public:
  // `first`: the package's "model", already loaded to read the config.
  Pt2Model(const fs::path& path, const Config& config,
           std::unique_ptr<torch::inductor::AOTIModelPackageLoader> first)
      : Model(config), path_(path) {
    loaders_[model_name(false, false)] = std::move(first);
  }

  // The package's compiled model for this form of the call, loaded on first use.
  static std::string model_name(bool with_state, bool with_lengths) {
    return std::string("model") + (with_state ? "_state" : "") + (with_lengths ? "_lengths" : "");
  }

  torch::inductor::AOTIModelPackageLoader& loader(const std::string& name) {
    auto& slot = loaders_[name];
    if (!slot) slot = load_pt2(path_, name);
    return *slot;
  }

  static std::unique_ptr<torch::inductor::AOTIModelPackageLoader> load_pt2(
      const fs::path& path, const std::string& name) {
    std::string why;
    try {
      return std::make_unique<torch::inductor::AOTIModelPackageLoader>(path.string(), name);
    } catch (const c10::Error& e) {
      why = first_line(e.what_without_backtrace());
    } catch (const std::exception& e) {
      why = first_line(e.what());
    }
    // An op the loaded libraries do not register fails here, when the loader resolves the
    // ops the model calls: "Could not find schema for lstm_export::layer_norm_lstm_layer."
    if (!why.empty() && why.back() == '.') why.pop_back();
    const std::string hint = why.find("lstm_export::") != std::string::npos ? kKernelsHint : "";
    throw std::runtime_error("cannot load model '" + name + "' of '" + path.string() +
                             "' as an AOTInductor package (" + why + ")" + hint);
  }

  // Flat inputs, in the order the package was exported with: x[, h0, c0][, lengths];
  // flat outputs {y, h_n, c_n}. Contiguous copies: the compiled code reads raw memory.
  std::pair<torch::Tensor, State> forward(const torch::Tensor& x, const std::optional<State>& state,
                                          const std::optional<torch::Tensor>& lengths) override {
    check_inputs(cfg, x, state, lengths);
    std::vector<torch::Tensor> inputs{x.contiguous()};
    if (state) {
      inputs.push_back(std::get<0>(*state).contiguous());
      inputs.push_back(std::get<1>(*state).contiguous());
    }
    if (lengths) inputs.push_back(lengths->contiguous());
    auto& model = loader(model_name(state.has_value(), lengths.has_value()));
    std::vector<torch::Tensor> out;
    try {
      out = model.run(inputs);
    } catch (const c10::Error& e) {
      throw std::runtime_error(first_line(e.what_without_backtrace()));
    } catch (const std::exception& e) {
      throw std::runtime_error(first_line(e.what()));
    }
    if (out.size() != 3) {
      throw std::runtime_error("'" + path_.string() + "' returned " + std::to_string(out.size()) +
                               " outputs, expected 3 (y, h_n, c_n)");
    }
    return {out[0], State{out[1], out[2]}};
  }

 private:
  fs::path path_;
  std::map<std::string, std::unique_ptr<torch::inductor::AOTIModelPackageLoader>> loaders_;
};

// Loads "model" (forward(x)) to read the metadata: that also proves the package loads.
std::unique_ptr<Model> load_package(const fs::path& path) {
  auto first = Pt2Model::load_pt2(path, Pt2Model::model_name(false, false));
  const auto metadata = first->get_metadata();
  const auto found = metadata.find("lstm_export.config");
  if (found == metadata.end()) {
    throw std::runtime_error("'" + path.string() + "' is an AOTInductor package but not an " +
                             "lstm_export one: its metadata has no lstm_export.config");
  }
  const Config cfg = parse_config_json(found->second, path.string());
  return std::make_unique<Pt2Model>(path, cfg, std::move(first));
}

bool is_package(const fs::path& path) { return path.extension() == ".pt2"; }

std::unique_ptr<Model> load_model(const std::string& path_arg) {
  fs::path path = path_arg;
  if (fs::is_directory(path)) {
    if (!fs::is_regular_file(path / "model.pt")) {
      throw std::runtime_error("folder '" + path.string() + "' has no model.pt");
    }
    path /= "model.pt";
  }
  if (!fs::exists(path)) {
    throw std::runtime_error("model file '" + path.string() + "' does not exist");
  }
  return is_package(path) ? load_package(path) : load_torchscript(path);
}

// --lengths and --chunk against what this model can run: one line naming the mismatch.
void check_model_takes(const Config& cfg, const Options& opt) {
  if (!opt.lengths.empty() && !cfg.takes_lengths) {
    throw UsageError("'" + opt.model + "' has forward(x, state) without lengths (exported " +
                     "before lengths existed); re-export it to use --lengths, or drop --lengths");
  }
  if (opt.chunk && cfg.bidirectional) {
    throw UsageError("--chunk streams forward in time, but this model is bidirectional: its " +
                     std::string("reverse direction needs the whole sequence; drop --chunk"));
  }
}

torch::Tensor read_tensor(const std::string& path) {
  if (!fs::exists(path)) throw std::runtime_error("input file '" + path + "' does not exist");
  npy::Array array = npy::load(path);
  // from_blob does not own the memory; clone() gives the tensor its own copy.
  return torch::from_blob(array.data.data(), array.shape, torch::kFloat32).clone();
}

torch::Tensor read_lengths(const std::string& path) {
  if (!fs::exists(path)) throw std::runtime_error("input file '" + path + "' does not exist");
  npy::Int64Array array = npy::load_int64(path);
  return torch::from_blob(array.data.data(), array.shape, torch::kInt64).clone();
}

void write_tensor(const fs::path& path, const torch::Tensor& tensor) {
  const torch::Tensor t = tensor.to(torch::kFloat32).contiguous();
  npy::save(path.string(), t.sizes().vec(), t.data_ptr<float>());
}

std::string shape_of(const torch::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

// Streaming: feed `chunk` time steps per call and carry (h, c) to the next call.
// The concatenated y and the final state equal one call on the whole sequence. The time
// axis is x's first, or its second for a batch_first model.
std::pair<torch::Tensor, State> forward_chunked(Model& model, const torch::Tensor& x,
                                                std::optional<State> state, int64_t chunk) {
  const int64_t time = model.cfg.batch_first ? 1 : 0;
  // A malformed x goes through in one call so the model reports what is wrong with it.
  if (x.dim() != 3 || x.size(time) <= chunk) return model.forward(x, state, std::nullopt);
  std::vector<torch::Tensor> ys;
  for (const torch::Tensor& piece : x.split(chunk, /*dim=*/time)) {
    try {
      auto [y, next] = model.forward(piece, state, std::nullopt);
      ys.push_back(y);
      state = next;
    } catch (const std::runtime_error&) {
      // Bad input fails on the first chunk; let the model report the shapes the user
      // gave (x [seq, ...]) rather than those of the chunk.
      if (ys.empty()) model.forward(x, state, std::nullopt);
      throw;
    }
  }
  return {torch::cat(ys, /*dim=*/time), *state};
}

// Latency of forward(x, None[, lengths]) on a random x of `seq` steps and `batch`
// sequences in the model's layout, in milliseconds. The warmup calls are untimed:
// TorchScript's profiling executor records shapes during the first calls and then runs an
// optimised graph, so early calls are slower.
std::vector<double> time_forward(Model& model, int64_t seq, int64_t batch,
                                 const std::optional<torch::Tensor>& lengths, int64_t repeats,
                                 int64_t warmup) {
  // InferenceMode: no autograd (like NoGradGuard) and no tensor version counting. The
  // Python benchmark runs under torch.inference_mode() as well.
  c10::InferenceMode inference;
  torch::manual_seed(0);  // the same x on every run
  const Config& cfg = model.cfg;
  const torch::Tensor x = cfg.batch_first ? torch::randn({batch, seq, cfg.input_size})
                                          : torch::randn({seq, batch, cfg.input_size});
  for (int64_t i = 0; i < warmup; ++i) model.forward(x, std::nullopt, lengths);
  std::vector<double> samples;
  samples.reserve(static_cast<size_t>(repeats));
  for (int64_t i = 0; i < repeats; ++i) {
    const auto start = std::chrono::steady_clock::now();
    model.forward(x, std::nullopt, lengths);
    const auto stop = std::chrono::steady_clock::now();
    samples.push_back(std::chrono::duration<double, std::milli>(stop - start).count());
  }
  return samples;
}

int run(const Options& opt) {
  // An LSTM step is a few small matrix products: one thread is fastest, and spares
  // the OpenMP spin-waiting that makes many threads crawl on a busy machine. Raise
  // it for large hidden sizes or batches.
  at::set_num_threads(static_cast<int>(opt.threads));
  load_kernels(opt.kernels);
  const std::unique_ptr<Model> model = load_model(opt.model);
  const Config& cfg = model->cfg;
  std::cout << "config: input_size=" << cfg.input_size << " hidden_size=" << cfg.hidden_size
            << " num_layers=" << cfg.num_layers
            << " layer_norm=" << (cfg.layer_norm ? "true" : "false")
            << " batch_first=" << (cfg.batch_first ? "true" : "false")
            << " bidirectional=" << (cfg.bidirectional ? "true" : "false") << "\n";
  check_model_takes(cfg, opt);
  torch::NoGradGuard no_grad;  // inference only: no autograd bookkeeping
  std::optional<torch::Tensor> lengths;
  if (!opt.lengths.empty()) lengths = read_lengths(opt.lengths);

  if (opt.time_seq > 0) {
    const int64_t repeats = opt.repeats.value_or(15), warmup = opt.warmup.value_or(3);
    const std::vector<double> samples =
        time_forward(*model, opt.time_seq, opt.time_batch, lengths, repeats, warmup);
    const int64_t first = cfg.batch_first ? opt.time_batch : opt.time_seq;
    const int64_t second = cfg.batch_first ? opt.time_seq : opt.time_batch;
    std::cout << "timed forward(x [" << first << ", " << second << ", " << cfg.input_size
              << "], None" << (lengths ? ", lengths" : "") << "): " << warmup << " warmup + "
              << repeats << " timed calls, " << opt.threads << " thread(s)\n";
    std::ostringstream line;  // one machine-readable line, all samples in ms
    line << "timing_ms:" << std::fixed << std::setprecision(6);
    for (const double ms : samples) line << ' ' << ms;
    std::cout << line.str() << "\n";
    return 0;
  }
  if (opt.x.empty()) return 0;

  const torch::Tensor x = read_tensor(opt.x);
  std::optional<State> state;
  if (!opt.h0.empty()) state = State{read_tensor(opt.h0), read_tensor(opt.c0)};

  const auto [y, final_state] = opt.chunk ? forward_chunked(*model, x, state, opt.chunk)
                                          : model->forward(x, state, lengths);
  const auto& [h, c] = final_state;
  std::cout << "x " << shape_of(x) << (state ? " with (h0, c0)" : " from zero state")
            << (opt.chunk ? ", chunks of " + std::to_string(opt.chunk)
                          : (lengths ? ", lengths " + shape_of(*lengths) : ", whole sequence"))
            << " -> y " << shape_of(y) << ", h " << shape_of(h) << ", c " << shape_of(c) << "\n";

  if (!opt.out.empty()) {
    const fs::path out = opt.out;
    std::error_code ec;
    fs::create_directories(out, ec);
    if (ec) throw std::runtime_error("cannot create output folder '" + opt.out + "': " + ec.message());
    write_tensor(out / "y.npy", y);
    write_tensor(out / "h.npy", h);
    write_tensor(out / "c.npy", c);
    std::cout << "wrote " << (out / "y.npy").string() << ", h.npy, c.npy\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const UsageError& e) {
    std::cerr << "lstm_run: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "lstm_run: error: " << first_line(e.what()) << "\n";
    return 1;
  }
}
