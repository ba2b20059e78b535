#include "bench/bench_agent.h"

#include <sys/mman.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "bench/bench_util.h"

namespace kvferry::bench {

void Die(const std::string& what) {
  std::printf("ERROR %s\n", what.c_str());
  std::fflush(stdout);
  std::fprintf(stderr, "kvferry-bench: ERROR %s\n", what.c_str());
  std::exit(2);
}

BenchAgent::BenchAgent(const BenchConfig& config, const std::string& name) {
  AgentOptions o;
  o.name = name;
  o.leak_policy = LeakPolicy::kLog;
  if (!config.tls.empty()) o.ucx_config = {{"TLS", config.tls}};
  if (config.memory == "anonymous-pool") o.pool_memory = PoolMemorySource::kAnonymousMmap;
  o.kernel_copy = config.kernel_copy;
  if (config.kernel_copy_threads > 0) o.kernel_copy_threads = config.kernel_copy_threads;
  o.populate_pools = config.populate;
  auto agent = Agent::Create(o);
  if (!agent.ok()) Die(absl::StrCat("Agent::Create: ", agent.status().ToString()));
  agent_ = *std::move(agent);
  const KvLayout& layout = config.layout;
  absl::StatusOr<KvPool*> pool;
  if (config.memory == "engine") {
    // One tensor per layer and K/V, as an engine that keeps separate K and V
    // caches per layer allocates them.
    std::vector<KvRegion> regions;
    for (uint32_t r = 0; r < layout.num_layers * layout.num_planes(); ++r) {
      void* mem = BenchMap(layout.plane_bytes());
      if (config.engine_hugepages) (void)madvise(mem, layout.plane_bytes(), MADV_HUGEPAGE);
      engine_regions_.emplace_back(mem, layout.plane_bytes());
      regions.push_back({mem, layout.plane_bytes()});
    }
    pool = agent_->RegisterPool("kv", layout, regions);
  } else {
    const auto t0 = std::chrono::steady_clock::now();
    pool = agent_->CreatePool("kv", layout);
    pool_seconds_ =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  if (!pool.ok()) Die(absl::StrCat("pool: ", pool.status().ToString()));
  pool_ = *pool;
  auto all = pool_->Lease(layout.num_blocks);
  if (!all.ok()) Die(absl::StrCat("Lease: ", all.status().ToString()));
  std::vector<uint32_t> ids(all->ids().begin(), all->ids().end());
  FillPattern(*all, ids);
}

BenchAgent::~BenchAgent() { Reset(); }

void BenchAgent::Reset() {
  agent_.reset();
  pool_ = nullptr;
  for (auto& [p, bytes] : engine_regions_) BenchUnmap(p, bytes);
  engine_regions_.clear();
}

void FillPattern(const BlockSet& blocks, const std::vector<uint32_t>& source_ids) {
  const KvLayout& l = blocks.layout();
  for (size_t k = 0; k < blocks.size(); ++k) {
    for (uint32_t layer = 0; layer < l.num_layers; ++layer) {
      for (uint32_t plane = 0; plane < l.num_planes(); ++plane) {
        std::span<std::byte> chunk = blocks.Chunk(k, layer, plane);
        auto* w = reinterpret_cast<uint64_t*>(chunk.data());
        const uint64_t base = PatternWord(source_ids[k], layer, plane, 0);
        for (uint64_t i = 0; i < chunk.size() / 8; ++i) w[i] = base + i;
      }
    }
  }
}

uint64_t CheckPattern(const BlockSet& blocks, const std::vector<uint32_t>& source_ids,
                      bool clear) {
  const KvLayout& l = blocks.layout();
  uint64_t bad = 0;
  for (size_t k = 0; k < blocks.size(); ++k) {
    for (uint32_t layer = 0; layer < l.num_layers; ++layer) {
      for (uint32_t plane = 0; plane < l.num_planes(); ++plane) {
        std::span<std::byte> chunk = blocks.Chunk(k, layer, plane);
        const auto* w = reinterpret_cast<const uint64_t*>(chunk.data());
        const uint64_t base = PatternWord(source_ids[k], layer, plane, 0);
        uint64_t diff = 0;
        for (uint64_t i = 0; i < chunk.size() / 8; ++i) diff |= w[i] ^ (base + i);
        if (diff != 0) ++bad;
        if (clear) std::memset(chunk.data(), 0, chunk.size());
      }
    }
  }
  return bad;
}

void ClearBlocks(const BlockSet& blocks) {
  const KvLayout& l = blocks.layout();
  for (size_t k = 0; k < blocks.size(); ++k) {
    for (uint32_t layer = 0; layer < l.num_layers; ++layer) {
      for (uint32_t plane = 0; plane < l.num_planes(); ++plane) {
        std::span<std::byte> chunk = blocks.Chunk(k, layer, plane);
        std::memset(chunk.data(), 0, chunk.size());
      }
    }
  }
}

}  // namespace kvferry::bench
