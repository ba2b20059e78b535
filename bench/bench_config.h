// BenchConfig: everything one kvferry-bench run needs, read from the flags
// (bench_flags.cc) and checked once. A plain value.
#ifndef KVFERRY_BENCH_BENCH_CONFIG_H_
#define KVFERRY_BENCH_BENCH_CONFIG_H_

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "kvferry/kv_layout.h"
#include "kvferry/transfer.h"

namespace kvferry {
class BlockSet;
}

namespace kvferry::bench {

// Prompt lengths in tokens: "N" (fixed), "uniform:A:B" or "normal:MEAN:STDDEV"
// (clamped to [tokens_per_block, max]).
struct PromptDistribution {
  enum class Kind { kFixed, kUniform, kNormal } kind = Kind::kFixed;
  double a = 2048, b = 0;
  uint32_t max_tokens = 2048;  // the largest length it can draw
  uint32_t Draw(std::mt19937_64& rng) const;
};

struct BenchConfig {
  // --- roles ---
  std::string role;            // "prefill" or "decode"
  bool spawn = true;           // start the other role as a child on this host
  std::string listen_address;  // prefill: where it listens
  uint16_t port = 0;           // prefill: kvferry port (0 picks one)
  uint16_t control_port = 0;   // prefill: the bench's control port (0 picks one)
  std::string peer_address;    // decode: the prefill host
  // --- model and memory ---
  std::string preset;
  KvLayout layout;             // num_blocks derived from working_set_bytes
  std::string memory;          // "pool", "anonymous-pool" or "engine"
  bool kernel_copy = true;     // AgentOptions::kernel_copy, both processes
  int kernel_copy_threads = 0;  // AgentOptions::kernel_copy_threads; 0: its default
  bool engine_hugepages = false;  // --memory=engine: MADV_HUGEPAGE on the regions
  bool populate = true;        // AgentOptions::populate_pools, both processes
  uint64_t working_set_bytes = 0;  // per process
  // --- workload ---
  TransferOp op = TransferOp::kRead;
  bool offers = false;
  bool per_layer = false;
  bool scattered = false;      // remote ids mirrored: no two blocks coalesce
  PromptDistribution prompt;
  int requests = 0;
  int concurrency = 0;
  double duration_s = 0;       // > 0: run for this long instead of `requests`
  bool warmup = true;          // one untimed pass over the pool first
  bool verify = false;
  std::string tls;
  uint64_t seed = 1;
  // --- output ---
  bool json = false;
  double progress_s = 0;
  // --- soak ---
  double sample_s = 60;
  double max_rss_slope_mb_per_min = 0;  // 0: no limit
  double churn_s = 0;                   // > 0: decode reconnects this often
  // --- compare ---
  bool compare = false;
  std::vector<uint64_t> compare_sizes;
  int compare_batch = 8;       // blocks per transfer
  uint32_t compare_layers = 32;
  double compare_seconds = 2;
  std::string perftest;

  // The role that posts transfers (decode reads, prefill writes).
  std::string InitiatorRole() const { return op == TransferOp::kRead ? "decode" : "prefill"; }
  uint32_t MaxBlocksPerRequest() const;
  std::string OpName() const { return op == TransferOp::kRead ? "READ" : "WRITE"; }
  // The remote block paired with local block `id`: the same id, or its
  // mirror with --scattered (so neighbours never coalesce).
  uint32_t RemoteId(uint32_t id) const { return scattered ? layout.num_blocks - 1 - id : id; }
};

// Reads and checks the flags; prints the problem and exits 2 when invalid.
BenchConfig ConfigFromFlags();
// Command-line flags that reproduce `config` in another process (the
// spawned peer), given its role.
std::vector<std::string> ChildArgs(const BenchConfig& config, const std::string& role);

}  // namespace kvferry::bench

#endif  // KVFERRY_BENCH_BENCH_CONFIG_H_
