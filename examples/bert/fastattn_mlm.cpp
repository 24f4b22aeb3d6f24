// fastattn_mlm: masked-LM evaluation of a BERT checkpoint with any attention kernel.
//
//   fastattn_mlm --model DIR --data batch.safetensors --kernel K [knobs]
//   fastattn_mlm --model DIR --data batch.safetensors --kernel all
//
// DIR holds config.json + model.safetensors (Hugging Face BertForMaskedLM names, see README.md).
// The batch holds input_ids and labels (int32 or int64, [B, L], label -100 = ignore) and optional
// attention_mask ([B, L], right padding: 1...1 0...0) and token_type_ids. Prints the mean
// cross-entropy and accuracy over the labelled positions and the time; `--kernel all` runs dense
// and every approximate kernel at a few settings and prints one table with each one's loss change
// against dense: swapping a pretrained model's attention without retraining.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <limits>
#include <string>
#include <vector>

#include "../kernels.hpp"
#include "bert.hpp"

namespace fa = fastattn;
namespace fx = fastattn::examples;
namespace fb = fastattn::bert;
using idx = fastattn::index;

namespace {

const char* const usage_text =
    "usage: fastattn_mlm --model DIR --data BATCH.safetensors --kernel NAME|all [kernel knobs]\n"
    "                    [--threads N] [--repeat N]\n"
    "\n"
    "Masked-LM evaluation of a BERT-style model (DIR: config.json + model.safetensors) on a batch\n"
    "(input_ids and labels, int32/int64 [B, L], label -100 = ignore; optional attention_mask with\n"
    "right padding and token_type_ids). Prints mean cross-entropy, accuracy on the labelled\n"
    "positions, the forward time and the share of it spent in attention.\n"
    "  --kernel all   dense, then every approximate kernel at a few settings, one table with each\n"
    "                 one's loss change against dense (knob flags are not allowed with all)\n"
    "  --threads N    OpenMP threads for the multi-head driver (0 = default)\n"
    "  --repeat N     forward passes to time (the best is reported; default 1)\n"
    "\n"
    "Kernels and their knobs (flag, default, meaning):\n";

struct labelled_batch {
  fb::batch input;
  std::vector<std::int64_t> labels;
};

labelled_batch load_batch(const std::string& path) {
  const fx::safetensors_file f(path);
  labelled_batch out;
  const auto& ids = f.info("input_ids");
  if (ids.shape.size() != 2 || ids.shape[0] < 1 || ids.shape[1] < 1)
    f.fail("input_ids must be [B, L] with B, L >= 1, got " + fx::shape_to_string(ids.shape));
  const idx B = ids.shape[0], L = ids.shape[1];
  out.input.size = B;
  out.input.length = L;
  out.input.input_ids = f.read<std::int64_t>("input_ids");
  out.labels = f.read<std::int64_t>("labels", {B, L});
  if (f.contains("token_type_ids"))
    out.input.token_type_ids = f.read<std::int64_t>("token_type_ids", {B, L});
  if (f.contains("attention_mask")) {
    const auto mask = f.read<std::int64_t>("attention_mask", {B, L});
    for (idx b = 0; b < B; ++b) {
      idx n = 0;
      while (n < L && mask[static_cast<std::size_t>(b * L + n)] != 0) ++n;
      for (idx t = n; t < L; ++t)
        if (mask[static_cast<std::size_t>(b * L + t)] != 0)
          f.fail("attention_mask row " + std::to_string(b) +
                 " is not right-padded (1...1 0...0); fastattn's masks are key/query lengths");
      out.input.lengths.push_back(n);
    }
  }
  return out;
}

struct evaluation {
  double loss = 0, accuracy = 0;
  idx labelled = 0;
  fb::timing time;  ///< best of the repeats
};

template <class Policy>
evaluation evaluate(const fb::model<float>& m, const labelled_batch& data, const Policy& policy,
                    int threads, int repeat) {
  const fb::encoder<Policy> enc(m.cfg, m.w, policy, threads);
  evaluation ev;
  fa::matrix<float> hidden;
  for (int r = 0; r < repeat; ++r) {
    fb::timing t;
    hidden = enc.forward(data.input, &t);
    if (r == 0 || t.total < ev.time.total) ev.time = t;
  }
  const idx classes = enc.w().classes();
  std::vector<idx> rows;
  for (std::size_t i = 0; i < data.labels.size(); ++i) {
    const auto label = data.labels[i];
    if (label == -100) continue;
    if (label < 0 || label >= classes)
      throw fa::invalid_argument("fastattn: labels: " + std::to_string(label) +
                                 " is neither -100 nor a class in [0, " + std::to_string(classes) +
                                 ")");
    rows.push_back(static_cast<idx>(i));
  }
  ev.labelled = static_cast<idx>(rows.size());
  if (rows.empty()) throw fa::invalid_argument("fastattn: labels: no labelled position (all -100)");
  fa::matrix<float> selected(ev.labelled, hidden.cols());
  for (idx i = 0; i < ev.labelled; ++i)
    selected.row(i) = hidden.row(rows[static_cast<std::size_t>(i)]);
  const fa::matrix<float> logits = enc.mlm_logits(selected);
  double loss = 0;
  idx correct = 0;
  for (idx i = 0; i < ev.labelled; ++i) {
    const auto row = logits.row(i);
    const auto label =
        static_cast<idx>(data.labels[static_cast<std::size_t>(rows[static_cast<std::size_t>(i)])]);
    idx best = 0;
    const float max = row.maxCoeff(&best);
    double sum = 0;
    for (idx c = 0; c < row.size(); ++c) sum += std::exp(static_cast<double>(row[c] - max));
    loss += std::log(sum) + static_cast<double>(max) - static_cast<double>(row[label]);
    correct += best == label;
  }
  ev.loss = loss / static_cast<double>(ev.labelled);
  ev.accuracy = static_cast<double>(correct) / static_cast<double>(ev.labelled);
  return ev;
}

int mlm_main(int argc, const char* const* argv) {
  const fx::parsed_args args =
      fx::parse_args(argc, argv, {"model", "data", "kernel", "threads", "repeat"}, {"help"});
  if (args.switches.count("help") || argc == 1) {
    std::cout << usage_text << fx::kernels_help();
    return argc == 1 ? 1 : 0;
  }
  auto need = [&](const std::string& flag) -> const std::string& {
    const auto it = args.values.find(flag);
    if (it == args.values.end()) fx::usage_error("--" + flag + " is required (see --help)");
    return it->second;
  };
  const std::string kernel = need("kernel");
  const auto knobs = fx::knob_values(args);
  if (kernel == "all" && !knobs.empty())
    fx::usage_error("knob flags (--" + knobs.begin()->first +
                    ") cannot be combined with --kernel all");
  if (kernel != "all") fx::with_kernel(kernel, knobs, [](const auto&) {});  // flag errors first
  const int threads =
      args.values.count("threads") ? fx::parse_value<int>("threads", args.values.at("threads")) : 0;
  const int repeat =
      args.values.count("repeat") ? fx::parse_value<int>("repeat", args.values.at("repeat")) : 1;
  if (repeat < 1) fx::usage_error("--repeat must be >= 1");

  const auto m = fb::model<float>::load(need("model"));
  const labelled_batch data = load_batch(need("data"));
  std::printf("model: %s (%ld layers, hidden %ld, %ld heads, %s-norm), batch %ld x %ld\n",
              args.values.at("model").c_str(), static_cast<long>(m.cfg.num_hidden_layers),
              static_cast<long>(m.cfg.hidden_size), static_cast<long>(m.cfg.num_attention_heads),
              m.cfg.norm == fb::norm_placement::pre ? "pre" : "post",
              static_cast<long>(data.input.size), static_cast<long>(data.input.length));

  if (kernel != "all") {
    fx::with_kernel(kernel, knobs, [&](const auto& policy) {
      using P = std::decay_t<decltype(policy)>;
      const evaluation ev = evaluate(m, data, policy, threads, repeat);
      std::printf("kernel: %s (%s)\n", std::string(P::name).c_str(), fx::describe(policy).c_str());
      std::printf("labelled tokens: %ld\nloss: %.6f\naccuracy: %.4f\n",
                  static_cast<long>(ev.labelled), ev.loss, ev.accuracy);
      std::printf("time: %.3f s forward (attention %.3f s, %.1f%%)\n", ev.time.total,
                  ev.time.attention, 100.0 * ev.time.attention / ev.time.total);
    });
    return 0;
  }

  std::printf("%-20s %-66s %10s %10s %9s %9s %7s\n", "kernel", "settings", "loss", "d_loss",
              "accuracy", "time_s", "attn%");
  double dense_loss = std::numeric_limits<double>::quiet_NaN();
  auto row = [&](const auto& policy) {
    using P = std::decay_t<decltype(policy)>;
    const evaluation ev = evaluate(m, data, policy, threads, repeat);
    if (std::isnan(dense_loss)) dense_loss = ev.loss;
    std::printf("%-20s %-66s %10.5f %+10.5f %9.4f %9.3f %6.1f%%\n", std::string(P::name).c_str(),
                fx::describe(policy).c_str(), ev.loss, ev.loss - dense_loss, ev.accuracy,
                ev.time.total, 100.0 * ev.time.attention / ev.time.total);
    std::fflush(stdout);
  };
  row(fa::dense{});
  fx::for_each_kernel([&](const auto& tag) {
    using P = std::decay_t<decltype(tag)>;
    if constexpr (!P::is_exact)
      for (const P& p : fx::policy_sweep<P>::settings()) row(p);
  });
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return mlm_main(argc, argv);
  } catch (const fa::invalid_argument& e) {
    std::string what = e.what();
    std::replace(what.begin(), what.end(), '\n', ' ');
    std::fprintf(stderr, "%s\n", what.c_str());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "fastattn_mlm: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fastattn_mlm: error: %s\n", e.what());
    return 1;
  }
}
