// RemotePoolKeys and the data paths over them (src/remote_pool.h), with
// real UCX: two workers of this process, over shared memory and over TCP.
// A transfer's path keeps the keys it was posted with valid after the
// peer's pool set was replaced or dropped, and they go (the ledger's
// kRemoteKey count back to its baseline) when the last holder lets go. The
// path chosen for a pool is the one the agent chooses (mapped here: UCX;
// not mapped and the peer process verified: kernel copy), and each path
// really moves the bytes.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstring>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "kvferry/transfer.h"
#include "src/kernel_copier.h"
#include "src/peer.h"
#include "src/remote_pool.h"
#include "src/transfer_core.h"
#include "src/ucx/context.h"
#include "src/ucx/endpoint.h"
#include "src/ucx/memory_region.h"
#include "src/ucx/worker.h"
#include "src/wire/auth.h"
#include "tests/child_process.h"
#include "tests/test_util.h"
#include "tests/transports.h"
#include "tests/ucx_pair.h"

namespace kvferry::internal {
namespace {

using test::IsOk;
using test::kShm;
using test::kTcp;
using test::Transport;

constexpr size_t kBytes = 1 << 16;

// Flushes `ep` while progressing both workers (its wireup and emulated
// copies need the target's progress too): nothing posted on it moves after.
void Drain(const EndpointPtr& ep, Worker& initiator, Worker& target) {
  ucp_request_param_t param = {};
  ucs_status_ptr_t flush = ucp_ep_flush_nbx(ep->native_handle(), &param);
  ASSERT_FALSE(UCS_PTR_IS_ERR(flush));
  if (flush == nullptr) return;
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  ucs_status_t st;
  while ((st = ucp_request_check_status(flush)) == UCS_INPROGRESS && absl::Now() < deadline) {
    initiator.Progress();
    target.Progress();
  }
  ucp_request_free(flush);
  ASSERT_EQ(st, UCS_OK);
}

// Drains `ep`, then closes it.
void DrainAndClose(const EndpointPtr& ep, Worker& initiator, Worker& target) {
  ASSERT_NO_FATAL_FAILURE(Drain(ep, initiator, target));
  EXPECT_THAT(ep->Close(/*force=*/false, absl::Seconds(30)), IsOk());
  for (int i = 0; i < 100; ++i) {
    initiator.Progress();
    target.Progress();
  }
}

class RemotePoolKeysTest : public ::testing::TestWithParam<Transport> {
 protected:
  void SetUp() override {
    // ALLOC_PRIO as agents allocate their pools.
    ASSERT_THAT(ucx_.Create("remote-pool-keys", GetParam().tls, "md:sysv,mmap"), IsOk());
    auto ep = Endpoint::ConnectToAddress(ucx_.initiator, ucx_.target->Address()->bytes(),
                                         Endpoint::ErrorMode::kNone);
    ASSERT_THAT(ep, IsOk());
    ep_ = *ep;
    auto remote = MemoryRegion::Allocate(ucx_.context, kBytes);
    ASSERT_THAT(remote, IsOk());
    remote_ = *std::move(remote);
    std::memset(remote_.address(), 0, remote_.length());
    local_.assign(kBytes, std::byte{0});
    auto local = MemoryRegion::Map(ucx_.context, local_.data(), local_.size());
    ASSERT_THAT(local, IsOk());
    local_region_ = *std::move(local);
    copier_ = std::make_unique<KernelCopier>([] { return true; }, [] {});
  }
  void TearDown() override {
    copier_.reset();
    if (ep_ != nullptr) DrainAndClose(ep_, *ucx_.initiator, *ucx_.target);
    ep_.reset();
    local_region_.Reset();
    remote_.Reset();
    ucx_.Reset();
    EXPECT_EQ(ucx_.ledger->Snapshot().TotalLive(), 0) << ucx_.ledger->Report();
  }
  int64_t Live(ResourceKind kind) const { return ucx_.ledger->Snapshot().Live(kind); }

  // The target's pool as its descriptor announces it.
  wire::PoolDescriptor Describe(const std::string& name) {
    auto packed = remote_.PackRkey();
    EXPECT_THAT(packed, IsOk());
    wire::PoolDescriptor d{.name = name};
    d.regions.push_back({.base = reinterpret_cast<uint64_t>(remote_.address()),
                         .length = kBytes,
                         .rkey = std::string(packed->bytes())});
    return d;
  }
  RemotePoolKeysPtr Unpack(const std::string& name) {
    auto keys = UnpackRemotePools(ep_, {Describe(name)}, /*peer_on_this_host=*/true);
    EXPECT_THAT(keys, IsOk());
    return keys.ok() && keys->size() == 1 ? (*keys)[0] : nullptr;
  }
  // One WRITE of `bytes` from the start of local_ to `remote_offset`.
  CopyBatch Batch(uint64_t remote_offset, uint64_t bytes) {
    CopyBatch b;
    b.op = TransferOp::kWrite;
    b.ops.push_back({.local_region = 0, .local_offset = 0, .remote_region = 0,
                     .remote_offset = remote_offset, .bytes = bytes});
    b.local.emplace_back(local_.data(), local_region_.native_handle());
    b.peer_name = "target";
    return b;
  }
  // Progresses both workers until the path says the copies are done.
  ucs_status_t AwaitDone(const RemotePoolPath& path, TransferCore& core) {
    const absl::Time deadline = absl::Now() + absl::Seconds(60);
    ucs_status_t st;
    while ((st = path.Check(core, /*endpoint_fenced=*/false)) == UCS_INPROGRESS &&
           absl::Now() < deadline) {
      ucx_.Progress(1);
    }
    return st;
  }
  std::unique_ptr<TransferCore> NewCore() {
    return std::make_unique<TransferCore>(new AgentLink(nullptr), Tracked(), Tracked());
  }

  test::UcxPair ucx_;
  EndpointPtr ep_;
  MemoryRegion remote_;
  std::vector<std::byte> local_;
  MemoryRegion local_region_;
  std::unique_ptr<KernelCopier> copier_;
};

TEST_P(RemotePoolKeysTest, ATransferKeepsItsKeysAfterThePeersPoolsAreReplacedAndDropped) {
  const int64_t baseline = Live(ResourceKind::kRemoteKey);
  // The peer's pool set, as JudgeDataPathLocked leaves it.
  std::vector<RemotePool> pools;
  pools.push_back({.keys = Unpack("kv")});
  ASSERT_NE(pools[0].keys, nullptr);
  pools[0].mapped = pools[0].keys->MapsEveryRegion();
  pools[0].path = ChooseRemotePoolPath(pools[0].keys, pools[0].mapped, nullptr);
  ASSERT_EQ(pools[0].path->kind(), RemotePoolPath::Kind::kUcxRma);
  EXPECT_EQ(Live(ResourceKind::kRemoteKey), baseline + 1);

  // A submission takes the path, as PostTransfer does.
  RemotePoolPathPtr held = pools[0].path;
  const RemotePoolKeys* held_keys = held->keys().get();

  // The pool set is judged again (a POOL_ADDED): every path is replaced,
  // and the announced pool is unpacked anew.
  pools[0].path = ChooseRemotePoolPath(pools[0].keys, pools[0].mapped, nullptr);
  pools.push_back({.keys = Unpack("kv2")});
  EXPECT_EQ(Live(ResourceKind::kRemoteKey), baseline + 2);
  // Then the peer is closed: its pools are dropped while the transfer is
  // still queued. Only the transfer's keys remain.
  pools.clear();
  EXPECT_EQ(Live(ResourceKind::kRemoteKey), baseline + 1);
  EXPECT_EQ(held->keys().get(), held_keys);
  EXPECT_NE(held->keys()->rkey(0), nullptr);

  // Posting uses them: the bytes arrive.
  for (size_t i = 0; i < kBytes; ++i) local_[i] = std::byte(i * 7 + 3);
  std::unique_ptr<TransferCore> core = NewCore();
  const uint64_t offset = 4096, bytes = kBytes - 8192;
  held->Post(*core, Batch(offset, bytes), ucx_.initiator, *copier_);
  EXPECT_TRUE(core->posted);
  EXPECT_EQ(core->state(), TransferState::kInFlight) << core->status();
  ASSERT_EQ(AwaitDone(*held, *core), UCS_OK);
  core->flush.Reset();
  const auto* arrived = static_cast<const std::byte*>(remote_.address());
  EXPECT_EQ(std::memcmp(arrived + offset, local_.data(), bytes), 0);
  EXPECT_EQ(arrived[offset - 1], std::byte{0});
  EXPECT_EQ(arrived[offset + bytes], std::byte{0});

  // The transfer ends: the last reference goes, and with it the keys.
  EXPECT_EQ(Live(ResourceKind::kRemoteKey), baseline + 1);
  held.reset();
  EXPECT_EQ(Live(ResourceKind::kRemoteKey), baseline);
}

TEST_P(RemotePoolKeysTest, UcxCopiesOfAFencedEndpointEndCancelled) {
  if (GetParam().name != std::string(kTcp.name)) {
    GTEST_SKIP() << "over shared memory the put is done before Post returns";
  }
  RemotePoolKeysPtr keys = Unpack("kv");
  ASSERT_NE(keys, nullptr);
  RemotePoolPathPtr path = ChooseRemotePoolPath(keys, keys->MapsEveryRegion(), nullptr);
  std::unique_ptr<TransferCore> core = NewCore();
  path->Post(*core, Batch(0, 4096), ucx_.initiator, *copier_);
  // The target never progresses: over TCP the flush cannot complete.
  for (int i = 0; i < 100; ++i) ucx_.initiator->Progress();
  ASSERT_EQ(path->Check(*core, /*endpoint_fenced=*/false), UCS_INPROGRESS);
  EXPECT_FALSE(core->flush.empty());
  // The caller says nothing posted on the endpoint can move any more: the
  // flush is let go and the copies end cancelled.
  EXPECT_EQ(path->Check(*core, /*endpoint_fenced=*/true), UCS_ERR_CANCELED);
  EXPECT_TRUE(core->flush.empty());
  EXPECT_THAT(path->Outcome(*core), IsOk());
  // Here the endpoint was not really fenced: drain it before the keys (and
  // the buffers) the put uses go.
  ASSERT_NO_FATAL_FAILURE(Drain(ep_, *ucx_.initiator, *ucx_.target));
  EXPECT_EQ(Live(ResourceKind::kRemoteKey), 1);
  path.reset();
  keys.reset();
  EXPECT_EQ(Live(ResourceKind::kRemoteKey), 0);
}

TEST_P(RemotePoolKeysTest, ThePathIsUcxUnlessUnmappedAndTheProcessVerified) {
  RemotePoolKeysPtr keys = Unpack("kv");
  ASSERT_NE(keys, nullptr);
  const bool mapped = keys->MapsEveryRegion();
  // UCX maps the segment of a pool it allocated only over shared memory.
  EXPECT_EQ(mapped, GetParam().name == std::string(kShm.name));
  EXPECT_EQ(ChooseRemotePoolPath(keys, mapped, nullptr)->kind(), RemotePoolPath::Kind::kUcxRma);
  EXPECT_EQ(ChooseRemotePoolPath(keys, /*mapped=*/true, nullptr)->kind(),
            RemotePoolPath::Kind::kUcxRma);
  EXPECT_EQ(ChooseRemotePoolPath(keys, /*mapped=*/false, nullptr)->kind(),
            RemotePoolPath::Kind::kUcxRma);
}

INSTANTIATE_TEST_SUITE_P(Transports, RemotePoolKeysTest, ::testing::Values(kShm, kTcp),
                         test::TransportName);

// The kernel-copy probe; a fork of this process (test::ForkedTwin) holds it
// too.
std::array<char, wire::kTagBytes> probe;

TEST(KernelCopyPathTest, ChosenForAnUnmappedPoolOfAVerifiedProcessAndCopiesIntoIt) {
  const std::string expected = wire::KernelCopyProbe("a frame key of this connection");
  ASSERT_EQ(expected.size(), probe.size());
  std::memcpy(probe.data(), expected.data(), probe.size());
  // The peer's pool: zeros here and in the fork.
  std::vector<std::byte> pool(kBytes, std::byte{0});
  test::ForkedTwin child;
  ASSERT_GT(child.pid(), 0);

  test::UcxPair ucx;
  {
    // Over TCP UCX maps nothing: the pool is not mapped here.
    ASSERT_THAT(ucx.Create("kernel-copy-path", "tcp"), IsOk());
    auto ep = Endpoint::ConnectToAddress(ucx.initiator, ucx.target->Address()->bytes(),
                                         Endpoint::ErrorMode::kNone);
    ASSERT_THAT(ep, IsOk());
    // The key of the same address in this process stands in for the
    // peer's registration: the kernel-copy path uses only the descriptor.
    auto registered = MemoryRegion::Map(ucx.context, pool.data(), pool.size());
    ASSERT_THAT(registered, IsOk());
    auto packed = registered->PackRkey();
    ASSERT_THAT(packed, IsOk());
    wire::PoolDescriptor d{.name = "kv"};
    d.regions.push_back({.base = reinterpret_cast<uint64_t>(pool.data()),
                         .length = kBytes,
                         .rkey = std::string(packed->bytes())});
    auto unpacked = UnpackRemotePools(*ep, {d}, /*peer_on_this_host=*/true);
    ASSERT_THAT(unpacked, IsOk());
    RemotePoolKeysPtr keys = (*unpacked)[0];
    ASSERT_FALSE(keys->MapsEveryRegion());

    auto target = KernelCopyTarget::Open(static_cast<uint64_t>(child.pid()),
                                         reinterpret_cast<uintptr_t>(probe.data()), expected);
    ASSERT_THAT(target, IsOk());
    RemotePoolPathPtr path = ChooseRemotePoolPath(keys, /*mapped=*/false, *target);
    ASSERT_EQ(path->kind(), RemotePoolPath::Kind::kKernelCopy);
    // A mapped pool stays with UCX even when the process is verified.
    EXPECT_EQ(ChooseRemotePoolPath(keys, /*mapped=*/true, *target)->kind(),
              RemotePoolPath::Kind::kUcxRma);

    std::vector<std::byte> local(kBytes);
    for (size_t i = 0; i < kBytes; ++i) local[i] = std::byte(i * 13 + 1);
    CopyBatch batch;
    batch.op = TransferOp::kWrite;
    batch.ops.push_back({.local_region = 0, .local_offset = 0, .remote_region = 0,
                         .remote_offset = 512, .bytes = 1024});
    batch.local.emplace_back(local.data(), nullptr);
    batch.peer_name = "forked";
    KernelCopier copier([] { return true; }, [] {});
    TransferCore core(new AgentLink(nullptr), Tracked(), Tracked());
    keys.reset();
    unpacked->clear();  // the path holds the keys
    EXPECT_EQ(ucx.ledger->Snapshot().Live(ResourceKind::kRemoteKey), 1);
    path->Post(core, batch, ucx.initiator, copier);
    EXPECT_TRUE(core.posted);
    const absl::Time deadline = absl::Now() + absl::Seconds(60);
    while (path->Check(core, /*endpoint_fenced=*/false) == UCS_INPROGRESS &&
           absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(1));
    }
    ASSERT_EQ(path->Check(core, /*endpoint_fenced=*/false), UCS_OK);
    ASSERT_THAT(path->Outcome(core), IsOk());
    // In the fork, not here.
    EXPECT_EQ(pool[512], std::byte{0});
    std::vector<std::byte> there(kBytes);
    ASSERT_THAT((*target)->Copy(TransferOp::kRead, {{there.data(), kBytes}},
                                {{pool.data(), kBytes}}),
                IsOk());
    EXPECT_EQ(std::memcmp(there.data() + 512, local.data(), 1024), 0);
    EXPECT_EQ(there[511], std::byte{0});
    EXPECT_EQ(there[512 + 1024], std::byte{0});

    path.reset();
    EXPECT_EQ(ucx.ledger->Snapshot().Live(ResourceKind::kRemoteKey), 0);
    DrainAndClose(*ep, *ucx.initiator, *ucx.target);
  }
  ucx.Reset();
  EXPECT_EQ(ucx.ledger->Snapshot().TotalLive(), 0) << ucx.ledger->Report();
}

TEST(KernelCopyPathTest, ACopyStartsOnlyShortlyAfterTheConnectionsWereRead) {
  const absl::Time read = absl::FromUnixSeconds(1000);
  const absl::Duration timeout = absl::Seconds(10);
  EXPECT_TRUE(KernelCopyPath::Fresh(read, read, timeout));
  EXPECT_TRUE(KernelCopyPath::Fresh(read, read + KernelCopyPath::kFreshness, timeout));
  EXPECT_FALSE(KernelCopyPath::Fresh(
      read, read + KernelCopyPath::kFreshness + absl::Milliseconds(1), timeout));
  // A short peer_timeout shortens it to an eighth.
  EXPECT_TRUE(KernelCopyPath::Fresh(read, read + absl::Milliseconds(25), absl::Milliseconds(200)));
  EXPECT_FALSE(KernelCopyPath::Fresh(read, read + absl::Milliseconds(26), absl::Milliseconds(200)));
}

}  // namespace
}  // namespace kvferry::internal
