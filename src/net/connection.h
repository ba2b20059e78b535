// Connection: one control-plane TCP connection with kvferry's framing
// (src/wire/message.h: a 12-byte header that announces the body length).
// Reading splits the byte stream into whole frames and refuses a header that
// is not kvferry's or announces more than wire::kMaxMessageBytes, before
// buffering the body; writing queues frames and sends what the socket takes.
//
// Non-blocking throughout; the owner polls fd() (POLLIN, and POLLOUT while
// wants_write()). Thread-compatible.
#ifndef KVFERRY_SRC_NET_CONNECTION_H_
#define KVFERRY_SRC_NET_CONNECTION_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "src/net/socket.h"

namespace kvferry::internal {

class Connection {
 public:
  // Output a peer leaves unread beyond this fails the connection.
  static constexpr size_t kMaxQueuedBytes = 64u << 20;

  Connection(Fd fd, std::string remote) : fd_(std::move(fd)), remote_(std::move(remote)) {}
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  int fd() const { return fd_.get(); }
  // The remote address, "host:port".
  const std::string& remote() const { return remote_; }
  bool open() const { return fd_.valid(); }
  // Frames larger than this are refused at their header (before the body is
  // buffered). Default wire::kMaxMessageBytes; smaller before a peer has
  // authenticated.
  void set_max_frame(size_t bytes) { max_frame_ = bytes; }

  // Appends complete frames to `frames`, at most `max_frames` of them:
  // those already buffered first, then what the socket holds (at most
  // `budget` bytes more). It reads from the socket only while no complete
  // frame is buffered beyond those taken, so the buffer holds at most one
  // frame and one read. kUnavailable when the peer closed or reset the
  // connection (frames read before that are still appended);
  // kInvalidArgument for a header that is not a kvferry frame.
  absl::Status Read(std::vector<std::string>* frames, size_t budget = 4u << 20,
                    size_t max_frames = SIZE_MAX);
  // Queues one encoded frame and tries to send. A send error shows on the
  // next Flush (or Read).
  void Queue(std::string frame);
  // Sends queued bytes until the socket would block. kUnavailable on a
  // broken connection, kResourceExhausted past kMaxQueuedBytes.
  absl::Status Flush();
  bool wants_write() const { return out_offset_ < out_.size(); }
  // The first end of the connection Read or Flush found was the remote end
  // closing (FIN) or resetting it once established, not a refused or failed
  // connect (whose error comes first). Kept after Close.
  bool closed_by_peer() const { return closed_by_peer_; }
  // The remote end has shut down its side (its FIN or a reset is waiting
  // behind whatever is still unread). Consumes nothing.
  bool RemoteHungUp() const;
  // Bytes queued that the socket has not taken yet.
  size_t queued_bytes() const { return out_.size() - out_offset_; }
  size_t buffered_input() const { return in_.size() - in_offset_; }
  // Closes the socket (queued bytes the kernel has not taken are lost).
  void Close() { fd_.Reset(); }

 private:
  // Records the first way the connection ended.
  void NoteEnd(bool by_peer) {
    if (!ended_) closed_by_peer_ = by_peer;
    ended_ = true;
  }

  Fd fd_;
  const std::string remote_;
  size_t max_frame_ = 1u << 20;
  std::string in_;
  size_t in_offset_ = 0;  // in_ before this was taken as frames
  std::string out_;
  size_t out_offset_ = 0;
  bool ended_ = false;  // Read or Flush found the connection ended
  bool closed_by_peer_ = false;
};

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_NET_CONNECTION_H_
