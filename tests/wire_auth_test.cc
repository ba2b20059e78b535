// The handshake's proofs and the sealing of later frames (src/wire/auth.h).
#include "src/wire/auth.h"

#include "src/wire/message.h"
#include "tests/test_util.h"

namespace kvferry::internal::wire {
namespace {

using test::IsOk;
using test::StatusIs;

HandshakeTranscript Transcript() {
  return {.client_name = "prefill-0", .server_name = "decode-0", .client_incarnation = 11,
          .server_incarnation = 22, .client_nonce = std::string(kNonceBytes, 'c'),
          .server_nonce = std::string(kNonceBytes, 's')};
}

TEST(WireAuthTest, ProofsBindSecretRoleAndEveryTranscriptField) {
  const HandshakeTranscript t = Transcript();
  const std::string proof = ComputeProof("secret", ProofRole::kClient, t);
  EXPECT_EQ(proof.size(), kProofBytes);
  EXPECT_TRUE(ProofMatches("secret", ProofRole::kClient, t, proof));
  EXPECT_FALSE(ProofMatches("secreT", ProofRole::kClient, t, proof));
  EXPECT_FALSE(ProofMatches("secret", ProofRole::kServer, t, proof));  // no reflection
  EXPECT_FALSE(ProofMatches("secret", ProofRole::kClient, t, proof.substr(1)));
  std::vector<HandshakeTranscript> changed(6, t);
  changed[0].client_name = "prefill-1";
  changed[1].server_name = "decode-1";
  changed[2].client_incarnation = 12;
  changed[3].server_incarnation = 23;
  changed[4].client_nonce[5] ^= 1;
  changed[5].server_nonce[31] ^= 1;
  for (size_t i = 0; i < changed.size(); ++i) {
    EXPECT_FALSE(ProofMatches("secret", ProofRole::kClient, changed[i], proof)) << "field " << i;
  }
  // Field boundaries are framed: moving a byte between names changes it.
  HandshakeTranscript shifted = t;
  shifted.client_name = "prefill-0d";
  shifted.server_name = "ecode-0";
  EXPECT_FALSE(ProofMatches("secret", ProofRole::kClient, shifted, proof));
}

TEST(WireAuthTest, NoncesAreFresh) {
  auto a = RandomNonce();
  auto b = RandomNonce();
  ASSERT_THAT(a, IsOk());
  ASSERT_THAT(b, IsOk());
  EXPECT_EQ(a->size(), kNonceBytes);
  EXPECT_NE(*a, *b);
}

TEST(WireAuthTest, SealedFramesOpenOnlyWithTheirKeyAndSequence) {
  const SessionKeys keys = DeriveSessionKeys("secret", Transcript());
  EXPECT_NE(keys.client_to_server, keys.server_to_client);
  EXPECT_NE(keys.client_to_server, DeriveSessionKeys("other", Transcript()).client_to_server);
  const Message note{.type = MessageType::kNotify, .text = "layer 3 of request 17"};
  const std::string plain = Encode(note);
  const std::string sealed = SealFrame(keys.client_to_server, 7, plain);
  ASSERT_EQ(sealed.size(), plain.size() + kTagBytes);
  // The header announces the tag, so the stream splits at the right place.
  EXPECT_EQ(*FrameLength(sealed + plain), sealed.size());

  auto opened = OpenFrame(keys.client_to_server, 7, sealed);
  ASSERT_THAT(opened, IsOk());
  EXPECT_EQ(*opened, plain);
  EXPECT_EQ(*Decode(*opened), note);

  EXPECT_THAT(OpenFrame(keys.client_to_server, 8, sealed),
              StatusIs(absl::StatusCode::kPermissionDenied, "frame 8 failed its integrity check"));
  EXPECT_THAT(OpenFrame(keys.server_to_client, 7, sealed),
              StatusIs(absl::StatusCode::kPermissionDenied, "integrity"));
  for (size_t i = 0; i < sealed.size(); ++i) {
    std::string bad = sealed;
    bad[i] ^= 0x10;
    EXPECT_THAT(OpenFrame(keys.client_to_server, 7, bad),
                StatusIs(absl::StatusCode::kPermissionDenied, ""))
        << "byte " << i;
  }
  EXPECT_THAT(OpenFrame(keys.client_to_server, 7, sealed.substr(0, kHeaderBytes + kTagBytes - 1)),
              StatusIs(absl::StatusCode::kPermissionDenied, "too short"));
  EXPECT_THAT(OpenFrame(keys.client_to_server, 7, plain + std::string(kTagBytes, '\0')),
              StatusIs(absl::StatusCode::kPermissionDenied, "integrity"));
}

TEST(WireAuthTest, FrameCaps) {
  std::string hello = Encode({.type = MessageType::kHello, .name = std::string(255, 'n'),
                              .incarnation = 1, .nonce = std::string(kNonceBytes, 'x')});
  EXPECT_LT(hello.size(), kMaxHelloFrameBytes);
  EXPECT_EQ(*FrameLength(hello, kMaxHelloFrameBytes), hello.size());
  std::string big = Encode({.type = MessageType::kNotify, .text = std::string(5000, 'p')});
  EXPECT_THAT(FrameLength(big, kMaxHelloFrameBytes),
              StatusIs(absl::StatusCode::kInvalidArgument, "the limit is 4084"));
  EXPECT_EQ(*FrameLength(big), big.size());
  EXPECT_EQ(PeekFrameType(big), static_cast<uint16_t>(MessageType::kNotify));
  EXPECT_EQ(PeekFrameType("short"), 0);
}

}  // namespace
}  // namespace kvferry::internal::wire
