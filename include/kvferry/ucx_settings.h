// The UCX memory settings in force for an Agent, as an operator needs to see
// them. kvferry registers KV memory explicitly, so it needs neither UCX's
// registration cache nor its memory-type cache; both are off by default in
// every context kvferry creates, unless the user set them in the environment.
// UCX's mmap hooks load with UCX, before main, so a library cannot switch them
// off: only UCX_MEM_MMAP_HOOK_MODE=none in the environment before the process
// starts does. The report says which mode is really in force.
#ifndef KVFERRY_UCX_SETTINGS_H_
#define KVFERRY_UCX_SETTINGS_H_

#include <string>

namespace kvferry {

struct UcxSettings {
  std::string ucx_version;      // e.g. "1.13.1"
  std::string mmap_hook_mode;   // in force in this process: none, reloc, bistro
  bool mmap_hook_from_env = false;  // UCX_MEM_MMAP_HOOK_MODE was set
  std::string rcache;           // RCACHE_ENABLE in this context: "n", "try", ...
  bool rcache_from_user = false;    // set by the user (environment or options)
  std::string memtype_cache;    // MEMTYPE_CACHE in this context
  bool memtype_cache_from_user = false;
  // MM_ERROR_HANDLING (posix and sysv): "y" from kvferry, or what the user set.
  std::string shm_error_handling;
  bool shm_error_handling_from_user = false;
  // KEEPALIVE_INTERVAL: how often UCX checks the peers of its endpoints. UCX
  // frees what a departed peer left in this process (the peer's shared-memory
  // segments, its half of the wireup) only at such a check, so kvferry sets
  // it to peer_timeout / 4 (UCX's default is 20 s) unless the user set it.
  std::string keepalive_interval;
  bool keepalive_interval_from_user = false;
  // ALLOC_PRIO: where memory UCX allocates for kvferry's pools comes from
  // (AgentOptions::pool_memory = kUcxAllocated). kvferry sets "md:sysv,mmap":
  // a System V segment of UCX's sysv transport, which peers on this host map
  // directly, else plain anonymous memory. UCX's default list would continue
  // with posix (which writes the whole pool into /dev/shm at creation, so a
  // pool too large for it fills /dev/shm first), hugetlb, THP (memory from
  // malloc) and the heap (not page-aligned). "unused (...)" when the agent's
  // pools are not UCX-allocated.
  std::string alloc_prio;
  bool alloc_prio_from_user = false;

  // One line, e.g. "ucx=1.13.1 mmap_hook_mode=bistro(default) rcache=n(kvferry) ..."
  std::string ToString() const;
};

}  // namespace kvferry

#endif  // KVFERRY_UCX_SETTINGS_H_
