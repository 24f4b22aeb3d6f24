// fastattn_bert_profile: where a BERT-style encoder's forward pass spends its time, per kernel.
//
//   fastattn_bert_profile [--hidden 256] [--heads 4] [--layers 2] [--intermediate 1024]
//                         [--lengths 512,4096] [--batch 1] [--repeat 3] [--threads 0]
//
// Builds a random model of that shape in memory (no files), runs the encoder forward pass
// (embeddings + layers; not the MLM head) on random tokens with dense and with every
// approximate kernel at its sweep settings, and prints the best-of-repeat time and the share
// spent inside multihead_attention.
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <iostream>
#include <random>
#include <sstream>
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

int profile_main(int argc, const char* const* argv) {
  const fx::parsed_args args =
      fx::parse_args(argc, argv,
                     {"hidden", "heads", "layers", "intermediate", "lengths", "batch", "repeat",
                      "threads", "save", "vocab"},
                     {"help"});
  if (args.switches.count("help")) {
    std::cout
        << "usage: fastattn_bert_profile [--hidden 256] [--heads 4] [--layers 2] [--intermediate "
           "1024]\n"
           "                             [--lengths 512,4096] [--batch 1] [--repeat 3] [--threads "
           "0]\n"
           "                             [--vocab 1000] [--save DIR]\n"
           "--save DIR writes the random model (config.json + model.safetensors) and a random\n"
           "masked-LM batch (DIR/batch.safetensors, first length, 15% labelled) for fastattn_mlm\n"
           "instead of profiling.\n";
    return 0;
  }
  if (!fx::knob_values(args).empty()) fx::usage_error("kernel knobs are not flags of this program");
  auto get = [&](const char* flag, idx fallback) {
    return args.values.count(flag) ? fx::parse_value<idx>(flag, args.values.at(flag)) : fallback;
  };
  bert::config c;
  c.hidden_size = get("hidden", 256);
  c.num_attention_heads = get("heads", 4);
  c.num_hidden_layers = get("layers", 2);
  c.intermediate_size = get("intermediate", 4 * c.hidden_size);
  c.vocab_size = get("vocab", 1000);
  std::vector<idx> lengths;
  {
    std::stringstream list(args.values.count("lengths") ? args.values.at("lengths") : "512,4096");
    std::string item;
    while (std::getline(list, item, ',')) lengths.push_back(fx::parse_value<idx>("lengths", item));
  }
  idx longest = 1;
  for (const idx l : lengths) {
    if (l < 1) fx::usage_error("--lengths must be positive");
    longest = std::max(longest, l);
  }
  c.max_position_embeddings = longest;
  c.validate("model");
  const idx B = get("batch", 1);
  const int repeat = static_cast<int>(get("repeat", 3));
  const int threads = static_cast<int>(get("threads", 0));
  if (B < 1 || repeat < 1) fx::usage_error("--batch and --repeat must be >= 1");
  if (!fio::detail::checked_mul(static_cast<std::uint64_t>(B), static_cast<std::uint64_t>(longest),
                                static_cast<std::uint64_t>(std::numeric_limits<idx>::max())))
    fx::usage_error("--batch " + std::to_string(B) + " x --lengths " + std::to_string(longest) +
                    " tokens are too many");
  const auto w = std::make_shared<const bert::weights<float>>(bert::random_weights<float>(c, 1));

  if (args.values.count("save")) {
    const std::string dir = args.values.at("save");
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
      static_cast<long>(c.intermediate_size), static_cast<long>(B), repeat);
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
      const bert::encoder<P> enc(c, w, policy, threads);
      (void)enc.forward(in);  // warm-up: threads, scratch memory
      bert::timing best;
      for (int r = 0; r < repeat; ++r) {
        bert::timing t;
        (void)enc.forward(in, &t);
        if (r == 0 || t.total < best.total) best = t;
      }
      std::printf("%6ld  %-20s %-66s %10.1f %10.1f %6.1f%%\n", static_cast<long>(L),
                  std::string(P::name).c_str(), fx::describe(policy).c_str(), best.total * 1e3,
                  best.attention * 1e3, 100.0 * best.attention / best.total);
      std::fflush(stdout);
    };
    run(fa::dense{});
    fx::for_each_kernel([&](const auto& tag) {
      using P = std::decay_t<decltype(tag)>;
      if constexpr (!P::is_exact)
        for (const P& p : fx::policy_sweep<P>::settings()) run(p);
    });
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return profile_main(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
