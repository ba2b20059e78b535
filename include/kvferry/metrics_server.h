// MetricsServer: an optional, tiny HTTP endpoint that serves GET /metrics
// (Prometheus text format) from a render callback, e.g.
//
//   auto server = MetricsServer::Start("127.0.0.1", 9464, [&agent] {
//     auto r = agent->GetMemoryReport();
//     return r.ok() ? r->ToPrometheus() : std::string();
//   });
//
// An engine with its own exporter should call MemoryReport::ToPrometheus()
// from it instead. Runs one thread (cpp-httplib); Stop() or destruction ends
// it. Thread-safe. The callback runs on the server thread.
#ifndef KVFERRY_METRICS_SERVER_H_
#define KVFERRY_METRICS_SERVER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace kvferry {

class MetricsServer {
 public:
  using Render = std::function<std::string()>;

  // Binds `address`:`port` (0 picks a free port). kInvalidArgument for an
  // empty callback; kUnavailable when the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Start(const std::string& address,
                                                              uint16_t port, Render render);
  ~MetricsServer();
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  uint16_t port() const { return port_; }
  void Stop();  // idempotent

 private:
  struct Impl;
  explicit MetricsServer(std::unique_ptr<Impl> impl, uint16_t port);
  std::unique_ptr<Impl> impl_;
  const uint16_t port_;
};

}  // namespace kvferry

#endif  // KVFERRY_METRICS_SERVER_H_
