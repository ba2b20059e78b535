// PeerTable on its own, with real Peer objects: ids, names and the
// incarnation rule, ended peers and their bound, iteration while peers go.
#include "src/peer_table.h"

#include <algorithm>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "tests/test_util.h"

namespace kvferry::test {
namespace {

using internal::Peer;
using internal::PeerPtr;
using internal::PeerTable;
using internal::Tracked;
using ::testing::HasSubstr;
using ::testing::UnorderedElementsAre;
using Outcome = PeerTable::NameClaim::Outcome;

// A peer as the agent holds it once authenticated (TakeName not yet called).
PeerPtr MakePeer(const std::string& name = "", uint64_t incarnation = 0,
                 const std::string& address = "10.0.0.1:7000") {
  PeerPtr peer(new Peer(Tracked(), address, /*is_client=*/false));
  peer->set_name(name);
  peer->set_incarnation(incarnation);
  return peer;
}

// Adds `peer` and gives it its name, as an agent does at the end of a
// handshake that ClaimName allowed.
void AddNamed(PeerTable& table, const PeerPtr& peer) {
  table.Add(peer);
  ASSERT_EQ(table.ClaimName(peer->name(), peer->incarnation(), peer.get()).outcome, Outcome::kFree);
  table.TakeName(peer);
}

// The agent's close: the peer's last state and status, then removal.
void End(PeerTable& table, const PeerPtr& peer, PeerState state, absl::Status why) {
  peer->End(state, std::move(why));
  table.Remove(peer);
}

std::vector<uint64_t> Ids(const std::vector<PeerPtr>& peers) {
  std::vector<uint64_t> ids;
  for (const PeerPtr& p : peers) ids.push_back(p->id());
  std::sort(ids.begin(), ids.end());
  return ids;
}

TEST(PeerTableTest, IdsAreUniqueAndNeverReused) {
  PeerTable table;
  EXPECT_TRUE(table.empty());
  absl::flat_hash_set<uint64_t> seen;
  std::vector<PeerPtr> peers;
  for (int i = 0; i < 100; ++i) {
    PeerPtr p = MakePeer();
    table.Add(p);
    EXPECT_NE(p->id(), 0u);
    EXPECT_TRUE(seen.insert(p->id()).second) << "id " << p->id() << " given twice";
    peers.push_back(p);
    // Removing some as we go must not make their ids available again.
    if (i % 3 == 0) table.Remove(p);
  }
  EXPECT_EQ(table.size(), 66u);
  for (const PeerPtr& p : peers) {
    if (p->id() % 3 == 1) {  // the i % 3 == 0 ones (ids start at 1)
      EXPECT_EQ(table.FindById(p->id()), nullptr) << p->id();
    } else {
      EXPECT_EQ(table.FindById(p->id()), p) << p->id();
    }
  }
}

TEST(PeerTableTest, NameIsHeldOnlyOnceAuthenticated) {
  PeerTable table;
  PeerPtr p = MakePeer("prefill", 5);
  table.Add(p);
  // Held by id, but not by name until TakeName.
  EXPECT_EQ(table.FindById(p->id()), p);
  EXPECT_EQ(table.Find("prefill"), nullptr);
  EXPECT_TRUE(table.Named().empty());
  table.TakeName(p);
  EXPECT_EQ(table.Find("prefill"), p);
  EXPECT_EQ(table.Find("decode"), nullptr);
  std::vector<PeerPtr> named(table.Named().begin(), table.Named().end());
  EXPECT_THAT(named, UnorderedElementsAre(p));
  // An unauthenticated peer beside it takes no name.
  PeerPtr anonymous = MakePeer();
  table.Add(anonymous);
  EXPECT_EQ(table.Named().size(), 1u);
  EXPECT_EQ(table.size(), 2u);
  // The holder claiming its own name again is not a conflict.
  EXPECT_EQ(table.ClaimName("prefill", 5, p.get()).outcome, Outcome::kFree);
}

TEST(PeerTableTest, NewerIncarnationReplacesTheOlder) {
  PeerTable table;
  PeerPtr old_one = MakePeer("prefill", 100, "10.0.0.1:7000");
  AddNamed(table, old_one);
  PeerPtr new_one = MakePeer("prefill", 101, "10.0.0.1:7001");
  table.Add(new_one);

  PeerTable::NameClaim claim = table.ClaimName("prefill", 101, new_one.get());
  ASSERT_EQ(claim.outcome, Outcome::kReplace);
  EXPECT_FALSE(claim.refused());
  EXPECT_EQ(claim.holder, old_one);  // the one to fail
  EXPECT_TRUE(claim.refusal.ok());
  // Claiming changes nothing by itself.
  EXPECT_EQ(table.Find("prefill"), old_one);

  // The agent fails the older one (which records it as ended), then the
  // newer takes the name, and the ended entry goes.
  End(table, claim.holder, PeerState::kFailed, absl::UnavailableError("restarted"));
  ASSERT_NE(table.FindEnded("prefill"), nullptr);
  table.TakeName(new_one);
  EXPECT_EQ(table.Find("prefill"), new_one);
  EXPECT_EQ(table.FindEnded("prefill"), nullptr);
  EXPECT_EQ(table.FindById(old_one->id()), nullptr);
  EXPECT_EQ(table.size(), 1u);
}

TEST(PeerTableTest, SameOrOlderIncarnationIsRefused) {
  PeerTable table;
  PeerPtr holder = MakePeer("prefill", 100, "10.0.0.1:7000");
  AddNamed(table, holder);
  for (uint64_t incarnation : {uint64_t{100}, uint64_t{99}, uint64_t{1}}) {
    SCOPED_TRACE(incarnation);
    PeerPtr other = MakePeer("prefill", incarnation, "10.0.0.2:7000");
    table.Add(other);
    PeerTable::NameClaim claim = table.ClaimName("prefill", incarnation, other.get());
    ASSERT_EQ(claim.outcome, Outcome::kRefuse);
    EXPECT_TRUE(claim.refused());
    EXPECT_EQ(claim.holder, holder);
    EXPECT_THAT(claim.refusal, StatusIs(absl::StatusCode::kAlreadyExists,
                                        "an agent named 'prefill' is already connected"));
    const std::string message(claim.refusal.message());
    EXPECT_THAT(message, HasSubstr("10.0.0.1:7000"));
    EXPECT_THAT(message, HasSubstr("incarnation 100"));
    const char* verdict = incarnation == 100 ? " is the same" : " is older";
    EXPECT_THAT(message, HasSubstr(absl::StrCat("incarnation ", incarnation, verdict)));
    // The refused one is dropped (never named): the holder keeps its name
    // and nothing is recorded as ended.
    table.Remove(other);
    EXPECT_EQ(table.Find("prefill"), holder);
    EXPECT_EQ(table.FindEnded("prefill"), nullptr);
  }
  // A claim with no claimant (a peer not yet in the table) gets the same
  // verdicts.
  EXPECT_EQ(table.ClaimName("prefill", 100, nullptr).outcome, Outcome::kRefuse);
  EXPECT_EQ(table.ClaimName("prefill", 101, nullptr).outcome, Outcome::kReplace);
  EXPECT_EQ(table.ClaimName("decode", 1, nullptr).outcome, Outcome::kFree);
}

TEST(PeerTableTest, EndedPeersKeepTheirStatusUntilTheNameIsTakenAgain) {
  PeerTable table;
  PeerPtr p = MakePeer("decode", 7, "10.0.0.3:9000");
  AddNamed(table, p);
  EXPECT_EQ(table.FindEnded("decode"), nullptr);
  End(table, p, PeerState::kFailed, absl::UnavailableError("peer 'decode' sent nothing"));
  EXPECT_EQ(table.Find("decode"), nullptr);
  EXPECT_TRUE(table.empty());
  const PeerInfo* ended = table.FindEnded("decode");
  ASSERT_NE(ended, nullptr);
  EXPECT_EQ(ended->name, "decode");
  EXPECT_EQ(ended->state, PeerState::kFailed);
  EXPECT_THAT(ended->status, StatusIs(absl::StatusCode::kUnavailable, "sent nothing"));
  EXPECT_EQ(ended->incarnation, 7u);
  EXPECT_EQ(ended->address, "10.0.0.3:9000");
  // Removing it again changes nothing.
  table.Remove(p);
  EXPECT_EQ(table.ended_size(), 1u);
  // An unauthenticated peer leaves no ended entry.
  PeerPtr anonymous = MakePeer();
  table.Add(anonymous);
  End(table, anonymous, PeerState::kFailed, absl::DeadlineExceededError("no HELLO"));
  EXPECT_EQ(table.ended_size(), 1u);
  // Clear forgets the live peers but not the ended ones.
  PeerPtr live = MakePeer("prefill", 1);
  AddNamed(table, live);
  table.Clear();
  EXPECT_TRUE(table.empty());
  EXPECT_EQ(table.Find("prefill"), nullptr);
  EXPECT_NE(table.FindEnded("decode"), nullptr);
  // Reconnected: the name is live again, the ended entry gone.
  PeerPtr again = MakePeer("decode", 8);
  AddNamed(table, again);
  EXPECT_EQ(table.FindEnded("decode"), nullptr);
  EXPECT_EQ(table.ended_size(), 0u);
}

TEST(PeerTableTest, EndedPeersAreBoundedDroppingTheOldest) {
  constexpr size_t kMax = 4;
  PeerTable table(kMax);
  EXPECT_EQ(table.max_ended(), kMax);
  auto end_named = [&](const std::string& name) {
    PeerPtr p = MakePeer(name, 1);
    AddNamed(table, p);
    End(table, p, PeerState::kClosed, absl::CancelledError(name));
  };
  for (int i = 0; i < 4; ++i) end_named(absl::StrCat("p", i));
  EXPECT_EQ(table.ended_size(), kMax);
  // p0 ends again: it becomes the newest, so p1 is now the oldest.
  end_named("p0");
  EXPECT_EQ(table.ended_size(), kMax);
  end_named("p4");
  EXPECT_EQ(table.ended_size(), kMax);
  EXPECT_EQ(table.FindEnded("p1"), nullptr);
  for (const char* name : {"p0", "p2", "p3", "p4"}) {
    ASSERT_NE(table.FindEnded(name), nullptr) << name;
    EXPECT_THAT(table.FindEnded(name)->status, StatusIs(absl::StatusCode::kCancelled, name));
  }
  // A name taken again leaves the list; the next one to end takes no one's
  // place.
  AddNamed(table, MakePeer("p2", 2));
  EXPECT_EQ(table.ended_size(), kMax - 1);
  end_named("p5");
  EXPECT_EQ(table.ended_size(), kMax);
  for (const char* name : {"p0", "p3", "p4", "p5"}) {
    EXPECT_NE(table.FindEnded(name), nullptr) << name;
  }
  // Many more: never past the bound, and the newest are the ones kept.
  for (int i = 6; i < 1000; ++i) end_named(absl::StrCat("p", i));
  EXPECT_EQ(table.ended_size(), kMax);
  for (int i = 996; i < 1000; ++i) {
    EXPECT_NE(table.FindEnded(absl::StrCat("p", i)), nullptr) << i;
  }
  EXPECT_EQ(table.FindEnded("p995"), nullptr);
}

TEST(PeerTableTest, RemovingAReplacedPeerKeepsTheNewerOnesName) {
  PeerTable table;
  PeerPtr old_one = MakePeer("prefill", 1);
  AddNamed(table, old_one);
  PeerPtr new_one = MakePeer("prefill", 2);
  table.Add(new_one);
  ASSERT_EQ(table.ClaimName("prefill", 2, new_one.get()).outcome, Outcome::kReplace);
  // Here the newer one takes the name while the older is still held (the
  // older loses the name); the older one's removal must leave it alone.
  table.TakeName(new_one);
  End(table, old_one, PeerState::kFailed, absl::UnavailableError("restarted"));
  EXPECT_EQ(table.Find("prefill"), new_one);
  EXPECT_EQ(table.FindEnded("prefill"), nullptr);
  EXPECT_EQ(table.FindById(old_one->id()), nullptr);
  EXPECT_EQ(table.FindById(new_one->id()), new_one);
  // Its own removal does record it.
  End(table, new_one, PeerState::kClosed, absl::CancelledError("bye"));
  ASSERT_NE(table.FindEnded("prefill"), nullptr);
  EXPECT_EQ(table.FindEnded("prefill")->incarnation, 2u);
}

TEST(PeerTableTest, SnapshotSurvivesRemovalWhileIterating) {
  PeerTable table;
  std::vector<PeerPtr> peers;
  for (int i = 0; i < 50; ++i) {
    PeerPtr p = MakePeer(absl::StrCat("p", i), 1);
    AddNamed(table, p);
    peers.push_back(p);
  }
  std::vector<PeerPtr> snapshot = table.Snapshot();
  EXPECT_EQ(Ids(snapshot), Ids(peers));
  // Remove every peer while walking the snapshot, and add new ones: each
  // one of the snapshot is visited once, with its fields intact (the
  // snapshot holds references).
  int visited = 0;
  for (const PeerPtr& p : snapshot) {
    ++visited;
    End(table, p, PeerState::kClosed, absl::CancelledError("shutdown"));
    table.Add(MakePeer());
  }
  EXPECT_EQ(visited, 50);
  EXPECT_EQ(table.size(), 50u);
  EXPECT_TRUE(table.Named().empty());
  for (const PeerPtr& p : peers) {
    EXPECT_EQ(table.FindById(p->id()), nullptr);
    EXPECT_NE(table.FindEnded(p->name()), nullptr) << p->name();
  }
  // All() walks exactly the peers held now.
  std::vector<PeerPtr> now(table.All().begin(), table.All().end());
  EXPECT_EQ(Ids(now), Ids(table.Snapshot()));
  EXPECT_EQ(now.size(), 50u);
}

}  // namespace
}  // namespace kvferry::test
