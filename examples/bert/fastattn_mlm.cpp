// fastattn_mlm: masked-LM evaluation of a BERT checkpoint with any attention kernel.
//
//   fastattn_mlm --model DIR --data batch.safetensors --kernel K [knobs]
//   fastattn_mlm --model DIR --data batch.safetensors --kernel all
//
// DIR holds config.json + model.safetensors (Hugging Face BertForMaskedLM names, see README.md).
// The batch holds input_ids and labels (int32 or int64, [B, L], label -100 = ignore) and optional
// attention_mask ([B, L], values 0 or 1, right padding: 1...1 0...0, at least one 1 per row; a
// label on a padded position is refused) and token_type_ids. Prints the mean cross-entropy and
// accuracy over the labelled positions and the time; `--kernel all` runs dense and every
// approximate kernel at a few settings and prints one table with each one's loss change against
// dense: swapping a pretrained model's attention without retraining. Non-finite weights are
// refused when the model loads, and a non-finite logit or loss is an error (exit status 1), never
// a printed "nan".
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <limits>
#include <string>
#include <vector>

#include <fastattn/io/safetensors.hpp>

#include "../kernels.hpp"
#include "bert.hpp"

namespace fa = fastattn;
namespace fio = fastattn::io;
namespace fx = fastattn::examples;
using idx = fastattn::index;

namespace {

const char* const usage_text =
    "usage: fastattn_mlm --model DIR --data BATCH.safetensors --kernel NAME|all [kernel knobs]\n"
    "                    [--threads N] [--repeat N]\n"
    "\n"
    "Masked-LM evaluation of a BERT-style model (DIR: config.json + model.safetensors) on a batch\n"
    "(input_ids and labels, int32/int64 [B, L], label -100 = ignore; optional attention_mask of\n"
    "0/1 with right padding, no label on a padded position, and token_type_ids). Prints mean\n"
    "cross-entropy, accuracy on the labelled positions, the forward time and the share of it\n"
    "spent in attention; a non-finite loss is an error (exit status 1).\n"
    "  --kernel all   dense, then every approximate kernel at a few settings, one table with each\n"
    "                 one's loss change against dense (knob flags are not allowed with all)\n"
    "  --threads N    OpenMP threads for the multi-head driver (0 = default)\n"
    "  --repeat N     forward passes to time (the best is reported; default 1)\n"
    "\n"
    "Kernels and their knobs (flag, default, meaning):\n";

struct labelled_batch {
  bert::batch input;
  std::vector<std::int64_t> labels;
};

/// Reads and validates the batch: `classes` is the model's number of output classes.
labelled_batch load_batch(const std::string& path, idx classes) {
  const fio::safetensors_file f(path);
  labelled_batch out;
  const auto& ids = f.info("input_ids");
  if (ids.shape.size() != 2 || ids.shape[0] < 1 || ids.shape[1] < 1)
    f.fail("input_ids must be [B, L] with B, L >= 1, got " + fio::shape_to_string(ids.shape));
  const idx B = ids.shape[0], L = ids.shape[1];
  out.input.size = B;
  out.input.length = L;
  out.input.input_ids = f.read<std::int64_t>("input_ids");
  out.labels = f.read<std::int64_t>("labels", {B, L});
  if (f.contains("token_type_ids"))
    out.input.token_type_ids = f.read<std::int64_t>("token_type_ids", {B, L});
  auto at = [&](idx b, idx t) { return static_cast<std::size_t>(b * L + t); };
  auto position = [](idx b, idx t) {
    return "sample " + std::to_string(b) + ", position " + std::to_string(t);
  };
  if (f.contains("attention_mask")) {
    const auto mask = f.read<std::int64_t>("attention_mask", {B, L});
    for (idx b = 0; b < B; ++b) {
      for (idx t = 0; t < L; ++t)
        if (mask[at(b, t)] != 0 && mask[at(b, t)] != 1)
          f.fail("attention_mask at " + position(b, t) + " is " + std::to_string(mask[at(b, t)]) +
                 "; values must be 0 (padding) or 1");
      idx n = 0;
      while (n < L && mask[at(b, n)] == 1) ++n;
      if (n == 0)
        f.fail("attention_mask of sample " + std::to_string(b) + " is all 0 (at " + position(b, 0) +
               "): a sample needs at least one unpadded position");
      for (idx t = n; t < L; ++t)
        if (mask[at(b, t)] != 0)
          f.fail("attention_mask of sample " + std::to_string(b) +
                 " is not right-padded (1...1 0...0): 1 at " + position(b, t) + " after 0 at " +
                 position(b, n) + "; fastattn's masks are key/query lengths");
      out.input.lengths.push_back(n);
    }
  }
  idx labelled = 0;
  for (idx b = 0; b < B; ++b)
    for (idx t = 0; t < L; ++t) {
      const auto label = out.labels[at(b, t)];
      if (label == -100) continue;
      if (label < 0 || label >= classes)
        f.fail("labels at " + position(b, t) + " is " + std::to_string(label) +
               ", neither -100 (ignore) nor a class in [0, " + std::to_string(classes) + ")");
      if (!out.input.lengths.empty() && t >= out.input.lengths[static_cast<std::size_t>(b)])
        f.fail("labels at " + position(b, t) + " is " + std::to_string(label) +
               " but attention_mask is 0 there (padding, whose logits mean nothing); set the "
               "label to -100");
      ++labelled;
    }
  if (labelled == 0) f.fail("labels has no labelled position (all -100)");
  return out;
}

struct evaluation {
  double loss = 0, accuracy = 0;
  idx labelled = 0;
  bert::timing time;  ///< best of the repeats
};

template <class Policy>
evaluation evaluate(const bert::model<float>& m, const labelled_batch& data, const Policy& policy,
                    int threads, int repeat) {
  const bert::encoder<Policy> enc(m.cfg, m.w, policy, threads);
  evaluation ev;
  fa::matrix<float> hidden;
  for (int r = 0; r < repeat; ++r) {
    bert::timing t;
    hidden = enc.forward(data.input, &t);
    if (r == 0 || t.total < ev.time.total) ev.time = t;
  }
  std::vector<idx> rows;  // labels were validated by load_batch
  for (std::size_t i = 0; i < data.labels.size(); ++i)
    if (data.labels[i] != -100) rows.push_back(static_cast<idx>(i));
  ev.labelled = static_cast<idx>(rows.size());
  fa::matrix<float> selected(ev.labelled, hidden.cols());
  for (idx i = 0; i < ev.labelled; ++i)
    selected.row(i) = hidden.row(rows[static_cast<std::size_t>(i)]);
  const fa::matrix<float> logits = enc.mlm_logits(selected);
  double loss = 0;
  idx correct = 0;
  const idx L = data.input.length;
  for (idx i = 0; i < ev.labelled; ++i) {
    const auto row = logits.row(i);
    const idx r = rows[static_cast<std::size_t>(i)];
    if (!row.allFinite())
      bert::fail("fastattn_mlm", std::string("the masked-LM logits at sample ") +
                                     std::to_string(r / L) + ", position " + std::to_string(r % L) +
                                     " are not finite with kernel " + std::string(Policy::name) +
                                     ": the model's output overflows float");
    const auto label = static_cast<idx>(data.labels[static_cast<std::size_t>(r)]);
    idx best = 0;
    const float max = row.maxCoeff(&best);
    double sum = 0;
    for (idx c = 0; c < row.size(); ++c) sum += std::exp(static_cast<double>(row[c] - max));
    loss += std::log(sum) + static_cast<double>(max) - static_cast<double>(row[label]);
    correct += best == label;
  }
  ev.loss = loss / static_cast<double>(ev.labelled);
  ev.accuracy = static_cast<double>(correct) / static_cast<double>(ev.labelled);
  if (!std::isfinite(ev.loss))
    bert::fail("fastattn_mlm", "the loss is not finite (" + fio::detail::value_text(ev.loss) +
                                   ") with kernel " + std::string(Policy::name));
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

  const auto m = bert::model<float>::load(need("model"));
  const labelled_batch data = load_batch(need("data"), m.w->classes());
  std::printf("model: %s (%ld layers, hidden %ld, %ld heads, %s-norm), batch %ld x %ld\n",
              args.values.at("model").c_str(), static_cast<long>(m.cfg.num_hidden_layers),
              static_cast<long>(m.cfg.hidden_size), static_cast<long>(m.cfg.num_attention_heads),
              m.cfg.norm == bert::norm_placement::pre ? "pre" : "post",
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
