#include <cstdio>

#include "kvferry/agent.h"

int main() {
  kvferry::AgentOptions options;
  options.name = "consumer";
  options.progress_thread = false;
  auto agent = kvferry::Agent::Create(options);
  if (!agent.ok()) {
    std::fprintf(stderr, "%s\n", agent.status().ToString().c_str());
    return 1;
  }
  kvferry::KvLayout layout{.num_layers = 2, .num_blocks = 4, .tokens_per_block = 16,
                           .num_kv_heads = 1, .head_dim = 64, .element_bytes = 2};
  auto pool = (*agent)->CreatePool("kv", layout);
  if (!pool.ok()) {
    std::fprintf(stderr, "%s\n", pool.status().ToString().c_str());
    return 1;
  }
  std::printf("consumer: find_package(kvferry) works; %s\n",
              (*agent)->GetStats().ToString().c_str());
  return 0;
}
