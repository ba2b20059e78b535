#include "src/wire/auth.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <cstring>

#include "src/wire/message.h"

namespace kvferry::internal::wire {
namespace {

void AppendField(std::string* out, absl::string_view field) {
  const uint32_t n = static_cast<uint32_t>(field.size());
  char len[4];
  std::memcpy(len, &n, sizeof(n));
  out->append(len, sizeof(len));
  out->append(field.data(), field.size());
}

void AppendU64(std::string* out, uint64_t v) {
  char buf[8];
  std::memcpy(buf, &v, sizeof(v));
  out->append(buf, sizeof(buf));
}

}  // namespace

absl::StatusOr<std::string> RandomNonce() {
  std::string nonce(kNonceBytes, '\0');
  if (RAND_bytes(reinterpret_cast<unsigned char*>(nonce.data()),
                 static_cast<int>(nonce.size())) != 1) {
    return absl::InternalError("RAND_bytes failed to produce a handshake nonce");
  }
  return nonce;
}

namespace {

std::string Hmac(absl::string_view key, absl::string_view message) {
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int mac_len = 0;
  // An empty key is valid for HMAC; OpenSSL wants a non-null pointer.
  static const char kEmpty = 0;
  const void* k = key.empty() ? &kEmpty : key.data();
  HMAC(EVP_sha256(), k, static_cast<int>(key.size()),
       reinterpret_cast<const unsigned char*>(message.data()), message.size(), mac, &mac_len);
  return std::string(reinterpret_cast<const char*>(mac), mac_len);
}

std::string TranscriptMessage(absl::string_view label, const HandshakeTranscript& t) {
  std::string message;
  AppendField(&message, label);
  AppendField(&message, t.client_name);
  AppendField(&message, t.server_name);
  AppendU64(&message, t.client_incarnation);
  AppendU64(&message, t.server_incarnation);
  AppendField(&message, t.client_nonce);
  AppendField(&message, t.server_nonce);
  return message;
}

constexpr size_t kLengthOffset = 8;  // of the u32 body length in a header

void AddToLength(std::string* frame, int64_t delta) {
  uint32_t length = 0;
  std::memcpy(&length, frame->data() + kLengthOffset, sizeof(length));
  length = static_cast<uint32_t>(static_cast<int64_t>(length) + delta);
  std::memcpy(frame->data() + kLengthOffset, &length, sizeof(length));
}

std::string FrameTag(absl::string_view key, uint64_t sequence, absl::string_view frame) {
  std::string message;
  AppendU64(&message, sequence);
  message.append(frame.data(), frame.size());
  return Hmac(key, message);
}

}  // namespace

std::string ComputeProof(absl::string_view secret, ProofRole role,
                         const HandshakeTranscript& t) {
  return Hmac(secret, TranscriptMessage(role == ProofRole::kServer ? "kvferry/2 server proof"
                                                                   : "kvferry/2 client proof",
                                        t));
}

SessionKeys DeriveSessionKeys(absl::string_view secret, const HandshakeTranscript& t) {
  return {Hmac(secret, TranscriptMessage("kvferry/2 client frames", t)),
          Hmac(secret, TranscriptMessage("kvferry/2 server frames", t))};
}

std::string SealFrame(absl::string_view key, uint64_t sequence, std::string frame) {
  AddToLength(&frame, static_cast<int64_t>(kTagBytes));
  const std::string tag = FrameTag(key, sequence, frame);
  frame.append(tag);
  return frame;
}

absl::StatusOr<std::string> OpenFrame(absl::string_view key, uint64_t sequence,
                                      absl::string_view frame) {
  if (frame.size() < kHeaderBytes + kTagBytes) {
    return absl::PermissionDeniedError(absl::StrCat("a ", frame.size(),
                                                    "-byte frame is too short to be sealed"));
  }
  const absl::string_view sealed = frame.substr(0, frame.size() - kTagBytes);
  const std::string expected = FrameTag(key, sequence, sealed);
  if (CRYPTO_memcmp(expected.data(), frame.data() + sealed.size(), kTagBytes) != 0) {
    return absl::PermissionDeniedError(absl::StrCat(
        "frame ", sequence, " failed its integrity check (altered, forged, replayed or out of "
        "order, or sealed under another secret)"));
  }
  std::string inner(sealed);
  AddToLength(&inner, -static_cast<int64_t>(kTagBytes));
  return inner;
}

bool ProofMatches(absl::string_view secret, ProofRole role, const HandshakeTranscript& t,
                  absl::string_view received) {
  const std::string expected = ComputeProof(secret, role, t);
  return received.size() == expected.size() &&
         CRYPTO_memcmp(expected.data(), received.data(), expected.size()) == 0;
}

std::string TicketTag(absl::string_view key, absl::string_view body) {
  std::string message;
  AppendField(&message, "kvferry/3 offer ticket");
  message.append(body.data(), body.size());
  return Hmac(key, message);
}

bool TicketTagMatches(absl::string_view key, absl::string_view body, absl::string_view tag) {
  const std::string expected = TicketTag(key, body);
  return tag.size() == expected.size() &&
         CRYPTO_memcmp(expected.data(), tag.data(), expected.size()) == 0;
}

std::string TicketNameKey(absl::string_view secret, absl::string_view offerer,
                          uint64_t offerer_incarnation, absl::string_view taker) {
  std::string message;
  AppendField(&message, "kvferry/6 offer ticket for a name");
  AppendField(&message, offerer);
  AppendU64(&message, offerer_incarnation);
  AppendField(&message, taker);
  return Hmac(secret, message);
}

std::string KernelCopyProbe(absl::string_view key) {
  std::string message;
  AppendField(&message, "kvferry/4 kernel-copy probe");
  return Hmac(key, message);
}

}  // namespace kvferry::internal::wire
