// EtcdClient: the few calls kvferry's Directory makes to etcd v3, over its
// JSON gateway (HTTP/1.1 POST /v3/...; keys and values base64, 64-bit
// integers as decimal strings). One short-lived HTTP connection per request,
// so the client holds no connection state and is safe to share between
// threads. Fails over between endpoints; with a username, authenticates and
// sends the token (re-authenticating once when etcd says it expired).
#ifndef KVFERRY_SRC_DIRECTORY_ETCD_CLIENT_H_
#define KVFERRY_SRC_DIRECTORY_ETCD_CLIENT_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "kvferry/internal/mutex.h"

namespace kvferry::internal {

// The largest answer read from etcd; a longer one is refused (kDataLoss).
inline constexpr size_t kMaxEtcdResponseBytes = size_t{16} << 20;
// One line of a watch stream.
inline constexpr size_t kMaxEtcdStreamMessageBytes = size_t{16} << 20;

struct EtcdEndpoint {
  std::string url;  // as given, normalized to http://host:port
  std::string host;
  int port = 0;
};
// "http://host:port" or "host:port"; kInvalidArgument otherwise.
absl::StatusOr<EtcdEndpoint> ParseEtcdEndpoint(absl::string_view text);

std::string Base64(absl::string_view bytes);
// kDataLoss naming `what` for bad base64.
absl::StatusOr<std::string> Unbase64(absl::string_view text, absl::string_view what);
// A 64-bit integer field of a gateway answer (a decimal string, or a number);
// 0 when absent (proto3 omits zeros). kDataLoss naming the field otherwise.
absl::StatusOr<int64_t> JsonInt64(const nlohmann::json& object, const char* field);
// The range end that selects every key starting with `prefix`.
std::string PrefixRangeEnd(std::string prefix);

// One key-value of a range answer or watch event, decoded.
struct EtcdKv {
  std::string key;
  std::string value;
  int64_t create_revision = 0;
  int64_t mod_revision = 0;
  int64_t lease = 0;
};
// kDataLoss for a malformed one.
absl::StatusOr<EtcdKv> ParseEtcdKv(const nlohmann::json& kv);
// header.revision and header.cluster_id of an answer.
absl::StatusOr<int64_t> HeaderRevision(const nlohmann::json& answer);
uint64_t HeaderClusterId(const nlohmann::json& answer);

struct EtcdClientOptions {
  std::vector<std::string> endpoints;
  std::string username;
  std::string password;
  absl::Duration connect_timeout = absl::Seconds(1);
  absl::Duration request_timeout = absl::Seconds(3);
  absl::Duration retry_deadline = absl::Seconds(6);
};

class EtcdClient {
 public:
  static absl::StatusOr<std::unique_ptr<EtcdClient>> Create(EtcdClientOptions options);

  // POSTs `body` to `path` (e.g. "/v3/kv/range"), trying endpoints from the
  // last good one until one answers or retry_deadline passes. Transport
  // failures and etcd's "try elsewhere" errors (unavailable, no leader,
  // leader changed, timeouts) move on; kUnavailable at the end names every
  // endpoint with its last error. Other etcd errors come back with etcd's
  // code (gRPC codes are absl's), naming the endpoint and path.
  // `retry_deadline` overrides the option's when positive (a nanosecond:
  // one pass over the endpoints).
  absl::StatusOr<nlohmann::json> Call(const std::string& path, const nlohmann::json& body,
                                      absl::Duration retry_deadline = absl::ZeroDuration()) const;

  // A streaming call (watch) on one endpoint, chosen as Call does (failing
  // over only until the stream opens). Each newline-terminated JSON message
  // goes to `on_message` until it returns false, the stream ends, `stop` is
  // set, or nothing arrives for `idle_timeout`. Returns why the stream ended
  // (OK when on_message or `stop` ended it). Cancel() ends a running one.
  absl::Status Stream(const std::string& path, const nlohmann::json& body,
                      absl::Duration idle_timeout,
                      const std::function<bool(const nlohmann::json&)>& on_message,
                      const std::atomic<bool>* stop) const;
  void CancelStreams() const;

  // "http://a:2379, http://b:2379"
  std::string EndpointList() const;
  const std::vector<EtcdEndpoint>& endpoints() const { return endpoints_; }

  struct Attempt;  // one HTTP exchange's outcome (etcd_client.cc)

 private:
  explicit EtcdClient(EtcdClientOptions options, std::vector<EtcdEndpoint> endpoints);
  absl::Status Authenticate(const EtcdEndpoint& endpoint) const;
  std::string Token() const;

  const EtcdClientOptions options_;
  const std::vector<EtcdEndpoint> endpoints_;
  mutable std::atomic<size_t> preferred_{0};
  mutable internal::Mutex mu_;
  mutable std::string token_ ABSL_GUARDED_BY(mu_);
  // Streams in progress, so CancelStreams can stop them (httplib::Client*).
  mutable std::vector<void*> streams_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_DIRECTORY_ETCD_CLIENT_H_
