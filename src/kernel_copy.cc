#include "src/kernel_copy.h"

#include <poll.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "src/wire/auth.h"

namespace kvferry::internal {
namespace {

// The kernel takes at most this many iovecs per call (IOV_MAX).
constexpr size_t kMaxIov = 1024;

absl::Status ReadProbe(pid_t pid, uint64_t probe_address, absl::string_view expected,
                       absl::string_view when) {
  std::string got(expected.size(), '\0');
  iovec local{got.data(), got.size()};
  iovec remote{reinterpret_cast<void*>(probe_address), got.size()};
  ssize_t n = process_vm_readv(pid, &local, 1, &remote, 1, 0);
  if (n < 0) {
    const int err = errno;
    return absl::PermissionDeniedError(absl::StrCat("process_vm_readv of the probe of pid ", pid,
                                                    " ", when, ": ", std::strerror(err)));
  }
  if (static_cast<size_t>(n) != got.size() || got != expected) {
    return absl::PermissionDeniedError(absl::StrCat(
        "pid ", pid, " does not hold this connection's probe at 0x",
        absl::Hex(probe_address), " ", when, " (not the peer's process, or another pid namespace)"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::shared_ptr<KernelCopyTarget>> KernelCopyTarget::Open(
    uint64_t pid, uint64_t probe_address, absl::string_view expected) {
  if (pid == 0 || pid > static_cast<uint64_t>(INT32_MAX)) {
    return absl::InvalidArgumentError(absl::StrCat("pid ", pid, " is not a process id"));
  }
  const pid_t p = static_cast<pid_t>(pid);
  if (p == getpid()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "pid ", pid, " is this process (agents of one process move data through UCX)"));
  }
  if (absl::Status s = ReadProbe(p, probe_address, expected, "before pidfd_open"); !s.ok()) {
    return s;
  }
  int fd = static_cast<int>(syscall(SYS_pidfd_open, p, 0));
  if (fd < 0) {
    const int err = errno;
    return absl::PermissionDeniedError(
        absl::StrCat("pidfd_open(", pid, "): ", std::strerror(err)));
  }
  Fd pidfd(fd);
  // The pidfd may name a process that took the pid after the first read:
  // reading the probe again binds it to the one that answered.
  if (absl::Status s = ReadProbe(p, probe_address, expected, "after pidfd_open"); !s.ok()) {
    return s;
  }
  return std::shared_ptr<KernelCopyTarget>(new KernelCopyTarget(p, std::move(pidfd)));
}

bool KernelCopyTarget::Exited() const {
  pollfd pfd{pidfd_.get(), POLLIN, 0};
  return poll(&pfd, 1, 0) != 0;  // readable (exited) or an error: treat both as gone
}

absl::Status KernelCopyTarget::Copy(TransferOp op, absl::Span<const iovec> local,
                                    absl::Span<const iovec> remote) const {
  const bool write = op == TransferOp::kWrite;
  // The call may stop short (a remote page it cannot reach, or the kernel's
  // cap on one call's bytes): the next call resumes at the first byte that
  // did not move, inside an element if need be. A call that moves nothing
  // ends the copy. Calls pass the caller's arrays as they are, but for the
  // first element of a call that resumes inside it.
  uint64_t moved = 0;
  size_t at = 0;      // the element the next call starts in
  uint64_t skip = 0;  // bytes of it that already moved
  iovec first_l{}, first_r{};
  std::vector<iovec> l, r;  // a resumed call's elements
  while (at < local.size()) {
    const size_t n = std::min(kMaxIov, local.size() - at);
    const iovec* lp = local.data() + at;
    const iovec* rp = remote.data() + at;
    uint64_t want = 0;
    for (size_t i = 0; i < n; ++i) want += lp[i].iov_len;
    want -= skip;
    if (want == 0) {  // only empty elements left in this batch
      at += n;
      skip = 0;
      continue;
    }
    if (skip != 0) {
      first_l = {static_cast<std::byte*>(lp[0].iov_base) + skip, lp[0].iov_len - skip};
      first_r = {static_cast<std::byte*>(rp[0].iov_base) + skip, rp[0].iov_len - skip};
      l.assign(lp, lp + n);
      r.assign(rp, rp + n);
      l[0] = first_l;
      r[0] = first_r;
      lp = l.data();
      rp = r.data();
    }
    const ssize_t got = write ? process_vm_writev(pid_, lp, n, rp, n, 0)
                              : process_vm_readv(pid_, lp, n, rp, n, 0);
    if (got <= 0) {
      const int err = errno;
      uint64_t total = 0;
      for (const iovec& v : local) total += v.iov_len;
      return absl::UnavailableError(absl::StrCat(
          write ? "process_vm_writev" : "process_vm_readv", " to pid ", pid_, ": ",
          got < 0 ? std::strerror(err) : "no progress", " (", moved, " of ", total,
          " bytes moved)"));
    }
    moved += static_cast<uint64_t>(got);
    if (static_cast<uint64_t>(got) == want) {
      at += n;
      skip = 0;
      continue;
    }
    // Short: find where it stopped (lp[0] is the rest of element `at`).
    uint64_t left = static_cast<uint64_t>(got);
    for (size_t i = 0; i < n; ++i) {
      if (left < lp[i].iov_len) break;
      left -= lp[i].iov_len;
      ++at;
      skip = 0;
    }
    skip += left;
  }
  return absl::OkStatus();
}

}  // namespace kvferry::internal
