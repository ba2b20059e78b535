#include "src/peer_table.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace kvferry::internal {

PeerTable::PeerTable(size_t max_ended) : max_ended_(max_ended == 0 ? 1 : max_ended) {}

void PeerTable::Add(const PeerPtr& peer) {
  peer->set_id(next_id_++);
  by_id_[peer->id()] = peer;
}

PeerPtr PeerTable::FindById(uint64_t id) const {
  auto it = by_id_.find(id);
  return it == by_id_.end() ? nullptr : it->second;
}

std::vector<PeerPtr> PeerTable::Snapshot() const {
  std::vector<PeerPtr> peers;
  peers.reserve(by_id_.size());
  for (const auto& [id, peer] : by_id_) peers.push_back(peer);
  return peers;
}

PeerPtr PeerTable::Find(absl::string_view name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : it->second;
}

PeerTable::NameClaim PeerTable::ClaimName(absl::string_view name, uint64_t incarnation,
                                          const Peer* claimant) const {
  NameClaim claim;
  PeerPtr holder = Find(name);
  if (holder == nullptr || holder.get() == claimant) return claim;
  claim.holder = holder;
  if (holder->incarnation() < incarnation) {
    claim.outcome = NameClaim::Outcome::kReplace;
    return claim;
  }
  claim.outcome = NameClaim::Outcome::kRefuse;
  claim.refusal = absl::AlreadyExistsError(
      absl::StrCat("an agent named '", name, "' is already connected (from ", holder->address,
                   ", incarnation ", holder->incarnation(), "; incarnation ", incarnation,
                   holder->incarnation() == incarnation ? " is the same)" : " is older)"));
  return claim;
}

void PeerTable::TakeName(const PeerPtr& peer) {
  by_name_[peer->name()] = peer;
  ForgetEnded(peer->name());
}

void PeerTable::Remove(const PeerPtr& peer) {
  PeerPtr keep = peer;  // `peer` may refer into a map entry erased below
  by_id_.erase(keep->id());
  if (keep->name().empty()) return;
  auto it = by_name_.find(keep->name());
  if (it == by_name_.end() || it->second != keep) return;  // replaced, or never named
  by_name_.erase(it);
  ForgetEnded(keep->name());
  if (ended_.size() >= max_ended_) {
    auto oldest = ended_order_.begin();
    ended_.erase(oldest->second);
    ended_order_.erase(oldest);
  }
  const uint64_t sequence = next_ended_sequence_++;
  ended_order_.emplace(sequence, keep->name());
  ended_[keep->name()] = Ended{.info = keep->Info(), .sequence = sequence};
}

void PeerTable::Clear() {
  by_id_.clear();
  by_name_.clear();
}

const PeerInfo* PeerTable::FindEnded(absl::string_view name) const {
  auto it = ended_.find(name);
  return it == ended_.end() ? nullptr : &it->second.info;
}

void PeerTable::ForgetEnded(absl::string_view name) {
  auto it = ended_.find(name);
  if (it == ended_.end()) return;
  ended_order_.erase(it->second.sequence);
  ended_.erase(it);
}

}  // namespace kvferry::internal
