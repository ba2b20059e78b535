#include "src/net/connection.h"

#include <poll.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "src/wire/message.h"

namespace kvferry::internal {

bool Connection::RemoteHungUp() const {
  if (!fd_.valid()) return true;
  pollfd p{fd_.get(), POLLRDHUP, 0};
  return ::poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
}

absl::Status Connection::Read(std::vector<std::string>* frames, size_t budget,
                              size_t max_frames) {
  size_t got = 0;
  // Takes complete frames from in_, up to max_frames; refuses a bad header
  // before its body is buffered.
  auto split = [&]() -> absl::Status {
    while (got < max_frames) {
      auto length =
          wire::FrameLength(absl::string_view(in_).substr(in_offset_), max_frame_);
      if (!length.ok()) {
        in_.clear();
        in_offset_ = 0;
        return length.status();
      }
      if (*length == 0 || *length > in_.size() - in_offset_) break;
      frames->push_back(in_.substr(in_offset_, *length));
      in_offset_ += *length;
      ++got;
    }
    if (in_offset_ == in_.size()) {
      in_.clear();
      in_offset_ = 0;
    } else if (in_offset_ >= (64u << 10)) {
      in_.erase(0, in_offset_);
      in_offset_ = 0;
    }
    return absl::OkStatus();
  };
  if (absl::Status s = split(); !s.ok()) return s;
  absl::Status status;
  char buf[64 << 10];
  size_t taken = 0;
  while (fd_.valid() && taken < budget && got < max_frames) {
    ssize_t n = ::recv(fd_.get(), buf, sizeof(buf), 0);
    if (n > 0) {
      in_.append(buf, static_cast<size_t>(n));
      taken += static_cast<size_t>(n);
      if (absl::Status s = split(); !s.ok()) return s;
      continue;
    }
    if (n == 0) {
      NoteEnd(/*by_peer=*/true);
      status = absl::UnavailableError(absl::StrCat(remote_, " closed the connection"));
      break;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) break;
    NoteEnd(/*by_peer=*/errno == ECONNRESET);
    status = absl::UnavailableError(
        absl::StrCat("connection to ", remote_, ": ", std::strerror(errno)));
    break;
  }
  return status;
}

void Connection::Queue(std::string frame) {
  if (out_offset_ == out_.size()) {
    out_ = std::move(frame);
    out_offset_ = 0;
  } else {
    out_.append(frame);
  }
  (void)Flush();
}

absl::Status Connection::Flush() {
  while (fd_.valid() && out_offset_ < out_.size()) {
    ssize_t n = ::send(fd_.get(), out_.data() + out_offset_, out_.size() - out_offset_,
                       MSG_NOSIGNAL);
    if (n > 0) {
      out_offset_ += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    NoteEnd(/*by_peer=*/n < 0 && (errno == ECONNRESET || errno == EPIPE));
    return absl::UnavailableError(
        absl::StrCat("connection to ", remote_, ": ", std::strerror(n < 0 ? errno : EPIPE)));
  }
  if (out_offset_ == out_.size()) {
    out_.clear();
    out_offset_ = 0;
  } else if (out_offset_ > (1u << 20)) {
    out_.erase(0, out_offset_);
    out_offset_ = 0;
  }
  if (out_.size() - out_offset_ > kMaxQueuedBytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        remote_, " leaves ", out_.size() - out_offset_, " bytes of control messages unread"));
  }
  return absl::OkStatus();
}

}  // namespace kvferry::internal
