// Directory::Impl: the state behind kvferry::Directory.
//
// Files: directory.cc (options, publish, resolve, connect), keepalive.cc (the
// lease thread: renews, re-grants and republishes), watch.cc (the watch
// thread). Locking: op_mu_ serializes the writes to etcd (publish, unpublish,
// the keepalive pass) and is held across their HTTP calls; mu_ guards the
// in-memory state and is never held across a call to etcd or a callback.
// Lock order: op_mu_ -> mu_.
#ifndef KVFERRY_SRC_DIRECTORY_DIRECTORY_IMPL_H_
#define KVFERRY_SRC_DIRECTORY_DIRECTORY_IMPL_H_

#include <atomic>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/base/thread_annotations.h"
#include "kvferry/directory.h"
#include "kvferry/internal/mutex.h"
#include "src/directory/etcd_client.h"

namespace kvferry {

class Directory::Impl {
 public:
  static constexpr size_t kMaxQueuedEvents = 100000;

  Impl(DirectoryOptions options, std::unique_ptr<internal::EtcdClient> etcd);
  ~Impl();

  const DirectoryOptions& options() const { return options_; }
  std::string KeyOf(const std::string& name) const { return prefix_ + name; }

  // directory.cc
  absl::Status Publish(AgentRecord record) ABSL_LOCKS_EXCLUDED(op_mu_, mu_);
  absl::Status Unpublish(const std::string& name) ABSL_LOCKS_EXCLUDED(op_mu_, mu_);
  std::vector<std::pair<std::string, absl::Status>> Publications() const ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<AgentRecord> Resolve(const std::string& name) const;
  // Every entry under the prefix, and the revision read at; invalid entries
  // are logged and skipped.
  absl::StatusOr<std::vector<AgentRecord>> List(int64_t* revision, uint64_t* cluster_id) const;
  static void Log(absl::string_view line);

  // watch.cc
  absl::Status Watch(WatchCallback callback, int64_t start_revision) ABSL_LOCKS_EXCLUDED(mu_);
  void Unwatch() ABSL_LOCKS_EXCLUDED(mu_);
  std::vector<DirectoryEvent> PollEvents() ABSL_LOCKS_EXCLUDED(mu_);
  int64_t WatchRevision() const ABSL_LOCKS_EXCLUDED(mu_);
  std::vector<AgentRecord> WatchedAgents() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Publication {
    AgentRecord record;
    int64_t create_revision = 0;  // of our key; 0 while not in etcd
    absl::Status status;          // OK while in etcd under a live lease
  };

  // directory.cc
  // Grants a lease unless one is held. Returns its id.
  absl::StatusOr<int64_t> EnsureLeaseLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(op_mu_);
  // Writes `record` under the lease if the key is absent (or, when
  // `our_create_revision` is set, still the one we created). Returns the
  // key's create_revision.
  absl::StatusOr<int64_t> WriteLocked(const AgentRecord& record, int64_t lease,
                                      int64_t our_create_revision)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(op_mu_);

  // keepalive.cc
  void KeepaliveMain() ABSL_LOCKS_EXCLUDED(op_mu_, mu_);
  // One pass: renews the lease, or grants a new one and republishes. Returns
  // whether every publication is in place.
  bool KeepaliveOnce() ABSL_LOCKS_EXCLUDED(op_mu_, mu_);
  void StartKeepalive() ABSL_LOCKS_EXCLUDED(mu_);

  // watch.cc
  void WatchMain() ABSL_LOCKS_EXCLUDED(mu_);
  // Lists the entries and reports the difference from what the watch knew.
  absl::Status ResyncWatch() ABSL_LOCKS_EXCLUDED(mu_);
  // Handles one watch-stream message; false ends the stream.
  bool HandleWatchMessage(const nlohmann::json& message, bool* resync) ABSL_LOCKS_EXCLUDED(mu_);
  void Deliver(std::vector<DirectoryEvent> events) ABSL_LOCKS_EXCLUDED(mu_);
  // Waits `d` or until the watch (or everything) stops.
  void SleepUnlessStopped(absl::Duration d, const std::atomic<bool>& flag)
      ABSL_LOCKS_EXCLUDED(mu_);

  const DirectoryOptions options_;
  const std::string prefix_;  // /kvferry/<cluster>/agents/
  const std::unique_ptr<internal::EtcdClient> etcd_;

  std::atomic<bool> stop_{false};
  std::atomic<bool> watch_stop_{false};

  mutable internal::Mutex op_mu_;
  int64_t lease_ ABSL_GUARDED_BY(op_mu_) = 0;

  mutable internal::Mutex mu_;
  std::map<std::string, Publication> publications_ ABSL_GUARDED_BY(mu_);
  std::thread keepalive_thread_ ABSL_GUARDED_BY(mu_);
  // The watch.
  std::thread watch_thread_ ABSL_GUARDED_BY(mu_);
  bool watching_ ABSL_GUARDED_BY(mu_) = false;
  WatchCallback callback_ ABSL_GUARDED_BY(mu_);
  std::deque<DirectoryEvent> events_ ABSL_GUARDED_BY(mu_);
  uint64_t events_dropped_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t watch_revision_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t cluster_id_ ABSL_GUARDED_BY(mu_) = 0;
  bool need_resync_ ABSL_GUARDED_BY(mu_) = false;
  std::map<std::string, AgentRecord> members_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvferry

#endif  // KVFERRY_SRC_DIRECTORY_DIRECTORY_IMPL_H_
