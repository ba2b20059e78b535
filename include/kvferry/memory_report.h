// MemoryReport: what this process's memory is made of, including the parts a
// heap profiler cannot see (anonymous mappings made below malloc, registered
// KV pools, UCX's shared-memory segments), and how much of the resident,
// anonymous memory nothing accounts for ("unexplained").
//
// Pools in shared memory (AgentOptions::pool_memory = kUcxAllocated with a
// shared-memory transport: a System V segment, "/SYSV00000000 (deleted)" in
// /proc/self/maps) are shared memory to the kernel, not anonymous memory:
// their resident pages show in shmem_rss_bytes (and RSS), not in
// anonymous_bytes, so they are not subtracted from the anonymous bytes; and
// the agent's own pool segments count as pool_segments, not ucx_segments.
// A peer's pool that this process maps (UCX attaches it when the peer's
// remote key is unpacked, for shm-direct transfers) is a UCX segment here,
// as are the segments of another agent's pools in the same process.
//
// Sources: /proc/self/smaps_rollup (RSS, anonymous, shared memory),
// /proc/self/maps (mapping counts, UCX segments), malloc_info (every malloc
// arena), mincore over each pool (its resident bytes), the agent's ledger.
// Tolerance against /proc/self/status (VmRSS, RssAnon): the two are read at
// different instants, so they agree within 1% + 8 MiB.
//
// A plain value; reading one reads /proc and runs mincore over every pool
// page (one byte per page), so it is not for a per-request path.
// Thread-compatible.
#ifndef KVFERRY_MEMORY_REPORT_H_
#define KVFERRY_MEMORY_REPORT_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kvferry/ledger.h"
#include "kvferry/listener_stats.h"
#include "kvferry/ucx_settings.h"
#include "kvferry/work_stats.h"

namespace kvferry {

// Process-wide figures, independent of any agent.
struct ProcessMemory {
  uint64_t rss_bytes = 0;             // smaps_rollup Rss
  uint64_t anonymous_bytes = 0;       // smaps_rollup Anonymous (resident)
  uint64_t shmem_rss_bytes = 0;       // smaps_rollup Pss_Shmem (resident shared memory)
  uint64_t mappings = 0;              // lines of /proc/self/maps
  uint64_t anonymous_mappings = 0;    // mappings with no file (heap and stacks included)
  uint64_t anonymous_mapped_bytes = 0;  // their virtual size
  // UCX shared-memory segments mapped (posix, sysv): UCX's FIFOs and receive
  // buffers, peers' segments (their FIFOs, and their pools while their remote
  // keys are held). Not the calling agent's own pools (pool_segments).
  uint64_t ucx_segments = 0;
  uint64_t ucx_segment_bytes = 0;     // their virtual size
  // Mappings of the calling agent's pools that are UCX shared-memory
  // segments (0 when ReadProcessMemory was given no pools).
  uint64_t pool_segments = 0;
  uint64_t pool_segment_bytes = 0;    // their virtual size
  uint64_t heap_system_bytes = 0;     // malloc_info: bytes malloc holds from the OS
  uint64_t heap_in_use_bytes = 0;     // malloc_info: bytes handed out (mallinfo2 main arena + others)
};

// An address range [begin, end).
struct AddressRange {
  uint64_t begin = 0;
  uint64_t end = 0;
};

// Reads the figures above. Shared-memory mappings that lie inside one of
// `own_pools` (the calling agent's pools) count as pool segments rather than
// UCX segments. kUnavailable when /proc cannot be read.
absl::StatusOr<ProcessMemory> ReadProcessMemory(std::span<const AddressRange> own_pools = {});

struct PoolMemory {
  std::string name;
  uint64_t registered_bytes = 0;  // what UCX mapped (a UCX-allocated pool: rounded up to pages)
  // Pages of the pool in RAM (mincore). For a shared-memory pool that
  // includes pages only a peer has touched (its shm-direct writes), which are
  // in no RSS of this process until this process touches them.
  uint64_t resident_bytes = 0;
  std::string backing;         // KvPool::backing(): "ucx-sysv", "anonymous-mmap", ...
  bool shared_memory = false;  // KvPool::shared_memory(): not anonymous memory
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
  //   anonymous - heap_system - resident bytes of the pools in anonymous
  //   memory (shared_memory pools are not anonymous memory)
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
  // What its listener did (Prometheus: kvferry_listener_*_total counters and
  // kvferry_listener_accept_paused).
  ListenerStats listener;
  UcxSettings ucx;   // hook mode and caches in force
  // The agent's work: transfers, offers, peers, notifications (Prometheus:
  // kvferry_transfers_total and the rest, docs/operations.md).
  WorkStats work;

  std::string ToText() const;
  std::string ToJson() const;
  // Prometheus text exposition format, kvferry_* names with HELP and TYPE.
  std::string ToPrometheus() const;
};

}  // namespace kvferry

#endif  // KVFERRY_MEMORY_REPORT_H_
