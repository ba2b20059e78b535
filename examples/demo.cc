// kvferry_demo: a decode agent and a prefill agent in one process. Prefill
// writes KV blocks into decode layer by layer (with a notification per
// layer), decode then pulls them back; the demo prints the peers, the
// counters, the ledger and the memory report at each step.
//
//   kvferry_demo [--tls=posix,sysv,tcp] [--blocks=32] [--pool_memory=ucx] [--json]
#include <cstdio>
#include <cstring>
#include <numeric>
#include <string>

#include "kvferry/agent.h"

namespace {

std::string Flag(int argc, char** argv, const std::string& name, const std::string& fallback) {
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--" + name) return "true";
    if (a.rfind("--" + name + "=", 0) == 0) return a.substr(name.size() + 3);
  }
  return fallback;
}

int Fail(const char* what, const absl::Status& s) {
  std::fprintf(stderr, "kvferry_demo: %s: %s\n", what, s.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (Flag(argc, argv, "help", "") == "true") {
    std::printf(
        "kvferry_demo: move KV blocks prefill -> decode between two agents in one process\n"
        "  --tls=LIST     UCX transports (default posix,sysv,tcp; try tcp)\n"
        "  --blocks=N     blocks per transfer (default 32, at most 256)\n"
        "  --pool_memory=ucx|mmap  who allocates the pools (default ucx: UCX shared\n"
        "                 memory; mmap: anonymous memory, the emulated path on one host)\n"
        "  --json         print the final memory report as JSON instead of text\n");
    return 0;
  }
  const std::string tls = Flag(argc, argv, "tls", "posix,sysv,tcp");
  const uint32_t blocks = static_cast<uint32_t>(std::stoul(Flag(argc, argv, "blocks", "32")));
  const std::string memory = Flag(argc, argv, "pool_memory", "ucx");
  if (memory != "ucx" && memory != "mmap") {
    std::fprintf(stderr, "kvferry_demo: --pool_memory is ucx or mmap (got %s)\n", memory.c_str());
    return 2;
  }
  if (blocks == 0 || blocks > 256) {
    std::fprintf(stderr, "kvferry_demo: --blocks must be 1..256 (got %u)\n", blocks);
    return 2;
  }
  // A Llama-8B-like cache: 32 layers, 8 KV heads of 128, bf16, 16 tokens per block.
  const kvferry::KvLayout layout{.num_layers = 32, .num_blocks = 256, .tokens_per_block = 16,
                                 .num_kv_heads = 8, .head_dim = 128, .element_bytes = 2};
  auto make = [&](const char* name) {
    kvferry::AgentOptions o;
    o.name = name;
    o.ucx_config = {{"TLS", tls}};
    o.pool_memory = memory == "ucx" ? kvferry::PoolMemorySource::kUcxAllocated
                                    : kvferry::PoolMemorySource::kAnonymousMmap;
    return kvferry::Agent::Create(o);
  };
  auto decode = make("decode");
  if (!decode.ok()) return Fail("Agent::Create(decode)", decode.status());
  auto prefill = make("prefill");
  if (!prefill.ok()) return Fail("Agent::Create(prefill)", prefill.status());
  std::printf("UCX settings: %s\n", (*decode)->ucx_settings().ToString().c_str());

  auto dpool = (*decode)->CreatePool("kv", layout);
  if (!dpool.ok()) return Fail("CreatePool(decode)", dpool.status());
  auto ppool = (*prefill)->CreatePool("kv", layout);
  if (!ppool.ok()) return Fail("CreatePool(prefill)", ppool.status());
  std::printf("pools: layout %s, %.1f MiB per block, %.1f MiB registered per agent\n",
              layout.ToString().c_str(), layout.block_bytes() / 1048576.0,
              (*ppool)->size_bytes() / 1048576.0);

  auto port = (*decode)->Listen("127.0.0.1", 0);
  if (!port.ok()) return Fail("Listen", port.status());
  auto peer = (*prefill)->Connect("127.0.0.1", *port);
  if (!peer.ok()) return Fail("Connect", peer.status());
  std::printf("prefill connected to '%s' on port %u (pools: %zu, data path: %s)\n",
              peer->name.c_str(), *port, peer->pools.size(), peer->data_path.c_str());

  auto src = (*ppool)->Lease(blocks);
  if (!src.ok()) return Fail("Lease(prefill)", src.status());
  auto dst = (*dpool)->Lease(blocks);
  if (!dst.ok()) return Fail("Lease(decode)", dst.status());
  for (size_t i = 0; i < src->size(); ++i) {
    for (uint32_t l = 0; l < layout.num_layers; ++l) {
      for (uint32_t p = 0; p < layout.num_planes(); ++p) {
        std::memset(src->Chunk(i, l, p).data(), static_cast<int>((i + l + p) & 0xff),
                    layout.chunk_bytes());
      }
    }
  }
  std::vector<uint32_t> remote(dst->ids().begin(), dst->ids().end());
  absl::Time t0 = absl::Now();
  for (uint32_t layer = 0; layer < layout.num_layers; ++layer) {
    auto t = (*prefill)->PostTransfer({.op = kvferry::TransferOp::kWrite, .peer = "decode",
                                       .local = &*src, .remote_blocks = remote,
                                       .layer_begin = layer, .layer_end = layer + 1,
                                       .notification = "layer " + std::to_string(layer)});
    if (!t.ok()) return Fail("PostTransfer", t.status());
  }
  size_t heard = 0;
  while (heard < layout.num_layers) {
    auto notes = (*decode)->WaitForNotifications(absl::Seconds(10));
    if (notes.empty()) return Fail("notifications", absl::DeadlineExceededError("none for 10 s"));
    heard += notes.size();
  }
  double secs = absl::ToDoubleSeconds(absl::Now() - t0);
  std::printf("WRITE %u blocks layer by layer: %zu notifications, %.1f MiB in %.2f ms (%.2f GB/s)\n",
              blocks, heard, blocks * layout.block_bytes() / 1048576.0, secs * 1e3,
              blocks * layout.block_bytes() / secs / 1e9);
  bool same = true;
  for (size_t i = 0; i < dst->size(); ++i) {
    same &= std::memcmp(src->Chunk(i, 31, 1).data(), dst->Chunk(i, 31, 1).data(),
                        layout.chunk_bytes()) == 0;
  }
  std::printf("decode's copy matches prefill's: %s\n", same ? "yes" : "NO");

  t0 = absl::Now();
  auto back = (*decode)->PostTransfer({.op = kvferry::TransferOp::kRead, .peer = "prefill",
                                       .local = &*dst, .remote_blocks = std::vector<uint32_t>(
                                                           src->ids().begin(), src->ids().end())});
  if (!back.ok()) return Fail("PostTransfer(READ)", back.status());
  if (absl::Status s = back->Wait(absl::Seconds(30)); !s.ok()) return Fail("Wait", s);
  secs = absl::ToDoubleSeconds(absl::Now() - t0);
  std::printf("READ %u blocks: %.2f ms (%.2f GB/s)\n", blocks, secs * 1e3,
              blocks * layout.block_bytes() / secs / 1e9);

  std::printf("\nwhile leases are held:\n%s", (*prefill)->ledger().Report().c_str());
  src->Reset();
  dst->Reset();
  std::printf("after the leases are gone:\n%s%s", (*prefill)->ledger().Report().c_str(),
              (*decode)->ledger().Report().c_str());
  auto report = (*decode)->GetMemoryReport();
  if (!report.ok()) return Fail("GetMemoryReport", report.status());
  std::printf("\n%s", Flag(argc, argv, "json", "") == "true" ? (report->ToJson() + "\n").c_str()
                                                             : report->ToText().c_str());
  return same ? 0 : 1;
}
