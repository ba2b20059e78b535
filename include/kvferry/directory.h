// Directory: cluster metadata in etcd v3, so that agents on many machines
// find each other by name. Optional: without it, agents connect by address
// (Agent::Listen / Agent::Connect).
//
// Each published agent is one key, /kvferry/<cluster>/agents/<name>, whose
// value (JSON) holds its control address and port, incarnation, role and
// exported pools with their layouts. The key is bound to an etcd lease that
// a background thread keeps alive: a crashed process's key disappears within
// the lease TTL; Unpublish, or destroying the Directory, deletes it at once.
// When the lease is lost (etcd was unreachable past the TTL, or came back
// without its data) the thread grants a new one and publishes again.
//
// etcd is a phone book, not a trust anchor: Connect resolves a name, then
// performs the agent's usual authenticated handshake, and refuses a peer
// that authenticates under another name than the one asked for.
//
// Talks to etcd's JSON gateway (HTTP/1.1 POST to /v3/...) and fails over
// between the configured endpoints. Nothing here runs on an agent's data
// path: the Directory only calls Agent's public API.
//
// Thread safety: thread-safe. A watch callback runs on the Directory's watch
// thread; it must not call Unwatch or destroy the Directory.
#ifndef KVFERRY_DIRECTORY_H_
#define KVFERRY_DIRECTORY_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kvferry/kv_layout.h"
#include "kvferry/transfer.h"

namespace kvferry {

class Agent;

struct DirectoryOptions {
  // etcd client URLs, "http://host:port" or "host:port" (IPv6 as
  // "[addr]:port"); requests fail over between them in order. Empty: taken
  // from the environment variable KVFERRY_ETCD_ENDPOINTS (comma-separated).
  // https is not supported.
  std::vector<std::string> endpoints;
  // Namespace of this cluster's keys: /kvferry/<cluster>/agents/. Same
  // character rules as an agent name in the directory (see Publish).
  // Default "default".
  std::string cluster = "default";
  // TTL of the lease that keeps published keys alive; a crashed agent's key
  // lasts at most this long. etcd refuses TTLs under about 2 s (it raises
  // them). Renewed every ttl / 3. Default 10 s.
  absl::Duration lease_ttl = absl::Seconds(10);
  // Optional etcd user (etcd's /v3/auth/authenticate); empty: no auth.
  std::string username;
  std::string password;
  // Per request: TCP connect timeout, and how long to wait for an answer.
  absl::Duration connect_timeout = absl::Seconds(1);
  absl::Duration request_timeout = absl::Seconds(3);
  // How long one operation keeps trying endpoints (e.g. through a leader
  // election) before it fails with kUnavailable. Default 6 s.
  absl::Duration retry_deadline = absl::Seconds(6);
};

// An exported pool as published.
struct DirectoryPool {
  std::string name;
  KvLayout layout;
  friend bool operator==(const DirectoryPool&, const DirectoryPool&) = default;
};

// One agent's entry.
struct AgentRecord {
  std::string name;
  std::string address;  // the control listener: an IPv4/IPv6 literal
  uint16_t port = 0;
  uint64_t incarnation = 0;  // Agent::incarnation() of the publisher
  std::string role;          // free text, e.g. "prefill", "decode"; may be empty
  std::vector<DirectoryPool> pools;
  // etcd's revisions of the key (not part of the value).
  int64_t create_revision = 0;
  int64_t mod_revision = 0;
};

struct DirectoryEvent {
  enum class Type {
    kJoined,   // a name appeared (or came back with a new incarnation)
    kUpdated,  // same name and incarnation, new value (e.g. republished)
    kLeft,     // the key was deleted or its lease expired
  };
  Type type = Type::kJoined;
  std::string name;
  AgentRecord record;     // the new value; for kLeft, the last one known
  int64_t revision = 0;   // etcd revision of the change
};

const char* DirectoryEventTypeName(DirectoryEvent::Type type);

class Directory {
 public:
  // Validates the options (kInvalidArgument). Does not contact etcd: the
  // first call does (authenticating first when a username is set).
  static absl::StatusOr<std::unique_ptr<Directory>> Create(DirectoryOptions options);
  // Stops the threads and revokes the lease: every key this Directory
  // published is deleted at once (best effort, bounded by request_timeout).
  ~Directory();
  Directory(const Directory&) = delete;
  Directory& operator=(const Directory&) = delete;

  const DirectoryOptions& options() const;
  // The key of `name`: /kvferry/<cluster>/agents/<name>.
  std::string KeyOf(const std::string& name) const;

  // Publishes `agent` as reachable at `address` (an IP literal peers can
  // reach, typically what the agent listens on; not 0.0.0.0) and `port`.
  // The agent's name must be 1..255 printable ASCII characters without '/'
  // or spaces. Create-if-absent: kAlreadyExists, naming the holder's address
  // and incarnation, when the key exists (another live agent of that name,
  // or a crashed one whose lease has not expired yet). kUnavailable naming
  // the endpoints tried when no etcd answers. Publishing the same name again
  // from this Directory updates the entry (e.g. after new pools).
  absl::Status Publish(const Agent& agent, const std::string& address, uint16_t port,
                       const std::string& role = "");
  // Deletes the entry now. kNotFound if this Directory did not publish it.
  absl::Status Unpublish(const std::string& name);
  // Names this Directory publishes, and whether each is currently in etcd
  // under a live lease as far as the keepalive thread knows (OK), or why not.
  std::vector<std::pair<std::string, absl::Status>> Publications() const;

  // Reads one entry: kNotFound when absent, kUnavailable naming the
  // endpoints when etcd cannot be reached, kDataLoss naming the key for a
  // value that is not a valid entry (bad JSON, unknown version, oversize).
  absl::StatusOr<AgentRecord> Resolve(const std::string& name) const;
  // Every valid entry of the cluster; invalid ones are skipped (and logged).
  absl::StatusOr<std::vector<AgentRecord>> List() const;
  // Resolve, then agent.Connect(address, port, timeout); the peer must
  // authenticate as `name` (a different name is kPermissionDenied and the
  // connection is closed). Errors name the key and the address.
  absl::StatusOr<PeerInfo> Connect(Agent& agent, const std::string& name,
                                   absl::Duration timeout = absl::Seconds(10)) const;

  // Starts watching the cluster's agents. With start_revision 0, first
  // reports every current entry as kJoined (one snapshot), then changes.
  // With a revision (e.g. WatchRevision() of an earlier watch, plus one),
  // reports changes from there. Events go to `callback`, on the watch thread;
  // without a callback, to the queue PollEvents drains (bounded: 100000
  // events, the oldest dropped first, with a log line). Across a lost
  // connection to etcd
  // the watch resumes at the next revision on any endpoint; when that
  // revision is gone (compacted, or etcd came back without its data), it
  // lists the entries again and reports the difference from its view, so
  // nothing is missed. (A watch started at a revision begins with an empty
  // view: if that revision is already compacted, the listing reports every
  // entry as kJoined and no kLeft; compare with what you knew.)
  // kFailedPrecondition if already watching.
  using WatchCallback = std::function<void(const DirectoryEvent&)>;
  absl::Status Watch(WatchCallback callback = nullptr, int64_t start_revision = 0);
  void Unwatch();
  [[nodiscard]] std::vector<DirectoryEvent> PollEvents();  // drains: dropping it loses them
  // The revision up to which the watch has reported everything (0 before
  // its first answer).
  int64_t WatchRevision() const;
  // The current membership as the watch sees it, by name.
  std::vector<AgentRecord> WatchedAgents() const;

  class Impl;

 private:
  explicit Directory(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvferry

#endif  // KVFERRY_DIRECTORY_H_
