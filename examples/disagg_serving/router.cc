#include "examples/disagg_serving/router.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <random>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "examples/disagg_serving/flags.h"
#include "examples/disagg_serving/kv_math.h"
#include "examples/disagg_serving/worker.h"

namespace kvferry::serving {

absl::StatusOr<std::vector<std::vector<uint32_t>>> ReadPromptFile(const std::string& path,
                                                                  uint32_t vocab) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("--prompt_file=", path, ": cannot open it"));
  std::vector<std::vector<uint32_t>> prompts;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    absl::string_view rest = absl::StripAsciiWhitespace(line);
    if (rest.empty() || rest[0] == '#') continue;
    absl::ConsumePrefix(&rest, "[");
    absl::ConsumeSuffix(&rest, "]");
    std::vector<uint32_t> prompt;
    for (absl::string_view field : absl::StrSplit(rest, absl::ByAnyChar(" ,\t"), absl::SkipEmpty())) {
      uint32_t id = 0;
      if (!absl::SimpleAtoi(field, &id) || id >= vocab) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--prompt_file=", path, " line ", n, ": '", field,
            "' is not a token id below --vocab=", vocab));
      }
      prompt.push_back(id);
    }
    if (prompt.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--prompt_file=", path, " line ", n, ": no token ids"));
    }
    prompts.push_back(std::move(prompt));
  }
  if (prompts.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("--prompt_file=", path, ": no prompts"));
  }
  return prompts;
}

namespace {

volatile sig_atomic_t g_signal = 0;

void OnSignal(int sig) { g_signal = sig; }

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = static_cast<size_t>(p * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(i, v.size() - 1)];
}

}  // namespace

absl::Status Router::MakeLoad() {
  const uint32_t vocab = static_cast<uint32_t>(absl::GetFlag(FLAGS_vocab));
  std::mt19937_64 rng(absl::GetFlag(FLAGS_seed));
  std::vector<std::vector<uint32_t>> prompts;
  if (!absl::GetFlag(FLAGS_prompt_file).empty()) {
    auto p = ReadPromptFile(absl::GetFlag(FLAGS_prompt_file), vocab);
    if (!p.ok()) return p.status();
    prompts = *std::move(p);
  } else {
    std::uniform_int_distribution<int> len(absl::GetFlag(FLAGS_prompt_min),
                                           absl::GetFlag(FLAGS_prompt_max));
    std::uniform_int_distribution<uint32_t> tok(0, vocab - 1);
    for (int i = 0; i < absl::GetFlag(FLAGS_requests); ++i) {
      std::vector<uint32_t> p(static_cast<size_t>(len(rng)));
      for (uint32_t& t : p) t = tok(rng);
      prompts.push_back(std::move(p));
    }
  }
  std::uniform_int_distribution<uint32_t> out(absl::GetFlag(FLAGS_output_min),
                                              absl::GetFlag(FLAGS_output_max));
  const double rate = absl::GetFlag(FLAGS_rate);
  std::exponential_distribution<double> gap(rate > 0 ? rate : 1);
  double t = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    Request r;
    r.id = static_cast<int64_t>(i);
    r.tokens = std::move(prompts[i]);
    r.output_len = out(rng);
    // Each request must fit one worker's pool: prompt plus output blocks.
    const uint32_t need = BlocksFor(r.tokens.size() + r.output_len, layout_);
    if (need > layout_.num_blocks) {
      return absl::InvalidArgumentError(absl::StrCat(
          "request ", i, " needs ", need, " blocks (", r.tokens.size(), " prompt + ", r.output_len,
          " output tokens) but --blocks=", layout_.num_blocks));
    }
    r.expected = ExpectedOutput(r.tokens, r.output_len, layout_, vocab);
    r.arrival_us = static_cast<int64_t>(t * 1e6);
    if (rate > 0) t += gap(rng);
    requests_.push_back(std::move(r));
  }
  return absl::OkStatus();
}

absl::Status Router::StartWorkers() {
  // The agents' shared secret, for the children only.
  unsigned char raw[32];
  int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
  if (fd < 0 || read(fd, raw, sizeof(raw)) != sizeof(raw)) {
    return absl::UnavailableError("cannot read /dev/urandom for the shared secret");
  }
  close(fd);
  std::string secret;
  for (unsigned char c : raw) absl::StrAppend(&secret, absl::Hex(c, absl::kZeroPad2));
  setenv("KVFERRY_SECRET", secret.c_str(), 1);
  if (absl::GetFlag(FLAGS_cluster).empty()) {
    absl::SetFlag(&FLAGS_cluster, absl::StrCat("kvferry-serve-", getpid()));
  }
  auto flag = [](const char* name, const auto& value) { return absl::StrCat("--", name, "=", value); };
  spawn_args_ = {
      flag("layers", absl::GetFlag(FLAGS_layers)),
      flag("kv_heads", absl::GetFlag(FLAGS_kv_heads)),
      flag("head_dim", absl::GetFlag(FLAGS_head_dim)),
      flag("element_bytes", absl::GetFlag(FLAGS_element_bytes)),
      flag("tokens_per_block", absl::GetFlag(FLAGS_tokens_per_block)),
      flag("blocks", absl::GetFlag(FLAGS_blocks)),
      flag("vocab", absl::GetFlag(FLAGS_vocab)),
      flag("pipeline", absl::GetFlag(FLAGS_pipeline) ? "true" : "false"),
      flag("pool_memory", absl::GetFlag(FLAGS_pool_memory)),
      flag("push", absl::GetFlag(FLAGS_push) ? "true" : "false"),
      flag("prefill_ms_per_layer", absl::GetFlag(FLAGS_prefill_ms_per_layer)),
      flag("etcd", absl::GetFlag(FLAGS_etcd)),
      flag("cluster", absl::GetFlag(FLAGS_cluster)),
      flag("tls", absl::GetFlag(FLAGS_tls)),
      flag("offer_ttl_s", absl::GetFlag(FLAGS_offer_ttl_s)),
      flag("metrics", absl::GetFlag(FLAGS_metrics) ? "true" : "false"),
      flag("watchdog", absl::GetFlag(FLAGS_watchdog) ? "true" : "false"),
      flag("watchdog_period_s", absl::GetFlag(FLAGS_watchdog_period_s)),
      flag("watchdog_window_s", absl::GetFlag(FLAGS_watchdog_window_s)),
      flag("watchdog_max_rss_mib_per_min", absl::GetFlag(FLAGS_watchdog_max_rss_mib_per_min)),
      flag("watchdog_max_unexplained_mib_per_min",
           absl::GetFlag(FLAGS_watchdog_max_unexplained_mib_per_min)),
      flag("watchdog_max_unexplained_share", absl::GetFlag(FLAGS_watchdog_max_unexplained_share)),
      flag("watchdog_min_unexplained_mib", absl::GetFlag(FLAGS_watchdog_min_unexplained_mib)),
      flag("watchdog_reset", absl::GetFlag(FLAGS_watchdog_reset) ? "true" : "false"),
      flag("inject_leak_max_mib", absl::GetFlag(FLAGS_inject_leak_max_mib)),
      flag("heartbeat_ms", absl::GetFlag(FLAGS_heartbeat_ms)),
      "--control_fd=3"};
  for (const char* role : {"prefill", "decode"}) {
    const int n = std::string(role) == "prefill" ? absl::GetFlag(FLAGS_prefill)
                                                 : absl::GetFlag(FLAGS_decode);
    for (int i = 0; i < n; ++i) {
      WorkerProc w;
      w.name = absl::StrCat(role, i);
      w.role = role;
      // The injected leak: decode worker 0's first incarnation.
      const bool leak = w.role == "decode" && i == 0;
      if (absl::Status s = Spawn(w, leak); !s.ok()) return s;
      workers_.push_back(std::move(w));
    }
  }
  return absl::OkStatus();
}

absl::Status Router::Spawn(WorkerProc& w, bool leak) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    return absl::InternalError("socketpair failed");
  }
  std::vector<std::string> argv = {"kvferry_serve", absl::StrCat("--role=", w.role),
                                   absl::StrCat("--name=", w.name)};
  argv.insert(argv.end(), spawn_args_.begin(), spawn_args_.end());
  argv.push_back(absl::StrCat("--inject_leak_mib_per_s=",
                              leak ? absl::GetFlag(FLAGS_inject_leak_mib_per_s) : 0.0));
  std::fflush(nullptr);
  const pid_t pid = fork();
  if (pid < 0) {
    close(sv[0]);
    close(sv[1]);
    return absl::InternalError("fork failed");
  }
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the router
    dup2(sv[1], 3);                    // clears FD_CLOEXEC on the copy
    dup2(STDERR_FILENO, STDOUT_FILENO);  // the router's stdout is the summary
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv("/proc/self/exe", args.data());
    _exit(127);
  }
  close(sv[1]);
  w.pid = pid;
  w.channel = std::make_unique<Channel>(sv[0]);
  w.last_heard_us = NowMicros();
  std::fprintf(stderr, "kvferry_serve: started %s (pid %d)\n", w.name.c_str(), static_cast<int>(pid));
  return absl::OkStatus();
}

// Waits until every worker is ready, then has prefill connect to every
// decode worker and decode confirm it sees every prefill worker.
absl::Status Router::WriteServiceDiscovery() const {
  const std::string path = absl::GetFlag(FLAGS_prometheus_sd_file);
  if (path.empty()) return absl::OkStatus();
  Json groups = Json::array();
  for (const char* role : {"prefill", "decode"}) {
    Json targets = Json::array();
    for (const WorkerProc& w : workers_) {
      if (w.role == role && w.metrics_port != 0) {
        targets.push_back(absl::StrCat("127.0.0.1:", w.metrics_port));
      }
    }
    if (targets.empty()) continue;
    groups.push_back({{"targets", std::move(targets)},
                      {"labels", {{"job", "kvferry"}, {"role", role}}}});
  }
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << groups.dump(2) << "\n";
    if (!out.good()) {
      return absl::UnavailableError(absl::StrCat("--prometheus_sd_file: cannot write '", tmp, "'"));
    }
  }
  if (rename(tmp.c_str(), path.c_str()) != 0) {
    return absl::UnavailableError(
        absl::StrCat("--prometheus_sd_file: cannot rename '", tmp, "' to '", path, "'"));
  }
  return absl::OkStatus();
}

absl::Status Router::Rendezvous() {
  const absl::Time deadline = absl::Now() + absl::Seconds(120);
  auto wait_all = [&](auto done, const char* what) -> absl::Status {
    while (true) {
      bool all = true;
      for (WorkerProc& w : workers_) all &= done(w);
      if (all) return absl::OkStatus();
      if (absl::Now() > deadline) {
        return absl::DeadlineExceededError(absl::StrCat("workers not ", what, " after 120 s"));
      }
      std::vector<pollfd> fds;
      for (WorkerProc& w : workers_) fds.push_back({w.channel->fd(), POLLIN, 0});
      poll(fds.data(), fds.size(), 20);
      for (size_t i = 0; i < workers_.size(); ++i) {
        WorkerProc& w = workers_[i];
        w.channel->Flush();
        for (const Json& m : w.channel->Read()) {
          const std::string type = m["type"];
          if (type == "ready") {
            w.ready = true;
            w.port = m["port"];
            w.metrics_port = m.value("metrics_port", 0);
            w.blocks_total = m["blocks"];
          } else if (type == "connected") {
            if (!m["ok"].get<bool>()) {
              return absl::UnavailableError(absl::StrCat(w.name, ": ", m["error"].get<std::string>()));
            }
            w.connected = true;
          } else if (type == "alarm") {
            alarms_.push_back(m);
          } else if (type == "fatal") {
            return absl::UnavailableError(absl::StrCat(w.name, ": ", m["error"].get<std::string>()));
          }
        }
        if (w.channel->closed()) {
          return absl::UnavailableError(absl::StrCat(w.name, " exited during start-up"));
        }
      }
    }
  };
  if (absl::Status s = wait_all([](WorkerProc& w) { return w.ready; }, "ready"); !s.ok()) return s;
  if (absl::Status s = WriteServiceDiscovery(); !s.ok()) return s;
  Json decodes = Json::array(), prefills = Json::array();
  for (const WorkerProc& w : workers_) {
    if (w.role == "decode") {
      decodes.push_back({{"name", w.name}, {"address", "127.0.0.1"}, {"port", w.port}});
    } else {
      prefills.push_back(w.name);
    }
  }
  for (WorkerProc& w : workers_) {
    if (w.role == "prefill") w.channel->Send({{"type", "connect"}, {"peers", decodes}});
  }
  if (absl::Status s = wait_all([](WorkerProc& w) { return w.role == "decode" || w.connected; },
                                "connected");
      !s.ok()) {
    return s;
  }
  for (WorkerProc& w : workers_) {
    if (w.role == "decode") w.channel->Send({{"type", "await"}, {"names", prefills}});
  }
  if (absl::Status s = wait_all([](WorkerProc& w) { return w.connected; }, "connected"); !s.ok()) {
    return s;
  }
  // From here on a worker may drain for a reset, and must send heartbeats.
  for (WorkerProc& w : workers_) {
    w.channel->Send({{"type", "serving"}});
    w.last_heard_us = NowMicros();
  }
  return absl::OkStatus();
}

void Router::Dispatch() {
  const int64_t now = NowMicros();
  // A worker silent for a few heartbeats gets no new request until it is
  // heard from again (or killed after --worker_timeout_s).
  const int64_t stale_us = std::max<int64_t>(
      int64_t{5} * absl::GetFlag(FLAGS_heartbeat_ms) * 1000, 1000000);
  auto pick = [&](const std::string& role, uint32_t need) {
    // Least loaded (open jobs); ties go round-robin, from the worker after
    // the one the role's last request went to.
    std::vector<int> of_role;
    for (int i = 0; i < static_cast<int>(workers_.size()); ++i) {
      if (workers_[static_cast<size_t>(i)].role == role) of_role.push_back(i);
    }
    const int n = static_cast<int>(of_role.size());
    int best = -1, best_k = -1;
    for (int k = 0; k < n; ++k) {
      const int i = of_role[static_cast<size_t>((k + rr_[role]) % n)];
      const WorkerProc& w = workers_[static_cast<size_t>(i)];
      if (!w.alive || w.draining || w.unresponsive || now - w.last_heard_us > stale_us ||
          w.blocks_total - w.blocks_committed < need) {
        continue;
      }
      if (best < 0 || w.jobs < workers_[static_cast<size_t>(best)].jobs) {
        best = i;
        best_k = (k + rr_[role]) % n;
      }
    }
    if (best >= 0) rr_[role] = (best_k + 1) % n;
    return best;
  };
  while (true) {
    // The first request due: a retry waits out its backoff, later arrivals
    // go meanwhile.
    auto q = std::find_if(queue_.begin(), queue_.end(), [&](int64_t id) {
      return requests_[static_cast<size_t>(id)].not_before_us <= now;
    });
    if (q == queue_.end()) return;
    Request& r = requests_[static_cast<size_t>(*q)];
    const uint32_t need_p = BlocksFor(r.tokens.size(), layout_);
    const uint32_t need_d = BlocksFor(r.tokens.size() + r.output_len, layout_);
    const std::map<std::string, int> rr_before = rr_;
    const int p = pick("prefill", need_p), d = pick("decode", need_d);
    if (p < 0 || d < 0) {  // wait for room (queue time)
      rr_ = rr_before;
      return;
    }
    queue_.erase(q);
    const int64_t id = next_job_++;
    if (first_dispatch_us_ == 0) first_dispatch_us_ = now;
    jobs_[id] = Job{.request = r.id, .prefill = p, .decode = d, .prefill_blocks = need_p,
                    .decode_blocks = need_d, .dispatch_us = now};
    r.job = id;
    ++r.attempts;
    for (auto [w, need] : {std::pair{p, need_p}, std::pair{d, need_d}}) {
      workers_[static_cast<size_t>(w)].blocks_committed += need;
      ++workers_[static_cast<size_t>(w)].jobs;
      ++workers_[static_cast<size_t>(w)].dispatched;
    }
    WorkerProc& dw = workers_[static_cast<size_t>(d)];
    WorkerProc& pw = workers_[static_cast<size_t>(p)];
    dw.channel->Send({{"type", "decode"}, {"job", id}, {"prefill", pw.name}, {"tokens", r.tokens},
                      {"output_len", r.output_len}});
    pw.channel->Send({{"type", "prefill"}, {"job", id}, {"decode", dw.name}, {"tokens", r.tokens}});
  }
}

// The worker of one side ended the job: its blocks are free again.
void Router::CloseJobSide(int64_t id, bool prefill_side) {
  auto it = jobs_.find(id);
  if (it == jobs_.end()) return;
  Job& j = it->second;
  bool& open = prefill_side ? j.prefill_open : j.decode_open;
  if (open) {
    open = false;
    WorkerProc& w = workers_[static_cast<size_t>(prefill_side ? j.prefill : j.decode)];
    w.blocks_committed -= prefill_side ? j.prefill_blocks : j.decode_blocks;
    --w.jobs;
  }
  if (!j.prefill_open && !j.decode_open) jobs_.erase(it);
}

void Router::Requeue(int64_t id, bool retry, const std::string& why) {
  auto it = jobs_.find(id);
  if (it == jobs_.end() || !it->second.current) return;
  Job& j = it->second;
  j.current = false;
  Request& r = requests_[static_cast<size_t>(j.request)];
  // Only the request's current attempt may send it round again, and never
  // once it completed or failed.
  if (r.done || r.failed || r.job != id) return;
  if (!retry) {
    ++failed_over_;
    queue_.push_front(r.id);  // ahead of later arrivals
    return;
  }
  if (r.retries >= absl::GetFlag(FLAGS_max_retries)) {
    FailRequest(r, absl::StrCat("attempt ", r.attempts, " failed (", why, ") after ", r.retries,
                                " retries (--max_retries=", absl::GetFlag(FLAGS_max_retries), ")"));
    return;
  }
  ++r.retries;
  ++retries_;
  r.not_before_us = NowMicros() + int64_t{absl::GetFlag(FLAGS_retry_backoff_ms)} * 1000 *
                                      (int64_t{1} << std::min(r.retries - 1, 20));
  std::fprintf(stderr, "kvferry_serve: request %lld failed (%s); retry %d of %d\n",
               static_cast<long long>(r.id), why.c_str(), r.retries,
               absl::GetFlag(FLAGS_max_retries));
  queue_.push_front(r.id);
}

void Router::FailRequest(Request& r, const std::string& why) {
  if (r.done || r.failed) return;
  r.failed = true;
  r.failure = why;
  ++failed_;
  std::fprintf(stderr, "kvferry_serve: request %lld FAILED: %s\n", static_cast<long long>(r.id),
               why.c_str());
}

void Router::Handle(int wi, const Json& m) {
  WorkerProc& w = workers_[static_cast<size_t>(wi)];
  const std::string type = m["type"];
  w.last_heard_us = NowMicros();
  if (type == "heartbeat") return;
  if (type == "report") {
    w.report = m;
    return;
  }
  if (type == "alarm") {
    alarms_.push_back(m);
    return;
  }
  if (type == "directory") {  // with --etcd: its key's lease lost, or back
    const bool ok = m["ok"].get<bool>();
    std::fprintf(stderr, "\nkvferry_serve: %s: etcd %s%s\n", w.name.c_str(),
                 ok ? "works again: published" : "lost: ", m["error"].get<std::string>().c_str());
    directory_events_.push_back({{"name", w.name},
                                 {"ok", ok},
                                 {"error", m["error"]},
                                 {"at_s", first_dispatch_us_ ? static_cast<double>(NowMicros() - first_dispatch_us_) / 1e6 : 0}});
    return;
  }
  if (type == "draining") {
    // No request goes to it from here on; the ack follows every one sent.
    if (!w.draining) {
      w.draining = true;
      w.reset = static_cast<int>(resets_.size());
      ++resets_in_progress_;
      const int64_t now = NowMicros();
      resets_.push_back({{"name", w.name},
                         {"role", w.role},
                         {"alarm", m["alarm"]},
                         {"in_flight_at_alarm", w.jobs},
                         {"pid_before", w.pid},
                         {"drain_start_us", now},
                         {"at_s", first_dispatch_us_ ? static_cast<double>(now - first_dispatch_us_) / 1e6 : 0},
                         {"completed_at_alarm", completed_}});
      std::fprintf(stderr, "\nkvferry_serve: %s is draining for a reset (%d requests in flight): %s\n",
                   w.name.c_str(), w.jobs,
                   m["alarm"].is_object() ? m["alarm"].value("text", "").c_str() : "");
    }
    w.channel->Send({{"type", "drain_ack"}});
    return;
  }
  if (type == "resetting") {
    if (w.reset >= 0) {
      Json& r = resets_[static_cast<size_t>(w.reset)];
      r["before"] = m;
      r["drain_ms"] = static_cast<double>(NowMicros() - r["drain_start_us"].get<int64_t>()) / 1e3;
      r["new_jobs_after_ack"] = m["new_jobs_after_ack"];
    }
    w.resetting = true;
    return;
  }
  if (type == "ready") {  // a new incarnation (the first ones are met in Rendezvous)
    w.ready = true;
    w.port = m["port"];
    w.metrics_port = m.value("metrics_port", 0);
    w.blocks_total = m["blocks"];
    if (w.reset >= 0) resets_[static_cast<size_t>(w.reset)]["after"] = m["memory"];
    WriteServiceDiscovery().IgnoreError();  // its /metrics port changed
    Rewire(wi);
    return;
  }
  if (type == "connected") {
    if (w.blocking > 0) --w.blocking;
    if (!m["ok"].get<bool>()) {
      std::fprintf(stderr, "kvferry_serve: %s could not connect after a reset: %s\n",
                   w.name.c_str(), m["error"].get<std::string>().c_str());
      error_ = absl::StrCat(w.name, ": connecting after a reset: ", m["error"].get<std::string>());
    }
    std::deque<int>& q = connecting_for_[wi];
    if (!q.empty()) {  // a prefill worker connected to a new decode incarnation
      const int target = q.front();
      q.pop_front();
      WorkerProc& t = workers_[static_cast<size_t>(target)];
      if (t.reset >= 0 && m["ok"].get<bool>()) {
        resets_[static_cast<size_t>(t.reset)]["reconnected"].push_back(w.name);
      }
      if (--t.pending_connects == 0 && t.alive) {
        Json prefills = Json::array();
        for (const WorkerProc& p : workers_) {
          if (p.role == "prefill" && p.alive) prefills.push_back(p.name);
        }
        t.channel->Send({{"type", "await"}, {"names", prefills}});
        ++t.blocking;
      }
    } else if (w.draining && w.reset >= 0) {
      if (w.role == "prefill" && m["ok"].get<bool>()) {  // it connected to every decode worker
        Json& r = resets_[static_cast<size_t>(w.reset)];
        for (const WorkerProc& d : workers_) {
          if (d.role == "decode" && d.alive && d.ready) r["reconnected"].push_back(d.name);
        }
      }
      BackInService(wi);  // the new incarnation sees its peers
    }
    return;
  }
  if (!m.contains("job")) return;
  const int64_t id = m["job"];
  auto it = jobs_.find(id);
  if (it == jobs_.end()) return;
  Job& j = it->second;
  WorkerProc& pw = workers_[static_cast<size_t>(j.prefill)];
  WorkerProc& dw = workers_[static_cast<size_t>(j.decode)];
  if (type == "offer") {  // a ticket, to the other side
    WorkerProc& to = w.role == "prefill" ? dw : pw;
    if (j.current && to.alive) to.channel->Send(m);
  } else if (type == "layers") {
    if (m["end"].get<uint32_t>() == layout_.num_layers) j.prefill_done_us = NowMicros();
    if (j.current && dw.alive && !absl::GetFlag(FLAGS_push)) dw.channel->Send(m);
  } else if (type == "prefill_end") {
    const std::string outcome = m["outcome"];
    ++prefill_outcomes_[outcome];
    Request& pr = requests_[static_cast<size_t>(j.request)];
    if (m.contains("transfer") && m["transfer"].is_object() && pr.job == id) {  // --push: WRITEs
      pr.kv_ms = m["transfer"]["busy_us"].get<double>() / 1e3;
      pr.kv_bytes = m["transfer"]["bytes"];
    }
    // kvferry ended the offer (or the WRITEs) without handing the KV cache
    // over: the decode side will not get it either.
    const bool handed_over = outcome == "consumed" || outcome == "written";
    if (!handed_over && j.current && j.decode_open &&
        !requests_[static_cast<size_t>(j.request)].done) {
      Requeue(id, /*retry=*/true, absl::StrCat("prefill on ", pw.name, " ended ", outcome));
      if (dw.alive) dw.channel->Send({{"type", "abort"}, {"job", id}});
    }
    CloseJobSide(id, /*prefill_side=*/true);
  } else if (type == "done") {
    Request& r = requests_[static_cast<size_t>(j.request)];
    // The first attempt to finish completes the request (an attempt failed
    // over a moment too early may still finish first); a later attempt of
    // it, queued or under way, is called off.
    if (!r.done && !r.failed) {
      if (r.job != id) {
        queue_.erase(std::remove(queue_.begin(), queue_.end(), r.id), queue_.end());
        auto later = jobs_.find(r.job);
        if (later != jobs_.end() && later->second.current) {
          Job& l = later->second;
          l.current = false;
          WorkerProc& lp = workers_[static_cast<size_t>(l.prefill)];
          WorkerProc& ld = workers_[static_cast<size_t>(l.decode)];
          if (lp.alive && l.prefill_open) lp.channel->Send({{"type", "abort"}, {"job", r.job}});
          if (ld.alive && l.decode_open) ld.channel->Send({{"type", "abort"}, {"job", r.job}});
        }
        r.job = id;
      }
      r.done = true;
      j.current = false;
      r.correct = m["output"].get<std::vector<uint32_t>>() == r.expected &&
                  m["bad_rows"].get<uint64_t>() == 0;
      ++completed_;
      correct_ += r.correct;
      bytes_moved_ += m["bytes"].get<uint64_t>();
      const int64_t kv = m["kv_received_us"], verify = m.value("verify_us", int64_t{0});
      const int64_t first = m["first_token_us"].get<int64_t>() - verify;
      const int64_t last = m.value("last_token_us", first + verify) - verify;
      const int64_t pdone = j.prefill_done_us ? j.prefill_done_us : kv;
      r.ttft = static_cast<double>(first - r.arrival_us) / 1e3;
      r.queue = static_cast<double>(j.dispatch_us - r.arrival_us) / 1e3;
      r.prefill = static_cast<double>(pdone - j.dispatch_us) / 1e3;
      r.transfer = static_cast<double>(std::max<int64_t>(0, kv - pdone)) / 1e3;
      r.decode_start = static_cast<double>(first - kv) / 1e3;
      r.verify = static_cast<double>(verify) / 1e3;
      r.e2e = static_cast<double>(last - r.arrival_us) / 1e3;
      r.tpot = r.output_len > 1 ? static_cast<double>(last - first) / 1e3 / (r.output_len - 1) : 0;
      for (const Json& gap : m.value("itl_us", Json::array())) {
        r.itl.push_back(gap.get<double>() / 1e3);
      }
      if (m.contains("transfer") && m["transfer"].is_object()) {  // pull: decode's READs
        r.kv_ms = m["transfer"]["busy_us"].get<double>() / 1e3;
        r.kv_bytes = m["transfer"]["bytes"];
      }
      if (!r.correct) {
        std::fprintf(stderr, "kvferry_serve: request %lld: WRONG output (%llu bad KV rows)\n",
                     static_cast<long long>(r.id), static_cast<unsigned long long>(m["bad_rows"].get<uint64_t>()));
      }
    }
    CloseJobSide(id, /*prefill_side=*/false);
  } else if (type == "decode_failed") {
    if (j.current) {
      // After its prefill worker died, a failover; otherwise a retry.
      Requeue(id, /*retry=*/!j.awaiting_decode,
              j.awaiting_decode
                  ? absl::StrCat(pw.name, " died")
                  : absl::StrCat("decode on ", dw.name, ": ", m["error"].get<std::string>()));
      if (pw.alive && j.prefill_open) pw.channel->Send({{"type", "abort"}, {"job", id}});
    }
    CloseJobSide(id, /*prefill_side=*/false);
  }
}

void Router::Respawn(int wi) {
  WorkerProc& w = workers_[static_cast<size_t>(wi)];
  const absl::Time until = absl::Now() + absl::Seconds(30);
  int status = 0;
  while (waitpid(w.pid, &status, WNOHANG) != w.pid) {
    if (absl::Now() > until) {
      std::fprintf(stderr, "kvferry_serve: %s did not exit for its reset; killing it\n",
                   w.name.c_str());
      kill(w.pid, SIGKILL);
      waitpid(w.pid, &status, 0);
      break;
    }
    absl::SleepFor(absl::Milliseconds(5));
  }
  Json& r = resets_[static_cast<size_t>(w.reset)];
  r["exit_before"] = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  w.resetting = false;
  w.ready = false;
  w.connected = false;
  w.port = 0;
  w.metrics_port = 0;
  ++w.incarnation;
  if (absl::Status s = Spawn(w, /*leak=*/false); !s.ok()) {
    error_ = absl::StrCat(w.name, ": restarting it: ", s.ToString());
    w.alive = false;
    --resets_in_progress_;
    return;
  }
  r["pid_after"] = w.pid;
}

void Router::Rewire(int wi) {
  WorkerProc& w = workers_[static_cast<size_t>(wi)];
  if (w.role == "decode") {
    // Every prefill worker connects to the new incarnation (a newer
    // incarnation of a known name replaces the old connection), then the
    // new decode worker confirms it sees them.
    Json peer = Json::array({{{"name", w.name}, {"address", "127.0.0.1"}, {"port", w.port}}});
    w.pending_connects = 0;
    for (int i = 0; i < static_cast<int>(workers_.size()); ++i) {
      WorkerProc& p = workers_[static_cast<size_t>(i)];
      if (p.role != "prefill" || !p.alive) continue;
      p.channel->Send({{"type", "connect"}, {"peers", peer}});
      ++p.blocking;
      connecting_for_[i].push_back(wi);
      ++w.pending_connects;
    }
    if (w.pending_connects == 0) {
      w.channel->Send({{"type", "await"}, {"names", Json::array()}});
      ++w.blocking;
    }
  } else {
    // The new prefill incarnation connects to every decode worker.
    Json decodes = Json::array();
    for (const WorkerProc& d : workers_) {
      if (d.role == "decode" && d.alive && d.ready) {
        decodes.push_back({{"name", d.name}, {"address", "127.0.0.1"}, {"port", d.port}});
      }
    }
    w.channel->Send({{"type", "connect"}, {"peers", decodes}});
    ++w.blocking;
  }
}

void Router::BackInService(int wi) {
  WorkerProc& w = workers_[static_cast<size_t>(wi)];
  w.connected = true;
  w.draining = false;
  Json& r = resets_[static_cast<size_t>(w.reset)];
  r["back_ms"] = static_cast<double>(NowMicros() - r["drain_start_us"].get<int64_t>()) / 1e3;
  r["incarnation"] = w.incarnation;
  w.reset = -1;
  --resets_in_progress_;
  w.channel->Send({{"type", "serving"}});
  std::fprintf(stderr, "kvferry_serve: %s is back (incarnation %d, pid %d) after %.0f ms\n",
               w.name.c_str(), w.incarnation, static_cast<int>(w.pid), r["back_ms"].get<double>());
}

// A worker is gone (killed, or its channel closed): fail its requests over.
void Router::WorkerDied(int wi) {
  WorkerProc& w = workers_[static_cast<size_t>(wi)];
  if (!w.alive) return;
  w.alive = false;
  if (w.reset >= 0) {  // it died during its reset: the reset ends here
    resets_[static_cast<size_t>(w.reset)]["died"] = true;
    w.reset = -1;
    --resets_in_progress_;
  }
  if (!w.killed && !w.unresponsive) {
    std::fprintf(stderr, "kvferry_serve: %s exited unexpectedly; failing its requests over\n",
                 w.name.c_str());
  }
  std::vector<int64_t> ids;
  for (auto& [id, j] : jobs_) {
    if (j.prefill == wi || j.decode == wi) ids.push_back(id);
  }
  for (int64_t id : ids) {
    Job& j = jobs_[id];
    WorkerProc& decode = workers_[static_cast<size_t>(j.decode)];
    if (j.prefill == wi && j.current && j.decode_open && decode.alive) {
      // Decode may hold the whole KV already (its "done" may be on its way):
      // it answers the abort with "done" or "decode_failed", and only the
      // latter fails the request over. A dead decode worker's offers end on
      // prefill by themselves (kPeerFailed).
      j.awaiting_decode = true;
      decode.channel->Send({{"type", "abort"}, {"job", id}});
    } else {
      Requeue(id, /*retry=*/false, absl::StrCat(w.name, " died"));
    }
    CloseJobSide(id, /*prefill_side=*/j.prefill == wi);
  }
  // Its peers end what they still hold for it now, whether or not their
  // agent has noticed yet (otherwise an offer to it may wait for its ttl).
  for (WorkerProc& o : workers_) {
    if (o.alive && o.role != w.role) o.channel->Send({{"type", "peer_gone"}, {"name", w.name}});
  }
}

void Router::KillWorker(int wi) {
  WorkerProc& w = workers_[static_cast<size_t>(wi)];
  kill(w.pid, SIGKILL);
  // Reaped here, so that what it sent before it died is all in its channel
  // (a request it completed counts, and is not failed over).
  const absl::Time until = absl::Now() + absl::Seconds(10);
  while (!w.reaped && absl::Now() < until) {
    if (waitpid(w.pid, &w.wait_status, WNOHANG) == w.pid) {
      w.reaped = true;
    } else {
      absl::SleepFor(absl::Milliseconds(1));
    }
  }
  if (w.reaped) {
    for (const Json& m : w.channel->Read()) Handle(wi, m);
  }
  WorkerDied(wi);
}

void Router::MaybeKill() {
  for (const char* role : {"decode", "prefill"}) {
    const int after = std::string(role) == "decode" ? absl::GetFlag(FLAGS_kill_decode_after)
                                                    : absl::GetFlag(FLAGS_kill_prefill_after);
    if (after <= 0 || completed_ < after) continue;
    bool done = false;
    for (const WorkerProc& w : workers_) done |= w.role == role && w.killed;
    if (done) continue;
    // The busiest worker of that role, so that requests are in flight on it.
    int victim = -1;
    for (int i = 0; i < static_cast<int>(workers_.size()); ++i) {
      const WorkerProc& w = workers_[static_cast<size_t>(i)];
      if (w.role == role && w.alive && !w.draining &&
          (victim < 0 || w.jobs > workers_[static_cast<size_t>(victim)].jobs)) {
        victim = i;
      }
    }
    const bool more_to_come = completed_ + 1 < static_cast<int>(requests_.size());
    if (victim < 0 || (workers_[static_cast<size_t>(victim)].jobs == 0 && more_to_come)) continue;
    WorkerProc& w = workers_[static_cast<size_t>(victim)];
    std::fprintf(stderr, "\nkvferry_serve: killing %s (pid %d, %d requests in flight) with SIGKILL\n",
                 w.name.c_str(), static_cast<int>(w.pid), w.jobs);
    kills_.push_back(absl::StrCat(w.name, " after ", completed_, " completed, ", w.jobs,
                                  " in flight"));
    w.killed = true;
    KillWorker(victim);
  }
}

void Router::PrintProgress(bool final) {
  const int64_t now = NowMicros();
  if (!final && now - last_progress_us_ < 500000) return;
  last_progress_us_ = now;
  if (!absl::GetFlag(FLAGS_progress)) return;
  std::vector<double> ttft, q, p, t, d;
  for (const Request& r : requests_) {
    if (!r.done) continue;
    ttft.push_back(r.ttft), q.push_back(r.queue), p.push_back(r.prefill);
    t.push_back(r.transfer), d.push_back(r.decode_start);
  }
  int in_flight = 0;
  for (const auto& [id, j] : jobs_) {
    in_flight += j.current && !requests_[static_cast<size_t>(j.request)].done;
  }
  const double secs = first_dispatch_us_ ? static_cast<double>(now - first_dispatch_us_) / 1e6 : 0;
  const double gb = static_cast<double>(bytes_moved_) / 1e9;
  const std::string line = absl::StrFormat(
      "[%5.1fs] done %d/%zu  in flight %d  queued %zu  moved %.3f GB  %.3f GB/s  "
      "TTFT p50 %.1f p99 %.1f ms (p50: queue %.1f | prefill %.1f | transfer %.1f | decode %.1f)",
      secs, completed_, requests_.size(), in_flight, queue_.size(), gb, secs > 0 ? gb / secs : 0,
      Percentile(ttft, 0.5), Percentile(ttft, 0.99), Percentile(q, 0.5), Percentile(p, 0.5),
      Percentile(t, 0.5), Percentile(d, 0.5));
  if (isatty(STDERR_FILENO)) {
    std::fprintf(stderr, "\r\033[K%s%s", line.c_str(), final ? "\n" : "");
  } else {
    std::fprintf(stderr, "%s\n", line.c_str());
  }
}

void Router::Shutdown() {
  for (WorkerProc& w : workers_) {
    if (w.alive) w.channel->Send({{"type", "shutdown"}});
  }
  const absl::Time deadline = absl::Now() + absl::Seconds(120);
  while (absl::Now() < deadline) {
    bool pending = false;
    std::vector<pollfd> fds;
    std::vector<int> who;
    for (size_t i = 0; i < workers_.size(); ++i) {
      WorkerProc& w = workers_[i];
      if (!w.alive || w.channel->closed()) continue;
      pending = true;
      fds.push_back({w.channel->fd(), static_cast<short>(POLLIN | (w.channel->WantsWrite() ? POLLOUT : 0)), 0});
      who.push_back(static_cast<int>(i));
    }
    if (!pending) break;
    poll(fds.data(), fds.size(), 50);
    for (int i : who) {
      WorkerProc& w = workers_[static_cast<size_t>(i)];
      w.channel->Flush();
      for (const Json& m : w.channel->Read()) Handle(i, m);
    }
    CheckHeartbeats();
  }
  for (WorkerProc& w : workers_) {
    const absl::Time until = absl::Now() + absl::Seconds(30);
    while (!w.reaped) {
      if (waitpid(w.pid, &w.wait_status, WNOHANG) == w.pid) {
        w.reaped = true;
      } else if (absl::Now() > until) {
        std::fprintf(stderr, "kvferry_serve: %s did not exit; killing it\n", w.name.c_str());
        kill(w.pid, SIGKILL);
        waitpid(w.pid, &w.wait_status, 0);
        w.reaped = true;
      } else {
        absl::SleepFor(absl::Milliseconds(10));
      }
    }
  }
}

void Router::CheckHeartbeats() {
  const int64_t now = NowMicros();
  const int64_t limit = static_cast<int64_t>(absl::GetFlag(FLAGS_worker_timeout_s) * 1e6);
  for (int i = 0; i < static_cast<int>(workers_.size()); ++i) {
    WorkerProc& w = workers_[static_cast<size_t>(i)];
    // Not while it does what may block it for longer (connecting to its
    // peers, or stopping for a reset) or before it is ready.
    if (!w.alive || !w.ready || w.resetting || w.blocking > 0 || w.channel->closed() ||
        now - w.last_heard_us <= limit) {
      continue;
    }
    std::fprintf(stderr,
                 "\nkvferry_serve: %s (pid %d) sent nothing for %.1f s (--worker_timeout_s=%g); "
                 "killing it and failing its %d requests over\n",
                 w.name.c_str(), static_cast<int>(w.pid),
                 static_cast<double>(now - w.last_heard_us) / 1e6,
                 absl::GetFlag(FLAGS_worker_timeout_s), w.jobs);
    w.unresponsive = true;
    KillWorker(i);
  }
}

void Router::PollWorkers(int poll_ms) {
  std::vector<pollfd> fds;
  std::vector<int> who;
  for (size_t i = 0; i < workers_.size(); ++i) {
    WorkerProc& w = workers_[i];
    if (!w.alive) continue;
    fds.push_back({w.channel->fd(), static_cast<short>(POLLIN | (w.channel->WantsWrite() ? POLLOUT : 0)), 0});
    who.push_back(static_cast<int>(i));
  }
  poll(fds.data(), fds.size(), poll_ms);
  for (int i : who) {
    WorkerProc& w = workers_[static_cast<size_t>(i)];
    if (!w.alive) continue;
    w.channel->Flush();
    for (const Json& m : w.channel->Read()) Handle(i, m);
    if (w.channel->closed()) {
      if (w.resetting) {
        Respawn(i);  // the graceful reset: same name, next incarnation
      } else {
        WorkerDied(i);
      }
    }
  }
}

int Router::Run() {
  signal(SIGPIPE, SIG_IGN);
  layout_ = LayoutFromFlags();
  if (absl::Status s = layout_.Validate(); !s.ok()) {
    std::fprintf(stderr, "kvferry_serve: model shape: %s\n", s.ToString().c_str());
    return 2;
  }
  if (absl::Status s = MakeLoad(); !s.ok()) {
    std::fprintf(stderr, "kvferry_serve: %s\n", s.ToString().c_str());
    return 2;
  }
  for (auto [flag, after] : {std::pair{"kill_decode_after", absl::GetFlag(FLAGS_kill_decode_after)},
                             std::pair{"kill_prefill_after", absl::GetFlag(FLAGS_kill_prefill_after)}}) {
    if (after > 0 && after >= static_cast<int>(requests_.size())) {
      std::fprintf(stderr,
                   "kvferry_serve: --%s=%d would kill nothing: the run has only %zu requests "
                   "(it must be below that)\n",
                   flag, after, requests_.size());
      return 2;
    }
  }
  // Ctrl-C or SIGTERM ends the run with its summary (a second one ends it
  // at once). The workers ignore SIGINT: the router shuts them down.
  struct sigaction sa = {};
  sa.sa_handler = OnSignal;
  sa.sa_flags = SA_RESETHAND;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  start_us_ = NowMicros();
  absl::Status s = StartWorkers();
  if (s.ok()) s = Rendezvous();
  if (!s.ok()) {
    error_ = s.ToString();
    std::fprintf(stderr, "kvferry_serve: %s\n", error_.c_str());
  } else {
    const int64_t t0 = NowMicros();
    for (Request& r : requests_) r.arrival_us += t0;
    const int64_t give_up = t0 + static_cast<int64_t>(absl::GetFlag(FLAGS_timeout_s) * 1e6);
    // A reset under way finishes before the run does.
    while (completed_ + failed_ < static_cast<int>(requests_.size()) || resets_in_progress_ > 0) {
      const int64_t now = NowMicros();
      if (g_signal != 0) {
        signal_ = g_signal;
        error_ = absl::StrCat("interrupted by ", g_signal == SIGINT ? "SIGINT" : "SIGTERM",
                              " with ", completed_, " of ", requests_.size(), " requests done");
        std::fprintf(stderr, "\nkvferry_serve: %s; shutting the workers down\n", error_.c_str());
        break;
      }
      if (now > give_up) {
        error_ = absl::StrCat("timed out after --timeout_s=", absl::GetFlag(FLAGS_timeout_s),
                              " with ", completed_, " of ", requests_.size(), " requests done",
                              resets_in_progress_ > 0 ? " and a worker's reset under way" : "");
        break;
      }
      while (next_arrival_ < requests_.size() && requests_[next_arrival_].arrival_us <= now) {
        queue_.push_back(static_cast<int64_t>(next_arrival_++));
      }
      Dispatch();
      PollWorkers(2);
      CheckHeartbeats();
      MaybeKill();
      PrintProgress(false);
    }
    end_us_ = NowMicros();
    PrintProgress(true);
  }
  if (end_us_ == 0) end_us_ = NowMicros();
  Shutdown();
  const Json summary = Summary();
  if (absl::GetFlag(FLAGS_json)) {
    std::printf("%s\n", summary.dump().c_str());
  } else {
    PrintSummary(summary);
  }
  std::fflush(stdout);
  return summary["ok"].get<bool>() ? 0 : 1;
}

}  // namespace kvferry::serving
