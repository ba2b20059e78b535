// Connection metadata (Agent::LocalMetadata, Agent::ConnectFromMetadata):
// what a peer needs to connect to an agent, as bytes an engine carries over
// its own side channel. Not a credential: the authenticated handshake runs
// when a peer connects with it.
//
// Format 1, little-endian, nothing after the last field:
//   "KVFM"          4 bytes
//   format          u8   (1)
//   wire version    u16  (wire::kVersion of the agent that made it)
//   name            u8 length (1..255), bytes
//   incarnation     u64
//   addresses       u8 count (1..kMaxMetadataAddresses), each:
//                     u8 length (1..kMaxMetadataAddressBytes), an IPv4 or
//                     IPv6 literal, u16 port (not 0)
#ifndef KVFERRY_SRC_METADATA_H_
#define KVFERRY_SRC_METADATA_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvferry::internal {

inline constexpr uint8_t kMetadataFormat = 1;
inline constexpr size_t kMaxMetadataAddresses = 8;
inline constexpr size_t kMaxMetadataAddressBytes = 64;

struct AgentMetadata {
  uint16_t wire_version = 0;
  std::string name;
  uint64_t incarnation = 0;
  std::vector<std::pair<std::string, uint16_t>> addresses;  // (literal, port)
};

// REQUIRES: `m` valid (as ParseMetadata would accept it).
std::string EncodeMetadata(const AgentMetadata& m);
// kInvalidArgument naming what is wrong (and where) for anything that is not
// format-1 metadata of this wire version.
absl::StatusOr<AgentMetadata> ParseMetadata(absl::string_view bytes);

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_METADATA_H_
