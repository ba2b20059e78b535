// The value of a directory entry: versioned JSON, validated field by field on
// the way in (sizes capped, names checked), so bad data in etcd is an error
// naming the key and never reaches an agent.
#ifndef KVFERRY_SRC_DIRECTORY_RECORD_H_
#define KVFERRY_SRC_DIRECTORY_RECORD_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kvferry/directory.h"

namespace kvferry::internal {

// The value format written; a value of another version is kDataLoss.
inline constexpr int kRecordVersion = 1;
// Longest value accepted (a record is a few hundred bytes per pool).
inline constexpr size_t kMaxRecordBytes = 64 * 1024;
inline constexpr size_t kMaxRecordPools = 256;
inline constexpr size_t kMaxRoleBytes = 255;

// An agent or cluster name usable in a key: 1..255 printable ASCII
// characters, no '/', no spaces. kInvalidArgument naming `what` otherwise.
absl::Status ValidateDirectoryName(absl::string_view name, absl::string_view what);

std::string EncodeRecord(const AgentRecord& record);
// Parses and validates a value read at `key` for the agent `name` (the
// key's last part). kDataLoss naming the key for anything wrong.
absl::StatusOr<AgentRecord> DecodeRecord(absl::string_view key, absl::string_view name,
                                         absl::string_view value);

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_DIRECTORY_RECORD_H_
