// Directory: options, publishing (create-if-absent under a lease), resolving
// and connecting by name.
#include "kvferry/directory.h"

#include <cstdio>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "kvferry/agent.h"
#include "src/directory/directory_impl.h"
#include "src/directory/record.h"
#include "src/net/socket.h"
#include "src/status_macros.h"

namespace kvferry {
namespace {

using internal::Base64;
using internal::EtcdKv;

absl::Status WithPrefix(const absl::Status& s, absl::string_view prefix) {
  return absl::Status(s.code(), absl::StrCat(prefix, s.message()));
}

}  // namespace

const char* DirectoryEventTypeName(DirectoryEvent::Type type) {
  switch (type) {
    case DirectoryEvent::Type::kJoined: return "joined";
    case DirectoryEvent::Type::kUpdated: return "updated";
    case DirectoryEvent::Type::kLeft: return "left";
  }
  return "unknown";
}

Directory::Impl::Impl(DirectoryOptions options, std::unique_ptr<internal::EtcdClient> etcd)
    : options_(std::move(options)),
      prefix_(absl::StrCat("/kvferry/", options_.cluster, "/agents/")),
      etcd_(std::move(etcd)) {}

Directory::Impl::~Impl() {
  Unwatch();
  std::thread keepalive;
  {
    internal::MutexLock l(&mu_);  // wakes the keepalive thread's wait
    stop_ = true;
    keepalive = std::move(keepalive_thread_);
  }
  if (keepalive.joinable()) keepalive.join();
  internal::MutexLock l(&op_mu_);
  if (lease_ != 0) {
    // Deletes every key bound to the lease. One pass over the endpoints: if
    // etcd is down the keys expire with the lease instead.
    absl::StatusOr<nlohmann::json> r =
        etcd_->Call("/v3/lease/revoke", {{"ID", std::to_string(lease_)}}, absl::Nanoseconds(1));
    if (!r.ok() && !absl::IsNotFound(r.status())) {
      Log(absl::StrCat("could not revoke lease ", lease_, " (its keys expire within ",
                       absl::FormatDuration(options_.lease_ttl), "): ", r.status().message()));
    }
    lease_ = 0;
  }
}

void Directory::Impl::Log(absl::string_view line) {
  std::string text = absl::StrCat("kvferry: directory: ", line, "\n");
  std::fputs(text.c_str(), stderr);
}

absl::StatusOr<int64_t> Directory::Impl::EnsureLeaseLocked() {
  if (lease_ != 0) return lease_;
  const int64_t ttl = std::max<int64_t>(1, absl::ToInt64Seconds(absl::Ceil(
                                               options_.lease_ttl, absl::Seconds(1))));
  KVFERRY_ASSIGN_OR_RETURN(nlohmann::json r,
                           etcd_->Call("/v3/lease/grant", {{"TTL", std::to_string(ttl)}}));
  KVFERRY_ASSIGN_OR_RETURN(int64_t id, internal::JsonInt64(r, "ID"));
  if (id == 0) {
    return absl::DataLossError(absl::StrCat("etcd lease grant: no lease id in the answer (",
                                            etcd_->EndpointList(), ")"));
  }
  lease_ = id;
  return id;
}

absl::StatusOr<int64_t> Directory::Impl::WriteLocked(const AgentRecord& record, int64_t lease,
                                                     int64_t our_create_revision) {
  const std::string key = KeyOf(record.name);
  const std::string value = internal::EncodeRecord(record);
  nlohmann::json txn = {
      {"compare",
       {{{"key", Base64(key)},
         {"target", "CREATE"},
         {"result", "EQUAL"},
         {"create_revision", std::to_string(our_create_revision)}}}},
      {"success",
       {{{"request_put",
          {{"key", Base64(key)}, {"value", Base64(value)}, {"lease", std::to_string(lease)}}}}}},
      {"failure", {{{"request_range", {{"key", Base64(key)}}}}}}};
  KVFERRY_ASSIGN_OR_RETURN(nlohmann::json r, etcd_->Call("/v3/kv/txn", txn));
  const bool succeeded = r.contains("succeeded") && r["succeeded"].is_boolean() &&
                         r["succeeded"].get<bool>();
  if (succeeded) {
    if (our_create_revision != 0) return our_create_revision;
    return internal::HeaderRevision(r);  // the put created the key
  }
  // Someone holds the name: say who.
  std::string holder = "an entry this kvferry cannot read";
  try {
    const nlohmann::json& kvs = r.at("responses").at(0).at("response_range").at("kvs");
    absl::StatusOr<EtcdKv> kv = internal::ParseEtcdKv(kvs.at(0));
    if (kv.ok()) {
      absl::StatusOr<AgentRecord> other = internal::DecodeRecord(key, record.name, kv->value);
      if (other.ok()) {
        holder = absl::StrCat("the agent at ", other->address, ":", other->port,
                              " (incarnation ", other->incarnation, ", published at revision ",
                              kv->create_revision, ")");
      } else {
        holder = std::string(other.status().message());
      }
    }
  } catch (const std::exception&) {
  }
  return absl::AlreadyExistsError(absl::StrCat(
      "agent name '", record.name, "' is taken in etcd: key ", key, " holds ", holder,
      ". A second live agent cannot use the name; a crashed one's entry expires with its "
      "lease"));
}

absl::Status Directory::Impl::Publish(AgentRecord record) {
  internal::MutexLock op(&op_mu_);
  int64_t ours = 0;
  {
    internal::MutexLock l(&mu_);
    auto it = publications_.find(record.name);
    if (it != publications_.end()) ours = it->second.create_revision;
  }
  KVFERRY_ASSIGN_OR_RETURN(int64_t lease, EnsureLeaseLocked());
  absl::StatusOr<int64_t> created = WriteLocked(record, lease, ours);
  if (!created.ok() && ours != 0 && absl::IsAlreadyExists(created.status())) {
    // Our key was lost with a lease and is not back yet: take it if free.
    created = WriteLocked(record, lease, 0);
  }
  if (!created.ok()) return created.status();
  {
    internal::MutexLock l(&mu_);
    Publication& p = publications_[record.name];
    p.record = std::move(record);
    p.create_revision = *created;
    p.status = absl::OkStatus();
  }
  StartKeepalive();
  return absl::OkStatus();
}

absl::Status Directory::Impl::Unpublish(const std::string& name) {
  internal::MutexLock op(&op_mu_);
  int64_t ours = 0;
  {
    internal::MutexLock l(&mu_);
    auto it = publications_.find(name);
    if (it == publications_.end()) {
      return absl::NotFoundError(
          absl::StrCat("agent '", name, "' is not published by this directory"));
    }
    ours = it->second.create_revision;
    publications_.erase(it);
  }
  if (ours == 0) return absl::OkStatus();  // not in etcd right now
  // Delete only the key we created, not a successor's.
  const std::string key = Base64(KeyOf(name));
  nlohmann::json txn = {
      {"compare",
       {{{"key", key},
         {"target", "CREATE"},
         {"result", "EQUAL"},
         {"create_revision", std::to_string(ours)}}}},
      {"success", {{{"request_delete_range", {{"key", key}}}}}}};
  absl::StatusOr<nlohmann::json> r = etcd_->Call("/v3/kv/txn", txn);
  if (!r.ok()) {
    return WithPrefix(r.status(),
                      absl::StrCat("unpublish '", name, "' (its key expires with the lease): "));
  }
  return absl::OkStatus();
}

std::vector<std::pair<std::string, absl::Status>> Directory::Impl::Publications() const {
  internal::MutexLock l(&mu_);
  std::vector<std::pair<std::string, absl::Status>> out;
  for (const auto& [name, p] : publications_) out.emplace_back(name, p.status);
  return out;
}

absl::StatusOr<AgentRecord> Directory::Impl::Resolve(const std::string& name) const {
  KVFERRY_RETURN_IF_ERROR(internal::ValidateDirectoryName(name, "agent name"));
  const std::string key = KeyOf(name);
  absl::StatusOr<nlohmann::json> r = etcd_->Call("/v3/kv/range", {{"key", Base64(key)}});
  if (!r.ok()) return WithPrefix(r.status(), absl::StrCat("resolve '", name, "': "));
  if (!r->contains("kvs") || (*r)["kvs"].empty()) {
    return absl::NotFoundError(absl::StrCat("no agent '", name, "' in the directory (key ", key,
                                            " absent at etcd ", etcd_->EndpointList(), ")"));
  }
  const nlohmann::json& kvs = (*r)["kvs"];
  if (!kvs.is_array()) {
    return absl::DataLossError(absl::StrCat("resolve '", name, "': etcd answer has no kv list"));
  }
  absl::StatusOr<EtcdKv> kv = internal::ParseEtcdKv(kvs[0]);
  if (!kv.ok()) return WithPrefix(kv.status(), absl::StrCat("key ", key, ": "));
  KVFERRY_ASSIGN_OR_RETURN(AgentRecord record, internal::DecodeRecord(key, name, kv->value));
  record.create_revision = kv->create_revision;
  record.mod_revision = kv->mod_revision;
  return record;
}

absl::StatusOr<std::vector<AgentRecord>> Directory::Impl::List(int64_t* revision,
                                                               uint64_t* cluster_id) const {
  nlohmann::json range = {{"key", Base64(prefix_)},
                          {"range_end", Base64(internal::PrefixRangeEnd(prefix_))}};
  absl::StatusOr<nlohmann::json> r = etcd_->Call("/v3/kv/range", range);
  if (!r.ok()) return WithPrefix(r.status(), absl::StrCat("list ", prefix_, ": "));
  if (revision != nullptr) {
    KVFERRY_ASSIGN_OR_RETURN(*revision, internal::HeaderRevision(*r));
  }
  if (cluster_id != nullptr) *cluster_id = internal::HeaderClusterId(*r);
  std::vector<AgentRecord> out;
  if (!r->contains("kvs")) return out;
  const nlohmann::json& kvs = (*r)["kvs"];
  if (!kvs.is_array()) return absl::DataLossError(absl::StrCat("list ", prefix_, ": no kv list"));
  for (const nlohmann::json& item : kvs) {
    absl::StatusOr<EtcdKv> kv = internal::ParseEtcdKv(item);
    if (!kv.ok()) {
      Log(absl::StrCat("skipped an entry under ", prefix_, ": ", kv.status().message()));
      continue;
    }
    absl::string_view name = kv->key;
    if (!absl::ConsumePrefix(&name, prefix_) ||
        !internal::ValidateDirectoryName(name, "agent name").ok()) {
      continue;  // not an agent key (deeper path or bad name)
    }
    absl::StatusOr<AgentRecord> record = internal::DecodeRecord(kv->key, name, kv->value);
    if (!record.ok()) {
      Log(absl::StrCat("skipped: ", record.status().message()));
      continue;
    }
    record->create_revision = kv->create_revision;
    record->mod_revision = kv->mod_revision;
    out.push_back(*std::move(record));
  }
  return out;
}

// --- Directory -------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Directory>> Directory::Create(DirectoryOptions options) {
  if (options.endpoints.empty()) {
    if (const char* env = std::getenv("KVFERRY_ETCD_ENDPOINTS")) {
      for (absl::string_view e : absl::StrSplit(env, ',', absl::SkipWhitespace())) {
        options.endpoints.emplace_back(absl::StripAsciiWhitespace(e));
      }
    }
  }
  KVFERRY_RETURN_IF_ERROR(internal::ValidateDirectoryName(options.cluster, "cluster name"));
  if (options.lease_ttl < absl::Seconds(1) || options.lease_ttl > absl::Hours(24)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "lease_ttl ", absl::FormatDuration(options.lease_ttl), ": want 1 s .. 24 h"));
  }
  if (options.password.size() > 4096 || options.username.size() > 4096) {
    return absl::InvalidArgumentError("etcd username or password over 4096 bytes");
  }
  KVFERRY_ASSIGN_OR_RETURN(
      std::unique_ptr<internal::EtcdClient> etcd,
      internal::EtcdClient::Create({.endpoints = options.endpoints,
                                    .username = options.username,
                                    .password = options.password,
                                    .connect_timeout = options.connect_timeout,
                                    .request_timeout = options.request_timeout,
                                    .retry_deadline = options.retry_deadline}));
  return std::unique_ptr<Directory>(
      new Directory(std::make_unique<Impl>(std::move(options), std::move(etcd))));
}

Directory::Directory(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Directory::~Directory() = default;

const DirectoryOptions& Directory::options() const { return impl_->options(); }
std::string Directory::KeyOf(const std::string& name) const { return impl_->KeyOf(name); }

absl::Status Directory::Publish(const Agent& agent, const std::string& address, uint16_t port,
                                const std::string& role) {
  KVFERRY_RETURN_IF_ERROR(internal::ValidateDirectoryName(agent.name(), "agent name"));
  absl::StatusOr<internal::SocketAddress> where = internal::ParseSocketAddress(address, port);
  if (!where.ok()) return WithPrefix(where.status(), "publish: ");
  if (where->IsWildcard() || port == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "publish '", agent.name(), "': ", address, ":", port,
        " is not an address peers can connect to (publish the host's own address)"));
  }
  if (role.size() > internal::kMaxRoleBytes) {
    return absl::InvalidArgumentError("publish: role over 255 bytes");
  }
  AgentRecord record;
  record.name = agent.name();
  record.address = address;
  record.port = port;
  record.incarnation = agent.incarnation();
  record.role = role;
  for (auto& [name, layout] : agent.ExportedPools()) {
    record.pools.push_back({.name = name, .layout = layout});
  }
  if (record.pools.size() > internal::kMaxRecordPools) {
    return absl::InvalidArgumentError(absl::StrCat("publish: more than ",
                                                   internal::kMaxRecordPools, " exported pools"));
  }
  return impl_->Publish(std::move(record));
}

absl::Status Directory::Unpublish(const std::string& name) { return impl_->Unpublish(name); }

std::vector<std::pair<std::string, absl::Status>> Directory::Publications() const {
  return impl_->Publications();
}

absl::StatusOr<AgentRecord> Directory::Resolve(const std::string& name) const {
  return impl_->Resolve(name);
}

absl::StatusOr<std::vector<AgentRecord>> Directory::List() const {
  return impl_->List(nullptr, nullptr);
}

absl::StatusOr<PeerInfo> Directory::Connect(Agent& agent, const std::string& name,
                                            absl::Duration timeout) const {
  KVFERRY_ASSIGN_OR_RETURN(AgentRecord record, impl_->Resolve(name));
  const std::string where = absl::StrCat(record.address, ":", record.port);
  const std::string context =
      absl::StrCat("connect to agent '", name, "' (directory key ", KeyOf(name), " -> ", where,
                   "): ");
  absl::StatusOr<PeerInfo> peer = agent.Connect(record.address, record.port, timeout);
  if (!peer.ok()) return WithPrefix(peer.status(), context);
  if (peer->name != name) {
    // Authenticated, but as someone else: the entry is stale or forged.
    absl::Status closed = agent.Disconnect(peer->name);
    return absl::PermissionDeniedError(absl::StrCat(
        context, "the agent there authenticated as '", peer->name,
        "', not as the agent asked for; the directory entry is stale or forged, and the "
        "connection was closed",
        closed.ok() ? "" : absl::StrCat(" (", closed.message(), ")")));
  }
  return peer;
}

absl::Status Directory::Watch(WatchCallback callback, int64_t start_revision) {
  return impl_->Watch(std::move(callback), start_revision);
}
void Directory::Unwatch() { impl_->Unwatch(); }
std::vector<DirectoryEvent> Directory::PollEvents() { return impl_->PollEvents(); }
int64_t Directory::WatchRevision() const { return impl_->WatchRevision(); }
std::vector<AgentRecord> Directory::WatchedAgents() const { return impl_->WatchedAgents(); }

}  // namespace kvferry
