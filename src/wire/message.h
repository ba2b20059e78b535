// kvferry's control messages on the wire: a versioned, length-checked binary
// format (little-endian) of our own. Every message is
//
//   u32 magic "KVFY" | u16 version | u16 type | u32 body length | body
//
// Strings are u32 length + bytes, each with a per-field limit. Decode checks
// every length against the bytes present and every field against its limit,
// validates each pool layout, and rejects trailing bytes. Thread-compatible
// plain functions.
#ifndef KVFERRY_SRC_WIRE_MESSAGE_H_
#define KVFERRY_SRC_WIRE_MESSAGE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kvferry/kv_layout.h"

namespace kvferry::internal::wire {

inline constexpr uint32_t kMagic = 0x5946564b;  // "KVFY" read little-endian
inline constexpr uint16_t kVersion = 2;
inline constexpr size_t kHeaderBytes = 12;
inline constexpr size_t kMaxMessageBytes = 1 << 20;
inline constexpr size_t kMaxNameBytes = 255;
inline constexpr size_t kMaxAddressBytes = 16 << 10;  // packed worker address
inline constexpr size_t kMaxRkeyBytes = 4 << 10;      // packed remote key
inline constexpr size_t kMaxPools = 64;
inline constexpr size_t kMaxPayloadBytes = 64 << 10;
inline constexpr size_t kNonceBytes = 32;
inline constexpr size_t kProofBytes = 32;  // HMAC-SHA256
// A pool must lie in user space below this address (x86-64 with 5-level
// paging has 56 bits of user space; aarch64 at most 52). Its size is bounded
// by KvLayout::Validate.
inline constexpr uint64_t kAddressLimit = 1ull << 56;

// The control protocol, one TCP connection per peer:
//   client -> server  kHello      name, incarnation, client nonce
//   server -> client  kChallenge  name, incarnation, server nonce, server proof
//   client -> server  kProof      client proof, the client's AgentDescriptor
//   server -> client  kWelcome    the server's AgentDescriptor (or kReject)
// then kNotify / kPing / kBye either way. Proofs are HMAC-SHA256 under the
// shared secret over both names, incarnations and nonces (src/wire/auth.h),
// so each side proves it knows the secret without sending it, and no
// descriptor (worker address, rkeys) is sent to or parsed from an
// unauthenticated peer.
enum class MessageType : uint16_t {
  kHello = 1,
  kChallenge = 2,
  kProof = 3,
  kWelcome = 4,
  kReject = 5,  // either way during the handshake: code + text = reason
  kNotify = 6,  // either way: text = user payload, after the data is visible
  kPing = 7,    // either way: liveness
  kBye = 8,     // either way: orderly disconnect
};
absl::string_view MessageTypeName(MessageType type);

struct PoolDescriptor {
  std::string name;
  KvLayout layout;
  uint64_t base = 0;    // remote virtual address of the arena
  uint64_t length = 0;  // == layout.total_bytes()
  std::string rkey;     // packed remote key
  friend bool operator==(const PoolDescriptor&, const PoolDescriptor&) = default;
};

struct AgentDescriptor {
  std::string name;
  std::string host_id;         // same value <=> same host (kernel boot id)
  std::string worker_address;  // packed ucp worker address
  std::vector<PoolDescriptor> pools;  // exported pools only
  friend bool operator==(const AgentDescriptor&, const AgentDescriptor&) = default;
};

struct Message {
  MessageType type = MessageType::kPing;
  std::string name;         // kHello, kChallenge: the sender's agent name
  uint64_t incarnation = 0;  // kHello, kChallenge: the sender's start
  std::string nonce;        // kHello, kChallenge: kNonceBytes
  std::string proof;        // kChallenge, kProof: kProofBytes
  AgentDescriptor agent;    // kProof, kWelcome
  uint32_t code = 0;        // kReject: the absl::StatusCode the client returns
  std::string text;         // kReject reason, kNotify payload
  friend bool operator==(const Message&, const Message&) = default;
};

// Agent and pool names: 1..255 printable ASCII characters, no spaces.
// kInvalidArgument naming `what` and the offending byte.
absl::Status ValidateName(absl::string_view what, absl::string_view name);

// Given the start of a byte stream, the length of its first frame (header
// included), 0 when fewer than kHeaderBytes are present, kInvalidArgument for
// a header without kvferry's magic or announcing more than `max_bytes`
// (header included).
absl::StatusOr<size_t> FrameLength(absl::string_view stream, size_t max_bytes = kMaxMessageBytes);
// The type field of an encoded frame's header (0 if shorter than a header).
uint16_t PeekFrameType(absl::string_view frame);

// The largest frame a peer may send before it is authenticated (a HELLO is
// under 400 bytes) and, after its HELLO, its PROOF (a descriptor with
// kMaxPools pools of kMaxRkeyBytes keys and a kMaxAddressBytes address).
inline constexpr size_t kMaxHelloFrameBytes = 4 << 10;
inline constexpr size_t kMaxProofFrameBytes = 512 << 10;

std::string Encode(const Message& message);

// kInvalidArgument for truncated, oversized or corrupted input (the message
// names the field); kFailedPrecondition for another wire version.
absl::StatusOr<Message> Decode(absl::string_view bytes);

}  // namespace kvferry::internal::wire

#endif  // KVFERRY_SRC_WIRE_MESSAGE_H_
