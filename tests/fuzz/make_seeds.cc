// Writes one valid encoding of each control message into a directory: the
// seed corpus for wire_fuzzer, and an offer ticket. Usage: make_seeds DIR
#include <cstdio>
#include <fstream>
#include <string>

#include "src/wire/message.h"

int main(int argc, char** argv) {
  using namespace kvferry::internal::wire;
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  Message hello;  // a PROOF: the handshake message with a full descriptor
  hello.type = MessageType::kProof;
  hello.proof = std::string(kProofBytes, 'p');
  hello.agent = {.name = "decode-0", .host_id = "boot", .worker_address = std::string(40, 'a'),
                 .pid = 4242, .probe_address = 0x7ffc00001000};
  kvferry::KvLayout layout{.num_layers = 2, .num_blocks = 4, .tokens_per_block = 16,
                           .num_kv_heads = 1, .head_dim = 8, .element_bytes = 2};
  hello.agent.pools.push_back(
      {.name = "kv", .layout = layout,
       .regions = {{.base = 0x10000, .length = layout.total_bytes(), .rkey = "rkey"}}});
  Message welcome = hello;
  welcome.type = MessageType::kWelcome;
  welcome.proof.clear();
  const Message messages[] = {hello, welcome,
                              {.type = MessageType::kHello, .name = "prefill", .incarnation = 1,
                               .nonce = std::string(kNonceBytes, 'n')},
                              {.type = MessageType::kChallenge, .name = "decode", .incarnation = 2,
                               .nonce = std::string(kNonceBytes, 'm'),
                               .proof = std::string(kProofBytes, 'q')},
                              {.type = MessageType::kReject, .code = 7, .text = "no"},
                              {.type = MessageType::kNotify, .text = "layer 3"},
                              {.type = MessageType::kPing},
                              {.type = MessageType::kBye},
                              {.type = MessageType::kOfferDone, .offer_id = 3,
                               .layer_begin = 0, .layer_end = 2},
                              {.type = MessageType::kOfferRevoke, .text = "expired",
                               .offer_id = 4, .ttl_ns = 1},
                              {.type = MessageType::kOfferRevoked, .offer_id = 4},
                              {.type = MessageType::kPoolRemoved, .name = "kv"}};
  Message added{.type = MessageType::kPoolAdded};
  added.agent.pools = hello.agent.pools;
  added.agent.pools[0].name = "kv-late";
  int i = 0;
  for (const Message& m : messages) {
    std::ofstream out(std::string(argv[1]) + "/seed" + std::to_string(i++), std::ios::binary);
    out << Encode(m);
  }
  std::ofstream(std::string(argv[1]) + "/seed" + std::to_string(i++), std::ios::binary)
      << Encode(added);
  // An offer ticket (for DecodeTicket; the tag is not checked there).
  const Ticket ticket{.offer_id = 5, .offerer = "prefill-0", .offerer_incarnation = 1,
                      .taker = "decode-0", .pool = "kv", .ttl_ns = 2,
                      .num_layers = 2, .blocks = {3, 1, 2}};
  std::ofstream(std::string(argv[1]) + "/ticket", std::ios::binary)
      << EncodeTicketBody(ticket) << std::string(kTicketTagBytes, 't');
  return 0;
}
