// WorkMetrics (the counting) and WorkStats::ToPrometheus (the rendering).
#include "src/work_metrics.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "src/prometheus_text.h"
#include "absl/strings/str_format.h"

namespace kvferry {
namespace {

const char* OpName(TransferOp op) { return op == TransferOp::kRead ? "read" : "write"; }

const char* OutcomeName(TransferState state) {
  if (state == TransferState::kDone) return "done";
  if (state == TransferState::kFailed) return "failed";
  if (state == TransferState::kCancelled) return "cancelled";
  return "other";  // not an end state; not passed by the agent
}

std::string Esc(absl::string_view v) { return internal::PrometheusLabelValue(v); }

void Header(std::string* out, const char* name, const char* type, const char* help) {
  absl::StrAppend(out, "# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n");
}

}  // namespace

std::string WorkStats::ToPrometheus(const std::string& agent) const {
  std::string out;
  const std::string a = absl::StrCat("agent=\"", Esc(agent), "\"");
  Header(&out, "kvferry_transfers_total", "counter",
         "Ended transfers by peer, operation, data path and outcome.");
  for (const Transfers& t : transfers) {
    absl::StrAppend(&out, "kvferry_transfers_total{", a, ",peer=\"", Esc(t.peer), "\",op=\"",
                    t.op, "\",data_path=\"", Esc(t.data_path), "\",outcome=\"", t.outcome,
                    "\"} ", t.count, "\n");
  }
  Header(&out, "kvferry_transferred_bytes_total", "counter",
         "Bytes moved by transfers that completed, by peer, operation and data path.");
  for (const Transfers& t : transfers) {
    if (t.outcome != "done") continue;
    absl::StrAppend(&out, "kvferry_transferred_bytes_total{", a, ",peer=\"", Esc(t.peer),
                    "\",op=\"", t.op, "\",data_path=\"", Esc(t.data_path), "\"} ", t.bytes,
                    "\n");
  }
  Header(&out, "kvferry_transfer_failures_total", "counter",
         "Failed transfers by peer, operation and status code.");
  for (const Failures& f : failures) {
    absl::StrAppend(&out, "kvferry_transfer_failures_total{", a, ",peer=\"", Esc(f.peer),
                    "\",op=\"", f.op, "\",code=\"", f.code, "\"} ", f.count, "\n");
  }
  Header(&out, "kvferry_transfer_duration_seconds", "histogram",
         "Time from posting to the end of each ended transfer.");
  for (const Durations& d : durations) {
    const std::string labels =
        absl::StrCat(a, ",op=\"", d.op, "\",data_path=\"", Esc(d.data_path), "\"");
    uint64_t cumulative = 0;
    for (size_t i = 0; i < kDurationBuckets.size(); ++i) {
      cumulative += d.buckets[i];
      absl::StrAppend(&out, "kvferry_transfer_duration_seconds_bucket{", labels, ",le=\"",
                      kDurationBuckets[i], "\"} ", cumulative, "\n");
    }
    absl::StrAppend(&out, "kvferry_transfer_duration_seconds_bucket{", labels,
                    ",le=\"+Inf\"} ", d.count, "\n");
    absl::StrAppend(&out, "kvferry_transfer_duration_seconds_sum{", labels, "} ",
                    absl::StrFormat("%.9g", d.sum_seconds), "\n");
    absl::StrAppend(&out, "kvferry_transfer_duration_seconds_count{", labels, "} ", d.count,
                    "\n");
  }
  Header(&out, "kvferry_transfers_in_flight", "gauge", "Transfers posted and not yet ended.");
  absl::StrAppend(&out, "kvferry_transfers_in_flight{", a, "} ", transfers_in_flight, "\n");
  Header(&out, "kvferry_transfer_oldest_in_flight_seconds", "gauge",
         "Age of the oldest transfer in flight (0 when none is).");
  absl::StrAppend(&out, "kvferry_transfer_oldest_in_flight_seconds{", a, "} ",
                  absl::StrFormat("%.6f", oldest_in_flight_seconds), "\n");

  Header(&out, "kvferry_offers_ended_total", "counter",
         "Offers this agent made that ended, by outcome.");
  const std::pair<const char*, uint64_t> offers[] = {{"consumed", offers_consumed},
                                                     {"peer-failed", offers_peer_failed},
                                                     {"expired", offers_expired},
                                                     {"revoked", offers_revoked},
                                                     {"released", offers_released}};
  for (const auto& [outcome, n] : offers) {
    absl::StrAppend(&out, "kvferry_offers_ended_total{", a, ",outcome=\"", outcome, "\"} ", n,
                    "\n");
  }
  Header(&out, "kvferry_offers_open", "gauge", "Offers this agent made that stand.");
  absl::StrAppend(&out, "kvferry_offers_open{", a, "} ", offers_open, "\n");

  Header(&out, "kvferry_peers", "gauge", "Peers with a live connection, by state.");
  absl::StrAppend(&out, "kvferry_peers{", a, ",state=\"handshaking\"} ", peers_handshaking,
                  "\n");
  absl::StrAppend(&out, "kvferry_peers{", a, ",state=\"connected\"} ", peers_connected, "\n");
  Header(&out, "kvferry_peer_info", "gauge",
         "Each connected peer and its data path (value is always 1).");
  for (const PeerPath& p : peer_paths) {
    absl::StrAppend(&out, "kvferry_peer_info{", a, ",peer=\"", Esc(p.peer), "\",data_path=\"",
                    Esc(p.data_path), "\"} 1\n");
  }
  Header(&out, "kvferry_peers_connected_total", "counter", "Peers that completed the handshake.");
  absl::StrAppend(&out, "kvferry_peers_connected_total{", a, "} ", peers_connected_total, "\n");
  Header(&out, "kvferry_peers_ended_total", "counter",
         "Connected peers that ended: failed (timeout, error, restart) or closed.");
  absl::StrAppend(&out, "kvferry_peers_ended_total{", a, ",state=\"failed\"} ",
                  peers_failed_total, "\n");
  absl::StrAppend(&out, "kvferry_peers_ended_total{", a, ",state=\"closed\"} ",
                  peers_closed_total, "\n");
  Header(&out, "kvferry_handshakes_failed_total", "counter",
         "Connections that ended before their handshake completed.");
  absl::StrAppend(&out, "kvferry_handshakes_failed_total{", a, "} ", handshakes_failed_total,
                  "\n");

  Header(&out, "kvferry_notifications_received_total", "counter",
         "Notifications received from peers.");
  absl::StrAppend(&out, "kvferry_notifications_received_total{", a, "} ",
                  notifications_received, "\n");
  Header(&out, "kvferry_notification_received_bytes_total", "counter",
         "Payload bytes of the notifications received from peers.");
  absl::StrAppend(&out, "kvferry_notification_received_bytes_total{", a, "} ",
                  notification_bytes_received, "\n");
  return out;
}

namespace internal {

WorkMetrics::Tag WorkMetrics::Begin(TransferOp op, std::span<const CopyOp> copies) {
  Tag tag;
  tag.op = op;
  for (const CopyOp& c : copies) tag.bytes += c.bytes;
  tag.started = absl::Now();
  return tag;
}

void WorkMetrics::TransferEnded(const std::string& peer, const std::string& data_path,
                                const Tag& tag, TransferState state,
                                const absl::Status& status) {
  const double seconds = std::max(0.0, absl::ToDoubleSeconds(absl::Now() - tag.started));
  const std::string op = OpName(tag.op);
  const std::string outcome = OutcomeName(state);
  internal::MutexLock l(&mu_);
  WorkStats::Transfers& t = transfers_[TransferKey{peer, op, data_path, outcome}];
  if (t.count == 0) t = WorkStats::Transfers{peer, op, data_path, outcome};
  ++t.count;
  if (state == TransferState::kDone) t.bytes += tag.bytes;
  if (state == TransferState::kFailed) {
    ++failures_[FailureKey{peer, op, absl::StatusCodeToString(status.code())}];
  }
  WorkStats::Durations& d = durations_[DurationKey{op, data_path}];
  if (d.count == 0) {
    d.op = op;
    d.data_path = data_path;
  }
  const auto& bounds = WorkStats::kDurationBuckets;
  const size_t bucket = static_cast<size_t>(
      std::lower_bound(bounds.begin(), bounds.end(), seconds) - bounds.begin());
  ++d.buckets[bucket];
  ++d.count;
  d.sum_seconds += seconds;
}

void WorkMetrics::OfferEnded(OfferState state) {
  internal::MutexLock l(&mu_);
  switch (state) {
    case OfferState::kConsumed:
      ++totals_.offers_consumed;
      break;
    case OfferState::kPeerFailed:
      ++totals_.offers_peer_failed;
      break;
    case OfferState::kExpired:
      ++totals_.offers_expired;
      break;
    case OfferState::kRevoked:
      ++totals_.offers_revoked;
      break;
    case OfferState::kReleased:
      ++totals_.offers_released;
      break;
    case OfferState::kEmpty:
    case OfferState::kOpen:
      break;
  }
}

void WorkMetrics::PeerConnected() {
  internal::MutexLock l(&mu_);
  ++totals_.peers_connected_total;
}

void WorkMetrics::PeerEnded(PeerState was, PeerState now) {
  internal::MutexLock l(&mu_);
  if (was != PeerState::kConnected) {
    ++totals_.handshakes_failed_total;
  } else if (now == PeerState::kFailed) {
    ++totals_.peers_failed_total;
  } else {
    ++totals_.peers_closed_total;
  }
}

void WorkMetrics::NotificationReceived(uint64_t payload_bytes) {
  internal::MutexLock l(&mu_);
  ++totals_.notifications_received;
  totals_.notification_bytes_received += payload_bytes;
}

WorkStats WorkMetrics::Snapshot() const {
  internal::MutexLock l(&mu_);
  WorkStats s = totals_;
  for (const auto& [key, t] : transfers_) s.transfers.push_back(t);
  for (const auto& [key, n] : failures_) {
    s.failures.push_back(
        WorkStats::Failures{std::get<0>(key), std::get<1>(key), std::get<2>(key), n});
  }
  for (const auto& [key, d] : durations_) s.durations.push_back(d);
  return s;
}

}  // namespace internal
}  // namespace kvferry
