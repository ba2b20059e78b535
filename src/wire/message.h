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
inline constexpr uint16_t kVersion = 1;
inline constexpr size_t kHeaderBytes = 12;
inline constexpr size_t kMaxMessageBytes = 1 << 20;
inline constexpr size_t kMaxNameBytes = 255;
inline constexpr size_t kMaxAddressBytes = 16 << 10;
inline constexpr size_t kMaxSecretBytes = 1024;
inline constexpr size_t kMaxPools = 64;
inline constexpr size_t kMaxPayloadBytes = 64 << 10;

enum class MessageType : uint16_t {
  kHello = 1,    // client -> server: AgentDescriptor
  kWelcome = 2,  // server -> client: AgentDescriptor
  kReject = 3,   // server -> client: code + text = reason
  kNotify = 4,   // either way: text = user payload, after the data is visible
  kPing = 5,     // either way: liveness
  kBye = 6,      // either way: orderly disconnect
};

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
  std::string secret;          // shared secret, empty when none
  std::vector<PoolDescriptor> pools;  // exported pools only
  friend bool operator==(const AgentDescriptor&, const AgentDescriptor&) = default;
};

struct Message {
  MessageType type = MessageType::kPing;
  AgentDescriptor agent;  // kHello, kWelcome
  uint32_t code = 0;      // kReject: the absl::StatusCode the client returns
  std::string text;       // kReject reason, kNotify payload
  friend bool operator==(const Message&, const Message&) = default;
};

std::string Encode(const Message& message);

// kInvalidArgument for truncated, oversized or corrupted input (the message
// names the field); kFailedPrecondition for another wire version.
absl::StatusOr<Message> Decode(absl::string_view bytes);

}  // namespace kvferry::internal::wire

#endif  // KVFERRY_SRC_WIRE_MESSAGE_H_
