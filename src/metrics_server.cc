// MetricsServer over cpp-httplib (Debian's libcpp-httplib-dev, header-only).
// Kept in its own translation unit: httplib.h is slow to compile.
#include "kvferry/metrics_server.h"

#include <thread>

#include <httplib.h>

#include "absl/strings/str_cat.h"

namespace kvferry {

struct MetricsServer::Impl {
  httplib::Server server;
  std::thread thread;
};

absl::StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Start(const std::string& address,
                                                                    uint16_t port,
                                                                    Render render) {
  if (!render) return absl::InvalidArgumentError("MetricsServer::Start: empty render callback");
  auto impl = std::make_unique<Impl>();
  // httplib's default adds SO_REUSEPORT, which would let a second server
  // share the port and split the scrapes; keep only SO_REUSEADDR.
  impl->server.set_socket_options([](int sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  });
  impl->server.Get("/metrics", [render](const httplib::Request&, httplib::Response& res) {
    res.set_content(render(), "text/plain; version=0.0.4; charset=utf-8");
  });
  int bound = port == 0 ? impl->server.bind_to_any_port(address)
                        : (impl->server.bind_to_port(address, port) ? port : -1);
  if (bound <= 0) {
    return absl::UnavailableError(absl::StrCat("cannot bind the metrics endpoint to ", address,
                                               ":", port));
  }
  Impl* raw = impl.get();
  impl->thread = std::thread([raw] { raw->server.listen_after_bind(); });
  // Serve before returning, so a scrape right after Start succeeds.
  for (int i = 0; i < 2000 && !raw->server.is_running(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return std::unique_ptr<MetricsServer>(
      new MetricsServer(std::move(impl), static_cast<uint16_t>(bound)));
}

MetricsServer::MetricsServer(std::unique_ptr<Impl> impl, uint16_t port)
    : impl_(std::move(impl)), port_(port) {}

MetricsServer::~MetricsServer() { Stop(); }

void MetricsServer::Stop() {
  impl_->server.stop();
  if (impl_->thread.joinable()) impl_->thread.join();
}

}  // namespace kvferry
