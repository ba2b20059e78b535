#include "src/metadata.h"

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "src/net/socket.h"
#include "src/wire/message.h"

namespace kvferry::internal {
namespace {

constexpr absl::string_view kMagic = "KVFM";

void PutU16(std::string* out, uint16_t v) {
  out->push_back(static_cast<char>(v & 0xff));
  out->push_back(static_cast<char>(v >> 8));
}

// Reads fields front to back; each failure names the field and its offset.
class MetadataReader {
 public:
  explicit MetadataReader(absl::string_view bytes) : bytes_(bytes) {}
  size_t offset() const { return offset_; }
  size_t left() const { return bytes_.size() - offset_; }

  absl::Status Bytes(absl::string_view field, size_t n, absl::string_view* out) {
    if (left() < n) {
      return absl::InvalidArgumentError(absl::StrCat(
          "connection metadata truncated: ", field, " needs ", n, " bytes at offset ", offset_,
          ", ", left(), " left (", bytes_.size(), " bytes in all)"));
    }
    *out = bytes_.substr(offset_, n);
    offset_ += n;
    return absl::OkStatus();
  }
  absl::Status U8(absl::string_view field, uint8_t* out) {
    absl::string_view b;
    if (absl::Status s = Bytes(field, 1, &b); !s.ok()) return s;
    *out = static_cast<uint8_t>(b[0]);
    return absl::OkStatus();
  }
  absl::Status U16(absl::string_view field, uint16_t* out) {
    absl::string_view b;
    if (absl::Status s = Bytes(field, 2, &b); !s.ok()) return s;
    *out = static_cast<uint16_t>(static_cast<uint8_t>(b[0]) |
                                 (static_cast<uint16_t>(static_cast<uint8_t>(b[1])) << 8));
    return absl::OkStatus();
  }
  absl::Status U64(absl::string_view field, uint64_t* out) {
    absl::string_view b;
    if (absl::Status s = Bytes(field, 8, &b); !s.ok()) return s;
    *out = 0;
    for (int i = 7; i >= 0; --i) *out = (*out << 8) | static_cast<uint8_t>(b[i]);
    return absl::OkStatus();
  }

 private:
  absl::string_view bytes_;
  size_t offset_ = 0;
};

#define KVFERRY_META_TRY(expr)          \
  do {                                  \
    absl::Status _s = (expr);           \
    if (!_s.ok()) return _s;            \
  } while (0)

}  // namespace

std::string EncodeMetadata(const AgentMetadata& m) {
  std::string out(kMagic);
  out.push_back(static_cast<char>(kMetadataFormat));
  PutU16(&out, m.wire_version);
  out.push_back(static_cast<char>(m.name.size()));
  out += m.name;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((m.incarnation >> (8 * i)) & 0xff));
  out.push_back(static_cast<char>(m.addresses.size()));
  for (const auto& [address, port] : m.addresses) {
    out.push_back(static_cast<char>(address.size()));
    out += address;
    PutU16(&out, port);
  }
  return out;
}

absl::StatusOr<AgentMetadata> ParseMetadata(absl::string_view bytes) {
  MetadataReader r(bytes);
  absl::string_view magic;
  KVFERRY_META_TRY(r.Bytes("the magic \"KVFM\"", kMagic.size(), &magic));
  if (magic != kMagic) {
    return absl::InvalidArgumentError(absl::StrCat(
        "not kvferry connection metadata: it starts with \"", absl::CHexEscape(magic),
        "\", not \"KVFM\""));
  }
  uint8_t format = 0;
  KVFERRY_META_TRY(r.U8("the format", &format));
  if (format != kMetadataFormat) {
    return absl::InvalidArgumentError(absl::StrCat("connection metadata of format ", format,
                                                   "; this agent reads format ",
                                                   kMetadataFormat));
  }
  AgentMetadata m;
  KVFERRY_META_TRY(r.U16("the wire version", &m.wire_version));
  if (m.wire_version != wire::kVersion) {
    return absl::InvalidArgumentError(absl::StrCat(
        "connection metadata of wire version ", m.wire_version,
        "; this agent speaks wire version ", wire::kVersion));
  }
  uint8_t name_length = 0;
  KVFERRY_META_TRY(r.U8("the name's length", &name_length));
  if (name_length == 0) {
    return absl::InvalidArgumentError("connection metadata names no agent (name length 0)");
  }
  absl::string_view name;
  KVFERRY_META_TRY(r.Bytes("the name", name_length, &name));
  m.name = std::string(name);
  KVFERRY_META_TRY(r.U64("the incarnation", &m.incarnation));
  uint8_t count = 0;
  KVFERRY_META_TRY(r.U8("the address count", &count));
  if (count == 0 || count > kMaxMetadataAddresses) {
    return absl::InvalidArgumentError(absl::StrCat("connection metadata lists ", count,
                                                   " addresses; want 1 to ",
                                                   kMaxMetadataAddresses));
  }
  for (uint8_t i = 0; i < count; ++i) {
    const std::string which = absl::StrCat("address ", i);
    uint8_t length = 0;
    KVFERRY_META_TRY(r.U8(absl::StrCat(which, "'s length"), &length));
    if (length == 0 || length > kMaxMetadataAddressBytes) {
      return absl::InvalidArgumentError(absl::StrCat("connection metadata ", which, " is ",
                                                     length, " bytes long; want 1 to ",
                                                     kMaxMetadataAddressBytes));
    }
    absl::string_view address;
    KVFERRY_META_TRY(r.Bytes(which, length, &address));
    uint16_t port = 0;
    KVFERRY_META_TRY(r.U16(absl::StrCat(which, "'s port"), &port));
    if (port == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("connection metadata ", which, " has port 0"));
    }
    absl::StatusOr<SocketAddress> parsed = ParseSocketAddress(std::string(address), port);
    if (!parsed.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("connection metadata ", which, " \"",
                                                     absl::CHexEscape(address),
                                                     "\" is not an IP literal"));
    }
    if (parsed->IsWildcard()) {
      return absl::InvalidArgumentError(absl::StrCat("connection metadata ", which, " \"",
                                                     address,
                                                     "\" is a wildcard address, not a peer's"));
    }
    m.addresses.emplace_back(std::string(address), port);
  }
  if (r.left() != 0) {
    return absl::InvalidArgumentError(absl::StrCat("connection metadata has ", r.left(),
                                                   " bytes after its last field (offset ",
                                                   r.offset(), ")"));
  }
  return m;
}

}  // namespace kvferry::internal
