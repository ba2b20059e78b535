// Closing data endpoints without waiting (Endpoint::BeginClose /
// AdvanceClose and ClosingEndpoints, src/closing_endpoints.h), with real
// UCX: two workers of this process over TCP and over shared memory. The
// target worker progresses only when a test says so, so a close that needs
// the other side (a flush, a wireup) is seen to stay open, and to end once
// the other side moves or the deadline passes.
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "src/closing_endpoints.h"
#include "src/ucx/context.h"
#include "src/ucx/endpoint.h"
#include "src/ucx/worker.h"
#include "tests/test_util.h"
#include "tests/transports.h"
#include "tests/ucx_pair.h"

namespace kvferry::internal {
namespace {

using test::IsOk;
using test::kShm;
using test::kTcp;
using test::Transport;

constexpr absl::Duration kDeadline = absl::Seconds(60);

class ClosingEndpointsTest : public ::testing::TestWithParam<Transport> {
 protected:
  void SetUp() override {
    ASSERT_THAT(ucx_.Create("closing-endpoints", GetParam().tls), IsOk());
  }
  void TearDown() override {
    ucx_.Progress(100);
    ucx_.Reset();
    EXPECT_EQ(ucx_.ledger->Snapshot().TotalLive(), 0) << ucx_.ledger->Report();
  }

  EndpointPtr Connect(Endpoint::ErrorMode mode) {
    auto address = ucx_.target->Address();
    EXPECT_THAT(address, IsOk());
    if (!address.ok()) return nullptr;
    auto ep = Endpoint::ConnectToAddress(ucx_.initiator, address->bytes(), mode);
    EXPECT_THAT(ep, IsOk());
    return ep.ok() ? *ep : nullptr;
  }
  // The flush that completes once the endpoint's wireup is done.
  Request Wireup(const EndpointPtr& ep) {
    ucp_request_param_t param = {};
    ucs_status_ptr_t flush = ucp_ep_flush_nbx(ep->native_handle(), &param);
    EXPECT_FALSE(UCS_PTR_IS_ERR(flush));
    return Request::Adopt(ucx_.initiator, flush);
  }
  int64_t Live(ResourceKind kind) const { return ucx_.ledger->Snapshot().Live(kind); }

  test::UcxPair ucx_;
};

// Over TCP an endpoint's wireup (and so a flush) needs the target's
// progress; over shared memory UCX wires up without it.
class ClosingOverTcpTest : public ClosingEndpointsTest {};

// A graceful close needs the target to answer its flush: BeginClose returns
// at once, AdvanceClose says "not yet" for as long as the target is silent
// (the initiator progressing all the while), and the close ends OK once the
// target progresses.
TEST_P(ClosingOverTcpTest, GracefulCloseWaitsForTheTargetWithoutBlocking) {
  EndpointPtr ep = Connect(Endpoint::ErrorMode::kPeer);
  ASSERT_NE(ep, nullptr);
  Request wireup = Wireup(ep);
  ASSERT_EQ(wireup.Check(), UCS_INPROGRESS) << "over TCP the wireup needs the target";
  const absl::Time begun = absl::Now();
  ep->BeginClose(/*force=*/false, kDeadline);
  EXPECT_LT(absl::Now() - begun, kDeadline / 2) << "BeginClose waited";
  EXPECT_TRUE(ep->closing());
  for (int i = 0; i < 1000; ++i) {
    ucx_.initiator->Progress();
    ASSERT_FALSE(ep->AdvanceClose(absl::Now())) << "ended without the target, pass " << i;
  }
  const absl::Time deadline = absl::Now() + kDeadline;
  bool ended = false;
  while (!ended && absl::Now() < deadline) {
    ucx_.initiator->Progress();
    ucx_.target->Progress();
    ended = ep->AdvanceClose(absl::Now());
  }
  ASSERT_TRUE(ended);
  EXPECT_FALSE(ep->closing());
  EXPECT_THAT(ep->close_status(), IsOk());
  EXPECT_EQ(ep->state(), Endpoint::State::kClosed);
  wireup.Reset();
}

// Past its drain time, a graceful close of a peer-error-mode endpoint is
// forced (OK: nothing can move); without that mode it cannot be, and the
// status says the operations may be outstanding.
TEST_P(ClosingOverTcpTest, GracefulCloseIsForcedAfterItsDrainTime) {
  for (Endpoint::ErrorMode mode : {Endpoint::ErrorMode::kPeer, Endpoint::ErrorMode::kNone}) {
    EndpointPtr ep = Connect(mode);
    ASSERT_NE(ep, nullptr);
    Request wireup = Wireup(ep);
    ASSERT_EQ(wireup.Check(), UCS_INPROGRESS) << "over TCP the wireup needs the target";
    ep->BeginClose(/*force=*/false, absl::Milliseconds(200));
    const absl::Time deadline = absl::Now() + kDeadline;
    bool ended = false;
    while (!ended && absl::Now() < deadline) {
      ucx_.initiator->Progress();  // never the target
      ended = ep->AdvanceClose(absl::Now());
    }
    ASSERT_TRUE(ended);
    if (mode == Endpoint::ErrorMode::kPeer) {
      EXPECT_THAT(ep->close_status(), IsOk());
    } else {
      EXPECT_EQ(ep->close_status().code(), absl::StatusCode::kDeadlineExceeded)
          << ep->close_status();
      EXPECT_THAT(std::string(ep->close_status().message()), ::testing::HasSubstr("outstanding"));
    }
    // Close answers the same afterwards, without waiting.
    EXPECT_EQ(ep->Close(/*force=*/true, absl::Seconds(1)).code(), ep->close_status().code());
    // A flush touches no memory: let go of it as the agent does.
    wireup.Abandon();
  }
}

// A close handed over while the endpoint's wireup is in flight does not
// begin (the endpoint stays open) until the wireup completed; then it ends
// with the key it was added with, and the endpoint is released.
TEST_P(ClosingOverTcpTest, ForceCloseWaitsForTheWireup) {
  EndpointPtr ep = Connect(Endpoint::ErrorMode::kPeer);
  ASSERT_NE(ep, nullptr);
  Request wireup = Wireup(ep);
  ASSERT_EQ(wireup.Check(), UCS_INPROGRESS) << "over TCP the wireup needs the target";
  ClosingEndpoints closing;
  Endpoint* raw = ep.get();
  closing.Add(7, std::move(ep), std::move(wireup), absl::Now() + kDeadline, /*force=*/true,
              absl::Milliseconds(100));
  for (int i = 0; i < 1000; ++i) {
    ucx_.initiator->Progress();
    ASSERT_TRUE(closing.Advance(absl::Now()).empty()) << "pass " << i;
    ASSERT_EQ(raw->state(), Endpoint::State::kConnected) << "closed during its wireup";
  }
  std::vector<ClosingEndpoints::Ended> ended;
  const absl::Time deadline = absl::Now() + kDeadline;
  while (ended.empty() && absl::Now() < deadline) {
    ucx_.initiator->Progress();
    ucx_.target->Progress();
    ended = closing.Advance(absl::Now());
  }
  ASSERT_EQ(ended.size(), 1u);
  EXPECT_EQ(ended[0].key, 7u);
  EXPECT_THAT(ended[0].status, IsOk());
  EXPECT_TRUE(closing.empty());
  EXPECT_EQ(Live(ResourceKind::kEndpoint), 0);
}

// The wireup is waited for only until its deadline: a target that never
// answers does not keep the endpoint open.
TEST_P(ClosingEndpointsTest, WireupIsWaitedForOnlyUntilItsDeadline) {
  EndpointPtr ep = Connect(Endpoint::ErrorMode::kPeer);
  ASSERT_NE(ep, nullptr);
  Request wireup = Wireup(ep);
  ClosingEndpoints closing;
  closing.Add(1, std::move(ep), std::move(wireup), absl::Now() + absl::Milliseconds(200),
              /*force=*/true, absl::Milliseconds(100));
  std::vector<ClosingEndpoints::Ended> ended;
  const absl::Time deadline = absl::Now() + kDeadline;
  while (ended.empty() && absl::Now() < deadline) {
    ucx_.initiator->Progress();  // never the target
    ended = closing.Advance(absl::Now());
  }
  ASSERT_EQ(ended.size(), 1u);
  EXPECT_EQ(ended[0].key, 1u);
  EXPECT_THAT(ended[0].status, IsOk());
  EXPECT_EQ(Live(ResourceKind::kEndpoint), 0);
}

// FinishAll ends every close left, each reported once.
TEST_P(ClosingEndpointsTest, FinishAllEndsEveryClose) {
  ClosingEndpoints closing;
  for (uint64_t key = 1; key <= 3; ++key) {
    EndpointPtr ep = Connect(Endpoint::ErrorMode::kPeer);
    ASSERT_NE(ep, nullptr);
    closing.Add(key, std::move(ep), Request(), absl::Now(), /*force=*/key != 2,
                absl::Milliseconds(200));
  }
  EXPECT_EQ(closing.size(), 3u);
  std::vector<ClosingEndpoints::Ended> ended = closing.FinishAll();
  ASSERT_EQ(ended.size(), 3u);
  std::vector<uint64_t> keys;
  for (const auto& e : ended) {
    keys.push_back(e.key);
    EXPECT_THAT(e.status, IsOk()) << e.key;
  }
  EXPECT_THAT(keys, ::testing::UnorderedElementsAre(1u, 2u, 3u));
  EXPECT_TRUE(closing.empty());
  EXPECT_EQ(Live(ResourceKind::kEndpoint), 0);
}

INSTANTIATE_TEST_SUITE_P(Transports, ClosingEndpointsTest, ::testing::Values(kTcp, kShm),
                         [](const auto& param_info) { return std::string(param_info.param.name); });
INSTANTIATE_TEST_SUITE_P(Transports, ClosingOverTcpTest, ::testing::Values(kTcp),
                         [](const auto& param_info) { return std::string(param_info.param.name); });

}  // namespace
}  // namespace kvferry::internal
