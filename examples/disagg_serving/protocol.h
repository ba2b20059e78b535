// The router's channel to each worker: length-prefixed JSON messages over a
// stream socket (a socketpair made before fork). Every message has a "type".
// Binary fields (offer tickets) travel base64-encoded.
//
// Writes are buffered and never block: Send queues, Flush writes what the
// socket takes, and the owner's poll loop asks for POLLOUT while WantsWrite.
// Thread-compatible: one thread owns a Channel.
#ifndef KVFERRY_EXAMPLES_DISAGG_SERVING_PROTOCOL_H_
#define KVFERRY_EXAMPLES_DISAGG_SERVING_PROTOCOL_H_

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace kvferry::serving {

using Json = nlohmann::json;

class Channel {
 public:
  Channel() = default;
  explicit Channel(int fd);  // takes ownership; makes it non-blocking
  ~Channel();
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;

  int fd() const { return fd_; }
  bool closed() const { return closed_; }
  // Queues `message` and writes what the socket takes now.
  void Send(const Json& message);
  // Writes queued bytes; false once the peer is gone.
  bool Flush();
  bool WantsWrite() const { return !out_.empty() && !closed_; }
  // Reads what is available and returns the complete messages. Sets
  // closed() at EOF or error (messages read before it are still returned).
  std::vector<Json> Read();
  // Waits up to `timeout` for messages (flushing meanwhile).
  std::vector<Json> Wait(absl::Duration timeout);
  // Sends everything queued, waiting up to `timeout`.
  void Drain(absl::Duration timeout);

 private:
  int fd_ = -1;
  bool closed_ = false;
  std::string in_;
  std::string out_;
};

inline int64_t NowMicros() { return absl::ToUnixMicros(absl::Now()); }

}  // namespace kvferry::serving

#endif  // KVFERRY_EXAMPLES_DISAGG_SERVING_PROTOCOL_H_
