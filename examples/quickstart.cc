// kvferry quick start: a prefill agent WRITEs KV blocks into a decode agent.
// Both agents live in this process to keep the example short; in a serving
// system each is in its own process, and agents that listen beyond loopback
// need a shared secret (AgentOptions::shared_secret or KVFERRY_SECRET).
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <span>
#include <vector>

#include "kvferry/agent.h"

namespace {

int Fail(const char* what, const absl::Status& status) {
  std::fprintf(stderr, "quickstart: %s: %s\n", what, status.ToString().c_str());
  return 1;
}

// The byte prefill writes into block `index`, `layer`, `plane`.
int Pattern(size_t index, uint32_t layer, uint32_t plane) {
  return static_cast<int>((index * 16 + layer * 2 + plane + 1) & 0xff);
}

}  // namespace

int main() {
  // The shape of the paged KV cache; both sides use the same one.
  const kvferry::KvLayout layout{.num_layers = 4, .num_blocks = 64, .tokens_per_block = 16,
                                 .num_kv_heads = 8, .head_dim = 128, .element_bytes = 2};

  // 1. Two agents, each with a pool of KV blocks registered with UCX.
  auto decode = kvferry::Agent::Create({.name = "decode"});
  if (!decode.ok()) return Fail("Agent::Create(decode)", decode.status());
  auto prefill = kvferry::Agent::Create({.name = "prefill"});
  if (!prefill.ok()) return Fail("Agent::Create(prefill)", prefill.status());
  absl::StatusOr<kvferry::KvPool*> decode_pool = (*decode)->CreatePool("kv", layout);
  if (!decode_pool.ok()) return Fail("CreatePool(decode)", decode_pool.status());
  absl::StatusOr<kvferry::KvPool*> prefill_pool = (*prefill)->CreatePool("kv", layout);
  if (!prefill_pool.ok()) return Fail("CreatePool(prefill)", prefill_pool.status());

  // 2. decode listens (port 0: any free port); prefill connects to it.
  absl::StatusOr<uint16_t> port = (*decode)->Listen("127.0.0.1", 0);
  if (!port.ok()) return Fail("Listen", port.status());
  absl::StatusOr<kvferry::PeerInfo> peer = (*prefill)->Connect("127.0.0.1", *port);
  if (!peer.ok()) return Fail("Connect", peer.status());
  std::printf("prefill connected to '%s' (data path %s)\n", peer->name.c_str(),
              peer->data_path.c_str());

  // 3. Lease 8 blocks on each side and fill prefill's.
  absl::StatusOr<kvferry::BlockSet> source = (*prefill_pool)->Lease(8);
  if (!source.ok()) return Fail("Lease(prefill)", source.status());
  absl::StatusOr<kvferry::BlockSet> target = (*decode_pool)->Lease(8);
  if (!target.ok()) return Fail("Lease(decode)", target.status());
  for (size_t i = 0; i < source->size(); ++i) {
    for (uint32_t layer = 0; layer < layout.num_layers; ++layer) {
      for (uint32_t plane = 0; plane < layout.num_planes(); ++plane) {
        std::span<std::byte> chunk = source->Chunk(i, layer, plane);
        std::memset(chunk.data(), Pattern(i, layer, plane), chunk.size());
      }
    }
  }

  // 4. WRITE them, every layer, into decode's blocks; decode is notified.
  std::vector<uint32_t> remote(target->ids().begin(), target->ids().end());
  absl::StatusOr<kvferry::Transfer> transfer = (*prefill)->PostTransfer(
      {.op = kvferry::TransferOp::kWrite, .peer = "decode", .local = &*source,
       .remote_blocks = remote, .notification = "request-1"});
  if (!transfer.ok()) return Fail("PostTransfer", transfer.status());
  if (absl::Status s = transfer->Wait(absl::Seconds(30)); !s.ok()) return Fail("Wait", s);

  // 5. The notification arrives only after the bytes are in decode's blocks.
  std::vector<kvferry::Notification> notes = (*decode)->WaitForNotifications(absl::Seconds(30));
  if (notes.empty() || notes[0].payload != "request-1") {
    return Fail("WaitForNotifications", absl::DeadlineExceededError("no 'request-1' in 30 s"));
  }
  for (size_t i = 0; i < target->size(); ++i) {
    for (uint32_t layer = 0; layer < layout.num_layers; ++layer) {
      for (uint32_t plane = 0; plane < layout.num_planes(); ++plane) {
        for (std::byte b : target->Chunk(i, layer, plane)) {
          if (std::to_integer<int>(b) != Pattern(i, layer, plane)) {
            return Fail("verify", absl::DataLossError("decode received different bytes"));
          }
        }
      }
    }
  }
  std::printf("decode received %zu blocks (%llu bytes) with notification '%s' from '%s'\n",
              target->size(),
              static_cast<unsigned long long>(target->size() * layout.block_bytes()),
              notes[0].payload.c_str(), notes[0].peer.c_str());

  // 6. Clean exit: the transfer handle and the leases, declared after the
  //    agents, are destroyed before them. (An agent destroyed while a lease
  //    or handle it made is alive reports it as a leak.)
  return 0;
}
