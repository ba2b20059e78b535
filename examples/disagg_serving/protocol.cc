#include "examples/disagg_serving/protocol.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <cstdio>

#include "absl/time/clock.h"

namespace kvferry::serving {
namespace {
constexpr size_t kMaxMessage = 64 << 20;
}

Channel::Channel(int fd) : fd_(fd) {
  fcntl(fd_, F_SETFL, fcntl(fd_, F_GETFL) | O_NONBLOCK);
}

Channel::~Channel() {
  if (fd_ >= 0) close(fd_);
}

void Channel::Send(const Json& message) {
  if (closed_) return;
  const std::string body = message.dump();
  const uint32_t n = static_cast<uint32_t>(body.size());
  const char len[4] = {static_cast<char>(n >> 24), static_cast<char>(n >> 16),
                       static_cast<char>(n >> 8), static_cast<char>(n)};
  out_.append(len, 4);
  out_.append(body);
  Flush();
}

bool Channel::Flush() {
  while (!out_.empty() && !closed_) {
    ssize_t w = write(fd_, out_.data(), out_.size());
    if (w > 0) {
      out_.erase(0, static_cast<size_t>(w));
    } else if (w < 0 && errno == EINTR) {
      continue;
    } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      return true;
    } else {
      closed_ = true;
      out_.clear();
    }
  }
  return !closed_;
}

std::vector<Json> Channel::Read() {
  std::vector<Json> messages;
  char buf[65536];
  while (!closed_) {
    ssize_t r = read(fd_, buf, sizeof(buf));
    if (r > 0) {
      in_.append(buf, static_cast<size_t>(r));
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    closed_ = true;  // EOF or error
  }
  while (in_.size() >= 4) {
    const auto* u = reinterpret_cast<const unsigned char*>(in_.data());
    const size_t n = (size_t{u[0]} << 24) | (size_t{u[1]} << 16) | (size_t{u[2]} << 8) | u[3];
    if (n > kMaxMessage) {
      std::fprintf(stderr, "kvferry_serve: message of %zu bytes on the control channel; closing it\n", n);
      closed_ = true;
      in_.clear();
      break;
    }
    if (in_.size() < 4 + n) break;
    Json j = Json::parse(in_.begin() + 4, in_.begin() + 4 + static_cast<std::ptrdiff_t>(n), nullptr,
                         /*allow_exceptions=*/false);
    in_.erase(0, 4 + n);
    if (j.is_discarded() || !j.is_object()) {
      std::fprintf(stderr, "kvferry_serve: malformed message on the control channel; skipped\n");
      continue;
    }
    messages.push_back(std::move(j));
  }
  return messages;
}

std::vector<Json> Channel::Wait(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    std::vector<Json> got = Read();
    if (!got.empty() || closed_) return got;
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) return got;
    pollfd p{fd_, static_cast<short>(POLLIN | (WantsWrite() ? POLLOUT : 0)), 0};
    poll(&p, 1, static_cast<int>(absl::ToInt64Milliseconds(left)) + 1);
    if (p.revents & POLLOUT) Flush();
  }
}

void Channel::Drain(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (WantsWrite() && absl::Now() < deadline) {
    pollfd p{fd_, POLLOUT, 0};
    poll(&p, 1, 10);
    Flush();
  }
}

}  // namespace kvferry::serving
