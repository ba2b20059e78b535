// Lease/release cost of the block allocator (the hot path of every request).
#include <benchmark/benchmark.h>

#include <cstdlib>

#include "kvferry/agent.h"

namespace {

void BM_LeaseRelease(benchmark::State& state) {
  kvferry::AgentOptions options;
  options.progress_thread = false;
  auto agent = kvferry::Agent::Create(options);
  if (!agent.ok()) {
    state.SkipWithError(agent.status().ToString().c_str());
    return;
  }
  kvferry::KvLayout layout{.num_layers = 4, .num_blocks = 4096, .tokens_per_block = 16,
                           .num_kv_heads = 1, .head_dim = 64, .element_bytes = 2};
  auto pool = (*agent)->CreatePool("kv", layout);
  if (!pool.ok()) {
    state.SkipWithError(pool.status().ToString().c_str());
    return;
  }
  const auto count = static_cast<uint32_t>(state.range(0));
  for (auto _ : state) {
    auto blocks = (*pool)->Lease(count);
    benchmark::DoNotOptimize(blocks);
  }
  state.SetItemsProcessed(state.iterations() * count);
}
BENCHMARK(BM_LeaseRelease)->Arg(1)->Arg(16)->Arg(256);

}  // namespace
