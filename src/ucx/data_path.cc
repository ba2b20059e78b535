#include "src/ucx/data_path.h"

#include <cstdio>
#include <cstdlib>
#include <map>
#include <set>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "kvferry/transfer.h"

namespace kvferry::internal {
namespace {

// "[12]: rest" -> 12, with `rest` after the colon; false if malformed.
bool ConsumeIndex(absl::string_view* s, int* index) {
  if (!absl::ConsumePrefix(s, "[")) return false;
  size_t close = s->find("]:");
  if (close == absl::string_view::npos || !absl::SimpleAtoi(s->substr(0, close), index)) {
    return false;
  }
  s->remove_prefix(close + 2);
  return true;
}

}  // namespace

std::string EndpointInfo(ucp_ep_h ep) {
  char* text = nullptr;
  size_t size = 0;
  FILE* stream = open_memstream(&text, &size);
  if (stream == nullptr) return {};
  ucp_ep_print_info(ep, stream);
  std::fclose(stream);
  std::string out(text, size);
  std::free(text);
  return out;
}

bool RkeyMapsRemoteMemory(ucp_rkey_h rkey, uint64_t remote_address) {
  void* local = nullptr;
  return ucp_rkey_ptr(rkey, remote_address, &local) == UCS_OK && local != nullptr;
}

DataPath ClassifyDataPath(absl::string_view endpoint_info, bool pools_mapped) {
  // Lines of interest (UCX 1.13, src/ucp/core/ucp_ep.c):
  //   "#   lane[0]:  2:sysv/memory.0 md[1]  -> md[1]/sysv/sysdev[255] am am_bw#0 keepalive"
  //   "#   lane[1]: cm rdmacm"
  //   "#    put[0]: 0..<short>..4294967296..<bcopy>..(inf)"   (one per RMA lane)
  std::map<int, std::string> lane_tl;
  std::set<int> rma_lanes;
  int am_lane = -1;
  for (absl::string_view line : absl::StrSplit(endpoint_info, '\n')) {
    line = absl::StripLeadingAsciiWhitespace(absl::StripPrefix(line, "#"));
    int index = 0;
    if (absl::ConsumePrefix(&line, "lane") && ConsumeIndex(&line, &index)) {
      line = absl::StripLeadingAsciiWhitespace(line);
      if (absl::StartsWith(line, "cm ")) continue;  // connection manager, moves no data
      // "2:sysv/memory.0 md[1] ..." -> "sysv"
      size_t colon = line.find(':');
      size_t slash = line.find('/');
      if (colon == absl::string_view::npos || slash == absl::string_view::npos || slash < colon) {
        continue;
      }
      lane_tl[index] = std::string(line.substr(colon + 1, slash - colon - 1));
      size_t arrow = line.find("->");
      if (arrow != absl::string_view::npos) {
        for (absl::string_view tag : absl::StrSplit(line.substr(arrow + 2), ' ', absl::SkipEmpty())) {
          if (tag == "am") am_lane = index;
        }
      }
    } else if ((absl::ConsumePrefix(&line, "put") || absl::ConsumePrefix(&line, "get")) &&
               ConsumeIndex(&line, &index)) {
      rma_lanes.insert(index);
    }
  }
  if (lane_tl.empty()) return {kDataPathUnknown, false, ""};

  std::set<std::string> rma_tls;
  for (int lane : rma_lanes) {
    if (auto it = lane_tl.find(lane); it != lane_tl.end()) rma_tls.insert(it->second);
  }
  const std::string rma_list = absl::StrJoin(rma_tls, ",");
  if (pools_mapped) return {kDataPathShmDirect, false, rma_list};
  auto has = [&rma_tls](auto predicate) {
    for (const std::string& tl : rma_tls) {
      if (predicate(tl)) return true;
    }
    return false;
  };
  if (has([](const std::string& tl) {
        return absl::StartsWith(tl, "rc") || absl::StartsWith(tl, "dc");
      })) {
    return {kDataPathRdma, false, rma_list};
  }
  if (has([](const std::string& tl) { return tl == "cma" || tl == "knem"; })) {
    return {kDataPathKernelCopy, false, rma_list};
  }
  if (has([](const std::string& tl) { return tl == "xpmem"; })) {
    return {kDataPathShmDirect, false, rma_list};
  }
  // sysv and posix copy only into segments UCX allocated (not mapped here);
  // anything else with RMA that kvferry does not know is named as it is.
  for (const std::string& tl : rma_tls) {
    if (tl != "sysv" && tl != "posix" && tl != "tcp") return {"rma:" + tl, false, rma_list};
  }
  auto am = lane_tl.find(am_lane);
  if (am == lane_tl.end()) return {kDataPathUnknown, false, rma_list};
  if (am->second == "tcp") return {kDataPathTcp, true, am->second};
  return {kDataPathAmEmulated, true, am->second};
}

}  // namespace kvferry::internal
