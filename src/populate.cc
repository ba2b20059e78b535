#include "src/populate.h"

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14
#endif

namespace kvferry::internal {

absl::Status PopulatePages(void* base, uint64_t length, PopulateMethod* method) {
  if (length == 0) return absl::OkStatus();
  const auto page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  const uint64_t begin = reinterpret_cast<uint64_t>(base) & ~(page - 1);
  const uint64_t end = (reinterpret_cast<uint64_t>(base) + length + page - 1) & ~(page - 1);
  int rc;
  do {
    rc = madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_WRITE);
  } while (rc != 0 && errno == EINTR);
  if (rc == 0) {
    if (method != nullptr) *method = PopulateMethod::kMadvise;
    return absl::OkStatus();
  }
  const int err = errno;
  if (err != EINVAL) {
    return absl::ResourceExhaustedError(
        absl::StrCat("madvise(MADV_POPULATE_WRITE) of ", end - begin, " bytes at 0x",
                     absl::Hex(begin), ": ", std::strerror(err)));
  }
  // A kernel before 5.14: a write to each page, one that changes nothing.
  for (uint64_t at = begin; at < end; at += page) {
    reinterpret_cast<std::atomic<uint64_t>*>(at)->fetch_add(0, std::memory_order_relaxed);
  }
  if (method != nullptr) *method = PopulateMethod::kTouch;
  return absl::OkStatus();
}

}  // namespace kvferry::internal
