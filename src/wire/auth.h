// Mutual authentication of the control handshake: HMAC-SHA256 under the
// shared secret over a transcript of both names, both incarnations and both
// fresh nonces (OpenSSL's libcrypto). Each side proves that it knows the
// secret; the secret itself never crosses the wire, a recorded proof is
// useless against a fresh nonce, and the two directions use different labels
// so a proof cannot be reflected back.
//
// Chosen over TLS 1.3 with a PSK because kvferry needs authentication of a
// handful of control frames, not a second transport: a few dozen lines of
// HMAC, no certificates, and no TLS state machine on the listener's hot path.
// Thread-safe plain functions.
#ifndef KVFERRY_SRC_WIRE_AUTH_H_
#define KVFERRY_SRC_WIRE_AUTH_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvferry::internal::wire {

enum class ProofRole { kServer, kClient };

struct HandshakeTranscript {
  std::string client_name;
  std::string server_name;
  uint64_t client_incarnation = 0;
  uint64_t server_incarnation = 0;
  std::string client_nonce;
  std::string server_nonce;
};

// kNonceBytes from the operating system's random source. kInternal if it fails.
absl::StatusOr<std::string> RandomNonce();
// kProofBytes: HMAC-SHA256(secret, label(role) || transcript).
std::string ComputeProof(absl::string_view secret, ProofRole role,
                         const HandshakeTranscript& transcript);
// Constant-time comparison of a received proof with the expected one.
bool ProofMatches(absl::string_view secret, ProofRole role, const HandshakeTranscript& transcript,
                  absl::string_view received);

// Every frame after the CHALLENGE (the PROOF and WELCOME with their
// descriptors, then notifications, pings, goodbye) is sealed: an
// HMAC-SHA256 tag under a per-direction key derived from the secret and the
// transcript, over a per-direction sequence number and the frame. An on-path
// attacker can then neither alter a descriptor nor inject, replay, drop or
// reorder a later frame without the receiver noticing. Frames are not
// encrypted. REJECT, which may answer a frame that failed its check, is the
// one frame sent unsealed during the handshake.
inline constexpr size_t kTagBytes = 32;
struct SessionKeys {
  std::string client_to_server;
  std::string server_to_client;
};
SessionKeys DeriveSessionKeys(absl::string_view secret, const HandshakeTranscript& transcript);
// Appends the tag and grows the header's length field by kTagBytes.
// REQUIRES: `frame` is an encoded frame (wire::Encode).
std::string SealFrame(absl::string_view key, uint64_t sequence, std::string frame);
// Checks and strips the tag, restoring the inner frame. kPermissionDenied
// when the tag does not match (altered, forged, replayed or reordered).
absl::StatusOr<std::string> OpenFrame(absl::string_view key, uint64_t sequence,
                                      absl::string_view frame);

// Offer tickets (src/wire/message.h, Ticket) carry kTagBytes of
// HMAC-SHA256 under the offering side's frame key of the connection they
// were made for, so only that connection's two agents can make or check one
// and a ticket dies with the connection.
std::string TicketTag(absl::string_view key, absl::string_view body);
bool TicketTagMatches(absl::string_view key, absl::string_view body, absl::string_view tag);
// The key a ticket made before its taker connected (kTicketForName) is
// tagged with: HMAC-SHA256 under the shared secret over both names and the
// offerer's incarnation, so only holders of the secret can make or check
// one, and it dies with that incarnation. Such a ticket is accepted only on
// the connection the offerer bound the offer to (kOfferBound), which is what
// ties it to one connection.
std::string TicketNameKey(absl::string_view secret, absl::string_view offerer,
                          uint64_t offerer_incarnation, absl::string_view taker);

// The kernel-copy probe (src/kernel_copy.h): kTagBytes that an agent keeps in
// its memory for one connection, HMAC-SHA256 under its frame key of that
// connection. Fresh per connection, so only the process that holds the
// connection's keys (or one it wrote to) has them at the advertised address.
std::string KernelCopyProbe(absl::string_view key);

}  // namespace kvferry::internal::wire

#endif  // KVFERRY_SRC_WIRE_AUTH_H_
