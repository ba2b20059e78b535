// UcxPair: a UCX context counted by a ledger of its own, with two workers of
// this process (an initiator and a target), for the tests of kvferry's
// UCX-level parts. Nothing progresses unless the test calls Progress, so a
// test decides when the target moves.
#ifndef KVFERRY_TESTS_UCX_PAIR_H_
#define KVFERRY_TESTS_UCX_PAIR_H_

#include <string>

#include "absl/status/status.h"
#include "src/access.h"
#include "src/ucx/context.h"
#include "src/ucx/worker.h"

namespace kvferry::test {

struct UcxPair {
  // A context with UCX_TLS=`tls` (and ALLOC_PRIO=`alloc_prio` unless empty)
  // and its two workers.
  absl::Status Create(const std::string& ledger_name, const std::string& tls,
                      const std::string& alloc_prio = "") {
    ledger = internal::Access::MakeLedger(ledger_name);
    internal::Context::Options options;
    options.ledger = ledger;
    options.config = {{"TLS", tls}};
    options.alloc_prio = alloc_prio;
    auto made = internal::Context::Create(options);
    if (!made.ok()) return made.status();
    context = *made;
    for (internal::WorkerPtr* worker : {&initiator, &target}) {
      auto w = internal::Worker::Create(context);
      if (!w.ok()) return w.status();
      *worker = *w;
    }
    return absl::OkStatus();
  }
  // `passes` progress calls on each worker.
  void Progress(int passes) {
    for (int i = 0; i < passes; ++i) {
      if (initiator != nullptr) initiator->Progress();
      if (target != nullptr) target->Progress();
    }
  }
  // Drops the workers and the context (everything made from them must be
  // gone first); the ledger stays for the test's final count.
  void Reset() {
    initiator.reset();
    target.reset();
    context.reset();
  }

  LedgerPtr ledger;
  internal::ContextPtr context;
  internal::WorkerPtr initiator;
  internal::WorkerPtr target;
};

}  // namespace kvferry::test

#endif  // KVFERRY_TESTS_UCX_PAIR_H_
