// Context: owns one ucp_context_h (ucp_init .. ucp_cleanup).
//
// Non-movable and heap-held: workers and memory regions keep it alive through
// boost::intrusive_ptr<Context>, so it is cleaned up only after the last of
// them. Thread-safe to share; the handle itself is used read-only.
#ifndef KVFERRY_SRC_UCX_CONTEXT_H_
#define KVFERRY_SRC_UCX_CONTEXT_H_

#include "kvferry/source_location.h"
#include <string>
#include <utility>
#include <vector>

#include <ucp/api/ucp.h>

#include <boost/smart_ptr/intrusive_ptr.hpp>
#include <boost/smart_ptr/intrusive_ref_counter.hpp>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kvferry/ledger.h"
#include "kvferry/kv_pool.h"
#include "kvferry/ucx_settings.h"
#include "src/tracked.h"

namespace kvferry::internal {

class Context : public boost::intrusive_ref_counter<Context> {
 public:
  struct Options {
    std::string name = "kvferry";
    // Extra UCX settings, as ucp_config_modify(name, value) pairs without
    // the UCX_ prefix (e.g. {"TLS", "tcp"}). Default: none. An unknown name
    // or bad value makes Create fail with kInvalidArgument.
    std::vector<std::pair<std::string, std::string>> config;
    LedgerPtr ledger;  // may be null: nothing counted
    // UCX's KEEPALIVE_INTERVAL unless the user set it; zero keeps UCX's.
    absl::Duration keepalive_interval = absl::ZeroDuration();
    // UCX's ALLOC_PRIO (how ucp_mem_map with UCP_MEM_MAP_ALLOCATE gets
    // memory) unless the user set it; empty keeps UCX's.
    std::string alloc_prio;
  };

  static absl::StatusOr<boost::intrusive_ptr<Context>> Create(
      const Options& options,
      SourceLocation site = SourceLocation::current());

  ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  ucp_context_h native_handle() const { return handle_; }
  const UcxSettings& settings() const { return settings_; }
  const LedgerPtr& ledger() const { return tracked_.ledger_ptr(); }
  // Whether ucp_mem_map can register memory of that type here (kHost always;
  // kCuda only when UCX was built with CUDA and finds a GPU).
  bool SupportsMemoryType(MemoryType type) const;

 private:
  Context(ucp_context_h handle, UcxSettings settings, Tracked tracked)
      : handle_(handle), settings_(std::move(settings)), tracked_(std::move(tracked)) {}

  ucp_context_h handle_;
  const UcxSettings settings_;
  Tracked tracked_;
};

using ContextPtr = boost::intrusive_ptr<Context>;

// The mmap hook mode UCM really runs with in this process.
std::string MmapHookModeInForce();

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_UCX_CONTEXT_H_
