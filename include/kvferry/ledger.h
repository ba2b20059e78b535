// Leak accounting: live counters per resource kind (always on) and, when built
// with KVFERRY_LEDGER, a list of every live object with its creation site.
//
// Thread safety: Ledger is thread-safe. Stats is a plain value.
//
// Each Agent owns one Ledger; every object created through that agent (and the
// UCX handles underneath it) registers there and keeps the Ledger alive through
// a reference, so the Ledger outlives everything it counts. Only the library
// creates, counts into, retains and releases a Ledger: users read it through
// Agent::ledger() and cannot construct, copy, delete or reference-count one.
#ifndef KVFERRY_LEDGER_H_
#define KVFERRY_LEDGER_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/base/thread_annotations.h"
#include "kvferry/internal/mutex.h"

namespace kvferry {

enum class ResourceKind : int {
  kContext = 0,
  kWorker,
  kEndpoint,
  kMemoryRegion,
  kRemoteKey,
  kRequest,
  kWorkerAddress,
  kPackedRkey,
  kListener,
  kPool,
  kBlockSet,
  kPeer,
  kTransfer,
  kConnection,  // a control-plane TCP connection (authenticating or open)
  kOffer,       // an offer (Agent::Offer) until its blocks went back
  // The state a Transfer handle points to, from PostTransfer until the last
  // reference to it is gone (the handle, or the agent while it is in
  // flight). Unlike kTransfer (dropped once the transfer is fenced), it
  // outlives the agent while a handle does, so the survivor report shows a
  // Transfer handle held past its agent, with its PostTransfer site.
  kTransferHandle,
  // A prepared descriptor list (Agent::Prepare) until its handle is
  // destroyed.
  kPreparedList,
};
inline constexpr int kNumResourceKinds = 17;

// Lower-case name, e.g. "block_set". Used in reports and metric labels.
absl::string_view ResourceKindName(ResourceKind kind);

// What an Agent does when it is destroyed while objects it created still live.
enum class LeakPolicy {
  kAbort,  // report, then std::abort(). Default in builds without NDEBUG.
  kLog,    // report to stderr and carry on. Default with NDEBUG (release).
  kIgnore, // say nothing.
};
LeakPolicy DefaultLeakPolicy();

// A snapshot of the live counters.
struct Stats {
  std::array<int64_t, kNumResourceKinds> live{};
  int64_t registered_bytes = 0;  // bytes currently under ucp_mem_map
  // The control-plane queues peers feed (docs/limits.md, "What a peer can
  // make this process hold"). Filled by Agent::GetStats and the memory
  // report; a bare Ledger snapshot leaves them 0.
  struct QueueStats {
    // Gauges. Received notifications PollNotifications has not taken yet
    // (all peers), and their payload bytes.
    int64_t notifications_queued = 0;
    int64_t notification_bytes_queued = 0;
    // Peers whose control connection this agent stopped reading because
    // their notifications reached the bound.
    int64_t peers_paused = 0;
    // Transfers whose copies completed but whose notification waits, since
    // the peer is not reading its control connection (this agent's own
    // send queue to it is full): they stay in flight meanwhile.
    int64_t notifications_held = 0;
    // Counters since the agent started (they only grow). Times a peer's
    // connection was paused at the bound; times a transfer's notification
    // was held; notifications freed unpolled after their peer ended
    // (AgentOptions::ended_peer_notification_retention).
    int64_t notification_pauses = 0;
    int64_t notification_holds = 0;
    int64_t notifications_dropped = 0;
    friend bool operator==(const QueueStats&, const QueueStats&) = default;
  };
  QueueStats queues;

  int64_t Live(ResourceKind kind) const { return live[static_cast<int>(kind)]; }
  int64_t TotalLive() const;
  // One line: "context=1 worker=1 ... registered_bytes=N".
  std::string ToString() const;
  // Compares the live objects and registered bytes, the figures that come
  // back to a baseline once everything is released; `queues` is reported
  // alongside and not compared (its counters only grow).
  friend bool operator==(const Stats& a, const Stats& b) {
    return a.live == b.live && a.registered_bytes == b.registered_bytes;
  }
};

// One live object, as the ledger recorded it.
struct LiveObject {
  ResourceKind kind;
  std::string file;
  uint32_t line = 0;
  std::string function;
};

namespace internal {
struct LedgerEntry;
class Tracked;
class Access;
}  // namespace internal

class Ledger {
 public:
  // True when the library was built with KVFERRY_LEDGER (creation sites kept).
  static bool SitesEnabled();

  Ledger(const Ledger&) = delete;
  Ledger& operator=(const Ledger&) = delete;

  const std::string& name() const { return name_; }

  Stats Snapshot() const;
  // Live objects with their creation sites; empty unless SitesEnabled().
  std::vector<LiveObject> Survivors() const ABSL_LOCKS_EXCLUDED(mu_);
  // Human-readable: the counters, then one line per live object
  // ("  block_set  tests/foo.cc:42  (TestBody)").
  std::string Report() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  // The library's way in (src/access.h): construction, registered bytes and
  // the reference count that keeps a Ledger alive.
  friend class internal::Access;
  friend class internal::Tracked;
  explicit Ledger(std::string name);
  ~Ledger();
  void AddRegisteredBytes(int64_t delta);
  void Add(internal::LedgerEntry* entry) ABSL_LOCKS_EXCLUDED(mu_);
  void Remove(internal::LedgerEntry* entry) ABSL_LOCKS_EXCLUDED(mu_);
  void Count(ResourceKind kind, int delta);

  // Constant after construction.
  const std::string name_;
  // Provide their own synchronization.
  std::array<std::atomic<int64_t>, kNumResourceKinds> live_{};
  std::atomic<int64_t> registered_bytes_{0};
  mutable std::atomic<int> refs_{0};
  // Guarded: the intrusive list of live entries (see ledger.cc).
  mutable internal::Mutex mu_;
  struct EntryList;
  std::unique_ptr<EntryList> entries_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvferry

#endif  // KVFERRY_LEDGER_H_
