// fastattn_bert_profile: where a BERT-style encoder's forward pass spends its time, per kernel.
//
//   fastattn_bert_profile [--hidden 256] [--heads 4] [--layers 2] [--intermediate 1024]
//                         [--lengths 512,4096] [--batch 1] [--repeat 3] [--threads 0]
//
// Builds a random model of that shape in memory (no files), runs the encoder forward pass
// (embeddings + layers; not the MLM head) on random tokens with every kernel of fastattn::kernels
// at its defaults (dense first), and prints the best-of-repeat time and the share spent inside
// multihead_attention. Flags are parsed by CLI11 with the strict value parsing of the tools
// (tools/kernel_flags.hpp).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <string>
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

const char* const usage_text =
    "usage: fastattn_bert_profile [--hidden 256] [--heads 4] [--layers 2] [--intermediate 1024]\n"
    "                             [--lengths 512,4096] [--batch 1] [--repeat 3] [--threads 0]\n"
    "                             [--vocab 1000] [--save DIR]\n"
    "\n"
    "Times a random BERT-style encoder's forward pass with every kernel at its defaults and the\n"
    "share of it spent in attention. --save DIR writes the random model (config.json +\n"
    "model.safetensors) and a random masked-LM batch (DIR/batch.safetensors, first length, 15%\n"
    "labelled) for fastattn_mlm instead of profiling.\n";

int profile_main(int argc, const char* const* argv) {
  CLI::App app{"", "fastattn_bert_profile"};
  app.formatter(std::make_shared<ft::formatter>(usage_text));
  app.get_formatter()->column_width(30);
  constexpr idx big = idx{1} << 40;
  std::optional<idx> hidden, heads, layers, intermediate, batch, vocab;
  std::optional<int> repeat, threads;
  std::vector<std::string> length_texts;
  std::string save;
  ft::add_value_option(app, "--hidden", hidden, "hidden size D (default 256)",
                       std::pair{idx{1}, big})
      ->type_name("N");
  ft::add_value_option(app, "--heads", heads, "attention heads, dividing D (default 4)",
                       std::pair{idx{1}, big})
      ->type_name("N");
  ft::add_value_option(app, "--layers", layers, "encoder layers (default 2)",
                       std::pair{idx{0}, idx{1} << 20})
      ->type_name("N");
  ft::add_value_option(app, "--intermediate", intermediate,
                       "feed-forward size (default 4 x hidden)", std::pair{idx{1}, big})
      ->type_name("N");
  app.add_option("--lengths", length_texts, "sequence lengths, comma separated (default 512,4096)")
      ->delimiter(',')
      ->type_name("N,...")
      ->check(ft::value_check<idx>(std::pair{idx{1}, big}));
  ft::add_value_option(app, "--batch", batch, "samples per forward pass (default 1)",
                       std::pair{idx{1}, big})
      ->type_name("N");
  ft::add_value_option(app, "--repeat", repeat, "timed passes, the best is reported (default 3)",
                       std::pair{1, 1'000'000})
      ->type_name("N");
  ft::add_value_option(app, "--threads", threads,
                       "OpenMP threads for the multi-head driver, in [0, " +
                           std::to_string(fa::multihead_options::max_threads) + "] (default 0)",
                       std::pair{0, fa::multihead_options::max_threads})
      ->type_name("N");
  ft::add_value_option(app, "--vocab", vocab, "vocabulary size (default 1000)",
                       std::pair{idx{1}, big})
      ->type_name("N");
  app.add_option("--save", save, "write the model and a batch into DIR instead of profiling")
      ->type_name("DIR");
  app.set_help_flag("-h,--help", "this text");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    std::cout << app.help();
    return 0;
  }

  bert::config c;
  c.hidden_size = hidden.value_or(256);
  c.num_attention_heads = heads.value_or(4);
  c.num_hidden_layers = layers.value_or(2);
  c.intermediate_size = intermediate.value_or(4 * c.hidden_size);
  c.vocab_size = vocab.value_or(1000);
  std::vector<idx> lengths;
  for (const std::string& text : length_texts) {
    idx l = 0;
    ft::parse_value(text, l);  // checked by CLI11
    lengths.push_back(l);
  }
  if (lengths.empty()) lengths = {512, 4096};
  const idx longest = *std::max_element(lengths.begin(), lengths.end());
  c.max_position_embeddings = longest;
  c.validate("model");
  const idx B = batch.value_or(1);
  const int repeats = repeat.value_or(3);
  if (!fio::detail::checked_mul(static_cast<std::uint64_t>(B), static_cast<std::uint64_t>(longest),
                                static_cast<std::uint64_t>(std::numeric_limits<idx>::max())))
    throw CLI::ValidationError("--batch", std::to_string(B) + " x --lengths " +
                                              std::to_string(longest) + " tokens are too many");
  const auto w = std::make_shared<const bert::weights<float>>(bert::random_weights<float>(c, 1));

  if (!save.empty()) {
    const std::string& dir = save;
    std::filesystem::create_directories(dir);
    bert::save_model(dir, c, *w);
    const idx L = lengths.front();
    std::mt19937_64 gen(7);
    std::vector<std::int64_t> ids, labels;
    for (idx i = 0; i < B * L; ++i) {
      ids.push_back(std::uniform_int_distribution<std::int64_t>(0, c.vocab_size - 1)(gen));
      labels.push_back(std::uniform_real_distribution<double>(0, 1)(gen) < 0.15 ? ids.back()
                                                                                : -100);
    }
    fio::write_safetensors(dir + "/batch.safetensors",
                           {fio::st_write_tensor::make("input_ids", {B, L}, ids),
                            fio::st_write_tensor::make("labels", {B, L}, labels)});
    std::printf("wrote %s/config.json, model.safetensors, batch.safetensors (%ld x %ld)\n",
                dir.c_str(), static_cast<long>(B), static_cast<long>(L));
    return 0;
  }
  std::printf(
      "model: hidden %ld, %ld heads (head dim %ld), %ld layers, intermediate %ld; batch %ld; best "
      "of %d\n",
      static_cast<long>(c.hidden_size), static_cast<long>(c.num_attention_heads),
      static_cast<long>(c.head_dim()), static_cast<long>(c.num_hidden_layers),
      static_cast<long>(c.intermediate_size), static_cast<long>(B), repeats);
  std::printf("%6s  %-20s %-66s %10s %10s %7s\n", "L", "kernel", "settings", "forward_ms",
              "attn_ms", "attn%");
  for (const idx L : lengths) {
    bert::batch in;
    in.size = B;
    in.length = L;
    std::mt19937_64 gen(static_cast<std::uint64_t>(L));
    for (idx i = 0; i < B * L; ++i)
      in.input_ids.push_back(std::uniform_int_distribution<std::int64_t>(0, c.vocab_size - 1)(gen));
    auto run = [&](const auto& policy) {
      using P = std::decay_t<decltype(policy)>;
      const bert::encoder<P> enc(c, w, policy, threads.value_or(0));
      (void)enc.forward(in);  // warm-up: threads, scratch memory
      bert::timing best;
      for (int r = 0; r < repeats; ++r) {
        bert::timing t;
        (void)enc.forward(in, &t);
        if (r == 0 || t.total < best.total) best = t;
      }
      std::printf("%6ld  %-20s %-66s %10.1f %10.1f %6.1f%%\n", static_cast<long>(L),
                  std::string(P::name).c_str(), ft::kernel_flags::describe(policy).c_str(),
                  best.total * 1e3, best.attention * 1e3, 100.0 * best.attention / best.total);
      std::fflush(stdout);
    };
    fa::kernels::for_each([&](auto tag) { run(typename decltype(tag)::type{}); });
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return profile_main(argc, argv);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "fastattn_bert_profile: error: %s (see --help)\n", e.what());
  } catch (const fa::invalid_argument& e) {
    std::fprintf(stderr, "%s\n", e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fastattn_bert_profile: error: %s\n", e.what());
  }
  return 1;
}
