// libFuzzer target for the listener's control plane over real sockets. One
// agent listens on loopback with a shared secret (created once, with a donor
// agent whose real worker address and rkey authenticated inputs carry); each
// input is played on a fresh TCP connection by a raw client
// (tests/hostile_client.h), which then half-closes and reads until the
// listener closes.
//
// Input: byte 0 selects the mode (bits 0-1) and a flag (bit 2); byte 1 sets
// the chunk size (1..256) for raw bytes; the rest is the payload.
//   mode 0  the payload as raw bytes, in chunks of that size;
//   mode 1  a valid HELLO, then the payload raw;
//   mode 2  HELLO, then a correctly authenticated PROOF whose descriptor is
//           the payload: if it decodes, its worker address and rkeys are
//           replaced by the donor's (an authenticated peer's UCX blobs go to
//           UCX as they are; UCX is not the target here) and, unless the flag
//           is set, its name by the one the handshake claimed; otherwise the
//           payload follows the proof raw;
//   mode 3  HELLO, then a PROOF under the wrong secret with the payload raw
//           as its descriptor.
// Invariants (abort on violation): no WELCOME in modes 0, 1 and 3, no PROOF
// from the listener, only kvferry frames, the listener closes every
// connection after end of stream, and its connection, peer, endpoint and
// rkey counters return to zero. The payload is also split as a stream of
// frames (wire::FrameLength) and each frame decoded; what decodes must
// re-encode to the same message.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

#include "kvferry/agent.h"
#include "tests/hostile_client.h"

namespace {

using kvferry::Agent;
using kvferry::AgentOptions;
using kvferry::ResourceKind;
using kvferry::testing::HostileClient;
namespace wire = kvferry::internal::wire;
using wire::MessageType;

constexpr char kSecret[] = "handshake-fuzzer-secret";
constexpr char kClientName[] = "fuzz-client";
constexpr absl::Duration kPatience = absl::Seconds(10);

[[noreturn]] void Die(const std::string& why) {
  std::fprintf(stderr, "handshake_fuzzer: %s\n", why.c_str());
  std::fflush(stderr);
  std::abort();
}

kvferry::KvLayout Layout() {
  return {.num_layers = 2, .num_blocks = 4, .tokens_per_block = 16, .num_kv_heads = 1,
          .head_dim = 8, .element_bytes = 2};
}

struct Harness {
  std::unique_ptr<Agent> listener;
  std::unique_ptr<Agent> donor;
  wire::AgentDescriptor donor_descriptor;
  uint16_t port = 0;
  uint64_t incarnation = 0;
};

AgentOptions Options(const std::string& name) {
  AgentOptions o;
  o.name = name;
  o.shared_secret = kSecret;
  o.leak_policy = kvferry::LeakPolicy::kIgnore;  // static: never destroyed
  // Every authenticated input makes the listener's worker wire up with the
  // donor's and then close its endpoint at once; UCX reaps what that leaves
  // on the donor's side (a socket pair each) at its next keepalive round
  // (kvferry's default: peer_timeout / 4). Reap it quickly, so that
  // descriptors do not pile up at hundreds of inputs a second.
  o.ucx_config = {{"TLS", "tcp"}, {"KEEPALIVE_INTERVAL", "200ms"}};
  o.handshake_timeout = absl::Seconds(2);
  return o;
}

Harness& H() {
  static Harness* h = [] {
    auto* harness = new Harness;
    auto listener = Agent::Create(Options("fuzz-listener"));
    if (!listener.ok()) Die(listener.status().ToString());
    harness->listener = *std::move(listener);
    if (!harness->listener->CreatePool("kv", Layout()).ok()) Die("listener pool");
    auto port = harness->listener->Listen("127.0.0.1", 0);
    if (!port.ok()) Die(port.status().ToString());
    harness->port = *port;
    auto donor = Agent::Create(Options("fuzz-donor"));
    if (!donor.ok()) Die(donor.status().ToString());
    harness->donor = *std::move(donor);
    if (!harness->donor->CreatePool("kv", Layout()).ok()) Die("donor pool");
    auto captured = kvferry::testing::CaptureDescriptor(*harness->donor, kSecret);
    if (!captured.ok() || captured->pools.empty()) Die("cannot capture the donor's descriptor");
    harness->donor_descriptor = *std::move(captured);
    return harness;
  }();
  return *h;
}

// Splits `payload` as a stream of frames; each that decodes must round-trip.
void CheckStream(absl::string_view s) {
  while (true) {
    absl::StatusOr<size_t> length = wire::FrameLength(s);
    if (!length.ok() || *length == 0 || *length > s.size()) return;
    absl::StatusOr<wire::Message> m = wire::Decode(s.substr(0, *length));
    if (m.ok()) {
      absl::StatusOr<wire::Message> again = wire::Decode(wire::Encode(*m));
      if (!again.ok() || !(*again == *m)) Die("a decoded frame does not re-encode to itself");
    } else if (absl::StrContains(m.status().message(), "-byte body but")) {
      Die("FrameLength and Decode disagree on a frame's length");
    }
    s.remove_prefix(*length);
  }
}

void SendChunks(HostileClient& c, absl::string_view bytes, size_t chunk) {
  while (!bytes.empty()) {
    const size_t n = std::min(chunk, bytes.size());
    if (!c.Send(bytes.substr(0, n))) return;  // the listener hung up
    bytes.remove_prefix(n);
  }
}

std::string U32(uint32_t v) { return std::string(reinterpret_cast<const char*>(&v), 4); }

// A PROOF frame whose descriptor bytes are `descriptor` as given.
std::string RawProof(const std::string& proof, absl::string_view descriptor) {
  const std::string body = U32(static_cast<uint32_t>(proof.size())) + proof + std::string(descriptor);
  return kvferry::testing::FrameHeader(static_cast<uint16_t>(MessageType::kProof),
                                       static_cast<uint32_t>(body.size())) + body;
}

bool Quiet(const kvferry::Stats& s) {
  return s.Live(ResourceKind::kConnection) == 0 && s.Live(ResourceKind::kPeer) == 0 &&
         s.Live(ResourceKind::kEndpoint) == 0 && s.Live(ResourceKind::kRemoteKey) == 0;
}

}  // namespace

// LeakSanitizer cannot see UCX's references from its mmap()ed memory pools,
// so an endpoint that UCX creates for an incoming wireup (on the donor's
// worker) looks leaked while it is still in use. kvferry's own objects are
// checked by their ledger counters instead (Quiet above).
extern "C" const char* __lsan_default_suppressions() {
  return "leak:libucp.so\nleak:libuct.so\nleak:libucs.so\n";
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  Harness& h = H();
  const int mode = data[0] & 3;
  const bool keep_name = (data[0] & 4) != 0;
  const size_t chunk = static_cast<size_t>(data[1]) + 1;
  const absl::string_view payload(reinterpret_cast<const char*>(data) + 2, size - 2);
  CheckStream(payload);

  auto client = HostileClient::Connect(h.port);
  if (!client.ok()) Die(client.status().ToString());
  HostileClient& c = *client;
  const uint64_t incarnation = ++h.incarnation;
  bool authenticated = false;
  switch (mode) {
    case 0:
      SendChunks(c, payload, chunk);
      break;
    case 1: {
      absl::StatusOr<std::string> nonce = wire::RandomNonce();
      if (!nonce.ok()) Die("RandomNonce");
      c.Send(wire::Encode(kvferry::testing::HelloMessage(kClientName, incarnation, *nonce)));
      SendChunks(c, payload, chunk);
      break;
    }
    case 2:
    case 3: {
      auto hs = kvferry::testing::SayHello(c, kClientName, incarnation, kSecret, kPatience);
      if (!hs.ok()) Die(absl::StrCat("no CHALLENGE for a valid HELLO: ", hs.status().ToString()));
      if (!hs->server_proof_ok) Die("the listener's proof does not verify");
      if (mode == 3) {
        c.Send(RawProof(kvferry::testing::ClientProof(*hs, "not-the-secret"), payload));
        break;
      }
      const std::string proof = kvferry::testing::ClientProof(*hs, kSecret);
      absl::StatusOr<wire::Message> as_welcome = wire::Decode(
          kvferry::testing::FrameHeader(static_cast<uint16_t>(MessageType::kWelcome),
                                        static_cast<uint32_t>(payload.size())) +
          std::string(payload));
      if (!as_welcome.ok()) {
        c.Send(RawProof(proof, payload));
        break;
      }
      wire::AgentDescriptor d = std::move(as_welcome->agent);
      if (!keep_name) d.name = kClientName;
      d.worker_address = h.donor_descriptor.worker_address;
      for (wire::PoolDescriptor& p : d.pools) p.rkey = h.donor_descriptor.pools[0].rkey;
      c.Send(kvferry::testing::ProofFrame(proof, std::move(d)));
      authenticated = true;
      break;
    }
  }
  c.ShutdownWrite();
  std::vector<wire::Message> got;
  switch (c.ReadUntilClosed(&got, kPatience)) {
    case HostileClient::Event::kTimeout:
      Die("the listener kept a connection open after end of stream");
    case HostileClient::Event::kNotAFrame:
      Die("the listener sent bytes that are not a kvferry frame");
    default:
      break;
  }
  for (const wire::Message& m : got) {
    if (m.type == MessageType::kWelcome && !authenticated) Die("WELCOME without authentication");
    if (m.type == MessageType::kProof) Die("the listener sent a PROOF");
  }
  c.Close();
  const absl::Time deadline = absl::Now() + kPatience;
  while (!Quiet(h.listener->GetStats())) {
    if (absl::Now() > deadline) {
      Die(absl::StrCat("the listener's counters stay up: ", h.listener->ledger().Report()));
    }
    absl::SleepFor(absl::Microseconds(20));
  }
  return 0;
}
