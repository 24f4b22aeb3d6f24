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
// approximate kernel at a few settings (`policy_sweep` below) and prints one table with each
// one's loss change against dense: swapping a pretrained model's attention without retraining.
// Non-finite weights are refused when the model loads, and a non-finite logit or loss is an error
// (exit status 1), never a printed "nan".
//
// Flags are parsed by CLI11 with the `fastattn` tool's kernel flags (tools/kernel_flags.hpp): the
// same knob flags, help and messages, and the same wrappers: --window W (an exact local band,
// fastattn::banded), --estimate-error and --max-error X (fastattn::guarded, with one report per
// layer: the table of estimates per layer and head, the number of heads that fell back, and the
// attention time saved against dense).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <limits>
#include <memory>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>

#include <fastattn/fastattn.hpp>
#include <fastattn/io/safetensors.hpp>

#include "bert.hpp"
#include "kernel_flags.hpp"

namespace fa = fastattn;
namespace fio = fastattn::io;
namespace ft = fastattn_tools;
using idx = fastattn::index;

namespace {

/// The settings `--kernel all` runs for each approximate kernel. The primary template runs the
/// policy's defaults, so a new kernel is swept without any entry here.
template <class Policy>
struct policy_sweep {
  static std::vector<Policy> settings() { return {Policy{}}; }
};
template <>
struct policy_sweep<fa::clustered> {
  static std::vector<fa::clustered> settings() {
    return {fa::clustered{.clusters = 25}, fa::clustered{.clusters = 100},
            fa::clustered{.clusters = 200}};
  }
};
template <>
struct policy_sweep<fa::improved_clustered> {
  static std::vector<fa::improved_clustered> settings() {
    return {fa::improved_clustered{.clusters = 25, .topk = 32},
            fa::improved_clustered{.clusters = 100, .topk = 32},
            fa::improved_clustered{.clusters = 100, .topk = 64}};
  }
};
template <>
struct policy_sweep<fa::smyrf> {
  static std::vector<fa::smyrf> settings() {
    return {fa::smyrf{.hashes = 1, .cluster_size = 32}, fa::smyrf{.hashes = 2, .cluster_size = 64},
            fa::smyrf{.hashes = 4, .cluster_size = 128}};
  }
};

const char* const usage_text =
    "usage: fastattn_mlm --model DIR --data BATCH.safetensors --kernel NAME|all [kernel knobs]\n"
    "                    [--threads N] [--repeat N] [--window W] [--estimate-error]\n"
    "                    [--max-error X]\n"
    "\n"
    "Masked-LM evaluation of a BERT-style model (DIR: config.json + model.safetensors) on a batch\n"
    "(input_ids and labels, int32/int64 [B, L], label -100 = ignore; optional attention_mask of\n"
    "0/1 with right padding, no label on a padded position, and token_type_ids). Prints mean\n"
    "cross-entropy, accuracy on the labelled positions, the forward time and the share of it\n"
    "spent in attention; a non-finite loss is an error (exit status 1).\n";

/// How fastattn_mlm reports the estimate (after error_flags::help()).
std::string estimate_help() {
  return ft::wrap(
      "fastattn_mlm runs every layer under its own report and prints a table of the estimates "
      "per layer and head: each cell is the kernel's estimated relative error of that head's "
      "attention output, over the batch's samples (their estimates combined as "
      "sqrt(sum_b n_b e_b^2 / sum_b n_b), n_b the sample's tokens), marked * when the head fell "
      "back in a sample. With --max-error it also prints \"fell back: N of M heads\" (M = layers "
      "x samples x heads) and the attention time saved against dense (which it runs too). With "
      "--kernel all these flags and --window apply to every approximate kernel, and the table "
      "gains the columns est_err (the kernel's estimate over every layer, sample and head) and "
      "fell_back.",
      2);
}

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

/// One evaluation of the model with a kernel.
struct evaluation {
  double loss = 0, accuracy = 0;
  idx labelled = 0;
  bert::timing time;  ///< best of the repeats
  /// With an estimate: per layer, one estimate per head stream (sample b, head h at b * H + h).
  std::vector<std::vector<fa::error_estimate>> reports;
};

/// Runs the model with `policy` and scores the labelled positions. Every kernel runs as
/// fastattn::guarded<Policy> (min_length 0: always the kernel itself): without a report and a
/// tolerance that is Policy, unchanged, so each kernel is compiled once whether its error is
/// estimated or not. With `errors`, each layer reports to its own span of B * H estimates.
template <class Policy>
evaluation evaluate(const bert::model<float>& m, const labelled_batch& data, const Policy& policy,
                    int threads, int repeat, const ft::error_flags* errors) {
  using guarded = fa::guarded<Policy>;
  bert::encoder<guarded> enc(m.cfg, m.w, guarded{.inner = policy, .min_length = 0}, threads);
  evaluation ev;
  if (errors) {
    ev.reports.assign(static_cast<std::size_t>(m.cfg.num_hidden_layers),
                      std::vector<fa::error_estimate>(
                          static_cast<std::size_t>(data.input.size * m.cfg.num_attention_heads)));
    std::vector<guarded> layers;
    for (auto& report : ev.reports) layers.push_back(errors->guard(policy, report));
    enc.set_layer_attention(std::move(layers));
  }
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

/// Each sample's valid tokens: the weights of its heads' estimates.
std::vector<double> sample_weights(const bert::batch& in) {
  std::vector<double> w(static_cast<std::size_t>(in.size), static_cast<double>(in.length));
  for (std::size_t b = 0; b < in.lengths.size(); ++b) w[b] = static_cast<double>(in.lengths[b]);
  return w;
}

/// Every head of every sample of every layer, and the weights to combine them.
struct all_heads {
  std::vector<fa::error_estimate> estimates;
  std::vector<double> weights;
};
all_heads gather(const evaluation& ev, const bert::batch& in, idx heads) {
  const std::vector<double> per_sample = sample_weights(in);
  all_heads all;
  for (const auto& layer : ev.reports)
    for (std::size_t i = 0; i < layer.size(); ++i) {
      all.estimates.push_back(layer[i]);
      all.weights.push_back(per_sample[i / static_cast<std::size_t>(heads)]);
    }
  return all;
}

/// The table of estimates per layer and head (see `estimate_help`).
void print_estimates(const evaluation& ev, const bert::batch& in, idx heads) {
  const std::vector<double> weights = sample_weights(in);
  std::printf(
      "estimated error per layer and head (relative error of the head's attention output, over "
      "the batch's samples; * = fell back in a sample):\n");
  std::printf("%5s", "layer");
  for (idx h = 0; h < heads; ++h) std::printf("  %10s%-2ld", "head ", static_cast<long>(h));
  std::printf("\n");
  for (std::size_t l = 0; l < ev.reports.size(); ++l) {
    std::printf("%5zu", l);
    for (idx h = 0; h < heads; ++h) {
      std::vector<fa::error_estimate> cell;
      for (idx b = 0; b < in.size; ++b)
        cell.push_back(ev.reports[l][static_cast<std::size_t>(b * heads + h)]);
      const auto e = ft::error_flags::combine(cell, weights, false);
      std::printf("  %11.3e%c", e.error, ft::error_flags::fell_back(cell) > 0 ? '*' : ' ');
    }
    std::printf("\n");
  }
}

/// "fell back: N of M heads (...)".
void print_fallbacks(const evaluation& ev, const bert::batch& in, idx heads, double tolerance) {
  const all_heads all = gather(ev, in, heads);
  std::printf(
      "fell back: %zu of %zu heads (%zu layers x %ld samples x %ld heads; estimated error above "
      "%s, "
      "recomputed exactly)\n",
      ft::error_flags::fell_back(all.estimates), all.estimates.size(), ev.reports.size(),
      static_cast<long>(in.size), static_cast<long>(heads), ft::format_value(tolerance).c_str());
}

/// The command line of fastattn_mlm, on the kernel flags of the `fastattn` tool.
class mlm_tool {
 public:
  mlm_tool() {
    app_.name("fastattn_mlm");
    app_.formatter(std::make_shared<ft::formatter>(usage_text));
    app_.get_formatter()->column_width(30);
    app_.allow_extras();  // unexpected arguments are reported by `run`, naming the first one
    ft::kernel_flags::add_kernel_option(app_, kernel_, {"all"})
        ->description(
            "which kernel: " + fa::kernels::names() +
            ", or all: dense, then every approximate kernel at a few settings, one table with "
            "each one's loss change against dense (knob flags other than --window are not "
            "allowed with all)");
    app_.add_option("--model", model_, "directory with config.json + model.safetensors")
        ->required()
        ->type_name("DIR");
    app_.add_option("--data", data_,
                    "the batch: input_ids, labels [, attention_mask, token_type_ids]")
        ->required()
        ->type_name("FILE");
    ft::add_value_option(app_, "--threads", threads_,
                         "OpenMP threads for the multi-head driver, in [0, " +
                             std::to_string(fa::multihead_options::max_threads) +
                             "] (default 0: OpenMP's default)",
                         std::pair{0, fa::multihead_options::max_threads})
        ->type_name("N");
    ft::add_value_option(app_, "--repeat", repeat_,
                         "forward passes to time (the best is reported; default 1)",
                         std::pair{1, 1'000'000})
        ->type_name("N");
    app_.set_help_flag("-h,--help", "this text");
    errors_.add(app_);
    app_.footer(knobs_.help(false) + "\n" + errors_.help() + estimate_help());
  }

  /// Runs the tool; returns the exit status. Every error is reported here, as one line.
  int main(int argc, const char* const* argv) {
    try {
      return run(argc, argv);
    } catch (const CLI::ParseError& e) {
      report("fastattn_mlm: error: " + std::string(e.what()) + " (see --help)");
    } catch (const fa::invalid_argument& e) {
      // A knob out of range names the flag the user gave; the model's and the batch's errors
      // name their file (their what() starts "fastattn: <file>: ").
      if (const auto flag = knobs_.flag_of(e.argument()))
        report("fastattn_mlm: error: " + *flag + ": " + e.message());
      else
        report(e.what());
    } catch (const std::bad_alloc&) {
      report("fastattn_mlm: out of memory");
    } catch (const std::exception& e) {
      report("fastattn_mlm: error: " + std::string(e.what()));
    }
    return 1;
  }

 private:
  static void report(std::string line) {
    std::replace(line.begin(), line.end(), '\n', ' ');
    std::replace(line.begin(), line.end(), '\r', ' ');
    std::fprintf(stderr, "%s\n", line.c_str());
  }

  int run(int argc, const char* const* argv) {
    if (const auto status = ft::parse_flags_only(app_, argc, argv)) return *status;
    // The kernel, its knobs and the wrappers are resolved and checked before any file is read.
    const bool all = kernel_ == "all";
    if (all) {
      std::set<std::string> given = knobs_.given();
      given.erase(std::string(ft::kernel_flags::band_flag));
      if (!given.empty())
        throw CLI::ValidationError(
            "--" + *given.begin(),
            "knob flags cannot be combined with --kernel all, which runs each kernel at the "
            "settings of its sweep (--window, --estimate-error and --max-error apply to every "
            "approximate kernel)");
      for_each_swept([](const auto&) {});
    } else {
      knobs_.with_kernel(kernel_, [](const auto&) {});
    }

    model_data_ = loaded{bert::model<float>::load(model_), {}};
    const auto& m = model_data_->model;
    model_data_->data = load_batch(data_, m.w->classes());
    const labelled_batch& data = model_data_->data;
    std::printf("model: %s (%ld layers, hidden %ld, %ld heads, %s-norm), batch %ld x %ld\n",
                model_.c_str(), static_cast<long>(m.cfg.num_hidden_layers),
                static_cast<long>(m.cfg.hidden_size), static_cast<long>(m.cfg.num_attention_heads),
                m.cfg.norm == bert::norm_placement::pre ? "pre" : "post",
                static_cast<long>(data.input.size), static_cast<long>(data.input.length));
    if (all)
      run_all();
    else
      knobs_.with_kernel(kernel_, [&](const auto& policy) { run_one(policy); });
    return 0;
  }

  /// Calls f(policy) for every approximate kernel at each of its sweep settings, with --window
  /// applied (ft::kernel_flags::with_band).
  template <class F>
  void for_each_swept(F&& f) const {
    fa::kernels::for_each([&](auto tag) {
      using P = typename decltype(tag)::type;
      if constexpr (!P::is_exact)
        for (const P& p : policy_sweep<P>::settings()) knobs_.with_band(p, f);
    });
  }

  template <class Policy>
  evaluation evaluate_with(const Policy& policy, bool estimate) const {
    const auto& d = *model_data_;
    return evaluate(d.model, d.data, policy, threads_.value_or(0), repeat_.value_or(1),
                    estimate ? &errors_ : nullptr);
  }

  template <class Policy>
  void run_one(const Policy& policy) {
    const evaluation ev = evaluate_with(policy, errors_.requested());
    std::printf("kernel: %s (%s)\n", std::string(Policy::name).c_str(),
                ft::kernel_flags::describe(policy).c_str());
    std::printf("labelled tokens: %ld\nloss: %.6f\naccuracy: %.4f\n",
                static_cast<long>(ev.labelled), ev.loss, ev.accuracy);
    std::printf("time: %.3f s forward (attention %.3f s, %.1f%%)\n", ev.time.total,
                ev.time.attention, 100.0 * ev.time.attention / ev.time.total);
    if (!errors_.requested()) return;
    const bert::batch& in = model_data_->data.input;
    const idx heads = model_data_->model.cfg.num_attention_heads;
    print_estimates(ev, in, heads);
    if (const auto tolerance = errors_.max_error()) {
      print_fallbacks(ev, in, heads, *tolerance);
      const evaluation dense = evaluate_with(fa::dense{}, false);
      const double saved = dense.time.attention - ev.time.attention;
      std::printf("attention time saved against dense: %.4f s of dense's %.4f s (%.1f%%)\n", saved,
                  dense.time.attention,
                  dense.time.attention > 0 ? 100.0 * saved / dense.time.attention : 0.0);
    }
  }

  void run_all() {
    const bool estimate = errors_.requested();
    const bert::batch& in = model_data_->data.input;
    const idx heads = model_data_->model.cfg.num_attention_heads;
    int width = 66;  // the settings column: as wide as the longest description
    for_each_swept([&](const auto& policy) {
      width = std::max(width, static_cast<int>(ft::kernel_flags::describe(policy).size()));
    });
    std::printf("%-20s %-*s %10s %10s %9s %9s %7s", "kernel", width, "settings", "loss", "d_loss",
                "accuracy", "time_s", "attn%");
    if (estimate) std::printf(" %10s %11s", "est_err", "fell_back");
    std::printf("\n");
    double dense_loss = std::numeric_limits<double>::quiet_NaN();
    auto row = [&](const auto& policy) {
      using P = std::decay_t<decltype(policy)>;
      const bool approximate = !std::is_same_v<P, fa::dense>;
      const evaluation ev = evaluate_with(policy, estimate && approximate);
      if (std::isnan(dense_loss)) dense_loss = ev.loss;
      std::printf("%-20s %-*s %10.5f %+10.5f %9.4f %9.3f %6.1f%%", std::string(P::name).c_str(),
                  width, ft::kernel_flags::describe(policy).c_str(), ev.loss, ev.loss - dense_loss,
                  ev.accuracy, ev.time.total, 100.0 * ev.time.attention / ev.time.total);
      if (estimate && approximate) {
        const all_heads all = gather(ev, in, heads);
        const auto e = ft::error_flags::combine(all.estimates, all.weights, false);
        const std::string fell = std::to_string(ft::error_flags::fell_back(all.estimates)) + "/" +
                                 std::to_string(all.estimates.size());
        std::printf(" %10.3e %11s", e.error, fell.c_str());
      } else if (estimate) {
        std::printf(" %10s %11s", "-", "-");
      }
      std::printf("\n");
      std::fflush(stdout);
    };
    row(fa::dense{});
    for_each_swept(row);
  }

  /// The model and the batch, once read.
  struct loaded {
    bert::model<float> model;
    labelled_batch data;
  };

  CLI::App app_{"", "fastattn_mlm"};
  ft::kernel_flags knobs_{app_};  ///< the knob flags and --window (listed per kernel in the footer)
  ft::error_flags errors_;        ///< --estimate-error, --max-error, --error-samples
  std::string kernel_, model_, data_;
  std::optional<int> threads_, repeat_;
  std::optional<loaded> model_data_;
};

}  // namespace

int main(int argc, char** argv) {
  try {
    mlm_tool tool;
    return tool.main(argc, argv);
  } catch (const std::exception& e) {  // setting up the flags failed (out of memory)
    std::fprintf(stderr, "fastattn_mlm: error: %s\n", e.what());
    return 1;
  }
}
