#include "src/ucx/packed_rkey.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kvferry::internal {
namespace {

constexpr size_t kMdMapBytes = 8;
constexpr size_t kDistanceBytes = 3;  // system device, latency, bandwidth

constexpr size_t kSysvKeyBytes = 12;
constexpr size_t kPosixKeyBytes = 24;
constexpr uint64_t kPosixProcfs = uint64_t{1} << 63;
constexpr uint64_t kPosixShmOpen = uint64_t{1} << 62;
constexpr uint64_t kPosixHugetlb = uint64_t{1} << 61;
constexpr uint64_t kPosixPidNs = uint64_t{1} << 60;
constexpr uint64_t kPosixFlags = kPosixProcfs | kPosixShmOpen | kPosixHugetlb | kPosixPidNs;
constexpr int kProcfsFieldBits = 30;  // pid in the low bits, fd above
constexpr uint64_t kProcfsFieldMask = (uint64_t{1} << kProcfsFieldBits) - 1;

template <typename T>
T Load(absl::string_view bytes, size_t offset) {
  T value;
  std::memcpy(&value, bytes.data() + offset, sizeof(T));
  return value;
}

// The directory of a posix key in file mode: bytes after the fixed part, up
// to a NUL that must be there.
bool PosixDirectory(absl::string_view key, std::string* dir) {
  absl::string_view rest = key.substr(kPosixKeyBytes);
  size_t nul = rest.find('\0');
  if (nul == absl::string_view::npos || nul == 0) return false;
  *dir = std::string(rest.substr(0, nul));
  return true;
}

// Opens the file a posix key names, the way UCX 1.13 would; -1 and errno
// on failure.
int OpenPosixSegment(absl::string_view key, std::string* what) {
  const uint64_t seg_id = Load<uint64_t>(key, 0);
  const uint64_t mmid = seg_id & ~kPosixFlags;
  std::string path;
  if ((seg_id & kPosixProcfs) != 0) {
    path = absl::StrCat("/proc/", mmid & kProcfsFieldMask, "/fd/", mmid >> kProcfsFieldBits);
  } else if ((seg_id & kPosixShmOpen) != 0) {
    path = absl::StrFormat("/dev/shm/ucx_shm_posix_%x", mmid);
  } else {
    std::string dir;
    if (!PosixDirectory(key, &dir)) {
      errno = EINVAL;
      return -1;
    }
    path = absl::StrFormat("%s/ucx_shm_posix_%x", dir, mmid);
  }
  *what = absl::StrCat("posix segment ", path);
  return open(path.c_str(), O_RDWR | O_CLOEXEC);
}

}  // namespace

absl::StatusOr<ParsedRkey> ParsePackedRkey(absl::string_view packed) {
  if (packed.size() < kMdMapBytes + 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "packed rkey of ", packed.size(), " bytes: shorter than its ", kMdMapBytes + 1,
        "-byte header"));
  }
  ParsedRkey parsed;
  parsed.md_map = Load<uint64_t>(packed, 0);
  parsed.memory_type = Load<uint8_t>(packed, kMdMapBytes);
  size_t at = kMdMapBytes + 1;
  for (int md = 0; md < 64; ++md) {
    if ((parsed.md_map & (uint64_t{1} << md)) == 0) continue;
    if (at >= packed.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "packed rkey of ", packed.size(), " bytes ends at offset ", at,
          " before the size of the key of memory domain ", md, " (md_map 0x",
          absl::Hex(parsed.md_map), ")"));
    }
    const size_t size = Load<uint8_t>(packed, at);
    ++at;
    if (size > packed.size() - at) {
      return absl::InvalidArgumentError(absl::StrCat(
          "packed rkey of ", packed.size(), " bytes: the key of memory domain ", md,
          " at offset ", at, " claims ", size, " bytes, ", packed.size() - at, " remain"));
    }
    parsed.entries.push_back({.md_index = md, .offset = at, .size = size});
    at += size;
  }
  parsed.trailer_offset = at;
  const size_t trailer = packed.size() - at;
  if (trailer != 0 && (trailer - 1) % kDistanceBytes != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "packed rkey of ", packed.size(), " bytes: ", trailer,
        " bytes after its last key at offset ", at,
        " are not a system device and whole distance records"));
  }
  return parsed;
}

SegmentKind ClassifyTransportKey(absl::string_view key) {
  if (key.size() == kSysvKeyBytes) return SegmentKind::kSysv;
  if (key.size() < kPosixKeyBytes) return SegmentKind::kNone;
  const uint64_t seg_id = Load<uint64_t>(key, 0);
  const uint64_t length = Load<uint64_t>(key, 16);
  if (length == 0) return SegmentKind::kNone;
  if ((seg_id & kPosixProcfs) != 0) {
    const uint64_t mmid = seg_id & ~kPosixFlags;
    return (mmid & kProcfsFieldMask) != 0 ? SegmentKind::kPosix : SegmentKind::kNone;
  }
  if ((seg_id & kPosixShmOpen) != 0) return SegmentKind::kPosix;
  std::string dir;
  return PosixDirectory(key, &dir) ? SegmentKind::kPosix : SegmentKind::kNone;
}

absl::StatusOr<SegmentHold> SegmentHold::Prepare(absl::string_view packed) {
  absl::StatusOr<ParsedRkey> parsed = ParsePackedRkey(packed);
  if (!parsed.ok()) return parsed.status();
  SegmentHold hold;
  // Header, then each entry as kept or rewritten, then the trailer.
  uint64_t md_map = parsed->md_map;
  std::string entries;
  bool changed = false;
  const pid_t self = getpid();
  for (const PackedRkeyEntry& e : parsed->entries) {
    absl::string_view key = packed.substr(e.offset, e.size);
    std::string out(key);
    switch (ClassifyTransportKey(key)) {
      case SegmentKind::kNone:
        break;
      case SegmentKind::kSysv: {
        const int shmid = static_cast<int>(Load<uint32_t>(key, 0));
        void* at = shmat(shmid, nullptr, 0);  // as UCX attaches it
        if (at == reinterpret_cast<void*>(-1)) {
          hold.missing_.push_back(absl::StrCat("sysv shmid ", shmid, ": ", std::strerror(errno)));
          md_map &= ~(uint64_t{1} << e.md_index);
          changed = true;
          continue;
        }
        hold.attached_.push_back(at);
        break;
      }
      case SegmentKind::kPosix: {
        std::string what;
        const int fd = OpenPosixSegment(key, &what);
        if (fd < 0) {
          hold.missing_.push_back(absl::StrCat(what, ": ", std::strerror(errno)));
          md_map &= ~(uint64_t{1} << e.md_index);
          changed = true;
          continue;
        }
        hold.fds_.push_back(fd);
        // Name this process's descriptor instead, if UCX can reach it so
        // (procfs mode: /proc/<pid>/fd/<fd>, with pid and fd in 30 bits
        // each); otherwise leave the key as it was.
        const uint64_t pid = static_cast<uint64_t>(self);
        const uint64_t ufd = static_cast<uint64_t>(fd);
        if (pid > kProcfsFieldMask || ufd > kProcfsFieldMask) break;
        const std::string own = absl::StrCat("/proc/", self, "/fd/", fd);
        const int check = open(own.c_str(), O_RDWR | O_CLOEXEC);
        if (check < 0) break;
        close(check);
        const uint64_t seg_id = Load<uint64_t>(key, 0);
        const uint64_t rewritten = kPosixProcfs | (seg_id & (kPosixShmOpen | kPosixHugetlb)) |
                                   pid | (ufd << kProcfsFieldBits);
        std::memcpy(out.data(), &rewritten, sizeof(rewritten));
        changed = true;
        break;
      }
    }
    entries.push_back(static_cast<char>(e.size));
    entries += out;
  }
  if (!changed) {
    hold.key_ = std::string(packed);
    return hold;
  }
  hold.key_.resize(kMdMapBytes);
  std::memcpy(hold.key_.data(), &md_map, kMdMapBytes);
  hold.key_.push_back(static_cast<char>(parsed->memory_type));
  hold.key_ += entries;
  hold.key_ += std::string(packed.substr(parsed->trailer_offset));
  return hold;
}

SegmentHold::SegmentHold(SegmentHold&& other) noexcept
    : key_(std::move(other.key_)),
      missing_(std::move(other.missing_)),
      attached_(std::exchange(other.attached_, {})),
      fds_(std::exchange(other.fds_, {})) {}

SegmentHold& SegmentHold::operator=(SegmentHold&& other) noexcept {
  if (this != &other) {
    Release();
    key_ = std::move(other.key_);
    missing_ = std::move(other.missing_);
    attached_ = std::exchange(other.attached_, {});
    fds_ = std::exchange(other.fds_, {});
  }
  return *this;
}

void SegmentHold::Release() noexcept {
  for (void* at : attached_) (void)shmdt(at);
  attached_.clear();
  for (int fd : fds_) (void)close(fd);
  fds_.clear();
}

}  // namespace kvferry::internal
