#include "src/ucx/status.h"

#include "tests/test_util.h"

namespace kvferry::internal {
namespace {

using test::StatusIs;

TEST(UcsStatusTest, MapsAsDocumented) {
  EXPECT_TRUE(UcsToStatus(UCS_OK, "x").ok());
  struct Case {
    ucs_status_t in;
    absl::StatusCode out;
  } cases[] = {
      {UCS_ERR_CONNECTION_RESET, absl::StatusCode::kUnavailable},
      {UCS_ERR_ENDPOINT_TIMEOUT, absl::StatusCode::kUnavailable},
      {UCS_ERR_TIMED_OUT, absl::StatusCode::kUnavailable},
      {UCS_ERR_UNREACHABLE, absl::StatusCode::kUnavailable},
      {UCS_ERR_CANCELED, absl::StatusCode::kCancelled},
      {UCS_ERR_NO_MEMORY, absl::StatusCode::kResourceExhausted},
      {UCS_ERR_NO_RESOURCE, absl::StatusCode::kResourceExhausted},
      {UCS_ERR_INVALID_PARAM, absl::StatusCode::kInvalidArgument},
      {UCS_ERR_UNSUPPORTED, absl::StatusCode::kUnimplemented},
      {UCS_ERR_NO_MESSAGE, absl::StatusCode::kInternal},
      {static_cast<ucs_status_t>(UCS_ERR_FIRST_LINK_FAILURE - 1), absl::StatusCode::kUnavailable},
  };
  for (const Case& c : cases) {
    EXPECT_THAT(UcsToStatus(c.in, "ucp_thing"), StatusIs(c.out, "ucp_thing: "))
        << ucs_status_string(c.in);
  }
}

TEST(UcsStatusTest, SortsStatusPointers) {
  EXPECT_EQ(SortStatusPtr(nullptr), PtrKind::kDone);
  EXPECT_EQ(SortStatusPtr(UCS_STATUS_PTR(UCS_ERR_NO_MEMORY)), PtrKind::kError);
  int dummy = 0;
  EXPECT_EQ(SortStatusPtr(&dummy), PtrKind::kInFlight);
}

}  // namespace
}  // namespace kvferry::internal
