// EtcdCluster: real etcd members (Debian's etcd-server) on loopback ports,
// each with a temporary data directory, for the directory tests. The
// constructor waits until every member answers /health; the destructor kills
// them and removes the directories. Members can be killed, restarted (same
// data) or wiped (restarted with an empty data directory).
#ifndef KVFERRY_TESTS_ETCD_PROCESS_H_
#define KVFERRY_TESTS_ETCD_PROCESS_H_

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace kvferry::test {

// The etcd binary, or "" when it is not installed.
inline std::string EtcdBinary() {
  if (const char* env = std::getenv("KVFERRY_ETCD_BINARY")) return env;
  for (const char* path : {"/usr/bin/etcd", "/usr/local/bin/etcd"}) {
    if (access(path, X_OK) == 0) return path;
  }
  return "";
}

// A port free on 127.0.0.1 right now (the kernel's pick).
inline int FreeLoopbackPort() {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  int port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
    port = ntohs(a.sin_port);
  }
  close(fd);
  return port;
}

class EtcdCluster {
 public:
  // `extra_args` go to every member (e.g. {"--auth-token-ttl", "2"}).
  explicit EtcdCluster(int members = 1, std::vector<std::string> extra_args = {},
                       absl::Duration ready_timeout = absl::Seconds(60))
      : extra_args_(std::move(extra_args)) {
    binary_ = EtcdBinary();
    if (binary_.empty()) return;
    char tmpl[] = "/tmp/kvferry-etcd-XXXXXX";
    if (mkdtemp(tmpl) == nullptr) return;
    root_ = tmpl;
    token_ = absl::StrCat("kvferry-test-", getpid(), "-", absl::ToUnixNanos(absl::Now()));
    std::vector<std::string> initial;
    for (int i = 0; i < members; ++i) {
      Member m;
      m.name = absl::StrCat("m", i);
      m.client_port = FreeLoopbackPort();
      m.peer_port = FreeLoopbackPort();
      initial.push_back(absl::StrCat(m.name, "=http://127.0.0.1:", m.peer_port));
      members_.push_back(m);
    }
    initial_cluster_ = absl::StrJoin(initial, ",");
    for (int i = 0; i < members; ++i) Start(i);
    ok_ = WaitHealthy(ready_timeout);
  }
  ~EtcdCluster() {
    for (int i = 0; i < static_cast<int>(members_.size()); ++i) Kill(i);
    if (!root_.empty()) {
      std::error_code ec;
      std::filesystem::remove_all(root_, ec);
    }
  }
  EtcdCluster(const EtcdCluster&) = delete;
  EtcdCluster& operator=(const EtcdCluster&) = delete;

  bool available() const { return !binary_.empty(); }
  bool ok() const { return ok_; }
  int size() const { return static_cast<int>(members_.size()); }
  std::string Endpoint(int i) const {
    return absl::StrCat("http://127.0.0.1:", members_[i].client_port);
  }
  std::vector<std::string> Endpoints() const {
    std::vector<std::string> out;
    for (int i = 0; i < size(); ++i) out.push_back(Endpoint(i));
    return out;
  }
  // What the members printed, for a failure message.
  std::string LogTail(int i, size_t bytes = 4000) const {
    std::string path = absl::StrCat(root_, "/", members_[i].name, ".log");
    FILE* f = std::fopen(path.c_str(), "r");
    if (f == nullptr) return "";
    std::string all;
    char buf[4096];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) all.append(buf, n);
    std::fclose(f);
    return all.size() > bytes ? all.substr(all.size() - bytes) : all;
  }

  // SIGKILL, and reaped.
  void Kill(int i) {
    Member& m = members_[i];
    if (m.pid <= 0) return;
    kill(m.pid, SIGKILL);
    int status = 0;
    waitpid(m.pid, &status, 0);
    m.pid = -1;
  }
  // Starts a killed member again on the same ports; `wipe` empties its data
  // directory first (etcd comes back without its data).
  void Restart(int i, bool wipe = false) {
    Kill(i);
    if (wipe) {
      std::error_code ec;
      std::filesystem::remove_all(DataDir(i), ec);
    }
    Start(i);
  }
  bool running(int i) const { return members_[i].pid > 0; }

  // The index of the current leader (by /v3/maintenance/status), or -1.
  int Leader() const {
    for (int i = 0; i < size(); ++i) {
      if (!running(i)) continue;
      auto status = Post(i, "/v3/maintenance/status", "{}");
      if (!status) continue;
      try {
        nlohmann::json j = nlohmann::json::parse(*status);
        const std::string leader = j.value("leader", "");
        for (int k = 0; k < size(); ++k) {
          if (!running(k)) continue;
          auto s = Post(k, "/v3/maintenance/status", "{}");
          if (!s) continue;
          nlohmann::json jk = nlohmann::json::parse(*s);
          if (!leader.empty() && jk["header"].value("member_id", "") == leader) return k;
        }
      } catch (const std::exception&) {
      }
    }
    return -1;
  }

  // Whether every running member answers /health with true (all members
  // when `all`, else any).
  bool Healthy(bool all = true) const {
    int healthy = 0, running_count = 0;
    for (int i = 0; i < size(); ++i) {
      if (!running(i)) continue;
      ++running_count;
      httplib::Client c("127.0.0.1", members_[i].client_port);
      c.set_connection_timeout(1);
      c.set_read_timeout(3);
      auto r = c.Get("/health");
      if (r && r->status == 200 && r->body.find("\"true\"") != std::string::npos) ++healthy;
    }
    return all ? healthy == running_count && running_count > 0 : healthy > 0;
  }
  bool WaitHealthy(absl::Duration timeout, bool all = true) const {
    const absl::Time deadline = absl::Now() + timeout;
    while (absl::Now() < deadline) {
      if (Healthy(all)) return true;
      absl::SleepFor(absl::Milliseconds(100));
    }
    return Healthy(all);
  }

  // Raw access, for tests that write bad data: POST `body` to member i.
  std::optional<std::string> Post(int i, const std::string& path, const std::string& body) const {
    httplib::Client c("127.0.0.1", members_[i].client_port);
    c.set_connection_timeout(1);
    c.set_read_timeout(5);
    auto r = c.Post(path.c_str(), body, "application/json");
    if (!r || r->status != 200) return std::nullopt;
    return r->body;
  }
  // POSTs `body` to the first running member that answers.
  std::optional<std::string> PostAny(const std::string& path, const std::string& body) const {
    for (int i = 0; i < size(); ++i) {
      if (!running(i)) continue;
      if (auto r = Post(i, path, body)) return r;
    }
    return std::nullopt;
  }
  // The ID of the lease that keeps `key` alive (as etcd writes it), or
  // nullopt when the key is absent, has no lease, or no member answers.
  std::optional<std::string> LeaseOf(const std::string& key) const {
    nlohmann::json req = {{"key", absl::Base64Escape(key)}};
    auto r = PostAny("/v3/kv/range", req.dump());
    if (!r) return std::nullopt;
    try {
      nlohmann::json j = nlohmann::json::parse(*r);
      if (!j.contains("kvs") || j["kvs"].empty() || !j["kvs"][0].contains("lease")) {
        return std::nullopt;
      }
      const nlohmann::json& lease = j["kvs"][0]["lease"];
      return lease.is_string() ? lease.get<std::string>() : lease.dump();
    } catch (const std::exception&) {
      return std::nullopt;
    }
  }
  // The whole seconds lease `id` has left (/v3/lease/timetolive): -1 once it
  // expired or was revoked; nullopt when no member answers.
  std::optional<int64_t> LeaseSecondsLeft(const std::string& id) const {
    auto r = PostAny("/v3/lease/timetolive", absl::StrCat(R"({"ID":")", id, R"("})"));
    if (!r) return std::nullopt;
    try {
      nlohmann::json j = nlohmann::json::parse(*r);
      if (!j.contains("TTL")) return std::nullopt;
      const nlohmann::json& ttl = j["TTL"];
      int64_t left = 0;
      if (ttl.is_string()) {
        left = std::stoll(ttl.get<std::string>());
      } else {
        left = ttl.get<int64_t>();
      }
      return left;
    } catch (const std::exception&) {
      return std::nullopt;
    }
  }

  // Puts raw bytes at `key` through any running member; false on failure.
  bool PutRaw(const std::string& key, const std::string& value) const {
    nlohmann::json j = {{"key", absl::Base64Escape(key)}, {"value", absl::Base64Escape(value)}};
    for (int i = 0; i < size(); ++i) {
      if (running(i) && Post(i, "/v3/kv/put", j.dump())) return true;
    }
    return false;
  }

 private:
  struct Member {
    std::string name;
    int client_port = 0;
    int peer_port = 0;
    pid_t pid = -1;
  };
  std::string DataDir(int i) const { return absl::StrCat(root_, "/", members_[i].name); }

  void Start(int i) {
    Member& m = members_[i];
    const std::string client = absl::StrCat("http://127.0.0.1:", m.client_port);
    const std::string peer = absl::StrCat("http://127.0.0.1:", m.peer_port);
    std::vector<std::string> argv = {binary_,
                                     "--name", m.name,
                                     "--data-dir", DataDir(i),
                                     "--listen-client-urls", client,
                                     "--advertise-client-urls", client,
                                     "--listen-peer-urls", peer,
                                     "--initial-advertise-peer-urls", peer,
                                     "--initial-cluster", initial_cluster_,
                                     "--initial-cluster-token", token_,
                                     "--initial-cluster-state", "new"};
    argv.insert(argv.end(), extra_args_.begin(), extra_args_.end());
    const std::string log = absl::StrCat(root_, "/", m.name, ".log");
    pid_t pid = fork();
    if (pid == 0) {
      int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd >= 0) {
        dup2(fd, STDOUT_FILENO);
        dup2(fd, STDERR_FILENO);
      }
      int null = open("/dev/null", O_RDONLY);
      if (null >= 0) dup2(null, STDIN_FILENO);
      std::vector<char*> args;
      for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      execv(args[0], args.data());
      _exit(127);
    }
    m.pid = pid;
  }

  std::vector<std::string> extra_args_;
  std::string binary_;
  std::string root_;
  std::string token_;
  std::string initial_cluster_;
  std::vector<Member> members_;
  bool ok_ = false;
};

}  // namespace kvferry::test

#endif  // KVFERRY_TESTS_ETCD_PROCESS_H_
