// Prepared descriptor lists: a list of blocks of one pool, resolved once
// (Agent::Prepare), then named by index in many transfers
// (Agent::PostPrepared) without looking up the peer or the pool by name and
// without planning the copies again.
//
// A list is either local (blocks of a pool of this agent, kvferry's or
// engine-registered) or remote (blocks of a connected peer's exported
// pool). Each entry, a descriptor, is one block, or with a slice
// (PrepareSpec::slice_bytes) the same byte range of each of that block's
// chunks. Its addresses are computed when the list is prepared.
//
// What a list holds: a local list holds its pool's state (as a BlockSet
// does), so the pool's memory stays registered until the list is
// destroyed, even after RemovePool (a post on it then fails). A remote list
// holds no endpoint and no remote key of the peer: it remembers which
// connection and which announcement of the pool it was prepared on, and a
// post checks that they are still current. When the peer failed, closed,
// restarted or replaced the pool since, the post is refused with the reason
// (see Agent::PostPrepared) and nothing moves.
//
// Ownership: a list is counted by its agent's ledger
// (ResourceKind::kPreparedList) from Prepare until it is destroyed; one
// alive when its agent is destroyed is a survivor (see agent.h).
//
// Thread safety: a PreparedList is immutable; const methods and posts on
// one list may run from any number of threads at once. Moving or
// destroying it needs external synchronization.
#ifndef KVFERRY_PREPARED_H_
#define KVFERRY_PREPARED_H_

#include <cstdint>
#include <limits>
#include <span>
#include <string>

#include <boost/smart_ptr/intrusive_ptr.hpp>

#include "kvferry/transfer.h"

namespace kvferry {

struct PrepareSpec {
  // Empty: a local list of pool `pool` of this agent. Otherwise a remote
  // list of pool `pool` of connected peer `peer`.
  std::string peer;
  std::string pool;
  // The blocks, one descriptor each, in this order. An id may appear more
  // than once. Ids past the pool are kOutOfRange. REQUIRES: valid for the
  // Prepare call (it copies them).
  std::span<const uint32_t> blocks;
  // 0 (the default): each descriptor is the block's whole chunks. Otherwise
  // slice_bytes bytes from slice_offset inside each chunk of the block (a
  // tensor-parallel rank's heads, see TransferSpec::slice_bytes): both must
  // be whole heads (KvLayout::head_bytes()) and inside the chunk.
  uint64_t slice_offset = 0;
  uint64_t slice_bytes = 0;
};

// Options of one post on prepared lists.
struct PreparedPost {
  TransferOp op = TransferOp::kRead;
  // Delivered to the peer after the data, as TransferSpec::notification.
  // Empty (the default): none. At most 64 KiB.
  std::string notification;
  // Layers [layer_begin, layer_end) move; the default is all of them.
  uint32_t layer_begin = 0;
  uint32_t layer_end = std::numeric_limits<uint32_t>::max();
};

namespace internal {
class PreparedCore;
class Access;
}  // namespace internal

class PreparedList {
 public:
  // The special members are defined in the library.
  PreparedList() noexcept;
  PreparedList(PreparedList&&) noexcept;
  PreparedList& operator=(PreparedList&&) noexcept;
  PreparedList(const PreparedList&) = delete;
  PreparedList& operator=(const PreparedList&) = delete;
  ~PreparedList();

  bool empty() const { return core_ == nullptr; }
  // Descriptors in the list; 0 for an empty handle.
  size_t size() const;
  // Whether it names a peer's pool; false for an empty handle.
  bool remote() const;
  // The peer's name (empty for a local list) and the pool's name.
  const std::string& peer() const;
  const std::string& pool() const;

 private:
  friend class Agent;
  friend class internal::Access;
  explicit PreparedList(boost::intrusive_ptr<internal::PreparedCore> core) noexcept;
  boost::intrusive_ptr<internal::PreparedCore> core_;
};

}  // namespace kvferry

#endif  // KVFERRY_PREPARED_H_
