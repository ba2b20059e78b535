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

std::string ComputeProof(absl::string_view secret, ProofRole role,
                         const HandshakeTranscript& t) {
  std::string message;
  AppendField(&message, role == ProofRole::kServer ? "kvferry/2 server proof"
                                                   : "kvferry/2 client proof");
  AppendField(&message, t.client_name);
  AppendField(&message, t.server_name);
  AppendU64(&message, t.client_incarnation);
  AppendU64(&message, t.server_incarnation);
  AppendField(&message, t.client_nonce);
  AppendField(&message, t.server_nonce);
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int mac_len = 0;
  // An empty key is valid for HMAC; OpenSSL wants a non-null pointer.
  static const char kEmpty = 0;
  const void* key = secret.empty() ? &kEmpty : secret.data();
  HMAC(EVP_sha256(), key, static_cast<int>(secret.size()),
       reinterpret_cast<const unsigned char*>(message.data()), message.size(), mac, &mac_len);
  return std::string(reinterpret_cast<const char*>(mac), mac_len);
}

bool ProofMatches(absl::string_view secret, ProofRole role, const HandshakeTranscript& t,
                  absl::string_view received) {
  const std::string expected = ComputeProof(secret, role, t);
  return received.size() == expected.size() &&
         CRYPTO_memcmp(expected.data(), received.data(), expected.size()) == 0;
}

}  // namespace kvferry::internal::wire
