#include "src/transfer_plan.h"

#include <algorithm>
#include <utility>

#include "src/region_map.h"

namespace kvferry::internal {

std::vector<CopyOp> PlanCopies(const KvLayout& local_layout, uint64_t local_regions,
                               const KvLayout& remote_layout, uint64_t remote_regions,
                               std::span<const uint32_t> local, std::span<const uint32_t> remote,
                               uint32_t layer_begin, uint32_t layer_end) {
  std::vector<std::pair<uint32_t, uint32_t>> pairs(local.size());
  for (size_t i = 0; i < local.size(); ++i) pairs[i] = {local[i], remote[i]};
  std::sort(pairs.begin(), pairs.end());

  struct Run {
    uint32_t local, remote, count;
  };
  std::vector<Run> runs;
  for (const auto& [l, r] : pairs) {
    if (!runs.empty()) {
      Run& last = runs.back();
      if (l == last.local + last.count && r == last.remote + last.count) {
        ++last.count;
        continue;
      }
    }
    runs.push_back({l, r, 1});
  }

  const uint64_t chunk = local_layout.chunk_bytes();
  std::vector<CopyOp> ops;
  ops.reserve(runs.size() * (layer_end - layer_begin) * local_layout.num_planes());
  for (uint32_t layer = layer_begin; layer < layer_end; ++layer) {
    for (uint32_t plane = 0; plane < local_layout.num_planes(); ++plane) {
      const PlaneAt here = LocatePlane(local_layout, local_regions, layer, plane);
      const PlaneAt there = LocatePlane(remote_layout, remote_regions, layer, plane);
      for (const Run& run : runs) {
        ops.push_back({here.region, here.offset + chunk * run.local, there.region,
                       there.offset + chunk * run.remote, chunk * run.count});
      }
    }
  }
  return ops;
}

}  // namespace kvferry::internal
