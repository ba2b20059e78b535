// MemoryReport: what this process's memory is made of, including the parts a
// heap profiler cannot see (anonymous mappings made below malloc, registered
// KV pools, UCX's shared-memory segments), and how much of the resident,
// anonymous memory nothing accounts for ("unexplained").
//
// Sources: /proc/self/smaps_rollup (RSS, anonymous, shared memory),
// /proc/self/maps (mapping counts, UCX segments), malloc_info (every malloc
// arena), mincore over each pool (its resident bytes), the agent's ledger.
// Tolerance against /proc/self/status (VmRSS, RssAnon): the two are read at
// different instants, so they agree within 1% + 8 MiB (tested).
//
// A plain value; reading one costs a few hundred microseconds plus one
// mincore byte per pool page. Thread-compatible.
#ifndef KVFERRY_MEMORY_REPORT_H_
#define KVFERRY_MEMORY_REPORT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kvferry/ledger.h"
#include "kvferry/ucx_settings.h"

namespace kvferry {

// Process-wide figures, independent of any agent.
struct ProcessMemory {
  uint64_t rss_bytes = 0;             // smaps_rollup Rss
  uint64_t anonymous_bytes = 0;       // smaps_rollup Anonymous (resident)
  uint64_t shmem_rss_bytes = 0;       // smaps_rollup Pss_Shmem (resident shared memory)
  uint64_t mappings = 0;              // lines of /proc/self/maps
  uint64_t anonymous_mappings = 0;    // mappings with no file (heap and stacks included)
  uint64_t anonymous_mapped_bytes = 0;  // their virtual size
  uint64_t ucx_segments = 0;          // UCX shared-memory segments mapped (posix, sysv)
  uint64_t ucx_segment_bytes = 0;     // their virtual size
  uint64_t heap_system_bytes = 0;     // malloc_info: bytes malloc holds from the OS
  uint64_t heap_in_use_bytes = 0;     // malloc_info: bytes handed out (mallinfo2 main arena + others)
};

// Reads the figures above. kUnavailable when /proc cannot be read.
absl::StatusOr<ProcessMemory> ReadProcessMemory();

struct PoolMemory {
  std::string name;
  uint64_t registered_bytes = 0;
  uint64_t resident_bytes = 0;  // pages of the pool in RAM (mincore)
  uint32_t blocks_total = 0;
  uint32_t blocks_free = 0;
};

struct MemoryReport {
  absl::Time taken;
  std::string agent;
  ProcessMemory process;
  std::vector<PoolMemory> pools;
  uint64_t registered_bytes = 0;  // all pools
  // Resident anonymous memory nothing above accounts for:
  //   anonymous - heap_system - resident pool bytes
  // Thread stacks and the runtime's own small mappings sit here too (a few
  // MiB, steady); a growing figure is memory made below malloc.
  //
  // unexplained_signed_bytes is that difference as it is: negative when the
  // explained bytes exceed the anonymous ones (heap_system_bytes counts what
  // malloc holds, resident or not). Its slope shows growth from any starting
  // point, and the Watchdog fits it. unexplained_bytes is the same floored at
  // 0, the amount to report:
  //   unexplained_bytes == max(0, unexplained_signed_bytes)
  // JSON carries both ("unexplained_bytes", "unexplained_signed_bytes"), as
  // does Prometheus (kvferry_unexplained_bytes,
  // kvferry_unexplained_signed_bytes); the text adds the signed figure to the
  // unexplained line when it is negative.
  uint64_t unexplained_bytes = 0;
  int64_t unexplained_signed_bytes = 0;
  Stats live;        // the agent's live objects by kind
  UcxSettings ucx;   // hook mode and caches in force

  std::string ToText() const;
  std::string ToJson() const;
  // Prometheus text exposition format, kvferry_* names with HELP and TYPE.
  std::string ToPrometheus() const;
};

}  // namespace kvferry

#endif  // KVFERRY_MEMORY_REPORT_H_
