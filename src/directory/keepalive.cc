// Directory: the keepalive thread. Renews the lease every ttl / 3; when etcd
// says the lease is gone (it expired while etcd was unreachable, or etcd came
// back without its data) grants a new one and publishes every entry again,
// still create-if-absent, so a name taken meanwhile is not overwritten.
#include "absl/strings/str_cat.h"
#include "src/directory/directory_impl.h"

namespace kvferry {

void Directory::Impl::StartKeepalive() {
  internal::MutexLock l(&mu_);
  if (keepalive_thread_.joinable() || stop_) return;
  keepalive_thread_ = std::thread([this] { KeepaliveMain(); });
}

void Directory::Impl::SleepUnlessStopped(absl::Duration d, const std::atomic<bool>& flag) {
  internal::MutexLock l(&mu_);
  mu_.AwaitWithTimeout([&] { return flag.load() || stop_.load(); }, d);
}

void Directory::Impl::KeepaliveMain() {
  const absl::Duration period = std::max(options_.lease_ttl / 3, absl::Milliseconds(200));
  while (!stop_) {
    const bool healthy = KeepaliveOnce();
    SleepUnlessStopped(healthy ? period : std::min(period, absl::Milliseconds(500)), stop_);
  }
}

bool Directory::Impl::KeepaliveOnce() {
  internal::MutexLock op(&op_mu_);
  if (stop_) return false;
  std::vector<std::pair<std::string, Publication>> pending;
  bool any = false;
  {
    internal::MutexLock l(&mu_);
    for (const auto& [name, p] : publications_) {
      any = true;
      if (!p.status.ok() || p.create_revision == 0) pending.emplace_back(name, p);
    }
  }
  if (!any) return true;
  auto mark_all = [this](const absl::Status& why) {
    internal::MutexLock l(&mu_);
    for (auto& [name, p] : publications_) p.status = why;
  };
  if (lease_ != 0) {
    // One pass over the endpoints: the next pass comes soon anyway.
    absl::StatusOr<nlohmann::json> r = etcd_->Call(
        "/v3/lease/keepalive", {{"ID", std::to_string(lease_)}}, absl::Nanoseconds(1));
    int64_t ttl = -1;
    if (r.ok()) {
      const nlohmann::json& result = r->contains("result") ? (*r)["result"] : *r;
      absl::StatusOr<int64_t> t = internal::JsonInt64(result, "TTL");
      if (r->contains("error") || !t.ok()) {
        r = absl::UnavailableError(absl::StrCat("lease keepalive: unexpected answer ",
                                                r->dump().substr(0, 200)));
      } else {
        ttl = *t;
      }
    }
    if (!r.ok()) {
      mark_all(absl::UnavailableError(absl::StrCat(
          "cannot renew the lease (the entries expire ", absl::FormatDuration(options_.lease_ttl),
          " after the last renewal): ", r.status().message())));
      return false;
    }
    if (ttl <= 0) {
      Log(absl::StrCat("lease ", lease_,
                       " is gone from etcd; granting a new one and publishing again"));
      lease_ = 0;
      pending.clear();
      internal::MutexLock l(&mu_);
      for (auto& [name, p] : publications_) {
        p.status = absl::UnavailableError("the lease expired; publishing again");
        pending.emplace_back(name, p);
      }
    }
  }
  if (pending.empty()) return true;
  absl::StatusOr<int64_t> lease = EnsureLeaseLocked();
  if (!lease.ok()) {
    mark_all(absl::UnavailableError(
        absl::StrCat("cannot grant a lease: ", lease.status().message())));
    return false;
  }
  bool all = true;
  for (auto& [name, p] : pending) {
    if (stop_) return false;  // the Directory is going away
    absl::StatusOr<int64_t> created = WriteLocked(p.record, *lease, p.create_revision);
    if (!created.ok() && p.create_revision != 0 && absl::IsAlreadyExists(created.status())) {
      created = WriteLocked(p.record, *lease, 0);
    }
    internal::MutexLock l(&mu_);
    auto it = publications_.find(name);
    if (it == publications_.end()) continue;  // unpublished meanwhile
    if (created.ok()) {
      it->second.create_revision = *created;
      it->second.status = absl::OkStatus();
      Log(absl::StrCat("published '", name, "' again (lease ", *lease, ")"));
    } else {
      all = false;
      it->second.status = created.status();
      if (absl::IsAlreadyExists(created.status())) {
        Log(absl::StrCat("cannot publish '", name, "' again: ", created.status().message()));
      }
    }
  }
  return all;
}

}  // namespace kvferry
