// The initiator side of a kvferry-bench run (see bench_roles.h): posts the
// requests, waits for them, checks them under --verify, and measures.
#include <chrono>
#include <cstdio>
#include <deque>
#include <optional>
#include <random>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "bench/bench_agent.h"
#include "bench/bench_roles.h"
#include "bench/bench_util.h"
#include "bench/control_channel.h"

namespace kvferry::bench {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// The reply to a request of ours that starts with `prefix` (the channel
// carries nothing else). Dies when none comes.
std::string Expect(ControlChannel& ctl, const std::string& prefix) {
  std::optional<std::string> line = ctl.Receive(absl::Seconds(120));
  if (!line || !absl::StartsWith(*line, prefix)) {
    Die("control channel: expected " + prefix + ", got " + line.value_or("nothing"));
  }
  return line->substr(prefix.size());
}

struct Request {
  uint64_t id = 0;
  uint32_t first = 0, n = 0;
  BlockSet local;
  std::vector<uint32_t> remote_ids;
  std::vector<Transfer> transfers;
  Clock::time_point start;
};

class Initiator {
 public:
  Initiator(const BenchConfig& c, RunResult& r) : c_(c), r_(r), rng_(c.seed) {}

  // Moves requests over `side` until the request count or `stop_at` is reached.
  void RunSession(BenchAgent& side, ControlChannel& ctl, const std::string& peer,
                  Clock::time_point stop_at) {
    side_ = &side;
    ctl_ = &ctl;
    peer_ = peer;
    const Clock::time_point start = Clock::now();
    const double cpu = CpuSeconds();
    auto more = [&] {
      return c_.duration_s > 0 ? Clock::now() < stop_at
                               : started_ < static_cast<uint64_t>(c_.requests);
    };
    std::deque<Request> in_flight;
    while (true) {
      while (in_flight.size() < static_cast<size_t>(c_.concurrency) && more()) {
        in_flight.push_back(Start());
      }
      if (in_flight.empty()) break;
      Finish(in_flight.front());
      in_flight.pop_front();
      Tick();
    }
    r_.seconds += SecondsSince(start);
    r_.cpu_seconds += CpuSeconds() - cpu;
  }

  // One untimed pass over the whole ring before measuring: each process
  // maps its peer's pool on first use (page tables filled one fault per
  // page), which a serving engine pays once, not per request.
  void WarmUp(BenchAgent& side, ControlChannel& ctl, const std::string& peer) {
    side_ = &side;
    ctl_ = &ctl;
    peer_ = peer;
    recording_ = false;
    const Clock::time_point start = Clock::now();
    uint64_t blocks = 0;
    std::deque<Request> in_flight;
    while (blocks < c_.layout.num_blocks || !in_flight.empty()) {
      while (in_flight.size() < static_cast<size_t>(c_.concurrency) &&
             blocks < c_.layout.num_blocks) {
        in_flight.push_back(Start());
        blocks += in_flight.back().n;
      }
      Finish(in_flight.front());
      in_flight.pop_front();
    }
    r_.first_pass_seconds = SecondsSince(start);
    r_.first_pass_bytes = blocks * c_.layout.block_bytes();
    recording_ = true;
    started_ = 0;
  }

  void Begin() {
    run_start_ = Clock::now();
    last_sample_ = last_progress_ = run_start_;
    r_.rss_start = RssBytes();
    Sample();
  }
  void End() {
    Sample();
    r_.rss_end = RssBytes();
  }

 private:
  Request Start() {
    Request q;
    q.id = started_++;
    const uint32_t tokens = c_.prompt.Draw(rng_);
    q.n = (tokens + c_.layout.tokens_per_block - 1) / c_.layout.tokens_per_block;
    if (cursor_ + q.n > c_.layout.num_blocks) cursor_ = 0;
    q.first = cursor_;
    cursor_ += q.n;
    std::vector<uint32_t> ids(q.n);
    for (uint32_t i = 0; i < q.n; ++i) {
      ids[i] = q.first + i;
      q.remote_ids.push_back(c_.RemoteId(q.first + i));
    }
    auto leased = side_->pool().LeaseIds(ids);
    if (!leased.ok()) Die(absl::StrCat("LeaseIds: ", leased.status().ToString()));
    q.local = *std::move(leased);
    if (c_.verify && c_.op == TransferOp::kRead) ClearBlocks(q.local);
    q.start = Clock::now();
    std::string ticket;
    if (c_.offers) {
      ctl_->Send(absl::StrCat("OFFER ", q.id, " ", q.first, " ", q.n));
      std::vector<std::string> f =
          absl::StrSplit(Expect(*ctl_, absl::StrCat("TICKET ", q.id, " ")), ' ');
      ticket = absl::HexStringToBytes(f[0]);
    }
    TransferSpec spec;
    spec.op = c_.op;
    spec.peer = peer_;
    spec.local = &q.local;
    if (c_.offers) {
      spec.offer_ticket = ticket;
    } else {
      spec.remote_pool = "kv";
      spec.remote_blocks = q.remote_ids;
    }
    const uint32_t layers = c_.layout.num_layers;
    const uint32_t step = c_.per_layer ? 1 : layers;
    for (uint32_t l = 0; l < layers; l += step) {
      spec.layer_begin = l;
      spec.layer_end = l + step;
      if (l + step >= layers) spec.notification = absl::StrCat("req ", q.id);
      const Clock::time_point t0 = Clock::now();
      absl::StatusOr<Transfer> t = side_->agent().PostTransfer(spec);
      if (recording_) {
        r_.post_seconds += SecondsSince(t0);
        ++r_.post_calls;
        r_.descriptors += uint64_t{q.n} * step * c_.layout.num_planes();
      }
      if (!t.ok()) Die(absl::StrCat("PostTransfer: ", t.status().ToString()));
      q.transfers.push_back(*std::move(t));
    }
    return q;
  }

  void Finish(Request& q) {
    for (Transfer& t : q.transfers) {
      if (absl::Status st = t.Wait(absl::Seconds(120)); !st.ok()) {
        Die(absl::StrCat("transfer of request ", q.id, ": ", st.ToString()));
      }
    }
    const uint64_t bytes = uint64_t{q.n} * c_.layout.block_bytes();
    if (!recording_) {
      if (c_.offers) ctl_->Send(absl::StrCat("END ", q.id, " ", q.first, " ", q.n));
      q.transfers.clear();
      q.local.Reset();
      return;
    }
    if (c_.verify) {
      if (c_.op == TransferOp::kRead) {
        r_.verify_errors += CheckPattern(q.local, q.remote_ids, /*clear=*/false);
      } else {
        ctl_->Send(absl::StrCat("CHECK ", q.id, " ", q.first, " ", q.n));
        uint64_t bad = 0;
        if (!absl::SimpleAtoi(Expect(*ctl_, absl::StrCat("ACK ", q.id, " ")), &bad)) bad = 1;
        r_.verify_errors += bad;
      }
      r_.verified_bytes += bytes;
    } else if (c_.offers) {
      ctl_->Send(absl::StrCat("END ", q.id, " ", q.first, " ", q.n));
    }
    r_.latency_us.Add(SecondsSince(q.start) * 1e6);
    r_.bytes += bytes;
    ++r_.requests;
    q.transfers.clear();
    q.local.Reset();
  }

  void Sample() {
    const double t_min = SecondsSince(run_start_) / 60;
    const double mb = static_cast<double>(RssBytes()) / 1e6;
    // A soak's slope starts after its first sample period: UCX grows its
    // own buffers during the first seconds of traffic.
    const bool warming = c_.duration_s >= c_.sample_s && first_sample_;
    first_sample_ = false;
    if (!warming) {
      r_.rss_t_min.push_back(t_min);
      r_.rss_mb.push_back(mb);
    }
    if (c_.duration_s >= c_.sample_s && side_ != nullptr) {  // a soak
      const Stats live = side_->agent().GetStats();
      nlohmann::json s = {{"minutes", t_min}, {"rss_mb", mb}, {"requests", r_.requests},
                          {"live", StatsJson(live)}};
      std::fprintf(stderr, "[soak] %.2f min rss %.1f MB requests %llu live: %s\n", t_min, mb,
                   static_cast<unsigned long long>(r_.requests), live.ToString().c_str());
      r_.samples.push_back(std::move(s));
    }
  }

  void Tick() {
    const double period = c_.duration_s > 0 ? c_.sample_s : 1.0;
    if (SecondsSince(last_sample_) >= period) {
      last_sample_ = Clock::now();
      Sample();
    }
    if (c_.progress_s > 0 && SecondsSince(last_progress_) >= c_.progress_s) {
      last_progress_ = Clock::now();
      const double secs = SecondsSince(run_start_);
      std::fprintf(stderr, "[kvferry-bench] %.0f s: %llu requests, %.2f GB, %.2f GB/s, rss %.0f MB\n",
                   secs, static_cast<unsigned long long>(r_.requests),
                   static_cast<double>(r_.bytes) / 1e9,
                   static_cast<double>(r_.bytes) / 1e9 / std::max(r_.seconds, secs),
                   static_cast<double>(RssBytes()) / 1e6);
    }
  }

  const BenchConfig& c_;
  RunResult& r_;
  std::mt19937_64 rng_;
  uint32_t cursor_ = 0;
  uint64_t started_ = 0;
  bool recording_ = true;
  bool first_sample_ = true;
  BenchAgent* side_ = nullptr;
  ControlChannel* ctl_ = nullptr;
  std::string peer_;
  Clock::time_point run_start_, last_sample_, last_progress_;
};

}  // namespace

RunResult RunInitiator(const BenchConfig& c,
                       const std::function<void(uint16_t, uint16_t)>& on_listening) {
  RunResult r;
  Initiator run(c, r);
  const std::string role = c.InitiatorRole();
  const std::string peer = role == "decode" ? "bench-prefill" : "bench-decode";
  std::optional<ControlListener> listener;
  // --duration counts from the first session's first request (pools filled,
  // peer connected).
  Clock::time_point stop_at;
  bool begun = false;
  while (true) {
    BenchAgent side(c, "bench-" + role);
    if (r.sessions == 0) r.pool_seconds = side.pool_seconds();
    ControlChannel ctl;
    if (role == "prefill") {
      auto port = side.agent().Listen(c.listen_address, c.port);
      if (!port.ok()) Die(absl::StrCat("Listen: ", port.status().ToString()));
      listener.emplace(c.listen_address, c.control_port);
      std::fprintf(stderr, "READY %u %u\n", *port, listener->port());
      if (on_listening) on_listening(*port, listener->port());
      ctl = listener->Accept(absl::Seconds(120));
      if (!ctl.ok()) Die("no control connection within 120 s");
      Expect(ctl, "HELLO");
      auto info = side.agent().WaitForPeer(peer, absl::Seconds(60));
      if (!info.ok()) Die(absl::StrCat("WaitForPeer: ", info.status().ToString()));
    } else {
      const std::vector<std::string> hp = absl::StrSplit(c.peer_address, ':');
      uint32_t port = 0;
      if (hp.size() != 2 || !absl::SimpleAtoi(hp[1], &port)) Die("bad --peer " + c.peer_address);
      ctl = ControlChannel::Connect(hp[0], c.control_port, absl::Seconds(60));
      Expect(ctl, "HELLO");
      auto info = side.agent().Connect(hp[0], static_cast<uint16_t>(port), absl::Seconds(30));
      if (!info.ok()) Die(absl::StrCat("Connect: ", info.status().ToString()));
    }
    auto info = side.agent().GetPeer(peer);
    if (info.ok()) r.data_path = info->data_path;
    if (!begun) {
      if (c.warmup) run.WarmUp(side, ctl, peer);
      run.Begin();
      begun = true;
      stop_at = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                   std::chrono::duration<double>(c.duration_s));
    }
    ++r.sessions;
    Clock::time_point session_end = stop_at;
    if (c.churn_s > 0) {
      session_end = std::min(stop_at, Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                                          std::chrono::duration<double>(c.churn_s)));
    }
    run.RunSession(side, ctl, peer, session_end);
    const bool again = c.churn_s > 0 && Clock::now() < stop_at;
    if (!again) run.End();  // before the peer's pool is unmapped (RSS)
    // A transfer's state is released by the agent a moment after Wait
    // returns: allow a second for the counters to settle.
    const absl::Time settle = absl::Now() + absl::Seconds(1);
    do {
      r.live_end = side.agent().GetStats();
    } while (!TransientCountersZero(r.live_end) && absl::Now() < settle &&
             (absl::SleepFor(absl::Milliseconds(1)), true));
    if (!TransientCountersZero(r.live_end)) {
      r.failures.push_back("live counters not back to zero: " + r.live_end.ToString());
    }
    ctl.Send("DONE");
    r.passive = nlohmann::json::parse(Expect(ctl, "STATS "));
    if (absl::Status st = side.agent().Disconnect(peer); !st.ok()) {
      r.failures.push_back("Disconnect: " + st.ToString());
    }
    ctl.Send("BYE");
    r.passive = nlohmann::json::parse(Expect(ctl, "RESTORED "));
    if (!r.passive.value("baseline_restored", false)) {
      r.failures.push_back("the " + r.passive.value("role", std::string("peer")) +
                           " side's counters did not return to baseline: " +
                           r.passive["live_end"].dump());
    }
    if (!again) {
      ctl.Send("QUIT");
      break;
    }
  }
  if (r.verify_errors > 0 || r.passive.value("verify_errors", 0) > 0) {
    r.failures.push_back("verify: chunks differ from the sender's pattern");
  }
  const double slope = Slope(r.rss_t_min, r.rss_mb);
  if (c.max_rss_slope_mb_per_min > 0 && slope > c.max_rss_slope_mb_per_min) {
    r.failures.push_back(absl::StrCat("RSS slope ", slope, " MB/min > --max_rss_slope_mb_per_min=",
                                      c.max_rss_slope_mb_per_min));
  }
  return r;
}

}  // namespace kvferry::bench
