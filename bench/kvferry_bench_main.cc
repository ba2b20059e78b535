// kvferry-bench: moves KV blocks between two kvferry processes the way a
// serving engine does (model-shaped layouts, prompt-length distribution,
// READ or WRITE, offers, per-layer posting) and reports GB/s, descriptors/s,
// request latency percentiles, CPU per GB, PostTransfer cost, RSS and the
// ledger's live counters. See bench/README.md.
#include <cstdio>
#include <optional>

#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bench/bench_agent.h"
#include "bench/bench_compare.h"
#include "bench/bench_roles.h"
#include "bench/bench_util.h"

namespace kvferry::bench {
namespace {

int Report(const BenchConfig& c, const RunResult& r) {
  if (c.json) {
    PrintTable(c, r, stderr);
    std::printf("%s\n", ResultJson(c, r).dump(2).c_str());
  } else {
    PrintTable(c, r, stdout);
  }
  std::fflush(stdout);
  return r.failures.empty() ? 0 : 1;
}

}  // namespace
}  // namespace kvferry::bench

int main(int argc, char** argv) {
  using namespace kvferry::bench;
  InstallBenchHelp(
      "Moves KV blocks between two kvferry processes as a serving engine does.\n"
      "  kvferry-bench [--spawn] --preset=llama-3-8b --op=read --requests=64 [--json]\n"
      "  kvferry-bench --compare --working_set_mib=2048   (baselines, per size and op)\n"
      "  kvferry-bench --role=prefill --listen=10.0.0.1 --port=5000 --control_port=5001 &\n"
      "  kvferry-bench --role=decode --peer=10.0.0.1:5000 --control_port=5001\n"
      "  kvferry-bench --duration=600 --sample_seconds=60 --max_rss_slope_mb_per_min=0.1 [--churn=5]");
  absl::ParseCommandLine(argc, argv);
  BenchConfig config = ConfigFromFlags();
  if (config.compare) return RunCompare(config);
  if (config.role == "raw-target") return RunRawTarget(config);
  if (config.spawn) return Report(config, SpawnRun(config));
  if (config.role == config.InitiatorRole()) return Report(config, RunInitiator(config, nullptr));
  return RunPassive(config, config.role);
}
