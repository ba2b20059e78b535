// internal::Access: the one door from library code into the sealed public
// types (Agent, KvPool, BlockSet, Transfer, Ledger). The public headers only
// name this class as a friend; its definition lives here, in a header that is
// not installed, so code outside the library cannot reach the state behind a
// handle, construct a pool or a ledger, or touch a reference count.
//
// Also here, for the same reason: the reference-count hooks of Ledger and
// LedgerPtr. The ledger keeps its own count rather than deriving from
// boost::intrusive_ref_counter: Ledger is a complete public type, and that
// base's hooks are hidden friends any user would find by argument-dependent
// lookup (tests/compile_fail/ledger_retain.cc). PoolCore, LeaseCore,
// TransferCore and OfferCore do derive from it: users only see them as
// incomplete types, so its hooks stay out of their reach.
#ifndef KVFERRY_SRC_ACCESS_H_
#define KVFERRY_SRC_ACCESS_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include <boost/smart_ptr/intrusive_ptr.hpp>

#include "kvferry/agent.h"
#include "kvferry/kv_pool.h"
#include "kvferry/ledger.h"
#include "kvferry/transfer.h"

namespace kvferry {

// Found by argument-dependent lookup from boost::intrusive_ptr<Ledger>, in
// library code only.
void intrusive_ptr_add_ref(const Ledger* p);
void intrusive_ptr_release(const Ledger* p);
using LedgerPtr = boost::intrusive_ptr<Ledger>;

namespace internal {

class AgentImpl;
class PoolCore;
class LeaseCore;
class TransferCore;

class Access {
 public:
  static AgentImpl& Impl(const Agent& agent) { return *agent.impl_; }

  // The state behind a pool; every KvPool has one.
  static PoolCore& Pool(const KvPool& pool) { return *pool.core_; }
  // The lease behind a BlockSet; null when it is empty.
  static const LeaseCore* Lease(const BlockSet& set) { return set.core_.get(); }
  // The state behind a Transfer handle; null when it is empty.
  static TransferCore* Core(const Transfer& transfer) { return transfer.core_.get(); }

  // Pools are created and destroyed by their agent only.
  struct PoolDeleter {
    void operator()(KvPool* pool) const { delete pool; }
  };
  using OwnedPool = std::unique_ptr<KvPool, PoolDeleter>;
  static OwnedPool MakePool(boost::intrusive_ptr<PoolCore> core);  // kv_pool.cc

  static LedgerPtr MakeLedger(std::string name) { return LedgerPtr(new Ledger(std::move(name))); }
  // A reference to a ledger the caller only sees by reference (Agent::ledger()).
  static LedgerPtr Retain(const Ledger& ledger) { return LedgerPtr(const_cast<Ledger*>(&ledger)); }
  static void AddRegisteredBytes(Ledger& ledger, int64_t delta) { ledger.AddRegisteredBytes(delta); }
  static void AddRef(const Ledger& ledger) { ledger.refs_.fetch_add(1, std::memory_order_relaxed); }
  static void Release(const Ledger* ledger) {
    if (ledger->refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete ledger;
  }
};

}  // namespace internal
}  // namespace kvferry

#endif  // KVFERRY_SRC_ACCESS_H_
