// internal::Tracked: the member every counted object carries. Constructing one
// increments the ledger's live count for its kind (and, with KVFERRY_LEDGER,
// links an entry with the creation site); destroying it undoes that.
//
// Move-only; a moved-from Tracked counts nothing. Thread-compatible.
#ifndef KVFERRY_SRC_TRACKED_H_
#define KVFERRY_SRC_TRACKED_H_

#include <memory>
#include "kvferry/source_location.h"

#include "kvferry/ledger.h"
#include "src/access.h"

namespace kvferry::internal {

struct LedgerEntry;

class Tracked {
 public:
  Tracked();
  // A null ledger makes an empty Tracked (counts nothing).
  Tracked(LedgerPtr ledger, ResourceKind kind, SourceLocation site);
  ~Tracked();
  Tracked(Tracked&& other) noexcept;
  Tracked& operator=(Tracked&& other) noexcept;
  Tracked(const Tracked&) = delete;
  Tracked& operator=(const Tracked&) = delete;

  void Reset() noexcept;
  bool empty() const { return ledger_ == nullptr; }
  Ledger* ledger() const { return ledger_.get(); }
  const LedgerPtr& ledger_ptr() const { return ledger_; }

 private:
  LedgerPtr ledger_;
  ResourceKind kind_ = ResourceKind::kContext;
  std::unique_ptr<LedgerEntry> entry_;  // only with KVFERRY_LEDGER
};

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_TRACKED_H_
