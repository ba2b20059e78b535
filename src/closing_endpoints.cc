#include "src/closing_endpoints.h"

#include <utility>

namespace kvferry::internal {

void ClosingEndpoints::Add(uint64_t key, EndpointPtr endpoint, Request wireup,
                           absl::Time wireup_deadline, bool force, absl::Duration drain) {
  closing_.push_back({.key = key,
                      .endpoint = std::move(endpoint),
                      .wireup = std::move(wireup),
                      .wireup_deadline = wireup_deadline,
                      .force = force,
                      .drain = drain});
}

bool ClosingEndpoints::Step(Entry& e, absl::Time now, bool wait, std::vector<Ended>& ended) {
  Endpoint& ep = *e.endpoint;
  if (!e.begun) {
    if (!wait && e.wireup.Check() == UCS_INPROGRESS && now < e.wireup_deadline) return false;
    ep.BeginClose(e.force, e.drain);
    e.begun = true;
  }
  absl::Status status;
  if (wait) {
    status = ep.Close(e.force, e.drain);  // finishes the close under way
  } else {
    if (!ep.AdvanceClose(now)) return false;
    status = ep.close_status();
  }
  // A flush touches no memory: freed even if it is still in flight (an
  // endpoint without peer-error mode that did not drain), never waited for.
  e.wireup.Abandon();
  e.endpoint.reset();
  ended.push_back({.key = e.key, .status = std::move(status)});
  return true;
}

std::vector<ClosingEndpoints::Ended> ClosingEndpoints::Advance(absl::Time now) {
  std::vector<Ended> ended;
  for (auto it = closing_.begin(); it != closing_.end();) {
    if (Step(*it, now, /*wait=*/false, ended)) {
      it = closing_.erase(it);
    } else {
      ++it;
    }
  }
  return ended;
}

std::vector<ClosingEndpoints::Ended> ClosingEndpoints::FinishAll() {
  std::vector<Ended> ended;
  for (Entry& e : closing_) Step(e, absl::Now(), /*wait=*/true, ended);
  closing_.clear();
  return ended;
}

}  // namespace kvferry::internal
