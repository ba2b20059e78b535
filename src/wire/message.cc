#include "src/wire/message.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"

namespace kvferry::internal::wire {
namespace {

class Writer {
 public:
  void U8(uint8_t v) { out_.push_back(static_cast<char>(v)); }
  void U16(uint16_t v) { Raw(v); }
  void U32(uint32_t v) { Raw(v); }
  void U64(uint64_t v) { Raw(v); }
  void Str(absl::string_view s) {
    U32(static_cast<uint32_t>(s.size()));
    out_.append(s.data(), s.size());
  }
  std::string& out() { return out_; }

 private:
  template <typename T>
  void Raw(T v) {  // the machines kvferry runs on are little-endian
    static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__);
    char buf[sizeof(T)];
    std::memcpy(buf, &v, sizeof(T));
    out_.append(buf, sizeof(T));
  }
  std::string out_;
};

class Reader {
 public:
  explicit Reader(absl::string_view in) : in_(in) {}

  absl::Status U8(const char* field, uint8_t* v) { return Raw(field, v); }
  absl::Status U16(const char* field, uint16_t* v) { return Raw(field, v); }
  absl::Status U32(const char* field, uint32_t* v) { return Raw(field, v); }
  absl::Status U64(const char* field, uint64_t* v) { return Raw(field, v); }
  absl::Status Str(const char* field, size_t max, std::string* s) {
    uint32_t n = 0;
    if (absl::Status st = U32(field, &n); !st.ok()) return st;
    if (n > max) {
      return absl::InvalidArgumentError(
          absl::StrCat("descriptor field ", field, " has ", n, " bytes; the limit is ", max));
    }
    if (n > in_.size()) {
      return absl::InvalidArgumentError(absl::StrCat("descriptor truncated in ", field, ": ", n,
                                                     " bytes announced, ", in_.size(), " left"));
    }
    s->assign(in_.data(), n);
    in_.remove_prefix(n);
    return absl::OkStatus();
  }
  size_t left() const { return in_.size(); }

 private:
  template <typename T>
  absl::Status Raw(const char* field, T* v) {
    if (in_.size() < sizeof(T)) {
      return absl::InvalidArgumentError(absl::StrCat("descriptor truncated at ", field));
    }
    std::memcpy(v, in_.data(), sizeof(T));
    in_.remove_prefix(sizeof(T));
    return absl::OkStatus();
  }
  absl::string_view in_;
};

#define KVFERRY_WIRE_TRY(expr)               \
  do {                                       \
    if (absl::Status s_ = (expr); !s_.ok()) return s_; \
  } while (0)

// A ttl on the wire: nanoseconds in [1, INT64_MAX].
absl::Status ReadTtl(Reader* r, const char* field, int64_t* ttl_ns) {
  uint64_t v = 0;
  KVFERRY_WIRE_TRY(r->U64(field, &v));
  if (v == 0 || v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return absl::InvalidArgumentError(absl::StrCat(field, " ", v, " ns is not a ttl"));
  }
  *ttl_ns = static_cast<int64_t>(v);
  return absl::OkStatus();
}

void EncodePools(const std::vector<PoolDescriptor>& pools, Writer* w) {
  w->U32(static_cast<uint32_t>(pools.size()));
  for (const PoolDescriptor& p : pools) {
    w->Str(p.name);
    w->U32(p.layout.num_layers);
    w->U32(p.layout.num_blocks);
    w->U32(p.layout.tokens_per_block);
    w->U32(p.layout.num_kv_heads);
    w->U32(p.layout.head_dim);
    w->U32(p.layout.element_bytes);
    w->U8(p.layout.separate_kv ? 1 : 0);
    w->U32(static_cast<uint32_t>(p.regions.size()));
    for (const RegionDescriptor& region : p.regions) {
      w->U64(region.base);
      w->U64(region.length);
      w->Str(region.rkey);
    }
  }
}

void EncodeAgent(const AgentDescriptor& a, Writer* w) {
  w->Str(a.name);
  w->Str(a.host_id);
  w->Str(a.worker_address);
  w->U64(a.pid);
  w->U64(a.probe_address);
  EncodePools(a.pools, w);
}

absl::Status DecodePool(Reader* r, PoolDescriptor* p) {
  uint8_t separate = 0;
  KVFERRY_WIRE_TRY(r->Str("pool.name", kMaxNameBytes, &p->name));
  KVFERRY_WIRE_TRY(r->U32("pool.num_layers", &p->layout.num_layers));
  KVFERRY_WIRE_TRY(r->U32("pool.num_blocks", &p->layout.num_blocks));
  KVFERRY_WIRE_TRY(r->U32("pool.tokens_per_block", &p->layout.tokens_per_block));
  KVFERRY_WIRE_TRY(r->U32("pool.num_kv_heads", &p->layout.num_kv_heads));
  KVFERRY_WIRE_TRY(r->U32("pool.head_dim", &p->layout.head_dim));
  KVFERRY_WIRE_TRY(r->U32("pool.element_bytes", &p->layout.element_bytes));
  KVFERRY_WIRE_TRY(r->U8("pool.separate_kv", &separate));
  KVFERRY_WIRE_TRY(ValidateName("pool name", p->name));
  const std::string prefix = absl::StrCat("pool '", p->name, "': ");
  if (separate > 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, "separate_kv byte is ", separate, ", not 0 or 1"));
  }
  p->layout.separate_kv = separate == 1;
  if (absl::Status s = p->layout.Validate(); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(prefix, s.message()));
  }
  uint32_t count = 0;
  KVFERRY_WIRE_TRY(r->U32("pool.region_count", &count));
  if (absl::Status s = CheckRegionCount("the descriptor", p->layout, count); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(prefix, s.message()));
  }
  const uint64_t want = RegionBytes(p->layout, count);
  for (uint32_t i = 0; i < count; ++i) {
    RegionDescriptor region;
    KVFERRY_WIRE_TRY(r->U64("region.base", &region.base));
    KVFERRY_WIRE_TRY(r->U64("region.length", &region.length));
    KVFERRY_WIRE_TRY(r->Str("region.rkey", kMaxRkeyBytes, &region.rkey));
    if (region.length != want) {
      return absl::InvalidArgumentError(absl::StrCat(prefix, "region ", i, " length ",
                                                     region.length, " does not match its layout's ",
                                                     want, " bytes"));
    }
    if (region.base < 4096 || region.base >= kAddressLimit ||
        region.length > kAddressLimit - region.base) {
      return absl::InvalidArgumentError(
          absl::StrCat(prefix, "region ", i, " base 0x", absl::Hex(region.base), " + length ",
                       region.length, " is not a user-space address range"));
    }
    if (region.rkey.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(prefix, "region ", i, " has an empty rkey"));
    }
    p->regions.push_back(std::move(region));
  }
  return absl::OkStatus();
}

absl::Status DecodePools(Reader* r, std::vector<PoolDescriptor>* pools) {
  uint32_t count = 0;
  KVFERRY_WIRE_TRY(r->U32("agent.pool_count", &count));
  if (count > kMaxPools) {
    return absl::InvalidArgumentError(
        absl::StrCat("descriptor lists ", count, " pools; the limit is ", kMaxPools));
  }
  for (uint32_t i = 0; i < count; ++i) {
    PoolDescriptor p;
    KVFERRY_WIRE_TRY(DecodePool(r, &p));
    for (const PoolDescriptor& q : *pools) {
      if (q.name == p.name) {
        return absl::InvalidArgumentError(
            absl::StrCat("descriptor lists pool '", p.name, "' twice"));
      }
    }
    pools->push_back(std::move(p));
  }
  return absl::OkStatus();
}

absl::Status DecodeAgent(Reader* r, AgentDescriptor* a) {
  KVFERRY_WIRE_TRY(r->Str("agent.name", kMaxNameBytes, &a->name));
  KVFERRY_WIRE_TRY(ValidateName("agent name", a->name));
  KVFERRY_WIRE_TRY(r->Str("agent.host_id", kMaxNameBytes, &a->host_id));
  if (!a->host_id.empty()) KVFERRY_WIRE_TRY(ValidateName("agent.host_id", a->host_id));
  KVFERRY_WIRE_TRY(r->Str("agent.worker_address", kMaxAddressBytes, &a->worker_address));
  if (a->worker_address.empty()) {
    return absl::InvalidArgumentError("descriptor has an empty worker address");
  }
  KVFERRY_WIRE_TRY(r->U64("agent.pid", &a->pid));
  KVFERRY_WIRE_TRY(r->U64("agent.probe_address", &a->probe_address));
  return DecodePools(r, &a->pools);
}

}  // namespace

absl::string_view MessageTypeName(MessageType type) {
  switch (type) {
    case MessageType::kHello: return "HELLO";
    case MessageType::kChallenge: return "CHALLENGE";
    case MessageType::kProof: return "PROOF";
    case MessageType::kWelcome: return "WELCOME";
    case MessageType::kReject: return "REJECT";
    case MessageType::kNotify: return "NOTIFY";
    case MessageType::kPing: return "PING";
    case MessageType::kBye: return "BYE";
    case MessageType::kPoolAdded: return "POOL_ADDED";
    case MessageType::kOfferDone: return "OFFER_DONE";
    case MessageType::kOfferRevoke: return "OFFER_REVOKE";
    case MessageType::kOfferRevoked: return "OFFER_REVOKED";
    case MessageType::kPoolRemoved: return "POOL_REMOVED";
    case MessageType::kOfferRelease: return "OFFER_RELEASE";
    case MessageType::kOfferBound: return "OFFER_BOUND";
    case MessageType::kOfferEnded: return "OFFER_ENDED";
  }
  return "UNKNOWN";
}

absl::Status ValidateName(absl::string_view what, absl::string_view name) {
  if (name.empty() || name.size() > kMaxNameBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " must have 1..", kMaxNameBytes, " characters (got ", name.size(), ")"));
  }
  for (size_t i = 0; i < name.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(name[i]);
    if (c <= 0x20 || c >= 0x7f) {
      return absl::InvalidArgumentError(absl::StrCat(what, " has byte 0x", absl::Hex(c),
                                                     " at offset ", i,
                                                     "; names are printable ASCII without spaces"));
    }
  }
  return absl::OkStatus();
}

uint16_t PeekFrameType(absl::string_view frame) {
  if (frame.size() < kHeaderBytes) return 0;
  uint16_t type = 0;
  std::memcpy(&type, frame.data() + 6, sizeof(type));
  return type;
}

absl::StatusOr<size_t> FrameLength(absl::string_view stream, size_t max_bytes) {
  if (stream.size() < kHeaderBytes) return 0;
  Reader r(stream);
  uint32_t magic = 0, length = 0;
  uint16_t version = 0, type = 0;
  KVFERRY_WIRE_TRY(r.U32("header.magic", &magic));
  KVFERRY_WIRE_TRY(r.U16("header.version", &version));
  KVFERRY_WIRE_TRY(r.U16("header.type", &type));
  KVFERRY_WIRE_TRY(r.U32("header.length", &length));
  if (magic != kMagic) {
    return absl::InvalidArgumentError(absl::StrCat("bad magic 0x", absl::Hex(magic),
                                                   " (expected 0x", absl::Hex(kMagic),
                                                   "): not a kvferry control frame"));
  }
  max_bytes = std::min(std::max(max_bytes, kHeaderBytes), kMaxMessageBytes);
  if (length > max_bytes - kHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat("frame announces a ", length,
                                                   "-byte body; the limit is ",
                                                   max_bytes - kHeaderBytes));
  }
  return kHeaderBytes + length;
}

std::string Encode(const Message& message) {
  Writer body;
  switch (message.type) {
    case MessageType::kHello:
    case MessageType::kChallenge:
      body.Str(message.name);
      body.U64(message.incarnation);
      body.Str(message.nonce);
      if (message.type == MessageType::kChallenge) body.Str(message.proof);
      break;
    case MessageType::kProof:
      body.Str(message.proof);
      EncodeAgent(message.agent, &body);
      break;
    case MessageType::kWelcome:
      EncodeAgent(message.agent, &body);
      break;
    case MessageType::kReject:
      body.U32(message.code);
      body.Str(message.text);
      break;
    case MessageType::kNotify:
      body.Str(message.text);
      break;
    case MessageType::kPing:
    case MessageType::kBye:
      break;
    case MessageType::kPoolAdded:
      EncodePools(message.agent.pools, &body);
      break;
    case MessageType::kOfferDone:
      body.U64(message.offer_id);
      body.U32(message.layer_begin);
      body.U32(message.layer_end);
      body.U32(message.code);
      body.Str(message.text);
      break;
    case MessageType::kOfferRevoke:
      body.U64(message.offer_id);
      body.U64(static_cast<uint64_t>(message.ttl_ns));
      body.U64(message.offer_floor);
      body.Str(message.text);
      break;
    case MessageType::kOfferRevoked:
    case MessageType::kOfferRelease:
      body.U64(message.offer_id);
      break;
    case MessageType::kOfferBound:
      body.U64(message.offer_id);
      body.U64(static_cast<uint64_t>(message.ttl_ns));
      body.U64(message.offer_floor);
      break;
    case MessageType::kOfferEnded:
      body.U64(message.offer_id);
      body.U64(message.offer_floor);
      break;
    case MessageType::kPoolRemoved:
      body.Str(message.name);
      break;
  }
  Writer w;
  w.U32(kMagic);
  w.U16(kVersion);
  w.U16(static_cast<uint16_t>(message.type));
  w.U32(static_cast<uint32_t>(body.out().size()));
  w.out().append(body.out());
  return std::move(w.out());
}

absl::StatusOr<Message> Decode(absl::string_view bytes) {
  if (bytes.size() > kMaxMessageBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("message of ", bytes.size(), " bytes exceeds ", kMaxMessageBytes));
  }
  Reader r(bytes);
  uint32_t magic = 0, length = 0;
  uint16_t version = 0, type = 0;
  KVFERRY_WIRE_TRY(r.U32("header.magic", &magic));
  if (magic != kMagic) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad magic 0x", absl::Hex(magic), " (expected 0x", absl::Hex(kMagic), ")"));
  }
  KVFERRY_WIRE_TRY(r.U16("header.version", &version));
  if (version != kVersion) {
    return absl::FailedPreconditionError(absl::StrCat(
        "wire version ", version, " is not supported (this build speaks ", kVersion, ")"));
  }
  KVFERRY_WIRE_TRY(r.U16("header.type", &type));
  KVFERRY_WIRE_TRY(r.U32("header.length", &length));
  if (length != r.left()) {
    return absl::InvalidArgumentError(absl::StrCat("header announces a ", length,
                                                   "-byte body but ", r.left(),
                                                   " bytes follow"));
  }
  Message m;
  m.type = static_cast<MessageType>(type);
  auto fixed = [&r](const char* field, size_t size, std::string* out) -> absl::Status {
    KVFERRY_WIRE_TRY(r.Str(field, size, out));
    if (out->size() != size) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, " has ", out->size(), " bytes, not ", size));
    }
    return absl::OkStatus();
  };
  switch (m.type) {
    case MessageType::kHello:
    case MessageType::kChallenge:
      KVFERRY_WIRE_TRY(r.Str("hello.name", kMaxNameBytes, &m.name));
      KVFERRY_WIRE_TRY(ValidateName("agent name", m.name));
      KVFERRY_WIRE_TRY(r.U64("hello.incarnation", &m.incarnation));
      KVFERRY_WIRE_TRY(fixed("hello.nonce", kNonceBytes, &m.nonce));
      if (m.type == MessageType::kChallenge) {
        KVFERRY_WIRE_TRY(fixed("challenge.proof", kProofBytes, &m.proof));
      }
      break;
    case MessageType::kProof:
      KVFERRY_WIRE_TRY(fixed("proof.proof", kProofBytes, &m.proof));
      KVFERRY_WIRE_TRY(DecodeAgent(&r, &m.agent));
      break;
    case MessageType::kWelcome:
      KVFERRY_WIRE_TRY(DecodeAgent(&r, &m.agent));
      break;
    case MessageType::kReject:
      KVFERRY_WIRE_TRY(r.U32("reject.code", &m.code));
      if (m.code == 0 || m.code > 16) {
        return absl::InvalidArgumentError(absl::StrCat("reject code ", m.code, " is not an error"));
      }
      KVFERRY_WIRE_TRY(r.Str("reject.reason", kMaxPayloadBytes, &m.text));
      break;
    case MessageType::kNotify:
      KVFERRY_WIRE_TRY(r.Str("notify.payload", kMaxPayloadBytes, &m.text));
      break;
    case MessageType::kPing:
    case MessageType::kBye:
      break;
    case MessageType::kPoolAdded:
      KVFERRY_WIRE_TRY(DecodePools(&r, &m.agent.pools));
      if (m.agent.pools.empty()) return absl::InvalidArgumentError("POOL_ADDED lists no pool");
      break;
    case MessageType::kOfferDone:
      KVFERRY_WIRE_TRY(r.U64("offer_done.offer_id", &m.offer_id));
      KVFERRY_WIRE_TRY(r.U32("offer_done.layer_begin", &m.layer_begin));
      KVFERRY_WIRE_TRY(r.U32("offer_done.layer_end", &m.layer_end));
      KVFERRY_WIRE_TRY(r.U32("offer_done.code", &m.code));
      if (m.code > 16) {
        return absl::InvalidArgumentError(absl::StrCat("offer_done code ", m.code,
                                                       " is not a status code"));
      }
      if (m.layer_begin >= m.layer_end) {
        return absl::InvalidArgumentError(absl::StrCat("offer_done layer range [",
                                                       m.layer_begin, ", ", m.layer_end,
                                                       ") is empty"));
      }
      KVFERRY_WIRE_TRY(r.Str("offer_done.reason", kMaxPayloadBytes, &m.text));
      break;
    case MessageType::kOfferRevoke:
      KVFERRY_WIRE_TRY(r.U64("offer_revoke.offer_id", &m.offer_id));
      KVFERRY_WIRE_TRY(ReadTtl(&r, "offer_revoke.ttl", &m.ttl_ns));
      KVFERRY_WIRE_TRY(r.U64("offer_revoke.floor", &m.offer_floor));
      KVFERRY_WIRE_TRY(r.Str("offer_revoke.reason", kMaxPayloadBytes, &m.text));
      break;
    case MessageType::kOfferRevoked:
      KVFERRY_WIRE_TRY(r.U64("offer_revoked.offer_id", &m.offer_id));
      break;
    case MessageType::kOfferRelease:
      KVFERRY_WIRE_TRY(r.U64("offer_release.offer_id", &m.offer_id));
      break;
    case MessageType::kOfferBound:
      KVFERRY_WIRE_TRY(r.U64("offer_bound.offer_id", &m.offer_id));
      KVFERRY_WIRE_TRY(ReadTtl(&r, "offer_bound.ttl", &m.ttl_ns));
      KVFERRY_WIRE_TRY(r.U64("offer_bound.floor", &m.offer_floor));
      break;
    case MessageType::kOfferEnded:
      KVFERRY_WIRE_TRY(r.U64("offer_ended.offer_id", &m.offer_id));
      KVFERRY_WIRE_TRY(r.U64("offer_ended.floor", &m.offer_floor));
      break;
    case MessageType::kPoolRemoved:
      KVFERRY_WIRE_TRY(r.Str("pool_removed.pool", kMaxNameBytes, &m.name));
      KVFERRY_WIRE_TRY(ValidateName("pool_removed.pool", m.name));
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat("unknown message type ", type));
  }
  if (r.left() != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(r.left(), " trailing bytes after the message body"));
  }
  return m;
}

std::string EncodeTicketBody(const Ticket& t) {
  Writer w;
  w.U32(kTicketMagic);
  w.U16(kVersion);
  w.U64(t.offer_id);
  w.Str(t.offerer);
  w.U64(t.offerer_incarnation);
  w.Str(t.taker);
  w.Str(t.pool);
  w.U32(t.flags);
  w.U64(static_cast<uint64_t>(t.ttl_ns));
  w.U32(t.num_layers);
  w.U32(static_cast<uint32_t>(t.blocks.size()));
  for (uint32_t id : t.blocks) w.U32(id);
  return std::move(w.out());
}

absl::StatusOr<Ticket> DecodeTicket(absl::string_view bytes, absl::string_view* body,
                                    absl::string_view* tag) {
  if (bytes.size() < kTicketTagBytes + 6) {
    return absl::InvalidArgumentError(
        absl::StrCat("an offer ticket of ", bytes.size(), " bytes is too short"));
  }
  if (bytes.size() > kTicketTagBytes + 4096 + 4 * kMaxTicketBlocks) {
    return absl::InvalidArgumentError(
        absl::StrCat("an offer ticket of ", bytes.size(), " bytes is too long"));
  }
  const absl::string_view b = bytes.substr(0, bytes.size() - kTicketTagBytes);
  if (body != nullptr) *body = b;
  if (tag != nullptr) *tag = bytes.substr(b.size());
  Reader r(b);
  Ticket t;
  uint32_t magic = 0, count = 0;
  uint16_t version = 0;
  KVFERRY_WIRE_TRY(r.U32("ticket.magic", &magic));
  if (magic != kTicketMagic) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad ticket magic 0x", absl::Hex(magic), ": not a kvferry offer ticket"));
  }
  KVFERRY_WIRE_TRY(r.U16("ticket.version", &version));
  if (version != kVersion) {
    return absl::InvalidArgumentError(absl::StrCat("offer ticket of wire version ", version,
                                                   " (this build speaks ", kVersion, ")"));
  }
  KVFERRY_WIRE_TRY(r.U64("ticket.offer_id", &t.offer_id));
  KVFERRY_WIRE_TRY(r.Str("ticket.offerer", kMaxNameBytes, &t.offerer));
  KVFERRY_WIRE_TRY(ValidateName("ticket offerer", t.offerer));
  KVFERRY_WIRE_TRY(r.U64("ticket.offerer_incarnation", &t.offerer_incarnation));
  KVFERRY_WIRE_TRY(r.Str("ticket.taker", kMaxNameBytes, &t.taker));
  KVFERRY_WIRE_TRY(ValidateName("ticket taker", t.taker));
  KVFERRY_WIRE_TRY(r.Str("ticket.pool", kMaxNameBytes, &t.pool));
  KVFERRY_WIRE_TRY(ValidateName("ticket pool", t.pool));
  KVFERRY_WIRE_TRY(r.U32("ticket.flags", &t.flags));
  if ((t.flags & ~kTicketForName) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("offer ticket has unknown flags 0x", absl::Hex(t.flags)));
  }
  KVFERRY_WIRE_TRY(ReadTtl(&r, "ticket.ttl", &t.ttl_ns));
  KVFERRY_WIRE_TRY(r.U32("ticket.num_layers", &t.num_layers));
  if (t.num_layers == 0 || t.num_layers > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("offer ticket names ", t.num_layers, " layers"));
  }
  KVFERRY_WIRE_TRY(r.U32("ticket.block_count", &count));
  if (count == 0 || count > kMaxTicketBlocks || count > r.left() / 4) {
    return absl::InvalidArgumentError(
        absl::StrCat("offer ticket lists ", count, " blocks in ", r.left(), " bytes"));
  }
  t.blocks.resize(count);
  for (uint32_t& id : t.blocks) KVFERRY_WIRE_TRY(r.U32("ticket.block", &id));
  if (r.left() != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(r.left(), " trailing bytes in the offer ticket"));
  }
  return t;
}

}  // namespace kvferry::internal::wire
