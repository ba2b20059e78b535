// The RAII owners in src/ucx/: move, self-move, moved-from destruction,
// double Reset, and parents kept alive by children.
#include <cstring>
#include <type_traits>
#include <vector>

#include "kvferry/transfer.h"
#include "src/ucx/context.h"
#include "src/ucx/data_path.h"
#include "src/ucx/endpoint.h"
#include "src/ucx/memory_region.h"
#include "src/ucx/worker.h"
#include "tests/test_util.h"

namespace kvferry::internal {
namespace {

using test::IsOk;
using test::StatusIs;

template <typename T>
constexpr bool kMoveOnly = !std::is_copy_constructible_v<T> && !std::is_copy_assignable_v<T> &&
                           std::is_nothrow_move_constructible_v<T> &&
                           std::is_nothrow_move_assignable_v<T>;
static_assert(kMoveOnly<MemoryRegion>);
static_assert(kMoveOnly<PackedRkey>);
static_assert(kMoveOnly<WorkerAddress>);
static_assert(kMoveOnly<RemoteKey>);
static_assert(kMoveOnly<Request>);
// Heap-held, shared through intrusive_ptr: neither copyable nor movable.
static_assert(!std::is_copy_constructible_v<Context> && !std::is_move_constructible_v<Context>);
static_assert(!std::is_copy_constructible_v<Worker> && !std::is_move_constructible_v<Worker>);
static_assert(!std::is_copy_constructible_v<Endpoint> && !std::is_move_constructible_v<Endpoint>);

class UcxHandlesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ledger_ = internal::Access::MakeLedger("handles");
    Context::Options options;
    options.ledger = ledger_;
    auto context = Context::Create(options);
    ASSERT_THAT(context, IsOk());
    context_ = *context;
    auto worker = Worker::Create(context_);
    ASSERT_THAT(worker, IsOk());
    worker_ = *worker;
    buffer_.resize(1 << 16);
  }
  void TearDown() override {
    worker_.reset();
    context_.reset();
    EXPECT_EQ(ledger_->Snapshot().TotalLive(), 0) << ledger_->Report();
    EXPECT_EQ(ledger_->Snapshot().registered_bytes, 0);
  }
  int64_t Live(ResourceKind kind) const { return ledger_->Snapshot().Live(kind); }

  // An endpoint from the worker to itself (UCX's loopback transport).
  EndpointPtr SelfEndpoint() {
    auto address = worker_->Address();
    EXPECT_THAT(address, IsOk());
    auto ep = Endpoint::ConnectToAddress(worker_, address->bytes(), Endpoint::ErrorMode::kNone);
    EXPECT_THAT(ep, IsOk());
    return *ep;
  }

  LedgerPtr ledger_;
  ContextPtr context_;
  WorkerPtr worker_;
  std::vector<char> buffer_;
};

TEST_F(UcxHandlesTest, SharedParentsCountReferences) {
  EXPECT_EQ(Live(ResourceKind::kContext), 1);
  EXPECT_EQ(Live(ResourceKind::kWorker), 1);
  WorkerPtr copy = worker_;
  WorkerPtr moved = std::move(copy);
  EXPECT_EQ(copy, nullptr);  // NOLINT(bugprone-use-after-move)
  moved = std::move(moved);  // self-move of the shared handle
  moved.reset();
  moved.reset();
  EXPECT_EQ(Live(ResourceKind::kWorker), 1);
  EXPECT_EQ(worker_->context(), context_);
}

TEST_F(UcxHandlesTest, ChildrenKeepParentsAlive) {
  auto region = MemoryRegion::Map(context_, buffer_.data(), buffer_.size());
  ASSERT_THAT(region, IsOk());
  worker_.reset();
  context_.reset();
  // The region holds the context; the worker had no child and is gone.
  EXPECT_EQ(Live(ResourceKind::kContext), 1);
  EXPECT_EQ(Live(ResourceKind::kWorker), 0);
  EXPECT_EQ(ledger_->Snapshot().registered_bytes, static_cast<int64_t>(buffer_.size()));
  region->Reset();
  EXPECT_EQ(Live(ResourceKind::kContext), 0);
}

TEST_F(UcxHandlesTest, MemoryRegionMoveSemantics) {
  MemoryRegion a = *MemoryRegion::Map(context_, buffer_.data(), buffer_.size());
  EXPECT_EQ(ledger_->Snapshot().registered_bytes, static_cast<int64_t>(buffer_.size()));
  MemoryRegion b(std::move(a));
  EXPECT_TRUE(a.empty());  // NOLINT(bugprone-use-after-move)
  EXPECT_FALSE(b.empty());
  MemoryRegion& self = b;
  b = std::move(self);
  EXPECT_FALSE(b.empty());
  EXPECT_EQ(b.length(), buffer_.size());
  MemoryRegion c;
  c = std::move(b);
  EXPECT_EQ(Live(ResourceKind::kMemoryRegion), 1);
  { MemoryRegion gone(std::move(a)); }  // destroying a moved-from object
  c.Reset();
  c.Reset();
  EXPECT_EQ(Live(ResourceKind::kMemoryRegion), 0);
  EXPECT_EQ(ledger_->Snapshot().registered_bytes, 0);
}

TEST_F(UcxHandlesTest, MemoryRegionBadInput) {
  EXPECT_THAT(MemoryRegion::Map(context_, nullptr, 10),
              StatusIs(absl::StatusCode::kInvalidArgument, "null address"));
  EXPECT_THAT(MemoryRegion::Map(context_, buffer_.data(), 0),
              StatusIs(absl::StatusCode::kInvalidArgument, "length 0"));
  EXPECT_THAT(MemoryRegion::Map(nullptr, buffer_.data(), 1),
              StatusIs(absl::StatusCode::kInvalidArgument, "null context"));
  EXPECT_THAT(MemoryRegion().PackRkey(), StatusIs(absl::StatusCode::kFailedPrecondition, "empty"));
  EXPECT_EQ(Live(ResourceKind::kMemoryRegion), 0);
}

TEST_F(UcxHandlesTest, PackedRkeyMoveSemantics) {
  MemoryRegion region = *MemoryRegion::Map(context_, buffer_.data(), buffer_.size());
  PackedRkey a = *region.PackRkey();
  EXPECT_FALSE(a.bytes().empty());
  PackedRkey b(std::move(a));
  EXPECT_TRUE(a.empty());  // NOLINT(bugprone-use-after-move)
  PackedRkey& self = b;
  b = std::move(self);
  EXPECT_FALSE(b.empty());
  PackedRkey c;
  c = std::move(b);
  EXPECT_EQ(Live(ResourceKind::kPackedRkey), 1);
  c.Reset();
  c.Reset();
  EXPECT_EQ(Live(ResourceKind::kPackedRkey), 0);
}

TEST_F(UcxHandlesTest, WorkerAddressMoveSemantics) {
  WorkerAddress a = *worker_->Address();
  EXPECT_FALSE(a.bytes().empty());
  WorkerAddress b(std::move(a));
  EXPECT_TRUE(a.empty());  // NOLINT(bugprone-use-after-move)
  WorkerAddress& self = b;
  b = std::move(self);
  EXPECT_FALSE(b.empty());
  worker_.reset();  // the address keeps the worker alive
  EXPECT_EQ(Live(ResourceKind::kWorker), 1);
  b.Reset();
  b.Reset();
  EXPECT_EQ(Live(ResourceKind::kWorker), 0);
}

TEST_F(UcxHandlesTest, RemoteKeyAndRequestMovePutAndGet) {
  MemoryRegion region = *MemoryRegion::Map(context_, buffer_.data(), buffer_.size());
  PackedRkey packed = *region.PackRkey();
  EndpointPtr ep = SelfEndpoint();
  EXPECT_THAT(RemoteKey::Unpack(ep, ""), StatusIs(absl::StatusCode::kInvalidArgument, "empty"));
  RemoteKey a = *RemoteKey::Unpack(ep, packed.bytes());
  RemoteKey b(std::move(a));
  EXPECT_TRUE(a.empty());  // NOLINT(bugprone-use-after-move)
  RemoteKey& self = b;
  b = std::move(self);
  ASSERT_FALSE(b.empty());

  // Put 4 KiB from the first half of the buffer into the second, then check.
  std::memset(buffer_.data(), 0x3c, 4096);
  ucp_request_param_t param = {};
  ucs_status_ptr_t ptr = ucp_put_nbx(ep->native_handle(), buffer_.data(), 4096,
                                     reinterpret_cast<uint64_t>(buffer_.data() + 32768),
                                     b.native_handle(), &param);
  ASSERT_FALSE(UCS_PTR_IS_ERR(ptr));
  Request put = Request::Adopt(worker_, ptr);
  Request moved(std::move(put));
  EXPECT_TRUE(put.empty());  // NOLINT(bugprone-use-after-move)
  Request& self_req = moved;
  moved = std::move(self_req);
  while (moved.Check() == UCS_INPROGRESS) worker_->Progress();
  EXPECT_EQ(moved.Check(), UCS_OK);
  moved.Reset();
  moved.Reset();
  ptr = ucp_ep_flush_nbx(ep->native_handle(), &param);
  Request flush = Request::Adopt(worker_, ptr);
  while (flush.Check() == UCS_INPROGRESS) worker_->Progress();
  EXPECT_EQ(std::memcmp(buffer_.data(), buffer_.data() + 32768, 4096), 0);

  // The rkey keeps its endpoint alive; the endpoint keeps the worker.
  EndpointPtr raw = ep;
  ep.reset();
  raw.reset();
  worker_.reset();
  EXPECT_EQ(Live(ResourceKind::kEndpoint), 1);
  EXPECT_EQ(Live(ResourceKind::kWorker), 1);
  b.Reset();
  EXPECT_EQ(Live(ResourceKind::kEndpoint), 0);
  EXPECT_EQ(Live(ResourceKind::kWorker), 0);
}

TEST_F(UcxHandlesTest, EndpointCloseIsIdempotent) {
  EndpointPtr ep = SelfEndpoint();
  EXPECT_THAT(ep->Close(/*force=*/false, absl::Seconds(5)), IsOk());
  EXPECT_EQ(ep->state(), Endpoint::State::kClosed);
  EXPECT_THAT(ep->Close(/*force=*/true, absl::Seconds(5)), IsOk());
  EXPECT_THAT(RemoteKey::Unpack(ep, "x"),
              StatusIs(absl::StatusCode::kFailedPrecondition, "closed"));
}

TEST_F(UcxHandlesTest, EndpointBadInput) {
  EXPECT_THAT(Endpoint::ConnectToAddress(worker_, "", Endpoint::ErrorMode::kNone),
              StatusIs(absl::StatusCode::kInvalidArgument, "empty worker address"));
  EXPECT_EQ(Live(ResourceKind::kEndpoint), 0);
}

// Allocate: UCX's memory, owned by the region, counted, freed by Reset.
TEST_F(UcxHandlesTest, AllocatedRegionOwnsItsMemory) {
  auto region = MemoryRegion::Allocate(context_, 100000);
  ASSERT_THAT(region, IsOk());
  EXPECT_TRUE(region->owns_memory());
  EXPECT_GE(region->length(), 100000u);  // rounded up to pages
  EXPECT_EQ(ledger_->Snapshot().registered_bytes, static_cast<int64_t>(region->length()));
  std::memset(region->address(), 0x3c, region->length());
  MemoryRegion moved = *std::move(region);
  EXPECT_TRUE(moved.owns_memory());
  EXPECT_FALSE(region->owns_memory());  // NOLINT(bugprone-use-after-move)
  EXPECT_THAT(moved.PackRkey(), IsOk());
  moved.Reset();
  EXPECT_FALSE(moved.owns_memory());
  EXPECT_EQ(ledger_->Snapshot().registered_bytes, 0);
  EXPECT_EQ(Live(ResourceKind::kMemoryRegion), 0);
  EXPECT_THAT(MemoryRegion::Allocate(context_, 0),
              StatusIs(absl::StatusCode::kInvalidArgument, "length 0"));
  EXPECT_THAT(MemoryRegion::Allocate(nullptr, 1),
              StatusIs(absl::StatusCode::kInvalidArgument, "null context"));
}

// ClassifyDataPath on endpoint descriptions as UCX 1.13.1 prints them
// (ucp_ep_print_info): captured on this host for shm and tcp; the RDMA and
// cma ones follow the same format strings (src/ucp/core/ucp_ep.c).
constexpr char kShmInfo[] = R"(#
# UCP endpoint 
#
#               peer: <no debug data>
#                 lane[0]:  2:sysv/memory.0 md[1]           -> md[1]/sysv/sysdev[255] am am_bw#0 keepalive
#                 lane[1]:  3:posix/memory.0 md[2]          -> md[2]/posix/sysdev[255]
#
#                 am_send: 0..<egr/short>..93..<egr/bcopy>..8256..<rndv>..(inf)
#                  put[0]: 0..<short>..4294967296..<bcopy>..(inf)
#                  get[0]: 0..<bcopy>..(inf)
#                  put[1]: 0..<short>..4294967296..<bcopy>..(inf)
#                  get[1]: 0..<bcopy>..(inf)
#
#                  rma_bw: mds rndv_rkey_size 9
#
)";
constexpr char kTcpInfo[] = R"(#
# UCP endpoint 
#
#               peer: <no debug data>
#                 lane[0]:  1:tcp/lo.0 md[0]                -> md[0]/tcp/sysdev[255] am am_bw#0 keepalive wireup
#
#                 am_send: 0..<egr/short>..8185..<egr/zcopy>..20553..<rndv>..(inf)
#
#                  rma_bw: mds rndv_rkey_size 9
#
)";
constexpr char kRdmaInfo[] = R"(#
#                 lane[0]:  4:rc_mlx5/mlx5_0:1.0 md[3]      -> md[3]/ib/sysdev[255] rma_bw#0 am am_bw#0
#                 lane[1]:  6:ud_mlx5/mlx5_0:1.0 md[3]      -> md[3]/ib/sysdev[255] keepalive wireup
#                 lane[2]: cm rdmacm
#                  put[0]: 0..<short>..2048..<bcopy>..4096..<zcopy>..(inf)
#                  get[0]: 0..<bcopy>..4096..<zcopy>..(inf)
#                  rma_bw: mds [3] rndv_rkey_size 19
)";
constexpr char kCmaInfo[] = R"(#
#                 lane[0]:  2:sysv/memory.0 md[1]           -> md[1]/sysv/sysdev[255] am am_bw#0 keepalive
#                 lane[1]:  5:cma/memory.0 md[4]            -> md[4]/cma/sysdev[255] rma_bw#0
#                  put[0]: 0..<short>..4294967296..<bcopy>..(inf)
#                  get[0]: 0..<bcopy>..(inf)
#                  put[1]: 0..<zcopy>..(inf)
#                  get[1]: 0..<zcopy>..(inf)
)";

TEST(DataPathTest, ClassifiesUcxOutput) {
  DataPath p = ClassifyDataPath(kShmInfo, /*pools_mapped=*/true);
  EXPECT_EQ(p.name, kDataPathShmDirect);
  EXPECT_FALSE(p.emulated);
  EXPECT_EQ(p.transports, "posix,sysv");
  // The same lanes, but the peer's memory is not a UCX segment: emulated.
  p = ClassifyDataPath(kShmInfo, /*pools_mapped=*/false);
  EXPECT_EQ(p.name, kDataPathAmEmulated);
  EXPECT_TRUE(p.emulated);
  EXPECT_EQ(p.transports, "sysv");
  p = ClassifyDataPath(kTcpInfo, false);
  EXPECT_EQ(p.name, kDataPathTcp);
  EXPECT_TRUE(p.emulated);
  p = ClassifyDataPath(kRdmaInfo, false);
  EXPECT_EQ(p.name, kDataPathRdma);
  EXPECT_FALSE(p.emulated);
  EXPECT_EQ(p.transports, "rc_mlx5");
  p = ClassifyDataPath(kCmaInfo, false);
  EXPECT_EQ(p.name, kDataPathKernelCopy);
  EXPECT_FALSE(p.emulated);
  EXPECT_EQ(ClassifyDataPath("", false).name, kDataPathUnknown);
  EXPECT_EQ(ClassifyDataPath("# lane[x]: garbage\n#  put[: \n", true).name, kDataPathUnknown);
}

}  // namespace
}  // namespace kvferry::internal
