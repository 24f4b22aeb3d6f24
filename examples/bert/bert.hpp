// A BERT-style encoder with a masked-LM head, templated on the attention policy: swapping the
// attention kernel of a pretrained model is changing one type. Multi-head attention runs through
// fastattn::multihead_attention directly on the fused QKV projection buffer (no per-head copies).
//
// Loads Hugging Face checkpoints: config.json (BertConfig keys) + model.safetensors with
// BertForMaskedLM / BertForPreTraining tensor names; see README.md for the exact mapping. Every
// weight must be finite (checked at load time, naming the tensor and the element), and a forward
// pass whose activations overflow says so, naming the layer, sample and position.
//
// Example code, not part of the library: namespace `bert`.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>
#include <unsupported/Eigen/SpecialFunctions>

#include <fastattn/attention.hpp>
#include <fastattn/io/safetensors.hpp>
#include <fastattn/multihead.hpp>

namespace bert {

using fastattn::attention_policy;
using fastattn::index;
using fastattn::invalid_argument;
using fastattn::matrix;
using fastattn::multihead_attention;
using fastattn::multihead_options;
using fastattn::tensor_view;
namespace io = fastattn::io;
using io::safetensors_file;
using io::shape_to_string;

/// Throws fastattn::invalid_argument "fastattn: <where>: <message>".
[[noreturn]] inline void fail(const std::string& where, const std::string& message) {
  io::detail::raise(where, where + ": " + message);
}

enum class activation { gelu_erf, gelu_tanh };
enum class norm_placement { post, pre };

/// The Hugging Face BertConfig fields the encoder uses, plus "norm": "pre" | "post".
struct config {
  index vocab_size = 0;
  index hidden_size = 0;
  index num_hidden_layers = 0;
  index num_attention_heads = 0;
  index intermediate_size = 0;
  index max_position_embeddings = 512;
  index type_vocab_size = 2;
  double layer_norm_eps = 1e-12;
  activation hidden_act = activation::gelu_erf;
  norm_placement norm = norm_placement::post;

  index head_dim() const { return hidden_size / num_attention_heads; }

  /// Checks the values (sizes positive, heads divide hidden_size, ...); `where` prefixes errors.
  void validate(const std::string& where) const {
    auto fail = [&](const std::string& m) { bert::fail(where, m); };
    if (vocab_size < 1) fail("vocab_size must be >= 1, got " + std::to_string(vocab_size));
    if (hidden_size < 1) fail("hidden_size must be >= 1, got " + std::to_string(hidden_size));
    if (num_hidden_layers < 0) fail("num_hidden_layers must be >= 0");
    if (num_attention_heads < 1) fail("num_attention_heads must be >= 1");
    if (hidden_size % num_attention_heads != 0)
      fail("hidden_size (" + std::to_string(hidden_size) +
           ") must be a multiple of num_attention_heads (" + std::to_string(num_attention_heads) +
           ")");
    if (intermediate_size < 1) fail("intermediate_size must be >= 1");
    if (max_position_embeddings < 1) fail("max_position_embeddings must be >= 1");
    if (type_vocab_size < 0) fail("type_vocab_size must be >= 0");
    if (!(layer_norm_eps > 0) || !std::isfinite(layer_norm_eps)) fail("layer_norm_eps must be > 0");
  }

  static config from_json(const nlohmann::json& j, const std::string& where) {
    auto fail = [&](const std::string& m) { bert::fail(where, m); };
    if (!j.is_object()) fail("config must be a JSON object");
    config c;
    // A key that is present must have the right JSON type; optional keys then take their
    // defaults through nlohmann's value().
    auto require_type = [&](const char* key, bool ok, const char* what) {
      if (j.contains(key) && !ok) fail(std::string("'") + key + "' must be " + what);
    };
    auto get_int = [&](const char* key, index fallback, bool required) {
      if (required && !j.contains(key)) fail(std::string("missing key '") + key + "'");
      require_type(key, j.contains(key) && j[key].is_number_integer(), "an integer");
      const auto v = j.value(key, static_cast<std::int64_t>(fallback));
      if (v < 0 || v > (std::int64_t{1} << 40))
        fail(std::string("'") + key + "' is out of range: " + std::to_string(v));
      return static_cast<index>(v);
    };
    c.vocab_size = get_int("vocab_size", 0, true);
    c.hidden_size = get_int("hidden_size", 0, true);
    c.num_hidden_layers = get_int("num_hidden_layers", 0, true);
    c.num_attention_heads = get_int("num_attention_heads", 0, true);
    c.intermediate_size = get_int("intermediate_size", 0, true);
    c.max_position_embeddings =
        get_int("max_position_embeddings", c.max_position_embeddings, false);
    c.type_vocab_size = get_int("type_vocab_size", c.type_vocab_size, false);
    require_type("layer_norm_eps", j.contains("layer_norm_eps") && j["layer_norm_eps"].is_number(),
                 "a number");
    c.layer_norm_eps = j.value("layer_norm_eps", c.layer_norm_eps);
    require_type("hidden_act", j.contains("hidden_act") && j["hidden_act"].is_string(), "a string");
    const auto act = j.value("hidden_act", std::string("gelu"));
    if (act == "gelu")
      c.hidden_act = activation::gelu_erf;
    else if (act == "gelu_new" || act == "gelu_pytorch_tanh")
      c.hidden_act = activation::gelu_tanh;
    else
      fail("unsupported hidden_act '" + io::detail::printable(act, 40) +
           "' (supported: gelu, gelu_new, gelu_pytorch_tanh)");
    const char* const pre_or_post = "\"pre\" or \"post\"";
    require_type("norm", j.contains("norm") && j["norm"].is_string(), pre_or_post);
    const auto n = j.value("norm", std::string("post"));
    if (n == "pre")
      c.norm = norm_placement::pre;
    else if (n == "post")
      c.norm = norm_placement::post;
    else
      fail(std::string("'norm' must be ") + pre_or_post);
    if (j.contains("position_embedding_type") &&
        (!j["position_embedding_type"].is_string() ||
         j["position_embedding_type"].get<std::string>() != "absolute"))
      fail("only position_embedding_type \"absolute\" is supported");
    c.validate(where);
    return c;
  }

  /// Largest config.json read (real ones are a few kB), and its deepest JSON nesting: together
  /// they bound what parsing a hostile file can cost.
  static constexpr std::uint64_t max_file_bytes = std::uint64_t{4} << 20;
  static constexpr int max_depth = 64;

  static config load(const std::string& path) {
    std::ifstream in;
    const std::uint64_t size = io::open_regular_file(path, in);
    if (size > max_file_bytes)
      fail(path, "is " + std::to_string(size) + " bytes, more than the " +
                     std::to_string(max_file_bytes) + " a config.json may have");
    std::string text(static_cast<std::size_t>(size), '\0');
    io::detail::read_exact(in, path, text.data(), size, "the file");
    struct too_deep {};
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(text,
                                [](int depth, nlohmann::json::parse_event_t, nlohmann::json&) {
                                  if (depth > max_depth)
                                    throw too_deep{};  // stops the parse at once
                                  return true;
                                });
    } catch (const nlohmann::json::exception& e) {
      std::string why = e.what();  // "[json.exception.parse_error.101] parse error at line ..."
      if (const auto end = why.find("] "); end != std::string::npos) why.erase(0, end + 2);
      fail(path, "not valid JSON: " + io::detail::printable(why));
    } catch (const too_deep&) {
      fail(path, "JSON nests deeper than " + std::to_string(max_depth) + " levels");
    }
    return from_json(j, path);
  }
};

template <class T>
using mat = matrix<T>;
template <class T>
using vec = Eigen::Matrix<T, 1, Eigen::Dynamic>;  // row vector: broadcast over token rows

/// PyTorch Linear: weight (out, in), y = x W^T + b.
template <class T>
struct linear {
  mat<T> weight;
  vec<T> bias;
  void apply(const mat<T>& x, mat<T>& y) const {
    y.noalias() = x * weight.transpose();
    y.rowwise() += bias;
  }
};

template <class T>
struct layer_norm {
  vec<T> weight, bias;  ///< empty when absent
  bool present() const { return weight.size() > 0; }
  /// In place over the rows of x.
  void apply(mat<T>& x, double eps) const {
    const index D = x.cols();
    for (index r = 0; r < x.rows(); ++r) {
      auto row = x.row(r);
      const T mean = row.sum() / static_cast<T>(D);
      row.array() -= mean;
      const T var = row.squaredNorm() / static_cast<T>(D);
      row *= T(1) / std::sqrt(var + static_cast<T>(eps));
      row.array() = row.array() * weight.array() + bias.array();
    }
  }
};

template <class T>
struct layer_weights {
  linear<T> qkv;            ///< fused (3D, D): rows [0, D) query, [D, 2D) key, [2D, 3D) value
  linear<T> attention_out;  ///< (D, D)
  layer_norm<T> attention_norm;
  linear<T> intermediate;  ///< (I, D)
  linear<T> output;        ///< (D, I)
  layer_norm<T> output_norm;
};

template <class T>
struct weights {
  mat<T> word, position, token_type;  ///< token_type empty when absent
  layer_norm<T> embedding_norm;
  std::vector<layer_weights<T>> layers;
  layer_norm<T> final_norm;  ///< pre-norm only
  bool has_transform = false;
  linear<T> transform;
  layer_norm<T> transform_norm;
  mat<T> decoder;  ///< (C, D); empty when tied to `word`
  vec<T> decoder_bias;
  index classes() const { return decoder.size() ? decoder.rows() : word.rows(); }
};

namespace detail {

template <class T>
mat<T> to_mat(const std::vector<T>& v, index rows, index cols) {
  mat<T> m(rows, cols);
  std::copy(v.begin(), v.end(), m.data());
  return m;
}
template <class T>
vec<T> to_vec(const std::vector<T>& v) {
  vec<T> m(static_cast<index>(v.size()));
  std::copy(v.begin(), v.end(), m.data());
  return m;
}

/// Resolves Hugging Face names: optional "bert." prefix, and the old TF-era "gamma"/"beta"
/// LayerNorm names (bert-base-uncased still uses them).
class name_map {
 public:
  explicit name_map(const safetensors_file& f) : f_(f) {
    prefix_ = f.contains("bert.embeddings.word_embeddings.weight") ? "bert." : "";
    if (!f.contains(prefix_ + "embeddings.word_embeddings.weight"))
      f.fail(
          "missing tensor 'bert.embeddings.word_embeddings.weight' (or without the 'bert.' "
          "prefix): "
          "not a BERT checkpoint");
  }
  const std::string& prefix() const { return prefix_; }
  /// The stored name of encoder tensor `name` (without prefix), or "" when absent.
  std::string find(const std::string& name, bool encoder = true) const {
    const std::string full = (encoder ? prefix_ : "") + name;
    if (f_.contains(full)) return full;
    auto replace_suffix = [&](const std::string& from, const std::string& to) -> std::string {
      if (full.size() >= from.size() &&
          full.compare(full.size() - from.size(), from.size(), from) == 0) {
        const std::string alt = full.substr(0, full.size() - from.size()) + to;
        if (f_.contains(alt)) return alt;
      }
      return "";
    };
    if (auto a = replace_suffix("LayerNorm.weight", "LayerNorm.gamma"); !a.empty()) return a;
    if (auto a = replace_suffix("LayerNorm.bias", "LayerNorm.beta"); !a.empty()) return a;
    return "";
  }

 private:
  const safetensors_file& f_;
  std::string prefix_;
};

}  // namespace detail

/// Loads weights in T from a validated file; every shape is checked against the config.
template <class T>
weights<T> load_weights(const config& c, const safetensors_file& f) {
  const detail::name_map names(f);
  const index D = c.hidden_size, I = c.intermediate_size;
  auto required = [&](const std::string& name, bool encoder = true) {
    const std::string stored = names.find(name, encoder);
    if (stored.empty())
      f.fail("missing tensor '" + (encoder ? names.prefix() : std::string()) + name + "'");
    return stored;
  };
  // Every weight must be finite: a NaN or infinity is reported here, naming the tensor and the
  // element, instead of surfacing as a NaN loss or as an error about an internal activation.
  auto read_mat = [&](const std::string& stored, index rows, index cols) {
    return detail::to_mat(f.read_finite<T>(stored, {rows, cols}), rows, cols);
  };
  auto read_vec = [&](const std::string& stored, index n) {
    return detail::to_vec(f.read_finite<T>(stored, {n}));
  };
  auto read_linear = [&](const std::string& base, index out, index in, bool encoder = true) {
    linear<T> l;
    l.weight = read_mat(required(base + ".weight", encoder), out, in);
    l.bias = read_vec(required(base + ".bias", encoder), out);
    return l;
  };
  auto read_norm = [&](const std::string& base, bool must, bool encoder = true) {
    layer_norm<T> n;
    const std::string w = names.find(base + ".weight", encoder),
                      b = names.find(base + ".bias", encoder);
    if (w.empty() != b.empty())
      f.fail("'" + base + "' has a weight without a bias or a bias without a weight");
    if (w.empty()) {
      if (must)
        f.fail("missing tensor '" + (encoder ? names.prefix() : std::string()) + base + ".weight'");
      return n;
    }
    n.weight = read_vec(w, D);
    n.bias = read_vec(b, D);
    return n;
  };

  weights<T> w;
  w.word = read_mat(required("embeddings.word_embeddings.weight"), c.vocab_size, D);
  w.position =
      read_mat(required("embeddings.position_embeddings.weight"), c.max_position_embeddings, D);
  if (const auto tt = names.find("embeddings.token_type_embeddings.weight"); !tt.empty()) {
    if (c.type_vocab_size == 0)
      f.fail("has token_type_embeddings but config.json says type_vocab_size = 0");
    w.token_type = read_mat(tt, c.type_vocab_size, D);
  }
  w.embedding_norm = read_norm("embeddings.LayerNorm", false);
  for (index i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "encoder.layer." + std::to_string(i) + ".";
    layer_weights<T> l;
    const auto q = read_linear(p + "attention.self.query", D, D);
    const auto k = read_linear(p + "attention.self.key", D, D);
    const auto v = read_linear(p + "attention.self.value", D, D);
    l.qkv.weight.resize(3 * D, D);
    l.qkv.weight << q.weight, k.weight, v.weight;
    l.qkv.bias.resize(3 * D);
    l.qkv.bias << q.bias, k.bias, v.bias;
    l.attention_out = read_linear(p + "attention.output.dense", D, D);
    l.attention_norm = read_norm(p + "attention.output.LayerNorm", true);
    l.intermediate = read_linear(p + "intermediate.dense", I, D);
    l.output = read_linear(p + "output.dense", D, I);
    l.output_norm = read_norm(p + "output.LayerNorm", true);
    w.layers.push_back(std::move(l));
  }
  if (f.contains(names.prefix() + "encoder.layer." + std::to_string(c.num_hidden_layers) +
                 ".attention.self.query.weight"))
    f.fail("has more layers than config.json's num_hidden_layers = " +
           std::to_string(c.num_hidden_layers));
  if (c.norm == norm_placement::pre)
    w.final_norm = read_norm("encoder.final_layer_norm", true);
  else if (!names.find("encoder.final_layer_norm.weight").empty())
    f.fail(
        "has encoder.final_layer_norm but config.json's norm is \"post\" (use \"norm\": \"pre\")");

  // Masked-LM head (never prefixed).
  const bool has_dense = f.contains("cls.predictions.transform.dense.weight");
  const bool has_norm = !names.find("cls.predictions.transform.LayerNorm.weight", false).empty();
  if (has_dense != has_norm)
    f.fail("cls.predictions.transform needs both dense and LayerNorm tensors, or neither");
  if (has_dense) {
    w.has_transform = true;
    w.transform = read_linear("cls.predictions.transform.dense", D, D, false);
    w.transform_norm = read_norm("cls.predictions.transform.LayerNorm", true, false);
  }
  if (f.contains("cls.predictions.decoder.weight")) {
    const auto& info = f.info("cls.predictions.decoder.weight");
    if (info.shape.size() != 2 || info.shape[1] != D || info.shape[0] < 1 ||
        info.shape[0] > c.vocab_size)
      f.fail("tensor 'cls.predictions.decoder.weight' has shape " + shape_to_string(info.shape) +
             ", expected [C, " + std::to_string(D) +
             "] with 1 <= C <= vocab_size = " + std::to_string(c.vocab_size));
    w.decoder = read_mat("cls.predictions.decoder.weight", info.shape[0], D);
  }
  const index C = w.classes();
  if (f.contains("cls.predictions.bias"))
    w.decoder_bias = read_vec("cls.predictions.bias", C);
  else if (f.contains("cls.predictions.decoder.bias"))
    w.decoder_bias = read_vec("cls.predictions.decoder.bias", C);
  else
    w.decoder_bias = vec<T>::Zero(C);
  return w;
}

/// Random weights of the right shapes (N(0, 0.02^2), LayerNorm 1/0, decoder tied), for timing.
template <class T>
weights<T> random_weights(const config& c, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal(0.0, 0.02);
  const index D = c.hidden_size, I = c.intermediate_size;
  auto m = [&](index r, index k) {
    mat<T> x(r, k);
    for (index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<T>(normal(gen));
    return x;
  };
  auto v = [&](index n) {
    vec<T> x(n);
    for (index i = 0; i < n; ++i) x[i] = static_cast<T>(normal(gen));
    return x;
  };
  auto ln = [&]() { return layer_norm<T>{vec<T>::Ones(D), vec<T>::Zero(D)}; };
  weights<T> w;
  w.word = m(c.vocab_size, D);
  w.position = m(c.max_position_embeddings, D);
  if (c.type_vocab_size > 0) w.token_type = m(c.type_vocab_size, D);
  w.embedding_norm = ln();
  for (index i = 0; i < c.num_hidden_layers; ++i)
    w.layers.push_back(
        {{m(3 * D, D), v(3 * D)}, {m(D, D), v(D)}, ln(), {m(I, D), v(I)}, {m(D, I), v(D)}, ln()});
  if (c.norm == norm_placement::pre) w.final_norm = ln();
  w.has_transform = true;
  w.transform = {m(D, D), v(D)};
  w.transform_norm = ln();
  w.decoder_bias = v(c.vocab_size);
  return w;
}

/// Token ids (B, L) with per-sample valid lengths (right padding), optional token types.
struct batch {
  index size = 0, length = 0;
  std::vector<std::int64_t> input_ids;       ///< B * L
  std::vector<std::int64_t> token_type_ids;  ///< empty (all 0) or B * L
  std::vector<index> lengths;                ///< empty (all L) or B
};

/// Seconds spent in a forward pass, total and inside multihead_attention.
struct timing {
  double total = 0, attention = 0;
};

/// GELU in place, vectorised through Eigen's erf / tanh (std::erf element by element was a
/// sixth of a forward pass at L = 4096).
template <class T>
void apply_activation(activation a, mat<T>& x) {
  auto v = x.array();
  if (a == activation::gelu_erf)  // exact GELU: x/2 (1 + erf(x / sqrt 2))
    v = v * T(0.5) * (T(1) + (v * T(0.70710678118654752440)).erf());
  else  // tanh approximation (gelu_new, gelu_pytorch_tanh)
    v = v * T(0.5) * (T(1) + (T(0.79788456080286535588) * (v + T(0.044715) * v.cube())).tanh());
}

/// BERT encoder + masked-LM head; `Attention` is any fastattn policy.
template <attention_policy Attention, class T = float>
class encoder {
 public:
  /// Shares the weights: several encoders (one per kernel) can run the same model.
  encoder(config c, std::shared_ptr<const weights<T>> w, Attention attention = {}, int threads = 0)
      : config_(std::move(c)), shared_(std::move(w)), attention_(attention), threads_(threads) {
    if (!shared_) fail("encoder", "null weights");
    if (static_cast<index>(shared_->layers.size()) != config_.num_hidden_layers)
      fail("encoder", "weights have " + std::to_string(shared_->layers.size()) +
                          " layers, config says " + std::to_string(config_.num_hidden_layers));
  }
  encoder(config c, weights<T> w, Attention attention = {}, int threads = 0)
      : encoder(std::move(c), std::make_shared<const weights<T>>(std::move(w)), attention,
                threads) {}

  const config& cfg() const { return config_; }
  const weights<T>& w() const { return *shared_; }
  const Attention& attention() const { return attention_; }
  void set_attention(const Attention& a) { attention_ = a; }

  /// One policy per layer: layer i runs `layers[i]` instead of attention() (for instance
  /// fastattn::guarded with each layer's own report span). Empty: every layer runs attention().
  /// Throws unless `layers` is empty or has one policy per layer.
  void set_layer_attention(std::vector<Attention> layers) {
    if (!layers.empty() && static_cast<index>(layers.size()) != config_.num_hidden_layers)
      fail("encoder", "set_layer_attention needs one policy per layer (" +
                          std::to_string(config_.num_hidden_layers) + "), got " +
                          std::to_string(layers.size()));
    layer_attention_ = std::move(layers);
  }
  /// The policy layer `i` runs.
  const Attention& attention(index i) const {
    return layer_attention_.empty() ? attention_ : layer_attention_[static_cast<std::size_t>(i)];
  }

  /// Buffers of a forward pass. Reusing them across calls matters: fresh multi-megabyte
  /// buffers each call cost page faults that took ~100 ms of a 4096-token forward pass here.
  struct workspace {
    mat<T> x, y, qkv, context, projected, hidden;
  };

  /// Hidden states after the encoder, (B * L, D), row b * L + t. Uses `ws` for its buffers, or
  /// the calling thread's own workspace when null (so concurrent calls are safe).
  mat<T> forward(const batch& in, timing* time = nullptr, workspace* ws = nullptr) const {
    if (ws == nullptr) {
      thread_local workspace mine;
      ws = &mine;
    }
    return forward_into(in, *ws, time);
  }

 private:
  mat<T> forward_into(const batch& in, workspace& ws, timing* time) const {
    const auto start = std::chrono::steady_clock::now();
    check(in);
    const index B = in.size, L = in.length, D = config_.hidden_size;
    mat<T>& x = ws.x;
    x.resize(B * L, D);
    for (index b = 0; b < B; ++b)
      for (index t = 0; t < L; ++t) {
        const index r = b * L + t;
        x.row(r) =
            shared_->word.row(static_cast<index>(in.input_ids[static_cast<std::size_t>(r)])) +
            shared_->position.row(t);
        if (shared_->token_type.size()) {
          const index tt = in.token_type_ids.empty()
                               ? 0
                               : static_cast<index>(in.token_type_ids[static_cast<std::size_t>(r)]);
          x.row(r) += shared_->token_type.row(tt);
        }
      }
    if (shared_->embedding_norm.present()) shared_->embedding_norm.apply(x, config_.layer_norm_eps);
    require_finite(x, in, "the embeddings");

    const double eps = config_.layer_norm_eps;
    mat<T>&y = ws.y, &qkv = ws.qkv, &context = ws.context, &projected = ws.projected,
    &hidden = ws.hidden;
    context.resize(B * L, D);
    double attention_seconds = 0;
    for (const auto& layer : shared_->layers) {
      const bool pre = config_.norm == norm_placement::pre;
      if (pre) {
        y = x;
        layer.attention_norm.apply(y, eps);
        layer.qkv.apply(y, qkv);
      } else {
        layer.qkv.apply(x, qkv);
      }
      const index i = &layer - shared_->layers.data();
      const std::string where = "layer " + std::to_string(i);
      require_finite(qkv, in, where + "'s query/key/value projection");
      attention_seconds += attend(attention(i), qkv, context, in, where);
      layer.attention_out.apply(context, projected);
      x += projected;
      if (!pre) layer.attention_norm.apply(x, eps);
      if (pre) {
        y = x;
        layer.output_norm.apply(y, eps);
        layer.intermediate.apply(y, hidden);
      } else {
        layer.intermediate.apply(x, hidden);
      }
      apply_activation(config_.hidden_act, hidden);
      layer.output.apply(hidden, projected);
      x += projected;
      if (!pre) layer.output_norm.apply(x, eps);
      require_finite(x, in, where + "'s output");
    }
    if (config_.norm == norm_placement::pre) {
      shared_->final_norm.apply(x, eps);
      require_finite(x, in, "the final LayerNorm's output");
    }
    if (time) {
      time->attention += attention_seconds;
      time->total +=
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
    return x;
  }

 public:
  /// Masked-LM logits (rows, C) for rows of hidden states.
  mat<T> mlm_logits(const mat<T>& hidden) const {
    mat<T> h = hidden;
    if (shared_->has_transform) {
      mat<T> t;
      shared_->transform.apply(h, t);
      apply_activation(config_.hidden_act, t);
      shared_->transform_norm.apply(t, config_.layer_norm_eps);
      h = std::move(t);
    }
    mat<T> logits;
    if (shared_->decoder.size())
      logits.noalias() = h * shared_->decoder.transpose();
    else
      logits.noalias() = h * shared_->word.transpose();
    logits.rowwise() += shared_->decoder_bias;
    return logits;
  }

 private:
  config config_;
  std::shared_ptr<const weights<T>> shared_;
  Attention attention_;
  std::vector<Attention> layer_attention_;  ///< empty: every layer runs attention_
  int threads_ = 0;

  void check(const batch& in) const {
    auto fail = [](const std::string& m) { bert::fail("batch", m); };
    if (in.size < 1 || in.length < 1)
      fail("needs at least one sample of at least one token, got B = " + std::to_string(in.size) +
           ", L = " + std::to_string(in.length));
    // B * L and B * L * 3 * hidden_size (the largest buffer) must be countable: never overflow.
    const auto n = io::detail::checked_mul(static_cast<std::uint64_t>(in.size),
                                           static_cast<std::uint64_t>(in.length));
    const std::uint64_t index_max = static_cast<std::uint64_t>(std::numeric_limits<index>::max());
    if (!n || !io::detail::checked_mul(*n, 3 * static_cast<std::uint64_t>(config_.hidden_size),
                                       index_max))
      fail("B = " + std::to_string(in.size) + " samples of L = " + std::to_string(in.length) +
           " tokens are too many to hold");
    if (in.input_ids.size() != *n)
      fail("input_ids must have B * L = " + std::to_string(*n) + " entries, got " +
           std::to_string(in.input_ids.size()));
    if (in.length > config_.max_position_embeddings)
      fail("length " + std::to_string(in.length) +
           " exceeds max_position_embeddings = " + std::to_string(config_.max_position_embeddings));
    auto position = [&](std::size_t i) {
      return "sample " + std::to_string(static_cast<index>(i) / in.length) + ", position " +
             std::to_string(static_cast<index>(i) % in.length);
    };
    const index vocab = shared_->word.rows();
    for (std::size_t i = 0; i < in.input_ids.size(); ++i)
      if (in.input_ids[i] < 0 || in.input_ids[i] >= vocab)
        fail(position(i) + ": token id " + std::to_string(in.input_ids[i]) + " out of range [0, " +
             std::to_string(vocab) + ")");
    if (!in.token_type_ids.empty()) {
      if (in.token_type_ids.size() != *n)
        fail("token_type_ids must be empty or have B * L = " + std::to_string(*n) +
             " entries, got " + std::to_string(in.token_type_ids.size()));
      const index types = std::max<index>(shared_->token_type.rows(), 1);
      for (std::size_t i = 0; i < in.token_type_ids.size(); ++i)
        if (in.token_type_ids[i] < 0 || in.token_type_ids[i] >= types)
          fail(position(i) + ": token type " + std::to_string(in.token_type_ids[i]) +
               " out of range [0, " + std::to_string(types) + ")");
    }
    if (!in.lengths.empty() && in.lengths.size() != static_cast<std::size_t>(in.size))
      fail("lengths must be empty or have one entry per sample (" + std::to_string(in.size) +
           "), got " + std::to_string(in.lengths.size()));
    for (std::size_t b = 0; b < in.lengths.size(); ++b)
      if (in.lengths[b] < 0 || in.lengths[b] > in.length)
        fail("sample " + std::to_string(b) + ": length " + std::to_string(in.lengths[b]) +
             " is out of [0, L = " + std::to_string(in.length) + "]");
  }

  /// Throws when a valid row (position t < the sample's length) of `m` ((B * L) x cols) holds a
  /// NaN or infinity: with finite weights that means the activations overflow T.
  static void require_finite(const mat<T>& m, const batch& in, const std::string& what) {
    for (index b = 0; b < in.size; ++b) {
      const index valid = in.lengths.empty() ? in.length : in.lengths[static_cast<std::size_t>(b)];
      for (index t = 0; t < valid; ++t) {
        const auto row = m.row(b * in.length + t);
        if (row.allFinite()) continue;
        index c = 0;
        while (std::isfinite(row[c])) ++c;
        fail("encoder", what + " is not finite (" +
                            io::detail::value_text(static_cast<double>(row[c])) + ") at sample " +
                            std::to_string(b) + ", position " + std::to_string(t) + ", column " +
                            std::to_string(c) + ": the activations overflow " +
                            (std::is_same_v<T, float> ? "float" : "double") +
                            " (are the weights finite and of a sensible size?)");
      }
    }
  }

  /// Multi-head attention straight from the fused (B*L, 3D) QKV buffer into (B*L, D).
  double attend(const Attention& policy, const mat<T>& qkv, mat<T>& context, const batch& in,
                const std::string& where) const {
    const index B = in.size, L = in.length, D = config_.hidden_size,
                H = config_.num_attention_heads, E = config_.head_dim();
    // Q, K and V are slices of the fused (B * L, 3D) buffer: token stride 3D, and sample stride
    // L * 3D (stated, not left to the default, which for a slice is one sample's span).
    auto slice = [&](index offset) {
      return tensor_view<const T>{.data = qkv.data() + offset,
                                  .batch = B,
                                  .length = L,
                                  .heads = H,
                                  .dim = E,
                                  .token_stride = 3 * D,
                                  .batch_stride = L * 3 * D};
    };
    const tensor_view<const T> q = slice(0), k = slice(D), v = slice(2 * D);
    const tensor_view<T> out{.data = context.data(),
                             .batch = B,
                             .length = L,
                             .heads = H,
                             .dim = E,
                             .token_stride = D,
                             .batch_stride = L * D};
    multihead_options opt;
    opt.threads = threads_;
    if (!in.lengths.empty()) {
      opt.key_lengths = in.lengths;
      opt.query_lengths = in.lengths;
    }
    const auto start = std::chrono::steady_clock::now();
    try {
      multihead_attention(policy, q, k, v, out, opt);
    } catch (const invalid_argument& e) {
      std::string why = e.what();
      if (why.rfind("fastattn: ", 0) == 0) why.erase(0, 10);
      fail("encoder", where + "'s attention: " + why);
    }
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
};

/// Writes config.json + model.safetensors (F32, BertForMaskedLM names with the "bert." prefix)
/// into `dir`, which must exist: the inverse of model<T>::load.
template <class T>
void save_model(const std::string& dir, const config& c, const weights<T>& w) {
  const std::filesystem::path p(dir);
  nlohmann::json j = {{"architectures", {"BertForMaskedLM"}},
                      {"model_type", "bert"},
                      {"vocab_size", c.vocab_size},
                      {"hidden_size", c.hidden_size},
                      {"num_hidden_layers", c.num_hidden_layers},
                      {"num_attention_heads", c.num_attention_heads},
                      {"intermediate_size", c.intermediate_size},
                      {"max_position_embeddings", c.max_position_embeddings},
                      {"type_vocab_size", c.type_vocab_size},
                      {"layer_norm_eps", c.layer_norm_eps},
                      {"hidden_act", c.hidden_act == activation::gelu_erf ? "gelu" : "gelu_new"},
                      {"norm", c.norm == norm_placement::pre ? "pre" : "post"}};
  {
    io::output_file config_file((p / "config.json").string());
    config_file.write(j.dump(2) + "\n");
    config_file.close();
  }
  std::vector<io::st_write_tensor> out;
  auto put = [&](const std::string& name, const auto& m) {
    if (m.size() == 0) return;
    std::vector<float> data(static_cast<std::size_t>(m.size()));
    for (index i = 0; i < m.size(); ++i)
      data[static_cast<std::size_t>(i)] = io::detail::narrow<float>(m.data()[i]);
    std::vector<index> shape = {m.rows(), m.cols()};
    if (m.rows() == 1) shape = {m.cols()};  // row vectors are 1-d tensors
    out.push_back(io::st_write_tensor::make(name, shape, data));
  };
  auto put_linear = [&](const std::string& base, const linear<T>& l) {
    put(base + ".weight", l.weight);
    put(base + ".bias", l.bias);
  };
  auto put_norm = [&](const std::string& base, const layer_norm<T>& n) {
    put(base + ".weight", n.weight);
    put(base + ".bias", n.bias);
  };
  const index D = c.hidden_size;
  put("bert.embeddings.word_embeddings.weight", w.word);
  put("bert.embeddings.position_embeddings.weight", w.position);
  put("bert.embeddings.token_type_embeddings.weight", w.token_type);
  put_norm("bert.embeddings.LayerNorm", w.embedding_norm);
  for (std::size_t i = 0; i < w.layers.size(); ++i) {
    const auto& l = w.layers[i];
    const std::string q = "bert.encoder.layer." + std::to_string(i) + ".";
    const char* parts[3] = {"query", "key", "value"};
    for (index k = 0; k < 3; ++k) {
      put(q + "attention.self." + parts[k] + ".weight", mat<T>(l.qkv.weight.middleRows(k * D, D)));
      put(q + "attention.self." + parts[k] + ".bias", vec<T>(l.qkv.bias.segment(k * D, D)));
    }
    put_linear(q + "attention.output.dense", l.attention_out);
    put_norm(q + "attention.output.LayerNorm", l.attention_norm);
    put_linear(q + "intermediate.dense", l.intermediate);
    put_linear(q + "output.dense", l.output);
    put_norm(q + "output.LayerNorm", l.output_norm);
  }
  if (c.norm == norm_placement::pre) put_norm("bert.encoder.final_layer_norm", w.final_norm);
  if (w.has_transform) {
    put_linear("cls.predictions.transform.dense", w.transform);
    put_norm("cls.predictions.transform.LayerNorm", w.transform_norm);
  }
  put("cls.predictions.decoder.weight", w.decoder);
  put("cls.predictions.bias", w.decoder_bias);
  io::write_safetensors((p / "model.safetensors").string(), out);
}

/// A model folder: config.json + model.safetensors.
template <class T = float>
struct model {
  config cfg;
  std::shared_ptr<const weights<T>> w;

  static model load(const std::string& dir) {
    namespace fs = std::filesystem;
    const fs::path p(dir);
    std::error_code ec;
    const fs::file_type type = fs::status(p, ec).type();
    if (type == fs::file_type::not_found)
      fail(dir, "no such directory (expected a directory with config.json + model.safetensors)");
    if (ec) fail(dir, "cannot access: " + ec.message());
    if (type != fs::file_type::directory)
      fail(dir,
           std::string("is ") + io::detail::file_type_name(type) +
               ", not a directory (expected a directory with config.json + model.safetensors)");
    model m;
    m.cfg = config::load((p / "config.json").string());
    const safetensors_file f((p / "model.safetensors").string());
    m.w = std::make_shared<const weights<T>>(load_weights<T>(m.cfg, f));
    return m;
  }
};

}  // namespace bert
