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
#include "src/region_map.h"

namespace kvferry::internal::wire {

inline constexpr uint32_t kMagic = 0x5946564b;  // "KVFY" read little-endian
inline constexpr uint16_t kVersion = 6;
inline constexpr size_t kHeaderBytes = 12;
inline constexpr size_t kMaxMessageBytes = 1 << 20;
inline constexpr size_t kMaxNameBytes = 255;
inline constexpr size_t kMaxAddressBytes = 16 << 10;  // packed worker address
inline constexpr size_t kMaxRkeyBytes = 4 << 10;      // packed remote key
inline constexpr size_t kMaxPools = 64;
// How many offers a peer may revoke (kOfferRevoke) before the taker posted on
// them and while their tickets have not expired: the taker remembers each so
// that a later post is refused. An honest offerer revokes such an offer only
// when its taker never got to it; past this the taker fails the peer
// (kResourceExhausted) rather than let it grow the taker's memory.
inline constexpr size_t kMaxUnpostedRevokes = 16384;
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
// then kNotify / kPing / kBye / kPoolAdded / kPoolRemoved and the offer messages either way. Proofs are HMAC-SHA256 under the
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
  kPoolAdded = 9,  // either way: agent.pools = pools made after the handshake
  // Offers (Agent::Offer). offer_id names the offer on the offering side.
  kOfferDone = 10,     // taker -> offerer: a transfer on the ticket ended and
                       // is fenced; layers [layer_begin, layer_end), code 0 =
                       // done, else the failure (text)
  kOfferRevoke = 11,   // offerer -> taker: the offer ended (text says why);
                       // fence every transfer on it, then answer kOfferRevoked
  kOfferRevoked = 12,  // taker -> offerer: nothing on the ticket can move now
  kPoolRemoved = 13,   // either way: name = a pool announced before, now removed
                       // (Agent::RemovePool); added in wire version 5
  // Added in wire version 6 (which also replaced the tickets' and
  // kOfferRevoke's absolute deadline with a ttl):
  kOfferRelease = 14,  // taker -> offerer: the taker needs no more of the
                       // offer (Agent::ReleaseOffer); the offerer ends it
                       // with the usual fence (kOfferRevoke, kOfferRevoked)
  kOfferBound = 15,    // offerer -> taker: an offer made to the taker's name
                       // before it connected is bound to this connection;
                       // ttl_ns = the offer's ttl
  kOfferEnded = 16,    // offerer -> taker: the offer ended consumed
  // kOfferRevoke, kOfferBound and kOfferEnded carry offer_floor: every offer
  // to this connection with a lower id has ended on the offerer, so the
  // taker may forget them and must refuse their tickets.
};
absl::string_view MessageTypeName(MessageType type);

struct RegionDescriptor {
  uint64_t base = 0;    // remote virtual address
  uint64_t length = 0;  // == RegionBytes(layout, regions.size())
  std::string rkey;     // packed remote key
  friend bool operator==(const RegionDescriptor&, const RegionDescriptor&) = default;
};

struct PoolDescriptor {
  std::string name;
  KvLayout layout;
  std::vector<RegionDescriptor> regions;  // 1, layers or layers * planes (region_map.h)
  friend bool operator==(const PoolDescriptor&, const PoolDescriptor&) = default;
};

struct AgentDescriptor {
  std::string name;
  std::string host_id;         // same value <=> same host (kernel boot id)
  std::string worker_address;  // packed ucp worker address
  // The kernel-copy path on one host (src/kernel_copy.h): the sender's
  // process id and the address of kKernelCopyProbeBytes in its memory that
  // hold KernelCopyProbe() under its frame key of this connection. 0 when
  // the sender offers no such path.
  uint64_t pid = 0;
  uint64_t probe_address = 0;
  std::vector<PoolDescriptor> pools;  // exported pools only
  friend bool operator==(const AgentDescriptor&, const AgentDescriptor&) = default;
};

struct Message {
  MessageType type = MessageType::kPing;
  std::string name;         // kHello, kChallenge: the sender's agent name;
                            // kPoolRemoved: the pool's name
  uint64_t incarnation = 0;  // kHello, kChallenge: the sender's start
  std::string nonce;        // kHello, kChallenge: kNonceBytes
  std::string proof;        // kChallenge, kProof: kProofBytes
  AgentDescriptor agent;    // kProof, kWelcome; kPoolAdded: pools only
  uint32_t code = 0;        // kReject: the absl::StatusCode the client returns;
                            // kOfferDone: 0 or the transfer's failure code
  std::string text;         // kReject reason, kNotify payload, offer reasons
  uint64_t offer_id = 0;    // the offer messages
  uint32_t layer_begin = 0;  // kOfferDone
  uint32_t layer_end = 0;    // kOfferDone
  // kOfferRevoke, kOfferBound: the offer's ttl as granted (a duration, never
  // a point on the sender's clock); the taker remembers the offer that long.
  int64_t ttl_ns = 0;
  uint64_t offer_floor = 0;  // kOfferRevoke, kOfferBound, kOfferEnded
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

// An offer ticket (Agent::Offer): what the taking agent needs to move the
// offered blocks, and proof that the offering agent made it for this
// connection (or, for an offer made before the taker connected, for the
// taker's name; the offerer then binds it to the taker's next connection
// and says so with kOfferBound). Encoded as
//   u32 magic "KVFT" | u16 version | body | kTicketTagBytes tag
// where the tag (src/wire/auth.h) covers magic, version and body.
struct Ticket {
  uint64_t offer_id = 0;
  std::string offerer;  // agent name
  uint64_t offerer_incarnation = 0;
  std::string taker;  // agent name
  std::string pool;   // the offerer's pool
  uint32_t flags = 0;  // kTicketFor*
  // The offer's ttl when the ticket was made: the taker counts it from when
  // it first uses the ticket, on its own clock. The offerer alone enforces
  // the real end (kOfferRevoke); no clock is compared across hosts. > 0.
  int64_t ttl_ns = 0;
  uint32_t num_layers = 0;       // of the pool: the offer is consumed when each moved once
  std::vector<uint32_t> blocks;  // the offered block ids, in order
  friend bool operator==(const Ticket&, const Ticket&) = default;
};
inline constexpr uint32_t kTicketMagic = 0x5446564b;  // "KVFT" read little-endian
inline constexpr size_t kTicketTagBytes = 32;
// Ticket::flags: made for the taker's name before it connected; tagged with
// TicketNameKey (src/wire/auth.h) instead of the connection's frame key, and
// good only on the connection the offerer bound it to (kOfferBound).
inline constexpr uint32_t kTicketForName = 1;
inline constexpr size_t kMaxTicketBlocks = 1 << 20;

// The ticket's bytes without the tag (what the tag covers).
std::string EncodeTicketBody(const Ticket& ticket);
// kInvalidArgument naming the field for anything malformed; does not check
// the tag. `tag` (optional) receives the last kTicketTagBytes, `body` the rest.
absl::StatusOr<Ticket> DecodeTicket(absl::string_view bytes, absl::string_view* body = nullptr,
                                    absl::string_view* tag = nullptr);

}  // namespace kvferry::internal::wire

#endif  // KVFERRY_SRC_WIRE_MESSAGE_H_
