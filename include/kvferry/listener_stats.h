// ListenerStats: what an agent's listener did with incoming connections
// since the agent was created (see AgentOptions::max_pending_handshakes,
// hello_timeout and docs/limits.md). Counters only grow. A plain value.
#ifndef KVFERRY_LISTENER_STATS_H_
#define KVFERRY_LISTENER_STATS_H_

#include <cstdint>
#include <string>

namespace kvferry {

struct ListenerStats {
  // Connections accept() returned.
  uint64_t accepted = 0;
  // Closed at accept, unanswered: the handshake table (or the source's share
  // of it) was full and no older connection could be evicted.
  uint64_t refused_at_accept = 0;
  // Unauthenticated connections closed, unanswered, to make room for a newer
  // one: no HELLO yet, or no answer to the CHALLENGE within hello_timeout.
  uint64_t evicted = 0;
  // Dropped for no complete HELLO within hello_timeout.
  uint64_t hello_timeouts = 0;
  // accept() calls that failed (out of descriptors: EMFILE, ENFILE; or
  // kernel memory), and the runs of them (each logged once, when it begins,
  // and once more when accepting works again).
  uint64_t accept_failures = 0;
  uint64_t accept_failure_episodes = 0;
  // accept() is failing: from a failed call until one works again. Between
  // tries the listener is not polled (100 ms, doubling to 1 s), and new
  // connections wait in the kernel's backlog.
  bool accept_paused = false;

  // One line: "accepted=N refused_at_accept=N ...".
  std::string ToString() const;
  friend bool operator==(const ListenerStats&, const ListenerStats&) = default;
};

}  // namespace kvferry

#endif  // KVFERRY_LISTENER_STATS_H_
