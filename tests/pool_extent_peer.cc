// The other process of pool_extent_test: an authenticated peer that knows
// the secret and declares its real 256 KiB pool (8 blocks) with a layout of
// --blocks blocks, keeping the genuine base and remote key.
//
// It owns a real agent (so its worker address and keys are UCX's own) with
// pool "kv": --memory=ucx makes it with CreatePool (a UCX shared-memory
// segment: the receiver's path is shm-direct); --memory=engine registers
// 256 KiB of its own anonymous memory followed by 4 MiB of PROT_NONE
// (RegisterPool: the receiver's path is the kernel copy). It learns its
// agent's descriptor (tests/hostile_client.h, CaptureDescriptor), then plays
// the handshake with the receiver by hand, as --name, offering the receiver
// a kernel-copy probe of its own (this process, this connection's key):
//   --via=proof       the PROOF declares pool "kv" with --blocks blocks;
//   --via=pool_added  the PROOF is honest, then a POOL_ADDED declares pool
//                     "kv2": the same memory with --blocks blocks.
// --shift=N (bytes, may be negative) also moves the declared base by N, so
// that the region starts outside the memory the key grants. --blocks=8
// without --shift is the honest pool.
//
// With --role=server it plays the listener instead: it prints "PORT <port>",
// takes one Connect from the receiver and answers its PROOF with a WELCOME
// that carries the same declarations (prints "WELCOMED").
//
// Prints, one line each: "WELCOME" or "REJECT <code> <text>"; with
// pool_added, "ADDED"; "TICKET <hex>", an offer ticket for block
// --blocks - 1 of the declared pool, made for --receiver on this
// connection; "CLOSED" once the receiver closed the connection. It pings the
// receiver meanwhile and exits when its stdin closes. "ERROR <why>" on a
// failure of its own.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/mman.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "kvferry/agent.h"
#include "tests/hostile_client.h"
#include "tests/kv_pattern.h"

namespace kvferry {
namespace {

namespace wire = internal::wire;

// What this process offers the receiver to read before it copies into it.
std::array<char, wire::kTagBytes> g_probe{};

constexpr uint64_t kPoolBytes = 256 << 10;

KvLayout Layout(uint32_t blocks) {
  return KvLayout{.num_layers = 4, .num_blocks = blocks, .tokens_per_block = 16,
                  .num_kv_heads = 2, .head_dim = 64, .element_bytes = 2};
}

int Fail(const std::string& why) {
  std::printf("ERROR %s\n", why.c_str());
  std::fflush(stdout);
  return 1;
}

void Say(const std::string& line) {
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

int Run(std::map<std::string, std::string> flags) {
  const std::string secret = flags["secret"];
  const std::string name = flags["name"];
  const bool engine = flags["memory"] == "engine";
  const bool via_proof = flags["via"] != "pool_added";
  uint32_t port = 0, blocks = 0;
  int64_t shift = 0;
  if (!absl::SimpleAtoi(flags["port"], &port) || !absl::SimpleAtoi(flags["blocks"], &blocks) ||
      blocks == 0 || (flags.contains("shift") && !absl::SimpleAtoi(flags["shift"], &shift))) {
    return Fail("bad --port, --blocks or --shift");
  }

  AgentOptions o;
  o.name = name + "-agent";
  o.leak_policy = LeakPolicy::kLog;
  o.shared_secret = secret;
  o.ucx_config = {{"TLS", flags["tls"]}};
  auto agent = Agent::Create(o);
  if (!agent.ok()) return Fail(std::string(agent.status().message()));
  absl::StatusOr<KvPool*> pool;
  if (engine) {
    // The pool, then 4 MiB nobody may touch: a longer region runs into it.
    constexpr uint64_t kGuard = 4 << 20;
    void* mem = mmap(nullptr, kPoolBytes + kGuard, PROT_NONE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED || mprotect(mem, kPoolBytes, PROT_READ | PROT_WRITE) != 0) {
      return Fail("mmap");
    }
    const KvRegion region{.base = mem, .length = kPoolBytes};
    pool = (*agent)->RegisterPool("kv", Layout(8), {&region, 1});
  } else {
    pool = (*agent)->CreatePool("kv", Layout(8));
  }
  if (!pool.ok()) return Fail(std::string(pool.status().message()));
  if ((*pool)->layout().total_bytes() != kPoolBytes) return Fail("the pool is not 256 KiB");
  {
    const std::vector<uint32_t> ids = {0, 1, 2, 3, 4, 5, 6, 7};
    auto all = (*pool)->LeaseIds(ids);
    if (!all.ok()) return Fail(std::string(all.status().message()));
    for (uint32_t i = 0; i < 8; ++i) test::FillBlock(*all, i, /*seed=*/77, i);
  }

  auto captured = test::CaptureDescriptor(**agent, secret);
  if (!captured.ok()) return Fail(std::string(captured.status().message()));
  if (captured->pools.size() != 1 || captured->pools[0].regions.size() != 1) {
    return Fail("the captured descriptor has not one pool of one region");
  }
  wire::PoolDescriptor lie = captured->pools[0];
  lie.layout.num_blocks = blocks;
  lie.regions[0].length = lie.layout.total_bytes();  // consistent with the layout it claims
  lie.regions[0].base += static_cast<uint64_t>(shift);

  wire::AgentDescriptor d = *captured;
  d.name = name;
  d.pid = static_cast<uint64_t>(getpid());
  d.probe_address = reinterpret_cast<uintptr_t>(g_probe.data());
  if (via_proof) d.pools = {lie};
  // Sets the probe the receiver reads under this process's sending key.
  auto set_probe = [](const std::string& send_key) {
    const std::string probe = wire::KernelCopyProbe(send_key);
    std::memcpy(g_probe.data(), probe.data(), std::min(probe.size(), g_probe.size()));
  };

  test::HostileClient client;
  test::SealedSession session;
  bool welcomed = false;
  if (flags["role"] == "server") {
    int lfd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    test::HostileClient listener(lfd);  // owns the listening socket
    sockaddr_in at = {};
    at.sin_family = AF_INET;
    at.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(at);
    if (lfd < 0 || ::bind(lfd, reinterpret_cast<const sockaddr*>(&at), sizeof(at)) != 0 ||
        ::listen(lfd, 4) != 0 || ::getsockname(lfd, reinterpret_cast<sockaddr*>(&at), &len) != 0) {
      return Fail("listen");
    }
    Say(absl::StrCat("PORT ", ntohs(at.sin_port)));
    int cfd = ::accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
    if (cfd < 0) return Fail("accept");
    client = test::HostileClient(cfd);
    auto hello = client.ReadMessage(absl::Seconds(30));
    if (!hello.ok() || hello->type != wire::MessageType::kHello) return Fail("no HELLO");
    auto nonce = wire::RandomNonce();
    if (!nonce.ok()) return Fail("nonce");
    wire::HandshakeTranscript t{.client_name = hello->name, .server_name = name,
                                .client_incarnation = hello->incarnation,
                                .server_incarnation = 1, .client_nonce = hello->nonce,
                                .server_nonce = *nonce};
    client.Send(wire::Encode({.type = wire::MessageType::kChallenge, .name = name,
                              .incarnation = 1, .nonce = *nonce,
                              .proof = wire::ComputeProof(secret, wire::ProofRole::kServer, t)}));
    const wire::SessionKeys keys = wire::DeriveSessionKeys(secret, t);
    session = test::SealedSession::ForServer(keys);
    auto proof = client.ReadMessage(absl::Seconds(30), &session);
    if (!proof.ok() || proof->type != wire::MessageType::kProof) return Fail("no PROOF");
    set_probe(keys.server_to_client);
    client.Send(session.Seal({.type = wire::MessageType::kWelcome, .agent = d}));
    Say("WELCOMED");
    welcomed = true;
  } else {
    auto connected = test::HostileClient::Connect(static_cast<uint16_t>(port));
    if (!connected.ok()) return Fail(std::string(connected.status().message()));
    client = *std::move(connected);
    auto h = test::SayHello(client, name, /*incarnation=*/1, secret);
    if (!h.ok()) return Fail(std::string(h.status().message()));
    if (!h->server_proof_ok) return Fail("the receiver's proof fails");
    set_probe(h->keys.client_to_server);
    client.Send(test::SealedProofFrame(*h, test::ClientProof(*h, secret), d));
    auto reply = test::ReadSealed(client, *h);
    if (!reply.ok()) {
      return Fail(absl::StrCat("no answer to the PROOF: ", reply.status().message()));
    }
    if (reply->type == wire::MessageType::kWelcome) {
      Say("WELCOME");
      welcomed = true;
    } else if (reply->type == wire::MessageType::kReject) {
      Say(absl::StrCat("REJECT ",
                       absl::StatusCodeToString(static_cast<absl::StatusCode>(reply->code)), " ",
                       reply->text));
    } else {
      return Fail(absl::StrCat("unexpected ", wire::MessageTypeName(reply->type)));
    }
    session = h->session;
  }
  if (!via_proof && welcomed) {
    lie.name = "kv2";
    wire::Message added{.type = wire::MessageType::kPoolAdded};
    added.agent.pools.push_back(lie);
    client.Send(session.Seal(added));
    Say("ADDED");
  }

  wire::Ticket ticket{.offer_id = 1,
                      .offerer = name,
                      .offerer_incarnation = 1,
                      .taker = flags["receiver"],
                      .pool = lie.name,
                      .ttl_ns = absl::ToInt64Nanoseconds(absl::Minutes(10)),
                      .num_layers = lie.layout.num_layers,
                      .blocks = {blocks - 1}};
  std::string bytes = wire::EncodeTicketBody(ticket);
  bytes += wire::TicketTag(session.send_key, bytes);
  Say(absl::StrCat("TICKET ", absl::BytesToHexString(bytes)));

  // Answer as a live peer until stdin closes.
  bool closed = false;
  absl::Time next_ping = absl::Now();
  while (true) {
    if (!closed && absl::Now() >= next_ping) {
      client.Send(session.Seal({.type = wire::MessageType::kPing}));
      next_ping = absl::Now() + absl::Milliseconds(500);
    }
    pollfd p = {STDIN_FILENO, POLLIN, 0};
    if (poll(&p, 1, 0) == 1) {
      char c;
      if (read(STDIN_FILENO, &c, 1) <= 0) break;
    }
    if (closed) {
      poll(&p, 1, 100);
      continue;
    }
    std::string frame;
    switch (client.ReadFrame(&frame, absl::Milliseconds(100))) {
      case test::HostileClient::Event::kClosed:
      case test::HostileClient::Event::kNotAFrame:
        closed = true;
        Say("CLOSED");
        break;
      default:
        break;  // frames (pings, notifications, offer messages) are not needed
    }
  }
  client.Close();
  agent->reset();
  return 0;
}

}  // namespace
}  // namespace kvferry

int main(int argc, char** argv) {
  std::map<std::string, std::string> flags;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--", 0) != 0) continue;
    const size_t eq = a.find('=');
    flags[a.substr(2, eq == std::string::npos ? std::string::npos : eq - 2)] =
        eq == std::string::npos ? "" : a.substr(eq + 1);
  }
  return kvferry::Run(std::move(flags));
}
