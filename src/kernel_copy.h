// The same-host kernel-copy path: transfers to a peer process on this host
// whose pools UCX 1.13 can only reach by emulating put/get with active
// messages (engine-owned or anonymous memory that no shared-memory transport
// maps; UCX's cma transport is not used for RMA). The initiator copies with
// process_vm_writev / process_vm_readv: one copy by one process through the
// kernel, no work by the peer, and synchronous, so the bytes are in place
// (or the copy failed) when the call returns.
//
// Trust: the peer's descriptor names its process id and the address of a
// probe in its memory (wire::AgentDescriptor). Before anything is written to
// that process, kvferry reads the probe there and checks it against
// wire::KernelCopyProbe under the peer's frame key of this very connection
// (fresh per connection), so a peer cannot point kvferry's writes at another
// process; then it opens a pidfd and reads the probe again, so that the
// pidfd names the process that answered. A copy is refused once that pidfd
// says the process exited (its pid may be reused). Addresses come from the
// peer's pool descriptors, bounded like any remote key's: a peer can direct
// the copies only into its own memory.
//
// Thread-safe: copies to one target may run at once. They run on the
// agent's KernelCopier threads (src/kernel_copier.h).
#ifndef KVFERRY_SRC_KERNEL_COPY_H_
#define KVFERRY_SRC_KERNEL_COPY_H_

#include <sys/types.h>
#include <sys/uio.h>

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "kvferry/transfer.h"
#include "src/net/socket.h"

namespace kvferry::internal {

class KernelCopyTarget {
 public:
  // Checks that process `pid` holds `expected` at `probe_address` (before
  // and after opening a pidfd to it). kPermissionDenied when it does not,
  // or when the kernel refuses the read (ptrace rules, another pid
  // namespace); kInvalidArgument for pid 0 or this process's own pid (two
  // agents of one process use UCX); the message names the pid and the call.
  static absl::StatusOr<std::shared_ptr<KernelCopyTarget>> Open(uint64_t pid,
                                                                uint64_t probe_address,
                                                                absl::string_view expected);

  pid_t pid() const { return pid_; }
  // Whether the process has exited (its pidfd is readable).
  bool Exited() const;
  // Moves local[i] to/from remote[i] (same lengths): WRITE copies local ->
  // remote (process_vm_writev), READ remote -> local, in as few calls as
  // the kernel allows (up to IOV_MAX elements each); a call that stops short
  // is followed by one that starts at the first byte not moved. An error
  // (a call that fails or moves nothing) names the call, the pid and how
  // many of the bytes had moved.
  absl::Status Copy(TransferOp op, absl::Span<const iovec> local,
                    absl::Span<const iovec> remote) const;

  // Cleared when the peer's connection ends: no copy starts afterwards
  // (KernelCopier::CloseTarget also waits for one in progress).
  bool open() const { return open_.load(std::memory_order_acquire); }
  void Close() { open_.store(false, std::memory_order_release); }

 private:
  KernelCopyTarget(pid_t pid, Fd pidfd) : pid_(pid), pidfd_(std::move(pidfd)) {}

  const pid_t pid_;
  const Fd pidfd_;
  std::atomic<bool> open_{true};
};

using KernelCopyPtr = std::shared_ptr<KernelCopyTarget>;

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_KERNEL_COPY_H_
