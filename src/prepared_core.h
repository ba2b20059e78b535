// PreparedCore: the state behind a PreparedList (kvferry/prepared.h).
//
// Everything a post needs from one side, computed once by Agent::Prepare:
// per descriptor the byte offset of its chunk (or slice) from block 0 of a
// plane, and per (layer, plane) the region and offset of that plane, so a
// copy's offset is one addition. A local list holds its pool (the pool's
// state, not its name). A remote list holds nothing of the peer's: the
// connection it was prepared on (Peer::id), the identity of the pool's keys
// then (a RemotePoolKeys address, compared, never dereferenced) and the
// descriptor they were unpacked from; a post finds the current keys of that
// connection and uses them only if they are that announcement with that
// descriptor. So a list never keeps an endpoint or a remote key alive.
//
// Thread safety: immutable after construction (its contents are private
// and const, read through const accessors), so any thread may read it
// without a lock; the reference count is atomic.
#ifndef KVFERRY_SRC_PREPARED_CORE_H_
#define KVFERRY_SRC_PREPARED_CORE_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <boost/smart_ptr/intrusive_ptr.hpp>
#include <boost/smart_ptr/intrusive_ref_counter.hpp>

#include "kvferry/kv_layout.h"
#include "kvferry/prepared.h"
#include "src/pool_core.h"
#include "src/region_map.h"
#include "src/tracked.h"
#include "src/transfer_core.h"
#include "src/wire/message.h"

namespace kvferry::internal {

class PreparedCore
    : public boost::intrusive_ref_counter<PreparedCore, boost::thread_safe_counter> {
 public:
  // What Agent::Prepare computed, handed over whole at construction.
  struct Contents {
    // The agent that prepared it (compared, not called; held so that no
    // later agent's link can take its address).
    boost::intrusive_ptr<AgentLink> agent;
    bool remote = false;
    std::string peer;  // empty for a local list
    std::string pool;
    KvLayout layout;
    uint64_t num_regions = 0;
    uint64_t slice_offset = 0;
    uint64_t bytes = 0;  // of each copy: the slice, or the chunk
    std::vector<uint32_t> blocks;
    std::vector<uint64_t> offsets;  // per descriptor, from block 0 of a plane
    std::vector<PlaneAt> planes;    // per layer * num_planes() + plane
    // A local list: its pool.
    PoolCorePtr local_pool;
    // A remote list: what it was prepared on.
    uint64_t peer_id = 0;
    const void* keys = nullptr;
    wire::PoolDescriptor desc;
  };

  PreparedCore(Tracked tracked, Contents contents)
      : contents_(std::move(contents)), tracked_(std::move(tracked)) {}
  PreparedCore(const PreparedCore&) = delete;
  PreparedCore& operator=(const PreparedCore&) = delete;

  const boost::intrusive_ptr<AgentLink>& agent() const { return contents_.agent; }
  bool remote() const { return contents_.remote; }
  const std::string& peer() const { return contents_.peer; }
  const std::string& pool() const { return contents_.pool; }
  const KvLayout& layout() const { return contents_.layout; }
  uint64_t num_regions() const { return contents_.num_regions; }
  uint64_t slice_offset() const { return contents_.slice_offset; }
  uint64_t bytes() const { return contents_.bytes; }
  const std::vector<uint32_t>& blocks() const { return contents_.blocks; }
  const std::vector<uint64_t>& offsets() const { return contents_.offsets; }
  const std::vector<PlaneAt>& planes() const { return contents_.planes; }
  const PoolCorePtr& local_pool() const { return contents_.local_pool; }
  uint64_t peer_id() const { return contents_.peer_id; }
  const void* keys() const { return contents_.keys; }
  const wire::PoolDescriptor& desc() const { return contents_.desc; }

 private:
  const Contents contents_;
  Tracked tracked_;
};

using PreparedCorePtr = boost::intrusive_ptr<PreparedCore>;

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_PREPARED_CORE_H_
