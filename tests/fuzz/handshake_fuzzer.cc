// libFuzzer target for the listener's control plane over real sockets. One
// agent listens on loopback with a shared secret (created once, with a donor
// agent whose real worker address and rkey authenticated inputs carry); each
// input is played on a fresh TCP connection by a raw client
// (tests/hostile_client.h), which then half-closes and reads until the
// listener closes.
//
// Frames after the CHALLENGE are sealed (src/wire/auth.h): the client derives
// the session keys from the transcript and seals what it sends after it, so
// that the fuzzed bytes reach the parser and the state machine behind the
// seal check, not only the check.
//
// Input: byte 0 selects the mode (bits 0-1, or bit 3 for mode 4) and a flag
// (bit 2); byte 1 sets the chunk size (1..256) for raw bytes; the rest is the
// payload.
//   mode 0  the payload as raw bytes, in chunks of that size;
//   mode 1  HELLO, CHALLENGE, then the payload where the PROOF goes: split as
//           a stream of frames, each whole frame sealed as the client's next
//           (what does not split goes raw); with the flag, all of it raw and
//           unsealed;
//   mode 2  HELLO, then a correctly authenticated PROOF whose descriptor is
//           the payload: if it decodes, its worker address and rkeys are
//           replaced by the donor's (an authenticated peer's UCX blobs go to
//           UCX as they are; UCX 1.13 aborts on malformed ones, and UCX is not
//           the target here) and, unless the flag is set, its name by the one
//           the handshake claimed; otherwise the payload is the PROOF's raw
//           descriptor. Sealed after the descriptor is fuzzed;
//   mode 3  HELLO, then a PROOF with a proof under the wrong secret and the
//           payload raw as its descriptor, sealed under the right keys (the
//           descriptor is parsed, the proof check refuses); with the flag,
//           sealed under the wrong secret's keys (the seal check refuses);
//   mode 4  the whole handshake (the donor's descriptor), then the payload
//           split as a stream of frames, each sealed as the client's next
//           (frame 1 on); with the flag, numbered from 0 (a replay).
// Invariants (abort on violation): no WELCOME in modes 0, 1 and 3, no PROOF
// from the listener, only kvferry frames, sealed ones under the listener's
// key in sequence, the listener closes every connection after end of stream,
// and its connection, peer, endpoint and rkey counters return to zero. Mode 3
// ends in REJECT(UNAUTHENTICATED) or REJECT(INVALID_ARGUMENT), with the flag
// only the former. Mode 4 is welcomed, and the listener delivers exactly the
// NOTIFYs it should, in order: those before the first frame that does not
// decode, is not NOTIFY or PING, or (with the flag) any. The payload is also
// split as a stream of frames (wire::FrameLength) and each frame decoded; what
// decodes must re-encode to the same message, and seal and open again.
// In mode 4 the offer messages keep the connection (and the expected
// NOTIFYs) going; POOL_ADDED frames are left out (their rkeys reach UCX).
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

bool IsOfferMessage(kvferry::internal::wire::MessageType type) {
  using kvferry::internal::wire::MessageType;
  return type == MessageType::kOfferDone || type == MessageType::kOfferRevoke ||
         type == MessageType::kOfferRevoked || type == MessageType::kOfferRelease ||
         type == MessageType::kOfferBound || type == MessageType::kOfferEnded;
}

using kvferry::Agent;
using kvferry::AgentOptions;
using kvferry::ResourceKind;
using kvferry::test::HostileClient;
using kvferry::test::SealedSession;
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
    auto captured = kvferry::test::CaptureDescriptor(*harness->donor, kSecret);
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
    const absl::string_view frame = s.substr(0, *length);
    absl::StatusOr<wire::Message> m = wire::Decode(frame);
    const std::string sealed = wire::SealFrame(kSecret, 7, std::string(frame));
    absl::StatusOr<std::string> opened = wire::OpenFrame(kSecret, 7, sealed);
    if (!opened.ok() || *opened != frame) Die("a sealed frame does not open to itself");
    if (wire::OpenFrame(kSecret, 8, sealed).ok()) Die("a sealed frame opens out of sequence");
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

// Splits `payload` as a stream of frames: the whole frames, and what is left
// (a partial frame, or everything from the first bytes that are not a frame).
std::vector<std::string> SplitFrames(absl::string_view payload, std::string* rest) {
  std::vector<std::string> frames;
  while (true) {
    absl::StatusOr<size_t> length = wire::FrameLength(payload);
    if (!length.ok() || *length == 0 || *length > payload.size()) break;
    frames.emplace_back(payload.substr(0, *length));
    payload.remove_prefix(*length);
  }
  rest->assign(payload.data(), payload.size());
  return frames;
}

std::string U32(uint32_t v) { return std::string(reinterpret_cast<const char*>(&v), 4); }

// A PROOF frame whose descriptor bytes are `descriptor` as given.
std::string RawProof(const std::string& proof, absl::string_view descriptor) {
  const std::string body = U32(static_cast<uint32_t>(proof.size())) + proof + std::string(descriptor);
  return kvferry::test::FrameHeader(static_cast<uint16_t>(MessageType::kProof),
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
  const int mode = (data[0] & 8) != 0 ? 4 : data[0] & 3;
  const bool flag = (data[0] & 4) != 0;
  const size_t chunk = static_cast<size_t>(data[1]) + 1;
  const absl::string_view payload(reinterpret_cast<const char*>(data) + 2, size - 2);
  CheckStream(payload);

  auto client = HostileClient::Connect(h.port);
  if (!client.ok()) Die(client.status().ToString());
  HostileClient& c = *client;
  const uint64_t incarnation = ++h.incarnation;
  bool authenticated = false;
  SealedSession* session = nullptr;  // once the client seals
  kvferry::test::ClientHandshake hs;
  std::vector<std::string> expected_notes;  // mode 4
  switch (mode) {
    case 0:
      SendChunks(c, payload, chunk);
      break;
    case 1:
    case 2:
    case 3: {
      auto said = kvferry::test::SayHello(c, kClientName, incarnation, kSecret, kPatience);
      if (!said.ok()) {
        Die(absl::StrCat("no CHALLENGE for a valid HELLO: ", said.status().ToString()));
      }
      if (!said->server_proof_ok) Die("the listener's proof does not verify");
      hs = *std::move(said);
      session = &hs.session;
      if (mode == 1) {
        if (flag) {
          SendChunks(c, payload, chunk);
          break;
        }
        std::string rest;
        for (std::string& frame : SplitFrames(payload, &rest)) {
          if (!c.Send(hs.session.Seal(std::move(frame)))) break;
        }
        SendChunks(c, rest, chunk);
        break;
      }
      if (mode == 3) {
        std::string proof = RawProof(kvferry::test::ClientProof(hs, "not-the-secret"), payload);
        if (flag) {
          proof = wire::SealFrame(
              wire::DeriveSessionKeys("not-the-secret", hs.transcript).client_to_server, 0,
              std::move(proof));
        } else {
          proof = hs.session.Seal(std::move(proof));
        }
        c.Send(proof);
        break;
      }
      const std::string proof = kvferry::test::ClientProof(hs, kSecret);
      absl::StatusOr<wire::Message> as_welcome = wire::Decode(
          kvferry::test::FrameHeader(static_cast<uint16_t>(MessageType::kWelcome),
                                        static_cast<uint32_t>(payload.size())) +
          std::string(payload));
      if (!as_welcome.ok()) {
        c.Send(hs.session.Seal(RawProof(proof, payload)));
        break;
      }
      wire::AgentDescriptor d = std::move(as_welcome->agent);
      if (!flag) d.name = kClientName;
      d.worker_address = h.donor_descriptor.worker_address;
      for (wire::PoolDescriptor& p : d.pools) {
        for (wire::RegionDescriptor& r : p.regions) r.rkey = h.donor_descriptor.pools[0].regions[0].rkey;
      }
      // Fuzzed first, then sealed: the seal covers what the peer meant to send.
      c.Send(kvferry::test::SealedProofFrame(hs, proof, std::move(d)));
      authenticated = true;
      break;
    }
    case 4: {
      (void)h.listener->PollNotifications();
      auto done = kvferry::test::Authenticate(c, kClientName, incarnation, kSecret,
                                                 h.donor_descriptor, kPatience);
      if (!done.ok()) Die(absl::StrCat("a correct handshake failed: ", done.status().ToString()));
      hs = *std::move(done);
      session = &hs.session;
      authenticated = true;
      if (flag) hs.session.send_sequence = 0;  // replays the PROOF's sequence number
      std::string rest;
      bool delivering = !flag;
      for (std::string& frame : SplitFrames(payload, &rest)) {
        absl::StatusOr<wire::Message> m = wire::Decode(frame);
        // A POOL_ADDED from an authenticated peer carries rkeys that go to
        // UCX as they are (the trust boundary, as in mode 2): not sent.
        // Nor a POOL_REMOVED: one naming the donor's pool is legitimate and
        // keeps the connection, which the expectations below do not model.
        if (m.ok() && (m->type == MessageType::kPoolAdded ||
                       m->type == MessageType::kPoolRemoved)) {
          continue;
        }
        if (delivering) {
          if (m.ok() && m->type == MessageType::kNotify) {
            expected_notes.push_back(m->text);
          } else if (m.ok() && IsOfferMessage(m->type)) {
            // Handled without ending the connection (an offer id that is not
            // the peer's own is ignored), unless it is one revoke past
            // wire::kMaxUnpostedRevokes, which no input of 1 MiB reaches.
          } else if (!m.ok() || m->type != MessageType::kPing) {
            delivering = false;  // dropped (or BYE): nothing after it is handled
          }
        }
        if (!c.Send(hs.session.Seal(std::move(frame)))) break;
      }
      SendChunks(c, rest, chunk);
      break;
    }
  }
  c.ShutdownWrite();
  std::vector<wire::Message> got;
  switch (c.ReadUntilClosed(&got, kPatience, session)) {
    case HostileClient::Event::kTimeout:
      Die("the listener kept a connection open after end of stream");
    case HostileClient::Event::kNotAFrame:
      Die("the listener sent bytes that are not a kvferry frame");
    case HostileClient::Event::kBadSeal:
      Die("the listener sent a frame that fails its seal (or out of sequence)");
    default:
      break;
  }
  for (const wire::Message& m : got) {
    if (m.type == MessageType::kWelcome && !authenticated) Die("WELCOME without authentication");
    if (m.type == MessageType::kProof) Die("the listener sent a PROOF");
    if (mode == 3 && m.type == MessageType::kReject) {
      const auto code = static_cast<absl::StatusCode>(m.code);
      if (code != absl::StatusCode::kUnauthenticated &&
          (flag || code != absl::StatusCode::kInvalidArgument) &&
          code != absl::StatusCode::kDeadlineExceeded) {
        Die(absl::StrCat("mode 3 refused with ", absl::StatusCodeToString(code), ": ", m.text));
      }
    }
  }
  c.Close();
  if (mode == 4) {
    // The listener handled every frame before it closed the connection.
    std::vector<std::string> notes;
    for (kvferry::Notification& n : h.listener->PollNotifications()) {
      if (n.peer != kClientName) Die(absl::StrCat("a notification from '", n.peer, "'"));
      notes.push_back(std::move(n.payload));
    }
    if (notes != expected_notes) {
      Die(absl::StrCat("the listener delivered ", notes.size(), " notifications where ",
                       expected_notes.size(), " were sealed in sequence"));
    }
  }
  const absl::Time deadline = absl::Now() + kPatience;
  while (!Quiet(h.listener->GetStats())) {
    if (absl::Now() > deadline) {
      Die(absl::StrCat("the listener's counters stay up: ", h.listener->ledger().Report()));
    }
    absl::SleepFor(absl::Microseconds(20));
  }
  return 0;
}
