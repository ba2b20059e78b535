// ControlChannel: the bench's own line-based TCP side channel between its two
// processes (an engine's router plays this part): start and end of a run,
// per-request acknowledgements under --verify, offer tickets, and the
// passive side's figures. Blocking, one thread per channel; move-only.
#ifndef KVFERRY_BENCH_CONTROL_CHANNEL_H_
#define KVFERRY_BENCH_CONTROL_CHANNEL_H_

#include <cstdint>
#include <optional>
#include <string>

#include "absl/time/time.h"

namespace kvferry::bench {

class ControlChannel {
 public:
  ControlChannel() = default;
  explicit ControlChannel(int fd) : fd_(fd) {}
  ~ControlChannel();
  ControlChannel(ControlChannel&& o) noexcept;
  ControlChannel& operator=(ControlChannel&& o) noexcept;
  ControlChannel(const ControlChannel&) = delete;
  ControlChannel& operator=(const ControlChannel&) = delete;

  // Connects to address:port, retrying until `timeout`. Dies on failure.
  static ControlChannel Connect(const std::string& address, uint16_t port, absl::Duration timeout);

  bool ok() const { return fd_ >= 0; }
  // Sends one line (a '\n' is appended). False when the peer is gone.
  bool Send(const std::string& line);
  // The next line, nullopt after `timeout` or when the peer closed (then
  // ok() is false).
  std::optional<std::string> Receive(absl::Duration timeout);

 private:
  int fd_ = -1;
  std::string buffer_;
};

// A listening socket for control channels.
class ControlListener {
 public:
  // Listens on address:port (0 picks one). Dies on failure.
  ControlListener(const std::string& address, uint16_t port);
  ~ControlListener();
  ControlListener(const ControlListener&) = delete;
  ControlListener& operator=(const ControlListener&) = delete;
  uint16_t port() const { return port_; }
  // The next connection; an empty channel after `timeout`.
  ControlChannel Accept(absl::Duration timeout);

 private:
  int fd_ = -1;
  uint16_t port_ = 0;
};

}  // namespace kvferry::bench

#endif  // KVFERRY_BENCH_CONTROL_CHANNEL_H_
