// internal::PeerTable: the peers an agent knows, by connection id and, once
// authenticated, by name; and the last word of peers that ended, so that
// GetPeer can still say why.
//
// Thread-compatible: it has no lock of its own. The owner serializes every
// call (AgentImpl holds it under mu_). The methods that read or write Peer
// fields require kAgentControl, the role that guards them
// (src/agent_role.h).
//
// Invariants:
//  - Every peer held has a distinct id; ids start at 1, increase, and are
//    never reused by one table.
//  - A name is held by at most one peer, and only by a peer also held by id.
//  - A name is in the ended list only while no peer holds it; at most
//    `max_ended` names are there, and past that the one that ended first is
//    dropped.
//
// The incarnation rule (one connection per agent name): an authenticated
// peer may take a free name; a newer incarnation of the holder replaces it
// (the holder is to be failed: the process behind it restarted); the same
// or an older incarnation is refused with kAlreadyExists.
#ifndef KVFERRY_SRC_PEER_TABLE_H_
#define KVFERRY_SRC_PEER_TABLE_H_

#include <cstddef>
#include <cstdint>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "src/agent_role.h"
#include "src/peer.h"

namespace kvferry::internal {

class PeerTable {
 public:
  // How many ended peers a table keeps unless told otherwise.
  static constexpr size_t kDefaultMaxEnded = 1024;

  // A max_ended of 0 is taken as 1.
  explicit PeerTable(size_t max_ended = kDefaultMaxEnded);
  PeerTable(const PeerTable&) = delete;
  PeerTable& operator=(const PeerTable&) = delete;

  // The values of one of the table's maps, as `const PeerPtr&`. Valid until
  // the table next changes: a pass that may add or remove peers (closing
  // one removes it) iterates a Snapshot() instead.
  template <typename Map>
  class Range {
   public:
    class iterator {
     public:
      using iterator_category = std::forward_iterator_tag;
      using value_type = PeerPtr;
      using difference_type = std::ptrdiff_t;
      using pointer = const PeerPtr*;
      using reference = const PeerPtr&;
      iterator() = default;
      explicit iterator(typename Map::const_iterator it) : it_(it) {}
      reference operator*() const { return it_->second; }
      pointer operator->() const { return &it_->second; }
      iterator& operator++() {
        ++it_;
        return *this;
      }
      iterator operator++(int) {
        iterator old = *this;
        ++it_;
        return old;
      }
      friend bool operator==(const iterator& a, const iterator& b) { return a.it_ == b.it_; }
      friend bool operator!=(const iterator& a, const iterator& b) { return a.it_ != b.it_; }

     private:
      typename Map::const_iterator it_;
    };
    explicit Range(const Map& map) : map_(&map) {}
    iterator begin() const { return iterator(map_->begin()); }
    iterator end() const { return iterator(map_->end()); }
    size_t size() const { return map_->size(); }
    bool empty() const { return map_->empty(); }

   private:
    const Map* map_;
  };
  using ById = absl::flat_hash_map<uint64_t, PeerPtr>;
  using ByName = absl::flat_hash_map<std::string, PeerPtr>;

  // What ClaimName decided.
  struct NameClaim {
    enum class Outcome {
      kFree,     // nobody else holds the name: TakeName may take it
      kReplace,  // `holder` is an older incarnation: fail it, then TakeName
      kRefuse,   // `holder` is the same or a newer incarnation: refuse
    };
    Outcome outcome = Outcome::kFree;
    // kReplace and kRefuse: the peer that holds the name now.
    PeerPtr holder;
    // kRefuse: kAlreadyExists naming the name, the holder's address and
    // both incarnations. OK otherwise.
    absl::Status refusal;

    bool refused() const { return outcome == Outcome::kRefuse; }
  };

  // --- Peers by connection id (authenticated or not).

  // Gives `peer` the next id (in peer->id) and holds it.
  // REQUIRES: peer is not null and not held already.
  void Add(const PeerPtr& peer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl);
  // Null if no peer with that id is held.
  PeerPtr FindById(uint64_t id) const;
  bool empty() const { return by_id_.empty(); }
  size_t size() const { return by_id_.size(); }
  // Every peer held, in no particular order (see Range).
  Range<ById> All() const { return Range<ById>(by_id_); }
  // A copy of All(): safe to iterate while peers are added or removed.
  std::vector<PeerPtr> Snapshot() const;

  // --- Authenticated peers by name.

  // The peer holding `name`, or null.
  PeerPtr Find(absl::string_view name) const;
  // Every peer holding a name, in no particular order (see Range).
  Range<ByName> Named() const { return Range<ByName>(by_name_); }

  // The incarnation rule for a peer that proved it is agent `name` at
  // `incarnation`. `claimant` (may be null) is the peer asking: holding the
  // name already counts as kFree. Changes nothing.
  NameClaim ClaimName(absl::string_view name, uint64_t incarnation,
                      const Peer* claimant) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl);
  // Gives peer->name to `peer` and forgets the name's ended entry. A peer
  // that ClaimName said to replace must have been removed first (a holder
  // still there merely loses the name; it is not recorded as ended).
  // REQUIRES: peer is held by id; peer->name is not empty.
  void TakeName(const PeerPtr& peer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl);

  // --- Removal and ended peers.

  // Forgets `peer`: by id, and by name if it still holds its name (not if a
  // newer incarnation took it); then its Info() is kept as the name's ended
  // entry. Removing a peer not held does nothing.
  void Remove(const PeerPtr& peer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(kAgentControl);
  // Forgets every peer held, by id and by name; the ended entries stay.
  void Clear();
  // The last Info() of the peer that held `name`, once it ended and while no
  // peer holds the name; null otherwise.
  const PeerInfo* FindEnded(absl::string_view name) const;
  size_t ended_size() const { return ended_.size(); }
  size_t max_ended() const { return max_ended_; }

 private:
  struct Ended {
    PeerInfo info;
    uint64_t sequence = 0;  // its key in ended_order_
  };
  void ForgetEnded(absl::string_view name);

  const size_t max_ended_;
  uint64_t next_id_ = 1;
  ById by_id_;
  ByName by_name_;
  absl::flat_hash_map<std::string, Ended> ended_;
  // The names in ended_, the one that ended first first.
  std::map<uint64_t, std::string> ended_order_;
  uint64_t next_ended_sequence_ = 0;
};

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_PEER_TABLE_H_
