// A packed UCX 1.13 remote key, read before UCX sees it.
//
// Layout (ucp_rkey_pack in UCX 1.13, little-endian host order):
//   uint64 md_map | uint8 memory type | for each set bit of md_map, lowest
//   first: uint8 size, then `size` bytes of that transport's key |
//   optionally uint8 system device and 3-byte distance records.
//
// Two of those transport keys name shared memory the peer process owns:
//   sysv  (12 bytes): uint32 shmid, uint64 owner address.
//   posix (24 bytes and up): uint64 segment id (flags in the top 4 bits),
//         uint64 owner address, uint64 length, then a backing directory when
//         neither the procfs nor the shm_open flag is set.
// UCX 1.13 attaches each such segment while it unpacks the key, and when an
// attach fails (the peer exited, so its segment is gone) its error path
// releases keys it never unpacked and crashes (ucp_ep_rkey_unpack ->
// ucp_rkey_destroy -> uct_rkey_release). SegmentHold keeps that path out of
// reach: it attaches every segment first and keeps it attached until UCX is
// done, so UCX's own attach cannot fail.
//
// What this does not check: whether a transport key of a given size really
// belongs to the transport UCX will hand it to (the peer's memory-domain
// order is in its worker address, which only UCX parses), and the content of
// keys of other transports. Those stay inside the trust boundary: an
// authenticated peer that sends a crafted key can still make UCX misbehave.
#ifndef KVFERRY_SRC_UCX_PACKED_RKEY_H_
#define KVFERRY_SRC_UCX_PACKED_RKEY_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvferry::internal {

// One transport key inside a packed remote key.
struct PackedRkeyEntry {
  int md_index = 0;   // the bit of md_map it belongs to (the peer's memory domain)
  size_t offset = 0;  // where its bytes start in the packed key
  size_t size = 0;    // how many bytes it has
};

struct ParsedRkey {
  uint64_t md_map = 0;
  uint8_t memory_type = 0;
  std::vector<PackedRkeyEntry> entries;  // one per set bit of md_map, in order
  size_t trailer_offset = 0;             // system device and distances, if any
};

// kInvalidArgument, naming the offset and the sizes involved, for a buffer
// shorter than its own length fields say, or with a trailer that is not a
// system device plus whole distance records.
absl::StatusOr<ParsedRkey> ParsePackedRkey(absl::string_view packed);

// What kind of shared-memory segment a transport key names, judged from its
// size and content alone.
enum class SegmentKind { kNone, kSysv, kPosix };
SegmentKind ClassifyTransportKey(absl::string_view key);

// The segments a packed remote key names, attached (sysv) or opened (posix)
// by this process, and the key to hand to UCX instead of the original:
//   - a sysv segment stays attached here until the hold is destroyed; Linux
//     keeps an attached segment even after its owner removed it and exited,
//     so UCX's shmat of the same id succeeds;
//   - a posix segment is opened here and its key rewritten to name this
//     process's descriptor (/proc/<self>/fd/<fd>, UCX's procfs mode), which
//     stays valid until the hold is destroyed, whatever the peer does;
//   - a key whose segment cannot be attached or opened here is left out of
//     the key handed to UCX (UCX's own attach would fail the same way and
//     crash), and listed in missing().
// Destroy the hold only after ucp_ep_rkey_unpack returned: UCX's mapping
// then keeps the segment alive on its own.
class SegmentHold {
 public:
  // kInvalidArgument from ParsePackedRkey.
  static absl::StatusOr<SegmentHold> Prepare(absl::string_view packed);

  SegmentHold() = default;
  ~SegmentHold() { Release(); }
  SegmentHold(SegmentHold&& other) noexcept;
  SegmentHold& operator=(SegmentHold&& other) noexcept;
  SegmentHold(const SegmentHold&) = delete;
  SegmentHold& operator=(const SegmentHold&) = delete;

  // The key to hand to UCX (the original when nothing was changed).
  absl::string_view key() const { return key_; }
  // One line per segment left out, e.g. "sysv shmid 42: Invalid argument".
  const std::vector<std::string>& missing() const { return missing_; }
  int held() const { return static_cast<int>(attached_.size() + fds_.size()); }

 private:
  void Release() noexcept;

  std::string key_;
  std::vector<std::string> missing_;
  std::vector<void*> attached_;  // shmat addresses
  std::vector<int> fds_;         // open posix segments
};

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_UCX_PACKED_RKEY_H_
