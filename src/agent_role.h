// The agent's two roles, as capabilities clang's -Wthread-safety checks.
//
// State that belongs to an agent but lives in another class (Peer, the
// agent-owned fields of TransferCore, PeerTable, OfferBook) cannot name
// AgentImpl::mu_ in its annotations: clang compares lock expressions as
// written, and `mu_` in Peer is not `this->mu_` of an AgentImpl. So such
// state is guarded by a role instead:
//  - kAgentControl: held exactly while the agent's mu_ is held;
//  - kAgentData: held exactly while the agent's ucx_mu_ is held.
// AgentImpl takes and releases each role together with its mutex
// (AgentImpl::ControlLock, DataLock, TryLockData/UnlockData), and every
// function that requires mu_ (ucx_mu_) requires kAgentControl (kAgentData)
// too. Code outside AgentImpl never acquires a role.
//
// The roles are process-wide while the mutexes are per agent. That is
// sound because a Peer or a TransferCore is reachable only from its own
// agent (its peer table, in-flight list and submissions): a thread holding
// one agent's role never holds a pointer to another agent's peers. The
// analysis therefore checks that the owning agent's lock is held at each
// access. The roles are empty phantom objects: nothing is locked at run
// time beyond the mutex itself.
#ifndef KVFERRY_SRC_AGENT_ROLE_H_
#define KVFERRY_SRC_AGENT_ROLE_H_

#include "absl/base/thread_annotations.h"

namespace kvferry::internal {

class ABSL_LOCKABLE AgentRole {
 public:
  constexpr AgentRole() = default;
  AgentRole(const AgentRole&) = delete;
  AgentRole& operator=(const AgentRole&) = delete;
};

// Held with AgentImpl::mu_.
inline constexpr AgentRole kAgentControl;
// Held with AgentImpl::ucx_mu_.
inline constexpr AgentRole kAgentData;

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_AGENT_ROLE_H_
