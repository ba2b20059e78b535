#include "src/region_extent.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "src/net/socket.h"

namespace kvferry::internal {
namespace {

std::string Hex(uint64_t v) { return absl::StrCat("0x", absl::Hex(v)); }

// The next space-separated field of `line` (leading spaces skipped).
absl::string_view NextField(absl::string_view* line) {
  *line = absl::StripLeadingAsciiWhitespace(*line);
  const size_t space = line->find(' ');
  absl::string_view field = line->substr(0, space);
  line->remove_prefix(space == absl::string_view::npos ? line->size() : space);
  return field;
}

absl::Status BadLine(size_t number, absl::string_view line, absl::string_view why) {
  return absl::InvalidArgumentError(
      absl::StrCat("memory map line ", number, " (\"", absl::CHexEscape(line.substr(0, 200)),
                   "\"): ", why));
}

// "[start, +length)".
std::string Extent(uint64_t start, uint64_t length) {
  return absl::StrCat("[", Hex(start), ", +", length, ")");
}

}  // namespace

bool Mapping::SameAs(const Mapping& other) const {
  return start == other.start && end == other.end && shared == other.shared &&
         offset == other.offset && device == other.device && inode == other.inode &&
         path == other.path;
}

std::string Mapping::Describe() const {
  return absl::StrCat(Hex(start), "-", Hex(end), " ", perms, " ",
                      path.empty() ? "(anonymous)" : path);
}

namespace {

// ParseMemoryMap; `*torn` is set when the only fault is a line that
// overlaps or precedes the one before it.
absl::StatusOr<MemoryMap> ParseLines(absl::string_view text, bool* torn) {
  *torn = false;
  MemoryMap map;
  size_t number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipEmpty())) {
    ++number;
    absl::string_view rest = line;
    const absl::string_view range = NextField(&rest);
    const absl::string_view perms = NextField(&rest);
    const absl::string_view offset = NextField(&rest);
    const absl::string_view device = NextField(&rest);
    const absl::string_view inode = NextField(&rest);
    Mapping m;
    const size_t dash = range.find('-');
    if (dash == absl::string_view::npos ||
        !absl::SimpleHexAtoi(range.substr(0, dash), &m.start) ||
        !absl::SimpleHexAtoi(range.substr(dash + 1), &m.end) || m.end <= m.start) {
      return BadLine(number, line, "not an address range");
    }
    if (perms.size() != 4) return BadLine(number, line, "no permissions");
    m.readable = perms[0] == 'r';
    m.writable = perms[1] == 'w';
    m.shared = perms[3] == 's';
    m.perms = std::string(perms);
    if (!absl::SimpleHexAtoi(offset, &m.offset) || device.empty() ||
        !absl::SimpleAtoi(inode, &m.inode)) {
      return BadLine(number, line, "no offset, device or inode");
    }
    m.device = std::string(device);
    m.path = std::string(absl::StripAsciiWhitespace(rest));
    if (!map.empty() && m.start < map.back().end) {
      *torn = true;
      return BadLine(number, line, "overlaps or precedes the line before it");
    }
    map.push_back(std::move(m));
  }
  return map;
}

}  // namespace

absl::StatusOr<MemoryMap> ParseMemoryMap(absl::string_view text) {
  bool torn;
  return ParseLines(text, &torn);
}

namespace {

std::string MapsFile(pid_t pid) {
  return pid == 0 ? std::string("/proc/self/maps") : absl::StrCat("/proc/", pid, "/maps");
}

// The kernel hands /proc/<pid>/maps out a page at a time and lets the
// process map and unmap between two pages, so a read racing another thread
// can list a mapping that grew or moved after lines already read: it then
// overlaps or precedes them. Mappings that stayed put are listed right, so
// such a read is retried, up to this many times in all.
constexpr int kMapReads = 16;

// The text of /proc/<pid>/maps (errors as ReadMemoryMap's).
absl::StatusOr<std::string> ReadMapsText(pid_t pid) {
  const std::string file = MapsFile(pid);
  Fd fd(::open(file.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) {
    const int err = errno;
    const std::string why = absl::StrCat("open ", file, ": ", std::strerror(err));
    if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(why);
    if (err == ENOENT || err == ESRCH) return absl::NotFoundError(why);
    return absl::UnavailableError(why);
  }
  std::string text;
  char chunk[64 << 10];
  while (true) {
    const ssize_t n = ::read(fd.get(), chunk, sizeof(chunk));
    if (n == 0) break;
    if (n < 0) {
      const int err = errno;
      if (err == EINTR) continue;
      const std::string why = absl::StrCat("read ", file, ": ", std::strerror(err));
      if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(why);
      if (err == ESRCH) return absl::NotFoundError(why);
      return absl::UnavailableError(why);
    }
    text.append(chunk, static_cast<size_t>(n));
  }
  return text;
}

}  // namespace

absl::StatusOr<MemoryMap> ReadMemoryMap(pid_t pid) {
  for (int read = 1;; ++read) {
    absl::StatusOr<std::string> text = ReadMapsText(pid);
    if (!text.ok()) return text.status();
    bool torn;
    absl::StatusOr<MemoryMap> map = ParseLines(*text, &torn);
    if (map.ok()) return map;
    if (!torn || read == kMapReads) {
      return absl::UnavailableError(absl::StrCat(
          MapsFile(pid), ": ", map.status().message(),
          torn ? absl::StrCat(" (the mappings changed during each of ", kMapReads, " reads)")
               : std::string()));
    }
  }
}

const Mapping* FindMapping(const MemoryMap& map, uint64_t address) {
  auto it = std::upper_bound(map.begin(), map.end(), address,
                             [](uint64_t a, const Mapping& m) { return a < m.start; });
  if (it == map.begin()) return nullptr;
  --it;
  return address < it->end ? &*it : nullptr;
}

absl::Status CheckAttachedRange(const MemoryMap& before, const MemoryMap& after, uint64_t local,
                                uint64_t length) {
  const std::string here = absl::StrCat("its key places it at ", Extent(local, length), " here");
  const Mapping* m = FindMapping(after, local);
  if (m == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(here, ", where this process maps nothing (not the peer's segment)"));
  }
  const Mapping* old = FindMapping(before, local);
  if (old != nullptr && old->SameAs(*m)) {
    return absl::InvalidArgumentError(
        absl::StrCat(here, ", inside memory this process had before the key was unpacked (",
                     m->Describe(), "), not the segment the key attached"));
  }
  if (!m->shared) {
    return absl::InvalidArgumentError(absl::StrCat(
        here, ", inside a private mapping (", m->Describe(), "), not a shared-memory segment"));
  }
  // Both ends are user-space addresses, so the subtraction cannot wrap.
  if (length > m->end - local) {
    return absl::InvalidArgumentError(absl::StrCat(
        here, ", which runs ", length - (m->end - local), " bytes past the end of the segment "
        "the key attached (", m->Describe(), ", ", m->end - m->start, " bytes; the region "
        "starts ", local - m->start, " bytes into it)"));
  }
  return absl::OkStatus();
}

absl::Status CheckProcessRange(const MemoryMap& map, uint64_t base, uint64_t length) {
  uint64_t at = base;
  const uint64_t end = base + length;  // the wire layer bounds both below 2^57
  while (at < end) {
    const Mapping* m = FindMapping(map, at);
    if (m == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          Extent(base, length), " is not mapped at ", Hex(at), " (", at - base,
          " bytes in)"));
    }
    if (!m->readable || !m->writable) {
      return absl::InvalidArgumentError(absl::StrCat(
          Extent(base, length), " is not readable and writable memory at ", Hex(at), " (",
          at - base, " bytes in: ", m->Describe(), ")"));
    }
    at = m->end;
  }
  return absl::OkStatus();
}

AttachWatch AttachWatch::Start() { return AttachWatch(ReadMemoryMap(0)); }

absl::Status AttachWatch::Check(ucp_rkey_h rkey, uint64_t remote_base, uint64_t length) {
  void* local = nullptr;
  if (ucp_rkey_ptr(rkey, remote_base, &local) != UCS_OK || local == nullptr) {
    return absl::OkStatus();  // not mapped here: not this path
  }
  if (!before_.ok()) {
    return absl::UnavailableError(absl::StrCat(
        "cannot check the region against the segment its key maps: ",
        before_.status().message()));
  }
  absl::StatusOr<MemoryMap> after = ReadMemoryMap(0);
  if (!after.ok()) {
    return absl::UnavailableError(absl::StrCat(
        "cannot check the region against the segment its key maps: ",
        after.status().message()));
  }
  absl::Status s = CheckAttachedRange(*before_, *after, reinterpret_cast<uintptr_t>(local),
                                      length);
  before_ = *std::move(after);
  if (!s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("region ", Extent(remote_base, length),
                                                   " of the peer: ", s.message()));
  }
  return absl::OkStatus();
}

absl::Status CheckKernelCopyExtents(const KernelCopyTarget& target,
                                    std::span<const wire::PoolDescriptor* const> pools) {
  if (pools.empty()) return absl::OkStatus();
  absl::StatusOr<MemoryMap> map = ReadMemoryMap(target.pid());
  if (!map.ok()) {
    return absl::Status(map.status().code(),
                        absl::StrCat("cannot check the pools of pid ", target.pid(),
                                     " against its memory: ", map.status().message()));
  }
  if (target.Exited()) {
    return absl::UnavailableError(absl::StrCat(
        "pid ", target.pid(), " exited while its pools were checked against its memory"));
  }
  for (const wire::PoolDescriptor* pool : pools) {
    for (size_t i = 0; i < pool->regions.size(); ++i) {
      const wire::RegionDescriptor& r = pool->regions[i];
      absl::Status s = CheckProcessRange(*map, r.base, r.length);
      if (!s.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "pool '", pool->name, "' region ", i, " ", Extent(r.base, r.length),
            " does not lie in the memory of the peer's process (pid ", target.pid(), "): ",
            s.message()));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace kvferry::internal
