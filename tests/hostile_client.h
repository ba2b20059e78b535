// A raw TCP client that plays a hostile (or merely hand-rolled) kvferry peer
// in tests and fuzzers: it connects to 127.0.0.1:port, sends whatever bytes
// it is given, reads kvferry frames with a timeout and tells when (and how)
// the server closed the connection.
//
// Also the steps of the control handshake a client performs by hand (HELLO,
// reading the CHALLENGE and deriving the session keys, a PROOF under a secret
// of its choice, sealed, unsealed or sealed wrongly, reading the sealed
// WELCOME), sealed frames after the handshake (SealedSession), and
// CaptureDescriptor, which plays a listener for one Connect of a real agent to
// learn the descriptor that agent sends (a real worker address and real
// rkeys), so that a hand-made PROOF can carry UCX blobs that are valid.
//
// Frames after the CHALLENGE are sealed (src/wire/auth.h): an HMAC tag under
// a per-direction key, over a per-direction sequence number starting at 0
// (the PROOF is the client's frame 0, the WELCOME the server's). REJECT is
// the one frame sent unsealed during the handshake.
//
// No gtest dependency (the fuzzers include it). Thread-compatible.
#ifndef KVFERRY_TESTS_HOSTILE_CLIENT_H_
#define KVFERRY_TESTS_HOSTILE_CLIENT_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "kvferry/agent.h"
#include "src/wire/auth.h"
#include "src/wire/message.h"

namespace kvferry::test {

namespace wire = ::kvferry::internal::wire;

// A 12-byte frame header with any field values (little-endian, as on the wire).
inline std::string FrameHeader(uint16_t type, uint32_t body_length,
                               uint32_t magic = wire::kMagic,
                               uint16_t version = wire::kVersion) {
  std::string h(wire::kHeaderBytes, '\0');
  std::memcpy(h.data(), &magic, 4);
  std::memcpy(h.data() + 4, &version, 2);
  std::memcpy(h.data() + 6, &type, 2);
  std::memcpy(h.data() + 8, &body_length, 4);
  return h;
}

// Rewrites the body length of an encoded frame to what follows the header
// (after the frame was cut or grown).
inline std::string FixFrameLength(std::string frame) {
  if (frame.size() < wire::kHeaderBytes) return frame;
  const uint32_t length = static_cast<uint32_t>(frame.size() - wire::kHeaderBytes);
  std::memcpy(frame.data() + 8, &length, 4);
  return frame;
}

// One end's view of a sealed session: the key and the next sequence number
// of each direction. A client sends under client_to_server and receives
// under server_to_client; a server the other way round.
struct SealedSession {
  std::string send_key;
  std::string receive_key;
  uint64_t send_sequence = 0;
  uint64_t receive_sequence = 0;

  static SealedSession ForClient(const wire::SessionKeys& keys) {
    return {.send_key = keys.client_to_server, .receive_key = keys.server_to_client};
  }
  static SealedSession ForServer(const wire::SessionKeys& keys) {
    return {.send_key = keys.server_to_client, .receive_key = keys.client_to_server};
  }

  // Seals an encoded frame (wire::Encode) as the next frame this end sends.
  std::string Seal(std::string frame) {
    return wire::SealFrame(send_key, send_sequence++, std::move(frame));
  }
  std::string Seal(const wire::Message& message) { return Seal(wire::Encode(message)); }

  // Opens and decodes `frame` as the next frame from the other end. With
  // `plain_reject` (the handshake), an unsealed REJECT is accepted as it is.
  // kPermissionDenied for a frame that fails its check (the sequence does not
  // advance), kDataLoss for one that opens but does not decode.
  absl::StatusOr<wire::Message> Open(absl::string_view frame, bool plain_reject = true) {
    absl::StatusOr<std::string> inner = wire::OpenFrame(receive_key, receive_sequence, frame);
    if (!inner.ok()) {
      if (plain_reject &&
          wire::PeekFrameType(frame) == static_cast<uint16_t>(wire::MessageType::kReject)) {
        absl::StatusOr<wire::Message> reject = wire::Decode(frame);
        if (reject.ok()) return reject;
      }
      return inner.status();
    }
    ++receive_sequence;
    absl::StatusOr<wire::Message> m = wire::Decode(*inner);
    if (!m.ok()) {
      return absl::DataLossError(
          absl::StrCat("a sealed frame that does not decode: ", m.status().message()));
    }
    return m;
  }
};

class HostileClient {
 public:
  enum class Event {
    kFrame,      // a whole frame was read
    kClosed,     // the server closed (FIN) or reset (RST) the connection
    kTimeout,    // nothing (or only part of a frame) within the timeout
    kNotAFrame,  // the server sent bytes that are not a kvferry frame
    kBadSeal,    // a frame that failed its seal check (SealedSession::Open)
  };

  HostileClient() = default;
  // Takes ownership of a connected socket.
  explicit HostileClient(int fd) : fd_(fd) {}
  HostileClient(HostileClient&& other) noexcept
      : fd_(std::exchange(other.fd_, -1)),
        in_(std::move(other.in_)),
        reset_(other.reset_),
        eof_(other.eof_) {}
  HostileClient& operator=(HostileClient&& other) noexcept {
    if (this != &other) {
      Close();
      fd_ = std::exchange(other.fd_, -1);
      in_ = std::move(other.in_);
      reset_ = other.reset_;
      eof_ = other.eof_;
    }
    return *this;
  }
  HostileClient(const HostileClient&) = delete;
  HostileClient& operator=(const HostileClient&) = delete;
  ~HostileClient() { Close(); }

  // Connects (blocking) to 127.0.0.1:port. kUnavailable with the errno text.
  static absl::StatusOr<HostileClient> Connect(uint16_t port) { return ConnectFrom("", port); }

  // Connects (blocking) to 127.0.0.1:port from `source`, an address of
  // 127.0.0.0/8 (empty: the kernel's choice, 127.0.0.1). kInvalidArgument
  // for a source that is not an IPv4 address; kUnavailable with the errno
  // text for a bind or connect that fails.
  static absl::StatusOr<HostileClient> ConnectFrom(const std::string& source, uint16_t port) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return absl::UnavailableError(absl::StrCat("socket: ", std::strerror(errno)));
    HostileClient client(fd);
    if (!source.empty()) {
      sockaddr_in from = {};
      from.sin_family = AF_INET;
      if (inet_pton(AF_INET, source.c_str(), &from.sin_addr) != 1) {
        return absl::InvalidArgumentError(
            absl::StrCat("source address '", source, "' is not an IPv4 address"));
      }
      if (::bind(fd, reinterpret_cast<const sockaddr*>(&from), sizeof(from)) != 0) {
        return absl::UnavailableError(
            absl::StrCat("bind to ", source, ": ", std::strerror(errno)));
      }
    }
    sockaddr_in to = {};
    to.sin_family = AF_INET;
    to.sin_port = htons(port);
    to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int rc;
    do {
      rc = ::connect(fd, reinterpret_cast<const sockaddr*>(&to), sizeof(to));
    } while (rc != 0 && errno == EINTR);
    if (rc != 0) {
      return absl::UnavailableError(
          absl::StrCat("connect to 127.0.0.1:", port, ": ", std::strerror(errno)));
    }
    int one = 1;
    (void)::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return client;
  }

  int fd() const { return fd_; }
  // Hands the socket to the caller, who closes it; the client is left closed.
  int Release() { return std::exchange(fd_, -1); }
  bool open() const { return fd_ >= 0; }
  // Our end of the connection as the server sees it, "127.0.0.1:port".
  std::string local_address() const {
    sockaddr_in me = {};
    socklen_t len = sizeof(me);
    if (fd_ < 0 || ::getsockname(fd_, reinterpret_cast<sockaddr*>(&me), &len) != 0) return "";
    char ip[INET_ADDRSTRLEN] = {};
    ::inet_ntop(AF_INET, &me.sin_addr, ip, sizeof(ip));
    return absl::StrCat(ip, ":", ntohs(me.sin_port));
  }
  // The close was a reset (ECONNRESET), not an orderly FIN.
  bool reset_seen() const { return reset_; }
  // The server's end is known to be closed (FIN or RST seen).
  bool closed_by_server() const { return eof_; }

  // Sends every byte (blocking). False once the server has closed or reset
  // the connection (EPIPE, ECONNRESET); the rest is dropped.
  bool Send(absl::string_view bytes) {
    while (!bytes.empty() && fd_ >= 0) {
      ssize_t n = ::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL);
      if (n > 0) {
        bytes.remove_prefix(static_cast<size_t>(n));
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == ECONNRESET) reset_ = true;
      return false;
    }
    return bytes.empty();
  }
  // Half-closes: the server reads end-of-stream after what was sent.
  void ShutdownWrite() {
    if (fd_ >= 0) (void)::shutdown(fd_, SHUT_WR);
  }
  // Closes our end; with `reset`, abortively (SO_LINGER 0: the server sees RST).
  void Close(bool reset = false) {
    if (fd_ < 0) return;
    if (reset) {
      linger l = {1, 0};
      (void)::setsockopt(fd_, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
    }
    (void)::close(fd_);
    fd_ = -1;
  }

  // The next whole frame from the server (header included) into `frame`.
  Event ReadFrame(std::string* frame, absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + timeout;
    while (true) {
      absl::StatusOr<size_t> length = wire::FrameLength(in_);
      if (!length.ok()) return Event::kNotAFrame;
      if (*length != 0 && *length <= in_.size()) {
        frame->assign(in_, 0, *length);
        in_.erase(0, *length);
        return Event::kFrame;
      }
      if (eof_ || fd_ < 0) return Event::kClosed;
      const int64_t left_ms =
          std::max<int64_t>(0, absl::ToInt64Milliseconds(deadline - absl::Now()));
      pollfd p = {fd_, POLLIN, 0};
      int ready = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left_ms, 1 << 30)));
      if (ready < 0 && errno == EINTR) continue;
      if (ready == 0) return Event::kTimeout;
      char buf[64 << 10];
      ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
      if (n > 0) {
        in_.append(buf, static_cast<size_t>(n));
      } else if (n == 0) {
        eof_ = true;
      } else if (errno == ECONNRESET || errno == EPIPE) {
        reset_ = true;
        eof_ = true;
      } else if (errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK) {
        eof_ = true;
      }
    }
  }

  // Reads until the server closes the connection; appends each frame it sent,
  // decoded, to `received` (a frame that does not decode returns kNotAFrame).
  // With a `session`, frames are opened under it first (an unsealed REJECT is
  // accepted); one that fails the check returns kBadSeal.
  Event ReadUntilClosed(std::vector<wire::Message>* received, absl::Duration timeout,
                        SealedSession* session = nullptr) {
    const absl::Time deadline = absl::Now() + timeout;
    std::string frame;
    while (true) {
      Event e = ReadFrame(&frame, std::max(absl::ZeroDuration(), deadline - absl::Now()));
      if (e != Event::kFrame) return e;
      absl::StatusOr<wire::Message> m =
          session != nullptr ? session->Open(frame) : wire::Decode(frame);
      if (!m.ok()) {
        return absl::IsPermissionDenied(m.status()) ? Event::kBadSeal : Event::kNotAFrame;
      }
      if (received != nullptr) received->push_back(*std::move(m));
    }
  }

  // The next frame, decoded (opened under `session` if given; the frame as
  // received goes to `raw`). kDeadlineExceeded, kUnavailable (closed),
  // kDataLoss (not a frame, or undecodable) or kPermissionDenied (failed its
  // seal check) otherwise.
  absl::StatusOr<wire::Message> ReadMessage(absl::Duration timeout,
                                            SealedSession* session = nullptr,
                                            std::string* raw = nullptr) {
    std::string frame;
    switch (ReadFrame(&frame, timeout)) {
      case Event::kFrame: {
        if (raw != nullptr) *raw = frame;
        if (session != nullptr) return session->Open(frame);
        absl::StatusOr<wire::Message> m = wire::Decode(frame);
        if (!m.ok()) return absl::DataLossError(absl::StrCat("undecodable frame: ", m.status().message()));
        return m;
      }
      case Event::kClosed: return absl::UnavailableError("the server closed the connection");
      case Event::kTimeout: return absl::DeadlineExceededError("no frame within the timeout");
      case Event::kNotAFrame: return absl::DataLossError("the server sent a non-kvferry frame");
      case Event::kBadSeal: break;  // not returned by ReadFrame
    }
    return absl::InternalError("unreachable");
  }

 private:
  int fd_ = -1;
  std::string in_;
  bool reset_ = false;
  bool eof_ = false;
};

// ---- Handshake steps, client side -------------------------------------------

inline wire::Message HelloMessage(const std::string& name, uint64_t incarnation,
                                  std::string nonce) {
  return {.type = wire::MessageType::kHello, .name = name, .incarnation = incarnation,
          .nonce = std::move(nonce)};
}

// Where a hand-made client stands after HELLO and CHALLENGE (and, after
// Authenticate, after its PROOF and the server's WELCOME).
struct ClientHandshake {
  wire::HandshakeTranscript transcript;
  wire::Message challenge;
  // The server's proof checks out under the secret given to SayHello.
  bool server_proof_ok = false;
  // Derived from the transcript under the secret given to SayHello (so under
  // a wrong secret, wrong keys): the client seals from its PROOF on.
  wire::SessionKeys keys;
  SealedSession session;
  // Set by Authenticate: the sealed PROOF as sent and the sealed WELCOME as
  // received (for replays and reflections), and the WELCOME decoded.
  std::string proof_frame;
  std::string welcome_frame;
  wire::Message welcome;
};

// Sends a HELLO (fresh nonce), waits for the CHALLENGE, checks the server's
// proof and derives the session keys, all under `secret`.
inline absl::StatusOr<ClientHandshake> SayHello(HostileClient& client, const std::string& name,
                                                uint64_t incarnation, absl::string_view secret,
                                                absl::Duration timeout = absl::Seconds(30)) {
  absl::StatusOr<std::string> nonce = wire::RandomNonce();
  if (!nonce.ok()) return nonce.status();
  ClientHandshake h;
  h.transcript.client_name = name;
  h.transcript.client_incarnation = incarnation;
  h.transcript.client_nonce = *nonce;
  if (!client.Send(wire::Encode(HelloMessage(name, incarnation, *nonce)))) {
    return absl::UnavailableError("the server closed the connection before the HELLO was sent");
  }
  absl::StatusOr<wire::Message> m = client.ReadMessage(timeout);
  if (!m.ok()) return m.status();
  if (m->type != wire::MessageType::kChallenge) {
    return absl::FailedPreconditionError(absl::StrCat(
        "expected CHALLENGE, got ", wire::MessageTypeName(m->type), " ", m->text));
  }
  h.challenge = *std::move(m);
  h.transcript.server_name = h.challenge.name;
  h.transcript.server_incarnation = h.challenge.incarnation;
  h.transcript.server_nonce = h.challenge.nonce;
  h.server_proof_ok = wire::ProofMatches(secret, wire::ProofRole::kServer, h.transcript,
                                         h.challenge.proof);
  h.keys = wire::DeriveSessionKeys(secret, h.transcript);
  h.session = SealedSession::ForClient(h.keys);
  return h;
}

// The client's proof for this handshake under `secret`.
inline std::string ClientProof(const ClientHandshake& h, absl::string_view secret) {
  return wire::ComputeProof(secret, wire::ProofRole::kClient, h.transcript);
}

// An encoded PROOF carrying `proof` and `agent`, unsealed.
inline std::string ProofFrame(std::string proof, wire::AgentDescriptor agent) {
  return wire::Encode(
      {.type = wire::MessageType::kProof, .proof = std::move(proof), .agent = std::move(agent)});
}

// How a hand-made PROOF is sealed.
enum class SealMode {
  kCorrect,        // the protocol: client_to_server key, sequence 0
  kNone,           // unsealed (a client of the previous protocol)
  kServerKey,      // under the other direction's key (a reflected seal)
  kWrongSequence,  // the right key, sequence 1
};

// An encoded frame as this client's next frame, sealed as `how` says. Only
// kCorrect advances the client's sequence.
inline std::string SealAs(ClientHandshake& h, std::string frame,
                          SealMode how = SealMode::kCorrect) {
  switch (how) {
    case SealMode::kCorrect: return h.session.Seal(std::move(frame));
    case SealMode::kNone: return frame;
    case SealMode::kServerKey:
      return wire::SealFrame(h.keys.server_to_client, h.session.send_sequence, std::move(frame));
    case SealMode::kWrongSequence:
      return wire::SealFrame(h.session.send_key, h.session.send_sequence + 1, std::move(frame));
  }
  return frame;
}

// A PROOF carrying `proof` and `agent`, sealed as `how` says (by default as
// the protocol wants: this client's frame 0).
inline std::string SealedProofFrame(ClientHandshake& h, std::string proof,
                                    wire::AgentDescriptor agent,
                                    SealMode how = SealMode::kCorrect) {
  return SealAs(h, ProofFrame(std::move(proof), std::move(agent)), how);
}

// Sends `message` sealed as this client's next frame. False once the server
// has closed the connection.
inline bool SendSealed(HostileClient& client, ClientHandshake& h, const wire::Message& message) {
  return client.Send(h.session.Seal(message));
}

// The server's next frame, opened under the session (an unsealed REJECT is
// accepted as is).
inline absl::StatusOr<wire::Message> ReadSealed(HostileClient& client, ClientHandshake& h,
                                                absl::Duration timeout = absl::Seconds(30),
                                                std::string* raw = nullptr) {
  return client.ReadMessage(timeout, &h.session, raw);
}

// The whole handshake as a well-behaved client under `secret`: HELLO,
// CHALLENGE, a correctly sealed PROOF carrying `agent` (renamed to `name`),
// then the server's sealed WELCOME. kFailedPrecondition (with the reason) if
// the server refuses or its proof fails; the session then continues at the
// client's frame 1 and the server's frame 1.
inline absl::StatusOr<ClientHandshake> Authenticate(HostileClient& client, const std::string& name,
                                                    uint64_t incarnation, absl::string_view secret,
                                                    wire::AgentDescriptor agent,
                                                    absl::Duration timeout = absl::Seconds(30)) {
  absl::StatusOr<ClientHandshake> h = SayHello(client, name, incarnation, secret, timeout);
  if (!h.ok()) return h.status();
  if (!h->server_proof_ok) return absl::FailedPreconditionError("the server's proof fails");
  agent.name = name;
  h->proof_frame = SealedProofFrame(*h, ClientProof(*h, secret), std::move(agent));
  if (!client.Send(h->proof_frame)) {
    return absl::UnavailableError("the server closed the connection before the PROOF was sent");
  }
  absl::StatusOr<wire::Message> m = ReadSealed(client, *h, timeout, &h->welcome_frame);
  if (!m.ok()) return m.status();
  if (m->type != wire::MessageType::kWelcome) {
    return absl::FailedPreconditionError(absl::StrCat(
        "expected WELCOME, got ", wire::MessageTypeName(m->type), " ", m->text));
  }
  h->welcome = *std::move(m);
  return h;
}

// ---- A real agent's descriptor --------------------------------------------

// Plays a listener (named "capture") for one Connect of `agent`, which must
// know `secret`: answers its HELLO with a valid CHALLENGE, derives the session
// keys from that transcript, opens the sealed PROOF the agent sends, refuses
// it (kUnavailable, an unsealed REJECT) and returns the descriptor it
// carried. kPermissionDenied if the PROOF fails its seal check. The agent
// ends up with no peer.
inline absl::StatusOr<wire::AgentDescriptor> CaptureDescriptor(
    Agent& agent, const std::string& secret, absl::Duration timeout = absl::Seconds(30)) {
  int lfd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (lfd < 0) return absl::UnavailableError(absl::StrCat("socket: ", std::strerror(errno)));
  HostileClient listener(lfd);  // owns the listening socket
  sockaddr_in at = {};
  at.sin_family = AF_INET;
  at.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(at);
  if (::bind(lfd, reinterpret_cast<const sockaddr*>(&at), sizeof(at)) != 0 ||
      ::listen(lfd, 4) != 0 || ::getsockname(lfd, reinterpret_cast<sockaddr*>(&at), &len) != 0) {
    return absl::UnavailableError(absl::StrCat("listen: ", std::strerror(errno)));
  }
  const uint16_t port = ntohs(at.sin_port);
  absl::Status connect_status;
  std::thread connecting([&] { connect_status = agent.Connect("127.0.0.1", port, timeout).status(); });
  absl::StatusOr<wire::AgentDescriptor> result = [&]() -> absl::StatusOr<wire::AgentDescriptor> {
    pollfd p = {lfd, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(absl::ToInt64Milliseconds(timeout))) != 1) {
      return absl::DeadlineExceededError("the agent did not connect");
    }
    int cfd = ::accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
    if (cfd < 0) return absl::UnavailableError(absl::StrCat("accept: ", std::strerror(errno)));
    HostileClient conn(cfd);
    absl::StatusOr<wire::Message> hello = conn.ReadMessage(timeout);
    if (!hello.ok()) return hello.status();
    if (hello->type != wire::MessageType::kHello) {
      return absl::FailedPreconditionError("the agent did not start with HELLO");
    }
    absl::StatusOr<std::string> nonce = wire::RandomNonce();
    if (!nonce.ok()) return nonce.status();
    wire::HandshakeTranscript t{.client_name = hello->name, .server_name = "capture",
                                .client_incarnation = hello->incarnation,
                                .server_incarnation = 1, .client_nonce = hello->nonce,
                                .server_nonce = *nonce};
    conn.Send(wire::Encode({.type = wire::MessageType::kChallenge, .name = "capture",
                            .incarnation = 1, .nonce = *nonce,
                            .proof = wire::ComputeProof(secret, wire::ProofRole::kServer, t)}));
    SealedSession session = SealedSession::ForServer(wire::DeriveSessionKeys(secret, t));
    absl::StatusOr<wire::Message> proof = conn.ReadMessage(timeout, &session);
    if (!proof.ok()) return proof.status();
    if (proof->type != wire::MessageType::kProof) {
      return absl::FailedPreconditionError(absl::StrCat(
          "expected PROOF, got ", wire::MessageTypeName(proof->type), ": ", proof->text));
    }
    conn.Send(wire::Encode({.type = wire::MessageType::kReject,
                            .code = static_cast<uint32_t>(absl::StatusCode::kUnavailable),
                            .text = "descriptor captured"}));
    return proof->agent;
  }();
  listener.Close();
  connecting.join();
  return result;
}

}  // namespace kvferry::test

#endif  // KVFERRY_TESTS_HOSTILE_CLIENT_H_
