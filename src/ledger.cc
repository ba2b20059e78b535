#include "kvferry/ledger.h"

#include <cstdio>
#include <cstdlib>
#include <utility>

#include <boost/intrusive/list.hpp>

#include "absl/strings/str_cat.h"
#include "src/tracked.h"

namespace kvferry {
namespace internal {

// An entry is on its ledger's list exactly while its Tracked owner is alive
// and non-empty; only Tracked links and unlinks it.
struct LedgerEntry
    : public boost::intrusive::list_base_hook<
          boost::intrusive::link_mode<boost::intrusive::safe_link>> {
  ResourceKind kind;
  SourceLocation site;
};

}  // namespace internal

struct Ledger::EntryList {
  boost::intrusive::list<internal::LedgerEntry> list;
};

namespace {
constexpr absl::string_view kKindNames[kNumResourceKinds] = {
    "context",     "worker",     "endpoint",    "memory_region", "remote_key",
    "request",     "worker_address", "packed_rkey", "listener",   "pool",
    "block_set",   "peer",       "transfer",    "connection",  "offer",
    "transfer_handle", "prepared_list"};
}  // namespace

absl::string_view ResourceKindName(ResourceKind kind) {
  int i = static_cast<int>(kind);
  if (i < 0 || i >= kNumResourceKinds) return "unknown";
  return kKindNames[i];
}

LeakPolicy DefaultLeakPolicy() {
#ifdef NDEBUG
  return LeakPolicy::kLog;
#else
  return LeakPolicy::kAbort;
#endif
}

int64_t Stats::TotalLive() const {
  int64_t total = 0;
  for (int64_t n : live) total += n;
  return total;
}

std::string Stats::ToString() const {
  std::string out;
  for (int i = 0; i < kNumResourceKinds; ++i) {
    absl::StrAppend(&out, ResourceKindName(static_cast<ResourceKind>(i)), "=",
                    live[i], " ");
  }
  absl::StrAppend(&out, "registered_bytes=", registered_bytes);
  return out;
}

bool Ledger::SitesEnabled() {
#ifdef KVFERRY_LEDGER
  return true;
#else
  return false;
#endif
}

void intrusive_ptr_add_ref(const Ledger* p) { internal::Access::AddRef(*p); }
void intrusive_ptr_release(const Ledger* p) { internal::Access::Release(p); }

Ledger::Ledger(std::string name)
    : name_(std::move(name)), entries_(std::make_unique<EntryList>()) {}

Ledger::~Ledger() {
  // Every Tracked holds a reference to its ledger, so the list is empty here.
  internal::MutexLock l(&mu_);
  entries_->list.clear();
}

Stats Ledger::Snapshot() const {
  Stats s;
  for (int i = 0; i < kNumResourceKinds; ++i) {
    s.live[i] = live_[i].load(std::memory_order_relaxed);
  }
  s.registered_bytes = registered_bytes_.load(std::memory_order_relaxed);
  return s;
}

std::vector<LiveObject> Ledger::Survivors() const {
  std::vector<LiveObject> out;
  internal::MutexLock l(&mu_);
  for (const internal::LedgerEntry& e : entries_->list) {
    out.push_back(LiveObject{e.kind, e.site.file_name(), e.site.line(),
                             e.site.function_name()});
  }
  return out;
}

std::string Ledger::Report() const {
  std::string out =
      absl::StrCat("ledger '", name_, "': ", Snapshot().ToString(), "\n");
  if (!SitesEnabled()) {
    absl::StrAppend(&out, "  (creation sites not recorded: built without KVFERRY_LEDGER)\n");
    return out;
  }
  for (const LiveObject& o : Survivors()) {
    absl::StrAppend(&out, "  live ", ResourceKindName(o.kind), " created at ",
                    o.file, ":", o.line, " (", o.function, ")\n");
  }
  return out;
}

void Ledger::AddRegisteredBytes(int64_t delta) {
  registered_bytes_.fetch_add(delta, std::memory_order_relaxed);
}

void Ledger::Add(internal::LedgerEntry* entry) {
  internal::MutexLock l(&mu_);
  entries_->list.push_back(*entry);
}

void Ledger::Remove(internal::LedgerEntry* entry) {
  internal::MutexLock l(&mu_);
  entries_->list.erase(entries_->list.iterator_to(*entry));
}

void Ledger::Count(ResourceKind kind, int delta) {
  live_[static_cast<int>(kind)].fetch_add(delta, std::memory_order_relaxed);
}

namespace internal {

Tracked::Tracked(LedgerPtr ledger, ResourceKind kind, SourceLocation site)
    : ledger_(std::move(ledger)), kind_(kind) {
  if (ledger_ == nullptr) return;
  ledger_->Count(kind_, +1);
#ifdef KVFERRY_LEDGER
  entry_ = std::make_unique<LedgerEntry>();
  entry_->kind = kind;
  entry_->site = site;
  ledger_->Add(entry_.get());
#else
  (void)site;
#endif
}

Tracked::Tracked() = default;
Tracked::~Tracked() { Reset(); }

Tracked::Tracked(Tracked&& other) noexcept
    : ledger_(std::move(other.ledger_)),
      kind_(other.kind_),
      entry_(std::move(other.entry_)) {}

Tracked& Tracked::operator=(Tracked&& other) noexcept {
  if (this != &other) {
    Reset();
    ledger_ = std::move(other.ledger_);
    kind_ = other.kind_;
    entry_ = std::move(other.entry_);
  }
  return *this;
}

void Tracked::Reset() noexcept {
  if (ledger_ == nullptr) return;
  if (entry_ != nullptr) {
    ledger_->Remove(entry_.get());
    entry_.reset();
  }
  ledger_->Count(kind_, -1);
  ledger_.reset();
}

}  // namespace internal
}  // namespace kvferry
