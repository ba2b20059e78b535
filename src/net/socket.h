// kvferry's control plane runs on plain TCP sockets of its own (not UCX's
// sockaddr listener, which aborts the process on malformed input). This file
// holds the small pieces: an owning file descriptor, address parsing, and the
// non-blocking listen / connect / accept calls. Thread-compatible.
#ifndef KVFERRY_SRC_NET_SOCKET_H_
#define KVFERRY_SRC_NET_SOCKET_H_

#include <sys/socket.h>

#include <cstdint>
#include <string>
#include <utility>

#include "absl/status/statusor.h"

namespace kvferry::internal {

// Move-only owner of a file descriptor; closes it on destruction.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() { Reset(); }
  Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  Fd& operator=(Fd&& other) noexcept;
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  void Reset() noexcept;

 private:
  int fd_ = -1;
};

struct SocketAddress {
  sockaddr_storage storage = {};
  socklen_t length = 0;
  const sockaddr* get() const { return reinterpret_cast<const sockaddr*>(&storage); }
  // "1.2.3.4:5" or "[::1]:5".
  std::string ToString() const;
  // What per-source limits count by: the IPv4 host ("1.2.3.4", also for an
  // IPv4-mapped IPv6 address), or the IPv6 /64 ("2001:db8:1:2::/64"; one
  // host usually holds a whole /64), except loopback ("::1").
  std::string SourceKey() const;
  bool IsLoopback() const;
  bool IsWildcard() const;
};

// Parses an IPv4 or IPv6 literal plus port. kInvalidArgument names the text.
absl::StatusOr<SocketAddress> ParseSocketAddress(const std::string& address, uint16_t port);

// A non-blocking, close-on-exec listening socket (SO_REUSEADDR). kUnavailable
// when the port is taken; the message names the address.
absl::StatusOr<Fd> ListenTcp(const SocketAddress& address, int backlog);
// The port a bound socket got (for port 0).
absl::StatusOr<uint16_t> LocalPort(int fd);
// Starts a non-blocking connect; completion shows as writability (or an error
// on the first read or write). TCP_NODELAY is set.
absl::StatusOr<Fd> ConnectTcp(const SocketAddress& address);
// Accepts one pending connection (non-blocking, close-on-exec, TCP_NODELAY).
// Returns an invalid Fd when none is pending (or the one pending was aborted
// by its client); `peer` receives its address. Any other failure (EMFILE,
// ENFILE, ENOBUFS, ENOMEM: kResourceExhausted) leaves the connection in the
// backlog, so the listening socket stays readable: the caller must stop
// polling it for a while rather than retry at once.
absl::StatusOr<Fd> AcceptTcp(int listen_fd, SocketAddress* peer);

}  // namespace kvferry::internal

#endif  // KVFERRY_SRC_NET_SOCKET_H_
