#include "src/handshake.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "src/end_reason_internal.h"

namespace kvferry::internal {

namespace {

using wire::MessageType;

const std::string& Empty() {
  static const std::string* const empty = new std::string();
  return *empty;
}

// Text a peer chose (a REJECT reason), made safe for a log line or a
// status: at most 512 bytes, control bytes and non-ASCII escaped, so it can
// neither forge log lines nor reach a terminal.
std::string PeerText(absl::string_view text) {
  constexpr size_t kMax = 512;
  std::string out;
  for (char ch : text.substr(0, kMax)) {
    const unsigned char c = static_cast<unsigned char>(ch);
    if (c >= 0x20 && c < 0x7f && c != '\\') {
      out.push_back(ch);
    } else {
      absl::StrAppend(&out, "\\x", absl::Hex(c, absl::kZeroPad2));
    }
  }
  if (text.size() > kMax) absl::StrAppend(&out, "... (", text.size(), " bytes)");
  return out;
}

}  // namespace

Handshake Handshake::Client(Local local, std::string peer_address, std::string nonce,
                            absl::Time deadline) {
  Handshake h;
  h.client_ = true;
  h.stage_ = Stage::kAwaitChallenge;
  h.transcript_.client_name = local.name;
  h.transcript_.client_incarnation = local.incarnation;
  h.transcript_.client_nonce = std::move(nonce);
  h.local_ = std::move(local);
  h.peer_address_ = std::move(peer_address);
  h.deadline_ = deadline;
  return h;
}

Handshake Handshake::Server(Local local, std::string peer_address, absl::Time accepted,
                            absl::Duration hello_timeout, absl::Duration handshake_timeout) {
  Handshake h;
  h.client_ = false;
  h.stage_ = Stage::kAwaitHello;
  h.local_ = std::move(local);
  h.peer_address_ = std::move(peer_address);
  h.accepted_ = accepted;
  h.hello_timeout_ = hello_timeout;
  h.handshake_timeout_ = handshake_timeout;
  // Until the HELLO: hello_timeout (capped by handshake_timeout). Then the
  // whole handshake's, from the accept.
  h.deadline_ = accepted + std::min(hello_timeout, handshake_timeout);
  return h;
}

std::string Handshake::Hello() const {
  return wire::Encode({.type = MessageType::kHello,
                       .name = transcript_.client_name,
                       .incarnation = transcript_.client_incarnation,
                       .nonce = transcript_.client_nonce});
}

Handshake::Step Handshake::Receive(absl::string_view frame, absl::Time now) {
  if (failed_) {
    return {.kind = Step::Kind::kDrop,
            .status = absl::FailedPreconditionError(absl::StrCat(
                "the handshake with ", DescribePeer(), " already failed; a ",
                frame.size(), "-byte frame came after it"))};
  }
  const bool handshaking = stage_ != Stage::kDone;
  std::string opened;
  // During the handshake a REJECT comes unsealed: it may answer a frame of
  // ours that failed the peer's check.
  if (sealed_ && !(handshaking && wire::PeekFrameType(frame) ==
                                      static_cast<uint16_t>(MessageType::kReject))) {
    absl::StatusOr<std::string> inner = wire::OpenFrame(receive_key(), receive_sequence_, frame);
    if (!inner.ok()) {
      if (handshaking) {
        return Refusal(WithReason(
            absl::UnauthenticatedError(absl::StrCat(
                "shared secret mismatch: ", DescribePeer(),
                " could not prove it knows this agent's secret: ", inner.status().message())),
            EndReason::kUnauthenticated));
      }
      return {.kind = Step::Kind::kDrop,
              .status = absl::UnavailableError(
                  absl::StrCat("peer '", peer_name_, "': ", inner.status().message()))};
    }
    ++receive_sequence_;
    opened = *std::move(inner);
    frame = opened;
  }
  absl::StatusOr<wire::Message> message = wire::Decode(frame);
  if (!message.ok()) {
    if (handshaking) {
      return Refusal(absl::Status(message.status().code(),
                                  absl::StrCat("bad handshake message: ",
                                               message.status().message())));
    }
    return {.kind = Step::Kind::kDrop,
            .status = absl::UnavailableError(absl::StrCat(
                "peer '", peer_name_, "' sent a bad message: ", message.status().message()))};
  }
  // Once authenticated, the peer may already send what a connected peer
  // sends (its side came up first).
  if (handshaking &&
      (stage_ != Stage::kAuthenticated || message->type == MessageType::kReject)) {
    return Advance(*std::move(message), now);
  }
  return {.kind = Step::Kind::kMessage, .message = *std::move(message)};
}

Handshake::Step Handshake::Advance(wire::Message message, absl::Time now) {
  if (message.type == MessageType::kReject) {
    rejected_ = true;
    failed_ = true;
    absl::string_view text = message.text;
    EndReason tagged = TakeTextTag(&text);
    const auto code = static_cast<absl::StatusCode>(message.code);
    if (code == absl::StatusCode::kUnauthenticated) tagged = EndReason::kUnauthenticated;
    std::string reason = PeerText(text);
    absl::Status why = WithReason(
        absl::Status(code, absl::StrCat(client_ ? "connect to " : "handshake with ", peer_address_,
                                        ": the peer refused the connection: ", reason)),
        tagged);
    return {.kind = Step::Kind::kRejected, .status = std::move(why), .reason = std::move(reason)};
  }
  const MessageType expected = stage_ == Stage::kAwaitHello       ? MessageType::kHello
                               : stage_ == Stage::kAwaitChallenge ? MessageType::kChallenge
                               : stage_ == Stage::kAwaitProof     ? MessageType::kProof
                                                                  : MessageType::kWelcome;
  if (message.type != expected) {
    return Refusal(absl::InvalidArgumentError(absl::StrCat(
        wire::MessageTypeName(message.type), " where ", wire::MessageTypeName(expected),
        " was expected", peer_name_.empty() ? " (before authentication)" : "")));
  }
  wire::HandshakeTranscript& t = transcript_;
  switch (stage_) {
    case Stage::kAwaitHello: {
      absl::StatusOr<std::string> nonce = wire::RandomNonce();
      if (!nonce.ok()) return Refusal(nonce.status());
      t.client_name = std::move(message.name);
      t.client_incarnation = message.incarnation;
      t.client_nonce = std::move(message.nonce);
      t.server_name = local_.name;
      t.server_incarnation = local_.incarnation;
      t.server_nonce = *std::move(nonce);
      stage_ = Stage::kAwaitProof;
      // The HELLO came in time: the whole handshake's deadline from here.
      challenged_ = now;
      deadline_ = accepted_ + handshake_timeout_;
      std::string challenge = wire::Encode(
          {.type = MessageType::kChallenge,
           .name = local_.name,
           .incarnation = local_.incarnation,
           .nonce = t.server_nonce,
           .proof = wire::ComputeProof(local_.secret, wire::ProofRole::kServer, t)});
      // From here on both directions are sealed.
      keys_ = wire::DeriveSessionKeys(local_.secret, t);
      sealed_ = true;
      return {.kind = Step::Kind::kSend, .frame = std::move(challenge)};
    }
    case Stage::kAwaitChallenge:
      t.server_name = message.name;
      t.server_incarnation = message.incarnation;
      t.server_nonce = std::move(message.nonce);
      if (!wire::ProofMatches(local_.secret, wire::ProofRole::kServer, t, message.proof)) {
        return Refusal(SecretMismatch(message.name));
      }
      peer_name_ = std::move(message.name);  // proven by the CHALLENGE's proof
      peer_incarnation_ = message.incarnation;
      keys_ = wire::DeriveSessionKeys(local_.secret, t);
      sealed_ = true;
      stage_ = Stage::kAwaitWelcome;
      return {.kind = Step::Kind::kProven};
    case Stage::kAwaitProof:
      if (!wire::ProofMatches(local_.secret, wire::ProofRole::kClient, t, message.proof)) {
        return Refusal(SecretMismatch(t.client_name));
      }
      peer_name_ = t.client_name;  // authenticated from here on
      peer_incarnation_ = t.client_incarnation;
      [[fallthrough]];
    case Stage::kAwaitWelcome: {
      if (absl::Status named = CheckDescriptorName(message.agent); !named.ok()) {
        return Refusal(std::move(named));
      }
      stage_ = Stage::kAuthenticated;
      return {.kind = Step::Kind::kAuthenticated, .descriptor = std::move(message.agent)};
    }
    case Stage::kAuthenticated:  // only a REJECT gets here, handled above
    case Stage::kDone:
      break;
  }
  return Refusal(absl::InternalError(absl::StrCat(wire::MessageTypeName(message.type),
                                                  " reached a finished handshake")));
}

std::string Handshake::Proof(const wire::AgentDescriptor& self) {
  return SealFrame(wire::Encode(
      {.type = MessageType::kProof,
       .proof = wire::ComputeProof(local_.secret, wire::ProofRole::kClient, transcript_),
       .agent = self}));
}

std::string Handshake::Welcome(const wire::AgentDescriptor& self) {
  return SealFrame(wire::Encode({.type = MessageType::kWelcome, .agent = self}));
}

std::string Handshake::Refuse(const absl::Status& why) {
  failed_ = true;
  return wire::Encode({.type = MessageType::kReject,
                       .code = static_cast<uint32_t>(why.code()),
                       .text = TagText(ReasonOf(why), why.message())});
}

void Handshake::Finish() {
  stage_ = Stage::kDone;
  deadline_ = absl::InfiniteFuture();
}

std::string Handshake::Seal(const wire::Message& message) {
  std::string frame = wire::Encode(message);
  if (message.type == MessageType::kReject) return frame;
  return SealFrame(std::move(frame));
}

std::string Handshake::SealFrame(std::string frame) {
  if (!sealed_) return frame;
  return wire::SealFrame(send_key(), send_sequence_++, std::move(frame));
}

absl::Status Handshake::Expired(absl::Time now) const {
  if (now < deadline_) return absl::OkStatus();
  if (client_) {
    return absl::DeadlineExceededError(
        absl::StrCat("no handshake answer from ", peer_address_, " within the timeout"));
  }
  if (stage_ == Stage::kAwaitHello && hello_timeout_ < handshake_timeout_) {
    return absl::DeadlineExceededError(absl::StrCat("no complete HELLO within ",
                                                    absl::FormatDuration(hello_timeout_),
                                                    " of the accept (hello_timeout)"));
  }
  return absl::DeadlineExceededError(absl::StrCat("no authenticated handshake within ",
                                                  absl::FormatDuration(handshake_timeout_),
                                                  " (handshake_timeout)"));
}

size_t Handshake::max_frame() const {
  switch (stage_) {
    case Stage::kAwaitHello:
    case Stage::kAwaitChallenge:
      return wire::kMaxHelloFrameBytes;
    case Stage::kAwaitProof:
      return wire::kMaxProofFrameBytes;
    case Stage::kAwaitWelcome:
    case Stage::kAuthenticated:
    case Stage::kDone:
      break;
  }
  return wire::kMaxMessageBytes;
}

const std::string& Handshake::claimed_name() const {
  return client_ ? Empty() : transcript_.client_name;
}

std::string Handshake::DescribePeer() const {
  if (!peer_name_.empty()) return absl::StrCat("'", peer_name_, "' at ", peer_address_);
  if (!claimed_name().empty()) {
    return absl::StrCat(peer_address_, " (unauthenticated, claims to be '", claimed_name(),
                        "')");
  }
  return absl::StrCat(peer_address_, " (unauthenticated)");
}

const std::string& Handshake::send_key() const {
  return client_ ? keys_.client_to_server : keys_.server_to_client;
}

const std::string& Handshake::receive_key() const {
  return client_ ? keys_.server_to_client : keys_.client_to_server;
}

Handshake::Step Handshake::Refusal(absl::Status why) {
  return {.kind = Step::Kind::kRefuse, .status = std::move(why)};
}

absl::Status Handshake::SecretMismatch(absl::string_view name) const {
  return WithReason(
      absl::UnauthenticatedError(absl::StrCat("shared secret mismatch: the agent '", name, "' at ",
                                              peer_address_,
                                              " could not prove it knows this agent's secret")),
      EndReason::kUnauthenticated);
}

absl::Status Handshake::CheckDescriptorName(const wire::AgentDescriptor& descriptor) const {
  if (descriptor.name == peer_name_) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "the descriptor names agent '", descriptor.name, "', the handshake '", peer_name_, "'"));
}

}  // namespace kvferry::internal
