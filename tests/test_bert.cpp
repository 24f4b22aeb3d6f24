// The BERT-style example (examples/bert): a tiny random model written to disk by the test
// (config.json + model.safetensors, Hugging Face names) loads, and the encoder + masked-LM head
// with dense attention matches a plain float64 forward pass written here, for post- and pre-norm,
// both GELU variants and every optional-tensor rule; broken files are refused with a clear message.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <limits>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fastattn/fastattn.hpp>
#include <fastattn/io/safetensors.hpp>

#include "bert.hpp"

namespace fa = fastattn;
namespace fb = bert;
namespace fio = fastattn::io;
namespace fs = std::filesystem;
using idx = fa::index;
using matd = fa::matrix<double>;

namespace {

using fa::testing::refusal_without_blocking;

/// How the test model is written.
struct variant {
  bool pre_norm = false;
  bool tanh_gelu = false;
  bool prefix = true;       ///< "bert." on encoder tensors
  bool gamma_beta = false;  ///< old LayerNorm.gamma / .beta names
  bool transform = true;    ///< cls.predictions.transform.*
  bool tied = true;         ///< no decoder.weight
  idx classes = 0;          ///< decoder rows when untied (0 = vocab)
  idx type_vocab = 2;       ///< 0: no token-type embeddings
  bool embedding_norm = true;
  fio::st_dtype dtype = fio::st_dtype::F32;  ///< F32 or F64 weights
  double eps = 1e-12;
};

constexpr idx vocab = 37, D = 16, H = 2, layers = 2, inter = 24, max_pos = 16;

/// Canonical (unprefixed, weight/bias) name -> (shape, values rounded to the stored dtype).
using tensor_map = std::map<std::string, std::pair<std::vector<idx>, std::vector<double>>>;

tensor_map make_tensors(const variant& v, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  tensor_map t;
  auto add = [&](const std::string& name, std::vector<idx> shape, double sigma, double mean = 0) {
    idx n = 1;
    for (const idx d : shape) n *= d;
    std::vector<double> x(static_cast<std::size_t>(n));
    for (auto& e : x) {
      e = mean + sigma * normal(gen);
      if (v.dtype == fio::st_dtype::F32) e = static_cast<double>(static_cast<float>(e));
    }
    t[name] = {std::move(shape), std::move(x)};
  };
  auto norm = [&](const std::string& base) {
    add(base + ".weight", {D}, 0.1, 1.0);
    add(base + ".bias", {D}, 0.1);
  };
  add("embeddings.word_embeddings.weight", {vocab, D}, 1.0);
  add("embeddings.position_embeddings.weight", {max_pos, D}, 0.5);
  if (v.type_vocab > 0) add("embeddings.token_type_embeddings.weight", {v.type_vocab, D}, 0.5);
  if (v.embedding_norm) norm("embeddings.LayerNorm");
  const double w = 0.4;  // large enough that attention is far from uniform
  for (idx l = 0; l < layers; ++l) {
    const std::string p = "encoder.layer." + std::to_string(l) + ".";
    for (const char* m : {"attention.self.query", "attention.self.key", "attention.self.value",
                          "attention.output.dense"}) {
      add(p + m + ".weight", {D, D}, w);
      add(p + m + ".bias", {D}, 0.1);
    }
    norm(p + "attention.output.LayerNorm");
    add(p + "intermediate.dense.weight", {inter, D}, w);
    add(p + "intermediate.dense.bias", {inter}, 0.1);
    add(p + "output.dense.weight", {D, inter}, w);
    add(p + "output.dense.bias", {D}, 0.1);
    norm(p + "output.LayerNorm");
  }
  if (v.pre_norm) norm("encoder.final_layer_norm");
  if (v.transform) {
    add("cls.predictions.transform.dense.weight", {D, D}, w);
    add("cls.predictions.transform.dense.bias", {D}, 0.1);
    norm("cls.predictions.transform.LayerNorm");
  }
  const idx C = v.tied ? vocab : (v.classes ? v.classes : vocab);
  if (!v.tied) add("cls.predictions.decoder.weight", {C, D}, 0.5);
  add("cls.predictions.bias", {C}, 0.1);
  return t;
}

std::string stored_name(const variant& v, std::string name) {
  if (v.gamma_beta && name.find("LayerNorm.") != std::string::npos) {
    if (name.ends_with(".weight"))
      name = name.substr(0, name.size() - 7) + ".gamma";
    else if (name.ends_with(".bias"))
      name = name.substr(0, name.size() - 5) + ".beta";
  }
  if (v.prefix && name.rfind("cls.", 0) != 0) name = "bert." + name;
  return name;
}

void write_model(const fs::path& dir, const variant& v, const tensor_map& t) {
  fs::create_directories(dir);
  nlohmann::json cfg = {{"architectures", {"BertForMaskedLM"}},
                        {"model_type", "bert"},
                        {"vocab_size", vocab},
                        {"hidden_size", D},
                        {"num_hidden_layers", layers},
                        {"num_attention_heads", H},
                        {"intermediate_size", inter},
                        {"max_position_embeddings", max_pos},
                        {"type_vocab_size", v.type_vocab},
                        {"layer_norm_eps", v.eps},
                        {"hidden_act", v.tanh_gelu ? "gelu_new" : "gelu"},
                        {"position_embedding_type", "absolute"},
                        {"hidden_dropout_prob", 0.1}};
  if (v.pre_norm) cfg["norm"] = "pre";
  std::ofstream(dir / "config.json") << cfg.dump(2);
  std::vector<fio::st_write_tensor> out;
  for (const auto& [name, value] : t) {
    if (v.dtype == fio::st_dtype::F32) {
      std::vector<float> f(value.second.begin(), value.second.end());
      out.push_back(fio::st_write_tensor::make(stored_name(v, name), value.first, f));
    } else {
      out.push_back(fio::st_write_tensor::make(stored_name(v, name), value.first, value.second));
    }
  }
  // An unrelated tensor (as in BertForPreTraining checkpoints) is ignored.
  out.push_back(fio::st_write_tensor::make("cls.seq_relationship.weight", {2, D},
                                           std::vector<float>(2 * D, 0.f)));
  fio::write_safetensors((dir / "model.safetensors").string(), out);
}

// ---- the float64 reference: plain loops over one sample's valid tokens ----

struct reference_model {
  const tensor_map& t;
  variant v;
  matd m(const std::string& name) const {
    const auto& [shape, data] = t.at(name);
    matd x(shape[0], shape.size() > 1 ? shape[1] : 1);
    for (idx i = 0; i < x.size(); ++i) x.data()[i] = data[static_cast<std::size_t>(i)];
    return x;
  }
  Eigen::RowVectorXd row(const std::string& name) const { return m(name).transpose(); }
  bool has(const std::string& name) const { return t.count(name) > 0; }

  matd linear(const matd& x, const std::string& base) const {
    matd y = x * m(base + ".weight").transpose();
    y.rowwise() += row(base + ".bias");
    return y;
  }
  matd norm(const matd& x, const std::string& base) const {
    matd y = x;
    const auto g = row(base + ".weight"), b = row(base + ".bias");
    for (idx r = 0; r < x.rows(); ++r) {
      const double mean = x.row(r).mean();
      double var = 0;
      for (idx c = 0; c < x.cols(); ++c) var += (x(r, c) - mean) * (x(r, c) - mean);
      var /= static_cast<double>(x.cols());
      for (idx c = 0; c < x.cols(); ++c)
        y(r, c) = (x(r, c) - mean) / std::sqrt(var + v.eps) * g[c] + b[c];
    }
    return y;
  }
  matd act(matd x) const {
    for (idx i = 0; i < x.size(); ++i) {
      const double a = x.data()[i];
      x.data()[i] =
          v.tanh_gelu ? 0.5 * a * (1 + std::tanh(std::sqrt(2 / M_PI) * (a + 0.044715 * a * a * a)))
                      : 0.5 * a * (1 + std::erf(a / std::sqrt(2.0)));
    }
    return x;
  }
  matd attention(const matd& x, const std::string& p) const {
    const matd q = linear(x, p + "attention.self.query"), k = linear(x, p + "attention.self.key"),
               val = linear(x, p + "attention.self.value");
    const idx n = x.rows(), E = D / H;
    matd ctx(n, D);
    for (idx h = 0; h < H; ++h)
      for (idx i = 0; i < n; ++i) {
        std::vector<double> s(static_cast<std::size_t>(n));
        double mx = -1e300, sum = 0;
        for (idx j = 0; j < n; ++j) {
          double d = 0;
          for (idx e = 0; e < E; ++e) d += q(i, h * E + e) * k(j, h * E + e);
          s[static_cast<std::size_t>(j)] = d / std::sqrt(static_cast<double>(E));
          mx = std::max(mx, s[static_cast<std::size_t>(j)]);
        }
        for (auto& e : s) sum += (e = std::exp(e - mx));
        for (idx e = 0; e < E; ++e) {
          double o = 0;
          for (idx j = 0; j < n; ++j) o += s[static_cast<std::size_t>(j)] / sum * val(j, h * E + e);
          ctx(i, h * E + e) = o;
        }
      }
    return linear(ctx, p + "attention.output.dense");
  }
  /// Logits (n, C) for the first n tokens of one sample.
  matd logits(const std::vector<std::int64_t>& ids, const std::vector<std::int64_t>& types) const {
    const idx n = static_cast<idx>(ids.size());
    const matd word = m("embeddings.word_embeddings.weight"),
               pos = m("embeddings.position_embeddings.weight");
    matd x(n, D);
    for (idx i = 0; i < n; ++i) {
      x.row(i) = word.row(ids[static_cast<std::size_t>(i)]) + pos.row(i);
      if (has("embeddings.token_type_embeddings.weight"))
        x.row(i) += m("embeddings.token_type_embeddings.weight")
                        .row(types.empty() ? 0 : types[static_cast<std::size_t>(i)]);
    }
    if (has("embeddings.LayerNorm.weight")) x = norm(x, "embeddings.LayerNorm");
    for (idx l = 0; l < layers; ++l) {
      const std::string p = "encoder.layer." + std::to_string(l) + ".";
      if (v.pre_norm) {
        x = x + attention(norm(x, p + "attention.output.LayerNorm"), p);
        x = x + linear(act(linear(norm(x, p + "output.LayerNorm"), p + "intermediate.dense")),
                       p + "output.dense");
      } else {
        x = norm(x + attention(x, p), p + "attention.output.LayerNorm");
        x = norm(x + linear(act(linear(x, p + "intermediate.dense")), p + "output.dense"),
                 p + "output.LayerNorm");
      }
    }
    if (v.pre_norm) x = norm(x, "encoder.final_layer_norm");
    if (has("cls.predictions.transform.dense.weight"))
      x = norm(act(linear(x, "cls.predictions.transform.dense")),
               "cls.predictions.transform.LayerNorm");
    const matd dec =
        has("cls.predictions.decoder.weight") ? m("cls.predictions.decoder.weight") : word;
    matd y = x * dec.transpose();
    y.rowwise() += row("cls.predictions.bias");
    return y;
  }
};

class Bert : public fa::testing::temporary_directory_test {};

fb::batch make_batch(idx B, idx L, const std::vector<idx>& lengths, bool types,
                     std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  fb::batch in;
  in.size = B;
  in.length = L;
  for (idx i = 0; i < B * L; ++i) {
    in.input_ids.push_back(std::uniform_int_distribution<std::int64_t>(0, vocab - 1)(gen));
    if (types) in.token_type_ids.push_back(std::uniform_int_distribution<std::int64_t>(0, 1)(gen));
  }
  in.lengths = lengths;
  return in;
}

/// Relative error of the encoder (dense, T) against the reference over every valid position.
template <class T>
double model_error(const fs::path& dir, const variant& v, const tensor_map& t) {
  const auto m = fb::model<T>::load(dir.string());
  const fb::encoder<fa::dense, T> enc(m.cfg, m.w);
  const idx B = 3, L = 12;
  const std::vector<idx> lengths = {12, 7, 1};
  const fb::batch in = make_batch(B, L, lengths, v.type_vocab > 0, 99);
  const auto hidden = enc.forward(in);
  const reference_model ref{t, v};
  double diff = 0, norm = 0;
  for (idx b = 0; b < B; ++b) {
    const idx n = lengths[static_cast<std::size_t>(b)];
    const auto first = in.input_ids.begin() + b * L;
    std::vector<std::int64_t> ids(first, first + n), types;
    if (!in.token_type_ids.empty())
      types.assign(in.token_type_ids.begin() + b * L, in.token_type_ids.begin() + b * L + n);
    const matd expected = ref.logits(ids, types);
    const auto got = enc.mlm_logits(hidden.middleRows(b * L, n)).template cast<double>().eval();
    EXPECT_EQ(got.cols(), expected.cols());
    if (got.cols() != expected.cols()) return 1.0;
    diff += (got - expected).squaredNorm();
    norm += expected.squaredNorm();
  }
  return std::sqrt(diff / norm);
}

TEST_F(Bert, DenseEncoderMatchesFloat64Reference) {
  std::vector<std::pair<std::string, variant>> variants;
  for (const bool pre : {false, true})
    for (const bool tanh : {false, true})
      variants.push_back({std::string(pre ? "pre" : "post") + (tanh ? "_gelu_new" : "_gelu"),
                          variant{.pre_norm = pre, .tanh_gelu = tanh}});
  variants.push_back(
      {"unprefixed_gamma_beta_eps", variant{.prefix = false, .gamma_beta = true, .eps = 1e-5}});
  variants.push_back({"no_transform_untied_fewer_classes",
                      variant{.transform = false, .tied = false, .classes = 30}});
  variants.push_back(
      {"no_token_types_no_embedding_norm", variant{.type_vocab = 0, .embedding_norm = false}});
  variants.push_back(
      {"pre_untied_f64", variant{.pre_norm = true, .tied = false, .dtype = fio::st_dtype::F64}});
  std::uint64_t seed = 1;
  for (const auto& [name, v] : variants) {
    SCOPED_TRACE(name);
    const tensor_map t = make_tensors(v, seed++);
    write_model(dir_ / name, v, t);
    const double ef = model_error<float>(dir_ / name, v, t);
    const double ed = model_error<double>(dir_ / name, v, t);
    EXPECT_LT(ef, 1e-4) << "float encoder";
    EXPECT_LT(ed, 1e-10) << "double encoder";
    char buffer[32];
    std::snprintf(buffer, sizeof buffer, "%.2e", ef);
    RecordProperty(name + "_float_rel_err", buffer);
  }
}

TEST_F(Bert, AnyPolicyRunsTheSameModel) {
  const variant v{};
  const tensor_map t = make_tensors(v, 5);
  write_model(dir_ / "m", v, t);
  const auto m = fb::model<float>::load((dir_ / "m").string());
  const fb::batch in = make_batch(2, 16, {16, 10}, true, 3);
  const auto exact = fb::encoder<fa::dense>(m.cfg, m.w).forward(in);
  fa::kernels::for_each([&](auto tag) {
    using P = typename decltype(tag)::type;
    const fb::encoder<P> enc(m.cfg, m.w, P{});
    fb::timing time;
    const auto hidden = enc.forward(in, &time);
    EXPECT_TRUE(hidden.allFinite()) << P::name;
    EXPECT_GT(time.attention, 0.0);
    EXPECT_LE(time.attention, time.total);
    // With L = 16 every approximate kernel at its defaults degenerates to (nearly) exact attention.
    EXPECT_LT((hidden - exact).norm() / exact.norm(), 0.5) << P::name;
  });
}

TEST_F(Bert, SaveModelRoundTrips) {
  for (const bool pre : {false, true}) {
    fb::config c;
    c.vocab_size = vocab;
    c.hidden_size = 12;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 3;
    c.intermediate_size = 20;
    c.max_position_embeddings = 10;
    c.norm = pre ? fb::norm_placement::pre : fb::norm_placement::post;
    c.hidden_act = pre ? fb::activation::gelu_tanh : fb::activation::gelu_erf;
    const auto w = fb::random_weights<float>(c, 3);
    const fs::path d = dir_ / (pre ? "pre" : "post");
    fs::create_directories(d);
    fb::save_model(d.string(), c, w);
    const auto m = fb::model<float>::load(d.string());
    EXPECT_EQ(m.cfg.norm, c.norm);
    EXPECT_EQ(m.cfg.hidden_act, c.hidden_act);
    const fb::batch in = make_batch(2, 10, {10, 6}, true, 8);
    const fb::encoder<fa::dense> a(c, w), b(m.cfg, m.w);
    const auto ha = a.forward(in), hb = b.forward(in);
    EXPECT_EQ(ha, hb);
    EXPECT_EQ(a.mlm_logits(ha), b.mlm_logits(hb));
  }
}

// ---- broken files ----

void write_raw(const fs::path& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary) << bytes;
}
std::string read_raw(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void expect_refused(const fs::path& dir, const std::string& needle) {
  try {
    (void)fb::model<float>::load(dir.string());
    ADD_FAILURE() << "loaded a broken model (expected '" << needle << "')";
  } catch (const fa::invalid_argument& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(needle), std::string::npos) << "expected '" << needle << "' in: " << what;
    EXPECT_EQ(what.find('\n'), std::string::npos) << what;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not a fastattn::invalid_argument (expected '" << needle << "'): " << e.what();
  }
}

TEST_F(Bert, LoadingRefusesBrokenFiles) {
  const variant v{};
  const tensor_map t = make_tensors(v, 7);
  const fs::path good = dir_ / "good";
  write_model(good, v, t);
  const std::string st = read_raw(good / "model.safetensors");
  const std::string cfg = read_raw(good / "config.json");
  int case_id = 0;
  auto with = [&](const std::string& safetensors, const std::string& config) {
    const fs::path d = dir_ / ("case" + std::to_string(case_id++));
    fs::create_directories(d);
    write_raw(d / "model.safetensors", safetensors);
    write_raw(d / "config.json", config);
    return d;
  };
  auto cfg_edit = [&](const std::string& key, const nlohmann::json& value) {
    auto j = nlohmann::json::parse(cfg);
    if (value.is_null())
      j.erase(key);
    else
      j[key] = value;
    return j.dump();
  };
  auto st_with = [&](std::vector<fio::st_write_tensor> extra, const std::string& drop = "",
                     const std::string& reshape = "", std::vector<idx> shape = {}) {
    std::vector<fio::st_write_tensor> out;
    for (const auto& [name, value] : t) {
      const std::string n = stored_name(v, name);
      if (n == drop) continue;
      std::vector<float> f(value.second.begin(), value.second.end());
      if (n == reshape) {
        idx count = 1;
        for (const idx d : shape) count *= d;
        f.assign(static_cast<std::size_t>(count), 0.f);
        out.push_back(fio::st_write_tensor::make(n, shape, f));
      } else {
        out.push_back(fio::st_write_tensor::make(n, value.first, f));
      }
    }
    for (auto& e : extra) out.push_back(std::move(e));
    const fs::path p = dir_ / "tmp.safetensors";
    fio::write_safetensors(p.string(), out);
    return read_raw(p);
  };

  expect_refused(dir_ / "nowhere", "no such directory");
  expect_refused(with(st, "{not json"), "not valid JSON");
  expect_refused(with(st, cfg_edit("hidden_size", nullptr)), "missing key 'hidden_size'");
  expect_refused(with(st, cfg_edit("hidden_act", "relu")), "unsupported hidden_act 'relu'");
  expect_refused(with(st, cfg_edit("num_attention_heads", 3)), "multiple of num_attention_heads");
  expect_refused(with(st, cfg_edit("norm", "middle")), "'norm'");
  expect_refused(with(st, cfg_edit("vocab_size", "many")), "'vocab_size' must be an integer");
  expect_refused(with(st, cfg_edit("hidden_size", 32)), "expected [37, 32]");
  expect_refused(with(st, cfg_edit("num_hidden_layers", 3)),
                 "missing tensor 'bert.encoder.layer.2");
  expect_refused(with(st, cfg_edit("num_hidden_layers", 1)), "more layers");
  expect_refused(with(st, cfg_edit("norm", "pre")), "encoder.final_layer_norm");
  expect_refused(with(st, cfg_edit("type_vocab_size", 0)), "type_vocab_size = 0");
  expect_refused(with(st.substr(0, 5), cfg), "shorter than the 8-byte");
  expect_refused(with(st.substr(0, st.size() - 10), cfg), "outside the data buffer");
  std::string huge = st;
  huge[6] = '\x7f';
  expect_refused(with(huge, cfg), "exceeds the file");
  std::string bad_json = st;
  bad_json[8] = 'x';
  expect_refused(with(bad_json, cfg), "not valid JSON");
  expect_refused(with(st_with({}, "bert.encoder.layer.1.output.dense.bias"), cfg),
                 "missing tensor 'bert.encoder.layer.1.output.dense.bias'");
  expect_refused(with(st_with({}, "bert.embeddings.word_embeddings.weight"), cfg),
                 "not a BERT checkpoint");
  expect_refused(with(st_with({}, "bert.encoder.layer.0.output.LayerNorm.bias"), cfg),
                 "weight without a bias");
  expect_refused(
      with(st_with({}, "", "bert.encoder.layer.0.intermediate.dense.weight", {D, inter}), cfg),
      "has shape [16, 24], expected [24, 16]");
  expect_refused(with(st_with({}, "", "cls.predictions.bias", {vocab + 1}), cfg),
                 "cls.predictions.bias");
  expect_refused(with(st_with({fio::st_write_tensor::make(
                          "cls.predictions.decoder.weight", {vocab + 5, D},
                          std::vector<float>(static_cast<std::size_t>((vocab + 5) * D)))}),
                      cfg),
                 "1 <= C <= vocab_size");
  // Wrong dtype kind for a weight, and a header whose sizes lie.
  {
    std::vector<fio::st_write_tensor> out;
    for (const auto& [name, value] : t) {
      const std::string n = stored_name(v, name);
      if (n == "bert.embeddings.position_embeddings.weight") {
        out.push_back(fio::st_write_tensor::make(n, value.first,
                                                 std::vector<std::int32_t>(value.second.size())));
      } else {
        out.push_back(fio::st_write_tensor::make(
            n, value.first, std::vector<float>(value.second.begin(), value.second.end())));
      }
    }
    fio::write_safetensors((dir_ / "tmp.safetensors").string(), out);
    expect_refused(with(read_raw(dir_ / "tmp.safetensors"), cfg),
                   "expected a floating-point dtype");
  }
  auto patched_header = [&](const std::string& from, const std::string& to) {
    std::string s = st;
    const auto pos = s.find(from);
    EXPECT_NE(pos, std::string::npos) << from;
    s.replace(pos, from.size(), to);  // same length keeps the header length valid
    return s;
  };
  expect_refused(with(patched_header("\"F32\"", "\"Q32\""), cfg), "unsupported dtype 'Q32'");
  expect_refused(with(patched_header("\"shape\":[37,16]", "\"shape\":[37,17]"), cfg),
                 "does not match dtype");
  expect_refused(with(patched_header("\"dtype\":\"F32\"", "\"dtype\":\"F64\""), cfg),
                 "does not match dtype");
  // Random damage never crashes the loader.
  std::mt19937_64 gen(3);
  for (int trial = 0; trial < 200; ++trial) {
    std::string s = st;
    if (trial % 3 == 0) {
      s.resize(std::uniform_int_distribution<std::size_t>(0, s.size() - 1)(gen));
    } else {
      const std::size_t header =
          8 + static_cast<std::size_t>(static_cast<unsigned char>(st[0]) |
                                       (static_cast<unsigned char>(st[1]) << 8));
      for (int f = 0; f < 1 + trial % 4; ++f)
        s[std::uniform_int_distribution<std::size_t>(0, header - 1)(gen)] =
            static_cast<char>(std::uniform_int_distribution<int>(0, 255)(gen));
    }
    const fs::path d = with(s, cfg);
    try {
      (void)fb::model<float>::load(d.string());
    } catch (const fa::invalid_argument&) {
    }
    fs::remove_all(d);
  }
}

// Issue 10 defect 6: a NaN or infinite weight is refused when the model loads, naming the file,
// the tensor and the element; it used to reach the forward pass and come out as "loss: nan" or as
// an error about the attention input q and a C++ option (check_finite) the tool does not have.
TEST_F(Bert, NonFiniteWeightIsRefusedWhenLoading) {
  const variant v{};
  int case_id = 0;
  for (const double bad :
       {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(),
        -std::numeric_limits<double>::infinity()}) {
    tensor_map t = make_tensors(v, 13);
    t.at("encoder.layer.0.attention.self.query.weight").second[17] = bad;
    const fs::path d = dir_ / ("m" + std::to_string(case_id++));
    write_model(d, v, t);
    const std::string value = std::isnan(bad) ? "nan" : bad > 0 ? "inf" : "-inf";
    expect_refused(d, (d / "model.safetensors").string() +
                          ": tensor 'bert.encoder.layer.0.attention.self.query.weight' has a "
                          "non-finite value (" +
                          value + ") at element 17");
  }
  // An F64 weight beyond float's range: refused for a float model, fine for a double one.
  const variant f64{.dtype = fio::st_dtype::F64};
  tensor_map t = make_tensors(f64, 14);
  t.at("encoder.layer.1.output.dense.bias").second[3] = 1e300;
  write_model(dir_ / "f64", f64, t);
  expect_refused(dir_ / "f64",
                 "tensor 'bert.encoder.layer.1.output.dense.bias' has the value 1e+300 at element "
                 "3, which overflows float");
  EXPECT_NO_THROW((void)fb::model<double>::load((dir_ / "f64").string()));
}

// Issue 10 defect 6: finite weights whose activations overflow are reported naming the layer,
// sample and position; they used to surface in the next layer as "sample 0, head 0: q has a
// non-finite value ...; pass options.check_finite = false".
TEST_F(Bert, OverflowingActivationsNameTheLayer) {
  const variant v{};
  tensor_map t = make_tensors(v, 15);
  for (const char* name :
       {"encoder.layer.0.intermediate.dense.weight", "encoder.layer.0.output.dense.weight"})
    for (double& x : t.at(name).second) x *= 1e20;  // finite as float; their product is not
  write_model(dir_ / "m", v, t);
  const auto m = fb::model<float>::load((dir_ / "m").string());
  const fb::encoder<fa::dense> enc(m.cfg, m.w);
  try {
    (void)enc.forward(make_batch(2, 8, {8, 5}, true, 1));
    ADD_FAILURE() << "an overflowing forward pass returned";
  } catch (const fa::invalid_argument& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("encoder: layer 0's output is not finite"), std::string::npos) << what;
    EXPECT_NE(what.find("at sample 0, position 0"), std::string::npos) << what;
    EXPECT_EQ(what.find("check_finite"), std::string::npos) << what;
  }
}

// Issue 10 defect 11: B * L is computed with checked arithmetic. B = 2^62 + 1, L = 4 used to
// wrap to 4, pass the size check with 4 token ids, and read far out of bounds.
TEST_F(Bert, EncoderRejectsBatchShapesThatOverflow) {
  const variant v{};
  write_model(dir_ / "m", v, make_tensors(v, 16));
  const auto m = fb::model<float>::load((dir_ / "m").string());
  const fb::encoder<fa::dense> enc(m.cfg, m.w);
  for (const idx B : {(idx{1} << 62) + 1, idx{1} << 62, std::numeric_limits<idx>::max()}) {
    fb::batch in;
    in.size = B;
    in.length = 4;
    in.input_ids = {1, 2, 3, 4};
    try {
      (void)enc.forward(in);
      ADD_FAILURE() << "B = " << B << " accepted";
    } catch (const fa::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("samples of L = 4 tokens are too many"),
                std::string::npos)
          << e.what();
    }
  }
}

// Issue 10 defect 16: each message names the file and the real cause. config.json as a directory
// used to escape as "basic_filebuf::underflow ... Is a directory" naming no file, a directory as
// model.safetensors said "no such file", and a FIFO as config.json blocked forever.
TEST_F(Bert, FilesAreRefusedWithTheRealCause) {
  const variant v{};
  const tensor_map t = make_tensors(v, 17);
  auto model_dir = [&](const std::string& name) {
    write_model(dir_ / name, v, t);
    return dir_ / name;
  };
  const fs::path a = model_dir("config_dir");
  fs::remove(a / "config.json");
  fs::create_directory(a / "config.json");
  expect_refused(a, (a / "config.json").string() + ": is a directory, not a regular file");

  const fs::path b = model_dir("weights_dir");
  fs::remove(b / "model.safetensors");
  fs::create_directory(b / "model.safetensors");
  expect_refused(b, (b / "model.safetensors").string() + ": is a directory, not a regular file");

  const fs::path c = model_dir("missing");
  fs::remove(c / "model.safetensors");
  expect_refused(c, (c / "model.safetensors").string() + ": cannot open: no such file");

  for (const char* file : {"config.json", "model.safetensors"}) {
    const fs::path d = model_dir(std::string("fifo_") + file);
    fs::remove(d / file);
    const std::string fifo = (d / file).string();
    ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0) << std::strerror(errno);
    const std::string what =
        refusal_without_blocking(fifo, [&] { (void)fb::model<float>::load(d.string()); });
    EXPECT_NE(what.find(fifo + ": is a FIFO, not a regular file"), std::string::npos) << what;
  }

  expect_refused(model_dir("m") / "config.json", "is a regular file, not a directory");
  const fs::path e = model_dir("bad_json");
  write_raw(e / "config.json", "{\"vocab_size\": 37,\n \"hidden_size\": }");
  expect_refused(e, (e / "config.json").string() + ": not valid JSON: parse error at line 2");
  const fs::path f = model_dir("deep_json");
  write_raw(f / "config.json", std::string(100000, '[') + std::string(100000, ']'));
  expect_refused(f, (f / "config.json").string() + ": JSON nests deeper than 64 levels");
}

#ifdef FASTATTN_MLM_PATH
TEST_F(Bert, MlmToolReportsLossAndTable) {
  const variant v{};
  const tensor_map t = make_tensors(v, 11);
  write_model(dir_ / "m", v, t);
  const idx B = 2, L = 12;
  const fb::batch in = make_batch(B, L, {}, false, 4);
  std::vector<std::int64_t> labels(static_cast<std::size_t>(B * L), -100),
      mask(static_cast<std::size_t>(B * L), 1);
  for (idx i = 0; i < B * L; i += 3)
    labels[static_cast<std::size_t>(i)] = in.input_ids[static_cast<std::size_t>(i)];
  for (idx i = 8; i < L; ++i) {  // sample 1 has 8 valid tokens
    mask[static_cast<std::size_t>(L + i)] = 0;
    labels[static_cast<std::size_t>(L + i)] = -100;
  }
  fio::write_safetensors((dir_ / "batch.safetensors").string(),
                         {fio::st_write_tensor::make("input_ids", {B, L}, in.input_ids),
                          fio::st_write_tensor::make("labels", {B, L}, labels),
                          fio::st_write_tensor::make("attention_mask", {B, L}, mask)});
  // Expected loss from the float64 reference.
  const reference_model ref{t, v};
  double loss = 0;
  int count = 0;
  for (idx b = 0; b < B; ++b) {
    const idx n = b == 0 ? L : 8;
    std::vector<std::int64_t> ids(in.input_ids.begin() + b * L, in.input_ids.begin() + b * L + n);
    const matd logits = ref.logits(ids, {});
    for (idx i = 0; i < n; ++i) {
      const auto label = labels[static_cast<std::size_t>(b * L + i)];
      if (label == -100) continue;
      const double mx = logits.row(i).maxCoeff();
      loss += std::log((logits.row(i).array() - mx).exp().sum()) + mx - logits(i, label);
      ++count;
    }
  }
  loss /= count;
  const std::string base = std::string(FASTATTN_MLM_PATH) + " --model " + (dir_ / "m").string() +
                           " --data " + (dir_ / "batch.safetensors").string();
  const std::string out = (dir_ / "out.txt").string(), err = (dir_ / "err.txt").string();
  int status = std::system((base + " --kernel dense >" + out + " 2>" + err).c_str());
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << read_raw(err);
  const std::string text = read_raw(out);
  const auto pos = text.find("loss: ");
  ASSERT_NE(pos, std::string::npos) << text;
  EXPECT_NEAR(std::stod(text.substr(pos + 6)), loss, 1e-4 * std::abs(loss)) << text;
  status = std::system((base + " --kernel all >" + out + " 2>" + err).c_str());
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << read_raw(err);
  const std::string table = read_raw(out);
  fa::kernels::for_each([&](auto tag) {
    using P = typename decltype(tag)::type;
    std::string needle(P::name);  // (not name + " ": GCC 12's -Warray-bounds false positive)
    needle += ' ';
    EXPECT_NE(table.find(needle), std::string::npos) << table;
  });
  // Mistakes give one line and status 1.
  status = std::system((base + " --kernel dense --clusters 3 >" + out + " 2>" + err).c_str());
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1);
  const std::string message = read_raw(err);
  EXPECT_EQ(std::count(message.begin(), message.end(), '\n'), 1) << message;
  status = std::system((std::string(FASTATTN_MLM_PATH) + " --model " + (dir_ / "m").string() +
                        " --data " + (dir_ / "m" / "config.json").string() + " --kernel dense >" +
                        out + " 2>" + err)
                           .c_str());
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1);
  EXPECT_NE(read_raw(err).find("config.json"), std::string::npos) << read_raw(err);
}

/// Runs fastattn_mlm with `args`; returns (exit status, stdout, stderr).
struct tool_run {
  int status = -1;
  std::string out, err;
};
tool_run run_mlm(const fs::path& dir, const std::string& args) {
  const std::string out = (dir / "out.txt").string(), err = (dir / "err.txt").string();
  const int status =
      std::system((std::string(FASTATTN_MLM_PATH) + " " + args + " >" + out + " 2>" + err).c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, read_raw(out), read_raw(err)};
}

// Issue 10 defect 6: a model with NaN or infinite weights, or whose loss is not finite, makes
// fastattn_mlm fail (status 1) with a message that names the tensor; it used to print
// "loss: nan" and exit 0.
TEST_F(Bert, MlmToolRefusesNonFiniteWeightsAndLoss) {
  const idx B = 2, L = 8;
  const fb::batch in = make_batch(B, L, {}, false, 5);
  std::vector<std::int64_t> labels(static_cast<std::size_t>(B * L), -100);
  for (idx i = 0; i < B * L; i += 2)
    labels[static_cast<std::size_t>(i)] = in.input_ids[static_cast<std::size_t>(i)];
  const std::string data = (dir_ / "batch.safetensors").string();
  fio::write_safetensors(data, {fio::st_write_tensor::make("input_ids", {B, L}, in.input_ids),
                                fio::st_write_tensor::make("labels", {B, L}, labels)});

  const variant v{};
  tensor_map nan = make_tensors(v, 18);
  nan.at("encoder.layer.0.attention.self.query.weight").second[17] =
      std::numeric_limits<double>::quiet_NaN();
  write_model(dir_ / "nan", v, nan);
  for (const char* kernel : {"dense", "all"}) {
    const tool_run r = run_mlm(
        dir_, "--model " + (dir_ / "nan").string() + " --data " + data + " --kernel " + kernel);
    EXPECT_EQ(r.status, 1) << r.out << r.err;
    EXPECT_NE(r.err.find("model.safetensors: tensor "
                         "'bert.encoder.layer.0.attention.self.query.weight' has a non-finite "
                         "value (nan) at element 17"),
              std::string::npos)
        << r.err;
    EXPECT_EQ(r.err.find("check_finite"), std::string::npos) << r.err;
    EXPECT_EQ(r.out.find("nan"), std::string::npos) << r.out;
  }

  // Finite weights whose logits overflow float: the loss would be NaN.
  const variant untied{.tied = false};
  tensor_map big = make_tensors(untied, 19);
  for (double& x : big.at("cls.predictions.decoder.weight").second)
    x = x < 0 ? -static_cast<double>(std::numeric_limits<float>::max())
              : static_cast<double>(std::numeric_limits<float>::max());
  write_model(dir_ / "big", untied, big);
  const tool_run r =
      run_mlm(dir_, "--model " + (dir_ / "big").string() + " --data " + data + " --kernel dense");
  EXPECT_EQ(r.status, 1) << r.out << r.err;
  EXPECT_NE(r.err.find("logits at sample 0, position 0 are not finite with kernel dense"),
            std::string::npos)
      << r.err;
  EXPECT_EQ(r.out.find("loss: nan"), std::string::npos) << r.out;
}

// Issue 10 defect 7: labels on positions that attention_mask pads, an all-zero mask row, and mask
// values other than 0 and 1 are refused naming the sample, position and value; they used to be
// scored into the loss (or, for a 2, taken as 1).
TEST_F(Bert, MlmToolRefusesLabelsOnPaddingAndBadMasks) {
  const variant v{};
  write_model(dir_ / "m", v, make_tensors(v, 20));
  const idx B = 2, L = 12;
  const fb::batch in = make_batch(B, L, {}, false, 6);
  auto write_batch = [&](const std::vector<std::int64_t>& labels,
                         const std::vector<std::int64_t>& mask) {
    const std::string p = (dir_ / "batch.safetensors").string();
    fio::write_safetensors(p, {fio::st_write_tensor::make("input_ids", {B, L}, in.input_ids),
                               fio::st_write_tensor::make("labels", {B, L}, labels),
                               fio::st_write_tensor::make("attention_mask", {B, L}, mask)});
    return "--model " + (dir_ / "m").string() + " --data " + p + " --kernel dense";
  };
  std::vector<std::int64_t> labels(static_cast<std::size_t>(B * L), -100),
      mask(static_cast<std::size_t>(B * L), 1);
  for (idx t = 0; t < 8; t += 2) labels[static_cast<std::size_t>(t)] = 3;
  for (idx t = 8; t < L; ++t) mask[static_cast<std::size_t>(L + t)] = 0;  // sample 1: 8 tokens
  ASSERT_EQ(run_mlm(dir_, write_batch(labels, mask)).status, 0);          // consistent

  auto expect_refused_batch = [&](const std::string& args, const std::string& needle) {
    const tool_run r = run_mlm(dir_, args);
    EXPECT_EQ(r.status, 1) << r.out << r.err;
    EXPECT_NE(r.err.find(needle), std::string::npos) << "expected '" << needle << "' in: " << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  };
  auto padded_label = labels;
  padded_label[static_cast<std::size_t>(L + 9)] = 5;
  expect_refused_batch(write_batch(padded_label, mask),
                       "labels at sample 1, position 9 is 5 but attention_mask is 0 there");
  auto all_zero = mask;
  for (idx t = 0; t < L; ++t) all_zero[static_cast<std::size_t>(L + t)] = 0;
  expect_refused_batch(write_batch(labels, all_zero),
                       "attention_mask of sample 1 is all 0 (at sample 1, position 0)");
  auto two = mask;
  two[3] = 2;
  expect_refused_batch(write_batch(labels, two),
                       "attention_mask at sample 0, position 3 is 2; values must be 0");
  auto negative = mask;
  negative[L + 2] = -1;
  expect_refused_batch(write_batch(labels, negative),
                       "attention_mask at sample 1, position 2 is -1");
  auto holes = mask;
  holes[5] = 0;
  expect_refused_batch(write_batch(labels, holes),
                       "not right-padded (1...1 0...0): 1 at sample 0, position 6 after 0 at "
                       "sample 0, position 5");
  auto out_of_range = labels;
  out_of_range[4] = 1000;
  expect_refused_batch(write_batch(out_of_range, mask),
                       "labels at sample 0, position 4 is 1000, neither -100 (ignore) nor a class "
                       "in [0, 37)");
  // --data as a directory names it and says what it is (it used to say "no such file").
  expect_refused_batch(
      "--model " + (dir_ / "m").string() + " --data " + dir_.string() + " --kernel dense",
      dir_.string() + ": is a directory, not a regular file");
}

// ---- fastattn_mlm's wrappers: --window, --estimate-error, --max-error ----

/// The model of MlmToolReportsLossAndTable (2 layers, 2 heads) and its batch (B = 2, L = 12,
/// sample 1 with 8 valid tokens); returns "--model DIR --data FILE" and the batch as the tool
/// reads it.
std::string write_mlm_inputs(const fs::path& dir, fb::batch& in) {
  const variant v{};
  write_model(dir / "m", v, make_tensors(v, 11));
  const idx B = 2, L = 12;
  in = make_batch(B, L, {L, 8}, false, 4);
  std::vector<std::int64_t> labels(static_cast<std::size_t>(B * L), -100),
      mask(static_cast<std::size_t>(B * L), 1);
  for (idx i = 0; i < B * L; i += 3)
    labels[static_cast<std::size_t>(i)] = in.input_ids[static_cast<std::size_t>(i)];
  for (idx i = 8; i < L; ++i) {
    mask[static_cast<std::size_t>(L + i)] = 0;
    labels[static_cast<std::size_t>(L + i)] = -100;
  }
  fio::write_safetensors((dir / "batch.safetensors").string(),
                         {fio::st_write_tensor::make("input_ids", {B, L}, in.input_ids),
                          fio::st_write_tensor::make("labels", {B, L}, labels),
                          fio::st_write_tensor::make("attention_mask", {B, L}, mask)});
  return "--model " + (dir / "m").string() + " --data " + (dir / "batch.safetensors").string();
}

/// The line of `text` that starts with `prefix` ("" when none).
std::string line_starting(const std::string& text, const std::string& prefix) {
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);)
    if (line.rfind(prefix, 0) == 0) return line;
  return {};
}

/// The whitespace-separated fields of a line.
std::vector<std::string> fields(const std::string& line) {
  std::istringstream in(line);
  std::vector<std::string> out;
  for (std::string f; in >> f;) out.push_back(f);
  return out;
}

TEST_F(Bert, MlmToolWindowAddsAnExactBand) {
  fb::batch in;
  const std::string base = write_mlm_inputs(dir_, in);
  const tool_run dense = run_mlm(dir_, base + " --kernel dense");
  ASSERT_EQ(dense.status, 0) << dense.err;
  const double dense_loss = std::stod(line_starting(dense.out, "loss: ").substr(6));
  // Two clusters for 12 queries: the loss moves; a band over the whole sequence makes it exact.
  const tool_run coarse = run_mlm(dir_, base + " --kernel clustered --clusters 2");
  ASSERT_EQ(coarse.status, 0) << coarse.err;
  EXPECT_GT(std::abs(std::stod(line_starting(coarse.out, "loss: ").substr(6)) - dense_loss), 1e-4)
      << coarse.out;
  for (const char* kernel : {"clustered --clusters 2", "improved_clustered --clusters 2 --topk 1",
                             "smyrf --cluster-size 2"}) {
    SCOPED_TRACE(kernel);
    const tool_run r = run_mlm(dir_, base + " --kernel " + kernel + " --window 12");
    ASSERT_EQ(r.status, 0) << r.err;
    EXPECT_NE(line_starting(r.out, "kernel: ").find("window=12"), std::string::npos) << r.out;
    EXPECT_NEAR(std::stod(line_starting(r.out, "loss: ").substr(6)), dense_loss,
                1e-5 * std::abs(dense_loss))
        << r.out;
  }
  // local takes it as its own window; dense refuses it.
  const tool_run local = run_mlm(dir_, base + " --kernel local --window 1");
  ASSERT_EQ(local.status, 0) << local.err;
  EXPECT_EQ(line_starting(local.out, "kernel: "), "kernel: local (window=1)") << local.out;
  const tool_run refused = run_mlm(dir_, base + " --kernel dense --window 2");
  EXPECT_EQ(refused.status, 1);
  EXPECT_NE(refused.err.find("--window 2: kernel 'dense' is exact already"), std::string::npos)
      << refused.err;
  EXPECT_EQ(std::count(refused.err.begin(), refused.err.end(), '\n'), 1) << refused.err;
  // With --kernel all, every approximate row gets the band (or local's window): all exact.
  const tool_run all = run_mlm(dir_, base + " --kernel all --window 12");
  ASSERT_EQ(all.status, 0) << all.err;
  int rows = 0;
  std::istringstream table(all.out);
  for (std::string line; std::getline(table, line);) {
    const auto f = fields(line);
    if (f.size() < 6 || f[0] == "kernel" || f[0] == "model:") continue;
    ++rows;
    EXPECT_LT(std::abs(std::stod(f[f.size() - 4])), 1e-4) << line;  // d_loss
    if (f[0] != "dense") {
      EXPECT_NE(line.find("window=12"), std::string::npos) << line;
    }
  }
  EXPECT_GE(rows, 5) << all.out;
  // Knob flags other than --window are refused with all.
  const tool_run knob = run_mlm(dir_, base + " --kernel all --clusters 3");
  EXPECT_EQ(knob.status, 1);
  EXPECT_NE(knob.err.find("--clusters: knob flags cannot be combined with --kernel all"),
            std::string::npos)
      << knob.err;
}

TEST_F(Bert, MlmToolEstimatesEachLayersHeads) {
  fb::batch in;
  const std::string base = write_mlm_inputs(dir_, in);
  const tool_run r = run_mlm(dir_, base + " --kernel clustered --clusters 2 --estimate-error");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out.find("fell back:"), std::string::npos) << r.out;  // only with --max-error
  // The same estimates in-process: each layer's own report (32 samples >= 12 rows: the true
  // errors), each cell the samples' estimates weighted by their tokens (12 and 8).
  const auto m = fb::model<float>::load((dir_ / "m").string());
  using guarded = fa::guarded<fa::clustered>;
  fb::encoder<guarded> enc(m.cfg, m.w);
  std::vector<std::vector<fa::error_estimate>> reports(static_cast<std::size_t>(layers),
                                                       std::vector<fa::error_estimate>(2 * H));
  std::vector<guarded> per_layer;
  for (auto& report : reports)
    per_layer.push_back(guarded{.inner = {.clusters = 2}, .min_length = 0, .report = report});
  enc.set_layer_attention(per_layer);
  (void)enc.forward(in);

  std::istringstream lines(r.out);
  std::string line;
  while (std::getline(lines, line) && line.rfind("estimated error per layer and head", 0) != 0) {
  }
  ASSERT_FALSE(lines.eof()) << r.out;
  std::getline(lines, line);
  EXPECT_EQ(fields(line), (std::vector<std::string>{"layer", "head", "0", "head", "1"})) << line;
  for (idx l = 0; l < layers; ++l) {
    ASSERT_TRUE(std::getline(lines, line)) << r.out;
    const auto f = fields(line);
    ASSERT_EQ(f.size(), static_cast<std::size_t>(1 + H)) << line;
    EXPECT_EQ(f[0], std::to_string(l));
    for (idx h = 0; h < H; ++h) {
      const auto& e0 = reports[static_cast<std::size_t>(l)][static_cast<std::size_t>(h)];
      const auto& e1 = reports[static_cast<std::size_t>(l)][static_cast<std::size_t>(H + h)];
      EXPECT_EQ(e0.samples, 12);
      EXPECT_EQ(e1.samples, 8);
      const double want = std::sqrt((12 * e0.error * e0.error + 8 * e1.error * e1.error) / 20);
      EXPECT_GT(want, 1e-3);
      EXPECT_NEAR(std::stod(f[static_cast<std::size_t>(1 + h)]), want, 1e-3 * want) << line;
    }
  }
}

TEST_F(Bert, MlmToolMaxErrorCountsTheHeadsThatFellBack) {
  fb::batch in;
  const std::string base = write_mlm_inputs(dir_, in);
  const tool_run dense = run_mlm(dir_, base + " --kernel dense");
  const tool_run plain = run_mlm(dir_, base + " --kernel clustered --clusters 2");
  ASSERT_EQ(dense.status, 0) << dense.err;
  ASSERT_EQ(plain.status, 0) << plain.err;
  // 0: every head of every sample of every layer (2 x 2 x 2) falls back, and the model computes
  // exactly dense's loss.
  tool_run r = run_mlm(dir_, base + " --kernel clustered --clusters 2 --max-error 0");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(line_starting(r.out, "fell back: ").rfind("fell back: 8 of 8 heads", 0), 0u) << r.out;
  EXPECT_EQ(line_starting(r.out, "loss: "), line_starting(dense.out, "loss: ")) << r.out;
  EXPECT_NE(line_starting(r.out, "attention time saved against dense: "), "") << r.out;
  const auto table_at = r.out.find("estimated error per layer and head");
  ASSERT_NE(table_at, std::string::npos) << r.out;
  const std::string cells = r.out.substr(r.out.find('\n', table_at));
  EXPECT_EQ(std::count(cells.begin(), cells.end(), '*'), layers * H) << r.out;  // every cell
  // A huge tolerance: none falls back, and the loss is the kernel's own.
  r = run_mlm(dir_, base + " --kernel clustered --clusters 2 --max-error 1e30");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(line_starting(r.out, "fell back: ").rfind("fell back: 0 of 8 heads", 0), 0u) << r.out;
  EXPECT_EQ(line_starting(r.out, "loss: "), line_starting(plain.out, "loss: ")) << r.out;
  // --kernel all: every approximate row gets the columns, and with 0 every row is dense's (a
  // head whose error is exactly 0 is dense's already: 32 samples cover the 12 rows).
  r = run_mlm(dir_, base + " --kernel all --max-error 0");
  ASSERT_EQ(r.status, 0) << r.err;
  const auto header = fields(line_starting(r.out, "kernel "));
  ASSERT_GE(header.size(), 2u) << r.out;
  EXPECT_EQ(header[header.size() - 2], "est_err");
  EXPECT_EQ(header.back(), "fell_back");
  int rows = 0;
  std::istringstream table(r.out);
  for (std::string line; std::getline(table, line);) {
    const auto f = fields(line);
    if (f.size() < 8 || f[0] == "kernel" || f[0] == "model:") continue;
    ++rows;
    EXPECT_EQ(std::stod(f[f.size() - 6]), 0.0) << line;  // d_loss
    if (f[0] == "dense") {
      EXPECT_EQ(f.back(), "-") << line;
    } else {
      EXPECT_EQ(f.back().substr(f.back().find('/')), "/8") << line;
    }
  }
  EXPECT_GE(rows, 5) << r.out;
  // Bad values name the flag, on one line.
  for (const char* bad : {"--max-error -1", "--max-error x", "--error-samples 0"}) {
    r = run_mlm(dir_, base + " --kernel clustered " + bad);
    EXPECT_EQ(r.status, 1) << bad;
    EXPECT_NE(r.err.find(std::string(bad).substr(0, std::string(bad).find(' '))), std::string::npos)
        << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
}
#endif

}  // namespace
