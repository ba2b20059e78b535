// internal::Handshake: one control connection's side of the authenticated
// handshake (HELLO, CHALLENGE, PROOF, WELCOME or REJECT; src/wire/message.h)
// and, from the CHALLENGE on, the sealing of every frame either way
// (src/wire/auth.h). Pure logic over byte strings: no sockets, no UCX.
//
// It owns the transcript, the stage, the session keys, both sequence numbers
// and the deadline. Receive() takes each frame the peer sent and says what to
// do with it; frames to send come back as bytes for the caller to queue, in
// the order they are returned. What needs the agent stays with the caller and
// passes through explicit inputs: this agent's descriptor for the PROOF and
// the WELCOME, the judgement of the peer's descriptor, and which names may
// connect.
//
// Guarantees:
// - No descriptor is parsed from a peer before it proved that it knows the
//   secret; the peer's descriptor must name the agent the proof was for.
// - Every frame after the CHALLENGE is sealed and checked, in order (each
//   direction counts its own sequence), except REJECT, which is sent and
//   taken unsealed until Finish().
// - Every refusal is an absl::Status whose code is the one the peer is told
//   (Refuse()) and whose message names the value at fault.
//
// Thread-compatible: owned by one connection, under its owner's lock.
#ifndef KVFERRY_SRC_HANDSHAKE_H_
#define KVFERRY_SRC_HANDSHAKE_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "src/wire/auth.h"
#include "src/wire/message.h"

namespace kvferry::internal {

class Handshake {
 public:
  enum class Stage {
    kAwaitHello,      // server: nothing received yet
    kAwaitChallenge,  // client: HELLO sent
    kAwaitProof,      // server: CHALLENGE sent
    kAwaitWelcome,    // client: the server proved itself; PROOF due or sent
    kAuthenticated,   // the peer proved itself and sent its descriptor: the
                      // owner judges it, then Finish() or Refuse()
    kDone,            // Finish(): only sealed frames either way
  };

  // This agent, as the handshake presents it.
  struct Local {
    std::string name;
    uint64_t incarnation = 0;
    // The shared secret. Empty is allowed: the peer then proves only that
    // its secret is empty too.
    std::string secret;
  };

  // What to do with a received frame.
  struct Step {
    enum class Kind {
      // Queue `frame` (the server's CHALLENGE).
      kSend,
      // Client: the server proved that it knows the secret (peer_name(),
      // peer_incarnation()). The owner applies its own rules to that name,
      // then sends Proof(its descriptor) or refuses.
      kProven,
      // The peer's PROOF (server) or WELCOME (client) was taken: `descriptor`
      // is the peer's, naming peer_name(). The owner judges it; then the
      // server sends Welcome(its descriptor); both Finish() or refuse.
      kAuthenticated,
      // Refuse the handshake with `status` (Refuse() gives the REJECT).
      kRefuse,
      // The peer sent a REJECT: close with `status` (the REJECT's code; the
      // message names the peer's address and `reason`). Nothing is due to
      // the peer.
      kRejected,
      // After authentication: `message`, opened and decoded, for the owner.
      kMessage,
      // After Finish(): the frame failed its seal or its decoding; drop the
      // peer with `status` (kUnavailable). After Refuse() or a REJECT every
      // frame is dropped (kFailedPrecondition).
      kDrop,
    };
    Kind kind = Kind::kDrop;
    std::string frame;                // kSend
    absl::Status status;              // kRefuse, kRejected, kDrop
    std::string reason;               // kRejected: the peer's text, escaped
    wire::AgentDescriptor descriptor;  // kAuthenticated
    wire::Message message;             // kMessage
  };

  // A placeholder: assign Client() or Server() before use.
  Handshake() = default;
  Handshake(Handshake&&) = default;
  Handshake& operator=(Handshake&&) = default;

  // The connecting side, talking to `peer_address` (for messages only).
  // `nonce` is kNonceBytes from wire::RandomNonce(); the handshake must be
  // done by `deadline`. Starts at kAwaitChallenge: send Hello() first.
  static Handshake Client(Local local, std::string peer_address, std::string nonce,
                          absl::Time deadline);
  // The accepting side, for a connection accepted at `accepted`: the HELLO is
  // due within min(hello_timeout, handshake_timeout), the whole handshake
  // within handshake_timeout, both from `accepted`.
  static Handshake Server(Local local, std::string peer_address, absl::Time accepted,
                          absl::Duration hello_timeout, absl::Duration handshake_timeout);

  // Client: the HELLO frame (unsealed).
  std::string Hello() const;

  // Takes one frame the peer sent (as framed by the connection), at `now`.
  Step Receive(absl::string_view frame, absl::Time now);

  // Client, after kProven: the sealed PROOF carrying `self`.
  // REQUIRES: stage() == kAwaitWelcome, once.
  std::string Proof(const wire::AgentDescriptor& self);
  // Server, after kAuthenticated: the sealed WELCOME carrying `self`.
  std::string Welcome(const wire::AgentDescriptor& self);
  // The REJECT frame (unsealed) telling the peer `why` (its code and
  // message). Nothing is taken from the peer after it.
  // REQUIRES: !why.ok().
  std::string Refuse(const absl::Status& why);
  // The owner finished the connection: stage() is kDone, no deadline.
  void Finish();

  // `message` encoded for this connection, sealed once the keys exist (after
  // the CHALLENGE) unless it is a REJECT. Each sealed frame takes the next
  // send sequence number: queue them in the order they were made.
  std::string Seal(const wire::Message& message);

  // Before deadline(): OK. After it, kDeadlineExceeded naming the timeout
  // that passed (hello_timeout, handshake_timeout, or the client's).
  absl::Status Expired(absl::Time now) const;
  absl::Time deadline() const { return deadline_; }

  // The largest frame to accept from the peer next: wire::kMaxHelloFrameBytes
  // until it proved itself (wire::kMaxProofFrameBytes for the server's
  // PROOF), wire::kMaxMessageBytes after.
  size_t max_frame() const;

  Stage stage() const { return stage_; }
  bool is_client() const { return client_; }
  // The peer's agent name and incarnation, once its proof checked out (the
  // client: the CHALLENGE's; the server: the PROOF's); empty / 0 before.
  const std::string& peer_name() const { return peer_name_; }
  uint64_t peer_incarnation() const { return peer_incarnation_; }
  // Server: the name a HELLO claimed, proven or not (empty before it).
  const std::string& claimed_name() const;
  // Server: when the CHALLENGE went out (InfiniteFuture before).
  absl::Time challenged() const { return challenged_; }
  // The peer sent a REJECT.
  bool rejected() const { return rejected_; }
  // "'name' at address" once proven; else "address (unauthenticated)", with
  // the name a HELLO claimed.
  std::string DescribePeer() const;

  // The session keys of this side's two directions (empty before the
  // CHALLENGE): offer tickets and kernel-copy probes are made under them.
  const std::string& send_key() const;
  const std::string& receive_key() const;

 private:
  Step Advance(wire::Message message, absl::Time now);
  Step Refusal(absl::Status why);
  absl::Status SecretMismatch(absl::string_view name) const;
  absl::Status CheckDescriptorName(const wire::AgentDescriptor& descriptor) const;
  std::string SealFrame(std::string frame);

  bool client_ = false;
  Local local_;
  std::string peer_address_;
  Stage stage_ = Stage::kAwaitHello;
  wire::HandshakeTranscript transcript_;
  bool sealed_ = false;  // the keys exist: frames but REJECT are sealed
  wire::SessionKeys keys_;
  uint64_t send_sequence_ = 0;
  uint64_t receive_sequence_ = 0;
  // Server: when accepted, and the whole handshake's timeout from then.
  absl::Time accepted_ = absl::InfinitePast();
  absl::Duration hello_timeout_ = absl::InfiniteDuration();
  absl::Duration handshake_timeout_ = absl::InfiniteDuration();
  absl::Time deadline_ = absl::InfiniteFuture();
  absl::Time challenged_ = absl::InfiniteFuture();
  std::string peer_name_;
  uint64_t peer_incarnation_ = 0;
  bool rejected_ = false;
  bool failed_ = false;  // refused or rejected: nothing more is taken
};

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_HANDSHAKE_H_
