#include "src/ucx/listener.h"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "src/ucx/status.h"

namespace kvferry::internal {

absl::StatusOr<std::pair<sockaddr_storage, socklen_t>> ParseSockaddr(const std::string& address,
                                                                      uint16_t port) {
  sockaddr_storage ss = {};
  auto* v4 = reinterpret_cast<sockaddr_in*>(&ss);
  if (inet_pton(AF_INET, address.c_str(), &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
    v4->sin_port = htons(port);
    return std::make_pair(ss, static_cast<socklen_t>(sizeof(sockaddr_in)));
  }
  ss = {};
  auto* v6 = reinterpret_cast<sockaddr_in6*>(&ss);
  if (inet_pton(AF_INET6, address.c_str(), &v6->sin6_addr) == 1) {
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons(port);
    return std::make_pair(ss, static_cast<socklen_t>(sizeof(sockaddr_in6)));
  }
  return absl::InvalidArgumentError(
      absl::StrCat("'", address, "' is not an IPv4 or IPv6 address literal"));
}

void Listener::OnConnRequest(ucp_conn_request_h request, void* arg) noexcept {
  static_cast<Listener*>(arg)->on_request_(request);
}

absl::StatusOr<std::unique_ptr<Listener>> Listener::Create(WorkerPtr worker,
                                                           const std::string& address,
                                                           uint16_t port, OnRequest on_request,
                                                           SourceLocation site) {
  auto parsed = ParseSockaddr(address, port);
  if (!parsed.ok()) return parsed.status();
  std::unique_ptr<Listener> listener(
      new Listener(worker, std::move(on_request),
                   Tracked(worker->ledger(), ResourceKind::kListener, site)));
  ucp_listener_params_t params = {};
  params.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
  params.sockaddr.addr = reinterpret_cast<const sockaddr*>(&parsed->first);
  params.sockaddr.addrlen = parsed->second;
  params.conn_handler.cb = &Listener::OnConnRequest;
  params.conn_handler.arg = listener.get();
  ucs_status_t st = ucp_listener_create(worker->native_handle(), &params, &listener->handle_);
  if (st != UCS_OK) {
    listener->handle_ = nullptr;
    absl::Status status = UcsToStatus(st, absl::StrCat("listen on ", address, ":", port));
    if (st == UCS_ERR_BUSY || st == UCS_ERR_IO_ERROR) {
      return absl::UnavailableError(status.message());
    }
    return status;
  }
  ucp_listener_attr_t attr = {};
  attr.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
  st = ucp_listener_query(listener->handle_, &attr);
  if (st != UCS_OK) return UcsToStatus(st, "ucp_listener_query");
  if (attr.sockaddr.ss_family == AF_INET) {
    listener->port_ = ntohs(reinterpret_cast<const sockaddr_in*>(&attr.sockaddr)->sin_port);
  } else {
    listener->port_ = ntohs(reinterpret_cast<const sockaddr_in6*>(&attr.sockaddr)->sin6_port);
  }
  listener->address_ = address;
  return listener;
}

Listener::~Listener() {
  if (handle_ != nullptr) ucp_listener_destroy(handle_);
}

}  // namespace kvferry::internal
