// EtcdClient over cpp-httplib (Debian's libcpp-httplib-dev). Kept in its own
// translation unit: httplib.h is slow to compile.
#include "src/directory/etcd_client.h"

#include <algorithm>
#include <thread>

#include <httplib.h>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"

namespace kvferry::internal {
namespace {

// Text from etcd or the network, safe for a status message: bounded, and
// control bytes escaped.
std::string Printable(absl::string_view text) {
  constexpr size_t kMax = 300;
  std::string out;
  for (char ch : text.substr(0, kMax)) {
    const unsigned char c = static_cast<unsigned char>(ch);
    if (c >= 0x20 && c < 0x7f) {
      out.push_back(ch);
    } else {
      absl::StrAppend(&out, "\\x", absl::Hex(c, absl::kZeroPad2));
    }
  }
  if (text.size() > kMax) absl::StrAppend(&out, "... (", text.size(), " bytes)");
  return out;
}

template <typename Duration>
std::chrono::microseconds Micros(Duration d) {
  return std::chrono::microseconds(std::max<int64_t>(1000, absl::ToInt64Microseconds(d)));
}

void Configure(httplib::Client& client, const EtcdClientOptions& o, absl::Duration read) {
  client.set_connection_timeout(Micros(o.connect_timeout));
  client.set_read_timeout(Micros(read));
  client.set_write_timeout(Micros(o.request_timeout));
  client.set_keep_alive(false);
  client.set_follow_location(false);
}

std::string TransportError(httplib::Error e) {
  switch (e) {
    case httplib::Error::Connection: return "cannot connect";
    case httplib::Error::ConnectionTimeout: return "connect timed out";
    case httplib::Error::Read: return "no answer (read failed or timed out)";
    case httplib::Error::Write: return "write failed";
    case httplib::Error::Canceled: return "canceled";
    default: return absl::StrCat("HTTP client error: ", httplib::to_string(e));
  }
}

}  // namespace

// One HTTP exchange: transport error (status 0), or a status and body.
struct EtcdClient::Attempt {
  int http_status = 0;
  std::string transport_error;
  std::string body;
  bool too_large = false;
};

namespace {

EtcdClient::Attempt PostOnce(const EtcdEndpoint& ep, const EtcdClientOptions& o,
                             const std::string& token, const std::string& path,
                             const std::string& body) {
  EtcdClient::Attempt out;
  httplib::Client client(ep.host, ep.port);
  Configure(client, o, o.request_timeout);
  httplib::Request req;
  req.method = "POST";
  req.path = path;
  req.body = body;
  req.set_header("Content-Type", "application/json");
  if (!token.empty()) req.set_header("Authorization", token);
  req.content_receiver = [&out](const char* data, size_t n, uint64_t, uint64_t) {
    if (out.body.size() + n > kMaxEtcdResponseBytes) {
      out.too_large = true;
      return false;
    }
    out.body.append(data, n);
    return true;
  };
  int status = 0;
  req.response_handler = [&status](const httplib::Response& r) {
    status = r.status;
    return true;
  };
  httplib::Result result = client.send(req);
  if (out.too_large) return out;
  if (!result) {
    // etcd's gateway ends an error answer with an HTTP trailer, which this
    // httplib cannot read: the body arrived, the read of the trailer fails.
    if (status != 0 && status != 200 && result.error() == httplib::Error::Read &&
        !out.body.empty()) {
      out.http_status = status;
      return out;
    }
    out.transport_error = TransportError(result.error());
    return out;
  }
  out.http_status = result->status;
  return out;
}

// etcd's error answer: {"error": ..., "code": N, "message": ...}.
struct EtcdError {
  int code = 2;  // unknown
  std::string message;
};

EtcdError ParseError(const EtcdClient::Attempt& a) {
  EtcdError e;
  e.message = absl::StrCat("HTTP ", a.http_status, ": ", Printable(a.body));
  try {
    nlohmann::json j = nlohmann::json::parse(a.body);
    if (j.is_object()) {
      if (j.contains("code") && j["code"].is_number_integer()) e.code = j["code"].get<int>();
      for (const char* field : {"message", "error"}) {
        if (j.contains(field) && j[field].is_string()) {
          e.message = Printable(j[field].get<std::string>());
          break;
        }
      }
    }
  } catch (const nlohmann::json::exception&) {
  }
  if (e.code < 0 || e.code > 16) e.code = 2;
  return e;
}

// etcd errors that another endpoint (or a moment later) may not have.
bool Retryable(const EtcdClient::Attempt& a, const EtcdError& e) {
  if (a.http_status == 503 || a.http_status == 502 || a.http_status == 504) return true;
  if (e.code == static_cast<int>(absl::StatusCode::kUnavailable) ||
      e.code == static_cast<int>(absl::StatusCode::kDeadlineExceeded)) {
    return true;
  }
  for (const char* text : {"no leader", "leader changed", "timed out", "too many requests",
                           "not capable", "stopped", "unhealthy"}) {
    if (absl::StrContains(e.message, text)) return true;
  }
  return false;
}

bool TokenProblem(const EtcdError& e) {
  return absl::StrContains(e.message, "invalid auth token") ||
         absl::StrContains(e.message, "user name is empty");
}

}  // namespace

absl::StatusOr<EtcdEndpoint> ParseEtcdEndpoint(absl::string_view text) {
  absl::string_view rest = absl::StripAsciiWhitespace(text);
  const std::string original(rest);
  if (absl::StartsWith(rest, "https://")) {
    return absl::InvalidArgumentError(
        absl::StrCat("etcd endpoint '", Printable(original), "': https is not supported"));
  }
  absl::ConsumePrefix(&rest, "http://");
  absl::ConsumeSuffix(&rest, "/");
  EtcdEndpoint ep;
  size_t colon = rest.rfind(':');
  if (colon == absl::string_view::npos || colon == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "etcd endpoint '", Printable(original), "': want http://host:port or host:port"));
  }
  absl::string_view host = rest.substr(0, colon);
  uint32_t port = 0;
  if (!absl::SimpleAtoi(rest.substr(colon + 1), &port) || port == 0 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("etcd endpoint '", Printable(original), "': bad port"));
  }
  if (absl::StartsWith(host, "[") && absl::EndsWith(host, "]")) {
    host = host.substr(1, host.size() - 2);
  }
  if (host.empty() || host.find_first_of("/ @?#") != absl::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("etcd endpoint '", Printable(original), "': bad host"));
  }
  ep.host = std::string(host);
  ep.port = static_cast<int>(port);
  ep.url = absl::StrCat("http://", rest);
  return ep;
}

std::string Base64(absl::string_view bytes) { return absl::Base64Escape(bytes); }

absl::StatusOr<std::string> Unbase64(absl::string_view text, absl::string_view what) {
  std::string out;
  if (!absl::Base64Unescape(text, &out)) {
    return absl::DataLossError(absl::StrCat(what, ": not base64"));
  }
  return out;
}

absl::StatusOr<int64_t> JsonInt64(const nlohmann::json& object, const char* field) {
  if (!object.is_object() || !object.contains(field)) return 0;
  const nlohmann::json& v = object[field];
  int64_t out = 0;
  if (v.is_string() && absl::SimpleAtoi(v.get<std::string>(), &out)) return out;
  if (v.is_number_integer()) return v.get<int64_t>();
  return absl::DataLossError(absl::StrCat("etcd answer: field '", field, "' is not an integer"));
}

absl::StatusOr<EtcdKv> ParseEtcdKv(const nlohmann::json& kv) {
  if (!kv.is_object()) return absl::DataLossError("etcd answer: a kv is not an object");
  EtcdKv out;
  for (auto [field, target] : {std::pair{"key", &out.key}, std::pair{"value", &out.value}}) {
    if (!kv.contains(field)) continue;  // proto3 omits empty values
    if (!kv[field].is_string()) {
      return absl::DataLossError(absl::StrCat("etcd answer: kv ", field, " is not a string"));
    }
    absl::StatusOr<std::string> bytes =
        Unbase64(kv[field].get<std::string>(), absl::StrCat("etcd answer: kv ", field));
    if (!bytes.ok()) return bytes.status();
    *target = *std::move(bytes);
  }
  absl::StatusOr<int64_t> create = JsonInt64(kv, "create_revision");
  absl::StatusOr<int64_t> mod = JsonInt64(kv, "mod_revision");
  absl::StatusOr<int64_t> lease = JsonInt64(kv, "lease");
  for (const auto* s : {&create, &mod, &lease}) {
    if (!s->ok()) return s->status();
  }
  out.create_revision = *create;
  out.mod_revision = *mod;
  out.lease = *lease;
  return out;
}

absl::StatusOr<int64_t> HeaderRevision(const nlohmann::json& answer) {
  if (!answer.is_object() || !answer.contains("header")) return 0;
  return JsonInt64(answer["header"], "revision");
}

uint64_t HeaderClusterId(const nlohmann::json& answer) {
  if (!answer.is_object() || !answer.contains("header")) return 0;
  const nlohmann::json& h = answer["header"];
  uint64_t id = 0;
  if (h.is_object() && h.contains("cluster_id") && h["cluster_id"].is_string() &&
      absl::SimpleAtoi(h["cluster_id"].get<std::string>(), &id)) {
    return id;
  }
  return 0;
}

std::string PrefixRangeEnd(std::string prefix) {
  while (!prefix.empty()) {
    unsigned char& last = reinterpret_cast<unsigned char&>(prefix.back());
    if (last < 0xff) {
      ++last;
      return prefix;
    }
    prefix.pop_back();
  }
  return std::string(1, '\0');  // every key
}

absl::StatusOr<std::unique_ptr<EtcdClient>> EtcdClient::Create(EtcdClientOptions options) {
  if (options.endpoints.empty()) {
    return absl::InvalidArgumentError(
        "no etcd endpoints: set DirectoryOptions::endpoints or KVFERRY_ETCD_ENDPOINTS");
  }
  if (options.endpoints.size() > 64) {
    return absl::InvalidArgumentError("more than 64 etcd endpoints");
  }
  std::vector<EtcdEndpoint> endpoints;
  for (const std::string& e : options.endpoints) {
    absl::StatusOr<EtcdEndpoint> ep = ParseEtcdEndpoint(e);
    if (!ep.ok()) return ep.status();
    endpoints.push_back(*std::move(ep));
  }
  if (options.connect_timeout <= absl::ZeroDuration() ||
      options.request_timeout <= absl::ZeroDuration() ||
      options.retry_deadline <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("etcd timeouts must be positive");
  }
  return std::unique_ptr<EtcdClient>(new EtcdClient(std::move(options), std::move(endpoints)));
}

EtcdClient::EtcdClient(EtcdClientOptions options, std::vector<EtcdEndpoint> endpoints)
    : options_(std::move(options)), endpoints_(std::move(endpoints)) {}

std::string EtcdClient::EndpointList() const {
  std::vector<std::string> urls;
  for (const EtcdEndpoint& e : endpoints_) urls.push_back(e.url);
  return absl::StrJoin(urls, ", ");
}

std::string EtcdClient::Token() const {
  internal::MutexLock l(&mu_);
  return token_;
}

absl::Status EtcdClient::Authenticate(const EtcdEndpoint& ep) const {
  nlohmann::json body = {{"name", options_.username}, {"password", options_.password}};
  Attempt a = PostOnce(ep, options_, "", "/v3/auth/authenticate", body.dump());
  if (a.http_status == 0) {
    return absl::UnavailableError(absl::StrCat(ep.url, ": ", a.transport_error));
  }
  if (a.http_status != 200) {
    EtcdError e = ParseError(a);
    return absl::Status(static_cast<absl::StatusCode>(e.code),
                        absl::StrCat("etcd authentication as '", Printable(options_.username),
                                     "' at ", ep.url, ": ", e.message));
  }
  try {
    nlohmann::json j = nlohmann::json::parse(a.body);
    if (j.is_object() && j.contains("token") && j["token"].is_string()) {
      std::string token = j["token"].get<std::string>();
      if (token.empty() || token.size() > 4096) throw std::runtime_error("bad token");
      internal::MutexLock l(&mu_);
      token_ = std::move(token);
      return absl::OkStatus();
    }
  } catch (const std::exception&) {
  }
  return absl::DataLossError(absl::StrCat("etcd authentication at ", ep.url,
                                          ": no token in the answer"));
}

absl::StatusOr<nlohmann::json> EtcdClient::Call(const std::string& path,
                                                const nlohmann::json& body,
                                                absl::Duration retry_deadline) const {
  const std::string payload = body.dump();
  if (retry_deadline <= absl::ZeroDuration()) retry_deadline = options_.retry_deadline;
  const absl::Time deadline = absl::Now() + retry_deadline;
  const size_t n = endpoints_.size();
  std::vector<std::string> last_error(n);
  absl::Duration backoff = absl::Milliseconds(50);
  bool reauthenticated = false;
  while (true) {
    const size_t start = preferred_.load();
    for (size_t i = 0; i < n; ++i) {
      const size_t index = (start + i) % n;
      const EtcdEndpoint& ep = endpoints_[index];
      if (!options_.username.empty() && Token().empty()) {
        absl::Status auth = Authenticate(ep);
        if (absl::IsUnavailable(auth)) {
          last_error[index] = std::string(auth.message());
          continue;
        }
        if (!auth.ok()) return auth;
      }
      Attempt a;
      for (int round = 0; round < 2; ++round) {
        a = PostOnce(ep, options_, Token(), path, payload);
        if (a.too_large || a.http_status == 0 || a.http_status == 200) break;
        if (options_.username.empty() || reauthenticated || !TokenProblem(ParseError(a))) break;
        // The token expired (etcd forgets idle ones): once more with a new one.
        reauthenticated = true;
        if (!Authenticate(ep).ok()) break;
      }
      if (a.too_large) {
        return absl::DataLossError(absl::StrCat("etcd ", ep.url, path, ": answer over ",
                                                kMaxEtcdResponseBytes, " bytes"));
      }
      if (a.http_status == 0) {
        last_error[index] = a.transport_error;
        continue;
      }
      if (a.http_status == 200) {
        try {
          nlohmann::json j = nlohmann::json::parse(a.body);
          if (!j.is_object()) throw std::runtime_error("not an object");
          preferred_ = index;
          return j;
        } catch (const std::exception&) {
          return absl::DataLossError(absl::StrCat("etcd ", ep.url, path,
                                                  ": answer is not a JSON object: ",
                                                  Printable(a.body)));
        }
      }
      EtcdError e = ParseError(a);
      if (Retryable(a, e)) {
        last_error[index] = e.message;
        continue;
      }
      return absl::Status(static_cast<absl::StatusCode>(e.code),
                          absl::StrCat("etcd ", ep.url, path, ": ", e.message));
    }
    const absl::Time now = absl::Now();
    if (now >= deadline) break;
    absl::SleepFor(std::min(backoff, deadline - now));
    backoff = std::min(backoff * 2, absl::Seconds(1));
  }
  std::vector<std::string> tried;
  for (size_t i = 0; i < n; ++i) {
    tried.push_back(absl::StrCat(endpoints_[i].url, " (",
                                 last_error[i].empty() ? "not tried" : last_error[i], ")"));
  }
  const std::string how_long = retry_deadline < absl::Milliseconds(1)
                                   ? std::string("one pass over the endpoints")
                                   : absl::FormatDuration(retry_deadline);
  return absl::UnavailableError(absl::StrCat("etcd unavailable for ", path, " after ", how_long,
                                             "; tried ", absl::StrJoin(tried, ", ")));
}

absl::Status EtcdClient::Stream(const std::string& path, const nlohmann::json& body,
                                absl::Duration idle_timeout,
                                const std::function<bool(const nlohmann::json&)>& on_message,
                                const std::atomic<bool>* stop) const {
  const std::string payload = body.dump();
  const size_t n = endpoints_.size();
  std::vector<std::string> errors;
  for (size_t i = 0; i < n && !stop->load(); ++i) {
    const size_t index = (preferred_.load() + i) % n;
    const EtcdEndpoint& ep = endpoints_[index];
    if (!options_.username.empty() && Token().empty()) {
      absl::Status auth = Authenticate(ep);
      if (!auth.ok()) {
        errors.push_back(std::string(auth.message()));
        continue;
      }
    }
    httplib::Client client(ep.host, ep.port);
    Configure(client, options_, idle_timeout);
    std::string buffer;
    std::string error_body;
    absl::Status ended;  // set by the receiver: a bad message
    bool opened = false;
    bool consumer_done = false;
    int status = 0;
    httplib::Request req;
    req.method = "POST";
    req.path = path;
    req.body = payload;
    req.set_header("Content-Type", "application/json");
    if (std::string token = Token(); !token.empty()) req.set_header("Authorization", token);
    req.response_handler = [&](const httplib::Response& r) {
      status = r.status;
      opened = r.status == 200;
      return true;
    };
    req.content_receiver = [&](const char* data, size_t len, uint64_t, uint64_t) {
      if (stop->load()) return false;
      if (status != 200) {
        if (error_body.size() < 4096) error_body.append(data, std::min<size_t>(len, 4096));
        return true;
      }
      buffer.append(data, len);
      size_t nl;
      while ((nl = buffer.find('\n')) != std::string::npos) {
        std::string line = buffer.substr(0, nl);
        buffer.erase(0, nl + 1);
        if (absl::StripAsciiWhitespace(line).empty()) continue;
        nlohmann::json message;
        try {
          message = nlohmann::json::parse(line);
        } catch (const nlohmann::json::exception&) {
          ended = absl::DataLossError(absl::StrCat("etcd ", ep.url, path,
                                                   ": stream message is not JSON: ",
                                                   Printable(line)));
          return false;
        }
        if (!on_message(message)) {
          consumer_done = true;
          return false;
        }
      }
      if (buffer.size() > kMaxEtcdStreamMessageBytes) {
        ended = absl::DataLossError(absl::StrCat("etcd ", ep.url, path, ": stream message over ",
                                                 kMaxEtcdStreamMessageBytes, " bytes"));
        return false;
      }
      return true;
    };
    {
      internal::MutexLock l(&mu_);
      streams_.push_back(&client);
    }
    httplib::Result result = client.send(req);
    {
      internal::MutexLock l(&mu_);
      streams_.erase(std::find(streams_.begin(), streams_.end(), &client));
    }
    if (!ended.ok()) return ended;
    if (consumer_done || stop->load()) return absl::OkStatus();
    if (opened) {
      preferred_ = index;
      return absl::UnavailableError(
          absl::StrCat("etcd ", ep.url, path, ": stream ended",
                       result ? "" : absl::StrCat(" (", TransportError(result.error()), ")")));
    }
    if (status != 0) {
      Attempt a{.http_status = status, .body = error_body};
      EtcdError e = ParseError(a);
      if (!options_.username.empty() && TokenProblem(e)) {
        internal::MutexLock l(&mu_);
        token_.clear();
      }
      errors.push_back(absl::StrCat(ep.url, " (", e.message, ")"));
      continue;
    }
    errors.push_back(absl::StrCat(
        ep.url, " (", result ? "no answer" : TransportError(result.error()), ")"));
  }
  return absl::UnavailableError(absl::StrCat("etcd unavailable for ", path, "; tried ",
                                             absl::StrJoin(errors, ", ")));
}

void EtcdClient::CancelStreams() const {
  internal::MutexLock l(&mu_);
  for (void* c : streams_) static_cast<httplib::Client*>(c)->stop();
}

}  // namespace kvferry::internal
