// ReadProcessMemory: /proc/self/smaps_rollup, /proc/self/maps, malloc_info.
#include <malloc.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "kvferry/memory_report.h"

namespace kvferry {
namespace {

// "Rss:     1234 kB" -> 1234 * 1024 into `out` when the key matches.
void ParseKb(absl::string_view line, absl::string_view key, uint64_t* out) {
  if (!absl::ConsumePrefix(&line, key) || !absl::ConsumePrefix(&line, ":")) return;
  line = absl::StripAsciiWhitespace(line);
  absl::ConsumeSuffix(&line, "kB");
  uint64_t kb = 0;
  if (absl::SimpleAtoi(absl::StripAsciiWhitespace(line), &kb)) *out = kb * 1024;
}

// Sums the <system type="current"> and <total type="..." size> entries of
// malloc_info's XML, which cover every arena (mallinfo2 sees only the main one).
void ReadMalloc(ProcessMemory* m) {
  char* text = nullptr;
  size_t size = 0;
  FILE* stream = open_memstream(&text, &size);
  if (stream == nullptr) return;
  malloc_info(0, stream);
  std::fclose(stream);
  absl::string_view xml(text, size);
  // The outermost totals follow the last </heap>.
  size_t last_heap = xml.rfind("</heap>");
  absl::string_view totals = last_heap == absl::string_view::npos ? xml : xml.substr(last_heap);
  uint64_t system = 0, free_bytes = 0, mmap_bytes = 0;
  for (absl::string_view line : absl::StrSplit(totals, '\n')) {
    auto attr = [&line](absl::string_view name, uint64_t* out) {
      size_t p = line.find(name);
      if (p == absl::string_view::npos) return;
      absl::string_view rest = line.substr(p + name.size());
      size_t end = rest.find('"');
      uint64_t v = 0;
      if (absl::SimpleAtoi(rest.substr(0, end), &v)) *out = v;
    };
    if (absl::StrContains(line, "<system type=\"current\"")) attr("size=\"", &system);
    if (absl::StrContains(line, "<total type=\"fast\"") ||
        absl::StrContains(line, "<total type=\"rest\"")) {
      uint64_t v = 0;
      attr("size=\"", &v);
      free_bytes += v;
    }
    if (absl::StrContains(line, "<total type=\"mmap\"")) attr("size=\"", &mmap_bytes);
  }
  std::free(text);
  // Chunks served by mmap are outside the arenas' "system" figure.
  m->heap_system_bytes = system + mmap_bytes;
  m->heap_in_use_bytes = system >= free_bytes ? system - free_bytes + mmap_bytes : mmap_bytes;
}

}  // namespace

absl::StatusOr<ProcessMemory> ReadProcessMemory(std::span<const AddressRange> own_pools) {
  ProcessMemory m;
  std::ifstream rollup("/proc/self/smaps_rollup");
  if (!rollup) return absl::UnavailableError("cannot read /proc/self/smaps_rollup");
  for (std::string line; std::getline(rollup, line);) {
    ParseKb(line, "Rss", &m.rss_bytes);
    ParseKb(line, "Anonymous", &m.anonymous_bytes);
    ParseKb(line, "Pss_Shmem", &m.shmem_rss_bytes);
  }
  std::ifstream maps("/proc/self/maps");
  if (!maps) return absl::UnavailableError("cannot read /proc/self/maps");
  for (std::string line; std::getline(maps, line);) {
    ++m.mappings;
    // "start-end perms offset dev inode [path]"
    std::vector<absl::string_view> f = absl::StrSplit(line, ' ', absl::SkipEmpty());
    if (f.size() < 5) continue;
    std::vector<absl::string_view> range = absl::StrSplit(f[0], '-');
    uint64_t lo = 0, hi = 0;
    if (range.size() != 2 || !absl::SimpleHexAtoi(range[0], &lo) ||
        !absl::SimpleHexAtoi(range[1], &hi)) {
      continue;
    }
    absl::string_view path = f.size() >= 6 ? f[5] : "";
    if (f[4] == "0" && (path.empty() || path[0] == '[')) {
      if (path != "[vdso]" && path != "[vvar]" && path != "[vsyscall]") {
        ++m.anonymous_mappings;
        m.anonymous_mapped_bytes += hi - lo;
      }
    } else if (absl::StartsWith(path, "/dev/shm/ucx_") || absl::StartsWith(path, "/SYSV")) {
      // The agent's own UCX-allocated pools are such segments too; counted
      // apart so that "UCX segments" stays what UCX itself holds.
      bool own_pool = false;
      for (const AddressRange& pool : own_pools) {
        own_pool = own_pool || (lo >= pool.begin && hi <= pool.end);
      }
      if (own_pool) {
        ++m.pool_segments;
        m.pool_segment_bytes += hi - lo;
      } else {
        ++m.ucx_segments;
        m.ucx_segment_bytes += hi - lo;
      }
    }
  }
  ReadMalloc(&m);
  return m;
}

}  // namespace kvferry
