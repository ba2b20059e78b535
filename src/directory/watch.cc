// Directory: the watch thread. Keeps a view of the cluster's entries from
// etcd's watch stream, resuming at the next revision after a lost stream,
// and listing again (reporting the difference) when that revision is gone.
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "src/directory/directory_impl.h"
#include "src/directory/record.h"

namespace kvferry {
namespace {

// How long a quiet watch stream stays open before it is opened again (a
// member cut off from the others stalls rather than closing).
constexpr absl::Duration kWatchIdle = absl::Seconds(10);

}  // namespace

absl::Status Directory::Impl::Watch(WatchCallback callback, int64_t start_revision) {
  if (start_revision < 0) return absl::InvalidArgumentError("negative watch revision");
  internal::MutexLock l(&mu_);
  if (watching_) return absl::FailedPreconditionError("this directory is already watching");
  watching_ = true;
  watch_stop_ = false;
  callback_ = std::move(callback);
  events_.clear();
  members_.clear();
  cluster_id_ = 0;
  // From a given revision: only changes (no snapshot), so the view starts
  // empty and a kLeft may name an agent it never saw join.
  need_resync_ = start_revision == 0;
  watch_revision_ = start_revision == 0 ? 0 : start_revision - 1;
  watch_thread_ = std::thread([this] { WatchMain(); });
  return absl::OkStatus();
}

void Directory::Impl::Unwatch() {
  std::thread t;
  {
    internal::MutexLock l(&mu_);
    if (!watching_) return;
    watch_stop_ = true;
    t = std::move(watch_thread_);
  }
  etcd_->CancelStreams();
  if (t.joinable()) t.join();
  internal::MutexLock l(&mu_);
  watching_ = false;
  callback_ = nullptr;
}

std::vector<DirectoryEvent> Directory::Impl::PollEvents() {
  internal::MutexLock l(&mu_);
  std::vector<DirectoryEvent> out(std::make_move_iterator(events_.begin()),
                                  std::make_move_iterator(events_.end()));
  events_.clear();
  return out;
}

int64_t Directory::Impl::WatchRevision() const {
  internal::MutexLock l(&mu_);
  return watch_revision_;
}

std::vector<AgentRecord> Directory::Impl::WatchedAgents() const {
  internal::MutexLock l(&mu_);
  std::vector<AgentRecord> out;
  for (const auto& [name, r] : members_) out.push_back(r);
  return out;
}

void Directory::Impl::Deliver(std::vector<DirectoryEvent> events) {
  if (events.empty()) return;
  WatchCallback callback;
  {
    internal::MutexLock l(&mu_);
    callback = callback_;
    for (const DirectoryEvent& e : events) {
      if (callback) break;  // the callback has them
      if (events_.size() >= kMaxQueuedEvents) {
        events_.pop_front();
        if (events_dropped_++ % 10000 == 0) {
          Log(absl::StrCat("event queue full (", kMaxQueuedEvents,
                           "): dropping the oldest; call PollEvents"));
        }
      }
      events_.push_back(e);
    }
  }
  if (callback) {
    for (const DirectoryEvent& e : events) callback(e);
  }
}

absl::Status Directory::Impl::ResyncWatch() {
  int64_t revision = 0;
  uint64_t cluster_id = 0;
  absl::StatusOr<std::vector<AgentRecord>> now = List(&revision, &cluster_id);
  if (!now.ok()) return now.status();
  std::vector<DirectoryEvent> events;
  {
    internal::MutexLock l(&mu_);
    std::map<std::string, AgentRecord> next;
    for (AgentRecord& r : *now) next[r.name] = std::move(r);
    for (const auto& [name, old] : members_) {
      if (!next.contains(name)) {
        events.push_back({DirectoryEvent::Type::kLeft, name, old, revision});
      }
    }
    for (const auto& [name, r] : next) {
      auto it = members_.find(name);
      if (it == members_.end() || it->second.incarnation != r.incarnation) {
        events.push_back({DirectoryEvent::Type::kJoined, name, r, revision});
      } else if (it->second.mod_revision != r.mod_revision) {
        events.push_back({DirectoryEvent::Type::kUpdated, name, r, revision});
      }
    }
    members_ = std::move(next);
    watch_revision_ = revision;
    cluster_id_ = cluster_id;
    need_resync_ = false;
  }
  Deliver(std::move(events));
  return absl::OkStatus();
}

bool Directory::Impl::HandleWatchMessage(const nlohmann::json& message, bool* resync) {
  if (!message.is_object()) return false;
  if (message.contains("error")) {
    Log(absl::StrCat("watch stream error: ", message["error"].dump().substr(0, 300)));
    return false;
  }
  if (!message.contains("result") || !message["result"].is_object()) return false;
  const nlohmann::json& result = message["result"];
  const uint64_t cluster_id = internal::HeaderClusterId(result);
  absl::StatusOr<int64_t> header_revision = internal::HeaderRevision(result);
  if (!header_revision.ok()) return false;
  const auto flag = [&result](const char* f) {
    return result.contains(f) && result[f].is_boolean() && result[f].get<bool>();
  };
  if (flag("created")) {
    internal::MutexLock l(&mu_);
    // A store younger than what we saw (etcd came back without its data,
    // or another cluster answers): what we know is void.
    if ((cluster_id_ != 0 && cluster_id != 0 && cluster_id != cluster_id_) ||
        *header_revision < watch_revision_) {
      Log(absl::StrCat("etcd's revision went from ", watch_revision_, " to ", *header_revision,
                       " (cluster ", cluster_id_, " -> ", cluster_id, "): listing again"));
      *resync = true;
      return false;
    }
    if (cluster_id_ == 0) cluster_id_ = cluster_id;
  }
  if (flag("canceled")) {
    absl::StatusOr<int64_t> compacted = internal::JsonInt64(result, "compact_revision");
    Log(absl::StrCat("watch canceled by etcd",
                     compacted.ok() && *compacted > 0
                         ? absl::StrCat(" (revision compacted up to ", *compacted, ")")
                         : ""));
    *resync = compacted.ok() && *compacted > 0;
    return false;
  }
  if (!result.contains("events")) return true;
  const nlohmann::json& list = result["events"];
  if (!list.is_array()) return false;
  std::vector<DirectoryEvent> events;
  {
    internal::MutexLock l(&mu_);
    for (const nlohmann::json& e : list) {
      if (!e.is_object() || !e.contains("kv")) continue;
      absl::StatusOr<internal::EtcdKv> kv = internal::ParseEtcdKv(e["kv"]);
      if (!kv.ok()) {
        Log(absl::StrCat("watch: skipped an event: ", kv.status().message()));
        continue;
      }
      watch_revision_ = std::max(watch_revision_, kv->mod_revision);
      absl::string_view name = kv->key;
      if (!absl::ConsumePrefix(&name, prefix_) ||
          !internal::ValidateDirectoryName(name, "agent name").ok()) {
        continue;
      }
      const bool deleted =
          e.contains("type") && e["type"].is_string() && e["type"].get<std::string>() == "DELETE";
      auto it = members_.find(std::string(name));
      if (deleted) {
        if (it != members_.end()) {
          events.push_back({DirectoryEvent::Type::kLeft, it->first, it->second,
                            kv->mod_revision});
          members_.erase(it);
        } else {
          AgentRecord unknown;
          unknown.name = std::string(name);
          events.push_back({DirectoryEvent::Type::kLeft, unknown.name, unknown,
                            kv->mod_revision});
        }
        continue;
      }
      absl::StatusOr<AgentRecord> record = internal::DecodeRecord(kv->key, name, kv->value);
      if (!record.ok()) {
        Log(absl::StrCat("watch: skipped: ", record.status().message()));
        continue;
      }
      record->create_revision = kv->create_revision;
      record->mod_revision = kv->mod_revision;
      const bool joined = it == members_.end() || it->second.incarnation != record->incarnation;
      events.push_back({joined ? DirectoryEvent::Type::kJoined : DirectoryEvent::Type::kUpdated,
                        record->name, *record, kv->mod_revision});
      members_[record->name] = *std::move(record);
    }
  }
  Deliver(std::move(events));
  return true;
}

void Directory::Impl::WatchMain() {
  while (!watch_stop_ && !stop_) {
    bool resync = false;
    int64_t from = 0;
    {
      internal::MutexLock l(&mu_);
      resync = need_resync_;
      from = watch_revision_ + 1;
    }
    if (resync) {
      absl::Status s = ResyncWatch();
      if (!s.ok()) {
        SleepUnlessStopped(absl::Milliseconds(500), watch_stop_);
      }
      continue;
    }
    nlohmann::json body = {{"create_request",
                            {{"key", internal::Base64(prefix_)},
                             {"range_end", internal::Base64(internal::PrefixRangeEnd(prefix_))},
                             {"start_revision", std::to_string(from)}}}};
    bool need = false;
    absl::Status ended = etcd_->Stream(
        "/v3/watch", body, kWatchIdle,
        [this, &need](const nlohmann::json& m) { return HandleWatchMessage(m, &need); },
        &watch_stop_);
    if (watch_stop_ || stop_) break;
    if (need) {
      internal::MutexLock l(&mu_);
      need_resync_ = true;
      continue;
    }
    // The stream ended (member gone, idle, or no etcd at all): again, from
    // the next revision, after a pause if nothing answered.
    if (!ended.ok() && !absl::StrContains(ended.message(), "stream ended")) {
      SleepUnlessStopped(absl::Milliseconds(500), watch_stop_);
    }
  }
}

}  // namespace kvferry
