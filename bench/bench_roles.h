// The two sides of a kvferry-bench run. The passive side exports its pool and
// answers on the control channel (offers, --verify checks, its figures); the
// initiator posts the transfers and measures. Decode reads and prefill
// writes, so the initiator is decode for READ and prefill for WRITE. Prefill
// listens (kvferry port and control port), decode connects.
#ifndef KVFERRY_BENCH_BENCH_ROLES_H_
#define KVFERRY_BENCH_BENCH_ROLES_H_

#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bench/bench_config.h"
#include "kvferry/ledger.h"

namespace kvferry::bench {

// Request latencies in a fixed log-scale histogram (1% buckets), so a soak
// of any length keeps constant memory (a vector of samples grows the RSS
// the soak is watching by 8 bytes per request).
class LatencyHistogram {
 public:
  void Add(double us);
  uint64_t count() const { return count_; }
  double max() const { return max_; }
  // The bucket's upper edge below which `p` percent of the samples lie.
  double Percentile(double p) const;

 private:
  static constexpr int kBuckets = 2400;  // 1.01^2400 us: beyond any run
  std::array<uint64_t, kBuckets> buckets_{};
  uint64_t count_ = 0;
  double max_ = 0;
};

// What the initiator measured (summed over churn sessions).
struct RunResult {
  std::string data_path;
  uint64_t requests = 0;
  uint64_t bytes = 0;
  uint64_t descriptors = 0;  // chunks moved: blocks x layers x planes
  uint64_t post_calls = 0;
  double post_seconds = 0;   // inside PostTransfer
  double seconds = 0;        // wall time of the transfer phase
  double first_pass_seconds = 0;  // the warm-up pass: the first touch of every block
  uint64_t first_pass_bytes = 0;
  double pool_seconds = 0;        // this side's CreatePool
  double cpu_seconds = 0;    // this process, transfer phase
  LatencyHistogram latency_us;
  uint64_t verified_bytes = 0;
  uint64_t verify_errors = 0;
  uint64_t sessions = 0;
  uint64_t rss_start = 0, rss_end = 0;
  std::vector<double> rss_t_min, rss_mb;  // samples: minutes since start, MB
  nlohmann::json samples = nlohmann::json::array();  // soak lines
  Stats live_end;                 // this side, all transfers ended
  nlohmann::json passive;         // the other side's report
  std::vector<std::string> failures;  // soak / counter checks that failed
};

// Kinds that must be back to zero once every transfer has ended.
bool TransientCountersZero(const Stats& stats);
nlohmann::json StatsJson(const Stats& stats);

// Passive side; returns the exit code. `on_listening(kv_port, ctl_port)` runs
// once prefill listens (the spawner starts the child there); null for none.
int RunPassive(const BenchConfig& config, const std::string& role);
// Initiator side. `on_listening` as above (a spawned child is started there
// when the initiator is prefill).
RunResult RunInitiator(const BenchConfig& config,
                       const std::function<void(uint16_t, uint16_t)>& on_listening);

// argv of this program in `role` for `config`, plus `extra` flags.
std::vector<std::string> ChildCommand(const BenchConfig& config, const std::string& role,
                                      std::vector<std::string> extra);
// Runs the initiator here and the other role as a child process (loopback).
RunResult SpawnRun(BenchConfig config);

// Output: the human table (to `out`) and the JSON document.
nlohmann::json ResultJson(const BenchConfig& config, const RunResult& r);
void PrintTable(const BenchConfig& config, const RunResult& r, std::FILE* out);

}  // namespace kvferry::bench

#endif  // KVFERRY_BENCH_BENCH_ROLES_H_
