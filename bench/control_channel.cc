#include "bench/control_channel.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <utility>

#include "absl/time/clock.h"

namespace kvferry::bench {
namespace {

[[noreturn]] void Die(const std::string& what) {
  std::printf("ERROR control channel: %s\n", what.c_str());
  std::fflush(stdout);
  std::exit(2);
}

sockaddr_in Address(const std::string& address, uint16_t port) {
  sockaddr_in a = {};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  if (inet_pton(AF_INET, address.c_str(), &a.sin_addr) != 1) Die("bad IPv4 address " + address);
  return a;
}

}  // namespace

ControlChannel::~ControlChannel() {
  if (fd_ >= 0) close(fd_);
}

ControlChannel::ControlChannel(ControlChannel&& o) noexcept
    : fd_(std::exchange(o.fd_, -1)), buffer_(std::move(o.buffer_)) {}

ControlChannel& ControlChannel::operator=(ControlChannel&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) close(fd_);
    fd_ = std::exchange(o.fd_, -1);
    buffer_ = std::move(o.buffer_);
  }
  return *this;
}

ControlChannel ControlChannel::Connect(const std::string& address, uint16_t port,
                                       absl::Duration timeout) {
  const sockaddr_in a = Address(address, port);
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) Die("socket");
    if (connect(fd, reinterpret_cast<const sockaddr*>(&a), sizeof(a)) == 0) {
      int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      return ControlChannel(fd);
    }
    close(fd);
    if (absl::Now() > deadline) Die("cannot connect to " + address + ":" + std::to_string(port));
    absl::SleepFor(absl::Milliseconds(50));
  }
}

bool ControlChannel::Send(const std::string& line) {
  if (fd_ < 0) return false;
  std::string out = line + "\n";
  size_t done = 0;
  while (done < out.size()) {
    ssize_t n = send(fd_, out.data() + done, out.size() - done, MSG_NOSIGNAL);
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

std::optional<std::string> ControlChannel::Receive(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (fd_ >= 0) {
    size_t nl = buffer_.find('\n');
    if (nl != std::string::npos) {
      std::string line = buffer_.substr(0, nl);
      buffer_.erase(0, nl + 1);
      return line;
    }
    // Polls at least once, so a zero timeout still reads what has arrived.
    const absl::Duration left = std::max(deadline - absl::Now(), absl::ZeroDuration());
    pollfd pfd = {fd_, POLLIN, 0};
    if (poll(&pfd, 1, static_cast<int>(absl::ToInt64Milliseconds(left))) <= 0) {
      if (left == absl::ZeroDuration()) return std::nullopt;
      continue;
    }
    char chunk[4096];
    ssize_t n = read(fd_, chunk, sizeof(chunk));
    if (n <= 0) {  // the peer closed (or the connection broke): ok() turns false
      close(fd_);
      fd_ = -1;
      return std::nullopt;
    }
    buffer_.append(chunk, static_cast<size_t>(n));
  }
  return std::nullopt;
}

ControlListener::ControlListener(const std::string& address, uint16_t port) {
  sockaddr_in a = Address(address, port);
  fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1;
  setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  socklen_t len = sizeof(a);
  if (fd_ < 0 || bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
      listen(fd_, 16) != 0 || getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    Die("cannot listen on " + address + ":" + std::to_string(port));
  }
  port_ = ntohs(a.sin_port);
}

ControlListener::~ControlListener() {
  if (fd_ >= 0) close(fd_);
}

ControlChannel ControlListener::Accept(absl::Duration timeout) {
  pollfd pfd = {fd_, POLLIN, 0};
  if (poll(&pfd, 1, static_cast<int>(absl::ToInt64Milliseconds(timeout))) <= 0) return {};
  int fd = accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
  if (fd < 0) return {};
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return ControlChannel(fd);
}

}  // namespace kvferry::bench
