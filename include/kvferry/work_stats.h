// WorkStats: what an agent has done since it was created — transfers and
// their bytes and times, offers, peers, notifications — and what it is
// doing at the instant of the report (transfers in flight, peers by state).
// Part of the MemoryReport (MemoryReport::work) and of its Prometheus text;
// the metric names are listed in docs/operations.md. Counters only grow.
// A plain value.
#ifndef KVFERRY_WORK_STATS_H_
#define KVFERRY_WORK_STATS_H_

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace kvferry {

struct WorkStats {
  // Upper bounds (seconds) of the transfer-duration histogram's buckets,
  // from 50 us (a small shm-direct copy) to 10 s; +Inf is implied.
  static constexpr std::array<double, 16> kDurationBuckets = {
      0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
      0.025,   0.05,   0.1,     0.25,   0.5,   1,      2.5,   10};

  // Ended transfers by peer, operation ("read", "write"), the peer's data
  // path (PeerInfo::data_path; empty if it never had one) and outcome
  // ("done", "failed", "cancelled"). `bytes` counts the bytes of done
  // transfers only (the sum of their copies: blocks x layers x chunk bytes
  // x planes).
  struct Transfers {
    std::string peer, op, data_path, outcome;
    uint64_t count = 0;
    uint64_t bytes = 0;
  };
  std::vector<Transfers> transfers;
  // Failed transfers by peer, operation and status code
  // (absl::StatusCodeToString, e.g. "UNAVAILABLE").
  struct Failures {
    std::string peer, op, code;
    uint64_t count = 0;
  };
  std::vector<Failures> failures;
  // Time from PostTransfer to the end of every ended transfer, by operation
  // and data path. buckets[i] counts those that took at most
  // kDurationBuckets[i] and more than the bound before (not cumulative);
  // the last element counts those over every bound.
  struct Durations {
    std::string op, data_path;
    std::array<uint64_t, kDurationBuckets.size() + 1> buckets{};
    uint64_t count = 0;
    double sum_seconds = 0;
  };
  std::vector<Durations> durations;

  // Offers this agent made that ended, by outcome (OfferStateName:
  // "consumed", "peer-failed", "expired", "revoked", "released").
  uint64_t offers_consumed = 0;
  uint64_t offers_peer_failed = 0;
  uint64_t offers_expired = 0;
  uint64_t offers_revoked = 0;
  uint64_t offers_released = 0;

  // Peers that completed the handshake; of those, the ones that ended
  // failed (timeout, error, restart) or closed (Disconnect, goodbye,
  // shutdown); and connections that ended before the handshake completed.
  uint64_t peers_connected_total = 0;
  uint64_t peers_failed_total = 0;
  uint64_t peers_closed_total = 0;
  uint64_t handshakes_failed_total = 0;

  // Notifications received from peers, and their payload bytes.
  uint64_t notifications_received = 0;
  uint64_t notification_bytes_received = 0;

  // At the instant of the report.
  uint64_t transfers_in_flight = 0;
  double oldest_in_flight_seconds = 0;  // 0 when none is in flight
  uint64_t offers_open = 0;
  uint64_t peers_handshaking = 0;
  uint64_t peers_connected = 0;
  // Each connected peer and its data path.
  struct PeerPath {
    std::string peer, data_path;
  };
  std::vector<PeerPath> peer_paths;

  // Prometheus text exposition lines (HELP, TYPE, samples), every sample
  // labelled agent="<agent>".
  std::string ToPrometheus(const std::string& agent) const;
};

}  // namespace kvferry

#endif  // KVFERRY_WORK_STATS_H_
