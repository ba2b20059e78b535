// Listener: owns one ucp_listener_h bound to an address and port, and keeps
// its Worker alive. Connection requests are handed to `on_request` inside
// ucp_worker_progress; the callback must only record them.
//
// Non-movable and heap-held (UCX keeps its address as callback argument).
// Thread-compatible: use with the worker's lock held.
#ifndef KVFERRY_SRC_UCX_LISTENER_H_
#define KVFERRY_SRC_UCX_LISTENER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include "kvferry/source_location.h"
#include <string>

#include <ucp/api/ucp.h>

#include "absl/status/statusor.h"
#include "src/ucx/worker.h"

namespace kvferry::internal {

class Listener {
 public:
  using OnRequest = std::function<void(ucp_conn_request_h)>;

  // Listens on `address` ("127.0.0.1", "0.0.0.0", "::1", ...) and `port`
  // (0 picks a free one). kInvalidArgument for an address that does not
  // parse; kUnavailable when the port is taken.
  static absl::StatusOr<std::unique_ptr<Listener>> Create(
      WorkerPtr worker, const std::string& address, uint16_t port, OnRequest on_request,
      SourceLocation site = SourceLocation::current());
  ~Listener();
  Listener(const Listener&) = delete;
  Listener& operator=(const Listener&) = delete;

  uint16_t port() const { return port_; }
  const std::string& address() const { return address_; }

  // Refuses a request (used when the agent is shutting down).
  void Reject(ucp_conn_request_h request) { ucp_listener_reject(handle_, request); }

 private:
  Listener(WorkerPtr worker, OnRequest on_request, Tracked tracked)
      : worker_(std::move(worker)), on_request_(std::move(on_request)),
        tracked_(std::move(tracked)) {}
  static void OnConnRequest(ucp_conn_request_h request, void* arg) noexcept;

  const WorkerPtr worker_;
  const OnRequest on_request_;
  ucp_listener_h handle_ = nullptr;
  std::string address_;
  uint16_t port_ = 0;
  Tracked tracked_;
};

// Parses "a.b.c.d" or an IPv6 literal plus port into a sockaddr_storage.
absl::StatusOr<std::pair<sockaddr_storage, socklen_t>> ParseSockaddr(const std::string& address,
                                                                      uint16_t port);

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_UCX_LISTENER_H_
