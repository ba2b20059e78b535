#include "src/directory/record.h"

#include <nlohmann/json.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "src/net/socket.h"

namespace kvferry::internal {
namespace {

// `name` as it may appear in a message: bounded, control bytes escaped.
std::string Quoted(absl::string_view name) {
  std::string out = "'";
  for (char ch : name.substr(0, 80)) {
    const unsigned char c = static_cast<unsigned char>(ch);
    if (c >= 0x20 && c < 0x7f) {
      out.push_back(ch);
    } else {
      absl::StrAppend(&out, "\\x", absl::Hex(c, absl::kZeroPad2));
    }
  }
  if (name.size() > 80) absl::StrAppend(&out, "...");
  return out + "'";
}

uint32_t LayoutField(const nlohmann::json& layout, const char* field) {
  const nlohmann::json& v = layout.at(field);
  if (!v.is_number_unsigned()) throw std::invalid_argument(absl::StrCat(field, " is not unsigned"));
  uint64_t x = v.get<uint64_t>();
  if (x > UINT32_MAX) throw std::invalid_argument(absl::StrCat(field, " out of range"));
  return static_cast<uint32_t>(x);
}

}  // namespace

absl::Status ValidateDirectoryName(absl::string_view name, absl::string_view what) {
  if (name.empty() || name.size() > 255) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " ", Quoted(name), ": want 1..255 characters, got ", name.size()));
  }
  for (char ch : name) {
    const unsigned char c = static_cast<unsigned char>(ch);
    if (c <= 0x20 || c >= 0x7f || c == '/') {
      return absl::InvalidArgumentError(absl::StrCat(
          what, " ", Quoted(name),
          ": only printable ASCII without '/' or spaces can name a directory entry"));
    }
  }
  return absl::OkStatus();
}

std::string EncodeRecord(const AgentRecord& r) {
  nlohmann::json pools = nlohmann::json::array();
  for (const DirectoryPool& p : r.pools) {
    const KvLayout& l = p.layout;
    pools.push_back({{"name", p.name},
                     {"layout",
                      {{"num_layers", l.num_layers},
                       {"num_blocks", l.num_blocks},
                       {"tokens_per_block", l.tokens_per_block},
                       {"num_kv_heads", l.num_kv_heads},
                       {"head_dim", l.head_dim},
                       {"element_bytes", l.element_bytes},
                       {"separate_kv", l.separate_kv}}}});
  }
  nlohmann::json j = {{"kvferry_directory", kRecordVersion},
                      {"name", r.name},
                      {"address", r.address},
                      {"port", r.port},
                      {"incarnation", std::to_string(r.incarnation)},
                      {"role", r.role},
                      {"pools", pools}};
  return j.dump();
}

absl::StatusOr<AgentRecord> DecodeRecord(absl::string_view key, absl::string_view name,
                                         absl::string_view value) {
  auto bad = [&](absl::string_view why) {
    return absl::DataLossError(
        absl::StrCat("directory entry ", Quoted(key), " is not a valid agent entry: ", why));
  };
  if (value.size() > kMaxRecordBytes) {
    return bad(absl::StrCat("value of ", value.size(), " bytes exceeds ", kMaxRecordBytes));
  }
  AgentRecord r;
  try {
    nlohmann::json j = nlohmann::json::parse(value);
    if (!j.is_object()) return bad("not a JSON object");
    if (!j.contains("kvferry_directory") || !j["kvferry_directory"].is_number_integer()) {
      return bad("no kvferry_directory version");
    }
    const int64_t version = j["kvferry_directory"].get<int64_t>();
    if (version != kRecordVersion) {
      return bad(absl::StrCat("version ", version, " (this kvferry reads version ",
                              kRecordVersion, ")"));
    }
    r.name = j.at("name").get<std::string>();
    r.address = j.at("address").get<std::string>();
    const nlohmann::json& port = j.at("port");
    if (!port.is_number_unsigned() || port.get<uint64_t>() == 0 || port.get<uint64_t>() > 65535) {
      return bad("port is not 1..65535");
    }
    r.port = static_cast<uint16_t>(port.get<uint64_t>());
    const std::string incarnation = j.at("incarnation").get<std::string>();
    if (!absl::SimpleAtoi(incarnation, &r.incarnation)) return bad("incarnation is not a number");
    r.role = j.at("role").get<std::string>();
    const nlohmann::json& pools = j.at("pools");
    if (!pools.is_array()) return bad("pools is not an array");
    if (pools.size() > kMaxRecordPools) {
      return bad(absl::StrCat(pools.size(), " pools (at most ", kMaxRecordPools, ")"));
    }
    for (const nlohmann::json& p : pools) {
      DirectoryPool pool;
      pool.name = p.at("name").get<std::string>();
      const nlohmann::json& l = p.at("layout");
      if (!l.is_object()) return bad("a pool's layout is not an object");
      pool.layout.num_layers = LayoutField(l, "num_layers");
      pool.layout.num_blocks = LayoutField(l, "num_blocks");
      pool.layout.tokens_per_block = LayoutField(l, "tokens_per_block");
      pool.layout.num_kv_heads = LayoutField(l, "num_kv_heads");
      pool.layout.head_dim = LayoutField(l, "head_dim");
      pool.layout.element_bytes = LayoutField(l, "element_bytes");
      pool.layout.separate_kv = l.at("separate_kv").get<bool>();
      if (pool.name.empty() || pool.name.size() > 255) return bad("a pool name is not 1..255 bytes");
      if (absl::Status s = pool.layout.Validate(); !s.ok()) {
        return bad(absl::StrCat("pool ", Quoted(pool.name), ": ", s.message()));
      }
      r.pools.push_back(std::move(pool));
    }
  } catch (const std::exception& e) {
    return bad(e.what());
  }
  if (r.name != name) {
    return bad(absl::StrCat("it names the agent ", Quoted(r.name)));
  }
  if (r.role.size() > kMaxRoleBytes) return bad("role over 255 bytes");
  if (r.address.empty() || r.address.size() > 64 ||
      !ParseSocketAddress(r.address, r.port).ok()) {
    return bad(absl::StrCat("address ", Quoted(r.address), " is not an IP literal"));
  }
  return r;
}

}  // namespace kvferry::internal
