#include "src/net/connection.h"

#include <sys/socket.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "src/wire/message.h"

namespace kvferry::internal {

absl::Status Connection::Read(std::vector<std::string>* frames, size_t budget) {
  absl::Status status;
  char buf[64 << 10];
  size_t taken = 0;
  while (fd_.valid() && taken < budget) {
    ssize_t n = ::recv(fd_.get(), buf, sizeof(buf), 0);
    if (n > 0) {
      in_.append(buf, static_cast<size_t>(n));
      taken += static_cast<size_t>(n);
      // Split early, so a bad header is refused before its body is buffered.
      size_t offset = 0;
      while (true) {
        auto length = wire::FrameLength(absl::string_view(in_).substr(offset), max_frame_);
        if (!length.ok()) {
          in_.clear();
          return length.status();
        }
        if (*length == 0 || *length > in_.size() - offset) break;
        frames->push_back(in_.substr(offset, *length));
        offset += *length;
      }
      in_.erase(0, offset);
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
