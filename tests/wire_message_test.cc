#include "src/wire/message.h"

#include "tests/test_util.h"

namespace kvferry::internal::wire {
namespace {

using testing::IsOk;
using testing::SmallLayout;
using testing::StatusIs;

Message Hello() {
  Message m;
  m.type = MessageType::kHello;
  m.agent.name = "decode-0";
  m.agent.host_id = "boot-id";
  m.agent.worker_address = std::string(64, '\x11');
  m.agent.secret = "s3cret";
  m.agent.pools.push_back({.name = "kv", .layout = SmallLayout(16), .base = 0x7f0000000000,
                           .length = SmallLayout(16).total_bytes(), .rkey = "rkey-bytes"});
  m.agent.pools.push_back({.name = "kv2", .layout = SmallLayout(8), .base = 0x7f1000000000,
                           .length = SmallLayout(8).total_bytes(), .rkey = "rkey-2"});
  return m;
}

TEST(WireMessageTest, RoundTripsEveryType) {
  std::vector<Message> messages = {Hello()};
  Message welcome = Hello();
  welcome.type = MessageType::kWelcome;
  messages.push_back(welcome);
  messages.push_back({.type = MessageType::kReject, .code = 7, .text = "secret mismatch"});
  messages.push_back({.type = MessageType::kNotify, .text = std::string("\0bin\xff", 5)});
  messages.push_back({.type = MessageType::kPing});
  messages.push_back({.type = MessageType::kBye});
  for (const Message& m : messages) {
    auto decoded = Decode(Encode(m));
    ASSERT_THAT(decoded, IsOk());
    EXPECT_EQ(*decoded, m);
  }
}

TEST(WireMessageTest, EveryTruncationIsInvalidArgument) {
  std::string bytes = Encode(Hello());
  for (size_t n = 0; n < bytes.size(); ++n) {
    EXPECT_THAT(Decode(bytes.substr(0, n)), StatusIs(absl::StatusCode::kInvalidArgument, ""))
        << "prefix of " << n << " bytes";
  }
}

TEST(WireMessageTest, TruncatedBodyNamesTheField) {
  std::string bytes = Encode(Hello());
  // Shorten the body but fix up the header's length, so the body parser sees
  // the truncation.
  std::string cut = bytes.substr(0, 30);
  uint32_t len = static_cast<uint32_t>(cut.size() - kHeaderBytes);
  std::memcpy(cut.data() + 8, &len, 4);
  EXPECT_THAT(Decode(cut), StatusIs(absl::StatusCode::kInvalidArgument, "descriptor truncated"));
}

TEST(WireMessageTest, BadMagicAndVersion) {
  std::string bytes = Encode(Hello());
  std::string bad = bytes;
  bad[0] ^= 0x40;
  EXPECT_THAT(Decode(bad), StatusIs(absl::StatusCode::kInvalidArgument, "bad magic"));
  bad = bytes;
  bad[4] = 2;  // version 2
  EXPECT_THAT(Decode(bad), StatusIs(absl::StatusCode::kFailedPrecondition,
                                    "wire version 2 is not supported (this build speaks 1)"));
}

TEST(WireMessageTest, LengthAndTrailingBytes) {
  std::string bytes = Encode({.type = MessageType::kPing});
  EXPECT_THAT(Decode(bytes + "x"), StatusIs(absl::StatusCode::kInvalidArgument,
                                            "header announces a 0-byte body but 1 bytes follow"));
  std::string with_trailer = Encode({.type = MessageType::kNotify, .text = "abc"});
  with_trailer += "zz";
  uint32_t len = static_cast<uint32_t>(with_trailer.size() - kHeaderBytes);
  std::memcpy(with_trailer.data() + 8, &len, 4);
  EXPECT_THAT(Decode(with_trailer),
              StatusIs(absl::StatusCode::kInvalidArgument, "2 trailing bytes"));
}

TEST(WireMessageTest, CorruptedFieldsAreNamed) {
  Message m = Hello();
  m.agent.pools[0].layout.head_dim = 0;
  EXPECT_THAT(Decode(Encode(m)), StatusIs(absl::StatusCode::kInvalidArgument,
                                          "pool 'kv': KvLayout.head_dim must be > 0"));
  m = Hello();
  m.agent.pools[0].length += 4096;
  EXPECT_THAT(Decode(Encode(m)), StatusIs(absl::StatusCode::kInvalidArgument,
                                          "does not match its layout's"));
  m = Hello();
  m.agent.pools[1].name = "kv";
  EXPECT_THAT(Decode(Encode(m)), StatusIs(absl::StatusCode::kInvalidArgument, "twice"));
  m = Hello();
  m.agent.pools[0].base = ~uint64_t{0} - 100;
  EXPECT_THAT(Decode(Encode(m)), StatusIs(absl::StatusCode::kInvalidArgument,
                                          "not a valid address range"));
  m = Hello();
  m.agent.name = std::string(300, 'n');
  EXPECT_THAT(Decode(Encode(m)),
              StatusIs(absl::StatusCode::kInvalidArgument, "agent.name has 300 bytes"));
  m = Hello();
  m.agent.worker_address.clear();
  EXPECT_THAT(Decode(Encode(m)), StatusIs(absl::StatusCode::kInvalidArgument, "worker address"));
  m = Hello();
  m.agent.pools[0].rkey.clear();
  EXPECT_THAT(Decode(Encode(m)), StatusIs(absl::StatusCode::kInvalidArgument, "empty rkey"));
}

TEST(WireMessageTest, UnknownTypeAndBadRejectCode) {
  std::string bytes = Encode({.type = MessageType::kPing});
  bytes[6] = 99;
  EXPECT_THAT(Decode(bytes), StatusIs(absl::StatusCode::kInvalidArgument, "unknown message type 99"));
  EXPECT_THAT(Decode(Encode({.type = MessageType::kReject, .code = 0, .text = "x"})),
              StatusIs(absl::StatusCode::kInvalidArgument, "reject code 0"));
}

TEST(WireMessageTest, SeparateKvByteMustBeBoolean) {
  Message m = Hello();
  m.agent.pools.resize(1);
  std::string bytes = Encode(m);
  // separate_kv sits right before base (u64), length (u64) and the rkey string.
  size_t pos = bytes.size() - (4 + m.agent.pools[0].rkey.size()) - 16 - 1;
  ASSERT_EQ(bytes[pos], 1);
  bytes[pos] = 7;
  EXPECT_THAT(Decode(bytes), StatusIs(absl::StatusCode::kInvalidArgument, "separate_kv byte is 7"));
}

}  // namespace
}  // namespace kvferry::internal::wire
