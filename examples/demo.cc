// kvferry_demo: creates an agent and a KV pool, leases blocks, and prints the
// counters and the ledger at each step.
#include <cstdio>
#include <cstdlib>

#include "kvferry/agent.h"

int main() {
  kvferry::AgentOptions options;
  options.name = "demo";
  auto agent = kvferry::Agent::Create(options);
  if (!agent.ok()) {
    std::fprintf(stderr, "Agent::Create: %s\n", agent.status().ToString().c_str());
    return 1;
  }
  std::printf("UCX settings: %s\n", (*agent)->ucx_settings().ToString().c_str());

  kvferry::KvLayout layout;
  layout.num_layers = 32;
  layout.num_blocks = 256;
  layout.tokens_per_block = 16;
  layout.num_kv_heads = 8;
  layout.head_dim = 128;
  layout.element_bytes = 2;
  auto pool = (*agent)->CreatePool("kv", layout);
  if (!pool.ok()) {
    std::fprintf(stderr, "CreatePool: %s\n", pool.status().ToString().c_str());
    return 1;
  }
  std::printf("pool 'kv': layout %s, %llu bytes per block, %llu bytes registered\n",
              layout.ToString().c_str(), static_cast<unsigned long long>(layout.block_bytes()),
              static_cast<unsigned long long>((*pool)->size_bytes()));
  {
    auto blocks = (*pool)->Lease(40);
    if (!blocks.ok()) {
      std::fprintf(stderr, "Lease: %s\n", blocks.status().ToString().c_str());
      return 1;
    }
    std::printf("leased %zu blocks; %u free\n", blocks->size(), (*pool)->free_blocks());
    std::printf("%s", (*agent)->ledger().Report().c_str());
  }
  std::printf("lease released; %u free\n", (*pool)->free_blocks());
  std::printf("%s", (*agent)->ledger().Report().c_str());
  return 0;
}
