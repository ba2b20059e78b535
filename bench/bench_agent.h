// BenchAgent: one side's agent and pool as the run asks for (kvferry pool or
// engine-owned regions), the pattern every block carries, and the checks
// --verify makes on arrival.
#ifndef KVFERRY_BENCH_BENCH_AGENT_H_
#define KVFERRY_BENCH_BENCH_AGENT_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bench/bench_config.h"
#include "kvferry/agent.h"

namespace kvferry::bench {

[[noreturn]] void Die(const std::string& what);

class BenchAgent {
 public:
  // Creates the agent `name` and its pool "kv" (layout from the config);
  // fills every block with its pattern (so the whole pool is resident).
  BenchAgent(const BenchConfig& config, const std::string& name);
  ~BenchAgent();  // the agent first, then the engine memory it registered
  BenchAgent(const BenchAgent&) = delete;
  BenchAgent& operator=(const BenchAgent&) = delete;

  Agent& agent() { return *agent_; }
  KvPool& pool() { return *pool_; }
  // Wall time of CreatePool (0 for engine memory), populating included.
  double pool_seconds() const { return pool_seconds_; }
  // Destroys the agent (and frees engine memory); idempotent.
  void Reset();

 private:
  std::unique_ptr<Agent> agent_;
  KvPool* pool_ = nullptr;
  double pool_seconds_ = 0;
  std::vector<std::pair<void*, uint64_t>> engine_regions_;
};

// The 8-byte word `i` of block `block`, layer `layer`, plane `plane`, as the
// sending side's pool holds it.
inline uint64_t PatternWord(uint32_t block, uint32_t layer, uint32_t plane, uint64_t i) {
  const uint64_t seed = (uint64_t{block} << 32) | (uint64_t{layer} << 1) | plane;
  return (seed + 1) * 0x9E3779B97F4A7C15ull + i;
}
// Writes the pattern of `source_ids[k]` into every chunk of blocks.ids()[k].
void FillPattern(const BlockSet& blocks, const std::vector<uint32_t>& source_ids);
// Counts chunks of `blocks` (layers [layer_begin, layer_end)) that differ
// from the pattern of the matching `source_ids`; clears the checked bytes when
// `clear` (so the next arrival is checked against zeros, not stale data).
uint64_t CheckPattern(const BlockSet& blocks, const std::vector<uint32_t>& source_ids,
                      bool clear);
// Zeroes every chunk of `blocks`.
void ClearBlocks(const BlockSet& blocks);

}  // namespace kvferry::bench

#endif  // KVFERRY_BENCH_BENCH_AGENT_H_
