// Making a pool's pages resident in this process before the first transfer
// needs them, so that no transfer pays the page faults of a fresh mapping.
#ifndef KVFERRY_SRC_POPULATE_H_
#define KVFERRY_SRC_POPULATE_H_

#include <cstdint>

#include "absl/status/status.h"

namespace kvferry::internal {

// How PopulatePages got the pages in.
enum class PopulateMethod {
  kMadvise,  // madvise(MADV_POPULATE_WRITE): the kernel faults every page in
  kTouch,    // the kernel lacks it (EINVAL): one atomic add of zero per page
};

// Faults in every page of [base, base + length) for writing, in this
// process's mapping, without changing any byte (the touch fallback adds
// zero atomically, so a peer writing the same memory meanwhile loses
// nothing). The range is widened to whole pages. An error from the kernel
// (out of memory; with MADV_POPULATE_WRITE, a range not mapped writable)
// is kResourceExhausted naming the call and the range; pages already in
// stay in.
// REQUIRES: the range is mapped readable and writable in this process (the
// fallback cannot check it).
absl::Status PopulatePages(void* base, uint64_t length, PopulateMethod* method = nullptr);

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_POPULATE_H_
