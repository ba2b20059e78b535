// The passive side of a kvferry-bench run (see bench_roles.h).
#include <cstdio>
#include <functional>
#include <map>
#include <optional>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bench/bench_agent.h"
#include "bench/bench_roles.h"
#include "bench/bench_util.h"
#include "bench/control_channel.h"

namespace kvferry::bench {
namespace {

struct Lent {
  BlockSet blocks;
  kvferry::Offer offer;
};

std::vector<uint32_t> Ids(uint32_t first, uint32_t n) {
  std::vector<uint32_t> ids(n);
  for (uint32_t i = 0; i < n; ++i) ids[i] = first + i;
  return ids;
}

// Leases `ids`, retrying while an ended offer still holds them (its blocks go
// back once the peer's acknowledgement arrives).
BlockSet LeaseRetrying(KvPool& pool, const std::vector<uint32_t>& ids) {
  for (int attempt = 0;; ++attempt) {
    auto leased = pool.LeaseIds(ids);
    if (leased.ok()) return *std::move(leased);
    if (attempt > 60000) Die(absl::StrCat("LeaseIds (60 s): ", leased.status().ToString()));
    absl::SleepFor(absl::Milliseconds(1));
  }
}

// Waits up to 10 s for the live counters to equal `baseline` (the peer's
// disconnect is processed on the progress thread).
bool WaitForBaseline(Agent& agent, const Stats& baseline) {
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (agent.GetStats() != baseline) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(5));
  }
  return true;
}

struct Totals {
  uint64_t verified = 0, errors = 0, notifications = 0, sessions = 0, restored = 0,
           not_restored = 0;
};

// Serves one control channel until QUIT (returns true) or until it closes
// (returns false).
bool Serve(const BenchConfig& config, BenchAgent& side, ControlChannel& ctl,
           const std::string& peer, const Stats& baseline, Totals* t,
           const std::function<nlohmann::json()>& report) {
  std::map<uint64_t, Lent> lent;
  while (true) {
    t->notifications += side.agent().PollNotifications().size();
    std::optional<std::string> line = ctl.Receive(absl::Milliseconds(2));
    if (!line) {
      if (!ctl.ok()) return false;
      continue;
    }
    std::vector<std::string> f = absl::StrSplit(*line, ' ');
    uint64_t id = 0;
    uint32_t first = 0, n = 0;
    if (f.size() >= 4) {
      if (!absl::SimpleAtoi(f[1], &id) || !absl::SimpleAtoi(f[2], &first) ||
          !absl::SimpleAtoi(f[3], &n)) {
        Die("bad control line: " + *line);
      }
    }
    std::vector<uint32_t> local = Ids(first, n);  // the initiator's ids
    std::vector<uint32_t> mine;
    for (uint32_t b : local) mine.push_back(config.RemoteId(b));
    if (f[0] == "OFFER") {
      Lent entry{LeaseRetrying(side.pool(), mine), {}};
      auto offer = side.agent().Offer(entry.blocks, peer, absl::Seconds(120));
      if (!offer.ok()) Die(absl::StrCat("Offer: ", offer.status().ToString()));
      ctl.Send(absl::StrCat("TICKET ", id, " ", absl::BytesToHexString(offer->ticket())));
      entry.offer = *std::move(offer);
      lent.emplace(id, std::move(entry));
    } else if (f[0] == "CHECK") {
      // WRITE --verify: the initiator's transfers of request `id` are done.
      uint64_t bad = 0;
      auto it = lent.find(id);
      if (it != lent.end()) {
        bad = CheckPattern(it->second.blocks, local, /*clear=*/true);
        lent.erase(it);
      } else {
        BlockSet blocks = LeaseRetrying(side.pool(), mine);
        bad = CheckPattern(blocks, local, /*clear=*/true);
      }
      t->verified += uint64_t{n} * config.layout.block_bytes();
      t->errors += bad;
      ctl.Send(absl::StrCat("ACK ", id, " ", bad));
    } else if (f[0] == "END") {
      lent.erase(id);
    } else if (f[0] == "DONE") {
      lent.clear();
      ctl.Send("STATS " + report().dump());
    } else if (f[0] == "BYE") {
      // The initiator disconnected its agent: every counter must come back.
      const bool ok = WaitForBaseline(side.agent(), baseline);
      ++(ok ? t->restored : t->not_restored);
      nlohmann::json r = report();
      r["baseline_restored"] = ok;
      ctl.Send("RESTORED " + r.dump());
    } else if (f[0] == "QUIT") {
      return true;
    } else {
      Die("unknown control line: " + *line);
    }
  }
}

}  // namespace

int RunPassive(const BenchConfig& config, const std::string& role) {
  const uint64_t rss_start = RssBytes();
  BenchAgent side(config, "bench-" + role);
  const std::string peer = role == "prefill" ? "bench-decode" : "bench-prefill";
  std::optional<ControlListener> listener;
  ControlChannel ctl;
  Stats baseline;  // before any peer: every counter comes back to it on BYE
  if (role == "prefill") {
    auto port = side.agent().Listen(config.listen_address, config.port);
    if (!port.ok()) Die(absl::StrCat("Listen: ", port.status().ToString()));
    listener.emplace(config.listen_address, config.control_port);
    baseline = side.agent().GetStats();
    std::printf("READY %u %u\n", *port, listener->port());
    std::fflush(stdout);
  } else {
    const std::vector<std::string> hp = absl::StrSplit(config.peer_address, ':');
    uint32_t port = 0;
    if (hp.size() != 2 || !absl::SimpleAtoi(hp[1], &port)) Die("bad --peer " + config.peer_address);
    baseline = side.agent().GetStats();
    auto info = side.agent().Connect(hp[0], static_cast<uint16_t>(port), absl::Seconds(30));
    if (!info.ok()) Die(absl::StrCat("Connect: ", info.status().ToString()));
    ctl = ControlChannel::Connect(hp[0], config.control_port, absl::Seconds(30));
  }
  Totals t;
  const double cpu_start = CpuSeconds();
  auto report = [&]() -> nlohmann::json {
    const Stats live = side.agent().GetStats();
    return {{"role", role},
            {"data_path", ""},
            {"sessions", t.sessions},
            {"verified_bytes", t.verified},
            {"verify_errors", t.errors},
            {"notifications", t.notifications},
            {"cpu_seconds", CpuSeconds() - cpu_start},
            {"rss_start_bytes", rss_start},
            {"rss_end_bytes", RssBytes()},
            {"baseline_restored_sessions", t.restored},
            {"baseline_not_restored_sessions", t.not_restored},
            {"live_end", StatsJson(live)},
            {"live_baseline", StatsJson(baseline)},
            {"transient_counters_zero", TransientCountersZero(live)}};
  };
  while (true) {
    if (listener) {
      ctl = listener->Accept(absl::Seconds(120));
      if (!ctl.ok()) Die("no control connection within 120 s");
    }
    ctl.Send("HELLO");
    ++t.sessions;
    if (Serve(config, side, ctl, peer, baseline, &t, report)) break;
    if (!listener) break;  // the connecting side lost its channel
  }
  side.Reset();
  return t.errors == 0 && t.not_restored == 0 ? 0 : 1;
}

}  // namespace kvferry::bench
