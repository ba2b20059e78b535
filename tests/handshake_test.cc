// The control handshake as pure logic (src/handshake.h): a client and a
// server Handshake driven against each other with real wire frames, to
// completion and into every refusal either side can reach.
#include "src/handshake.h"

#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
#include "src/wire/auth.h"
#include "src/wire/message.h"
#include "tests/test_util.h"

namespace kvferry::internal {
namespace {

using ::testing::HasSubstr;
using test::IsOk;
using test::StatusIs;
using Kind = Handshake::Step::Kind;
using Stage = Handshake::Stage;

constexpr char kClientAddress[] = "10.0.0.2:40000";  // as the server sees the client
constexpr char kServerAddress[] = "10.0.0.1:5000";   // as the client sees the server
const absl::Time kAccepted = absl::FromUnixSeconds(1'000'000);

wire::AgentDescriptor Descriptor(const std::string& name) {
  return {.name = name, .host_id = "boot-1234", .worker_address = "worker@" + name};
}

std::string Nonce() {
  absl::StatusOr<std::string> nonce = wire::RandomNonce();
  EXPECT_THAT(nonce.status(), IsOk());
  return nonce.ok() ? *nonce : std::string(wire::kNonceBytes, 'n');
}

Handshake MakeClient(const std::string& secret = "secret", const std::string& name = "prefill-0") {
  return Handshake::Client({.name = name, .incarnation = 11, .secret = secret}, kServerAddress,
                           Nonce(), kAccepted + absl::Seconds(10));
}

Handshake MakeServer(const std::string& secret = "secret",
                     absl::Duration hello_timeout = absl::Seconds(1)) {
  return Handshake::Server({.name = "decode-0", .incarnation = 22, .secret = secret},
                           kClientAddress, kAccepted, hello_timeout, absl::Seconds(10));
}

std::string Hello(const std::string& name, uint64_t incarnation = 11) {
  return wire::Encode({.type = wire::MessageType::kHello,
                       .name = name,
                       .incarnation = incarnation,
                       .nonce = std::string(wire::kNonceBytes, 'h')});
}

// One connection's two ends, driven step by step.
struct Pair {
  Handshake client = MakeClient();
  Handshake server = MakeServer();
  absl::Time now = kAccepted + absl::Milliseconds(5);

  // HELLO -> CHALLENGE; returns the CHALLENGE.
  std::string Challenge() {
    Handshake::Step step = server.Receive(client.Hello(), now);
    EXPECT_EQ(step.kind, Kind::kSend) << step.status;
    return step.frame;
  }
  // ... -> the client took the CHALLENGE; returns the sealed PROOF.
  std::string Proof(const std::string& client_descriptor_name = "prefill-0") {
    Handshake::Step step = client.Receive(Challenge(), now);
    EXPECT_EQ(step.kind, Kind::kProven) << step.status;
    return client.Proof(Descriptor(client_descriptor_name));
  }
  // ... -> the server authenticated the client; returns the sealed WELCOME.
  std::string Welcome(const std::string& server_descriptor_name = "decode-0") {
    Handshake::Step step = server.Receive(Proof(), now);
    EXPECT_EQ(step.kind, Kind::kAuthenticated) << step.status;
    std::string welcome = server.Welcome(Descriptor(server_descriptor_name));
    server.Finish();
    return welcome;
  }
  // ... -> both finished.
  void Complete() {
    Handshake::Step step = client.Receive(Welcome(), now);
    EXPECT_EQ(step.kind, Kind::kAuthenticated) << step.status;
    client.Finish();
  }
};

std::string FlipBit(std::string frame, size_t byte, int bit) {
  frame[byte] = static_cast<char>(frame[byte] ^ (1 << bit));
  return frame;
}

TEST(HandshakeTest, ClientAndServerAuthenticateEachOther) {
  Pair p;
  EXPECT_EQ(p.client.stage(), Stage::kAwaitChallenge);
  EXPECT_EQ(p.server.stage(), Stage::kAwaitHello);
  EXPECT_EQ(p.client.max_frame(), wire::kMaxHelloFrameBytes);
  EXPECT_EQ(p.server.max_frame(), wire::kMaxHelloFrameBytes);
  EXPECT_TRUE(p.client.send_key().empty());

  Handshake::Step step = p.server.Receive(p.client.Hello(), p.now);
  ASSERT_EQ(step.kind, Kind::kSend) << step.status;
  EXPECT_EQ(p.server.stage(), Stage::kAwaitProof);
  EXPECT_EQ(p.server.claimed_name(), "prefill-0");
  EXPECT_TRUE(p.server.peer_name().empty());  // claimed, not proven
  EXPECT_EQ(p.server.DescribePeer(),
            absl::StrCat(kClientAddress, " (unauthenticated, claims to be 'prefill-0')"));
  EXPECT_EQ(p.server.challenged(), p.now);
  EXPECT_EQ(p.server.max_frame(), wire::kMaxProofFrameBytes);
  EXPECT_EQ(p.server.deadline(), kAccepted + absl::Seconds(10));
  // The CHALLENGE itself goes unsealed.
  absl::StatusOr<wire::Message> challenge = wire::Decode(step.frame);
  ASSERT_THAT(challenge.status(), IsOk());
  EXPECT_EQ(challenge->type, wire::MessageType::kChallenge);
  EXPECT_EQ(challenge->name, "decode-0");

  step = p.client.Receive(step.frame, p.now);
  ASSERT_EQ(step.kind, Kind::kProven) << step.status;
  EXPECT_EQ(p.client.peer_name(), "decode-0");
  EXPECT_EQ(p.client.peer_incarnation(), 22u);
  EXPECT_EQ(p.client.stage(), Stage::kAwaitWelcome);
  EXPECT_EQ(p.client.max_frame(), wire::kMaxMessageBytes);
  EXPECT_EQ(p.client.DescribePeer(), absl::StrCat("'decode-0' at ", kServerAddress));

  const std::string proof = p.client.Proof(Descriptor("prefill-0"));
  // Sealed: it does not decode as a plain frame.
  EXPECT_FALSE(wire::Decode(proof).ok());
  step = p.server.Receive(proof, p.now);
  ASSERT_EQ(step.kind, Kind::kAuthenticated) << step.status;
  EXPECT_EQ(step.descriptor, Descriptor("prefill-0"));
  EXPECT_EQ(p.server.peer_name(), "prefill-0");
  EXPECT_EQ(p.server.peer_incarnation(), 11u);
  EXPECT_EQ(p.server.stage(), Stage::kAuthenticated);

  const std::string welcome = p.server.Welcome(Descriptor("decode-0"));
  p.server.Finish();
  EXPECT_EQ(p.server.stage(), Stage::kDone);
  EXPECT_EQ(p.server.deadline(), absl::InfiniteFuture());
  step = p.client.Receive(welcome, p.now);
  ASSERT_EQ(step.kind, Kind::kAuthenticated) << step.status;
  EXPECT_EQ(step.descriptor, Descriptor("decode-0"));
  p.client.Finish();

  // Each side's send key is the other's receive key, and the two
  // directions differ.
  EXPECT_FALSE(p.client.send_key().empty());
  EXPECT_EQ(p.client.send_key(), p.server.receive_key());
  EXPECT_EQ(p.client.receive_key(), p.server.send_key());
  EXPECT_NE(p.client.send_key(), p.client.receive_key());
  EXPECT_FALSE(p.client.rejected());
  EXPECT_FALSE(p.server.rejected());
}

TEST(HandshakeTest, AfterTheHandshakeFramesAreSealedEitherWayInOrder) {
  Pair p;
  p.Complete();
  for (int i = 0; i < 3; ++i) {
    const std::string text = absl::StrCat("blocks ", i, " ready");
    Handshake::Step step =
        p.server.Receive(p.client.Seal({.type = wire::MessageType::kNotify, .text = text}), p.now);
    ASSERT_EQ(step.kind, Kind::kMessage) << step.status;
    EXPECT_EQ(step.message.type, wire::MessageType::kNotify);
    EXPECT_EQ(step.message.text, text);
    step = p.client.Receive(p.server.Seal({.type = wire::MessageType::kPing}), p.now);
    ASSERT_EQ(step.kind, Kind::kMessage) << step.status;
    EXPECT_EQ(step.message.type, wire::MessageType::kPing);
  }
}

TEST(HandshakeTest, TheClientAuthenticatedMayTakeMessagesBeforeItFinishes) {
  // The server's side came up first: it may notify while the client's data
  // path is still wiring up (stage kAuthenticated).
  Pair p;
  Handshake::Step step = p.client.Receive(p.Welcome(), p.now);
  ASSERT_EQ(step.kind, Kind::kAuthenticated);
  step = p.client.Receive(
      p.server.Seal({.type = wire::MessageType::kNotify, .text = "early"}), p.now);
  ASSERT_EQ(step.kind, Kind::kMessage) << step.status;
  EXPECT_EQ(step.message.text, "early");
  EXPECT_EQ(p.client.stage(), Stage::kAuthenticated);
}

TEST(HandshakeTest, ServerProofUnderAnotherSecretIsRefusedByTheClient) {
  Pair p;
  p.server = MakeServer("another secret");
  Handshake::Step step = p.client.Receive(p.Challenge(), p.now);
  ASSERT_EQ(step.kind, Kind::kRefuse);
  EXPECT_THAT(step.status,
              StatusIs(absl::StatusCode::kUnauthenticated,
                       absl::StrCat("shared secret mismatch: the agent 'decode-0' at ",
                                    kServerAddress)));
  EXPECT_TRUE(p.client.peer_name().empty());  // not proven
  // The client's REJECT goes unsealed; the server reports it with its code.
  const std::string reject = p.client.Refuse(step.status);
  step = p.server.Receive(reject, p.now);
  ASSERT_EQ(step.kind, Kind::kRejected);
  EXPECT_THAT(step.status,
              StatusIs(absl::StatusCode::kUnauthenticated,
                       absl::StrCat("handshake with ", kClientAddress,
                                    ": the peer refused the connection: shared secret mismatch")));
  EXPECT_THAT(step.reason, HasSubstr("could not prove it knows this agent's secret"));
  EXPECT_TRUE(p.server.rejected());
}

TEST(HandshakeTest, ClientProofThatDoesNotMatchIsRefusedByTheServer) {
  // A peer that holds the session key (it was sealed properly) but whose
  // proof is wrong.
  Pair p;
  ASSERT_EQ(p.client.Receive(p.Challenge(), p.now).kind, Kind::kProven);
  const std::string forged =
      p.client.Seal({.type = wire::MessageType::kProof,
                     .proof = std::string(wire::kProofBytes, 'x'),
                     .agent = Descriptor("prefill-0")});
  Handshake::Step step = p.server.Receive(forged, p.now);
  ASSERT_EQ(step.kind, Kind::kRefuse);
  EXPECT_THAT(step.status,
              StatusIs(absl::StatusCode::kUnauthenticated,
                       absl::StrCat("shared secret mismatch: the agent 'prefill-0' at ",
                                    kClientAddress, " could not prove")));
  EXPECT_TRUE(p.server.peer_name().empty());
}

TEST(HandshakeTest, ProofSealedUnderAnotherKeyIsRefusedByTheServer) {
  // What a client without the secret can send after the CHALLENGE: a PROOF
  // sealed under a key it made up.
  Pair p;
  ASSERT_EQ(p.server.Receive(p.client.Hello(), p.now).kind, Kind::kSend);
  wire::HandshakeTranscript guessed;
  guessed.client_name = "prefill-0";
  const wire::SessionKeys keys = wire::DeriveSessionKeys("wrong secret", guessed);
  const std::string proof = wire::SealFrame(
      keys.client_to_server, 0,
      wire::Encode({.type = wire::MessageType::kProof,
                    .proof = std::string(wire::kProofBytes, 'p'),
                    .agent = Descriptor("prefill-0")}));
  Handshake::Step step = p.server.Receive(proof, p.now);
  ASSERT_EQ(step.kind, Kind::kRefuse);
  EXPECT_THAT(step.status,
              StatusIs(absl::StatusCode::kUnauthenticated,
                       absl::StrCat("shared secret mismatch: ", kClientAddress,
                                    " (unauthenticated, claims to be 'prefill-0') could not "
                                    "prove it knows this agent's secret: frame 0 failed its "
                                    "integrity check")));
  EXPECT_TRUE(p.server.peer_name().empty());
}

TEST(HandshakeTest, ChallengeForAnotherClientIsRefused) {
  // A CHALLENGE replayed from another connection: its proof covers that
  // client's nonce.
  Pair p;
  const std::string challenge = p.Challenge();
  Handshake other = MakeClient();
  Handshake::Step step = other.Receive(challenge, p.now);
  ASSERT_EQ(step.kind, Kind::kRefuse);
  EXPECT_THAT(step.status, StatusIs(absl::StatusCode::kUnauthenticated,
                                    "the agent 'decode-0' at 10.0.0.1:5000 could not prove"));
}

TEST(HandshakeTest, GarbledFramesAreRefusedNamingTheField) {
  {
    Handshake server = MakeServer();
    Handshake::Step step = server.Receive("GET / HTTP/1.1\r\n\r\n", kAccepted);
    ASSERT_EQ(step.kind, Kind::kRefuse);
    EXPECT_THAT(step.status,
                StatusIs(absl::StatusCode::kInvalidArgument, "bad handshake message: bad magic"));
  }
  {
    std::string hello = Hello("prefill-0");
    hello.resize(hello.size() - 1);  // the header still announces the full body
    Handshake server = MakeServer();
    Handshake::Step step = server.Receive(hello, kAccepted);
    ASSERT_EQ(step.kind, Kind::kRefuse);
    EXPECT_THAT(step.status, StatusIs(absl::StatusCode::kInvalidArgument,
                                      "bad handshake message: header announces a"));
  }
  {
    // A CHALLENGE whose proof is cut short, with a consistent header.
    Pair p;
    wire::Message challenge = *wire::Decode(p.Challenge());
    challenge.proof.resize(wire::kProofBytes - 1);
    Handshake::Step step = p.client.Receive(wire::Encode(challenge), p.now);
    ASSERT_EQ(step.kind, Kind::kRefuse);
    EXPECT_THAT(step.status,
                StatusIs(absl::StatusCode::kInvalidArgument, "challenge.proof has 31 bytes"));
  }
  {
    // Sealed properly, but not a frame inside.
    Pair p;
    ASSERT_EQ(p.client.Receive(p.Challenge(), p.now).kind, Kind::kProven);
    const std::string garbage =
        wire::SealFrame(p.client.send_key(), 0, std::string(wire::kHeaderBytes, 'z'));
    Handshake::Step step = p.server.Receive(garbage, p.now);
    ASSERT_EQ(step.kind, Kind::kRefuse);
    EXPECT_THAT(step.status,
                StatusIs(absl::StatusCode::kInvalidArgument, "bad handshake message: bad magic"));
  }
}

TEST(HandshakeTest, GarbledSealedFrameAfterTheHandshakeDropsThePeer) {
  Pair p;
  p.Complete();
  std::string bad = wire::Encode({.type = wire::MessageType::kNotify, .text = "x"});
  bad[6] = 99;  // an unknown type, sealed properly (the WELCOME was frame 0)
  const std::string sealed = wire::SealFrame(p.server.send_key(), 1, bad);
  Handshake::Step step = p.client.Receive(sealed, p.now);
  ASSERT_EQ(step.kind, Kind::kDrop);
  EXPECT_THAT(step.status, StatusIs(absl::StatusCode::kUnavailable,
                                    "peer 'decode-0' sent a bad message: "));
  EXPECT_THAT(step.status.message(), HasSubstr("unknown message type 99"));
}

TEST(HandshakeTest, WrongMessageForTheStageIsRefused) {
  {
    Handshake server = MakeServer();
    Handshake::Step step =
        server.Receive(wire::Encode({.type = wire::MessageType::kPing}), kAccepted);
    ASSERT_EQ(step.kind, Kind::kRefuse);
    EXPECT_THAT(step.status,
                StatusIs(absl::StatusCode::kInvalidArgument,
                         "PING where HELLO was expected (before authentication)"));
  }
  {
    Handshake client = MakeClient();
    Handshake::Step step = client.Receive(Hello("decode-0"), kAccepted);
    ASSERT_EQ(step.kind, Kind::kRefuse);
    EXPECT_THAT(step.status,
                StatusIs(absl::StatusCode::kInvalidArgument,
                         "HELLO where CHALLENGE was expected (before authentication)"));
  }
  {
    // A second HELLO, sealed, where the server waits for the PROOF.
    Pair p;
    ASSERT_EQ(p.client.Receive(p.Challenge(), p.now).kind, Kind::kProven);
    Handshake::Step step = p.server.Receive(p.client.Seal(
        {.type = wire::MessageType::kHello, .name = "prefill-0", .incarnation = 11,
         .nonce = std::string(wire::kNonceBytes, 'h')}), p.now);
    ASSERT_EQ(step.kind, Kind::kRefuse);
    EXPECT_THAT(step.status, StatusIs(absl::StatusCode::kInvalidArgument,
                                      "HELLO where PROOF was expected (before authentication)"));
  }
  {
    // The server proved itself: the client's refusal names no suspicion.
    Pair p;
    p.server.Receive(p.Proof(), p.now);
    Handshake::Step step =
        p.client.Receive(p.server.Seal({.type = wire::MessageType::kPing}), p.now);
    ASSERT_EQ(step.kind, Kind::kRefuse);
    EXPECT_EQ(step.status,
              absl::InvalidArgumentError("PING where WELCOME was expected"));
  }
}

TEST(HandshakeTest, ReplayedOrReorderedSealedFramesAreRefused) {
  {
    // The PROOF replayed while the server finishes: frame 0 again.
    Pair p;
    const std::string proof = p.Proof();
    ASSERT_EQ(p.server.Receive(proof, p.now).kind, Kind::kAuthenticated);
    Handshake::Step step = p.server.Receive(proof, p.now);
    ASSERT_EQ(step.kind, Kind::kRefuse);
    EXPECT_THAT(step.status,
                StatusIs(absl::StatusCode::kUnauthenticated,
                         "shared secret mismatch: 'prefill-0' at 10.0.0.2:40000 could not "
                         "prove it knows this agent's secret: frame 1 failed its integrity"));
  }
  {
    // After the handshake: a replayed frame and a skipped one.
    Pair p;
    p.Complete();
    const std::string first = p.server.Seal({.type = wire::MessageType::kPing});
    const std::string second = p.server.Seal({.type = wire::MessageType::kNotify, .text = "2"});
    ASSERT_EQ(p.client.Receive(first, p.now).kind, Kind::kMessage);
    Handshake::Step step = p.client.Receive(first, p.now);
    ASSERT_EQ(step.kind, Kind::kDrop);
    EXPECT_THAT(step.status, StatusIs(absl::StatusCode::kUnavailable,
                                      "peer 'decode-0': frame 2 failed its integrity check"));
    // (The replay was not counted: the next frame in order still opens.)
    EXPECT_EQ(p.client.Receive(second, p.now).kind, Kind::kMessage);
  }
  {
    Pair p;
    p.Complete();
    const std::string first = p.server.Seal({.type = wire::MessageType::kPing});
    const std::string second = p.server.Seal({.type = wire::MessageType::kPing});
    Handshake::Step step = p.client.Receive(second, p.now);
    ASSERT_EQ(step.kind, Kind::kDrop);
    EXPECT_THAT(step.status, StatusIs(absl::StatusCode::kUnavailable,
                                      "peer 'decode-0': frame 1 failed its integrity check"));
  }
  {
    // A frame the client sealed, reflected back to it.
    Pair p;
    p.Complete();
    Handshake::Step step =
        p.client.Receive(p.client.Seal({.type = wire::MessageType::kPing}), p.now);
    ASSERT_EQ(step.kind, Kind::kDrop);
    EXPECT_THAT(step.status, StatusIs(absl::StatusCode::kUnavailable, "integrity check"));
  }
}

TEST(HandshakeTest, EveryBitFlipInTheSealedProofIsRefused) {
  const size_t size = Pair().Proof().size();
  for (size_t byte = 0; byte < size; ++byte) {
    Pair p;
    const std::string proof = p.Proof();
    ASSERT_EQ(proof.size(), size);
    const int bit = static_cast<int>(byte % 8);
    Handshake::Step step = p.server.Receive(FlipBit(proof, byte, bit), p.now);
    ASSERT_EQ(step.kind, Kind::kRefuse) << "byte " << byte;
    EXPECT_THAT(step.status, StatusIs(absl::StatusCode::kUnauthenticated,
                                      "shared secret mismatch"))
        << "byte " << byte;
    EXPECT_EQ(p.server.stage(), Stage::kAwaitProof);
    // The untouched PROOF still authenticates this connection.
    EXPECT_EQ(p.server.Receive(proof, p.now).kind, Kind::kAuthenticated) << "byte " << byte;
  }
}

TEST(HandshakeTest, BitFlipsInSealedFramesAfterTheHandshakeDropThePeer) {
  const std::string notify_text = "the KV blocks 1..8 are ready";
  for (size_t byte : {size_t{0}, size_t{6}, size_t{9}, size_t{14}, size_t{20}, size_t{45},
                      size_t{60}, size_t{71}}) {
    Pair p;
    p.Complete();
    const std::string frame =
        p.server.Seal({.type = wire::MessageType::kNotify, .text = notify_text});
    ASSERT_LT(byte, frame.size());
    Handshake::Step step = p.client.Receive(FlipBit(frame, byte, 2), p.now);
    ASSERT_EQ(step.kind, Kind::kDrop) << "byte " << byte;
    EXPECT_THAT(step.status,
                StatusIs(absl::StatusCode::kUnavailable, "peer 'decode-0': frame 1 failed"))
        << "byte " << byte;
  }
}

TEST(HandshakeTest, DeadlinesNameTheTimeoutThatPassed) {
  Handshake server = MakeServer();
  EXPECT_THAT(server.Expired(kAccepted + absl::Milliseconds(999)), IsOk());
  EXPECT_THAT(server.Expired(kAccepted + absl::Seconds(1)),
              StatusIs(absl::StatusCode::kDeadlineExceeded,
                       "no complete HELLO within 1s of the accept (hello_timeout)"));
  // The HELLO in time: the whole handshake's deadline, from the accept.
  ASSERT_EQ(server.Receive(Hello("prefill-0"), kAccepted + absl::Milliseconds(500)).kind,
            Kind::kSend);
  EXPECT_EQ(server.deadline(), kAccepted + absl::Seconds(10));
  EXPECT_THAT(server.Expired(kAccepted + absl::Seconds(9)), IsOk());
  EXPECT_THAT(server.Expired(kAccepted + absl::Seconds(10)),
              StatusIs(absl::StatusCode::kDeadlineExceeded,
                       "no authenticated handshake within 10s (handshake_timeout)"));

  // A hello_timeout no shorter than the handshake's is the handshake's.
  Handshake patient = MakeServer("secret", absl::Seconds(30));
  EXPECT_EQ(patient.deadline(), kAccepted + absl::Seconds(10));
  EXPECT_THAT(patient.Expired(kAccepted + absl::Seconds(10)),
              StatusIs(absl::StatusCode::kDeadlineExceeded,
                       "no authenticated handshake within 10s (handshake_timeout)"));

  Handshake client = MakeClient();
  EXPECT_THAT(client.Expired(kAccepted + absl::Seconds(9)), IsOk());
  EXPECT_THAT(client.Expired(kAccepted + absl::Seconds(10)),
              StatusIs(absl::StatusCode::kDeadlineExceeded,
                       "no handshake answer from 10.0.0.1:5000 within the timeout"));

  Pair p;
  p.Complete();
  EXPECT_THAT(p.client.Expired(kAccepted + absl::Hours(1)), IsOk());
  EXPECT_THAT(p.server.Expired(kAccepted + absl::Hours(1)), IsOk());
}

TEST(HandshakeTest, RejectFromTheServerCarriesItsCodeAndEscapedReason) {
  Handshake server = MakeServer();
  Handshake client = MakeClient();
  const std::string reject = server.Refuse(
      absl::ResourceExhaustedError("64 handshakes pending\n(max_pending_handshakes)\x01"));
  Handshake::Step step = client.Receive(reject, kAccepted);
  ASSERT_EQ(step.kind, Kind::kRejected);
  EXPECT_THAT(step.status,
              StatusIs(absl::StatusCode::kResourceExhausted,
                       "connect to 10.0.0.1:5000: the peer refused the connection: 64 "
                       "handshakes pending\\x0a(max_pending_handshakes)\\x01"));
  EXPECT_EQ(step.reason, "64 handshakes pending\\x0a(max_pending_handshakes)\\x01");
  EXPECT_TRUE(client.rejected());
  EXPECT_EQ(client.stage(), Stage::kAwaitChallenge);
  // Nothing is taken after it.
  step = client.Receive(wire::Encode({.type = wire::MessageType::kPing}), kAccepted);
  ASSERT_EQ(step.kind, Kind::kDrop);
  EXPECT_THAT(step.status, StatusIs(absl::StatusCode::kFailedPrecondition, "already failed"));
}

TEST(HandshakeTest, RejectComesUnsealedUntilFinish) {
  {
    // The server refuses the client's descriptor: its REJECT is unsealed,
    // and the client (sealed since the CHALLENGE) takes it.
    Pair p;
    Handshake::Step step = p.server.Receive(p.Proof(), p.now);
    ASSERT_EQ(step.kind, Kind::kAuthenticated);
    const std::string reject =
        p.server.Refuse(absl::FailedPreconditionError("pool 'kv': layouts differ"));
    EXPECT_EQ(reject, p.server.Seal({.type = wire::MessageType::kReject,
                                     .code = static_cast<uint32_t>(
                                         absl::StatusCode::kFailedPrecondition),
                                     .text = "pool 'kv': layouts differ"}));
    step = p.client.Receive(reject, p.now);
    ASSERT_EQ(step.kind, Kind::kRejected);
    EXPECT_THAT(step.status, StatusIs(absl::StatusCode::kFailedPrecondition,
                                      "the peer refused the connection: pool 'kv': layouts "
                                      "differ"));
  }
  {
    // The client authenticated the server and waits for its data path.
    Pair p;
    ASSERT_EQ(p.client.Receive(p.Welcome(), p.now).kind, Kind::kAuthenticated);
    Handshake::Step step = p.client.Receive(
        wire::Encode({.type = wire::MessageType::kReject,
                      .code = static_cast<uint32_t>(absl::StatusCode::kAlreadyExists),
                      .text = "an agent named 'prefill-0' is already connected"}),
        p.now);
    ASSERT_EQ(step.kind, Kind::kRejected);
    EXPECT_THAT(step.status, StatusIs(absl::StatusCode::kAlreadyExists,
                                      "is already connected"));
  }
  {
    // After Finish an unsealed REJECT is a forgery.
    Pair p;
    p.Complete();
    Handshake::Step step = p.client.Receive(
        wire::Encode({.type = wire::MessageType::kReject,
                      .code = static_cast<uint32_t>(absl::StatusCode::kInternal),
                      .text = "forged"}),
        p.now);
    ASSERT_EQ(step.kind, Kind::kDrop);
    EXPECT_THAT(step.status,
                StatusIs(absl::StatusCode::kUnavailable,
                         "peer 'decode-0': a 26-byte frame is too short to be sealed"));
  }
}

TEST(HandshakeTest, OtherWireVersionIsRefused) {
  std::string hello = Hello("prefill-0");
  const uint16_t version = wire::kVersion + 1;
  std::memcpy(hello.data() + 4, &version, sizeof(version));
  Handshake server = MakeServer();
  Handshake::Step step = server.Receive(hello, kAccepted);
  ASSERT_EQ(step.kind, Kind::kRefuse);
  EXPECT_THAT(step.status,
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       absl::StrCat("bad handshake message: wire version ", version,
                                    " is not supported (this build speaks ", wire::kVersion)));
  // The same answer to the client.
  Pair p;
  std::string challenge = p.Challenge();
  std::memcpy(challenge.data() + 4, &version, sizeof(version));
  step = p.client.Receive(challenge, p.now);
  ASSERT_EQ(step.kind, Kind::kRefuse);
  EXPECT_THAT(step.status,
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       absl::StrCat("wire version ", version, " is not supported")));
}

TEST(HandshakeTest, NamesAreChecked) {
  {
    Handshake server = MakeServer();
    Handshake::Step step = server.Receive(Hello("prefill 0"), kAccepted);
    ASSERT_EQ(step.kind, Kind::kRefuse);
    EXPECT_THAT(step.status, StatusIs(absl::StatusCode::kInvalidArgument,
                                      "bad handshake message: agent name"));
    EXPECT_TRUE(server.claimed_name().empty());
  }
  {
    // The client's descriptor names another agent than its proof.
    Pair p;
    Handshake::Step step = p.server.Receive(p.Proof("mallory"), p.now);
    ASSERT_EQ(step.kind, Kind::kRefuse);
    EXPECT_EQ(step.status, absl::InvalidArgumentError(
                               "the descriptor names agent 'mallory', the handshake 'prefill-0'"));
    EXPECT_EQ(p.server.stage(), Stage::kAwaitProof);
  }
  {
    // The server's WELCOME names another agent than its CHALLENGE.
    Pair p;
    Handshake::Step step = p.client.Receive(p.Welcome("decode-1"), p.now);
    ASSERT_EQ(step.kind, Kind::kRefuse);
    EXPECT_EQ(step.status, absl::InvalidArgumentError(
                               "the descriptor names agent 'decode-1', the handshake 'decode-0'"));
    // Refused: the REJECT reaches the server, which has finished already.
    const std::string reject = p.client.Refuse(step.status);
    step = p.server.Receive(reject, p.now);
    ASSERT_EQ(step.kind, Kind::kDrop);  // unsealed after Finish
  }
}

TEST(HandshakeTest, RefusedHandshakeTakesNothingMore) {
  Pair p;
  ASSERT_FALSE(p.Challenge().empty());
  const std::string reject = p.server.Refuse(absl::UnavailableError("shutting down"));
  EXPECT_THAT(wire::Decode(reject).status(), IsOk());  // unsealed
  Handshake::Step step = p.server.Receive(p.client.Hello(), p.now);
  ASSERT_EQ(step.kind, Kind::kDrop);
  EXPECT_THAT(step.status,
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       "the handshake with 10.0.0.2:40000 (unauthenticated, claims to be "
                       "'prefill-0') already failed"));
}

}  // namespace
}  // namespace kvferry::internal
