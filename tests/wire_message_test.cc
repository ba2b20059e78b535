#include "src/wire/message.h"

#include <cstring>

#include "absl/strings/str_cat.h"

#include "tests/test_util.h"

namespace kvferry::internal::wire {
namespace {

using test::IsOk;
using test::SmallLayout;
using test::StatusIs;

// A PROOF: the message that carries a full descriptor.
Message Hello() {
  Message m;
  m.type = MessageType::kProof;
  m.proof = std::string(kProofBytes, '\x5a');
  m.agent.name = "decode-0";
  m.agent.host_id = "boot-id";
  m.agent.worker_address = std::string(64, '\x11');
  m.agent.pid = 4242;  // the kernel-copy probe (src/kernel_copy.h)
  m.agent.probe_address = 0x7ffc00001000;
  m.agent.pools.push_back({.name = "kv", .layout = SmallLayout(16),
                           .regions = {{.base = 0x7f0000000000,
                                        .length = SmallLayout(16).total_bytes(),
                                        .rkey = "rkey-bytes"}}});
  // Engine memory: one region per layer and plane.
  PoolDescriptor per_plane{.name = "kv2", .layout = SmallLayout(8)};
  for (uint64_t i = 0; i < 8; ++i) {
    per_plane.regions.push_back({.base = 0x7f1000000000 + (i << 24),
                                 .length = SmallLayout(8).plane_bytes(),
                                 .rkey = absl::StrCat("rkey-2-", i)});
  }
  m.agent.pools.push_back(per_plane);
  return m;
}

TEST(WireMessageTest, RoundTripsEveryType) {
  std::vector<Message> messages = {Hello()};
  Message welcome = Hello();
  welcome.type = MessageType::kWelcome;
  welcome.proof.clear();
  messages.push_back(welcome);
  messages.push_back({.type = MessageType::kHello, .name = "prefill-1", .incarnation = 42,
                      .nonce = std::string(kNonceBytes, '\x01')});
  messages.push_back({.type = MessageType::kChallenge, .name = "decode-0", .incarnation = 43,
                      .nonce = std::string(kNonceBytes, '\x02'),
                      .proof = std::string(kProofBytes, '\x03')});
  messages.push_back({.type = MessageType::kReject, .code = 7, .text = "secret mismatch"});
  messages.push_back({.type = MessageType::kNotify, .text = std::string("\0bin\xff", 5)});
  messages.push_back({.type = MessageType::kPing});
  messages.push_back({.type = MessageType::kBye});
  Message added{.type = MessageType::kPoolAdded};
  added.agent.pools = Hello().agent.pools;
  messages.push_back(added);
  messages.push_back({.type = MessageType::kOfferDone, .code = 10, .text = "aborted",
                      .offer_id = 7, .layer_begin = 1, .layer_end = 3});
  messages.push_back({.type = MessageType::kOfferRevoke, .text = "expired", .offer_id = 8,
                      .ttl_ns = 1234567});
  messages.push_back({.type = MessageType::kOfferRevoked, .offer_id = 9});
  messages.push_back({.type = MessageType::kOfferRevoke, .text = "released", .offer_id = 10,
                      .ttl_ns = 5, .offer_floor = 3});
  messages.push_back({.type = MessageType::kOfferRelease, .offer_id = 11});
  messages.push_back(
      {.type = MessageType::kOfferBound, .offer_id = 12, .ttl_ns = 60, .offer_floor = 12});
  messages.push_back({.type = MessageType::kOfferEnded, .offer_id = 13, .offer_floor = 14});
  messages.push_back({.type = MessageType::kPoolRemoved, .name = "kv-old"});
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
  bad[4] = 1;  // version 1
  EXPECT_THAT(Decode(bad), StatusIs(absl::StatusCode::kFailedPrecondition,
                                    "wire version 1 is not supported (this build speaks 6)"));
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
  m.agent.pools[0].regions[0].length += 4096;
  EXPECT_THAT(Decode(Encode(m)), StatusIs(absl::StatusCode::kInvalidArgument,
                                          "region 0 length"));
  m = Hello();
  m.agent.pools[1].regions[5].length -= 64;
  EXPECT_THAT(Decode(Encode(m)), StatusIs(absl::StatusCode::kInvalidArgument,
                                          "pool 'kv2': region 5 length"));
  m = Hello();
  m.agent.pools[1].regions.resize(3);
  EXPECT_THAT(Decode(Encode(m)), StatusIs(absl::StatusCode::kInvalidArgument,
                                          "has 3 regions"));
  m = Hello();
  m.agent.pools[1].name = "kv";
  EXPECT_THAT(Decode(Encode(m)), StatusIs(absl::StatusCode::kInvalidArgument, "twice"));
  m = Hello();
  // Addresses no user-space mapping can have: null page, kernel half,
  // wrapping past the end.
  for (uint64_t base : {uint64_t{0}, uint64_t{1}, uint64_t{0xffff800000000000},
                        kAddressLimit - 4096, ~uint64_t{0} - 100}) {
    m = Hello();
    m.agent.pools[0].regions[0].base = base;
    EXPECT_THAT(Decode(Encode(m)), StatusIs(absl::StatusCode::kInvalidArgument,
                                            "is not a user-space address range"))
        << std::hex << base;
  }
  // A layout claiming 2^25 blocks of 2 MiB: far past any real pool.
  m = Hello();
  m.agent.pools[0].layout = SmallLayout(1u << 25);
  m.agent.pools[0].layout.head_dim = 4096;
  m.agent.pools[0].regions[0].length = m.agent.pools[0].layout.total_bytes();
  EXPECT_THAT(Decode(Encode(m)),
              StatusIs(absl::StatusCode::kInvalidArgument, "exceeds the maximum"));
  m = Hello();
  m.agent.name = std::string(300, 'n');
  EXPECT_THAT(Decode(Encode(m)),
              StatusIs(absl::StatusCode::kInvalidArgument, "agent.name has 300 bytes"));
  m = Hello();
  m.agent.name = "bad name";
  EXPECT_THAT(Decode(Encode(m)), StatusIs(absl::StatusCode::kInvalidArgument,
                                          "agent name has byte 0x20 at offset 3"));
  m = Hello();
  m.agent.pools[0].name = std::string("kv\n", 3);
  EXPECT_THAT(Decode(Encode(m)), StatusIs(absl::StatusCode::kInvalidArgument,
                                          "pool name has byte 0xa at offset 2"));
  m = Hello();
  m.agent.pools[0].regions[0].rkey = std::string(kMaxRkeyBytes + 1, 'r');
  EXPECT_THAT(Decode(Encode(m)), StatusIs(absl::StatusCode::kInvalidArgument,
                                          "region.rkey has 4097 bytes; the limit is 4096"));
  m = Hello();
  m.proof = "short";
  EXPECT_THAT(Decode(Encode(m)),
              StatusIs(absl::StatusCode::kInvalidArgument, "proof.proof has 5 bytes, not 32"));
  Message hello{.type = MessageType::kHello, .name = "p", .nonce = "n"};
  EXPECT_THAT(Decode(Encode(hello)),
              StatusIs(absl::StatusCode::kInvalidArgument, "hello.nonce has 1 bytes, not 32"));
  m = Hello();
  m.agent.worker_address.clear();
  EXPECT_THAT(Decode(Encode(m)), StatusIs(absl::StatusCode::kInvalidArgument, "worker address"));
  m = Hello();
  m.agent.pools[0].regions[0].rkey.clear();
  EXPECT_THAT(Decode(Encode(m)), StatusIs(absl::StatusCode::kInvalidArgument, "empty rkey"));
}

TEST(WireMessageTest, FrameLengthSplitsAStream) {
  std::string a = Encode({.type = MessageType::kPing});
  std::string b = Encode({.type = MessageType::kNotify, .text = "layer 7"});
  std::string stream = a + b;
  EXPECT_EQ(*FrameLength(""), 0u);
  EXPECT_EQ(*FrameLength(stream.substr(0, kHeaderBytes - 1)), 0u);
  EXPECT_EQ(*FrameLength(stream), a.size());
  EXPECT_EQ(*FrameLength(absl::string_view(stream).substr(a.size())), b.size());
  EXPECT_THAT(FrameLength("GET / HTTP/1.1\r\n"),
              StatusIs(absl::StatusCode::kInvalidArgument, "not a kvferry control frame"));
  std::string huge = a;
  uint32_t len = 2u << 20;
  std::memcpy(huge.data() + 8, &len, 4);
  EXPECT_THAT(FrameLength(huge), StatusIs(absl::StatusCode::kInvalidArgument,
                                          "frame announces a 2097152-byte body"));
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
  // separate_kv sits right before the region count (u32) and one region:
  // base (u64), length (u64) and the rkey string.
  size_t pos = bytes.size() - (4 + m.agent.pools[0].regions[0].rkey.size()) - 16 - 4 - 1;
  ASSERT_EQ(bytes[pos], 1);
  bytes[pos] = 7;
  EXPECT_THAT(Decode(bytes), StatusIs(absl::StatusCode::kInvalidArgument, "separate_kv byte is 7"));
}

TEST(WireMessageTest, OfferMessagesAreChecked) {
  EXPECT_THAT(Decode(Encode({.type = MessageType::kOfferDone, .offer_id = 1, .layer_begin = 2,
                             .layer_end = 2})),
              StatusIs(absl::StatusCode::kInvalidArgument, "layer range [2, 2) is empty"));
  EXPECT_THAT(Decode(Encode({.type = MessageType::kOfferDone, .code = 99, .offer_id = 1,
                             .layer_begin = 0, .layer_end = 1})),
              StatusIs(absl::StatusCode::kInvalidArgument, "code 99"));
  EXPECT_THAT(Decode(Encode({.type = MessageType::kPoolAdded})),
              StatusIs(absl::StatusCode::kInvalidArgument, "lists no pool"));
}

TEST(WireMessageTest, TicketsRoundTripAndRefuseGarbage) {
  Ticket t{.offer_id = 5, .offerer = "prefill", .offerer_incarnation = 77, .taker = "decode",
           .pool = "kv", .ttl_ns = 30000000000, .num_layers = 32,
           .blocks = {4, 5, 9}};
  std::string bytes = EncodeTicketBody(t) + std::string(kTicketTagBytes, 't');
  absl::string_view body, tag;
  auto back = DecodeTicket(bytes, &body, &tag);
  ASSERT_THAT(back, IsOk());
  EXPECT_EQ(*back, t);
  EXPECT_EQ(tag, std::string(kTicketTagBytes, 't'));
  EXPECT_EQ(body.size() + tag.size(), bytes.size());
  for (size_t n = 0; n < bytes.size(); ++n) {
    EXPECT_FALSE(DecodeTicket(bytes.substr(0, n)).ok()) << "prefix of " << n << " bytes";
  }
  std::string bad = bytes;
  bad[0] ^= 1;
  EXPECT_THAT(DecodeTicket(bad), StatusIs(absl::StatusCode::kInvalidArgument, "ticket magic"));
  t.num_layers = 0;
  EXPECT_THAT(DecodeTicket(EncodeTicketBody(t) + std::string(kTicketTagBytes, 't')),
              StatusIs(absl::StatusCode::kInvalidArgument, "0 layers"));
}

}  // namespace
}  // namespace kvferry::internal::wire
