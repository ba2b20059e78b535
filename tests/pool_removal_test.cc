// Agent::RemovePool: a pool removed while the agent and its connections
// live. Real agents over shared memory and TCP; the peer that removes and
// re-registers its pool runs in another process (kvferry_test_peer).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "kvferry/agent.h"
#include "src/wire/message.h"
#include "tests/child_process.h"
#include "tests/kv_pattern.h"
#include "tests/test_util.h"
#include "tests/transports.h"

namespace kvferry::test {
namespace {

using ::testing::Contains;
using ::testing::Not;

constexpr absl::Duration kDeadline = absl::Seconds(60);

// Page-aligned memory an engine owns; freed by the test, after the agent.
struct EngineMemory {
  explicit EngineMemory(uint64_t size)
      : bytes(size), base(static_cast<std::byte*>(std::aligned_alloc(4096, size))) {
    std::memset(base, 0, bytes);
  }
  ~EngineMemory() { std::free(base); }
  EngineMemory(const EngineMemory&) = delete;
  EngineMemory& operator=(const EngineMemory&) = delete;
  KvRegion region() const { return {base, bytes}; }
  uint64_t bytes;
  std::byte* base;
};

// Whether block `block` of a single-region pool at `base` holds the pattern
// of (seed, tag).
bool BlockHolds(const std::byte* base, const KvLayout& l, uint32_t block, uint64_t seed,
                uint32_t tag) {
  for (uint32_t layer = 0; layer < l.num_layers; ++layer) {
    for (uint32_t plane = 0; plane < l.num_planes(); ++plane) {
      const std::byte* chunk = base + l.Offset(layer, plane, block);
      for (uint64_t w = 0; w < l.chunk_bytes() / 8; ++w) {
        uint64_t v;
        std::memcpy(&v, chunk + w * 8, 8);
        if (v != PatternWord(seed, tag, layer, plane, w)) return false;
      }
    }
  }
  return true;
}

std::vector<std::string> PeerPools(const Agent& agent, const std::string& peer) {
  auto info = agent.GetPeer(peer);
  return info.ok() ? info->pools : std::vector<std::string>{"<" + info.status().ToString() + ">"};
}

std::vector<std::string> ReportedPools(const Agent& agent) {
  std::vector<std::string> names;
  auto report = agent.GetMemoryReport();
  EXPECT_THAT(report, IsOk());
  if (report.ok()) {
    for (const PoolMemory& p : report->pools) names.push_back(p.name);
  }
  return names;
}

// Two agents in this process: `a` listens, `b` connects to it.
class PoolRemovalTest : public ::testing::TestWithParam<Transport> {
 protected:
  void SetUp() override {
    auto a = Agent::Create(TestAgentOptions("a", GetParam()));
    ASSERT_THAT(a, IsOk());
    a_ = *std::move(a);
    auto b = Agent::Create(TestAgentOptions("b", GetParam()));
    ASSERT_THAT(b, IsOk());
    b_ = *std::move(b);
  }
  void Connect() {
    auto port = a_->Listen("127.0.0.1");
    ASSERT_THAT(port, IsOk());
    ASSERT_THAT(b_->Connect("127.0.0.1", *port), IsOk());
    ASSERT_THAT(a_->WaitForPeer("b", kDeadline), IsOk());
  }
  bool BSees(const std::string& pool, bool present) {
    return WaitFor([&] {
      std::vector<std::string> pools = PeerPools(*b_, "a");
      return (std::find(pools.begin(), pools.end(), pool) != pools.end()) == present;
    }, kDeadline);
  }
  // b writes `blocks` blocks of pattern `seed` into a's pool `pool` (its own
  // pool of the same name as the source) and a checks them.
  void WriteAndVerify(const std::string& pool, uint32_t blocks, uint64_t seed) {
    KvPool* src = b_->FindPool(pool);
    ASSERT_NE(src, nullptr);
    auto local = src->Lease(blocks);
    ASSERT_THAT(local, IsOk());
    std::vector<uint32_t> remote;
    for (uint32_t i = 0; i < blocks; ++i) {
      remote.push_back(i);
      FillBlock(*local, i, seed, i);
    }
    auto t = b_->PostTransfer(
        {.op = TransferOp::kWrite, .peer = "a", .local = &*local, .remote_blocks = remote});
    ASSERT_THAT(t, IsOk());
    ASSERT_THAT(t->Wait(kDeadline), IsOk());
    KvPool* dst = a_->FindPool(pool);
    ASSERT_NE(dst, nullptr);
    auto check = dst->LeaseIds(remote);
    ASSERT_THAT(check, IsOk());
    for (uint32_t i = 0; i < blocks; ++i) {
      EXPECT_EQ(BlockChecksum(*check, i), ExpectedChecksum(check->layout(), seed, i))
          << "block " << i;
    }
  }

  std::unique_ptr<Agent> a_;
  std::unique_ptr<Agent> b_;
};

TEST_P(PoolRemovalTest, BadInputsLeaveNothingBehind) {
  ASSERT_THAT(a_->CreatePool("kv", Layout(8)), IsOk());
  const Stats before = a_->ledger().Snapshot();
  EXPECT_THAT(a_->RemovePool(""), StatusIs(absl::StatusCode::kInvalidArgument, "pool name"));
  EXPECT_THAT(a_->RemovePool("no pool"),
              StatusIs(absl::StatusCode::kInvalidArgument, "printable ASCII"));
  EXPECT_THAT(a_->RemovePool("nope"), StatusIs(absl::StatusCode::kNotFound, "'nope'"));
  EXPECT_THAT(a_->RemovePool("kv", absl::Seconds(-1)),
              StatusIs(absl::StatusCode::kInvalidArgument, "negative"));
  const Stats after = a_->ledger().Snapshot();
  EXPECT_EQ(after.live, before.live);
  EXPECT_EQ(after.registered_bytes, before.registered_bytes);
  KvPool* kv = a_->FindPool("kv");
  ASSERT_NE(kv, nullptr);
  EXPECT_THAT(kv->Lease(8), IsOk());  // neither marked nor leaked
}

// Removed while idle, for both kinds of pool: peers forget it, their posts
// fail naming it, this agent's counts and memory report are back where they
// were; the name is then registered again and used without reconnecting.
TEST_P(PoolRemovalTest, RemoveIdleThenRegisterAgain) {
  ASSERT_THAT(b_->CreatePool("gone", Layout(8)), IsOk());
  ASSERT_THAT(b_->CreatePool("eng", Layout(8)), IsOk());
  ASSERT_NO_FATAL_FAILURE(Connect());
  const Stats baseline = a_->ledger().Snapshot();
  const std::vector<std::string> baseline_report = ReportedPools(*a_);
  EngineMemory memory(Layout(8).total_bytes());
  const KvRegion region = memory.region();
  ASSERT_THAT(a_->CreatePool("gone", Layout(8)), IsOk());
  ASSERT_THAT(a_->RegisterPool("eng", Layout(8), {&region, 1}), IsOk());
  ASSERT_TRUE(BSees("gone", true));
  ASSERT_TRUE(BSees("eng", true));
  EXPECT_GT(a_->ledger().Snapshot().registered_bytes, baseline.registered_bytes);

  for (const std::string name : {"gone", "eng"}) {
    ASSERT_THAT(a_->RemovePool(name), IsOk()) << name;
    EXPECT_EQ(a_->FindPool(name), nullptr);
    EXPECT_THAT(a_->RemovePool(name), StatusIs(absl::StatusCode::kNotFound, name));
    ASSERT_TRUE(BSees(name, false)) << "b still lists '" << name << "'";
    auto blocks = b_->FindPool(name)->Lease(1);
    ASSERT_THAT(blocks, IsOk());
    EXPECT_THAT(b_->PostTransfer({.op = TransferOp::kWrite, .peer = "a", .local = &*blocks,
                                  .remote_blocks = {0}}),
                StatusIs(absl::StatusCode::kNotFound,
                         absl::StrCat("peer 'a' exports no pool '", name, "'")));
  }
  EXPECT_TRUE(a_->ExportedPools().empty());
  const Stats removed = a_->ledger().Snapshot();
  EXPECT_EQ(removed.registered_bytes, baseline.registered_bytes);
  for (ResourceKind kind : {ResourceKind::kPool, ResourceKind::kMemoryRegion,
                            ResourceKind::kPackedRkey, ResourceKind::kBlockSet}) {
    EXPECT_EQ(removed.live[static_cast<int>(kind)], baseline.live[static_cast<int>(kind)])
        << ResourceKindName(kind);
  }
  EXPECT_EQ(ReportedPools(*a_), baseline_report);

  // The same names again, on new memory; b learns them on its connection.
  EngineMemory memory2(Layout(8).total_bytes());
  const KvRegion region2 = memory2.region();
  ASSERT_THAT(a_->CreatePool("gone", Layout(8)), IsOk());
  ASSERT_THAT(a_->RegisterPool("eng", Layout(8), {&region2, 1}), IsOk());
  ASSERT_TRUE(BSees("gone", true));
  ASSERT_TRUE(BSees("eng", true));
  ASSERT_NO_FATAL_FAILURE(WriteAndVerify("gone", 8, 11));
  ASSERT_NO_FATAL_FAILURE(WriteAndVerify("eng", 8, 12));
  for (uint32_t i = 0; i < 8; ++i) {
    EXPECT_TRUE(BlockHolds(memory2.base, Layout(8), i, 12, i)) << "block " << i;
  }
  EXPECT_EQ(a_->GetPeer("b")->state, PeerState::kConnected);
  EXPECT_EQ(a_->ListPeers().size(), 1u);
}

// A transfer on the pool that is in flight when RemovePool is called has
// ended (and its bytes have all landed) when RemovePool returns; nothing
// lands in the memory after that.
TEST_P(PoolRemovalTest, InFlightTransferEndsBeforeRemovePoolReturns) {
  constexpr uint32_t kBlocks = 512;  // 16 MiB: still moving when RemovePool starts
  const KvLayout layout = Layout(kBlocks);
  auto src = b_->CreatePool("eng", layout);
  ASSERT_THAT(src, IsOk());
  {
    auto fill = (*src)->Lease(kBlocks);
    ASSERT_THAT(fill, IsOk());
    for (uint32_t i = 0; i < kBlocks; ++i) FillBlock(*fill, i, 21, fill->ids()[i]);
  }
  ASSERT_NO_FATAL_FAILURE(Connect());
  EngineMemory memory(layout.total_bytes());
  const KvRegion region = memory.region();
  ASSERT_THAT(a_->RegisterPool("eng", layout, {&region, 1}), IsOk());
  std::vector<uint32_t> remote(kBlocks);
  for (uint32_t i = 0; i < kBlocks; ++i) remote[i] = kBlocks - 1 - i;
  absl::StatusOr<Transfer> t;
  {
    auto local = a_->FindPool("eng")->Lease(kBlocks);
    ASSERT_THAT(local, IsOk());
    t = a_->PostTransfer(
        {.op = TransferOp::kRead, .peer = "b", .local = &*local, .remote_blocks = remote});
    ASSERT_THAT(t, IsOk());
  }  // the transfer holds the lease now
  const bool was_in_flight = t->state() == TransferState::kInFlight;
  ASSERT_THAT(a_->RemovePool("eng", kDeadline), IsOk());
  RecordProperty("in_flight_at_remove", was_in_flight ? "yes" : "no");
  std::printf("transfer in flight when RemovePool began: %s\n", was_in_flight ? "yes" : "no");
  EXPECT_EQ(t->state(), TransferState::kDone) << t->status() << " (in flight at RemovePool: "
                                              << was_in_flight << ")";
  for (uint32_t i = 0; i < kBlocks; ++i) {
    ASSERT_TRUE(BlockHolds(memory.base, layout, i, 21, remote[i])) << "block " << i;
  }
  // Canaries over the whole memory, now the engine's again: nothing may
  // land in it any more, while both agents keep running.
  std::memset(memory.base, 0xa5, memory.bytes);
  ASSERT_TRUE(BSees("eng", false));
  absl::SleepFor(absl::Milliseconds(200));  // a window for late bytes, not a sync
  for (uint64_t i = 0; i < memory.bytes; ++i) {
    ASSERT_EQ(memory.base[i], std::byte{0xa5}) << "late byte at offset " << i;
  }
  EXPECT_EQ(a_->ledger().Snapshot().live[static_cast<int>(ResourceKind::kTransfer)], 0);
}

// An offer of the pool's blocks that outlasts the timeout is revoked (the
// taker fences first); the removal then completes.
TEST_P(PoolRemovalTest, OpenOfferIsRevokedAtTheTimeout) {
  ASSERT_THAT(b_->CreatePool("kv", Layout(16)), IsOk());
  ASSERT_THAT(a_->CreatePool("kv", Layout(16)), IsOk());
  ASSERT_NO_FATAL_FAILURE(Connect());
  absl::StatusOr<Offer> offer;
  {
    auto lent = a_->FindPool("kv")->Lease(4);
    ASSERT_THAT(lent, IsOk());
    offer = a_->Offer(*lent, "b", absl::Minutes(10));
    ASSERT_THAT(offer, IsOk());
  }  // the offer holds the lease now
  ASSERT_THAT(a_->RemovePool("kv", absl::Milliseconds(200)), IsOk());
  EXPECT_EQ(offer->state(), OfferState::kRevoked);
  EXPECT_THAT(offer->status(), StatusIs(absl::StatusCode::kFailedPrecondition,
                                        "pool 'kv' was removed (RemovePool)"));
  EXPECT_EQ(a_->ledger().Snapshot().live[static_cast<int>(ResourceKind::kOffer)], 0);
  EXPECT_EQ(a_->FindPool("kv"), nullptr);
  auto into = b_->FindPool("kv")->Lease(4);
  ASSERT_THAT(into, IsOk());
  auto late = b_->PostTransfer(
      {.op = TransferOp::kRead, .local = &*into, .offer_ticket = offer->ticket()});
  if (late.ok()) {
    EXPECT_FALSE(late->Wait(kDeadline).ok()) << "a read on the revoked offer succeeded";
  }
}

// BlockSets the application holds undo the removal: the pool stays, usable
// by both sides. While the removal waits, new leases, posts and offers on
// the pool are refused, as is a second removal.
TEST_P(PoolRemovalTest, HeldBlockSetUndoesTheRemoval) {
  ASSERT_THAT(b_->CreatePool("kv", Layout(16)), IsOk());
  ASSERT_THAT(a_->CreatePool("kv", Layout(16)), IsOk());
  ASSERT_NO_FATAL_FAILURE(Connect());
  ASSERT_TRUE(BSees("kv", true));
  KvPool* kv = a_->FindPool("kv");
  auto held = kv->Lease(2);
  ASSERT_THAT(held, IsOk());
  absl::Status removal;
  std::thread remover([&] { removal = a_->RemovePool("kv", absl::Seconds(3)); });
  EXPECT_TRUE(WaitFor([&] { return absl::IsFailedPrecondition(kv->Lease(1).status()); },
                      kDeadline));
  EXPECT_THAT(kv->Lease(1), StatusIs(absl::StatusCode::kFailedPrecondition,
                                     "pool 'kv' is being removed"));
  EXPECT_THAT(a_->PostTransfer({.op = TransferOp::kWrite, .peer = "b", .local = &*held,
                                .remote_blocks = {0, 1}}),
              StatusIs(absl::StatusCode::kFailedPrecondition, "pool 'kv' is being removed"));
  EXPECT_THAT(a_->Offer(*held, "b", absl::Seconds(10)),
              StatusIs(absl::StatusCode::kFailedPrecondition, "pool 'kv' is being removed"));
  EXPECT_THAT(a_->RemovePool("kv"),
              StatusIs(absl::StatusCode::kFailedPrecondition, "already being removed"));
  remover.join();
  EXPECT_THAT(removal, StatusIs(absl::StatusCode::kFailedPrecondition,
                                "2 of 16 blocks of pool 'kv' are still leased"));
  ASSERT_EQ(a_->FindPool("kv"), kv);
  auto t = a_->PostTransfer(
      {.op = TransferOp::kWrite, .peer = "b", .local = &*held, .remote_blocks = {0, 1}});
  ASSERT_THAT(t, IsOk());
  EXPECT_THAT(t->Wait(kDeadline), IsOk());
  // b was told of the removal and of the pool again: it can write into it.
  ASSERT_TRUE(BSees("kv", true));
  held->Reset();
  ASSERT_NO_FATAL_FAILURE(WriteAndVerify("kv", 8, 31));
  EXPECT_THAT(a_->RemovePool("kv"), IsOk());
}

TEST(PoolRemovedMessageTest, RoundTripsAndChecksTheName) {
  using internal::wire::Decode;
  using internal::wire::Encode;
  using internal::wire::MessageType;
  auto back = Decode(Encode({.type = MessageType::kPoolRemoved, .name = "kv-7"}));
  ASSERT_THAT(back, IsOk());
  EXPECT_EQ(back->type, MessageType::kPoolRemoved);
  EXPECT_EQ(back->name, "kv-7");
  EXPECT_THAT(Decode(Encode({.type = MessageType::kPoolRemoved})),
              StatusIs(absl::StatusCode::kInvalidArgument, "pool_removed.pool"));
  EXPECT_THAT(Decode(Encode({.type = MessageType::kPoolRemoved, .name = "a b"})),
              StatusIs(absl::StatusCode::kInvalidArgument, "pool_removed.pool"));
  EXPECT_EQ(internal::wire::MessageTypeName(MessageType::kPoolRemoved), "POOL_REMOVED");
}

INSTANTIATE_TEST_SUITE_P(Transports, PoolRemovalTest, ::testing::Values(kShm, kTcp),
                         TransportName);

// The peer that removes its pool and registers it again is another process:
// this agent's posts to the removed pool fail naming it and the peer; the
// new memory is reached over the same connection, both ways, verified.
class PoolRemovalProcessTest : public ::testing::TestWithParam<Transport> {};

TEST_P(PoolRemovalProcessTest, PeerRemovesAndRegistersAgain) {
  ChildProcess child({KVFERRY_TEST_PEER, "--role=decode", "--name=decode", "--ctl_pool=1",
                      absl::StrCat("--tls=", GetParam().tls)});
  ASSERT_TRUE(child.started());
  auto line = child.ReadUntil("PORT");
  uint32_t port = 0;
  ASSERT_TRUE(line && line->rfind("PORT ", 0) == 0 && absl::SimpleAtoi(line->substr(5), &port))
      << line.value_or("no PORT line");
  auto agent = Agent::Create(TestAgentOptions("prefill", GetParam()));
  ASSERT_THAT(agent, IsOk());
  Agent& a = **agent;
  auto kv = a.CreatePool("kv", Layout(64));
  ASSERT_THAT(kv, IsOk());
  auto ctl = a.CreatePool("ctl", Layout(4));
  ASSERT_THAT(ctl, IsOk());
  auto peer = a.Connect("127.0.0.1", static_cast<uint16_t>(port));
  ASSERT_THAT(peer, IsOk());
  // A command to the child rides on a one-block write into its "ctl".
  auto command = [&](const std::string& what) {
    auto one = (*ctl)->Lease(1);
    ASSERT_THAT(one, IsOk());
    auto t = a.PostTransfer({.op = TransferOp::kWrite, .peer = "decode", .local = &*one,
                             .remote_blocks = {0}, .notification = what});
    ASSERT_THAT(t, IsOk());
    ASSERT_THAT(t->Wait(kDeadline), IsOk());
  };
  // Writes blocks 0..7 with `seed`, the child checks them ("OK seed").
  auto write = [&](uint64_t seed) {
    auto local = (*kv)->Lease(8);
    ASSERT_THAT(local, IsOk());
    std::vector<uint32_t> remote = {0, 1, 2, 3, 4, 5, 6, 7};
    for (size_t i = 0; i < remote.size(); ++i) FillBlock(*local, i, seed, remote[i]);
    auto t = a.PostTransfer({.op = TransferOp::kWrite, .peer = "decode", .local = &*local,
                             .remote_blocks = remote,
                             .notification = absl::StrCat("CHECK ", seed, " 0 1 2 3 4 5 6 7")});
    ASSERT_THAT(t, IsOk());
    ASSERT_THAT(t->Wait(kDeadline), IsOk());
    EXPECT_EQ(child.ReadUntil("OK", kDeadline).value_or("timeout"), absl::StrCat("OK ", seed));
  };
  auto sees_kv = [&](bool present) {
    return WaitFor([&] {
      std::vector<std::string> pools = PeerPools(a, "decode");
      return (std::find(pools.begin(), pools.end(), "kv") != pools.end()) == present;
    }, kDeadline);
  };
  ASSERT_NO_FATAL_FAILURE(write(41));

  ASSERT_NO_FATAL_FAILURE(command("REMOVE"));
  EXPECT_EQ(child.ReadUntil("REMOVED", kDeadline).value_or("timeout"), "REMOVED OK");
  ASSERT_TRUE(sees_kv(false)) << "the removed pool is still listed";
  {
    auto local = (*kv)->Lease(1);
    ASSERT_THAT(local, IsOk());
    EXPECT_THAT(a.PostTransfer({.op = TransferOp::kWrite, .peer = "decode", .local = &*local,
                                .remote_blocks = {0}}),
                StatusIs(absl::StatusCode::kNotFound, "peer 'decode' exports no pool 'kv'"));
  }

  ASSERT_NO_FATAL_FAILURE(command("REGISTER"));
  EXPECT_EQ(child.ReadUntil("REGISTERED", kDeadline).value_or("timeout"), "REGISTERED OK");
  ASSERT_TRUE(sees_kv(true)) << "the pool registered again was not announced";
  ASSERT_NO_FATAL_FAILURE(write(42));
  {  // and back: the new memory read into fresh blocks
    auto back = (*kv)->LeaseIds(std::vector<uint32_t>{20, 21, 22, 23, 24, 25, 26, 27});
    ASSERT_THAT(back, IsOk());
    std::vector<uint32_t> remote = {7, 6, 5, 4, 3, 2, 1, 0};
    auto t = a.PostTransfer(
        {.op = TransferOp::kRead, .peer = "decode", .local = &*back, .remote_blocks = remote});
    ASSERT_THAT(t, IsOk());
    ASSERT_THAT(t->Wait(kDeadline), IsOk());
    for (size_t i = 0; i < remote.size(); ++i) {
      EXPECT_EQ(BlockChecksum(*back, i), ExpectedChecksum(back->layout(), 42, remote[i]))
          << "block " << remote[i];
    }
  }
  auto still = a.GetPeer("decode");
  ASSERT_THAT(still, IsOk());
  EXPECT_EQ(still->state, PeerState::kConnected);
  EXPECT_EQ(still->incarnation, peer->incarnation);
  child.CloseStdin();
  EXPECT_EQ(child.Wait(), 0);
}

INSTANTIATE_TEST_SUITE_P(Transports, PoolRemovalProcessTest, ::testing::Values(kShm, kTcp),
                         TransportName);

}  // namespace
}  // namespace kvferry::test
