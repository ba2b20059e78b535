// internal::ClosingEndpoints: data endpoints being closed, advanced a step
// at a time by the owner's progress passes instead of waited for, so that
// closing a peer blocks no caller and no other peer's work.
//
// Thread-compatible: no lock of its own. The owner calls it with its UCX
// lock held (AgentImpl: ucx_mu_, and mu_ as well, since `done` callbacks
// touch peer state) and never from inside the worker's progress.
//
// Contract:
//  - Add takes over an endpoint (and the flush of its wireup, if one is in
//    flight). The close begins once that wireup has completed or
//    `wireup_deadline` passed: UCX 1.13 can abort the process when an
//    endpoint is force-closed while a wireup message of it is still queued.
//  - Advance begins due closes and advances begun ones (Endpoint::
//    AdvanceClose, which never waits) and returns each close that ended,
//    exactly once, by the key it was added with, with its status (OK:
//    nothing posted on the endpoint can move any more). This object has
//    released the endpoint and the wireup by then.
//  - FinishAll closes what is left, waiting (the owner is going away).
#ifndef KVFERRY_SRC_CLOSING_ENDPOINTS_H_
#define KVFERRY_SRC_CLOSING_ENDPOINTS_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "src/ucx/endpoint.h"

namespace kvferry::internal {

class ClosingEndpoints {
 public:
  struct Ended {
    uint64_t key;
    absl::Status status;
  };

  // `force` and `drain` are Endpoint::Close's; `key` names the close in
  // what Advance returns.
  void Add(uint64_t key, EndpointPtr endpoint, Request wireup, absl::Time wireup_deadline,
           bool force, absl::Duration drain);
  std::vector<Ended> Advance(absl::Time now);
  std::vector<Ended> FinishAll();

  bool empty() const { return closing_.empty(); }
  size_t size() const { return closing_.size(); }

 private:
  struct Entry {
    uint64_t key = 0;
    EndpointPtr endpoint;
    Request wireup;
    absl::Time wireup_deadline;
    bool force = false;
    absl::Duration drain;
    bool begun = false;  // BeginClose was called
  };
  // Begins `e`'s close when due and advances it (`wait`: to its end);
  // appends it to `ended` and returns true once it is over.
  static bool Step(Entry& e, absl::Time now, bool wait, std::vector<Ended>& ended);

  std::vector<Entry> closing_;
};

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_CLOSING_ENDPOINTS_H_
