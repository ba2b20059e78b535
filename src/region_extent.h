// Whether each region a peer declares for a pool lies inside memory the data
// path actually reaches, checked once before the pool is used.
//
// A descriptor's length fields are the peer's word; the wire layer checks
// them against the pool's layout only. A remote key, though, grants a fixed
// extent of real memory, and what happens past that extent depends on the
// path:
//   shm-direct (UCX's sysv/posix transports; ucp_rkey_ptr succeeds): UCX
//       attaches the peer's segment into this process when the key is
//       unpacked, and put/get are memcpy by this process at
//       local = remote + (attach - owner). Nothing bounds that offset, so a
//       region longer than the segment (or a base outside it) makes this
//       process copy from or into whatever it has mapped there: its own
//       private memory, or a fault. AttachWatch refuses such a region.
//   shm-kernel-copy (src/kernel_copy.h): process_vm_writev/readv into the
//       peer's process, whose identity was verified; the kernel confines the
//       copies to that process. CheckKernelCopyExtents still refuses a region
//       that is not readable and writable memory of that process, so a lie
//       fails the handshake instead of a transfer halfway.
//   rdma: the NIC checks each access against the memory registration the key
//       names; a region past it fails the operation (remote access error).
//   tcp and am-emulated: UCX 1.13 emulates put/get with active messages that
//       the *target* executes (ucp_put_handler, ucp_get_req_handler in
//       src/ucp/rma/rma_sw.c): it copies at whatever address the initiator
//       names and checks it against no registration. A lying extent there
//       makes the peer copy within its own process only. The converse is a
//       trust limit kvferry cannot close: a peer holding a UCX endpoint to
//       this worker can name any address of this process in an emulated
//       put/get, with or without a key of ours (see README, security).
//
// Thread-compatible.
#ifndef KVFERRY_SRC_REGION_EXTENT_H_
#define KVFERRY_SRC_REGION_EXTENT_H_

#include <sys/types.h>

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include <ucp/api/ucp.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "src/kernel_copy.h"
#include "src/wire/message.h"

namespace kvferry::internal {

// One line of /proc/<pid>/maps.
struct Mapping {
  uint64_t start = 0;
  uint64_t end = 0;  // exclusive
  bool readable = false;
  bool writable = false;
  bool shared = false;  // 's' (MAP_SHARED), not 'p'
  std::string perms;    // as listed, e.g. "rw-s"
  uint64_t offset = 0;
  std::string device;
  uint64_t inode = 0;
  std::string path;  // empty for anonymous memory

  // The same mapping: extent, backing object and kind. A mapping that was
  // unmapped and replaced, or grew by merging, is not the same.
  bool SameAs(const Mapping& other) const;
  // "0x7f00-0x7f40 rw-s /SYSV00000000 (deleted)".
  std::string Describe() const;
};

// Sorted by start, as the kernel lists them.
using MemoryMap = std::vector<Mapping>;

// Parses the text of /proc/<pid>/maps. kInvalidArgument naming the line.
absl::StatusOr<MemoryMap> ParseMemoryMap(absl::string_view text);
// Reads /proc/<pid>/maps; pid 0 is this process. A read that another
// thread's mapping changes tore (lines out of order) is read again.
// kPermissionDenied when the kernel refuses (ptrace rules), kNotFound when
// there is no such process, kUnavailable otherwise; the message names the
// file.
absl::StatusOr<MemoryMap> ReadMemoryMap(pid_t pid);

// The mapping that holds `address`, or nullptr.
const Mapping* FindMapping(const MemoryMap& map, uint64_t address);

// Shared memory: the region whose base this process reaches at `local`
// (ucp_rkey_ptr) must lie, all `length` bytes of it, inside one shared
// mapping that `after` has and `before` had not: the segment the key's
// unpack attached between the two reads, not memory this process had
// already (its own pools, another peer's segment, private memory).
// kInvalidArgument describing the region's place here otherwise.
absl::Status CheckAttachedRange(const MemoryMap& before, const MemoryMap& after, uint64_t local,
                                uint64_t length);

// Kernel copy: [base, base + length) must be covered, without a gap, by
// mappings of `map` (the peer process's) that are readable and writable.
// kInvalidArgument naming the first address that is not.
absl::Status CheckProcessRange(const MemoryMap& map, uint64_t base, uint64_t length);

// Watches the mappings that unpacking remote keys creates in this process.
// Start() before the first key of a descriptor is unpacked; Check() each key
// right after its unpack. UCX 1.13's sysv and posix transports attach a
// segment afresh on every unpack (shmat / mmap), so the key's segment is a
// mapping the window between the two reads created. What this cannot tell
// apart: a shared mapping another thread of this process created in that
// same window (microseconds; the peer can neither choose nor see where).
// What it does not cover: a posix segment its owner truncates afterwards
// (copies past the new end fault with SIGBUS); kvferry's own pools are
// System V segments, whose size is fixed.
class AttachWatch {
 public:
  // Reads this process's mappings. A failure to read them is reported by
  // the first Check() of a key that maps memory (none may be needed).
  static AttachWatch Start();

  // For a key unpacked since Start() or the previous Check(): if UCX maps
  // the region's memory into this process (ucp_rkey_ptr succeeds), the
  // region must lie inside the segment that unpack attached
  // (CheckAttachedRange); OkStatus if the key maps nothing here (another
  // path carries it). The window of the next key starts here.
  absl::Status Check(ucp_rkey_h rkey, uint64_t remote_base, uint64_t length);

 private:
  explicit AttachWatch(absl::StatusOr<MemoryMap> before) : before_(std::move(before)) {}

  absl::StatusOr<MemoryMap> before_;  // Start's, then each Check's
};

// Kernel copy into `target`'s process: every region of `pools` must lie in
// readable, writable memory of that process (CheckProcessRange). Its map is
// read, then the process is checked to be alive, so the map is the verified
// process's (a pid is reused only after its process exited).
// kInvalidArgument naming the pool, the region, its extent and the pid; the
// errors of ReadMemoryMap (with the pid) when the map cannot be read.
absl::Status CheckKernelCopyExtents(const KernelCopyTarget& target,
                                    std::span<const wire::PoolDescriptor* const> pools);

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_REGION_EXTENT_H_
