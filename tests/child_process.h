// ChildProcess: fork/exec of a helper with its stdin and stdout on pipes, for
// the multi-process tests. Reads stdout line by line with a deadline.
#ifndef KVFERRY_TESTS_CHILD_PROCESS_H_
#define KVFERRY_TESTS_CHILD_PROCESS_H_

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <iterator>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace kvferry::test {

class ChildProcess {
 public:
  explicit ChildProcess(const std::vector<std::string>& argv) {
    int in[2], out[2];
    if (pipe2(in, O_CLOEXEC) != 0 || pipe2(out, O_CLOEXEC) != 0) return;
    pid_ = fork();
    if (pid_ == 0) {
      dup2(in[0], STDIN_FILENO);
      dup2(out[1], STDOUT_FILENO);
      std::vector<char*> args;
      for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      execvp(args[0], args.data());
      _exit(127);
    }
    close(in[0]);
    close(out[1]);
    stdin_ = in[1];
    stdout_ = out[0];
  }
  ~ChildProcess() {
    if (pid_ > 0 && !exited_) {
      kill(pid_, SIGKILL);
      Wait();
    }
    if (stdin_ >= 0) close(stdin_);
    if (stdout_ >= 0) close(stdout_);
  }
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  bool started() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }

  // The next line of the child's stdout, or nullopt at EOF or after `timeout`.
  std::optional<std::string> ReadLine(absl::Duration timeout = absl::Seconds(30)) {
    absl::Time deadline = absl::Now() + timeout;
    while (true) {
      size_t nl = buffer_.find('\n');
      if (nl != std::string::npos) {
        std::string line = buffer_.substr(0, nl);
        buffer_.erase(0, nl + 1);
        return line;
      }
      absl::Duration left = deadline - absl::Now();
      if (left <= absl::ZeroDuration()) return std::nullopt;
      pollfd pfd = {stdout_, POLLIN, 0};
      if (poll(&pfd, 1, static_cast<int>(absl::ToInt64Milliseconds(left)) + 1) <= 0) continue;
      char chunk[4096];
      ssize_t n = read(stdout_, chunk, sizeof(chunk));
      if (n <= 0) return std::nullopt;
      buffer_.append(chunk, static_cast<size_t>(n));
    }
  }
  // Reads lines until one starts with `prefix`; returns it (or nullopt).
  std::optional<std::string> ReadUntil(const std::string& prefix,
                                       absl::Duration timeout = absl::Seconds(30)) {
    absl::Time deadline = absl::Now() + timeout;
    while (auto line = ReadLine(deadline - absl::Now())) {
      if (line->rfind(prefix, 0) == 0) return line;
      if (line->rfind("ERROR", 0) == 0) return line;
    }
    return std::nullopt;
  }

  // Writes `line` and a newline to the child's stdin; false if it could not.
  bool WriteLine(const std::string& line) {
    const std::string bytes = line + "\n";
    size_t done = 0;
    while (stdin_ >= 0 && done < bytes.size()) {
      ssize_t n = write(stdin_, bytes.data() + done, bytes.size() - done);
      if (n <= 0) return false;
      done += static_cast<size_t>(n);
    }
    return done == bytes.size();
  }
  void CloseStdin() {
    if (stdin_ >= 0) close(stdin_);
    stdin_ = -1;
  }
  void Kill(int sig = SIGKILL) { kill(pid_, sig); }
  // Waits for exit; returns the wait status.
  int Wait() {
    int status = 0;
    waitpid(pid_, &status, 0);
    exited_ = true;
    return status;
  }

 private:
  pid_t pid_ = -1;
  int stdin_ = -1;
  int stdout_ = -1;
  bool exited_ = false;
  std::string buffer_;
};

// ForkedTwin: a fork of this process that only waits until destroyed, so
// that memory allocated before the fork lies at the same address there (a
// target for kernel copies). pid() <= 0 if the fork failed.
class ForkedTwin {
 public:
  ForkedTwin() {
    int fds[2];
    if (pipe(fds) != 0) return;
    pid_ = fork();
    if (pid_ == 0) {
      close(fds[1]);
      char c;
      while (read(fds[0], &c, 1) > 0) {
      }
      _exit(0);
    }
    close(fds[0]);
    release_ = fds[1];
  }
  ~ForkedTwin() {
    if (release_ >= 0) close(release_);
    if (pid_ > 0) {
      int status = 0;
      waitpid(pid_, &status, 0);
    }
  }
  ForkedTwin(const ForkedTwin&) = delete;
  ForkedTwin& operator=(const ForkedTwin&) = delete;
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
  int release_ = -1;
};

// The port of a "PORT <n>" line (kvferry_test_peer's first line), or 0 if
// `line` is missing or is not one.
inline uint16_t ParsePort(const std::optional<std::string>& line) {
  uint32_t port = 0;
  if (!line || line->rfind("PORT ", 0) != 0 || !absl::SimpleAtoi(line->substr(5), &port) ||
      port > 65535) {
    return 0;
  }
  return static_cast<uint16_t>(port);
}

// Whether process `pid` is stopped (state 'T' in /proc/<pid>/stat), e.g.
// after SIGSTOP reached it.
inline bool IsStopped(pid_t pid) {
  std::ifstream stat(absl::StrCat("/proc/", pid, "/stat"));
  std::string all((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  size_t paren = all.rfind(')');
  return paren != std::string::npos && paren + 2 < all.size() && all[paren + 2] == 'T';
}

}  // namespace kvferry::test

#endif  // KVFERRY_TESTS_CHILD_PROCESS_H_
